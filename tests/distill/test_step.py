"""The fused step: every way of mapping it gives the same student as one full-batch step.

The steps use plain SGD, not Adam: Adam's update is invariant to a constant
gradient scale, so parameters after Adam steps cannot show a gradient summed
once too often over the devices (x8) or replaced by sign(g) * 1e-3. With SGD
at learning rate 1 the update IS minus the gradient, which the tests compare
with a direct jax.grad of the full-batch mean loss.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


from kdjax.core import defaults
from kdjax import models
from kdjax.distill import features, losses, objectives, parallel, step
from kdjax.models.partitioning import unbox

NUM_CLASSES = 5
GLOBAL_BATCH = 16
NUM_STEPS = 3
LEARNING_RATE = 0.5  # SGD; parameters move by ~1e-2 per step.


def _hinton(alpha=0.7, temperature=2.0):
  distill = defaults.get_config().distill
  distill.update(alpha=alpha, temperature=temperature)
  return objectives.distillation(distill, num_teachers=1, total_steps=10)


def _models():
  teacher = models.get_model("mlp", num_classes=NUM_CLASSES, hidden=(32,))
  student = models.get_model("mlp", num_classes=NUM_CLASSES, hidden=(8,))
  return teacher, student


def _batches(seed=0):
  rng = np.random.default_rng(seed)
  return [{"inputs": rng.normal(size=(GLOBAL_BATCH, 6)).astype(np.float32),
           "labels": rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)}
          for _ in range(NUM_STEPS)]


def _init():
  teacher, student = _models()
  x = jnp.zeros((1, 6))
  teacher_params = unbox(teacher.init(jax.random.key(1), x)["params"])
  # A teacher that is not at its init, so the KL term has signal.
  teacher_params = jax.tree.map(lambda p: p * 3.0, teacher_params)
  student_params = unbox(student.init(jax.random.key(2), x)["params"])
  return teacher, student, teacher_params, student_params


def _run(devices, backend, grad_accum_steps=1, objective=None, tx=None):
  teacher, student, teacher_params, student_params = _init()
  tx = tx or optax.sgd(LEARNING_RATE)
  objective = objective or _hinton()
  mesh = parallel.make_mesh(devices)
  per_device = functools.partial(
      step.train_step, student_apply=step.make_apply_fn(student),
      teacher_applies=(step.make_apply_fn(teacher),), objective=objective,
      tx=tx, axis=parallel.DataAxis(backend), grad_accum_steps=grad_accum_steps)
  run = parallel.map_over_devices(per_device, mesh, backend)
  state = parallel.replicate(
      step.create_train_state(student_params, tx, jax.random.key(0)), mesh)
  frozen = parallel.replicate((teacher_params,), mesh)
  for batch in _batches():
    state, metrics = run(state, batch, frozen)
  return state, metrics


def _assert_same_params(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope="module")
def one_device_full_batch():
  return _run(jax.devices()[:1], "shard_map")[0]


@pytest.mark.parametrize("backend", parallel.BACKENDS)
def test_eight_devices_match_one_full_batch_step(backend, one_device_full_batch):
  state, metrics = _run(jax.devices()[:8], backend)
  assert int(metrics["count"]) == GLOBAL_BATCH
  _assert_same_params(state.params, one_device_full_batch.params)


@pytest.mark.parametrize("backend", parallel.BACKENDS)
def test_gradient_accumulation_matches_full_batch(backend, one_device_full_batch):
  state, _ = _run(jax.devices()[:4], backend, grad_accum_steps=2)
  _assert_same_params(state.params, one_device_full_batch.params)


def test_params_actually_move(one_device_full_batch):
  """Guards the equality tests above against a step that does nothing."""
  _, _, _, student_params = _init()
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                       one_device_full_batch.params, student_params)
  assert min(jax.tree.leaves(diffs)) > 1e-4


def test_optimizer_state_holds_the_student_only():
  """Adam keeps two moments per STUDENT parameter; nothing of the teacher."""
  teacher, student, teacher_params, student_params = _init()
  state, _ = _run(jax.devices()[:2], "shard_map", tx=optax.adam(1e-2))
  n_student = sum(x.size for x in jax.tree.leaves(student_params))
  n_teacher = sum(x.size for x in jax.tree.leaves(teacher_params))
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert n_opt == 2 * n_student and n_teacher != n_student


@pytest.mark.parametrize("num_devices,backend,grad_accum_steps", [
    (8, "shard_map", 1), (8, "pmap", 1), (4, "shard_map", 2), (1, "shard_map", 1)])
def test_gradient_equals_hand_written_full_batch_gradient(
    num_devices, backend, grad_accum_steps):
  """The step's gradient against a direct jax.grad of the full-batch mean loss.

  SGD at learning rate 1: the parameter change is exactly minus the gradient
  the step handed to the optimizer, so a wrong scale (a sum over devices
  done twice, a mean instead of a sum) or direction fails here.
  """
  teacher, student, teacher_params, student_params = _init()
  batch = _batches()[0]

  def mean_loss(params):
    t = teacher.apply({"params": teacher_params}, batch["inputs"])
    s = student.apply({"params": params}, batch["inputs"])
    kl = losses.forward_kl(s, t, temperature=2.0)
    ce = losses.softmax_cross_entropy(s, batch["labels"])
    return jnp.mean(0.7 * kl + 0.3 * ce)
  expected_grads = jax.tree.map(np.asarray, jax.grad(mean_loss)(student_params))
  expected_loss = float(mean_loss(student_params))
  before = jax.tree.map(np.array, student_params)

  tx = optax.sgd(1.0)
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  per_device = functools.partial(
      step.train_step, student_apply=step.make_apply_fn(student),
      teacher_applies=(step.make_apply_fn(teacher),), objective=_hinton(),
      tx=tx, axis=parallel.DataAxis(backend),
      grad_accum_steps=grad_accum_steps)
  run = parallel.map_over_devices(per_device, mesh, backend)
  state = parallel.replicate(
      step.create_train_state(student_params, tx, jax.random.key(0)), mesh)
  state, metrics = run(state, batch,
                       parallel.replicate((teacher_params,), mesh))
  grads = jax.tree.map(lambda b, a: b - np.asarray(a), before, state.params)
  _assert_same_params(grads, expected_grads, rtol=1e-4, atol=1e-7)
  # The gradients are not vanishingly small next to that tolerance.
  assert min(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(
      optax.tree.norm(expected_grads)), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]) / GLOBAL_BATCH,
                             expected_loss, rtol=1e-5)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_feature_projection_trains_with_the_student(num_devices):
  """A feature term across widths (student hidden 8 -> teacher hidden 32):
  the learned projection (TrainState.aux_params) moves by minus the gradient
  of the full-batch loss written by hand, like the student's parameters."""
  teacher, student, teacher_params, student_params = _init()
  batch = _batches()[0]
  distill = defaults.get_config().distill
  distill.update(alpha=0.7, temperature=2.0, features=(dict(
      student="hidden_0", teacher="hidden_0", loss="mse", weight=0.5),))
  objective = objectives.distillation(distill, num_teachers=1, total_steps=10)

  def sown(model, params):
    logits, state = model.apply({"params": params}, batch["inputs"],
                                mutable=["intermediates"])
    return logits, state["intermediates"]["hidden_0"][0]

  t_logits, t_hidden = sown(teacher, teacher_params)
  _, s_hidden = sown(student, student_params)
  name = features.projection_name(0)
  projection = features.init_projections(
      objective.feature_terms, {"hidden_0": (s_hidden,)},
      [{"hidden_0": (t_hidden,)}], jax.random.key(3))
  assert projection[name]["kernel"].shape == (8, 32)

  def mean_loss(params, proj):
    s_logits, hidden = sown(student, params)
    mapped = hidden @ proj[name]["kernel"] + proj[name]["bias"]
    return jnp.mean(0.7 * losses.forward_kl(s_logits, t_logits,
                                            temperature=2.0)
                    + 0.3 * losses.softmax_cross_entropy(s_logits,
                                                         batch["labels"])
                    + 0.5 * jnp.mean(jnp.square(mapped - t_hidden), -1))
  expected = jax.tree.map(np.asarray, jax.grad(mean_loss, argnums=(0, 1))(
      student_params, projection))
  before = jax.tree.map(np.array, (student_params, projection))

  tx = optax.sgd(1.0)
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  per_device = functools.partial(
      step.train_step, student_apply=step.make_apply_fn(student),
      teacher_applies=(step.make_apply_fn(teacher),), objective=objective,
      tx=tx, axis=parallel.DataAxis("shard_map"))
  run = parallel.map_over_devices(per_device, mesh, "shard_map")
  state = parallel.replicate(step.create_train_state(
      student_params, tx, jax.random.key(0), aux_params=projection), mesh)
  state, _ = run(state, batch, parallel.replicate((teacher_params,), mesh))
  moved = jax.tree.map(lambda b, a: b - np.asarray(a), before,
                       (state.params, state.aux_params))
  _assert_same_params(moved, expected, rtol=1e-4, atol=1e-6)
  assert float(np.abs(moved[1][name]["kernel"]).max()) > 1e-3


