"""A resume restores the whole train state a run saved, not the template's.

The state saved here has been stepped (step > 0, Adam's moments and count
non-zero, a key other than the template's, trained feature projections in
aux_params), so a restore that handed back any part of the fresh template
(what a resume restores into) fails. The trained-only variant:
tests/runtime/test_trained_only_checkpoint.py. End to end, with real runs:
tests/e2e/test_resume.py.
"""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.distill import step as step_lib
from kdjax.runtime import checkpoint

OPTIMIZER = "adamw"


def _tx():
  return optax.adamw(1e-2, weight_decay=1e-2)


def _fresh_state():
  """What a run builds before resuming: params, projections, key of seed 0."""
  params = {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4) / 10,
                      "bias": jnp.zeros(4)}}
  aux_params = {"feature_projection_0": {
      "kernel": jnp.arange(8.0).reshape(4, 2) / 10, "bias": jnp.zeros(2)}}
  return step_lib.create_train_state(params, _tx(), jax.random.key(0),
                                     aux_params)


@jax.jit
def _step(state, x):
  """One optimizer step on (params, aux_params), as train_step takes it; the
  key moves on too, so the saved key is not the template's."""
  def loss(trainable):
    params, aux = trainable
    h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    y = h @ aux["feature_projection_0"]["kernel"]
    return jnp.sum((y + aux["feature_projection_0"]["bias"] - 1.0) ** 2)
  trainable = (state.params, state.aux_params)
  grads = jax.grad(loss)(trainable)
  updates, opt_state = _tx().update(grads, state.opt_state, trainable)
  params, aux_params = optax.apply_updates(trainable, updates)
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state, aux_params=aux_params,
                       rng=jax.random.fold_in(state.rng, state.step))


def _stepped(state, steps=3):
  for i in range(steps):
    state = _step(state, jnp.full((2, 3), 0.5 + i))
  return state


def _host_copy(state):
  """Numpy copies of every leaf (the key as its raw data), keyed by path."""
  state = state.replace(rng=jax.random.key_data(state.rng))
  return {jax.tree_util.keystr(path): np.array(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(state)[0]}


def _iterator():
  return iter(grain.MapDataset.range(8).to_iter_dataset())


def test_a_resume_restores_the_stepped_state_bit_for_bit(tmp_path):
  workdir = str(tmp_path)
  template = _fresh_state()
  saved = _stepped(_fresh_state())
  before = _host_copy(saved)  # Before saving: a run's arrays are donated.
  fresh = _host_copy(template)
  # The state differs from the template wherever a restore could go wrong.
  assert int(before[".step"]) == 3
  differs = {p for p in before if not np.array_equal(before[p], fresh[p])}
  assert ".rng" in differs
  assert any(p.startswith(".aux_params") for p in differs)
  for part in (".count", ".mu", ".nu"):  # Adam's state.
    assert any(part in p for p in differs), part
  assert all(np.any(before[p] != 0) for p in before
             if ".mu" in p or ".nu" in p)

  meta = {"optimizer": OPTIMIZER}
  with checkpoint.Checkpointer(workdir, save_every_steps=1, keep=2) as ckpt:
    assert ckpt.save(3, saved, _iterator(), meta)
  assert checkpoint.read_meta(workdir)["params"] == checkpoint.ALL_PARAMS

  with checkpoint.Checkpointer(workdir, save_every_steps=1, keep=2) as ckpt:
    restored, step = ckpt.restore_latest(template, _iterator(),
                                         run_meta=meta)
  assert step == 3
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  after = _host_copy(restored)
  assert after.keys() == before.keys()
  for path in before:
    np.testing.assert_array_equal(after[path], before[path], err_msg=path,
                                  strict=True)
  # The key is still a typed key, and it is the saved one.
  assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  # The optimizer picks up where it was: the next step matches.
  x = jnp.full((2, 3), 9.0)
  np.testing.assert_array_equal(
      _host_copy(_step(restored, x))[".params['dense']['kernel']"],
      _host_copy(_step(_stepped(_fresh_state()), x))
      [".params['dense']['kernel']"])
