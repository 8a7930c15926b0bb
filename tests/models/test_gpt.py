"""GPT decoder: float64 numpy reference, causality, blocked attention, registry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.core import defaults
from kdjax import models
from kdjax.distill import objectives, parallel, step
from kdjax.models import gpt
from kdjax.models.partitioning import unbox

SIZES = dict(vocab_size=37, width=16, num_layers=2, num_heads=2, max_length=12)


def _np_layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_gelu(x):  # flax nn.gelu's default: the tanh approximation.
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_attention(q, k, v):  # [B, H, L, Dh], causal.
  scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
  length = q.shape[2]
  scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  return (probs / probs.sum(-1, keepdims=True)) @ v


def _np_block(x, p):
  """One pre-LN decoder block in float64 numpy (the textbook formulas)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  b, length, d = x.shape
  h = _np_layer_norm(x, p["ln_attention"])
  qkv = h @ p["qkv_kernel"].reshape(d, -1) + p["qkv_bias"].reshape(-1)
  heads = p["qkv_kernel"].shape[2]
  q, k, v = (t.reshape(b, length, heads, -1).transpose(0, 2, 1, 3)
             for t in np.split(qkv, 3, axis=-1))
  attended = _np_attention(q, k, v).transpose(0, 2, 1, 3).reshape(b, length, d)
  x = x + attended @ p["out_kernel"].reshape(d, d) + p["out_bias"]
  h = _np_layer_norm(x, p["ln_mlp"])
  h = _np_gelu(h @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"])
  return x + h @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"]


def _init(model, tokens, seed=0):
  params = unbox(model.init(jax.random.key(seed), tokens)["params"])
  # Non-zero biases and LayerNorm affine terms, so the reference checks them.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [
      leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in
      zip(leaves, keys)])


def test_block_matches_float64_numpy_reference():
  x = np.random.default_rng(0).normal(size=(2, 9, 16))
  block = gpt.DecoderBlock(num_heads=4)
  params = _init(block, jnp.asarray(x, jnp.float32))
  got = block.apply({"params": params}, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, _np_block(x, params), rtol=1e-5, atol=1e-5)


def test_model_matches_reference_with_tied_embeddings():
  model = models.get_model("gpt", **SIZES)
  tokens = np.random.default_rng(1).integers(0, SIZES["vocab_size"], (2, 10))
  params = _init(model, jnp.asarray(tokens))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = p["embed"]["embedding"][tokens] + p["positions"][:10]
  for i in range(SIZES["num_layers"]):
    x = _np_block(x, p[f"block_{i}"])
  expected = _np_layer_norm(x, p["ln_final"]) @ p["embed"]["embedding"].T
  got = model.apply({"params": params}, jnp.asarray(tokens))
  assert got.shape == (2, 10, SIZES["vocab_size"])
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # No separate output matrix: the embedding is the only [V, d] parameter.
  d, v = SIZES["width"], SIZES["vocab_size"]
  per_block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (
      4 * d * d + d)
  count = sum(a.size for a in jax.tree.leaves(params))
  assert count == v * d + SIZES["max_length"] * d + 2 * per_block + 2 * d


def test_causal_no_position_sees_the_future():
  model = models.get_model("gpt", **SIZES)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 37, (2, 12)))
  params = _init(model, tokens)
  logits = model.apply({"params": params}, tokens)
  changed = model.apply({"params": params}, tokens.at[:, 7].set(
      (tokens[:, 7] + 1) % 37))
  np.testing.assert_array_equal(changed[:, :7], logits[:, :7])
  assert not np.allclose(changed[:, 7:], logits[:, 7:], atol=1e-4)


