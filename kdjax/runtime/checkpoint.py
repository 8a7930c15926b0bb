"""The one module that talks to Orbax (its API moves; the version is pinned).

A run's checkpoints live in WORKDIR/checkpoints/<step>/ with four items:
  params   the model's parameters (all a teacher needs, all an export needs);
           with checkpoint.trainable_only, the trained leaves alone (LoRA
           adapters, a prompt, a head): the frozen base is rebuilt from the
           run's init_from when read (kdjax.weights.run_params), and meta's
           'params' says which ('trained' or 'all')
  train    optimizer state, step, RNG key and auxiliary trainables (e.g.
           feature projections: trained with the student, not exported)
  data     the grain iterator position
  meta     JSON: model name and fields, class count, the role of the run
Teacher parameters are never part of a student's checkpoint.

The workdir may be local or gs://: Orbax takes either, and kdjax's own
bookkeeping here (finding steps, setting a corrupt step aside, sizes) goes
through kdjax.runtime.storage (etils.epath).
"""

from __future__ import annotations

import errno
import json
import time
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from kdjax.core import errors, trees
from kdjax.core.config import fail
from kdjax.runtime import distributed, storage

CHECKPOINT_SUBDIR = "checkpoints"
ITEM_NAMES = ("params", "train", "data", "meta")
# meta['params']: what the params item holds.
ALL_PARAMS, TRAINED_PARAMS = "all", "trained"
# meta['frozen_sha256'] (trained-only checkpoints): the frozen base they need.
FROZEN_SHA256 = "frozen_sha256"


class CheckpointMismatchError(errors.KdjaxError, ValueError):
  """A checkpoint was written by another run (model, optimizer, config) than
  this one. Every checkpoint is left in place."""


class UnreadableCheckpointError(errors.KdjaxError, RuntimeError):
  """Checkpoints exist but none can be restored (every one is damaged, or a
  storage error persisted). Nothing was set aside or overwritten."""


class CheckpointSaveError(errors.KdjaxError, RuntimeError):
  """Writing a checkpoint failed (e.g. the disk is full). The checkpoints
  written before it are intact."""


# What an error while reading a checkpoint means. Only CORRUPT errors set a
# step aside; TRANSIENT ones are retried; anything else stops the run with
# every checkpoint in place. Classified over the exception's whole chain.
CORRUPT, TRANSIENT, OTHER = "corrupt", "transient", "other"

# Damaged files: missing, truncated, zero bytes, undecodable.
CORRUPT_ERROR_TYPES = (FileNotFoundError, NotADirectoryError, EOFError,
                       json.JSONDecodeError, UnicodeDecodeError)
# Tensorstore (Orbax's array store) raises ValueError("<STATUS>: ...").
# Measured here: a truncated or zero-byte data file gives OUT_OF_RANGE, a
# zero-byte OCDBT manifest DATA_LOSS, a deleted one NOT_FOUND.
CORRUPT_STATUSES = ("DATA_LOSS:", "NOT_FOUND:", "OUT_OF_RANGE:")
# Orbax, when an item's directory is missing from a step.
CORRUPT_MESSAGES = ("was not found in the checkpoint",)
# Storage that may answer next time: a network file system or an object
# store that timed out, throttled or hiccuped.
TRANSIENT_ERROR_TYPES = (ConnectionError, TimeoutError, InterruptedError,
                         BlockingIOError)
TRANSIENT_ERRNOS = frozenset({
    errno.EAGAIN, errno.EINTR, errno.EIO, errno.ESTALE, errno.ETIMEDOUT,
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EBUSY,
    errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH})
TRANSIENT_STATUSES = ("UNAVAILABLE:", "DEADLINE_EXCEEDED:", "ABORTED:")
TRANSIENT_HTTP_CODES = frozenset({408, 429, 500, 502, 503, 504})  # gcsfs.

# Transient errors: this many retries, waiting RETRY_SECONDS * 2**attempt.
RETRIES = 4
RETRY_SECONDS = 1.0


def _chain(error: BaseException) -> list[BaseException]:
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def classify_read_error(error: BaseException) -> str:
  """CORRUPT, TRANSIENT or OTHER: what an error while reading a step means."""
  chain = _chain(error)
  for e in chain:
    message = str(e)
    if (isinstance(e, TRANSIENT_ERROR_TYPES)
        or (isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS)
        or getattr(e, "code", None) in TRANSIENT_HTTP_CODES
        or any(s in message for s in TRANSIENT_STATUSES)):
      return TRANSIENT
  for e in chain:
    message = str(e)
    if (isinstance(e, CORRUPT_ERROR_TYPES)
        or any(message.lstrip("'\"").startswith(s) for s in CORRUPT_STATUSES)
        or any(s in message for s in CORRUPT_MESSAGES)):
      return CORRUPT
  return OTHER


