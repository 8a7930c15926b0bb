"""Parameter trees: counting them (train, reports, prompt export), initialising
them and their shapes for a model and dataset (train, teachers, reports)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from kdjax.data import pipeline
from kdjax.models import partitioning, stacking


def count(params: Any, mask: Any | None = None) -> int:
  """Number of parameters; only the trainable ones (mask True, or the
  selected layers of a stacked leaf) if a mask is given. Works on arrays and ShapeDtypeStructs."""
  sizes = jax.tree.map(lambda p: int(np.prod(np.shape(p))), params)
  if mask is not None:
    sizes = jax.tree.map(
        lambda s, m: (s * m.fraction() if isinstance(m, stacking.Layers)
                      else s if m else 0), sizes, mask)
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


def _boxed_init(model, data_config, key) -> Any:
  return model.init(key, pipeline.dummy_inputs(data_config))["params"]


def init(model, data_config, seed: int, out_shardings: Any = None) -> Any:
  """The model's initial params for this data, from `jax.random.key(seed)`;
  one compiled init instead of dozens of eager ops. With `out_shardings`
  (a tree like the params) each device builds only its own shards."""
  fn = lambda key: partitioning.unbox(_boxed_init(model, data_config, key))
  return jax.jit(fn, out_shardings=out_shardings)(jax.random.key(seed))


def logical_specs(model, data_config) -> Any:
  """The logical axis names of every parameter (PartitionSpecs of names from
  kdjax.models.partitioning; P() for a model that names none)."""
  boxed = jax.eval_shape(
      lambda: _boxed_init(model, data_config, jax.random.key(0)))
  return partitioning.logical_names(boxed)


def abstract(model, data_config, seed: int = 0) -> Any:
  """The model's parameter shapes for this data (nothing is computed)."""
  return jax.eval_shape(lambda: init(model, data_config, seed))
