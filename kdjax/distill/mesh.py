"""The (data, fsdp, model) mesh, the logical-axis rules, and the shardings they give.

`config.parallel.mesh` sizes the three axes (one may be -1: the rest of the
devices). All devices on 'data' (the default) is the replicated layout:
today's per-device program (kdjax.distill.parallel). Anything on 'fsdp' or
'model' is the sharded layout: the same step function under `jax.jit` with
explicit shardings (GSPMD), parameters placed by `config.parallel.rules`,
which map the logical names of kdjax.models.partitioning to mesh axes
(MaxText's `logical_axis_rules`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax.core.config import fail
from kdjax.core.defaults import PARTITION_RULES

AXES = ("data", "fsdp", "model")

def sizes(mesh_config: Mapping[str, int], num_devices: int,
          field: str = "parallel.mesh") -> dict[str, int]:
  """{'data', 'fsdp', 'model'} sizes with -1 resolved; clear errors otherwise."""
  given = dict(mesh_config.items())
  unknown = sorted(set(given) - set(AXES))
  if unknown:
    fail(field, given, f"unknown axes {unknown}; the axes are {AXES}")
  shape = {axis: int(given.get(axis, 1)) for axis in AXES}
  rest = [a for a, n in shape.items() if n == -1]
  bad = [a for a, n in shape.items() if n == 0 or n < -1]
  if bad or len(rest) > 1:
    fail(field, given, "each size must be >= 1, and at most one may be -1 "
         "(= the remaining devices)")
  known = math.prod(n for n in shape.values() if n != -1)
  if rest:
    if num_devices % known:
      fail(field, given, f"{num_devices} devices are not divisible by "
           f"{known} (the product of the other axes)")
    shape[rest[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    fail(field, given, f"data x fsdp x model = {math.prod(shape.values())}, "
         f"but there are {num_devices} devices")
  return shape


def is_sharded(shape: Mapping[str, int]) -> bool:
  """Parameters are split somewhere (the GSPMD program runs)."""
  return shape["fsdp"] > 1 or shape["model"] > 1


def is_mesh(mesh: Mesh) -> bool:
  """A ('data', 'fsdp', 'model') mesh (the sharded layout's), not a 1-D one."""
  return tuple(mesh.axis_names) == AXES


def make(mesh_config: Mapping[str, int],
         devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The 3-axis mesh over all (global) devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = sizes(mesh_config, len(devices))
  grid = np.asarray(devices).reshape([shape[a] for a in AXES])
  return Mesh(grid, AXES)


def rules(parallel_config) -> tuple:
  """config.parallel.rules as flax wants them: ((logical, mesh axes), ...)."""
  out = []
  for name, target in parallel_config.get("rules", PARTITION_RULES):
    if isinstance(target, (list, tuple)):
      target = tuple(target)
    out.append((name, target))
  return tuple(out)


def validate_rules(rule_pairs: Sequence, field: str = "parallel.rules") -> None:
  for pair in rule_pairs:
    if len(pair) != 2:
      fail(field, rule_pairs, f"each rule is (logical name, mesh axes); got "
           f"{pair!r}")
    targets = pair[1] if isinstance(pair[1], tuple) else (pair[1],)
    unknown = [t for t in targets if t is not None and t not in AXES]
    if unknown:
      fail(field, rule_pairs, f"rule {pair!r} names mesh axes {unknown}; the "
           f"axes are {AXES}")


@contextlib.contextmanager
def active(mesh: Mesh, rule_pairs: Sequence) -> Iterator[None]:
  """Mesh and rules in scope, so the models' activation constraints apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rule_pairs):
    yield


def param_shardings(logical_specs: Any, mesh: Mesh, rule_pairs: Sequence
                    ) -> Any:
  """NamedShardings for a tree of logical PartitionSpecs."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rule_pairs))


def batch_sharding(mesh: Mesh, rule_pairs: Sequence) -> NamedSharding:
  """Leading (example) dimension split by the 'batch' rule."""
  axes = nn.logical_to_mesh_axes(("batch",), list(rule_pairs))
  return NamedSharding(mesh, P(*axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_divisible(shapes: Any, shardings: Any, what: str) -> None:
  """Refuses a parameter whose split dimension the mesh axes do not divide
  (e.g. 3 KV heads over model=2), naming the sizes; GSPMD would pad it."""
  problems = []
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_shardings = jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat_shapes, flat_shardings):
    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    for dim, (size, axes) in enumerate(zip(leaf.shape, spec)):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      parts = math.prod(sharding.mesh.shape[a] for a in axes)
      if size % parts:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        problems.append(f"{name} dim {dim} = {size} over {'x'.join(axes)} = "
                        f"{parts}")
  if problems:
    raise ValueError(
        f"{what}: the mesh does not divide these parameter dimensions: "
        + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else "")
        + ". Choose mesh sizes that divide them (for attention: a 'model' "
        "axis dividing both the query and the KV heads), or map that "
        "logical axis to None in config.parallel.rules.")


def state_shardings(state_shapes: Any, trainable_shardings: Any,
                    trainable_shapes: Any, mesh: Mesh) -> Any:
  """Shardings for a train state: parameters as given; optimizer-state
  leaves (Adam's moments, ...) like the parameter whose path ends theirs and
  whose shape they share; everything else (step, counts, rng) replicated."""
  by_path = {}
  flat = jax.tree_util.tree_flatten_with_path(trainable_shapes)[0]
  leaves = jax.tree.leaves(trainable_shardings,
                           is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat, leaves):
    by_path[tuple(path)] = (leaf.shape, sharding)

  def pick(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      found = by_path.get(path[start:])
      if found and found[0] == getattr(leaf, "shape", None):
        return found[1]
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(pick, state_shapes)