def _short(error: BaseException) -> str:
  return f"{type(error).__name__}: {str(error)[:300]}"


def with_retries(what: str, read: Callable[[], Any]) -> Any:
  """read(), retried with backoff while it fails with a TRANSIENT error."""
  for attempt in range(RETRIES + 1):
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-except
      if classify_read_error(e) != TRANSIENT:
        raise
      if attempt == RETRIES:
        raise UnreadableCheckpointError(
            f"{what} failed {RETRIES + 1} times with a storage error that "
            f"may be transient ({_short(e)}). Nothing was set aside: check "
            "the storage (network, bucket permissions, quota) and rerun the "
            "same command.") from e
      delay = RETRY_SECONDS * 2 ** attempt
      logging.warning("%s failed (%s); retrying in %.1f s (%d of %d).", what,
                      _short(e), delay, attempt + 1, RETRIES)
      time.sleep(delay)


def checkpoint_dir(workdir: str) -> str:
  return storage.join(storage.absolute(workdir), CHECKPOINT_SUBDIR)


class Checkpointer:
  """CheckpointManager for one run: save every N steps, keep K, resume.

  Resuming never silently loses training: only a step proven damaged
  (classify_read_error) is set aside for the one before it; a checkpoint of
  another run or a persistent storage error stops the run with every
  checkpoint in place.
  """

  def __init__(self, workdir: str, *, save_every_steps: int, keep: int,
               async_save: bool = True, trained_mask: Any = None):
    """`trained_mask` (a tree of bools like the params): save the trained
    leaves alone (checkpoint.trainable_only); None saves every leaf."""
    self.directory = checkpoint_dir(workdir)
    self._trained_mask = trained_mask
    self._every = save_every_steps
    self._last_saved = None  # The newest step known to be written.
    self._pending = None  # A step being written in the background.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=0, max_to_keep=keep,
            enable_async_checkpointing=async_save, create=True),
        item_names=ITEM_NAMES)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Every N steps (Orbax's own policy would also save the first step)."""
    return step % self._every == 0

  def save(self, step: int, state, data_iterator, meta: dict[str, Any]) -> bool:
    """Saves params, train state, data position and meta (async where safe).

    A failed write, including one that failed in the background since the
    last call, raises CheckpointSaveError.
    """
    self.wait()  # Surfaces a background failure of the previous save.
    params = state.params
    meta = dict(meta, params=ALL_PARAMS)
    if self._trained_mask is not None:
      params = trees.split(params, self._trained_mask)[0]
      meta["params"] = TRAINED_PARAMS
    try:
      saved = self._manager.save(
          step,
          args=ocp.args.Composite(
              params=ocp.args.StandardSave(params),
              train=ocp.args.StandardSave(_train_items(state)),
              data=grain.checkpoint.CheckpointSave(data_iterator),
              meta=ocp.args.JsonSave(meta)),
          force=True)  # The policy is should_save's, not Orbax's.
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._pending = step
    return saved

  def wait(self) -> None:
    """Blocks until a background save is written; raises if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step, self._pending = self._pending, None
      raise self._save_error(step, e) from e
    if self._pending is not None:
      self._last_saved, self._pending = self._pending, None

  def _save_error(self, step, error: BaseException) -> CheckpointSaveError:
    kept = (f"the checkpoint of step {self._last_saved} is intact"
            if self._last_saved is not None else
            f"checkpoints written before are intact ({self.all_steps()})")
    return CheckpointSaveError(
        f"Writing the checkpoint of step {step} to {self.directory} failed "
        f"({_short(error)}); {kept}. Free space or fix the storage, then "
        "rerun the same command: it resumes from the newest checkpoint.")

  def _set_aside(self, step: int) -> str:
    """Renames a damaged step so it neither blocks a re-save nor is retried."""
    source = storage.join(self.directory, str(step))
    # Process 0 renames; the others wait until it has (and agree on the name).
    # On GCS a rename copies every object, then deletes the originals: if
    # that is interrupted the step is still whole and is set aside next time.
    stamp = int(_from_process_0(np.int32(time.time())))
    target = f"{source}.unreadable-{stamp}"
    if jax.process_index() == 0 and storage.is_dir(source):
      storage.rename(source, target)
    distributed.barrier(f"kdjax_set_aside_{step}")
    self._manager.reload()
    return target

  def restore_latest(self, abstract_state, data_iterator, *,
                     run_meta: dict[str, Any] | None = None,
                     check_meta: Callable[[dict[str, Any]], None] | None = None,
                     restart_if_unreadable: bool = False):
    """Restores the newest readable checkpoint into (state, iterator).

    Per step, newest first: its meta is passed to check_meta (which raises
    CheckpointMismatchError for another run's checkpoint) and its stored
    array tree is compared with abstract_state (run_meta['optimizer'] names
    this run's optimizer in the error); then it is restored. A
    damaged step is tried no further; the damaged steps newer than the one
    restored are set aside with a warning. If every step is damaged,
    raises UnreadableCheckpointError (all left in place) unless
    restart_if_unreadable, which sets them all aside and starts over.
    Returns (state, step) or (None, None) if there is nothing to restore.
    """
    damaged: list[tuple[int, BaseException]] = []
    for step in sorted(self.all_steps(), reverse=True):
      outcome, error, restored = OTHER, None, None
      try:
        restored = self._restore_step(step, abstract_state, data_iterator,
                                      run_meta or {}, check_meta)
        outcome = "ok"
      except Exception as e:  # pylint: disable=broad-except
        error = e
        outcome = CORRUPT if classify_read_error(e) == CORRUPT else OTHER
      outcome = _agree(outcome)
      if outcome == OTHER:  # Another run's checkpoint, or an unknown error.
        raise error or UnreadableCheckpointError(
            f"Restoring step {step} in {self.directory} failed on another "
            "process (see its log); every checkpoint is left in place.")
      if outcome == CORRUPT:
        damaged.append((step, error or RuntimeError(
            "damaged as read by another process")))
        continue
      for bad_step, bad in damaged:
        aside = self._set_aside(bad_step)
        logging.warning(
            "Checkpoint at step %d in %s is damaged (%s); moved it to %s and "
            "resumed from step %d.", bad_step, self.directory, _short(bad),
            aside, step)
      self._last_saved = step
      return restored, step
    if not damaged:
      return None, None
    listing = "; ".join(f"step {s}: {_short(e)}" for s, e in damaged)
    if not restart_if_unreadable:
      raise UnreadableCheckpointError(
          f"Every checkpoint in {self.directory} is damaged ({listing}). "
          "Nothing was moved or deleted. To start this run over from step 0 "
          "(setting them aside), pass "
          "--config.checkpoint.restart_if_unreadable=True.")
    for bad_step, _ in damaged:
      logging.warning("Setting aside damaged step %d: %s (restart_if_"
                      "unreadable=True).", bad_step, self._set_aside(bad_step))
    return None, None

  def _restore_step(self, step: int, abstract_state, data_iterator,
                    run_meta: dict[str, Any], check_meta):
    where = f"Reading checkpoint step {step} in {self.directory}"
    meta = with_retries(where, lambda: self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    stored = with_retries(where, lambda: {
        item: _stored_arrays(storage.join(self.directory, str(step), item))
        for item in ("params", "train")})
    # A trained-only checkpoint restores onto the state's own frozen base
    # (loaded from init_from), which must be the one it was trained on.
    target = abstract_state.params
    if holds_trained_only(meta):
      check_frozen_base(meta, run_meta, self.directory)
      target = _like_stored(target, stored["params"])
    check_structure(  # Before the config: names the arrays that differ.
        {"params": stored["params"], **dict(stored["train"])},
        {"params": target, **_train_items(abstract_state)},
        found_optimizer=meta.get("optimizer", "?"),
        expected_optimizer=run_meta.get("optimizer", "?"),
        directory=self.directory)
    if check_meta is not None:
      check_meta(meta)
    restored = with_retries(where, lambda: self._manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target),
            train=ocp.args.StandardRestore(_train_items(abstract_state)),
            data=grain.checkpoint.CheckpointRestore(data_iterator))))
    train = restored["train"]
    return abstract_state.replace(
        step=train["step"],
        params=trees.overlay(abstract_state.params, restored["params"]),
        opt_state=train["opt_state"], rng=train["rng"],
        aux_params=train["aux_params"])


def holds_trained_only(meta: dict[str, Any] | None) -> bool:
  """Whether a checkpoint's params item holds the trained leaves alone."""
  return bool(meta) and meta.get("params") == TRAINED_PARAMS


def check_frozen_base(found_meta: dict[str, Any], run_meta: dict[str, Any],
                      directory: str) -> None:
  """Refuses a trained-only checkpoint over another frozen base (both
  fingerprints known: kdjax.weights.prompt.fingerprint)."""
  found, mine = found_meta.get(FROZEN_SHA256), run_meta.get(FROZEN_SHA256)
  if found and mine and found != mine:
    raise CheckpointMismatchError(
        f"The checkpoint in {directory} holds trained leaves alone, trained "
        f"on another frozen base than this run loads (init_from "
        f"{found_meta.get('init_from', '?')!r}: its frozen leaves differ "
        "bit for bit). Every checkpoint is left in place: restore the "
        "weights it was trained on, or use another --workdir.")


def _paths(stored) -> list[tuple[str, ...]]:
  """The leaf paths of a stored item's tree (or any nested dict)."""
  return sorted(tuple(_key_name(k) for k in path) for path, _ in
                jax.tree_util.tree_flatten_with_path(stored)[0])


def _like_stored(tree, stored):
  """The leaves of `tree` at the paths a checkpoint's item stores."""
  return trees.select(tree, _paths(stored))


def stored_param_paths(workdir_or_checkpoints: str, step: int | None = None
                       ) -> list[tuple[str, ...]]:
  """The leaf paths a run's params item stores at `step` (newest)."""
  directory = _checkpoints_of(workdir_or_checkpoints)
  if step is None:
    step = latest_step(directory)
  where = f"Reading the parameter list of step {step} in {directory}"
  return _paths(_read_params(where, lambda: _stored_arrays(
      storage.join(directory, str(step), "params"))))


def _train_items(state) -> dict[str, Any]:
  return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
          "aux_params": state.aux_params}


def _stored_arrays(item_dir: str):
  """The tree of shapes and dtypes an item stores (reads no array data)."""
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
  if tree is None:
    raise FileNotFoundError(f"No array metadata in {item_dir}.")
  return tree


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _signatures(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """'opt_state/0/mu/dense/kernel' -> (shape, dtype) of every array leaf.

  Works on arrays, ShapeDtypeStructs and Orbax's stored ArrayMetadata; a
  typed PRNG key counts as its raw uint32 data (what is stored).
  """
  out = {}
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: x is None)
  for path, leaf in leaves:
    if leaf is None:
      continue
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      leaf = jax.eval_shape(jax.random.key_data, leaf)
      dtype = leaf.dtype
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = str(np.dtype(dtype)) if dtype is not None else type(leaf).__name__
    out["/".join(_key_name(k) for k in path)] = (shape, dtype)
  return out


def _state_kinds(paths, param_names: set[str]) -> str:
  """'count, mu, nu' for Adam: the optimizer's own names in its state paths."""
  names = {part for p in paths for part in p.split("/")[1:]
           if not part.isdigit() and part not in param_names}
  return ", ".join(sorted(names)) or "no state"


def check_structure(found_tree, expected_tree, *, found_optimizer: str,
                    expected_optimizer: str, directory: str) -> None:
  """Raises CheckpointMismatchError naming what differs between the arrays a
  checkpoint stores and those this run builds (model, optimizer, trainable
  mask, feature projections, parameter dtypes)."""
  found, expected = _signatures(found_tree), _signatures(expected_tree)
  if found == expected:
    return
  problems = []
  param_names = {part for tree in (found, expected) for p in tree
                 if p.startswith("params/") for part in p.split("/")[1:]}
  group = lambda p: p.split("/", 1)[0]
  for part in sorted({group(p) for p in set(found) | set(expected)}):
    a = {p: v for p, v in found.items() if group(p) == part}
    b = {p: v for p, v in expected.items() if group(p) == part}
    if a == b:
      continue
    if part == "opt_state" and set(a) != set(b):
      problems.append(
          f"opt_state: checkpoint has {found_optimizer} "
          f"({_state_kinds(a, param_names)}), this run builds "
          f"{expected_optimizer} ({_state_kinds(b, param_names)})")
      continue
    missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    changed = sorted(p for p in set(a) & set(b) if a[p] != b[p])
    inner = lambda p: p.split("/", 1)[-1]
    listed = lambda paths: ", ".join(inner(p) for p in paths[:3]) + (
        f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")
    details = [f"{inner(p)}: checkpoint has {a[p][0]} {a[p][1]}, this run "
               f"builds {b[p][0]} {b[p][1]}" for p in changed[:3]]
    if extra:
      details.append(f"only in the checkpoint: {listed(extra)}")
    if missing:
      details.append(f"only in this run: {listed(missing)}")
    problems.append(f"{part}: " + "; ".join(details))
  raise CheckpointMismatchError(
      f"The checkpoint in {directory} was written by a different run: "
      + " | ".join(problems) + ". Every checkpoint is left in place. Use "
      "another --workdir for this config, or rerun with the config that "
      "wrote it.")


def _agree(outcome: str) -> str:
  """The worst outcome over all processes ('ok' < CORRUPT < OTHER)."""
  if jax.process_count() == 1:
    return outcome
  rank = {"ok": 0, CORRUPT: 1, OTHER: 2}
  worst = int(np.max(multihost_utils.process_allgather(
      np.int32(rank[outcome]))))
  return {v: k for k, v in rank.items()}[worst]


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



def _checkpoints_of(workdir_or_checkpoints: str) -> str:
  directory = workdir_or_checkpoints
  if directory.rstrip("/").rsplit("/", 1)[-1] != CHECKPOINT_SUBDIR:
    directory = checkpoint_dir(directory)
  return directory


def _read_only(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory, item_names=ITEM_NAMES,
      options=ocp.CheckpointManagerOptions(read_only=True))


def latest_step(workdir_or_checkpoints: str) -> int | None:
  """The newest step of a run's checkpoints, or None if it has none."""
  directory = _checkpoints_of(workdir_or_checkpoints)
  if not storage.is_dir(directory):
    return None
  with _read_only(directory) as manager:
    return manager.latest_step()


def restore_params(workdir_or_checkpoints: str, abstract_params,
                   step: int | None = None, base=None):
  """Loads only the parameters of a run (e.g. a teacher) at `step` (newest).

  A checkpoint of trained leaves alone (holds_trained_only) is laid over
  `base`, the run's frozen base rebuilt by the caller
  (kdjax.weights.run_params does both). Never falls back to an older step:
  parameters that cannot be read raise UnreadableCheckpointError naming
  the step (a teacher silently older than the one asked for would change
  every result).
  """
  directory = _checkpoints_of(workdir_or_checkpoints)
  # Orbax refuses a checkpoint saved on another topology (e.g. by several
  # hosts) unless the target says where the arrays go.
  abstract_params = _placed_where_unsharded(abstract_params)
  with _read_only(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {directory}.")
    where = f"Reading the parameters of step {step} in {directory}"
    stored = _read_params(where, lambda: _stored_trained_only(
        manager, directory, step))
    if stored is not None:
      if base is None:
        raise ValueError(
            f"Step {step} in {directory} holds the trained leaves alone "
            "(checkpoint.trainable_only): read it with kdjax.weights."
            "run_params.restore, which rebuilds the frozen base.")
      abstract_params = _like_stored(abstract_params, stored)
    params = _read_params(where, lambda: manager.restore(
        step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params))))["params"]
  return trees.overlay(base, params) if stored is not None else params


def _stored_trained_only(manager, directory: str, step: int):
  """The stored params tree (metadata) of a trained-only step, else None."""
  meta = manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))["meta"]
  if not holds_trained_only(meta):
    return None
  return _stored_arrays(storage.join(directory, str(step), "params"))


