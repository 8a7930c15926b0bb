"""mode=export: a finished run's student, out of kdjax in a format people serve.

Reads the run in WORKDIR (its newest checkpoint, or config.export.step)
and writes config.export.format under config.export.dir (default
WORKDIR/export/<format>):
  hf     a transformers LlamaForCausalLM directory (kdjax/weights/exporters/
         hf_llama.py) or, for a BERT student, BertModel weights + its head
         in a file of its own (hf_bert.py), dtype config.export.dtype;
  gguf   one GGUF file for llama.cpp (gguf_llama.py), config.export.gguf_type
         f32 | f16 | q8_0;
  stablehlo  any student as a jax.export function with its weights inside,
         a symbolic batch, lowered for config.export.platforms, with its
         input signature and tokenizer (exporters/stablehlo.py); served by
         `python -m kdjax.serve DIR` without kdjax's training code;
  peft   a LoRA Llama student's adapters in PEFT's format, with the frozen
         base beside them as a HF directory (exporters/peft_llama.py).
A LoRA student's adapters are merged into its kernels for hf and gguf
(kdjax/models/lora.py merge); stablehlo traces the adapted model as it is.
All carry a manifest (kdjax/weights/exporters/manifest.py): the source run,
its step, teacher, objective and eval metrics from its run.json, so a served
model can be traced to how it was made.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from kdjax.core.config import fail
from kdjax.data import builders, pipeline, prompts
from kdjax.data import text as text_data
from kdjax.models import lora
from kdjax.run import tasks
from kdjax.runtime import checkpoint, storage
from kdjax.weights import params as params_lib
from kdjax.weights import run_params
from kdjax.weights import specs
from kdjax.weights.exporters import gguf_llama, hf_bert, hf_llama, manifest
from kdjax.weights.exporters import peft_llama
from kdjax.weights.exporters import stablehlo

FORMATS = ("hf", "gguf", "stablehlo", "peft")
GGUF_TYPES = ("f32", "f16", "q8_0")
RUN_FILE = "run.json"
# Class names of the shipped datasets (config.export.label_names overrides).
LABEL_NAMES = {
    "fashion_mnist_idx": builders.FASHION_MNIST_CLASSES,
    "sklearn_digits": tuple(str(d) for d in range(10)),
    "rotten_tomatoes": text_data.RT_CLASSES,
}


def validate(config) -> None:
  """config.export: a known format for a model it can write."""
  export = config.export
  if export.format not in FORMATS:
    fail("export.format", export.format, f"allowed: {FORMATS}")
  if export.format == "gguf" and export.gguf_type not in GGUF_TYPES:
    fail("export.gguf_type", export.gguf_type, f"allowed: {GGUF_TYPES}")
  if export.dtype not in ("float32", "bfloat16", "float16"):
    fail("export.dtype", export.dtype, "float32 | bfloat16 | float16")
  writes = {"hf": ("llama", "bert"), "gguf": ("llama",),
            "peft": ("llama",)}.get(export.format)
  if writes and config.student.model.name not in writes:
    fail("student.model.name", config.student.model.name,
         f"export.format='{export.format}' writes {writes} students; "
         "export.format='stablehlo' writes any student")
  if int(export.step) < 0:
    fail("export.step", export.step, ">= 0 (0 = the newest checkpoint)")
  if export.format == "peft":
    if specs.lora_settings(config, "student") is None:
      fail("student.lora.rank", config.student.lora.rank,
           "export.format='peft' writes LoRA adapters: a student with rank > 0")
    if tuple(config.student.train.get("trainable", ())):
      fail("student.train.trainable", config.student.train.trainable,
           "PEFT's format holds adapters only; export this student as "
           "'hf' (adapters merged) instead")
  if export.format == "stablehlo":
    try:
      stablehlo.check_platforms(export.platforms)
    except stablehlo.ExportError:
      fail("export.platforms", export.platforms,
           f"distinct names from {stablehlo.PLATFORMS}, at least one")
    names = tuple(export.label_names)
    if names and (pipeline.is_language_modelling(config.data)
                  or len(names) != int(config.data.num_classes)):
      fail("export.label_names", names,
           "one name per class (data.num_classes), or () for a language "
           "model or unknown names")


def _tokenizer_path(config) -> str:
  """The run's tokenizer ('' for a model without text input)."""
  if tasks.is_prompts(config.data):
    return prompts.tokenizer_path(config.data)
  if pipeline.is_language_modelling(config.data):
    return str(config.data.tokenizer_path)
  return str(config.data.get("tokenizer_dir", ""))


