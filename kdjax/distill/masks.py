"""Training only some parameters: the frozen-parameter masks the step uses.

The mask labels each leaf (`trainable_mask`); `freeze(tx, mask)` is an
optax.multi_transform that runs `tx` on the trainable leaves and
optax.set_to_zero (stateless) on the rest, so a frozen backbone has NO
optimizer state. Do not use optax.masked alone: it passes the masked-out
gradients through unchanged. Apply updates with `apply_updates(params,
updates, mask)`, which returns the frozen leaves as they were:
optax.apply_updates adds the zero updates, and -0.0 + 0.0 == +0.0 flips the
sign bit of negative zeros (all-MiniLM-L6-v2 has one), so a "frozen" backbone
would not stay bit-identical.

On a scan_layers model a weight stacks every layer, so selecting one layer
('layers_5/mlp') marks part of a leaf (`stacking.Layers`): the whole leaf
gets optimizer state, the frozen layers' rows get no gradient and come back
as they were.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import traverse_util

from kdjax.models import lora
from kdjax.models import stacking

TRAINABLE, FROZEN = "trainable", "frozen"


def trainable_mask(params: dict[str, Any],
                   trainable: Sequence[str] = ("prompt",), *,
                   adapters: bool = False) -> dict[str, Any]:
  """A tree like `params`: True where a leaf's path starts with a name given
  (and, with `adapters`, on every LoRA adapter leaf: kdjax/models/lora.py).

  Names are '/'-separated path prefixes ('prompt', 'head', 'encoder/pooler',
  'layers_5/mlp'). On a scan_layers model a name with a layer index selects
  that layer's rows of the stacked weights: those leaves get a
  `stacking.Layers` (True if every layer is selected). A name matching no
  parameter fails (a typo would silently train nothing).
  """
  flat = traverse_util.flatten_dict(params)
  whole: list[tuple[str, ...]] = []
  rows: dict[tuple[str, ...], set[int]] = {}
  for name in trainable:
    try:
      parts, layer = stacking.locate(params, name)
    except KeyError as e:
      tops = sorted({path[0] for path in flat})
      raise ValueError(f"No parameters under {name!r} ({e.args[0]}); "
                       f"top-level names are {tops}.") from e
    if layer is None:
      whole.append(parts)
    else:
      rows.setdefault(parts, set()).add(layer[1])
  mask = {}
  for path, leaf in flat.items():
    if any(path[:len(p)] == p for p in whole) or (
        adapters and path[-1] in lora.ADAPTERS):
      mask[path] = True
      continue
    chosen = set().union(*[i for p, i in rows.items() if path[:len(p)] == p])
    num_layers = np.shape(leaf)[0] if chosen else 0
    if not chosen or len(chosen) == num_layers:
      mask[path] = bool(chosen)
    else:
      mask[path] = stacking.Layers(
          tuple(i in chosen for i in range(num_layers)))
  return traverse_util.unflatten_dict(mask)


def select(mask_leaf: Any, yes: jax.Array, no: jax.Array) -> jax.Array:
  """`yes` where the mask leaf trains, `no` where it is frozen."""
  if isinstance(mask_leaf, stacking.Layers):
    return mask_leaf.where(yes, no)
  return yes if mask_leaf else no


def freeze(tx: optax.GradientTransformation,
           mask: dict[str, Any]) -> optax.GradientTransformation:
  """`tx` on the trainable leaves, stateless zero updates on the frozen ones.

  The mask's tree must be the one `tx.init`/`tx.update` see (e.g. a tuple
  `(params_mask, aux_mask)` if the optimizer runs on `(params, aux_params)`).
  """
  labels = jax.tree.map(lambda m: TRAINABLE if m else FROZEN, mask)
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()},
                               labels)


def apply_updates(params: Any, updates: Any, mask: Any) -> Any:
  """optax.apply_updates on trainable leaves; frozen leaves returned untouched.

  `mask` holds Python bools: close over it (or make it static) under jit.
  """
  return jax.tree.map(
      lambda p, u, m: select(m, optax.apply_updates(p, u), p) if m else p,
      params, updates, mask)
