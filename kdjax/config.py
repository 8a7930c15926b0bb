"""Config validation: every mistake named (field, value, what is allowed) before any compile."""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import uuid
from typing import Any

import jax
import ml_collections

from kdjax.runtime import checkpoint, storage
from kdjax.core import errors
from kdjax import models
from kdjax.distill import objectives, parallel
from kdjax.distill.objectives import HARD_LABEL_SOURCES

MODES = ("teacher", "scratch", "distill", "evaluate", "pipeline", "aot_check",
         "generate_text", "cache_teacher")
ROLES = ("teacher", "student")


class ConfigError(errors.KdjaxError, ValueError):
  """A config field holds a value kdjax cannot run with."""


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}.")


def set_fields(config: ml_collections.ConfigDict, changes: dict[str, Any]
               ) -> ml_collections.ConfigDict:
  """Sets dotted fields in place ({'distill.alpha': 0.3}); new fields allowed."""
  with config.unlocked():
    for dotted, value in changes.items():
      *parents, leaf = dotted.split(".")
      node = config
      for part in parents:
        node = node[part]
      node[leaf] = value
  return config


def model_kwargs(config: ml_collections.ConfigDict, role: str) -> dict[str, Any]:
  """The model fields of `config.<role>.model` with num_classes from the data."""
  kwargs = dict(config[role].model.to_dict())
  name = kwargs.pop("name")
  if not models.is_language_model(name):
    kwargs.setdefault("num_classes", config.data.num_classes)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def model_spec(config: ml_collections.ConfigDict, role: str) -> dict[str, Any]:
  """What identifies a model in checkpoint meta: its name and every field."""
  return {"name": config[role].model.name, **model_kwargs(config, role)}


def build_model(config: ml_collections.ConfigDict, role: str):
  return models.get_model(config[role].model.name, **model_kwargs(config, role))


def teacher_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.teacher.checkpoint_dir or os.path.join(workdir, "teacher")


def _normalise(spec: dict[str, Any]) -> dict[str, Any]:
  return {k: list(v) if isinstance(v, (tuple, list)) else v
          for k, v in spec.items()}


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


def model_from_spec(spec: dict[str, Any]):
  kwargs = dict(spec)
  return models.get_model(kwargs.pop("name"), **kwargs)


def teacher_specs(config: ml_collections.ConfigDict, workdir: str
                  ) -> list[TeacherSpec]:
  """config.teacher, then config.distill.extra_teachers, in that order."""
  specs = [TeacherSpec(model_spec(config, "teacher"),
                       teacher_dir(config, workdir), "teacher",
                       config.teacher.init_from if pretrained_teacher(config)
                       else "")]
  for i, extra in enumerate(config.distill.get("extra_teachers", ())):
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
    _fail(f"{field}.checkpoint_dir", path,
          "no teacher checkpoint there; train one with --config.mode=teacher "
          "--workdir=<dir> and pass that dir")
  expected = _normalise(expected_spec)
  found = _normalise(meta["model"])
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


def _check_model(config, role: str) -> None:
  model_cfg = config[role].model
  if model_cfg.name not in models.MODELS:
    _fail(f"{role}.model.name", model_cfg.name,
          f"allowed: {sorted(models.MODELS)}")
  declared = model_cfg.get("num_classes")
  if models.is_language_model(model_cfg.name):
    if not config.data.get("seq_length", 0):
      _fail("data.seq_length", config.data.get("seq_length"),
            f"must be > 0 tokens for the language model config.{role}.model")
  elif declared is not None and declared != config.data.num_classes:
    raise ConfigError(
        f"config.{role}.model.num_classes={declared} disagrees with "
        f"config.data.num_classes={config.data.num_classes}; drop the model "
        "field (it defaults to the data's) or make them equal.")
  try:
    build_model(config, role)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.{role}.model: {e}") from e
  init_from = config[role].get("init_from", "")
  kind = init_from.partition(":")[0]
  if init_from and (kind, model_cfg.name) not in (("hf_bert", "bert"),
                                                  ("llama", "llama")):
    _fail(f"{role}.init_from", init_from,
          "'' (random init), 'hf_bert:<HF BERT dir>' ('hf_bert:' = "
          "all-MiniLM-L6-v2) for a 'bert' model, or 'llama:<HF dir or "
          ".gguf>' ('llama:' = SmolLM2-135M-Instruct) for a 'llama' model")
  if config[role].get("pretrained", False) and not init_from:
    _fail(f"{role}.pretrained", True, f"needs config.{role}.init_from")


