"""Mesh, shardings, and mapping a per-device step over all devices.

The step is written once, as a per-device function with named-axis collectives
(the pmap programming model). `map_over_devices` runs it with
`jax.jit(jax.shard_map(...))` on a Mesh (default) or with `jax.pmap`.

The trap this module exists for (measured on JAX 0.10.2): inside shard_map,
the gradient with respect to a replicated (P()) input is ALREADY summed over
the data axis (the transpose of the implicit broadcast is a psum), so a psum or
pmean of it would be wrong or a no-op. Under pmap the same gradient is
per-device and needs an explicit psum. `DataAxis.sum_gradients` hides the
difference; the loss is always normalised by the GLOBAL example count, so a sum
of per-device gradients is the full-batch gradient.

On a one-device mesh there is nothing to map: the shard_map backend compiles
the per-device function with a plain `jax.jit`, where the axis is unbound and
every `DataAxis` collective is the identity (the function already sees the
whole batch), so it pays no all-reduce of the gradients (what that costs:
benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax.core.config import fail
from kdjax.distill import mesh as mesh_lib

DATA_AXIS = "data"
BACKENDS = ("shard_map", "pmap")


@dataclasses.dataclass(frozen=True)
class DataAxis:
  """Collectives over the data-parallel axis, correct for either backend."""
  backend: str = "shard_map"
  name: str = DATA_AXIS

  def sum(self, tree: Any) -> Any:
    """Sum of per-device values (metrics, counts) over all devices."""
    if not self.is_mapped():
      return tree
    return jax.tree.map(lambda x: lax.psum(x, self.name), tree)

  def sum_gradients(self, grads: Any) -> Any:
    """Sum over devices of gradients w.r.t. replicated parameters."""
    if not self.is_mapped():
      return grads
    if self.backend == "pmap":
      return self.sum(grads)
    # shard_map: gradients of replicated inputs come out already summed
    # (device-invariant); only a leaf still varying over the axis needs a psum.
    def reduce_leaf(g):
      varying = jax.typeof(g).manual_axis_type.varying
      return lax.psum(g, self.name) if self.name in varying else g
    return jax.tree.map(reduce_leaf, grads)

  def index(self) -> jax.Array:
    if not self.is_mapped():
      return jnp.zeros((), jnp.int32)
    return lax.axis_index(self.name)

  def is_mapped(self) -> bool:
    """True inside shard_map/pmap over the axis; False under a plain jit,
    which sees the global batch (map_over_devices on one device)."""
    try:
      lax.axis_size(self.name)
    except NameError:
      return False
    return True


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over all (global) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def on_mesh(tree: Any, mesh: Mesh) -> Any:
  """Arrays already placed on `mesh` (e.g. sharded parameters) as they are;
  everything else replicated on it. For evaluation, which runs a plain jit:
  sharded parameters stay sharded (GSPMD), never gathered whole per device."""
  def put(x):
    if isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == mesh:
      return x
    return replicate(x, mesh)
  return jax.tree.map(put, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def abstract(tree: Any, sharding) -> Any:
  """ShapeDtypeStructs of `tree`'s leaves with `sharding` (nothing placed)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree on every device of the mesh as truly replicated arrays."""
  sharding = replicated(mesh)

  def put(x):
    # With several processes device_put refuses typed PRNG keys; their data
    # (uint32) is placed and re-wrapped instead.
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(
          jax.device_put(jax.random.key_data(x), sharding),
          impl=jax.random.key_impl(x))
    return jax.device_put(x, sharding)
  return jax.tree.map(put, tree)


