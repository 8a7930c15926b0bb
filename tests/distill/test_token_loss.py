"""Chunked token-level loss: same loss, metrics and gradients as full logits,
masks respected, no [batch, length, vocab] buffer, clear errors."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from kdjax.core import defaults
from kdjax.distill import objectives, parallel, step, token_loss
from kdjax.distill.objectives import ModelOutputs
from kdjax.models import llama
from kdjax.models.partitioning import unbox

B, L, D, DT, V = 3, 24, 16, 20, 96


def _distill(**fields):
  distill = defaults.get_config().distill
  distill.update({"alpha": 0.5, "temperature": 2.0, **fields})
  objectives.validate_distill(distill)
  return distill


_SECOND_TEACHER = (dict(checkpoint_dir="x", model={}, weight=3.0),)
OBJECTIVES = {
    "kd": (_distill(), 1),
    "reverse_kl": (_distill(terms=(dict(name="reverse_kl", weight=0.7),
                                   dict(name="ce", weight=0.3))), 1),
    "jsd": (_distill(terms=(dict(name="jsd", weight=0.5, beta=0.5),
                            dict(name="ce", weight=0.5))), 1),
    "ensemble": (_distill(extra_teachers=_SECOND_TEACHER), 2),
    "sum_teacher_argmax": (_distill(extra_teachers=_SECOND_TEACHER,
                                    combine="sum", hard_labels="teacher"), 2),
    "topk_scheduled": (_distill(
        terms=(dict(name="topk_kl", weight=1.0, k=5),
               dict(name="ce", weight=0.2, weight_end=0.8, schedule="linear")),
        temperature=4.0, temperature_end=1.0,
        temperature_schedule="cosine"), 1),
}


def _objective(name):
  distill, num_teachers = OBJECTIVES[name]
  return objectives.distillation(distill, num_teachers=num_teachers,
                                 total_steps=10), num_teachers


def _data(num_teachers, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  arr = lambda shape, s: jnp.asarray(rng.normal(size=shape) * s, dtype)
  widths = (DT, 12)[:num_teachers]
  mask = (rng.random((B, L)) < 0.7).astype(np.float32)
  mask[0, :] = 0.0  # A fully padded sequence.
  return dict(
      student_hidden=arr((B, L, D), 1.0), student_head=arr((D, V), 0.5),
      teacher_hiddens=[arr((B, L, w), 1.0) for w in widths],
      teacher_heads=[arr((w, V), 0.6) for w in widths],
      labels=jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32),
      mask=jnp.asarray(mask))


def _value_and_grads(fn, objective, data, step=3, **kw):
  """loss, metrics, (d student_hidden, d student_head), jitted."""
  def loss(h, w, data):
    return fn(objective, h, w, data["teacher_hiddens"], data["teacher_heads"],
              data["labels"], data["mask"], jnp.int32(step),
              global_count=jnp.sum(data["mask"]) + 2.0, **kw)
  (value, metrics), grads = jax.jit(
      jax.value_and_grad(loss, (0, 1), has_aux=True))(
          data["student_hidden"], data["student_head"], data)
  return value, metrics, grads


def _assert_same(a, b, rtol=2e-5, atol=1e-6):
  (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = a, b
  np.testing.assert_allclose(loss_a, loss_b, rtol=rtol)
  assert sorted(metrics_a) == sorted(metrics_b)
  for key in metrics_a:
    np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=rtol,
                               atol=atol, err_msg=key)
  for g_a, g_b in zip(grads_a, grads_b):
    scale = float(jnp.max(jnp.abs(g_b)))
    assert scale > 0
    np.testing.assert_allclose(g_a, g_b, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("name, chunk_size", [
    ("kd", 8), ("reverse_kl", 7), ("jsd", 5), ("ensemble", 7),  # 7, 5: padded.
    ("sum_teacher_argmax", 8), ("topk_scheduled", 12)])
def test_chunked_equals_direct(name, chunk_size):
  objective, num_teachers = _objective(name)
  data = _data(num_teachers)
  direct = _value_and_grads(token_loss.direct_objective, objective, data)
  chunked = _value_and_grads(token_loss.chunked_objective, objective, data,
                             chunk_size=chunk_size)
  _assert_same(chunked, direct)
  keys = {"loss", "correct", "count"} | {t.label for t in objective.terms}
  assert keys | {"agreement"} == set(direct[1])
  np.testing.assert_allclose(direct[1]["count"], np.sum(data["mask"]))


def test_direct_is_the_steps_formula_on_full_logits():
  """What step.train_step's loss_and_metrics computes from [B, L, V] logits."""
  objective, _ = _objective("ensemble")
  data = _data(2)
  s_logits = data["student_hidden"] @ data["student_head"]
  teachers = [ModelOutputs(h @ w) for h, w in
              zip(data["teacher_hiddens"], data["teacher_heads"])]
  per_token, terms = objective(ModelOutputs(s_logits), teachers,
                               data["labels"], jnp.int32(3))
  w = data["mask"]
  predictions = jnp.argmax(s_logits, -1)
  expected = {"loss": jnp.sum(per_token * w),
              "correct": jnp.sum((predictions == data["labels"]) * w),
              "count": jnp.sum(w),
              "agreement": jnp.sum(
                  (predictions == jnp.argmax(teachers[0].logits, -1)) * w),
              **{k: jnp.sum(v * w) for k, v in terms.items()}}
  loss, metrics, _ = _value_and_grads(token_loss.direct_objective, objective,
                                      data)
  np.testing.assert_allclose(loss, expected["loss"] / (jnp.sum(w) + 2.0),
                             rtol=1e-5)
  assert set(metrics) == set(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=key)


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_plain_kd_loss_and_gradients_against_float64_numpy():
  objective, _ = _objective("kd")  # 0.5 * T^2 * KL + 0.5 * CE, T = 2.
  data = _data(1, seed=4)
  loss, metrics, (d_h, d_w) = _value_and_grads(
      token_loss.chunked_objective, objective, data, chunk_size=5)

  f64 = lambda x: np.asarray(x, np.float64)
  h, w = f64(data["student_hidden"]), f64(data["student_head"])
  th, tw = f64(data["teacher_hiddens"][0]), f64(data["teacher_heads"][0])
  y, mask, t = np.asarray(data["labels"]), f64(data["mask"]), 2.0
  count = mask.sum() + 2.0
  s, z = h @ w, th @ tw
  log_q_t, log_p_t, log_q = (_np_log_softmax(s / t), _np_log_softmax(z / t),
                             _np_log_softmax(s))
  kl = t**2 * np.sum(np.exp(log_p_t) * (log_p_t - log_q_t), -1)
  ce = -np.take_along_axis(log_q, y[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, np.sum(mask * (0.5 * kl + 0.5 * ce)) / count,
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], np.sum(mask * kl), rtol=1e-5)
  np.testing.assert_allclose(metrics["ce"], np.sum(mask * ce), rtol=1e-5)
  # d loss / d logits = mask / count * (0.5 * T * (q_T - p_T) + 0.5 * (q - y)).
  onehot = np.eye(V)[y]
  d_logits = (mask / count)[..., None] * (
      0.5 * t * (np.exp(log_q_t) - np.exp(log_p_t)) +
      0.5 * (np.exp(log_q) - onehot))
  np.testing.assert_allclose(d_h, d_logits @ w.T, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(d_w, np.einsum("bld,blv->dv", h, d_logits),
                             rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fn", ["direct", "chunked"])
def test_masked_tokens_change_nothing(fn):
  objective, _ = _objective("ensemble")
  data = _data(2, seed=1)
  kw = {"chunk_size": 6} if fn == "chunked" else {}
  loss_fn = functools.partial(_value_and_grads,
                              getattr(token_loss, f"{fn}_objective"), objective,
                              **kw)
  base = loss_fn(data)
  masked = np.asarray(data["mask"]) == 0
  rng = np.random.default_rng(9)
  labels = np.asarray(data["labels"]).copy()
  labels[masked] = -100  # Hugging Face's ignore index: out of range.
  labels[0, :3] = V + 5
  noisy = lambda x: jnp.where(masked[..., None],
                              rng.normal(size=x.shape) * 50.0, x)
  perturbed = dict(data, labels=jnp.asarray(labels),
                   teacher_hiddens=[noisy(x) for x in data["teacher_hiddens"]])
  after = loss_fn(perturbed)
  _assert_same(after, base, rtol=1e-6, atol=1e-7)
  assert np.all(np.isfinite(after[2][0])) and np.all(np.isfinite(after[2][1]))
  # Student states at masked positions get exactly zero gradient.
  assert np.all(np.asarray(after[2][0])[masked] == 0.0)


def test_teachers_get_no_gradient_and_value_only_path_matches():
  objective, _ = _objective("kd")
  data = _data(1, seed=2)

  def loss(fn, th, tw, **kw):
    return fn(objective, data["student_hidden"], data["student_head"], [th],
              [tw], data["labels"], data["mask"], jnp.int32(0),
              global_count=jnp.sum(data["mask"]), **kw)[0]
  args = (data["teacher_hiddens"][0], data["teacher_heads"][0])
  chunked = functools.partial(loss, token_loss.chunked_objective, chunk_size=8)
  for g in jax.grad(chunked, (0, 1))(*args):
    assert not np.any(g)
  # Without differentiation the plain scan runs (no gradient work).
  np.testing.assert_allclose(jax.jit(chunked)(*args),
                             loss(token_loss.direct_objective, *args),
                             rtol=1e-6)


def test_token_objective_dispatches_on_chunk_size():
  objective, _ = _objective("kd")
  data = _data(1)
  direct = _value_and_grads(token_loss.token_objective, objective, data,
                            chunk_size=0)
  chunked = _value_and_grads(token_loss.token_objective, objective, data,
                             chunk_size=100)  # > L: one chunk.
  _assert_same(chunked, direct)


def test_bfloat16_inputs_match_direct_within_bfloat16_tolerance():
  objective, _ = _objective("kd")
  data = _data(1, seed=5, dtype=jnp.bfloat16)
  direct = _value_and_grads(token_loss.direct_objective, objective, data)
  chunked = _value_and_grads(token_loss.chunked_objective, objective, data,
                             chunk_size=8)
  assert direct[2][0].dtype == chunked[2][0].dtype == jnp.bfloat16
  assert chunked[2][1].dtype == jnp.bfloat16
  np.testing.assert_allclose(chunked[0], direct[0], rtol=1e-5)  # f32 logits.
  for g_a, g_b in zip(chunked[2], direct[2]):
    g_a, g_b = np.asarray(g_a, np.float32), np.asarray(g_b, np.float32)
    assert np.max(np.abs(g_a - g_b)) <= 2e-2 * np.max(np.abs(g_b))


def _compiled_hlo(fn, length, **kw):
  objective, _ = _objective("kd")
  b, d, v = 2, 8, 512
  args = (jnp.zeros((b, length, d)), jnp.zeros((d, v)),
          jnp.zeros((b, length, d)), jnp.zeros((d, v)),
          jnp.zeros((b, length), jnp.int32), jnp.ones((b, length)))

  def loss(h, w, th, tw, y, m):
    return fn(objective, h, w, [th], [tw], y, m, jnp.int32(0),
              global_count=jnp.sum(m), **kw)
  compiled = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True)).lower(
      *args).compile()
  return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()


