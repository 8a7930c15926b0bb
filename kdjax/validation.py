"""The top-level config check: every mistake named (field, value, what is
allowed) before any compile.

Each feature owns the check of its own config section; this module only
decides which sections a mode uses and calls their validators in order.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from kdjax import aot
from kdjax.core import defaults
from kdjax.core.config import ConfigError, fail
from kdjax.data import pipeline, prompts
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.distill import objectives, on_policy, optim, parallel
from kdjax.distill import mesh as mesh_lib
from kdjax.distill import teacher_cache
from kdjax.run import export, seqkd
from kdjax.models import is_language_model
from kdjax.runtime import checkpoint, distributed, workdir as workdir_lib
from kdjax.weights import pretrained, specs

MODES = ("teacher", "scratch", "distill", "evaluate", "pipeline", "aot_check",
         "generate_text", "cache_teacher", "export")
# The models each mode builds, and those it trains.
MODELS_USED = {"teacher": ("teacher",), "generate_text": ("teacher",),
               "cache_teacher": ("teacher",), "scratch": ("student",),
               "export": ("student",)}
TRAINED = {"teacher": ("teacher",), "scratch": ("student",),
           "distill": ("student",), "pipeline": ("teacher", "student")}


def validate_pipeline(pipeline_config: ml_collections.ConfigDict) -> None:
  """config.pipeline: seeds, variant modes, the small-data fraction."""
  if not pipeline_config.seeds:
    fail("pipeline.seeds", pipeline_config.seeds, "needs at least one seed")
  for i, variant in enumerate(pipeline_config.get("variants", ())):
    if variant.get("mode", "distill") not in ("scratch", "distill"):
      fail(f"pipeline.variants[{i}].mode", variant.get("mode"),
           "allowed: ('scratch', 'distill')")
  if not 0.0 <= pipeline_config.small_data_fraction < 1.0:
    fail("pipeline.small_data_fraction", pipeline_config.small_data_fraction,
         "must be in [0, 1) (0 disables the small-data runs)")


def _batch_shards(config) -> tuple[int, str]:
  """How many pieces a batch is split into: every device, or on a sharded
  mesh the axes the 'batch' rule names (data x fsdp by default)."""
  devices = jax.device_count()
  if config.mode == "aot_check":
    return devices, "device count"
  shape = mesh_lib.sizes(config.parallel.mesh, devices)
  if not (mesh_lib.is_sharded(shape) or config.parallel.backend == "gspmd"):
    return devices, "device count"
  axes = dict(mesh_lib.rules(config.parallel)).get("batch", ())
  axes = axes if isinstance(axes, tuple) else (axes,)
  axes = tuple(a for a in axes if a is not None)
  return (math.prod(shape[a] for a in axes),
          " x ".join(f"{a}={shape[a]}" for a in axes) or "no batch axis")


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError naming the first bad field. Runs before any compile."""
  missing = defaults.missing_fields(config)
  if missing:
    raise ConfigError(
        f"The config lacks field(s) {', '.join(missing)}. Build it on "
        "kdjax.core.defaults.get_config() (as configs/*.py do), where every "
        "field is documented, and change what differs.")
  if config.mode not in MODES:
    fail("mode", config.mode, f"allowed: {MODES}")
  # aot_check sizes the mesh against its topology (kdjax.aot.validate).
  parallel.validate(config.parallel,
                    None if config.mode == "aot_check" else jax.device_count(),
                    jax.process_count())
  pipeline.validate(config.data, language_model=is_language_model(
      config.student.model.name))
  objectives.validate_distill(config.distill)
  checkpoint.validate(config.checkpoint)
  for role in MODELS_USED.get(config.mode, ("teacher", "student")):
    specs.validate_model(config, role)
  batch_shards, split_over = _batch_shards(config)
  for role in TRAINED.get(config.mode, ()):
    optim.validate(config[role].train, f"{role}.train", batch_shards,
                   split_over)
    validate_trainable_only(config, role)
  if config.mode == "pipeline":
    validate_pipeline(config.pipeline)
  specs.validate_extra_teachers(config.distill)
  teacher_cache.validate(config.cache, config.distill, mode=config.mode,
                         student_augment=config.student.train.augment,
                         language_model=pipeline.is_language_modelling(
                             config.data))
  specs.validate_teachers(
      config, workdir, config.mode,
      from_cache=teacher_cache.enabled(config.distill))
  if config.mode == "generate_text" or (
      config.mode == "pipeline" and config.pipeline.get("generate_text")):
    seqkd.validate(config.seqkd, config.data, workdir)
  distributed.validate(config.get("distributed"))
  if config.data.get("format", "") == "prompts":
    validate_prompts(config)
  if config.mode == "export":
    export.validate(config)
  if config.mode == "aot_check":
    aot.validate(config)
  else:
    workdir_lib.check_workdir(workdir)


def validate_trainable_only(config: ml_collections.ConfigDict,
                            role: str) -> None:
  """checkpoint.trainable_only needs frozen leaves to leave out."""
  if not config.checkpoint.get("trainable_only", False):
    return
  lora_rank = int(config[role].get("lora", {}).get("rank", 0) or 0)
  if not config[role].train.get("trainable", ()) and not lora_rank:
    fail("checkpoint.trainable_only", True,
         f"a {role} run with every leaf trained has nothing to leave out: "
         f"set config.{role}.train.trainable or config.{role}.lora.rank, "
         "or leave it False")


def validate_prompts(config: ml_collections.ConfigDict) -> None:
  """Prompt/completion data and, for distillation, on-policy settings: the
  lengths fit the models and teacher and student read the same tokens."""
  prompts.validate(config.data)
  if config.mode not in ("distill", "pipeline"):
    return
  on_policy.validate(config)
  settings = config.distill.on_policy
  if int(settings.max_new_tokens) > int(config.data.max_completion_length):
    fail("distill.on_policy.max_new_tokens", settings.max_new_tokens,
         f"<= data.max_completion_length="
         f"{config.data.max_completion_length} (rollouts train in the "
         "data's sequence length)")
  need = int(config.data.max_prompt_length) + int(settings.max_new_tokens)
  for role in ("teacher", "student"):
    if int(config[role].model.get("max_length", need)) < need:
      fail(f"{role}.model.max_length", config[role].model.max_length,
           f">= max_prompt_length + max_new_tokens = {need}")
  tokenizer = tokenizer_lib.load(prompts.tokenizer_path(config.data))
  ids = tokenizer.get_vocab_size()
  student_vocab = int(config.student.model.vocab_size)
  teacher_vocab = int(config.teacher.model.vocab_size)
  if student_vocab < ids:
    fail("student.model.vocab_size", student_vocab,
         f">= the tokenizer's {ids} ids")
  if teacher_vocab < student_vocab:
    fail("teacher.model.vocab_size", teacher_vocab,
         f">= the student's {student_vocab} (extra teacher rows are "
         "padding, masked out)")
  teacher_tokenizer = pretrained.teacher_tokenizer_path(config)
  if teacher_tokenizer:
    theirs = prompts.tokenizer_hash(tokenizer_lib.load(teacher_tokenizer))
    if theirs != prompts.tokenizer_hash(tokenizer):
      raise ConfigError(
          f"The teacher's tokenizer ({teacher_tokenizer}) is not the data's "
          f"(data.tokenizer_path={config.data.tokenizer_path!r}): on-policy "
          "distillation compares the two models' distributions token by "
          "token, so they must share one tokenizer.")