def place(tree: Any, shardings: Any) -> Any:
  """Host values placed with per-leaf `shardings`: each process builds only
  its addressable pieces (works across hosts; every process holds `tree`)."""
  def put(x, sharding):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding),
                                      impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and x.is_fully_addressable:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: host[index])
  return jax.tree.map(put, tree, shardings)


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` with per-leaf `shardings` (nothing placed)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Builds global batch arrays (split on the data axis) from this host's piece."""
  return place_batch(local_batch, batch_sharded(mesh))


def put_batch(local_batch: Any, mesh: Mesh, backend: str) -> Any:
  """This host's batch placed for `map_over_devices`' step, asynchronously.

  Lets a loop copy batch n+1 to the devices while step n runs. The pmap
  backend splits and transfers the batch itself, so it stays on the host.
  """
  if backend == "shard_map":
    return shard_batch(local_batch, mesh)
  return local_batch


def jit_over_mesh(per_device_fn: Callable, mesh: Mesh, *,
                  donate_first: bool = True) -> Callable:
  """The shard_map backend's compiled program, taking placed global arrays.

  One device: a plain jit (nothing to map; DataAxis collectives are
  identities). Several: jit(shard_map) with replicated state and frozen
  inputs and the batch split over the data axis.
  """
  donate = (0,) if donate_first else ()
  if mesh.size == 1:
    return jax.jit(per_device_fn, donate_argnums=donate,
                   out_shardings=replicated(mesh))
  mapped = jax.shard_map(per_device_fn, mesh=mesh,
                         in_specs=(P(), P(DATA_AXIS), P()),
                         out_specs=(P(), P()))
  return jax.jit(mapped, donate_argnums=donate)


def map_over_devices(per_device_fn: Callable, mesh: Mesh, backend: str, *,
                     donate_first: bool = True) -> Callable:
  """Compiles `per_device_fn(state, batch, frozen) -> (state, metrics)`.

  `state` and `frozen` (e.g. teacher params) are replicated, `batch` is split
  over the data axis; outputs are replicated. `state` is donated. The returned
  function takes this host's piece of the batch (numpy) for either backend.
  """
  if backend not in BACKENDS:
    raise ValueError(f"Unknown parallel backend {backend!r}; allowed: {BACKENDS}.")
  if backend == "shard_map":
    compiled = jit_over_mesh(per_device_fn, mesh, donate_first=donate_first)

    def run_sharded(state, local_batch, frozen):
      return compiled(state, shard_batch(local_batch, mesh), frozen)
    return run_sharded

  donate = (0,) if donate_first else ()
  devices = list(mesh.devices.flat)
  num_devices = len(devices)
  if jax.process_count() > 1:
    raise ValueError("The pmap backend maps over this host's devices only; "
                     "use parallel.backend='shard_map' for multi-host runs.")
  pmapped = jax.pmap(per_device_fn, axis_name=DATA_AXIS,
                     in_axes=(None, 0, None), out_axes=(None, None),
                     donate_argnums=donate, devices=devices)

  def run(state, batch, frozen):
    split = jax.tree.map(
        lambda x: np.asarray(x).reshape((num_devices, -1) + x.shape[1:]), batch)
    return pmapped(state, split, frozen)
  return run


def jit_sharded(step_fn: Callable, mesh: Mesh, rule_pairs, *,
                state_shardings: Any, frozen_shardings: Any,
                donate_first: bool = True) -> Callable:
  """The sharded layout's program (GSPMD): the same step function under
  `jax.jit` with explicit in/out shardings.

  No data axis is bound, so `DataAxis` collectives are identities and the
  function sees the global batch; XLA inserts the reductions the shardings
  imply. Mesh and logical rules are in scope while it traces, so the models'
  activation constraints apply. Takes this host's piece of the batch.
  """
  batch_sharding = mesh_lib.batch_sharding(mesh, rule_pairs)

  jitted = jax.jit(step_fn,
                   in_shardings=(state_shardings, batch_sharding,
                                 frozen_shardings),
                   out_shardings=(state_shardings, replicated(mesh)),
                   donate_argnums=(0,) if donate_first else ())

  def run(state, local_batch, frozen):
    batch = place_batch(local_batch, batch_sharding)
    with mesh_lib.active(mesh, rule_pairs):  # Traced (once) in scope.
      return jitted(state, batch, frozen)

  def lower(*args):
    with mesh_lib.active(mesh, rule_pairs):
      return jitted.lower(*args)
  run.lower = lower
  run.batch_sharding = batch_sharding
  return run


def place_batch(local_batch: Any, sharding: NamedSharding) -> Any:
  """Global batch arrays with `sharding` from this host's piece."""
  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(put, local_batch)


def validate(parallel_config, num_devices: int | None,
             process_count: int) -> None:
  """config.parallel: a backend that can run the mesh over `process_count`
  hosts, mesh sizes that multiply to the device count (None: checked
  elsewhere, e.g. against an AOT topology), well-formed rules."""
  backend = parallel_config.backend
  if backend not in BACKENDS + ("gspmd",):
    fail("parallel.backend", backend, f"allowed: {BACKENDS + ('gspmd',)}")
  mesh_config = parallel_config.get("mesh", {})
  shape = (mesh_lib.sizes(mesh_config, num_devices) if num_devices
           else {a: int(mesh_config.get(a, 1)) for a in mesh_lib.AXES})
  if mesh_lib.is_sharded(shape) and backend == "pmap":
    fail("parallel.backend", backend,
         f"pmap runs the replicated layout only; parallel.mesh={shape} shards "
         "parameters, which runs under jit with shardings ('shard_map' or "
         "'gspmd')")
  mesh_lib.validate_rules(mesh_lib.rules(parallel_config))
  if process_count > 1 and backend == "pmap":
    fail("parallel.backend", backend,
         f"pmap maps over one host's devices; with {process_count} "
         "processes use 'shard_map'")