def test_chunked_memory_grows_with_chunk_size_not_length():
  logits_bytes = 2 * 256 * 512 * 4  # One [B, L, V] float32 at L = 256.
  direct_temp, direct_hlo = _compiled_hlo(token_loss.direct_objective, 256)
  short_temp, _ = _compiled_hlo(token_loss.chunked_objective, 64,
                                chunk_size=16)
  long_temp, long_hlo = _compiled_hlo(token_loss.chunked_objective, 256,
                                      chunk_size=16)
  wide_temp, _ = _compiled_hlo(token_loss.chunked_objective, 256,
                               chunk_size=64)
  # The shape check can fail: the direct program does hold [2, 256, 512].
  assert re.search(r"f32\[2,256,512\]", direct_hlo)
  assert not re.search(r"\[2,256,512\]", long_hlo)
  assert direct_temp > 2 * logits_bytes
  assert long_temp < 0.15 * direct_temp
  assert long_temp < 1.3 * short_temp  # 4x the length, about the same memory.
  assert wide_temp > 2.5 * long_temp  # 4x the chunk, about 4x the memory.


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5, True, "8", None])
def test_bad_chunk_size_is_named(chunk_size):
  objective, _ = _objective("kd")
  data = _data(1)
  with pytest.raises(ValueError, match=r"chunk_size=.*positive int"):
    token_loss.chunked_objective(
        objective, data["student_hidden"], data["student_head"],
        data["teacher_hiddens"], data["teacher_heads"], data["labels"],
        data["mask"], jnp.int32(0), chunk_size=chunk_size, global_count=1.0)


