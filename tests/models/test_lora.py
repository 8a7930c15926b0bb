"""LoRA adapters (kdjax.models.lora) on Llama, BERT and GPT.

B starts at zero, so an adapted model starts exactly at its base model; the
adapters sit beside the kernels they adapt (stacked with scan_layers, with
the kernels' axis names); merging them into the kernels gives the plain
model the adapted forward; generation sees them; training moves them and
nothing else (runs through modes.run: tests/e2e/test_lora_train.py; the
PEFT export: tests/weights/test_export_peft.py).
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from kdjax import models
from kdjax.core import defaults
from kdjax.distill import masks, objectives, parallel, step
from kdjax.models import generate, lora, partitioning
from kdjax.run import train

TOKENS = jnp.array([[1, 5, 7, 3, 0, 2], [2, 9, 4, 8, 6, 1]], jnp.int32)
SIZES = {
    "llama": dict(vocab_size=50, width=16, num_layers=2, num_heads=4,
                  num_kv_heads=2, mlp_dim=24, max_length=16),
    "bert": dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4,
                 intermediate_size=24, max_position_embeddings=16,
                 num_classes=3, dropout_rate=0.0, attention_dropout_rate=0.0),
    "gpt": dict(vocab_size=50, width=16, num_layers=2, num_heads=4,
                max_length=16),
}
# Llama both ways; BERT and GPT (Dense projections, as Llama's MLP) scanned.
CASES = [("llama", False), ("llama", True), ("bert", True), ("gpt", True)]
SETTINGS = lora.LoraSettings(rank=2, alpha=4.0)  # scale 2: not 1.


def _models(name, scan=False, settings=SETTINGS, **fields):
  base = models.get_model(name, scan_layers=scan, **SIZES[name], **fields)
  targets = settings.targets or lora.DEFAULT_TARGETS[name]
  adapted = lora.wrap(base, lora.LoraSettings(
      settings.rank, settings.alpha, settings.dropout, targets))
  return base, adapted


def _init(model, seed=0):
  """Params of the model's shapes, drawn here (a compiled flax init of a
  tiny Llama takes seconds on 2 cores): normal weights, norm scales near 1,
  lora_a random and lora_b zero as lora initialises them
  (test_adapters_start_as_lora_initialises_them checks that init)."""
  shapes = flax.traverse_util.flatten_dict(partitioning.unbox(
      jax.eval_shape(model.init, jax.random.key(seed), TOKENS)["params"]))
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in shapes.items():
    value = rng.normal(0.0, 0.2, shape.shape).astype(np.float32)
    if key[-1] == "scale":
      value += 1.0
    elif key[-1] == lora.B:
      value[...] = 0.0
    flat[key] = jnp.asarray(value)
  return flax.traverse_util.unflatten_dict(flat)


def _compiled(model, train=False):
  """params (, rngs) -> logits of TOKENS, compiled once for all calls."""
  return jax.jit(lambda p, r=None: model.apply({"params": p}, TOKENS,
                                               train=train, rngs=r or {}))


def _trained_adapters(params, seed=1):
  """Adapters as after training: B no longer zero (A random already)."""
  flat = flax.traverse_util.flatten_dict(params)
  rng = np.random.default_rng(seed)
  for key in sorted(flat):
    if key[-1] == lora.B:
      flat[key] = jnp.asarray(rng.normal(0.0, 0.3, flat[key].shape),
                              jnp.float32)
  return flax.traverse_util.unflatten_dict(flat)


_merge = jax.jit(lora.merge, static_argnums=1)


def test_adapters_start_as_lora_initialises_them():
  """B = 0; A as PyTorch's Linear and PEFT: U(-1/sqrt(in), 1/sqrt(in))."""
  class Block(flax.linen.Module):
    @flax.linen.compact
    def __call__(self, x):
      return flax.linen.Dense(64, name="query")(x)

  model = lora.wrap(Block(), lora.LoraSettings(8, 16.0, targets=("query",)))
  x = jnp.ones((1, 400))
  params = model.init(jax.random.key(0), x)["params"]["query"]
  assert params[lora.A].shape == (400, 8) and params[lora.B].shape == (8, 64)
  np.testing.assert_array_equal(params[lora.B], 0.0)
  a = np.asarray(params[lora.A])
  bound = 1.0 / np.sqrt(400)
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
  np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.05)
  np.testing.assert_array_equal(  # So the block starts as it was.
      model.apply({"params": {"query": params}}, x),
      Block().apply({"params": {"query": lora.split(params)[1]}}, x))