def _check_train(config, role: str, devices: int | None = None) -> None:
  train = config[role].train
  devices = devices or jax.device_count()
  per_step = devices * train.grad_accum_steps
  if train.batch_size <= 0 or train.batch_size % per_step:
    _fail(f"{role}.train.batch_size", train.batch_size,
          f"must be a positive multiple of device count ({devices}) x "
          f"grad_accum_steps ({train.grad_accum_steps}) = {per_step}")
  if train.learning_rate <= 0:
    _fail(f"{role}.train.learning_rate", train.learning_rate, "must be > 0")
  if train.num_epochs <= 0 and train.get("num_steps", 0) <= 0:
    _fail(f"{role}.train.num_epochs", train.num_epochs,
          "must be > 0 (or set num_steps > 0)")
  from kdjax.distill import optim  # pylint: disable=g-import-not-at-top
  if train.optimizer not in optim.OPTIMIZERS:
    _fail(f"{role}.train.optimizer", train.optimizer,
          f"allowed: {sorted(optim.OPTIMIZERS)}")
  if train.schedule not in optim.SCHEDULES:
    _fail(f"{role}.train.schedule", train.schedule,
          f"allowed: {sorted(optim.SCHEDULES)}")


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError naming the first bad field. Runs before any compile."""
  if config.mode not in MODES:
    _fail("mode", config.mode, f"allowed: {MODES}")
  if config.parallel.backend not in parallel.BACKENDS:
    _fail("parallel.backend", config.parallel.backend,
          f"allowed: {parallel.BACKENDS}")
  if (config.data.num_classes <= 1
      and not models.is_language_model(config.student.model.name)):
    _fail("data.num_classes", config.data.num_classes, "must be >= 2")
  if config.data.get("tokenizer_dir", ""):
    if not os.path.exists(os.path.join(config.data.tokenizer_dir,
                                       "tokenizer.json")):
      _fail("data.tokenizer_dir", config.data.tokenizer_dir,
            "must be a directory with a tokenizer.json ('' for non-text data)")
    if config.data.get("max_length", 0) <= 0:
      _fail("data.max_length", config.data.get("max_length"),
            "must be > 0 tokens for text data")
  if not 0.0 < config.data.train_fraction <= 1.0:
    _fail("data.train_fraction", config.data.train_fraction, "must be in (0, 1]")
  d = config.distill
  if not 0.0 <= d.alpha <= 1.0:
    _fail("distill.alpha", d.alpha, "must be in [0, 1]")
  if d.temperature <= 0:
    _fail("distill.temperature", d.temperature, "must be > 0")
  if d.hard_labels not in HARD_LABEL_SOURCES:
    _fail("distill.hard_labels", d.hard_labels, f"allowed: {HARD_LABEL_SOURCES}")
  if config.checkpoint.every_steps <= 0 or config.checkpoint.keep <= 0:
    _fail("checkpoint", dict(config.checkpoint), "every_steps and keep must be > 0")

  models_used = ("teacher",) if config.mode in (
      "teacher", "generate_text", "cache_teacher") else (
      "student",) if config.mode == "scratch" else ("teacher", "student")
  trained = {"teacher": ("teacher",), "scratch": ("student",),
             "distill": ("student",), "evaluate": (),
             "pipeline": ("teacher", "student"), "aot_check": (),
             "generate_text": (), "cache_teacher": ()}[config.mode]
  for role in models_used:
    _check_model(config, role)
  for role in trained:
    _check_train(config, role)
  if config.mode == "pipeline":
    if not config.pipeline.seeds:
      _fail("pipeline.seeds", config.pipeline.seeds, "needs at least one seed")
    for i, variant in enumerate(config.pipeline.get("variants", ())):
      if variant.get("mode", "distill") not in ("scratch", "distill"):
        _fail(f"pipeline.variants[{i}].mode", variant.get("mode"),
              "allowed: ('scratch', 'distill')")
    if not 0.0 <= config.pipeline.small_data_fraction < 1.0:
      _fail("pipeline.small_data_fraction", config.pipeline.small_data_fraction,
            "must be in [0, 1) (0 disables the small-data runs)")
  try:
    objectives.validate_distill(config.distill)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  for i, extra in enumerate(config.distill.get("extra_teachers", ())):
    missing = {"checkpoint_dir", "model"} - set(extra)
    if missing:
      _fail(f"distill.extra_teachers[{i}]", dict(extra),
            f"needs fields {sorted(missing)} (and optionally weight)")
  from kdjax import teacher_cache  # pylint: disable=g-import-not-at-top
  teacher_cache.validate(config)  # config.cache, distill.teacher_cache.
  if config.mode == "distill" and not teacher_cache.enabled(config):
    for spec in teacher_specs(config, workdir):
      if not spec.pretrained:
        check_checkpoint_model(spec.model, spec.path, spec.field)
  if config.mode in ("evaluate", "cache_teacher") and not pretrained_teacher(
      config):
    check_teacher_checkpoint(config, teacher_dir(config, workdir))
  _check_distributed(config)
  if config.mode == "aot_check":
    _check_aot(config)
  else:
    check_workdir(workdir)


class WorkdirError(ConfigError):
  """The workdir cannot be created or written."""


def check_workdir(workdir: str) -> None:
  """Creates the workdir and writes a probe file: fails now, not at the first save."""
  if storage.is_remote(workdir):
    _check_remote_workdir(workdir)
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise WorkdirError(
        f"--workdir={workdir!r} cannot be written ({type(e).__name__}: "
        f"{e.strerror or e}). Pass a directory you can write, e.g. "
        "--workdir=$HOME/kdjax_runs/<name>.") from None


def _check_remote_workdir(workdir: str) -> None:
  """gs://BUCKET/PATH only; creates and removes a probe object in it."""
  scheme, rest = workdir.split("://", 1)
  if scheme != "gs":
    raise WorkdirError(
        f"--workdir={workdir!r}: {scheme}:// is not supported; use a local "
        "directory or a Cloud Storage path gs://BUCKET/PATH.")
  bucket = rest.split("/", 1)[0]
  if not bucket or not rest[len(bucket):].strip("/"):
    raise WorkdirError(
        f"--workdir={workdir!r}: give a bucket and a path in it, e.g. "
        "--workdir=gs://BUCKET/kdjax/<name>.")
  # Unique per process: on several hosts each checks its own credentials.
  probe = storage.join(workdir, f".kdjax-write-probe-{socket.gethostname()}-"
                       f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    storage.write_text(probe, "")
    storage.remove(probe)
  except ImportError as e:  # epath without gcsfs (or tensorflow) for gs://.
    raise WorkdirError(
        f"--workdir={workdir!r}: reading and writing gs:// needs gcsfs, which "
        f"is not installed ({e}). Install kdjax with its GCS extra: "
        "pip install -e '.[gcs]' (or pip install gcsfs).") from None
  except Exception as e:  # pylint: disable=broad-except
    raise WorkdirError(
        f"--workdir={workdir!r} cannot be written: writing and deleting {probe} "
        f"failed ({type(e).__name__}: {str(e)[:300]}). Check that bucket "
        f"gs://{bucket} exists and that this machine's credentials may "
        "create and delete objects in it (on a TPU VM: its service account "
        "needs e.g. roles/storage.objectUser on the bucket), or pass another "
        "--workdir.") from None


def _check_distributed(config) -> None:
  if jax.process_count() > 1 and config.parallel.backend == "pmap":
    _fail("parallel.backend", config.parallel.backend,
          f"pmap maps over one host's devices; with {jax.process_count()} "
          "processes use 'shard_map'")
  dist = config.get("distributed")
  if dist is None:
    return
  if dist.initialization_timeout <= 0:
    _fail("distributed.initialization_timeout", dist.initialization_timeout,
          "must be > 0 seconds")
  if dist.num_processes < 0:
    _fail("distributed.num_processes", dist.num_processes,
          "must be >= 0 (0 = from the environment or auto)")
  if dist.num_processes and not -1 <= dist.process_id < dist.num_processes:
    _fail("distributed.process_id", dist.process_id,
          f"must be in [0, num_processes={dist.num_processes})")


def aot_steps(config) -> list[str]:
  """The training steps mode=aot_check compiles, from config.aot.steps."""
  spec = str(config.aot.steps).strip()
  if spec == "auto":
    return (["distill"] if config.teacher.checkpoint_dir
            else ["teacher", "distill"])
  steps = [s.strip() for s in spec.split(",") if s.strip()]
  allowed = ("teacher", "scratch", "distill")
  if not steps or any(s not in allowed for s in steps):
    _fail("aot.steps", config.aot.steps,
          f"'auto' or a comma list of {allowed}")
  return steps


def _check_aot(config) -> None:
  from kdjax import aot  # pylint: disable=g-import-not-at-top
  if "aot" not in config or not config.aot.topology:
    _fail("aot.topology", config.get("aot", {}).get("topology", ""),
          "mode=aot_check needs a Cloud TPU topology, e.g. "
          "--config.aot.topology=v5e:2x2 (v5e:2x4, v4:2x2x1, v5p:2x2x1, ...)")
  try:
    topology = aot.parse_topology(config.aot.topology)
  except ValueError as e:
    _fail("aot.topology", config.aot.topology, str(e))
  if config.aot.hbm_limit_gib < 0:
    _fail("aot.hbm_limit_gib", config.aot.hbm_limit_gib,
          "must be >= 0 (0 = the chip's HBM)")
  roles = {"teacher" if s == "teacher" else "student" for s in aot_steps(config)}
  for role in sorted(roles):  # Models were checked above; batch vs the topology.
    _check_train(config, role, devices=topology.devices)
