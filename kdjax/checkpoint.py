"""The one module that talks to Orbax (its API moves; the version is pinned).

A run's checkpoints live in WORKDIR/checkpoints/<step>/ with four items:
  params   the model's parameters (all a teacher needs, all an export needs)
  train    optimizer state, step, RNG key and auxiliary trainables (e.g.
           feature projections: trained with the student, not exported)
  data     the grain iterator position
  meta     JSON: model name and fields, class count, the role of the run
Teacher parameters are never part of a student's checkpoint.

The workdir may be local or gs://: Orbax takes either, and kdjax's own
bookkeeping here (finding steps, setting a corrupt step aside, sizes) goes
through kdjax.storage (etils.epath).
"""

from __future__ import annotations

import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from kdjax import storage

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointMismatchError(ValueError):
  """A checkpoint was written for a different model or config than asked for."""


def checkpoint_dir(workdir: str) -> str:
  return storage.join(storage.absolute(workdir), CHECKPOINT_SUBDIR)


class Checkpointer:
  """CheckpointManager for one run: save every N steps, keep K, resume, fall back."""

  def __init__(self, workdir: str, *, save_every_steps: int, keep: int,
               async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    self._every = save_every_steps
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=0, max_to_keep=keep,
            enable_async_checkpointing=async_save, create=True),
        item_names=("params", "train", "data", "meta"))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Every N steps (Orbax's own policy would also save the first step)."""
    return step % self._every == 0

  def save(self, step: int, state, data_iterator, meta: dict[str, Any]) -> bool:
    """Saves params, train state, data position and meta (async where safe)."""
    train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
             "aux_params": state.aux_params}
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(train),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta)),
        force=True)  # The policy is should_save's, not Orbax's.

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def read_meta(self) -> dict[str, Any] | None:
    """The meta of the newest readable checkpoint, or None."""
    return _newest_meta(self._manager)

  def _set_aside(self, step: int) -> str:
    """Renames an unreadable step so it neither blocks a re-save nor is retried."""
    source = storage.join(self.directory, str(step))
    # Process 0 renames; the others wait until it has (and agree on the name).
    # On GCS a rename copies every object, then deletes the originals: if
    # that is interrupted the step is still whole and is set aside next time.
    stamp = int(_from_process_0(np.int32(time.time())))
    target = f"{source}.unreadable-{stamp}"
    if jax.process_index() == 0 and storage.is_dir(source):
      storage.rename(source, target)
    _barrier(f"kdjax_set_aside_{step}")
    self._manager.reload()
    return target

  def restore_latest(self, abstract_state, data_iterator):
    """Restores the newest readable checkpoint into (state, iterator).

    A corrupt or truncated newest checkpoint is skipped with a warning and the
    one before it is used. Returns (state, step) or (None, None) if there is
    none to restore.
    """
    for step in sorted(self.all_steps(), reverse=True):
      error = None
      try:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state.params),
                train=ocp.args.StandardRestore({
                    "step": abstract_state.step,
                    "opt_state": abstract_state.opt_state,
                    "rng": abstract_state.rng,
                    "aux_params": abstract_state.aux_params}),
                data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except Exception as e:  # pylint: disable=broad-except
        error = e
      if not _on_every_process(error is None):  # All fall back, or none.
        e = error or RuntimeError("unreadable on another process")
        aside = self._set_aside(step)
        logging.warning("Checkpoint at step %d in %s is unreadable (%s: %s); "
                        "moved to %s, falling back to the one before it.",
                        step, self.directory, type(e).__name__, str(e)[:300],
                        aside)
        continue
      train = restored["train"]
      state = abstract_state.replace(
          step=train["step"], params=restored["params"],
          opt_state=train["opt_state"], rng=train["rng"],
          aux_params=train["aux_params"])
      return state, step
    return None, None


def _on_every_process(ok: bool) -> bool:
  """True if `ok` holds on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _from_process_0(value):
  if jax.process_count() == 1:
    return value
  return multihost_utils.broadcast_one_to_all(value)


def _placed_where_unsharded(tree):
  """Unsharded targets: one local device, or replicated over all processes."""
  if jax.process_count() > 1:
    where = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)),
        jax.sharding.PartitionSpec())
  else:
    where = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: x if getattr(x, "sharding", None) is not None else
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), tree)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def restore_params(workdir_or_checkpoints: str, abstract_params,
                   step: int | None = None):
  """Loads only the parameters of a run (e.g. a teacher), newest readable step."""
  directory = workdir_or_checkpoints
  if directory.rstrip("/").rsplit("/", 1)[-1] != CHECKPOINT_SUBDIR:
    directory = checkpoint_dir(directory)
  # Orbax refuses a checkpoint saved on another topology (e.g. by several
  # hosts) unless the target says where the arrays go.
  abstract_params = _placed_where_unsharded(abstract_params)
  with ocp.CheckpointManager(
      directory, item_names=("params", "train", "data", "meta"),
      options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    steps = [step] if step is not None else sorted(manager.all_steps(),
                                                   reverse=True)
    last_error = None
    for s in steps:
      try:
        return manager.restore(s, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))["params"]
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Parameters at step %d in %s are unreadable (%s); "
                        "trying the one before.", s, directory, e)
        last_error = e
  raise FileNotFoundError(f"No readable checkpoint in {directory}"
                          + (f" (last error: {last_error})" if last_error else ""))


def read_meta(workdir: str) -> dict[str, Any] | None:
  """The meta item of a run's newest checkpoint, or None if it has none."""
  directory = checkpoint_dir(workdir)
  if not storage.is_dir(directory):
    return None
  with ocp.CheckpointManager(
      directory, item_names=("params", "train", "data", "meta"),
      options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    return _newest_meta(manager)


def _newest_meta(manager: ocp.CheckpointManager) -> dict[str, Any] | None:
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # pylint: disable=broad-except
      continue  # restore_latest() warns about unreadable steps.
  return None


def params_bytes(workdir: str) -> int:
  """On-disk size of the newest checkpoint's parameters."""
  directory = checkpoint_dir(workdir)
  steps = sorted(int(d) for d in storage.listdir(directory) if d.isdigit())
  params_dir = storage.join(directory, str(steps[-1]), "params")
  return sum(storage.file_size(storage.join(root, f))
             for root, _, files in storage.walk(params_dir) for f in files)
