"""Parameter trees: counting them (train, reports, prompt export), initialising
them and their shapes for a model and dataset (train, teachers, reports)."""

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


def count_non_embedding(params: Any) -> int:
  """Parameters outside the token embedding and LM head (how LM sizes are
  quoted). Works on arrays and ShapeDtypeStructs."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    top = getattr(path[0], "key", "")
    if top not in ("embed", "lm_head"):
      total += int(np.prod(leaf.shape))
  return total


def init(model, data_config, seed: int) -> Any:
  """The model's initial params for this data, from `jax.random.key(seed)`;
  one compiled init instead of dozens of eager ops."""
  return jax.jit(lambda key: model.init(
      key, pipeline.dummy_inputs(data_config))["params"])(jax.random.key(seed))


def abstract(model, data_config, seed: int = 0) -> Any:
  """The model's parameter shapes for this data (nothing is computed)."""
  return jax.eval_shape(lambda: init(model, data_config, seed))