def _read_params(where: str, read: Callable[[], Any]) -> Any:
  """read() with retries; any other failure is UnreadableCheckpointError."""
  try:
    return with_retries(where, read)
  except UnreadableCheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    kind = "damaged" if classify_read_error(e) == CORRUPT else "unreadable"
    raise UnreadableCheckpointError(
        f"{where} failed: the checkpoint is {kind} ({_short(e)}). kdjax "
        "does not fall back to an older step for parameters; restore the "
        "files, or point to another checkpoint.") from e


def read_meta(workdir: str, step: int | None = None) -> dict[str, Any] | None:
  """The meta item of a run's checkpoint at `step` (newest), or None if it
  has none.

  An unreadable meta raises UnreadableCheckpointError (no older step is
  read in its place).
  """
  directory = _checkpoints_of(workdir)
  if not storage.is_dir(directory):
    return None
  with _read_only(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    where = f"Reading the meta of checkpoint step {step} in {directory}"
    try:
      return with_retries(where, lambda: manager.restore(step, args=(
          ocp.args.Composite(meta=ocp.args.JsonRestore())))["meta"])
    except UnreadableCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise UnreadableCheckpointError(f"{where} failed ({_short(e)}).") from e


def params_bytes(workdir: str) -> int:
  """On-disk size of the newest checkpoint's parameters."""
  directory = checkpoint_dir(workdir)
  steps = sorted(int(d) for d in storage.listdir(directory) if d.isdigit())
  params_dir = storage.join(directory, str(steps[-1]), "params")
  return sum(storage.file_size(storage.join(root, f))
             for root, _, files in storage.walk(params_dir) for f in files)


def validate(checkpoint_config) -> None:
  """config.checkpoint: positive save interval and number kept."""
  if checkpoint_config.every_steps <= 0 or checkpoint_config.keep <= 0:
    fail("checkpoint", dict(checkpoint_config),
         "every_steps and keep must be > 0")
