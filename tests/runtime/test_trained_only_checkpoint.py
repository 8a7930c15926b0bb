"""checkpoint.trainable_only: the params item holds the trained leaves
alone, a resume lays them over the run's own frozen base, and a base that
changed since (another fingerprint) is refused; the optimizer state, step
and key of a stepped state come back with them. (End to end, with LoRA on a
sharded mesh: tests/e2e/test_lora_train.py.)"""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.distill import masks
from kdjax.distill import step as step_lib
from kdjax.runtime import checkpoint

MASK = {"dense": {"kernel": False, "bias": True}}


def _tx():
  return masks.freeze(optax.adam(1e-3), (MASK, {}))


def _state(kernel, bias):
  params = {"dense": {"kernel": kernel, "bias": bias}}
  return step_lib.create_train_state(params, _tx(), jax.random.key(0))


@jax.jit
def _step(state):
  """One optimizer step (non-zero gradients on both leaves; the frozen kernel
  stays put), the key moving on, as a trained state would be saved."""
  def loss(trainable):
    dense = trainable[0]["dense"]
    return jnp.sum((jnp.ones(3) @ dense["kernel"] + dense["bias"] - 1.0) ** 2)
  trainable = (state.params, state.aux_params)
  updates, opt_state = _tx().update(jax.grad(loss)(trainable),
                                    state.opt_state, trainable)
  params, _ = masks.apply_updates(trainable, updates, (MASK, {}))
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state,
                       rng=jax.random.fold_in(state.rng, state.step))


def _host(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]


def _iterator():
  return iter(grain.MapDataset.range(8).to_iter_dataset())


def _save(workdir, state, sha="a"):
  with checkpoint.Checkpointer(workdir, save_every_steps=1, keep=2,
                               async_save=False, trained_mask=MASK) as ckpt:
    ckpt.save(1, state, _iterator(),
              {"optimizer": "adam", checkpoint.FROZEN_SHA256: sha})


def _restore(workdir, state, sha="a"):
  with checkpoint.Checkpointer(workdir, save_every_steps=1,
                               keep=2) as ckpt:
    return ckpt.restore_latest(
        state, _iterator(),
        run_meta={"optimizer": "adam", checkpoint.FROZEN_SHA256: sha})


def test_the_trained_leaves_alone_come_back_over_the_runs_base(tmp_path):
  workdir = str(tmp_path)
  kernel = jnp.arange(12.0).reshape(3, 4)
  # A stepped state: the fresh template (step 0, Adam's zeros, key 0) is not
  # what comes back unless the train item is restored.
  saved = _step(_step(_state(kernel, jnp.full(4, 7.0))))
  bias = np.array(saved.params["dense"]["bias"])  # Before saving.
  opt_state = _host(saved.opt_state)
  key_data = np.array(jax.random.key_data(saved.rng))
  assert not np.array_equal(bias, np.full(4, 7.0))
  assert len(opt_state) == 3  # Adam's count, mu and nu of the bias.
  assert all(np.all(x != 0) for x in opt_state)
  _save(workdir, saved)
  assert checkpoint.stored_param_paths(workdir) == [("dense", "bias")]
  assert checkpoint.read_meta(workdir)["params"] == checkpoint.TRAINED_PARAMS
  # The base is the state's own (here: the same kernel, rebuilt).
  template = _state(kernel + 0.0, jnp.zeros(4))
  restored, step = _restore(workdir, template)
  assert step == 1  # The checkpoint's number; the state's own step:
  assert int(restored.step) == 2
  np.testing.assert_array_equal(restored.params["dense"]["bias"], bias)
  np.testing.assert_array_equal(restored.params["dense"]["kernel"], kernel)
  assert (jax.tree.structure(restored.opt_state)
          == jax.tree.structure(template.opt_state))
  for got, want in zip(_host(restored.opt_state), opt_state, strict=True):
    np.testing.assert_array_equal(got, want, strict=True)
  np.testing.assert_array_equal(jax.random.key_data(restored.rng), key_data)
  # Read outside training, it needs the base.
  with pytest.raises(ValueError, match="trained leaves alone"):
    checkpoint.restore_params(workdir, restored.params)
  got = checkpoint.restore_params(workdir, restored.params,
                                  base={"dense": {"kernel": kernel + 1,
                                                  "bias": jnp.zeros(4)}})
  np.testing.assert_array_equal(got["dense"]["bias"], bias)
  np.testing.assert_array_equal(got["dense"]["kernel"], kernel + 1)


def test_a_changed_frozen_base_is_refused(tmp_path):
  workdir = str(tmp_path)
  _save(workdir, _state(jnp.ones((3, 4)), jnp.ones(4)), sha="a")
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match="another frozen base"):
    _restore(workdir, _state(jnp.zeros((3, 4)), jnp.ones(4)), sha="b")