@pytest.mark.parametrize("change, message", [
    (dict(student_head=jnp.zeros((D + 1, V))),
     r"student head must be \[width=16"),
    (dict(teacher_heads=[jnp.zeros((DT, V + 1))]), r"vocabulary 97.*96"),
    (dict(teacher_heads=[]), r"1 teacher hidden states but 0 teacher heads"),
    (dict(labels=jnp.zeros((B,), jnp.int32), mask=jnp.ones((B,))),
     r"labels must be \[batch, length\]"),
    (dict(mask=jnp.ones((B, L + 1))), r"mask shape"),
])
def test_bad_shapes_are_named(change, message):
  objective, _ = _objective("kd")
  data = dict(_data(1), **change)
  with pytest.raises(ValueError, match=message):
    token_loss.chunked_objective(
        objective, data["student_hidden"], data["student_head"],
        data["teacher_hiddens"], data["teacher_heads"], data["labels"],
        data["mask"], jnp.int32(0), chunk_size=8, global_count=1.0)


def test_feature_terms_and_missing_teachers_are_refused():
  data = _data(1)
  args = (data["student_hidden"], data["student_head"], data["teacher_hiddens"],
          data["teacher_heads"], data["labels"], data["mask"], jnp.int32(0))
  features = objectives.distillation(
      _distill(features=(dict(student="a", teacher="b", loss="mse"),)),
      num_teachers=1, total_steps=1)
  with pytest.raises(ValueError, match="do not support feature terms"):
    token_loss.chunked_objective(features, *args, chunk_size=8, global_count=1.)
  two, _ = _objective("ensemble")
  with pytest.raises(ValueError, match="combines 2 teachers but 1 were given"):
    token_loss.chunked_objective(two, *args, chunk_size=8, global_count=1.0)


