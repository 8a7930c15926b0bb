"""Objectives from the config: weighted terms, schedules, several teachers, features,
and global normalisation of token-level losses across devices and micro-steps."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.core import defaults
from kdjax import models
from kdjax.distill import features, losses, objectives, parallel, step
from kdjax.distill.objectives import ModelOutputs
from kdjax.models.partitioning import unbox


def _distill(**fields):
  distill = defaults.get_config().distill
  distill.update({"alpha": 0.5, "temperature": 2.0, **fields})
  return distill


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(log_p, log_q):
  return np.sum(np.exp(log_p) * (log_p - log_q), -1)


@pytest.fixture
def logits():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(6, 7)).astype(np.float32) * 3,
          rng.normal(size=(6, 7)).astype(np.float32) * 3,
          rng.integers(0, 7, 6))


def test_default_is_hintons_formula_against_float64(logits):
  s, t, y = logits
  objective = objectives.distillation(_distill(alpha=0.3, temperature=4.0),
                                      num_teachers=1, total_steps=10)
  loss, terms = objective(ModelOutputs(s), [ModelOutputs(t)], y, jnp.int32(0))
  kl = 16.0 * _np_kl(_np_log_softmax(t / 4), _np_log_softmax(s / 4))
  ce = -_np_log_softmax(s)[np.arange(6), y]
  np.testing.assert_allclose(loss, 0.3 * kl + 0.7 * ce, rtol=1e-5)
  np.testing.assert_allclose(terms["kl"], kl, rtol=1e-5)
  assert "T=4" in objective.description and "0.3 * kl" in objective.description


def test_weighted_sum_of_any_terms(logits):
  s, t, y = logits
  distill = _distill(terms=(dict(name="reverse_kl", weight=0.6),
                            dict(name="jsd", weight=0.3, beta=0.2),
                            dict(name="ce", weight=0.1)))
  objective = objectives.distillation(distill, num_teachers=1, total_steps=10)
  loss, _ = objective(ModelOutputs(s), [ModelOutputs(t)], y, jnp.int32(3))
  expected = (0.6 * losses.reverse_kl(s, t, temperature=2.0)
              + 0.3 * losses.generalized_jsd(s, t, temperature=2.0, beta=0.2)
              + 0.1 * losses.softmax_cross_entropy(s, y))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert "jsd(beta=0.2)" in objective.description


def _progress64(kind, step_, total):
  """The fraction of the way from start to end, float64."""
  frac = min(step_ / total, 1.0)
  return frac if kind == "linear" else 0.5 * (1 - np.cos(np.pi * frac))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_weight_and_temperature_schedules(logits, kind):
  s, t, y = logits
  distill = _distill(terms=(dict(name="kl", weight=1.0, weight_end=0.0,
                                 schedule=kind),),
                     temperature=1.0, temperature_end=3.0,
                     temperature_schedule=kind)
  objective = objectives.distillation(distill, num_teachers=1, total_steps=100)
  for step_ in (0, 25, 50, 100, 120):  # 25: cosine and linear differ there.
    f = _progress64(kind, step_, 100)
    w, temp = 1.0 - f, 1.0 + 2.0 * f
    loss, _ = objective(ModelOutputs(s), [ModelOutputs(t)], y,
                        jnp.int32(step_))
    expected = w * temp**2 * _np_kl(_np_log_softmax(t / temp),
                                    _np_log_softmax(s / temp))
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("start,end", [(0.0, 1.0), (1.0, 0.0), (1.0, 4.0),
                                       (2.0, 0.5)])
def test_schedules_run_from_start_to_end(kind, start, end):
  """Every step against float64, ramps up from 0 included (a term switched
  on gradually must not stay at 0)."""
  sched = objectives.make_schedule(start, end, kind, 40)
  for step_ in range(0, 46, 3):
    expected = start + (end - start) * _progress64(kind, step_, 40)
    assert float(sched(step_)) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_two_teacher_ensemble_is_a_mixture_in_probability_space(logits):
  s, t1, y = logits
  t2 = np.roll(t1, 1, axis=-1) * 0.5
  objective = objectives.distillation(
      _distill(alpha=1.0, temperature=2.0, teacher_weight=3.0,
               extra_teachers=(dict(checkpoint_dir="x", model={}, weight=1.0),)),
      num_teachers=2, total_steps=1)
  loss, _ = objective(ModelOutputs(s), [ModelOutputs(t1), ModelOutputs(t2)], y,
                      jnp.int32(0))
  mix = 0.75 * np.exp(_np_log_softmax(t1 / 2)) + 0.25 * np.exp(
      _np_log_softmax(t2 / 2))
  expected = 4.0 * _np_kl(np.log(mix), _np_log_softmax(s / 2))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_two_teachers_summed_losses(logits):
  s, t1, y = logits
  t2 = -t1
  objective = objectives.distillation(
      _distill(alpha=1.0, combine="sum", teacher_weight=1.0,
               extra_teachers=(dict(checkpoint_dir="x", model={}, weight=3.0),)),
      num_teachers=2, total_steps=1)
  loss, _ = objective(ModelOutputs(s), [ModelOutputs(t1), ModelOutputs(t2)], y,
                      jnp.int32(0))
  expected = (0.25 * losses.forward_kl(s, t1, temperature=2.0)
              + 0.75 * losses.forward_kl(s, t2, temperature=2.0))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_teacher_argmax_as_hard_label(logits):
  s, t, y = logits
  objective = objectives.distillation(_distill(alpha=0.0, hard_labels="teacher"),
                                      num_teachers=1, total_steps=1)
  loss, _ = objective(ModelOutputs(s), [ModelOutputs(t)], y, jnp.int32(0))
  expected = -_np_log_softmax(s)[np.arange(6), np.argmax(t, -1)]
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert not np.allclose(expected, -_np_log_softmax(s)[np.arange(6), y])


@pytest.mark.parametrize("distill,message", [
    (dict(terms=(dict(name="kld", weight=1.0),)), r"terms\[0\]\.name='kld'.*'jsd'"),
    (dict(terms=(dict(name="kl", weight=-1.0),)), r"terms\[0\]\.weight=-1\.0"),
    (dict(terms=(dict(name="kl", weight=1.0, schedule="step"),)),
     r"terms\[0\]\.schedule='step'"),
    (dict(temperature_schedule="exp"), r"temperature_schedule='exp'"),
    (dict(combine="max"), r"combine='max'"),
    (dict(features=(dict(student="hidden_0", teacher="x", loss="l1"),)),
     r"features\[0\]\.loss='l1'"),
    (dict(features=(dict(student="hidden_0"),)), r"features\[0\]\.teacher is missing"),
])
def test_bad_objective_fields_are_named(distill, message):
  with pytest.raises(ValueError, match=message):
    objectives.validate_distill(_distill(**distill))


# --- Features -----------------------------------------------------------------


def test_feature_mse_with_learned_projection_matches_numpy():
  rng = np.random.default_rng(1)
  student = {"hidden_0": (rng.normal(size=(4, 3)).astype(np.float32),)}
  teacher = {"penultimate": (rng.normal(size=(4, 5)).astype(np.float32),)}
  term = features.FeatureTerm("hidden_0", "penultimate", "mse",
                              optax.constant_schedule(1.0))
  proj = features.init_projections([term], student, [teacher],
                                   jax.random.key(0))[features.projection_name(0)]
  value = term(student, teacher, proj)
  mapped = student["hidden_0"][0] @ np.asarray(proj["kernel"]) + np.asarray(
      proj["bias"])
  np.testing.assert_allclose(
      value, np.mean((mapped - teacher["penultimate"][0])**2, -1), rtol=1e-5)


def test_feature_cosine_is_zero_for_parallel_features():
  x = np.random.default_rng(2).normal(size=(3, 4, 6)).astype(np.float32)
  term = features.FeatureTerm("a", "b", "cosine", optax.constant_schedule(1.0))
  value = term({"a": (x,)}, {"b": (2.5 * x,)}, None, batch_ndim=2)
  assert value.shape == (3, 4)
  np.testing.assert_allclose(value, 0.0, atol=1e-6)


def test_feature_cosine_against_float64():
  """1 - cos per position, averaged per example: 2 for opposite features,
  1 for orthogonal ones, float64 numpy for random ones."""
  term = features.FeatureTerm("a", "b", "cosine", optax.constant_schedule(1.0))
  x = np.random.default_rng(4).normal(size=(3, 5, 6)).astype(np.float32)
  np.testing.assert_allclose(term({"a": (x,)}, {"b": (-x,)}, None), 2.0,
                             rtol=1e-6)
  e0, e1 = np.eye(6, dtype=np.float32)[:2]
  np.testing.assert_allclose(
      term({"a": (np.tile(e0, (3, 5, 1)),)}, {"b": (np.tile(e1, (3, 5, 1)),)},
           None), 1.0, rtol=1e-6)
  y = np.random.default_rng(5).normal(size=(3, 5, 6)).astype(np.float32)
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  cos = (x64 * y64).sum(-1) / (np.linalg.norm(x64, axis=-1)
                               * np.linalg.norm(y64, axis=-1))
  np.testing.assert_allclose(term({"a": (x,)}, {"b": (y,)}, None),
                             (1 - cos).mean(-1), rtol=1e-5)


def _attention_maps(rng, heads):
  logits = rng.normal(size=(2, heads, 4, 4)) * 2
  return np.exp(_np_log_softmax(logits))


@pytest.mark.parametrize("student_heads", [3, 1])
def test_attention_kl_is_teacher_to_student_against_float64(student_heads):
  """KL(teacher row || student row), averaged over heads and queries; with
  different head counts, the heads are averaged first."""
  rng = np.random.default_rng(6)
  teacher, student = _attention_maps(rng, 3), _attention_maps(rng,
                                                              student_heads)
  t, s = teacher, student
  if student_heads != 3:
    t, s = t.mean(1, keepdims=True), s.mean(1, keepdims=True)
  kl = (t * (np.log(t) - np.log(s))).sum(-1)  # [B, H, Q]
  value = features.attention_kl(jnp.asarray(student, jnp.float32),
                                jnp.asarray(teacher, jnp.float32))
  np.testing.assert_allclose(value, kl.mean((1, 2)), rtol=1e-4)
  reverse = (s * (np.log(s) - np.log(t))).sum(-1).mean((1, 2))
  assert np.abs(reverse - kl.mean((1, 2))).max() > 1e-2  # Direction shows.


def test_attention_map_distillation_between_transformers():
  kw = dict(num_classes=3, vocab_size=30, max_length=8, width=16, mlp_dim=16,
            sow_attention=True)
  teacher = models.get_model("transformer", num_layers=2, num_heads=4, **kw)
  student = models.get_model("transformer", num_layers=1, num_heads=2, **kw)
  tokens = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 0, 0, 0, 0]])
  tp = unbox(teacher.init(jax.random.key(0), tokens)["params"])
  sp = unbox(student.init(jax.random.key(1), tokens)["params"])
  t_out = step.make_apply_fn(teacher)(tp, tokens, False, None, True)
  s_out = step.make_apply_fn(student)(sp, tokens, False, None, True)
  term = features.FeatureTerm("block_0/attention/attention_weights",
                              "block_1/attention/attention_weights",
                              "attention_kl", optax.constant_schedule(1.0))
  value = term(s_out.intermediates, t_out.intermediates, None)
  assert value.shape == (2,) and np.all(np.isfinite(value)) and np.all(value > 0)
  self_kl = features.FeatureTerm(
      "block_1/attention/attention_weights", "block_1/attention/attention_weights",
      "attention_kl", optax.constant_schedule(1.0))
  np.testing.assert_allclose(
      self_kl(t_out.intermediates, t_out.intermediates, None), 0.0, atol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(term(
      step.make_apply_fn(student)(p, tokens, False, None, True).intermediates,
      t_out.intermediates, None)))(sp)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_unknown_feature_path_lists_the_available_ones():
  with pytest.raises(KeyError, match=r"No sown intermediate 'hidden_9'.*hidden_0"):
    features.lookup({"hidden_0": (np.zeros(2),)}, "hidden_9")


# --- Token-level global normalisation -----------------------------------------


class TokenTagger(nn.Module):
  """Per-token classifier: the smallest model with [batch, length, vocab] logits."""
  vocab: int = 11

  @nn.compact
  def __call__(self, tokens, *, train=False):
    x = nn.Embed(self.vocab, 8)(tokens)
    x = nn.tanh(nn.Dense(8)(x))
    self.sow("intermediates", "hidden", x)
    return nn.Dense(self.vocab)(x)


def _token_batches():
  rng = np.random.default_rng(3)
  batches = []
  for _ in range(3):
    lengths = rng.integers(1, 10, size=16)  # Uneven padding per sequence.
    mask = (np.arange(9)[None, :] < lengths[:, None]).astype(np.float32)
    batches.append({"inputs": rng.integers(0, 11, (16, 9)).astype(np.int32),
                    "labels": rng.integers(0, 11, (16, 9)).astype(np.int32),
                    "mask": mask})
  return batches


def _token_run(devices, backend="shard_map", grad_accum_steps=1,
               batches=None):
  teacher, student = TokenTagger(), TokenTagger()
  x = jnp.zeros((1, 9), jnp.int32)
  tp = jax.tree.map(lambda p: 2 * p, unbox(teacher.init(jax.random.key(5), x)["params"]))
  sp = unbox(student.init(jax.random.key(6), x)["params"])
  sp_host = jax.tree.map(np.asarray, sp)  # The state's copy is donated.
  objective = objectives.distillation(
      _distill(terms=(dict(name="jsd", weight=0.5, beta=0.5),
                      dict(name="ce", weight=0.5)),
               features=(dict(student="hidden", teacher="hidden", loss="mse",
                              weight=0.1),)),
      num_teachers=1, total_steps=3)
  tx = optax.sgd(0.5)
  mesh = parallel.make_mesh(devices)
  per_device = functools.partial(
      step.train_step, student_apply=step.make_apply_fn(student),
      teacher_applies=(step.make_apply_fn(teacher),), objective=objective,
      tx=tx, axis=parallel.DataAxis(backend), grad_accum_steps=grad_accum_steps)
  run = parallel.map_over_devices(per_device, mesh, backend)
  state = parallel.replicate(
      step.create_train_state(sp, tx, jax.random.key(0)), mesh)
  frozen = parallel.replicate((tp,), mesh)
  all_metrics = []
  for batch in _token_batches() if batches is None else batches:
    state, metrics = run(state, batch, frozen)
    all_metrics.append(jax.device_get(metrics))
  return state, all_metrics, (student, sp_host, teacher, tp, objective)


@pytest.fixture(scope="module")
def token_reference():
  return _token_run(jax.devices()[:1])


@pytest.mark.parametrize("devices,backend,accum", [
    (8, "shard_map", 1), (8, "pmap", 1), (2, "shard_map", 4), (4, "pmap", 2)])
def test_token_level_loss_is_normalised_over_the_global_batch(
    token_reference, devices, backend, accum):
  state, metrics, _ = _token_run(jax.devices()[:devices], backend, accum)
  ref_state, ref_metrics, _ = token_reference
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5,
                                                       atol=1e-6),
               state.params, ref_state.params)
  for m, r in zip(metrics, ref_metrics):
    assert m["count"] == r["count"]
    np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5)


def test_token_level_first_step_equals_masked_mean_by_hand(token_reference):
  _, metrics, (student, sp, teacher, tp, objective) = token_reference
  batch = _token_batches()[0]
  t = teacher.apply({"params": tp}, batch["inputs"], mutable=["intermediates"])
  s = student.apply({"params": sp}, batch["inputs"], mutable=["intermediates"])
  per_token, _ = objective(
      ModelOutputs(s[0], s[1]["intermediates"]),
      [ModelOutputs(t[0], t[1]["intermediates"])], batch["labels"],
      jnp.int32(0))
  assert per_token.shape == (16, 9)
  mask = batch["mask"]
  assert metrics[0]["count"] == mask.sum()
  np.testing.assert_allclose(metrics[0]["loss"] / metrics[0]["count"],
                             np.sum(per_token * mask) / mask.sum(), rtol=1e-5)


def test_token_level_gradient_is_the_masked_mean_by_hand():
  """SGD(0.5), one step: the parameters move by -0.5 x the gradient of the
  masked mean over real tokens; padded tokens contribute nothing."""
  batch = _token_batches()[0]
  state, _, (student, sp, teacher, tp, objective) = _token_run(
      jax.devices()[:1], batches=[batch])
  mask = batch["mask"]
  assert 0 < mask.mean() < 1  # Some padding to leave out.
  t = teacher.apply({"params": tp}, batch["inputs"], mutable=["intermediates"])

  def masked_mean(params):
    s = student.apply({"params": params}, batch["inputs"],
                      mutable=["intermediates"])
    per_token, _ = objective(
        ModelOutputs(s[0], s[1]["intermediates"]),
        [ModelOutputs(t[0], t[1]["intermediates"])], batch["labels"],
        jnp.int32(0))
    return jnp.sum(per_token * mask) / mask.sum()

  expected = jax.grad(masked_mean)(sp)
  jax.tree.map(lambda before, after, g: np.testing.assert_allclose(
      (before - np.asarray(after)) / 0.5, g, rtol=1e-4, atol=1e-6),
               sp, state.params, expected)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(expected)) > 1e-3
