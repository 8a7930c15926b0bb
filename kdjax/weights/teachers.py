"""Frozen teachers: the one loader.

Training, the classification report, the language-model report, the
teacher-cache builder, teacher-written text and the AOT check all get their
teachers here, so each is the same model with the same weights: imported
pretrained weights (config.teacher.pretrained) or a teacher run's newest
checkpoint (never an older step in its place: kdjax.runtime.checkpoint).
"""

from __future__ import annotations

import dataclasses
from typing import Any


from kdjax.runtime import checkpoint
from kdjax.weights import params as params_lib
from kdjax.weights import pretrained
from kdjax.weights import specs


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A teacher's model, its params and where they came from."""
  model: Any
  params: Any  # Host arrays, or ShapeDtypeStructs when loaded abstract.
  source: dict[str, Any]  # Model spec + checkpoint dir/step or init_from.


def load(config, spec: specs.TeacherSpec, *,
         abstract: bool = False) -> Teacher:
  """One teacher (a specs.teacher_specs entry); shapes only if abstract."""
  model = specs.model_from_spec(spec.model)
  shapes = params_lib.abstract(model, config.data)
  if abstract:
    return Teacher(model, shapes, {"model": spec.model})
  if spec.pretrained:
    params = pretrained.load_pretrained(
        shapes, spec.init_from,
        model_fields={k: v for k, v in spec.model.items() if k != "name"},
        layers=tuple(config.teacher.get("init_layers", ())), field=spec.field)
    return Teacher(model, params, {"model": spec.model,
                                   "init_from": spec.init_from})
  specs.check_checkpoint_model(spec.model, spec.path, spec.field)
  step = checkpoint.latest_step(spec.path)
  params = checkpoint.restore_params(spec.path, shapes, step=step)
  return Teacher(model, params, {"model": spec.model,
                                 "checkpoint_dir": spec.path,
                                 "checkpoint_step": step})


def load_all(config, workdir: str, *, abstract: bool = False) -> list[Teacher]:
  """config.teacher, then config.distill.extra_teachers, in that order."""
  return [load(config, spec, abstract=abstract)
          for spec in specs.teacher_specs(config, workdir)]
