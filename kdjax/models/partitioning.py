"""Logical axis names for parameters and activations (Flax logical partitioning).

Models name the axes of every parameter and of the activations at block
boundaries with the names below; `config.parallel.rules` maps each name to a
mesh axis ('data', 'fsdp', 'model') or to None (replicated), as MaxText's
`logical_axis_rules` do. Without rules in scope (the default, replicated
layout) the names are inert: `constrain` is the identity and the parameters
are plain arrays once unboxed, so the replicated program is unchanged.

Parameter axes:
  vocab     token-embedding rows / LM-head columns
  embed     the model width (residual stream) of a weight
  heads     query heads;      kv_heads  key/value heads;  head_dim  per head
  mlp       the MLP's hidden width
  norm      LayerNorm/RMSNorm scales and biases
  classes   a classifier head's outputs
  length    learned position rows, prompt rows
Activation axes:
  batch, act_length, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab

Also `varying_axes` / `cast_varying`: inside shard_map, a custom VJP (the GPT
tied head, the chunked token loss) must see a replicated weight typed like
the per-device data it meets.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
from jax import lax

PARAM_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp",
              "norm", "classes", "length", "layers")
ACTIVATION_AXES = ("batch", "act_length", "act_embed", "act_heads",
                   "act_kv_heads", "act_mlp", "act_vocab")
AXES = PARAM_AXES + ACTIVATION_AXES

# Block-boundary activations.
RESIDUAL = ("batch", "act_length", "act_embed")
LOGITS = ("batch", "act_length", "act_vocab")


def param(init: Callable, names: Sequence[str | None]) -> Callable:
  """`init` whose parameter carries logical axis names (one per dim)."""
  unknown = [n for n in names if n is not None and n not in PARAM_AXES]
  if unknown:
    raise ValueError(f"Unknown logical parameter axes {unknown}; "
                     f"allowed: {PARAM_AXES}.")
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout under the active rules (identity without)."""
  return nn.with_logical_constraint(x, tuple(names))


def unbox(tree):
  """Plain arrays from a tree that may hold LogicallyPartitioned boxes."""
  return nn.meta.unbox(tree)


def logical_names(boxed_tree) -> dict:
  """The logical PartitionSpec of every parameter (P() where none is named)."""
  return nn.get_partition_spec(boxed_tree)


def varying_axes(*trees) -> frozenset[str]:
  """The manual (shard_map) mesh axes any leaf varies over; empty outside."""
  axes = frozenset()
  for leaf in jax.tree.leaves(trees):
    axes |= jax.typeof(leaf).manual_axis_type.varying
  return axes


def cast_varying(x: jax.Array, axes: frozenset[str]) -> jax.Array:
  """x marked as varying over `axes` too, so that a custom_vjp taking it
  beside per-device data returns a cotangent of x's own type (autodiff
  sums it over those axes, as it would for a plain op)."""
  missing = axes - jax.typeof(x).manual_axis_type.varying
  return lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x
