"""What an error while reading a checkpoint means: one test per listed class.

Damaged files are made for real (truncated, zero bytes, deleted) and the
error Orbax raises for them is classified; storage errors that may pass are
injected, since they cannot be produced on a local disk.
"""

import errno
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest

from kdjax.distill import step as step_lib
from kdjax.runtime import checkpoint


def _state(optimizer=optax.adamw(1e-3)):
  params = {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4),
                      "bias": jnp.ones(4)}}
  return step_lib.create_train_state(params, optimizer, jax.random.key(0))


def _iterator():
  return iter(grain.MapDataset.range(8).to_iter_dataset())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir with one complete checkpoint at step 3."""
  workdir = str(tmp_path_factory.mktemp("saved"))
  with checkpoint.Checkpointer(workdir, save_every_steps=1, keep=2,
                               async_save=False) as ckpt:
    ckpt.save(3, _state(), _iterator(), {"optimizer": "adamw"})
  return workdir


def _copy(saved, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(saved, workdir)
  return workdir, os.path.join(workdir, "checkpoints", "3")


def _restore_error(workdir):
  state = _state()
  with ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir),
                             item_names=checkpoint.ITEM_NAMES) as manager:
    try:
      manager.restore(3, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(state.params),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      return e
  raise AssertionError("restore succeeded on a damaged checkpoint")


def _data_file(step_dir):
  d = os.path.join(step_dir, "params", "d")
  return os.path.join(d, sorted(os.listdir(d))[0])


@pytest.mark.parametrize("damage, expected_text", [
    (lambda s: os.truncate(_data_file(s), os.path.getsize(_data_file(s)) // 2),
     "OUT_OF_RANGE"),
    (lambda s: open(_data_file(s), "wb").close(), "OUT_OF_RANGE"),
    (lambda s: open(os.path.join(s, "params", "manifest.ocdbt"), "wb").close(),
     "DATA_LOSS"),
    (lambda s: os.remove(os.path.join(s, "params", "manifest.ocdbt")),
     "NOT_FOUND"),
    (lambda s: open(os.path.join(s, "params", "_METADATA"), "wb").close(),
     "Expecting value"),  # json.JSONDecodeError
    (lambda s: open(os.path.join(s, "meta", "metadata"), "wb").close(),
     "Expecting value"),
    (lambda s: shutil.rmtree(os.path.join(s, "params")),
     "was not found in the checkpoint"),
], ids=["truncated_data", "zero_byte_data", "zero_byte_manifest",
        "missing_manifest", "zero_byte_array_metadata", "zero_byte_meta_json",
        "missing_item"])
def test_damaged_files_are_corrupt(saved, tmp_path, damage, expected_text):
  workdir, step_dir = _copy(saved, tmp_path)
  damage(step_dir)
  error = _restore_error(workdir)
  assert expected_text in "".join(str(e) for e in checkpoint._chain(error))  # pylint: disable=protected-access
  assert checkpoint.classify_read_error(error) == checkpoint.CORRUPT


class _HttpError(Exception):
  def __init__(self, code):
    super().__init__(f"HTTP {code}")
    self.code = code


@pytest.mark.parametrize("error", [
    ConnectionResetError(errno.ECONNRESET, "reset"),
    TimeoutError("timed out"),
    OSError(errno.EIO, "Input/output error"),  # An NFS hiccup.
    OSError(errno.ESTALE, "Stale file handle"),
    ValueError("UNAVAILABLE: error reading gs://b/x: HTTP 503"),
    ValueError("DEADLINE_EXCEEDED: read timed out"),
    _HttpError(503),
    _HttpError(429),
    RuntimeError("wrapped"),  # ... whose cause is transient:
], ids=lambda e: type(e).__name__ + ":" + str(e)[:20])
def test_storage_errors_that_may_pass_are_transient(error):
  if str(error) == "wrapped":
    try:
      raise error from ValueError("UNAVAILABLE: 503")
    except RuntimeError as e:
      error = e
  assert checkpoint.classify_read_error(error) == checkpoint.TRANSIENT


@pytest.mark.parametrize("error", [
    checkpoint.CheckpointMismatchError("another run"),
    ValueError("Tree structures do not match"),
    KeyError("opt_state"),
    OSError(errno.EACCES, "Permission denied"),
    OSError(errno.ENOSPC, "No space left on device"),
    MemoryError(),
    _HttpError(403),
], ids=lambda e: type(e).__name__ + ":" + str(e)[:20])
def test_everything_else_is_neither(error):
  assert checkpoint.classify_read_error(error) == checkpoint.OTHER


def test_with_retries_retries_transient_errors_then_gives_up(monkeypatch):
  monkeypatch.setattr(checkpoint, "RETRY_SECONDS", 0.0)
  calls = []

  def flaky():
    calls.append(1)
    if len(calls) < 3:
      raise TimeoutError("injected")
    return "read"

  assert checkpoint.with_retries("reading", flaky) == "read" and len(calls) == 3

  def down():
    calls.append(1)
    raise TimeoutError("injected")

  calls.clear()
  with pytest.raises(checkpoint.UnreadableCheckpointError, match="transient"):
    checkpoint.with_retries("reading", down)
  assert len(calls) == checkpoint.RETRIES + 1

  def broken():
    calls.append(1)
    raise KeyError("a bug, not storage")

  calls.clear()
  with pytest.raises(KeyError):
    checkpoint.with_retries("reading", broken)
  assert len(calls) == 1


def test_restore_params_never_falls_back_to_an_older_step(tmp_path):
  workdir = str(tmp_path)
  with checkpoint.Checkpointer(workdir, save_every_steps=1, keep=3,
                               async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _state(), _iterator(), {"optimizer": "adamw"})
  params = _state().params
  assert checkpoint.restore_params(workdir, params) is not None
  step_dir = os.path.join(workdir, "checkpoints", "2")
  open(_data_file(step_dir), "wb").close()
  with pytest.raises(checkpoint.UnreadableCheckpointError,
                     match=r"parameters of step 2 .* damaged.*does not fall back"):
    checkpoint.restore_params(workdir, params)


def test_check_structure_names_the_optimizer_and_the_arrays(tmp_path):
  adamw, sgd = _state(), _state(optax.sgd(0.1, momentum=0.9))
  tree = lambda s: {"params": s.params, "opt_state": s.opt_state}
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"opt_state: checkpoint has adamw \(count, mu, nu\),"
                           r" this run builds sgd \(trace\)"):
    checkpoint.check_structure(tree(adamw), tree(sgd), found_optimizer="adamw",
                               expected_optimizer="sgd", directory="d")
  wider = dict(tree(adamw), params={"dense": {"kernel": jnp.zeros((3, 8)),
                                              "bias": jnp.ones(4)}})
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"params: dense/kernel: checkpoint has \(3, 4\) "
                           r"float32, this run builds \(3, 8\) float32"):
    checkpoint.check_structure(tree(adamw), {"params": wider["params"],
                                             "opt_state": adamw.opt_state},
                               found_optimizer="adamw",
                               expected_optimizer="adamw", directory="d")
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), adamw.params)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="bfloat16"):
    checkpoint.check_structure(tree(adamw), {"params": half,
                                             "opt_state": adamw.opt_state},
                               found_optimizer="adamw",
                               expected_optimizer="adamw", directory="d")
  checkpoint.check_structure(tree(adamw), tree(_state()),  # Equal: no error.
                             found_optimizer="adamw",
                             expected_optimizer="adamw", directory="d")
