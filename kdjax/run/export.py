"""mode=export: a finished run's student, out of kdjax in a format people serve.

Reads the run in WORKDIR (its newest checkpoint, or config.export.step)
and writes config.export.format under config.export.dir (default
WORKDIR/export/<format>):
  hf     a transformers LlamaForCausalLM directory (kdjax/weights/exporters/
         hf_llama.py), dtype config.export.dtype;
  gguf   one GGUF file for llama.cpp (gguf_llama.py), config.export.gguf_type
         f32 | f16 | q8_0.
Both carry a manifest (kdjax/weights/exporters/manifest.py): the source run,
its step, teacher, objective and eval metrics from its run.json, so a served
model can be traced to how it was made.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from kdjax.core.config import fail
from kdjax.data import prompts
from kdjax.run import tasks
from kdjax.runtime import checkpoint, storage
from kdjax.weights import params as params_lib
from kdjax.weights import specs
from kdjax.weights.exporters import gguf_llama, hf_llama, manifest

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0")
RUN_FILE = "run.json"


def validate(config) -> None:
  """config.export: a known format for a model it can write."""
  export = config.export
  if export.format not in FORMATS:
    fail("export.format", export.format, f"allowed: {FORMATS}")
  if export.format == "gguf" and export.gguf_type not in GGUF_TYPES:
    fail("export.gguf_type", export.gguf_type, f"allowed: {GGUF_TYPES}")
  if export.dtype not in ("float32", "bfloat16", "float16"):
    fail("export.dtype", export.dtype, "float32 | bfloat16 | float16")
  if config.student.model.name != "llama":
    fail("student.model.name", config.student.model.name,
         "HF and GGUF export write Llama students ('llama')")
  if int(export.step) < 0:
    fail("export.step", export.step, ">= 0 (0 = the newest checkpoint)")


def _tokenizer_path(config) -> str:
  if tasks.is_prompts(config.data):
    return prompts.tokenizer_path(config.data)
  return str(config.data.tokenizer_path)


def _run_summary(workdir: str) -> dict[str, Any]:
  return storage.read_json(os.path.join(workdir, RUN_FILE), default={}) or {}


def export(config, workdir: str) -> dict[str, Any]:
  """Writes the run's student as config.export says; returns a summary."""
  export_cfg = config.export
  model = specs.build_model(config, "student")
  step = int(export_cfg.step) or None
  params = checkpoint.restore_params(
      workdir, params_lib.abstract(model, config.data), step=step)
  summary = _run_summary(workdir)
  teacher = (config.teacher.get("init_from", "")
             or config.teacher.get("checkpoint_dir", ""))
  fmt = (f"hf:{export_cfg.dtype}" if export_cfg.format == "hf"
         else f"gguf:{export_cfg.gguf_type}")
  made_by = manifest.build_manifest(
      source_run=workdir, step=int(summary.get("steps", step or 0)),
      teacher=teacher, objective=summary.get("objective", ""),
      eval_metrics=summary.get("eval", {}), fmt=fmt)
  fields = specs.model_kwargs(config, "student")
  target = export_cfg.dir or os.path.join(workdir, "export",
                                          export_cfg.format)
  if export_cfg.format == "hf":
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
