"""Parameter trees: counting them (train, reports, prompt export) and their
shapes for a model and dataset (teachers, reports)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from kdjax.data import pipeline


def count(params: Any, mask: Any | None = None) -> int:
  """Number of parameters; only the trainable ones (mask True) if a mask is
  given. Works on arrays and ShapeDtypeStructs."""
  sizes = jax.tree.map(lambda p: int(np.prod(np.shape(p))), params)
  if mask is not None:
    sizes = jax.tree.map(lambda s, m: s if m else 0, sizes, mask)
  return int(sum(jax.tree.leaves(sizes)))


def abstract(model, data_config) -> Any:
  """The model's parameter shapes for this data (nothing is computed)."""
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), pipeline.dummy_inputs(data_config))["params"])
