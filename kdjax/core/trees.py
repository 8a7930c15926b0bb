"""Splitting a params tree by a trainable mask, and putting it back together.

Used where only the trained leaves travel: the adapters-alone export
(kdjax.weights.prompt) and checkpoints with checkpoint.trainable_only
(kdjax.runtime.checkpoint).
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util


def split(params: dict[str, Any], mask: dict[str, Any]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(trainable, frozen) nested dicts; each holds only its own leaves. A
  leaf of which some layers train (a stacking.Layers mask) counts as
  trainable."""
  flat, flat_mask = (traverse_util.flatten_dict(params),
                     traverse_util.flatten_dict(mask))
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return (traverse_util.unflatten_dict(trainable),
          traverse_util.unflatten_dict(frozen))


def merge(trainable: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
  """Inverse of `split`: one tree holding the leaves of both."""
  flat = traverse_util.flatten_dict(frozen)
  overlap = set(flat) & set(traverse_util.flatten_dict(trainable))
  if overlap:
    raise ValueError(f"Both trees hold {sorted('/'.join(k) for k in overlap)}.")
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


def overlay(params: dict[str, Any], leaves: dict[str, Any]) -> dict[str, Any]:
  """`params` with every leaf that `leaves` holds replaced by it."""
  flat = traverse_util.flatten_dict(params)
  new = traverse_util.flatten_dict(leaves)
  unknown = set(new) - set(flat)
  if unknown:
    raise ValueError(f"No such leaves: {sorted('/'.join(k) for k in unknown)}.")
  flat.update(new)
  return traverse_util.unflatten_dict(flat)


def select(params: dict[str, Any], paths) -> dict[str, Any]:
  """The leaves of `params` at the given tuple paths, as a nested dict."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: flat[k] for k in paths})


def drop(params: dict[str, Any], paths) -> dict[str, Any]:
  """`params` without the leaves at the given tuple paths."""
  gone = set(paths)
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if k not in gone})