@pytest.mark.parametrize("name", sorted(SIZES))
def test_b_at_zero_starts_exactly_at_the_base_model(name):
  """Op by op, the adapted model computes the base model's bits: y + scale
  * (x A) 0 is y."""
  base, adapted = _models(name)
  params = _init(adapted)
  np.testing.assert_array_equal(
      adapted.apply({"params": params}, TOKENS),
      base.apply({"params": lora.split(params)[1]}, TOKENS))


@pytest.mark.parametrize("name, scan", CASES)
def test_merged_kernels_give_the_adapted_forward(name, scan):
  base, adapted = _models(name, scan)
  adapted_fn, base_fn = _compiled(adapted), _compiled(base)
  params = _init(adapted)
  # At B = 0, compiled: XLA may fuse the two programs' neighbouring ops
  # differently, so the same function to float32 rounding.
  np.testing.assert_allclose(adapted_fn(params),
                             base_fn(lora.split(params)[1]), rtol=1e-6,
                             atol=1e-6)
  params = _trained_adapters(params)
  merged = _merge(params, adapted.lora)
  assert not lora.split(merged)[0]  # No adapter left.
  got = adapted_fn(params)
  np.testing.assert_allclose(base_fn(merged), got, rtol=1e-5, atol=1e-5)
  # The adapters matter: the base alone computes something else.
  base_only = base_fn(lora.split(params)[1])
  assert np.max(np.abs(base_only - got)) > 1e-2


def test_merge_is_w_plus_scale_a_b_in_float64():
  base, adapted = _models("llama")
  params = _trained_adapters(_init(adapted))
  merged = lora.merge(params, adapted.lora)
  for module in lora.adapted_kernels(params):
    node, out = params, merged
    for part in module:
      node, out = node[part], out[part]
    a, b = (np.asarray(node[k], np.float64) for k in (lora.A, lora.B))
    r = a.shape[-1]
    want = (np.asarray(node["kernel"], np.float64)
            + (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(
                node["kernel"].shape) * 2.0)  # alpha / rank = 4 / 2.
    np.testing.assert_allclose(out["kernel"], want, rtol=1e-6, atol=1e-6)
  # With B = 0 every kernel comes back bit for bit (signed zeros too).
  zero = _init(adapted)
  flat = flax.traverse_util.flatten_dict(zero)
  flat[("layers_0", "mlp", "up", "kernel")] = flat[
      ("layers_0", "mlp", "up", "kernel")].at[0, 0].set(-0.0)
  zero = flax.traverse_util.unflatten_dict(flat)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(
      np.asarray(x).view(np.int32), np.asarray(y).view(np.int32)),
               lora.merge(zero, adapted.lora), lora.split(zero)[1])


def test_adapters_sit_beside_their_kernels_stacked_with_their_axis_names():
  _, adapted = _models("llama", scan=True)
  boxed = jax.eval_shape(adapted.init, jax.random.key(0), TOKENS)["params"]
  params = partitioning.unbox(boxed)
  names = flax.traverse_util.flatten_dict(partitioning.logical_names(boxed))
  query = params["layers"]["attention"]["query"]
  assert query["kernel"].shape == (2, 16, 4, 4)  # [layers, D, H, Dh].
  assert query[lora.A].shape == (2, 16, 2)
  assert query[lora.B].shape == (2, 2, 4, 4)
  out = params["layers"]["attention"]["out"]
  assert out[lora.A].shape == (2, 4, 4, 2) and out[lora.B].shape == (2, 2, 16)
  here = ("layers", "attention", "query")
  assert names[here + (lora.A,)] == P("layers", "embed", None)
  assert names[here + (lora.B,)] == P("layers", None, "heads", "head_dim")
  down = ("layers", "mlp", "down")
  assert names[down + (lora.A,)] == P("layers", "mlp", None)
  assert names[down + (lora.B,)] == P("layers", None, "embed")
  # Unrolled: one pair per layer, at the unrolled names.
  _, unrolled = _models("llama")
  flat = flax.traverse_util.flatten_dict(partitioning.unbox(jax.eval_shape(
      unrolled.init, jax.random.key(0), TOKENS)["params"]))
  assert ("layers_1", "mlp", "gate", lora.B) in flat
  assert not any(k[-1] in lora.ADAPTERS for k in flat
                 if k[0] in ("embed", "final_norm"))