def test_under_shard_map_one_gradient_all_reduce_and_full_batch_gradient():
  """8 devices: the head's gradient is reduced once (not once per chunk) and
  equals the single-device full-batch gradient."""
  objective, _ = _objective("jsd")
  rng = np.random.default_rng(7)
  b = 8
  h, th = (jnp.asarray(rng.normal(size=(b, L, w)), jnp.float32)
           for w in (D, DT))
  w_s = jnp.asarray(rng.normal(size=(D, V)) * 0.5, jnp.float32)
  w_t = jnp.asarray(rng.normal(size=(DT, V)) * 0.5, jnp.float32)
  y = jnp.asarray(rng.integers(0, V, (b, L)), jnp.int32)
  m = jnp.asarray(rng.random((b, L)) < 0.8, jnp.float32)
  mesh = parallel.make_mesh()

  def run(fn, **kw):
    def per_device(h, w_s, th, w_t, y, m):
      count = jax.lax.psum(jnp.sum(m), parallel.DATA_AXIS)
      grads, metrics = jax.grad(
          lambda h, w: fn(objective, h, w, [th], [w_t], y, m, jnp.int32(0),
                          global_count=count, **kw),
          (0, 1), has_aux=True)(h, w_s)
      return grads, jax.lax.psum(metrics, parallel.DATA_AXIS)
    mapped = jax.jit(jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(P("data"), P(), P("data"), P(), P("data"), P("data")),
        out_specs=((P("data"), P()), P())))
    text = mapped.lower(h, w_s, th, w_t, y, m).compile().as_text()
    return mapped(h, w_s, th, w_t, y, m), len(re.findall(r"all-reduce\(", text))

  (direct_grads, direct_metrics), direct_reduces = run(
      token_loss.direct_objective)
  (grads, metrics), reduces = run(token_loss.chunked_objective, chunk_size=8)
  assert reduces == direct_reduces
  one_device = _value_and_grads(
      token_loss.direct_objective, objective,
      dict(teacher_hiddens=[th], teacher_heads=[w_t], labels=y, mask=m,
           student_hidden=h, student_head=w_s))
  # _value_and_grads adds 2 to the count; rescale to compare.
  scale = (jnp.sum(m) + 2.0) / jnp.sum(m)
  for g, g_direct, g_one in zip(grads, direct_grads, one_device[2]):
    np.testing.assert_allclose(g, g_direct, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(g, g_one * scale, rtol=2e-5, atol=1e-7)
  for key in direct_metrics:
    np.testing.assert_allclose(metrics[key], direct_metrics[key], rtol=2e-5)


def test_chunked_and_direct_token_loss_train_alike():
  """One distillation step on 8 devices: chunked LM loss == direct, and both
  gradients == jax.grad of the full-batch masked mean loss written out here.

  SGD at learning rate 1, so the parameter change is minus the gradient
  (Adam's update would hide a wrong gradient scale).
  """
  student = llama.Llama(vocab_size=97, width=16, num_layers=1, num_heads=2,
                        num_kv_heads=1, mlp_dim=24, max_length=16)
  teacher = llama.Llama(vocab_size=97, width=24, num_layers=2, num_heads=2,
                        num_kv_heads=2, mlp_dim=32, max_length=16)
  tokens = np.random.default_rng(0).integers(0, 97, (8, 13)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:],
           "mask": (np.arange(12) < 10).astype(np.float32)[None].repeat(8, 0)}
  init = lambda m, k: unbox(jax.jit(lambda key: m.init(
      key, tokens[:1, :-1]))(jax.random.key(k))["params"])
  distill = defaults.get_config().distill
  distill.update(alpha=0.5, temperature=2.0)
  objective = objectives.distillation(distill, num_teachers=1, total_steps=1)
  student_params = jax.tree.map(np.asarray, init(student, 0))
  teacher_params = init(teacher, 1)

  def mean_loss(params):  # 0.5 T^2 KL(teacher_T || student_T) + 0.5 CE.
    s = student.apply({"params": params}, batch["inputs"])
    t = teacher.apply({"params": teacher_params}, batch["inputs"])
    log_q = jax.nn.log_softmax(s / 2.0)
    log_p = jax.nn.log_softmax(t / 2.0)
    kl = 4.0 * jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(s),
                              batch["labels"][..., None], -1)[..., 0]
    per_token = 0.5 * kl + 0.5 * ce
    return jnp.sum(per_token * batch["mask"]) / jnp.sum(batch["mask"])
  expected_grads = jax.device_get(jax.jit(jax.grad(mean_loss))(student_params))
  expected_loss = float(jax.jit(mean_loss)(student_params))

  tx = optax.sgd(1.0)
  mesh = parallel.make_mesh()
  results = []
  for chunk in (0, 5):
    per_device = functools.partial(
        step.train_step, student_apply=step.make_lm_apply_fn(student),
        teacher_applies=(step.make_lm_apply_fn(teacher),), objective=objective,
        tx=tx, axis=parallel.DataAxis("shard_map"), token_chunk_size=chunk)
    run = parallel.map_over_devices(per_device, mesh, "shard_map")
    state = parallel.replicate(step.create_train_state(
        student_params, tx, jax.random.key(1)), mesh)
    state, metrics = run(state, batch,
                         (parallel.replicate(teacher_params, mesh),))
    grads = jax.tree.map(lambda b, a: b - np.asarray(a), student_params,
                         jax.device_get(state.params))
    results.append((grads, jax.device_get(metrics)))
  (grads_a, metrics_a), (grads_b, metrics_b) = results
  assert float(metrics_a["count"]) == 80
  np.testing.assert_allclose(float(metrics_a["loss"]) / 80, expected_loss,
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics_a["loss"]),
                             float(metrics_b["loss"]), rtol=1e-5)
  for grads in (grads_a, grads_b):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-3,
                                   atol=1e-6), grads, expected_grads)
  # Not vanishingly small next to that tolerance.
  assert float(optax.tree.norm(expected_grads)) > 0.1
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-4,
                                 atol=1e-6), grads_a, grads_b)
