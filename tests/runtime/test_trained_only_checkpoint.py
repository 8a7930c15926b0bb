"""checkpoint.trainable_only: the params item holds the trained leaves
alone, a resume lays them over the run's own frozen base, and a base that
changed since (another fingerprint) is refused. (End to end, with LoRA on a
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


def _state(kernel, bias):
  params = {"dense": {"kernel": kernel, "bias": bias}}
  tx = masks.freeze(optax.adam(1e-3), (MASK, {}))
  return step_lib.create_train_state(params, tx, jax.random.key(0))


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
  _save(workdir, _state(kernel, jnp.full(4, 7.0)))
  assert checkpoint.stored_param_paths(workdir) == [("dense", "bias")]
  assert checkpoint.read_meta(workdir)["params"] == checkpoint.TRAINED_PARAMS
  # The base is the state's own (here: the same kernel, rebuilt).
  restored, step = _restore(workdir, _state(kernel + 0.0, jnp.zeros(4)))
  assert step == 1
  np.testing.assert_array_equal(restored.params["dense"]["bias"],
                                np.full(4, 7.0))
  np.testing.assert_array_equal(restored.params["dense"]["kernel"], kernel)
  # Read outside training, it needs the base.
  with pytest.raises(ValueError, match="trained leaves alone"):
    checkpoint.restore_params(workdir, restored.params)
  got = checkpoint.restore_params(workdir, restored.params,
                                  base={"dense": {"kernel": kernel + 1,
                                                  "bias": jnp.zeros(4)}})
  np.testing.assert_array_equal(got["dense"]["bias"], np.full(4, 7.0))
  np.testing.assert_array_equal(got["dense"]["kernel"], kernel + 1)


def test_a_changed_frozen_base_is_refused(tmp_path):
  workdir = str(tmp_path)
  _save(workdir, _state(jnp.ones((3, 4)), jnp.ones(4)), sha="a")
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match="another frozen base"):
    _restore(workdir, _state(jnp.zeros((3, 4)), jnp.ones(4)), sha="b")
