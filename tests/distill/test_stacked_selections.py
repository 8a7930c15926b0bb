"""Layer-indexed selections on the scan_layers layout: `train.trainable`
patterns and feature names.

'layers_1/mlp' names one layer; scanned, that layer is row 1 of stacked
weights. Training the same selection on the unrolled and on the stacked
layout must give the same student, with the unselected rows bit-identical
to their init (AdamW: weight decay would move them if the update were not
masked per row).
"""

import functools

import jax
import numpy as np
import optax
import pytest

from kdjax.core import defaults
from kdjax.distill import features, masks, objectives, parallel, step
from kdjax.distill import mesh as mesh_lib
from kdjax.models import stacking
from kdjax.models.llama import Llama
from kdjax.weights import params as params_lib

VOCAB, LENGTH, BATCH, STEPS, LAYERS = 48, 8, 8, 3, 3
FIELDS = dict(vocab_size=VOCAB, width=16, num_layers=LAYERS, num_heads=4,
              num_kv_heads=2, head_dim=4, mlp_dim=32, max_length=LENGTH)
TEACHER = Llama(**dict(FIELDS, width=32, num_layers=2, head_dim=8))
TRAINABLE = ("layers_1/mlp", "layers_2/attention/query", "final_norm")


def _student(scan):
  return Llama(**FIELDS, scan_layers=scan)


def _params():
  data = defaults.lm_data(seq_length=LENGTH)
  teacher = jax.tree.map(lambda p: 4.0 * p, params_lib.init(TEACHER, data, 1))
  student = params_lib.init(_student(False), data, 2)
  return teacher, student


def _batches():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (STEPS, BATCH, LENGTH + 1)).astype(np.int32)
  return [{"inputs": t[:, :-1], "labels": t[:, 1:]} for t in tokens]


def _train(scan, tx, mesh_shape=None):
  teacher, student = _params()
  if scan:
    student = stacking.stack(student, "layers")
  mask = masks.trainable_mask(student, TRAINABLE)
  tx = masks.freeze(tx, (mask, {}))
  distill = defaults.get_config().distill
  distill.update(alpha=0.5, temperature=2.0)
  fn = functools.partial(
      step.train_step, student_apply=step.make_lm_apply_fn(_student(scan)),
      teacher_applies=(step.make_lm_apply_fn(TEACHER),),
      objective=objectives.distillation(distill, num_teachers=1,
                                        total_steps=10),
      tx=tx, axis=parallel.DataAxis("shard_map"), token_chunk_size=4,
      trainable_mask=mask)
  state = step.create_train_state(student, tx, jax.random.key(0))
  frozen = (teacher,)
  if mesh_shape is None:
    run = jax.jit(fn)
  else:
    data = defaults.lm_data(seq_length=LENGTH)
    mesh = mesh_lib.make(dict(zip(mesh_lib.AXES, mesh_shape)))
    rules = defaults.PARTITION_RULES
    student_sh = mesh_lib.param_shardings(
        params_lib.logical_specs(_student(scan), data), mesh, rules)
    teacher_sh = mesh_lib.param_shardings(
        params_lib.logical_specs(TEACHER, data), mesh, rules)
    state_sh = mesh_lib.state_shardings(state, student_sh, student, mesh)
    run = parallel.jit_sharded(fn, mesh, rules, state_shardings=state_sh,
                               frozen_shardings=(teacher_sh,))
    state = parallel.place(state, state_sh)
    frozen = (parallel.place(teacher, teacher_sh),)
  for batch in _batches():
    state, _ = run(state, batch, frozen)
  return student, mask, jax.device_get(state)


ADAMW = functools.partial(optax.adamw, 1e-2, weight_decay=0.5)


@pytest.fixture(scope="module")
def unrolled():
  return _train(False, ADAMW())


@pytest.fixture(scope="module")
def scanned():
  return _train(True, ADAMW())


def test_the_mask_selects_rows_of_the_stacks():
  _, student = _params()
  stacked = stacking.stack(student, "layers")
  mask = masks.trainable_mask(stacked, TRAINABLE)
  picked = stacking.Layers((False, True, False))
  assert mask["layers"]["mlp"]["up"]["kernel"] == picked
  assert mask["layers"]["attention"]["query"]["kernel"] == (
      stacking.Layers((False, False, True)))
  assert mask["layers"]["attention"]["key"]["kernel"] is False
  assert mask["final_norm"]["scale"] is True
  whole = masks.trainable_mask(stacked, [f"layers_{i}/mlp"
                                         for i in range(LAYERS)])
  assert whole["layers"]["mlp"]["up"]["kernel"] is True
  flat_mask = masks.trainable_mask(student, TRAINABLE)
  assert params_lib.count(stacked, mask) == params_lib.count(student,
                                                             flat_mask)
  with pytest.raises(ValueError, match="stacks 3 layers"):
    masks.trainable_mask(stacked, ("layers_3/mlp",))
  with pytest.raises(ValueError, match="mpl"):
    masks.trainable_mask(stacked, ("layers_1/mpl",))


def test_scanned_training_equals_unrolled_and_freezes_other_rows(
    unrolled, scanned):
  init, _, trained_unrolled = unrolled
  stacked_init, _, trained_scanned = scanned
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      stacking.stack(trained_unrolled.params, "layers"),
      trained_scanned.params)
  layers, before = trained_scanned.params["layers"], stacked_init["layers"]
  for frozen_row in (0, 2):
    np.testing.assert_array_equal(layers["mlp"]["up"]["kernel"][frozen_row],
                                  before["mlp"]["up"]["kernel"][frozen_row])
  assert np.max(np.abs(layers["mlp"]["up"]["kernel"][1]
                       - before["mlp"]["up"]["kernel"][1])) > 1e-3
  np.testing.assert_array_equal(layers["attention"]["key"]["kernel"],
                                before["attention"]["key"]["kernel"])
  del init


def test_frozen_rows_get_no_gradient(scanned):
  """Adam's first moment is zero on the unselected rows: no gradient reached
  them (stop_gradient per row), not just an update thrown away."""
  _, _, state = scanned
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state)
             if np.ndim(leaf) == 3 and leaf.shape[0] == LAYERS]
  mu_up = [m for m in moments if m.shape == (LAYERS, 16, 32)]
  assert mu_up, "no stacked Adam moments found"
  for m in mu_up:
    assert not np.any(m[0]) and not np.any(m[2]) and np.any(m[1])


def test_scanned_selection_on_a_sharded_mesh(scanned):
  _, _, on_mesh = _train(True, ADAMW(), mesh_shape=(2, 2, 2))
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
      on_mesh.params, scanned[2].params)


def test_feature_names_find_the_layer_in_the_stack():
  _, student = _params()
  tokens = _batches()[0]["inputs"]
  sown = {}
  for scan, p in ((False, student), (True, stacking.stack(student, "layers"))):
    _, state = _student(scan).apply({"params": p}, tokens,
                                    mutable=["intermediates"])
    sown[scan] = state["intermediates"]
  for i in range(LAYERS):
    np.testing.assert_allclose(
        features.lookup(sown[True], f"layers_{i}/output"),
        features.lookup(sown[False], f"layers_{i}/output"),
        rtol=1e-5, atol=1e-6)
  with pytest.raises(KeyError, match="layers_3/output"):
    features.lookup(sown[True], "layers_3/output")
