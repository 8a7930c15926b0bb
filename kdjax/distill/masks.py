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
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import optax
from flax import traverse_util

TRAINABLE, FROZEN = "trainable", "frozen"


def trainable_mask(params: dict[str, Any],
                   trainable: Sequence[str] = ("prompt",)) -> dict[str, Any]:
  """Bool tree like `params`: True where a leaf's path starts with a name given.

  Names are '/'-separated path prefixes ('prompt', 'head', 'encoder/pooler').
  A name matching no parameter fails (a typo would silently train nothing).
  """
  flat = traverse_util.flatten_dict(params)
  prefixes = [tuple(t.split("/")) for t in trainable]
  for prefix in prefixes:
    if not any(path[:len(prefix)] == prefix for path in flat):
      tops = sorted({path[0] for path in flat})
      raise ValueError(f"No parameters under {'/'.join(prefix)!r}; top-level "
                       f"names are {tops}.")
  mask = {path: any(path[:len(p)] == p for p in prefixes) for path in flat}
  return traverse_util.unflatten_dict(mask)


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
      lambda p, u, m: optax.apply_updates(p, u) if m else p,
      params, updates, mask)