def _per_device_step(tx):
  teacher, student, _, _ = _init()
  return functools.partial(
      step.train_step, student_apply=step.make_apply_fn(student),
      teacher_applies=(step.make_apply_fn(teacher),), objective=_hinton(),
      tx=tx, axis=parallel.DataAxis("shard_map"))


def test_one_device_program_has_no_collectives():
  """On one device map_over_devices compiles a plain jit: shard_map's no-op
  all-reduce of every gradient cost ~5% of a CPU step (benchmarks/README)."""
  _, _, teacher_params, student_params = _init()
  tx = optax.adam(1e-2)
  batch = _batches()[0]
  hlo = {}
  for n in (1, 2):
    mesh = parallel.make_mesh(jax.devices()[:n])
    program = parallel.jit_over_mesh(_per_device_step(tx), mesh)
    state = parallel.replicate(
        step.create_train_state(student_params, tx, jax.random.key(0)), mesh)
    hlo[n] = program.lower(state, parallel.shard_batch(batch, mesh),
                           parallel.replicate((teacher_params,), mesh)
                           ).compile().as_text()
  assert "all-reduce" not in hlo[1]
  assert "all-reduce" in hlo[2]  # The check can see a collective at all.


def test_data_axis_is_identity_outside_a_mapped_axis():
  axis = parallel.DataAxis("shard_map")
  values = {"a": jnp.arange(3.0)}

  @jax.jit
  def outside(x):
    assert not axis.is_mapped()
    return axis.sum(x), axis.sum_gradients(x), axis.index()
  summed, grads, index = outside(values)
  np.testing.assert_array_equal(summed["a"], values["a"])
  np.testing.assert_array_equal(grads["a"], values["a"])
  assert int(index) == 0
