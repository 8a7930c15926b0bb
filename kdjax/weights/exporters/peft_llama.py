"""A Llama student's LoRA adapters -> a PEFT adapter directory.

What `peft.PeftModel.from_pretrained(LlamaForCausalLM, <dir>)` loads:

  adapter_config.json          LoraConfig: peft_type LORA, task_type
                               CAUSAL_LM, r, lora_alpha (scale alpha / r, as
                               kdjax's), lora_dropout, target_modules,
                               base_model_name_or_path
  adapter_model.safetensors    per adapted projection, under PEFT's names:
                               base_model.model.<HF module>.lora_A.weight
                               [r, in] and .lora_B.weight [out, r], so that
                               W_hf + scale * lora_B @ lora_A is the merged
                               HF weight [out, in]
  kdjax_manifest.json          where the adapters came from, when given

HF module names and the [out, in] layouts are the importer's
(kdjax.weights.importers.llama.layout), as hf_llama writes the base: the
attention's head axes flatten as (head, head_dim), row-major, in both.
Only the adapters are written: the base is the HF directory the student
was imported from (init_from, every layer in order), or hf_llama's export
of the student's base params (`lora.split(params)[1]`) when it took some
of its layers (init_layers) or was trained besides the adapters. Anything
else a run trained (config.student.train.trainable) is not an adapter:
export merged weights (hf_llama.export_hf of `lora.merge(params, ...)`)
for such a student.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from kdjax.models import lora
from kdjax.weights.exporters import hf_llama
from kdjax.weights.exporters import manifest as manifest_lib
from kdjax.weights.importers import llama as llama_import

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> LlamaForCausalLM.
ExportError = hf_llama.ExportError


def _module(hf_weight_name: str) -> str:
  """'model.layers.0.self_attn.q_proj.weight' -> '...self_attn.q_proj'."""
  return hf_weight_name.removesuffix(".weight")


def to_peft_state_dict(params: Any, fields: Any) -> dict[str, np.ndarray]:
  """The adapters of Llama params (any layout hf_llama.host_params takes)
  as PEFT tensors (float32): lora_A [r, in], lora_B [out, r] per module,
  in the importer's order. Fails if there are none."""
  fields = hf_llama.llama_fields(fields)
  adapters, _ = lora.split(hf_llama.host_params(params))
  modules = lora.adapted_kernels(adapters)
  if not modules:
    raise ExportError("The params hold no LoRA adapters (lora_a/lora_b).")
  entries = {e.path[:-1]: e for e in llama_import.layout(fields)
             if e.path[-1] == "kernel"}
  unknown = ["/".join(m) for m in modules if m not in entries]
  if unknown:
    raise ExportError(f"Adapters on {unknown[:4]}: not projections of a "
                      f"Llama with these fields (num_layers="
                      f"{fields['num_layers']}).")
  out = {}
  for path, entry in entries.items():
    if path not in modules:
      continue
    node = adapters
    for part in path:
      node = node[part]
    a = np.asarray(node[lora.A], np.float32)
    b = np.asarray(node[lora.B], np.float32)
    rank = a.shape[-1]
    lora_a = np.ascontiguousarray(a.reshape(-1, rank).T)  # [r, in]
    lora_b = np.ascontiguousarray(b.reshape(rank, -1).T)  # [out, r]
    hf_out, hf_in = entry.hf_shape
    if lora_a.shape != (rank, hf_in) or lora_b.shape != (hf_out, rank):
      raise ExportError(f"{'/'.join(path)}: adapters {a.shape} x {b.shape} "
                        f"do not fit {entry.name} {entry.hf_shape}.")
    name = PREFIX + _module(entry.name)
    out[name + ".lora_A.weight"] = lora_a
    out[name + ".lora_B.weight"] = lora_b
  return out


def target_modules(state_dict: Mapping[str, np.ndarray],
                   num_layers: int) -> list[str] | str:
  """PEFT's target_modules for exactly the modules in `state_dict`: their
  names ('q_proj', ...) when every one of the model's `num_layers` layers
  has the same ones (PEFT adapts a name in every layer), else a regex of
  the full module names (PEFT full-matches a string)."""
  modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0]
                    for k in state_dict})
  layers: dict[str, set[str]] = {}
  for m in modules:
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", m)
    if match is None:
      return "|".join(re.escape(x) for x in modules)
    layers.setdefault(match.group(1), set()).add(match.group(2))
  kinds = list(layers.values())
  all_layers = {str(i) for i in range(num_layers)} == set(layers)
  names = {k.rsplit(".", 1)[-1] for k in kinds[0]}
  if all_layers and all(k == kinds[0] for k in kinds) and len(names) == len(
      kinds[0]):
    return sorted(names)
  return "|".join(re.escape(x) for x in modules)


def adapter_config(settings: lora.LoraSettings,
                   targets: list[str] | str, *,
                   base_model_name_or_path: str = "") -> dict[str, Any]:
  """adapter_config.json: a LoraConfig with kdjax's scale alpha / r."""
  alpha = float(settings.alpha)
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path or None,
      "revision": None,
      "r": int(settings.rank),
      "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
      "lora_dropout": float(settings.dropout),
      "target_modules": targets,
      "bias": "none",
      "fan_in_fan_out": False,
      "inference_mode": True,
      "init_lora_weights": True,
      "modules_to_save": None,
      "use_rslora": False,
      "use_dora": False,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": {},
      "alpha_pattern": {},
  }


def export_peft(directory: str, params: Any, fields: Any,
                settings: lora.LoraSettings, *,
                base_model_name_or_path: str = "",
                manifest: Mapping[str, Any] | None = None,
                overwrite: bool = False) -> dict[str, Any]:
  """Writes the adapters of a LoRA Llama student as a PEFT directory.

  params: the student's params with adapters (any layout hf_llama takes);
  fields: its Llama fields; settings: its LoRA settings (the model's
  `lora` field, or specs.lora_settings(config, 'student'));
  base_model_name_or_path: the HF model the adapters go on (see the module
  docstring). Returns {'directory', 'files', 'target_modules',
  'total_bytes'}.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if manifest is not None:
    manifest_lib.to_json(manifest)  # Checked before anything is written.
  state_dict = hf_llama.cast(to_peft_state_dict(params, fields), "float32")
  targets = target_modules(state_dict,
                           hf_llama.llama_fields(fields)["num_layers"])
  config = adapter_config(settings, targets,
                          base_model_name_or_path=base_model_name_or_path)
  os.makedirs(directory, exist_ok=True)
  old = [n for n in (CONFIG_FILE, WEIGHTS_FILE, manifest_lib.MANIFEST_FILE)
         if os.path.exists(os.path.join(directory, n))]
  if old and not overwrite:
    raise ExportError(f"{directory} already holds {old}: export into a new "
                      "directory or pass overwrite=True.")
  for name in old:
    os.remove(os.path.join(directory, name))
  save_file(state_dict, os.path.join(directory, WEIGHTS_FILE),
            metadata={"format": "pt"})
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
  files = [CONFIG_FILE, WEIGHTS_FILE]
  if manifest is not None:
    manifest_lib.write_manifest(directory, manifest)
    files.append(manifest_lib.MANIFEST_FILE)
  return {"directory": directory, "files": files, "target_modules": targets,
          "total_bytes": sum(int(v.nbytes) for v in state_dict.values())}


def read_peft(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(adapter_config.json, tensors) of a PEFT directory."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    config = json.load(f)
  return config, load_file(os.path.join(directory, WEIGHTS_FILE))
