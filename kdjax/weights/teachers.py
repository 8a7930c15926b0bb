"""Frozen teachers: the one loader.

Training, the classification report, the language-model report, the
teacher-cache builder, teacher-written text and the AOT check all get their
teachers here, so each is the same model with the same weights: imported
pretrained weights (config.teacher.pretrained) or a teacher run's newest
checkpoint (never an older step in its place: kdjax.runtime.checkpoint).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kdjax.runtime import checkpoint
from kdjax.weights import params as params_lib
from kdjax.weights import pretrained
from kdjax.weights import run_params
from kdjax.weights import specs


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A teacher's model, its params and where they came from."""
  model: Any
  params: Any  # Host arrays, or ShapeDtypeStructs when loaded abstract.
  source: dict[str, Any]  # Model spec + checkpoint dir/step or init_from.


def held_shapes(config, model) -> Any:
  """A teacher's parameter shapes in the dtype config.teacher.precision.params
  holds them in (bfloat16: half the memory; computed per the model's dtype)."""
  dtype = jnp.dtype(specs.precision(config, "teacher")["params"])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype),
                      params_lib.abstract(model, config.data))


def load(config, spec: specs.TeacherSpec, *, abstract: bool = False,
         shardings_of: Callable[[Any], Any] | None = None) -> Teacher:
  """One teacher (a specs.teacher_specs entry); shapes only if abstract.

  Parameters come in config.teacher.precision.params: a float32 checkpoint
  is cast as it is read (Orbax), so no float32 copy is placed.
  `shardings_of(model)` (the sharded layout) gives the NamedSharding of each
  parameter: a checkpoint is read straight into those shards, and so are
  imported Llama weights (each process reads only its own pieces of the
  file: kdjax.weights.pretrained.load_llama_sharded). Unsharded imported
  weights are host numpy arrays.
  """
  model = specs.model_from_spec(spec.model)
  shapes = held_shapes(config, model)
  shardings = shardings_of(model) if shardings_of is not None else None
  if shardings is not None:
    shapes = jax.tree.map(
        lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
        shapes, shardings)
  if abstract:
    return Teacher(model, shapes, {"model": spec.model})
  if spec.pretrained:  # Straight into the shards when sharded.
    params = pretrained.load_pretrained(
        shapes, spec.init_from,
        model_fields={k: v for k, v in spec.model.items() if k != "name"},
        layers=tuple(config.teacher.get("init_layers", ())), field=spec.field,
        shardings=shardings)
    return Teacher(model, params, {"model": spec.model,
                                   "init_from": spec.init_from})
  specs.check_checkpoint_model(spec.model, spec.path, spec.field)
  step = checkpoint.latest_step(spec.path)
  params = run_params.restore(spec.path, shapes, config.data, step=step)
  return Teacher(model, params, {"model": spec.model,
                                 "checkpoint_dir": spec.path,
                                 "checkpoint_step": step})


def load_all(config, workdir: str, *, abstract: bool = False,
             shardings_of: Callable[[Any], Any] | None = None
             ) -> list[Teacher]:
  """config.teacher, then config.distill.extra_teachers, in that order."""
  return [load(config, spec, abstract=abstract, shardings_of=shardings_of)
          for spec in specs.teacher_specs(config, workdir)]
