"""Counting parameters: the one implementation (train, report, prompt export)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def count(params: Any, mask: Any | None = None) -> int:
  """Number of parameters; only the trainable ones (mask True) if a mask is
  given. Works on arrays and ShapeDtypeStructs."""
  sizes = jax.tree.map(lambda p: int(np.prod(np.shape(p))), params)
  if mask is not None:
    sizes = jax.tree.map(lambda s, m: s if m else 0, sizes, mask)
  return int(sum(jax.tree.leaves(sizes)))
