"""Where a run's models live: the mesh config.parallel asks for, and
parameters placed on it.

Training, evaluation, both reports, the teacher-cache builder and
teacher-written text all place models here, so a teacher too big for one
device is sharded the same way everywhere (kdjax.distill.mesh): on the 1-D
('data',) mesh parameters are replicated; on the ('data', 'fsdp', 'model')
mesh they are split by config.parallel.rules.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
from jax.sharding import Mesh

from kdjax.distill import mesh as mesh_lib
from kdjax.distill import parallel
from kdjax.weights import params as params_lib
from kdjax.weights import run_params
from kdjax.weights import specs
from kdjax.weights import teachers as teachers_lib


def make_mesh(config, devices=None) -> Mesh:
  """The run's mesh: 1-D ('data',) for the replicated layout (the per-device
  program), ('data', 'fsdp', 'model') when config.parallel.mesh shards
  parameters or config.parallel.backend is 'gspmd'."""
  devices = jax.devices() if devices is None else devices
  section = config.get("parallel", None)
  if section is None or "mesh" not in section:  # A config without one.
    return parallel.make_mesh(devices)
  shape = mesh_lib.sizes(section.mesh, len(devices))
  if mesh_lib.is_sharded(shape) or section.backend == "gspmd":
    return mesh_lib.make(section.mesh, devices)
  return parallel.make_mesh(devices)


def is_sharded(mesh: Mesh) -> bool:
  return mesh_lib.is_mesh(mesh)


def rules(config, mesh: Mesh) -> tuple:
  return mesh_lib.rules(config.parallel) if is_sharded(mesh) else ()


def param_shardings(model, data_config, mesh: Mesh, rule_pairs,
                    what: str) -> Any:
  """Shardings of a model's params under the rules, divisibility checked."""
  shardings = mesh_lib.param_shardings(
      params_lib.logical_specs(model, data_config), mesh, rule_pairs)
  mesh_lib.check_divisible(params_lib.abstract(model, data_config),
                           shardings, what)
  return shardings


def scope(config, mesh: Mesh):
  """Mesh and rules in scope on the sharded layout (the models' activation
  constraints apply); nothing on the replicated one."""
  if not is_sharded(mesh):
    return contextlib.nullcontext()
  return mesh_lib.active(mesh, rules(config, mesh))


def load_teacher(config, workdir: str, mesh: Mesh) -> teachers_lib.Teacher:
  """config.teacher (kdjax.weights.teachers), placed on the mesh: read
  straight into its shards on the sharded layout, replicated otherwise."""
  spec = specs.teacher_specs(config, workdir)[0]
  if not is_sharded(mesh):
    return teachers_lib.load(config, spec)
  shardings_of = functools.partial(
      param_shardings, data_config=config.data, mesh=mesh,
      rule_pairs=rules(config, mesh), what="config.teacher.model")
  return teachers_lib.load(config, spec, shardings_of=shardings_of)


def restore_params(config, model, run_dir: str, mesh: Mesh) -> Any:
  """A run's newest parameters, read straight into their shards on the
  sharded layout (host/one device otherwise, as before)."""
  shapes = params_lib.abstract(model, config.data)
  if is_sharded(mesh):
    shardings = param_shardings(model, config.data, mesh,
                                rules(config, mesh), f"{run_dir} model")
    shapes = parallel.abstract_like(shapes, shardings)
  return run_params.restore(run_dir, shapes, config.data)