@pytest.mark.parametrize("block_size", [3, 64])
def test_blocked_attention_matches_reference_values_and_gradients(block_size):
  rng = np.random.default_rng(3)
  q, k, v, w = (rng.normal(size=(2, 3, 10, 8)) for _ in range(4))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = gpt.causal_attention(f32(q), f32(k), f32(v), block_size=block_size)
  np.testing.assert_allclose(got, _np_attention(q, k, v), rtol=1e-5, atol=1e-5)

  def naive(q, k, v):  # Masked full softmax: the textbook gradient.
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(8)
    scores = jnp.where(jnp.tril(jnp.ones((10, 10), bool)), scores, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores), v)

  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * f32(w))
  blocked = functools.partial(gpt.causal_attention, block_size=block_size)
  grads = jax.grad(loss(blocked), argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
  expected = jax.grad(loss(naive), argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_tied_head_gradients_match_float64_reference():
  """tied_logits' hand-written backward: d hidden = g E, d E = g^T h."""
  rng = np.random.default_rng(5)
  hidden, embedding, grad = (rng.normal(size=s)
                             for s in ((2, 3, 4), (7, 4), (2, 3, 7)))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  logits, pullback = jax.vjp(gpt.tied_logits, f32(hidden), f32(embedding))
  np.testing.assert_allclose(logits, hidden @ embedding.T, rtol=1e-5,
                             atol=1e-5)
  grad_hidden, grad_embedding = pullback(f32(grad))
  np.testing.assert_allclose(grad_hidden, grad @ embedding, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(
      grad_embedding, np.einsum("blv,bld->vd", grad, hidden), rtol=1e-5,
      atol=1e-5)


def test_bfloat16_compute_is_close_to_float32():
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 37, (2, 12)))
  f32 = models.get_model("gpt", **SIZES)
  params = _init(f32, tokens)
  bf16 = models.get_model("gpt", dtype=jnp.bfloat16, **SIZES)
  low = bf16.apply({"params": params}, tokens)
  assert low.dtype == jnp.float32  # Logits for the losses, whatever computes.
  np.testing.assert_allclose(low,
                             f32.apply({"params": params}, tokens), atol=0.1)


def test_errors_name_the_field():
  with pytest.raises(ValueError, match="num_classes"):
    models.get_model("gpt", num_classes=3, **SIZES)
  model = models.get_model("gpt", **dict(SIZES, num_heads=3))
  with pytest.raises(ValueError, match="num_heads=3"):
    model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  model = models.get_model("gpt", **SIZES)
  with pytest.raises(ValueError, match="max_length=12"):
    model.init(jax.random.key(0), jnp.zeros((1, 13), jnp.int32))


def test_distillation_step_on_token_labels():
  """Teacher and student GPTs through the fused step on 8 devices, one row
  each: with SGD the update is minus lr times the gradient of the full-batch
  mean of alpha * T^2 KL + (1 - alpha) * CE over all tokens, written here
  from log_softmax; the reported sums are the hand-written terms."""
  teacher = models.get_model("gpt", **dict(SIZES, width=24, num_heads=3))
  student = models.get_model("gpt", **SIZES)
  tokens = np.random.default_rng(5).integers(0, 37, (8, 13)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
  alpha, temperature, lr = 0.5, 2.0, 0.5
  init = lambda m, s: unbox(m.init(jax.random.key(s), tokens[:1, :-1])["params"])
  # A teacher moved away from its (near-uniform) init, so KL has signal.
  teacher_params = jax.tree.map(lambda p: 3.0 * p, init(teacher, 1))
  student_params = init(student, 0)

  def hand_written(params):
    """Full-batch mean loss and its KL and CE, per token, independent of
    kdjax.distill."""
    log_p = jax.nn.log_softmax(
        teacher.apply({"params": teacher_params}, batch["inputs"]) /
        temperature)
    s = student.apply({"params": params}, batch["inputs"])
    log_q = jax.nn.log_softmax(s / temperature)
    kl = temperature**2 * jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(s),
                              batch["labels"][..., None], -1)[..., 0]
    return jnp.mean(alpha * kl + (1 - alpha) * ce), (jnp.mean(kl),
                                                     jnp.mean(ce))
  (want_loss, (want_kl, want_ce)), want_grads = jax.jit(
      jax.value_and_grad(hand_written, has_aux=True))(student_params)
  assert float(want_kl) > 0.05  # The teacher differs from the student.

  distill = defaults.get_config().distill
  distill.update(alpha=alpha, temperature=temperature)
  tx = optax.sgd(lr)
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  run = parallel.map_over_devices(functools.partial(
      step.train_step, student_apply=step.make_apply_fn(student),
      teacher_applies=(step.make_apply_fn(teacher),),
      objective=objectives.distillation(distill, num_teachers=1,
                                        total_steps=10),
      tx=tx, axis=parallel.DataAxis("shard_map")), mesh, "shard_map")
  before = jax.tree.map(np.array, student_params)
  state = parallel.replicate(step.create_train_state(
      student_params, tx, jax.random.key(0)), mesh)
  state, metrics = run(state, batch, parallel.replicate((teacher_params,),
                                                        mesh))
  grads = jax.tree.map(lambda b, a: (b - np.asarray(a)) / lr, before,
                       state.params)
  # atol: float32 rounding of params ~1 (LayerNorm scales) minus an update.
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      g, w, rtol=1e-4, atol=1e-6), grads, want_grads)
  # No leaf's gradient is lost in that tolerance (the smallest, a LayerNorm
  # scale's, is ~1.6e-4 at init).
  assert min(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4
  count = tokens[:, 1:].size
  assert int(metrics["count"]) == count
  for name, want in (("loss", want_loss), ("kl", want_kl), ("ce", want_ce)):
    np.testing.assert_allclose(float(metrics[name]) / count, float(want),
                               rtol=1e-5, err_msg=name)


def test_hidden_states_times_lm_head_are_the_logits():
  model = models.get_model("gpt", **SIZES)
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, 37, (2, 12)))
  params = _init(model, tokens)
  hidden = model.apply({"params": params}, tokens, method=model.hidden_states)
  head = models.lm_head_kernel_fn(model)(params)
  assert hidden.shape == (2, 12, 16) and head.shape == (16, 37)
  np.testing.assert_allclose(hidden @ head,
                             model.apply({"params": params}, tokens),
                             rtol=1e-5, atol=1e-5)