def test_targets_pick_projections_by_name_suffix_or_pattern():
  def adapted_modules(name, targets, **fields):
    _, model = _models(name, settings=lora.LoraSettings(2, 4.0,
                                                        targets=targets),
                       **fields)
    shapes = jax.eval_shape(model.init, jax.random.key(0), TOKENS)
    return {"/".join(m) for m in lora.adapted_kernels(shapes["params"])}

  assert adapted_modules("llama", ("attention/out",)) == {
      "layers_0/attention/out", "layers_1/attention/out"}
  assert adapted_modules("llama", ("layers_1/mlp/*",)) == {
      "layers_1/mlp/gate", "layers_1/mlp/up", "layers_1/mlp/down"}
  # BERT's 'output' is the attention's and the feed-forward's; the pooler
  # and the classifier head are not default targets.
  bert = adapted_modules("bert", lora.DEFAULT_TARGETS["bert"])
  assert {"encoder/layer_0/output", "encoder/layer_0/attention/output",
          "encoder/layer_1/intermediate"} <= bert
  assert not any("pooler" in m or m.startswith("head") for m in bert)
  with pytest.raises(ValueError, match=r"\['q_proj'\] match no projection"
                     r".*layers_0/attention/key"):
    adapted_modules("llama", ("query", "q_proj"))
  with pytest.raises(ValueError, match="rank=0"):
    lora.wrap(_models("llama")[0],
              lora.LoraSettings(0, 4.0, targets=("query",)))
  with pytest.raises(ValueError, match="dropout=1.0"):
    lora.wrap(_models("llama")[0],
              lora.LoraSettings(2, 4.0, 1.0, ("query",)))


def test_dropout_drops_the_adapter_input_in_training_only():
  settings = lora.LoraSettings(2, 4.0, dropout=0.5)
  _, plain = _models("llama", scan=True)
  _, dropping = _models("llama", scan=True, settings=settings)
  params = _trained_adapters(_init(plain))
  rngs = {"dropout": jax.random.key(3)}
  plain_fn, training = _compiled(plain), _compiled(dropping, train=True)
  eval_out = plain_fn(params)
  np.testing.assert_array_equal(_compiled(dropping)(params, rngs), eval_out)
  train_out = training(params, rngs)
  assert np.max(np.abs(train_out - eval_out)) > 1e-3
  # Only the adapters' input is dropped: with B = 0 training is the base.
  zero = _init(plain)
  np.testing.assert_allclose(training(zero, rngs), plain_fn(zero),
                             rtol=1e-6, atol=1e-6)


def test_generation_runs_the_adapters():
  base, adapted = _models("llama")
  params = _trained_adapters(_init(adapted))
  prompt = TOKENS[:, :3]
  got = generate.generate(adapted, params, prompt, max_new_tokens=5)
  merged = generate.generate(base, lora.merge(params, adapted.lora), prompt,
                             max_new_tokens=5)
  np.testing.assert_array_equal(got, merged)
  without = generate.generate(base, lora.split(params)[1], prompt,
                              max_new_tokens=5)
  assert np.any(got != without)


def test_training_moves_the_adapters_and_the_head_only():
  """Three fused distillation steps on 2 devices, masked as build_step
  masks them: the base comes back bit-identical, only adapters (and the
  head train.trainable adds) have optimizer state, and they move."""
  teacher, student = _models("bert")
  teacher_params = jax.tree.map(lambda p: 3.0 * p, _init(teacher, seed=5))
  params = _init(student)
  mask = train.trainable_mask(jax.eval_shape(lambda: params), ("head",),
                              "student.train.trainable", adapters=True)
  distill = defaults.get_config().distill
  objective = objectives.distillation(distill, num_teachers=1, total_steps=3)
  tx = masks.freeze(optax.adam(1e-2), (mask, {}))
  mesh = parallel.make_mesh(jax.devices()[:2])
  per_device = functools.partial(
      step.train_step, student_apply=step.make_apply_fn(student),
      teacher_applies=(step.make_apply_fn(teacher),), objective=objective,
      tx=tx, axis=parallel.DataAxis("shard_map"), trainable_mask=mask)
  run = parallel.map_over_devices(per_device, mesh, "shard_map")
  state = parallel.replicate(
      step.create_train_state(params, tx, jax.random.key(0)), mesh)
  frozen = parallel.replicate((teacher_params,), mesh)
  before = flax.traverse_util.flatten_dict(jax.device_get(params))
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = {"inputs": rng.integers(1, 50, (4, 6)).astype(np.int32),
             "labels": rng.integers(0, 3, 4).astype(np.int32)}
    state, _ = run(state, batch, frozen)
  after = flax.traverse_util.flatten_dict(jax.device_get(state.params))
  trained = {k for k in before if k[-1] in lora.ADAPTERS or k[0] == "head"}
  for key, value in before.items():
    if key in trained:
      assert np.max(np.abs(after[key] - value)) > 1e-4, key
    else:
      np.testing.assert_array_equal(after[key], value, err_msg=str(key))
  n_trained = sum(before[k].size for k in trained)
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert n_opt == 2 * n_trained  # Adam's two moments, nothing frozen.
  assert n_trained < sum(v.size for v in before.values()) // 4
