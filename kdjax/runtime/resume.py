"""May this config continue the checkpoints in its workdir?

A checkpoint records the run's description: every config field the run
reads, except those safe to change on a resume. Resuming compares the two
field by field and refuses any difference by name, so a run is never
silently continued with another optimizer, schedule, model, objective,
teacher, data or seed (its results would belong to neither config).
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from kdjax.runtime import checkpoint

# Fields that may change between a run and its resume: how often it logs,
# evaluates and saves; where its inputs are read from; how devices and
# processes are laid out (a replicated train state restores onto any
# device count); the pipeline's list of runs (each run records its own
# resolved config).
SAFE_TO_CHANGE = (
    "log_every_steps", "eval_every_steps", "checkpoint", "parallel",
    "distributed", "aot", "pipeline", "data.data_dir", "data.source_dir",
    "data.cache_in_memory", "export", "report",
)

# Sections a training mode never reads.
UNUSED_BY_MODE = {
    "teacher": ("student", "distill", "cache"),
    "scratch": ("teacher", "distill", "cache"),
    "distill": ("cache",),
}

# Fields whose change makes the learning-rate schedule another one: kdjax
# cannot lengthen a run in place.
SCHEDULE_FIELDS = ("num_steps", "num_epochs", "batch_size", "warmup_steps",
                   "schedule", "learning_rate")

# What checkpoints from before describe_run recorded (compared instead).
LEGACY_KEYS = ("model", "role", "objective", "seed", "train_fraction")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(node, (dict, ml_collections.ConfigDict)):
    out = {}
    for key, value in node.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: json.loads(json.dumps(node))}  # Tuples -> lists.


def _covered(field: str, names) -> bool:
  return any(field == n or field.startswith(n + ".") for n in names)


def _skipped(field: str, mode: str) -> bool:
  return (_covered(field, SAFE_TO_CHANGE)
          or _covered(field, UNUSED_BY_MODE.get(mode, ())))


def describe_run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'student.train.optimizer': 'adamw', ...}: what a checkpoint records."""
  return {k: v for k, v in _flatten(config.to_dict()).items()
          if not _skipped(k, config.mode)}


def _hint(field: str) -> str:
  if field.rsplit(".", 1)[-1] in SCHEDULE_FIELDS:
    return (" (the learning-rate schedule depends on it; a run cannot be "
            "lengthened or re-scheduled in place)")
  return ""


def check_same_run(found_meta: dict[str, Any], run_meta: dict[str, Any],
                   workdir: str) -> None:
  """Raises CheckpointMismatchError naming every field that differs."""
  found, expected = found_meta.get("config"), run_meta["config"]
  if found is not None:  # Recorded before a section became safe to change.
    found = {k: v for k, v in found.items()
             if not _covered(k, SAFE_TO_CHANGE)}
  if found is None:  # Written before kdjax recorded the whole config.
    found = {k: found_meta.get(k) for k in LEGACY_KEYS}
    expected = {k: json.loads(json.dumps(run_meta.get(k))) for k in LEGACY_KEYS}
  differences = [
      f"{k}: checkpoint has {found.get(k, '(absent)')!r}, this config has "
      f"{expected.get(k, '(absent)')!r}{_hint(k)}"
      for k in sorted(set(found) | set(expected))
      if found.get(k, "(absent)") != expected.get(k, "(absent)")]
  if differences:
    raise checkpoint.CheckpointMismatchError(
        f"{workdir!r} holds a checkpoint of a different run: "
        + "; ".join(differences) + ". Every checkpoint is left in place. "
        "Use another --workdir for this config, or rerun with the config "
        "that wrote it. Safe to change on a resume: "
        + ", ".join(SAFE_TO_CHANGE) + ".")
