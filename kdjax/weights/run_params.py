"""A finished run's parameters, whichever way its checkpoint holds them.

A checkpoint holds every leaf, or (checkpoint.trainable_only) the trained
leaves alone: then the frozen base is rebuilt as the run started it (its
meta names the model, seed, init_from and init_layers:
kdjax.weights.prompt.base_params), checked against the fingerprint the run
recorded, and the trained leaves are laid over it. Reports, exports and
teachers read runs through `restore`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from kdjax.core import trees
from kdjax.runtime import checkpoint
from kdjax.weights import prompt


def restore(run_dir: str, shapes: Any, data_config,
            step: int | None = None) -> Any:
  """The run's params at `step` (newest), shaped, typed and placed as
  `shapes` (ShapeDtypeStructs, with shardings on a sharded layout)."""
  meta = checkpoint.read_meta(run_dir, step)
  base = None
  if checkpoint.holds_trained_only(meta):
    base = frozen_base(run_dir, meta, shapes, data_config, step)
  return checkpoint.restore_params(run_dir, shapes, step=step, base=base)


def frozen_base(run_dir: str, meta: dict[str, Any], shapes: Any,
                data_config, step: int | None = None) -> Any:
  """The base a trained-only checkpoint lies over, as `shapes` asks."""
  _, base = prompt.base_params(meta, data_config)
  # Checked as the run held it (float32), before the reader's dtype (e.g. a
  # bfloat16 teacher) is applied.
  recorded = meta.get(checkpoint.FROZEN_SHA256)
  if recorded:
    trained = checkpoint.stored_param_paths(run_dir, step)
    if prompt.fingerprint(trees.drop(base, trained)) != recorded:
      raise checkpoint.CheckpointMismatchError(
          f"{run_dir} holds trained leaves alone, but the frozen base "
          f"rebuilt from init_from={meta.get('init_from')!r} differs from the "
          "one they were trained on (its SHA-256 fingerprint changed): the "
          "pretrained weights at that path were replaced. Restore them.")
  base = jax.tree.map(lambda b, s: np.asarray(b, s.dtype), base, shapes)
  return jax.tree.map(
      lambda b, s: (jax.device_put(b, s.sharding)
                    if getattr(s, "sharding", None) is not None else b),
      base, shapes)
