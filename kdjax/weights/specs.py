"""Which model a role runs and which teachers a run reads, from the config.

A model spec (name + every model field) identifies a model in checkpoint meta;
a TeacherSpec says where a frozen teacher's weights come from. The model and
teacher config sections are validated here too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from kdjax import models
from kdjax.core.config import ConfigError, fail
from kdjax.data import pipeline
from kdjax.models import lora
from kdjax.runtime import checkpoint

# (init_from prefix, model name) pairs an importer exists for.
IMPORTERS = (("hf_bert", "bert"), ("llama", "llama"))


PRECISIONS = ("float32", "bfloat16")
# Fields of a model spec that are run settings, not the model's identity:
# a teacher trained in float32 loads into a bfloat16 run.
RUN_SETTINGS = ("dtype", "remat")


def precision(config: ml_collections.ConfigDict, role: str) -> dict[str, str]:
  """config.<role>.precision: 'params' (the dtype the weights are held in)
  and 'compute' (of activations and matmul inputs); float32 if absent."""
  section = config[role].get("precision", None)
  section = {} if section is None else dict(section.items())
  return {"params": section.get("params", "float32"),
          "compute": section.get("compute", "float32")}


def _has_field(name: str, field: str) -> bool:
  return field in models.MODELS[name].__dataclass_fields__


def takes_compute_dtype(name: str) -> bool:
  """Models with a compute-dtype field (the rest compute in float32)."""
  return _has_field(name, "dtype")


def model_kwargs(config: ml_collections.ConfigDict, role: str) -> dict[str, Any]:
  """The model fields of `config.<role>.model` with num_classes from the data
  and the compute dtype from config.<role>.precision."""
  kwargs = dict(config[role].model.to_dict())
  name = kwargs.pop("name")
  if not models.is_language_model(name):
    kwargs.setdefault("num_classes", config.data.num_classes)
  if name in models.MODELS and takes_compute_dtype(name):
    kwargs.setdefault("dtype", precision(config, role)["compute"])
  remat = config[role].get("train", {}).get("remat", "")
  if remat and name in models.MODELS and _has_field(name, "remat"):
    kwargs.setdefault("remat", remat)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def lora_settings(config: ml_collections.ConfigDict, role: str
                  ) -> lora.LoraSettings | None:
  """config.<role>.lora as settings (targets () = the model's defaults);
  None when absent or rank 0 (no adapters)."""
  section = config[role].get("lora", None)
  if section is None or not section.get("rank", 0):
    return None
  targets = tuple(section.get("targets", ()))
  return lora.LoraSettings(
      rank=section.rank, alpha=float(section.get("alpha", 16.0)),
      dropout=float(section.get("dropout", 0.0)),
      targets=targets or lora.default_targets(config[role].model.name))


def architecture(spec: dict[str, Any]) -> dict[str, Any]:
  """A model spec without its run settings (precision, remat): what two
  runs of the same model share whatever precision each ran in."""
  return {k: v for k, v in spec.items() if k not in RUN_SETTINGS}


def model_spec(config: ml_collections.ConfigDict, role: str) -> dict[str, Any]:
  """What identifies a model in checkpoint meta: its name and every field
  (and 'lora', the adapters' settings, when it has them)."""
  spec = {"name": config[role].model.name, **model_kwargs(config, role)}
  settings = lora_settings(config, role)
  if settings is not None:
    spec["lora"] = settings.to_dict()
  return spec


def build_model(config: ml_collections.ConfigDict, role: str):
  """The role's model; with config.<role>.lora, with its adapters."""
  model = models.get_model(config[role].model.name,
                           **model_kwargs(config, role))
  settings = lora_settings(config, role)
  return model if settings is None else lora.wrap(model, settings)


def model_from_spec(spec: dict[str, Any]):
  kwargs = dict(spec)
  adapters = kwargs.pop("lora", None)
  model = models.get_model(kwargs.pop("name"), **kwargs)
  return (model if adapters is None
          else lora.wrap(model, lora.LoraSettings.from_dict(adapters)))


def teacher_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.teacher.checkpoint_dir or os.path.join(workdir, "teacher")


def _normalise(spec: dict[str, Any]) -> dict[str, Any]:
  return {k: list(v) if isinstance(v, (tuple, list)) else v
          for k, v in spec.items()}


def _with_defaults(spec: dict[str, Any]) -> dict[str, Any]:
  """A model spec with the model's default for every field it omits."""
  cls = models.MODELS.get(spec.get("name"))
  defaults = {} if cls is None else {
      f.name: f.default for f in dataclasses.fields(cls)
      if f.name not in ("parent", "name")
      and f.default is not dataclasses.MISSING}
  return _normalise({**defaults, **spec})


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """One frozen teacher: its model spec, checkpoint dir and the config field named in errors.

  A pretrained teacher (config.teacher.pretrained) has no checkpoint: its
  weights are imported from `init_from` as they are.
  """
  model: dict[str, Any]
  path: str
  field: str
  init_from: str = ""

  @property
  def pretrained(self) -> bool:
    return bool(self.init_from)


def pretrained_teacher(config: ml_collections.ConfigDict) -> bool:
  """The teacher is imported weights (config.teacher.init_from), never trained."""
  return bool(config.teacher.get("pretrained", False))


def teacher_specs(config: ml_collections.ConfigDict, workdir: str
                  ) -> list[TeacherSpec]:
  """config.teacher, then config.distill.extra_teachers, in that order."""
  specs = [TeacherSpec(model_spec(config, "teacher"),
                       teacher_dir(config, workdir), "teacher",
                       config.teacher.init_from if pretrained_teacher(config)
                       else "")]
  for i, extra in enumerate(config.distill.extra_teachers):
    model = dict(extra["model"])
    model.setdefault("num_classes", config.data.num_classes)
    specs.append(TeacherSpec(
        {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()},
        extra["checkpoint_dir"], f"distill.extra_teachers[{i}]"))
  return specs


def check_checkpoint_model(expected_spec: dict[str, Any], path: str,
                           field: str) -> None:
  """A checkpoint exists at path and was trained with expected_spec."""
  meta = checkpoint.read_meta(path)
  if meta is None:
    fail(f"{field}.checkpoint_dir", path,
         "no teacher checkpoint there; train one with --config.mode=teacher "
         "--workdir=<dir> and pass that dir")
  # Precision is the run's, not the checkpoint's (RUN_SETTINGS); a field
  # added to a model since the checkpoint was written reads as its default.
  expected = architecture(_with_defaults(expected_spec))
  found = architecture(_with_defaults(meta["model"]))
  if found != expected:
    diff = {k: (found.get(k), expected.get(k))
            for k in set(found) | set(expected) if found.get(k) != expected.get(k)}
    raise ConfigError(
        f"The teacher checkpoint in {path!r} does not match config.{field}.model: "
        + ", ".join(f"{k}: checkpoint has {a!r}, config has {b!r}"
                    for k, (a, b) in sorted(diff.items()))
        + f". Set config.{field}.model to the checkpoint's model or point "
        f"config.{field}.checkpoint_dir at a matching teacher.")
  if "num_classes" in expected and meta.get("num_classes") not in (
      None, expected["num_classes"]):  # Language models have no classes.
    raise ConfigError(
        f"The teacher checkpoint in {path!r} has {meta['num_classes']} classes, "
        f"config.data.num_classes is {expected.get('num_classes')}.")


def check_teacher_checkpoint(config: ml_collections.ConfigDict, path: str) -> None:
  """The primary teacher's checkpoint exists and matches config.teacher.model."""
  check_checkpoint_model(model_spec(config, "teacher"), path, "teacher")


def validate_model(config: ml_collections.ConfigDict, role: str) -> None:
  """config.<role>.model builds, agrees with the data, and its init_from has an importer."""
  model_cfg = config[role].model
  if model_cfg.name not in models.MODELS:
    fail(f"{role}.model.name", model_cfg.name,
         f"allowed: {sorted(models.MODELS)}")
  declared = model_cfg.get("num_classes")
  if models.is_language_model(model_cfg.name):
    if not config.data.get("seq_length", 0):
      fail("data.seq_length", config.data.get("seq_length"),
           f"must be > 0 tokens for the language model config.{role}.model")
  elif declared is not None and declared != config.data.num_classes:
    raise ConfigError(
        f"config.{role}.model.num_classes={declared} disagrees with "
        f"config.data.num_classes={config.data.num_classes}; drop the model "
        "field (it defaults to the data's) or make them equal.")
  validate_precision(config, role)
  try:
    models.get_model(model_cfg.name, **model_kwargs(config, role))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.{role}.model: {e}") from e
  validate_lora(config, role)
  init_from = config[role].get("init_from", "")
  kind = init_from.partition(":")[0]
  if init_from and (kind, model_cfg.name) not in IMPORTERS:
    fail(f"{role}.init_from", init_from,
         "'' (random init), 'hf_bert:<HF BERT dir>' ('hf_bert:' = "
         "all-MiniLM-L6-v2) for a 'bert' model, or 'llama:<HF dir or "
         ".gguf>' ('llama:' = SmolLM2-135M-Instruct) for a 'llama' model")
  if config[role].get("pretrained", False) and not init_from:
    fail(f"{role}.pretrained", True, f"needs config.{role}.init_from")


def validate_lora(config: ml_collections.ConfigDict, role: str) -> None:
  """config.<role>.lora: sound settings, on a pretrained base, whose targets
  each match a projection of the model (found by initialising it
  abstractly: nothing is computed)."""
  section = config[role].get("lora", None)
  if section is None:
    return
  rank = section.get("rank", 0)
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    fail(f"{role}.lora.rank", rank, "an int: 0 (no adapters) or the rank")
  if not rank:
    return
  if role != "student":
    fail(f"{role}.lora.rank", rank, "LoRA adapters are for the student")
  if not float(section.get("alpha", 16.0)) > 0:
    fail(f"{role}.lora.alpha", section.get("alpha"),
         "> 0 (the adapters' output is scaled by alpha / rank)")
  if not 0.0 <= float(section.get("dropout", 0.0)) < 1.0:
    fail(f"{role}.lora.dropout", section.get("dropout"), "in [0, 1)")
  targets = section.get("targets", ())
  if isinstance(targets, str) or not all(
      isinstance(t, str) and t.strip("/") for t in targets):
    fail(f"{role}.lora.targets", targets,
         "a tuple of projection names or patterns ('query', "
         "'attention/out', 'mlp/*'), () = the model's defaults")
  name = config[role].model.name
  if not targets and name not in lora.DEFAULT_TARGETS:
    fail(f"{role}.lora.targets", targets,
         f"a {name!r} model has no default targets (defaults exist for "
         f"{sorted(lora.DEFAULT_TARGETS)}); name its projections")
  if not config[role].get("init_from", ""):
    fail(f"{role}.lora.rank", rank,
         f"LoRA adapts a pretrained model: set config.{role}.init_from "
         "(with init_layers to start from some of its layers); on a random "
         "frozen base the adapters would learn on noise (rank 0 trains the "
         "whole model)")
  try:
    jax.eval_shape(lambda: build_model(config, role).init(
        jax.random.key(0), pipeline.dummy_inputs(config.data)))
  except ValueError as e:
    raise ConfigError(f"config.{role}.lora.targets={tuple(targets)!r}: "
                      f"{e}") from e


def validate_precision(config: ml_collections.ConfigDict, role: str) -> None:
  """config.<role>.precision names known dtypes the role can use."""
  wanted = precision(config, role)
  for part in ("params", "compute"):
    if wanted[part] not in PRECISIONS:
      fail(f"{role}.precision.{part}", wanted[part], f"allowed: {PRECISIONS}")
  name = config[role].model.name
  if "dtype" in config[role].model:
    fail(f"{role}.model.dtype", config[role].model.dtype,
         f"precision is a run setting: set config.{role}.precision.compute "
         "instead (a checkpoint loads under any precision)")
  remat = config[role].get("train", {}).get("remat", "")
  if remat and not _has_field(name, "remat"):
    fail(f"{role}.train.remat", remat,
         f"the {name!r} model has no layer rematerialisation ('llama')")
  if wanted["params"] != "float32" and role != "teacher":
    fail(f"{role}.precision.params", wanted["params"],
         "a trained model keeps float32 parameters for its optimizer; "
         "bfloat16 parameters are for the frozen teacher (train in bfloat16 "
         f"with config.{role}.precision.compute)")


def validate_teachers(config: ml_collections.ConfigDict, workdir: str,
                      mode: str, *, from_cache: bool) -> None:
  """The teachers a mode reads exist and match their configured models."""
  if mode == "teacher" and pretrained_teacher(config):
    raise ConfigError(
        "config.teacher.pretrained=True: the teacher is imported from "
        f"config.teacher.init_from={config.teacher.init_from!r}, there is "
        "nothing to train in mode='teacher'.")
  if mode == "distill" and not from_cache:
    for spec in teacher_specs(config, workdir):
      if not spec.pretrained:
        check_checkpoint_model(spec.model, spec.path, spec.field)
  if mode in ("evaluate", "cache_teacher") and not pretrained_teacher(config):
    check_teacher_checkpoint(config, teacher_dir(config, workdir))


def validate_extra_teachers(distill: ml_collections.ConfigDict) -> None:
  for i, extra in enumerate(distill.extra_teachers):
    missing = {"checkpoint_dir", "model"} - set(extra)
    if missing:
      fail(f"distill.extra_teachers[{i}]", dict(extra),
           f"needs fields {sorted(missing)} (and optionally weight)")