def _label_names(config) -> tuple[str, ...]:
  """config.export.label_names, else the shipped dataset's, else none."""
  if config.export.label_names:
    return tuple(str(n) for n in config.export.label_names)
  if pipeline.is_language_modelling(config.data):
    return ()
  names = LABEL_NAMES.get(config.data.name, ())
  return tuple(names) if len(names) == int(config.data.num_classes) else ()


def _run_summary(workdir: str) -> dict[str, Any]:
  return storage.read_json(os.path.join(workdir, RUN_FILE), default={}) or {}


def _teacher_of(run_meta: dict[str, Any] | None, workdir: str) -> str:
  """The teacher the run was distilled from, as the run resolved it ('' for
  a run without one): imported weights, or the teacher run's directory
  (checkpoint_dir '' meant WORKDIR/teacher)."""
  if not run_meta or run_meta.get("role") != "distill":
    return ""
  recorded = run_meta.get("config", {})
  if recorded.get("teacher.pretrained"):
    return str(recorded.get("teacher.init_from", ""))
  return str(recorded.get("teacher.checkpoint_dir", "")
             or os.path.join(workdir, "teacher"))


def export(config, workdir: str) -> dict[str, Any]:
  """Writes the run's student as config.export says; returns a summary."""
  export_cfg = config.export
  model = specs.build_model(config, "student")
  step = int(export_cfg.step) or checkpoint.latest_step(workdir)
  params = run_params.restore(
      workdir, params_lib.abstract(model, config.data), config.data, step=step)
  summary = _run_summary(workdir)
  # run.json's eval is the final step's: it describes an earlier step's
  # weights not at all.
  eval_metrics = (summary.get("eval", {})
                  if summary.get("steps") == step else {})
  teacher = _teacher_of(checkpoint.read_meta(workdir, step), workdir)
  fmt = {"hf": f"hf:{export_cfg.dtype}",
         "gguf": f"gguf:{export_cfg.gguf_type}",
         "stablehlo": "stablehlo", "peft": "peft"}[export_cfg.format]
  made_by = manifest.build_manifest(
      source_run=workdir, step=int(step or 0),
      teacher=teacher, objective=summary.get("objective", ""),
      eval_metrics=eval_metrics, fmt=fmt)
  fields = specs.model_kwargs(config, "student")
  target = export_cfg.dir or os.path.join(workdir, "export",
                                          export_cfg.format)
  adapters = specs.lora_settings(config, "student")
  if export_cfg.format == "peft":
    written = _export_peft(target, params, fields, adapters, made_by, config)
    logging.info("Exported %s to %s", fmt, target)
    return {"format": fmt, "path": target, "manifest": made_by,
            "written": written}
  if adapters is not None and export_cfg.format != "stablehlo":
    params = lora.merge(params, adapters)  # W + (alpha / r) A B per kernel.
  if export_cfg.format == "stablehlo":
    written = stablehlo.export_stablehlo(
        target, model, params, config.data,
        tokenizer_path=_tokenizer_path(config),
        label_names=_label_names(config), manifest=made_by,
        model_spec=specs.model_spec(config, "student"),
        platforms=tuple(export_cfg.platforms), overwrite=True)
  elif export_cfg.format == "hf" and config.student.model.name == "bert":
    written = hf_bert.export_hf_bert(
        target, params, fields, tokenizer_path=_tokenizer_path(config),
        dtype=export_cfg.dtype, manifest=made_by, overwrite=True)
  elif export_cfg.format == "hf":
    written = hf_llama.export_hf(
        target, params, fields, tokenizer_path=_tokenizer_path(config),
        dtype=export_cfg.dtype, manifest=made_by, overwrite=True)
  else:
    target = os.path.join(target, f"model-{export_cfg.gguf_type}.gguf")
    written = gguf_llama.export_gguf(
        target, params, fields, tokenizer_path=_tokenizer_path(config),
        file_type=export_cfg.gguf_type, manifest=made_by, overwrite=True)
  logging.info("Exported %s to %s", fmt, target)
  return {"format": fmt, "path": target, "manifest": made_by,
          "written": written}


def _export_peft(target, params, fields, adapters, made_by, config):
  """PEFT's adapter directory in TARGET and, in TARGET/base, the frozen
  base it goes on (a HF directory: the student's own imported layers, which
  need not be any published model's), named as base_model_name_or_path."""
  _, base = lora.split(params)
  base_dir = os.path.join(target, "base")
  hf_llama.export_hf(base_dir, base, fields,
                     tokenizer_path=_tokenizer_path(config),
                     dtype=config.export.dtype, manifest=made_by,
                     overwrite=True)
  written = peft_llama.export_peft(
      target, params, fields, adapters,
      base_model_name_or_path=os.path.abspath(base_dir), manifest=made_by,
      overwrite=True)
  return dict(written, base=base_dir)
