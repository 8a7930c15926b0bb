"""A LoRA Llama student's adapters in PEFT's format, and merged.

The adapter file is read back with safetensors alone and checked in float64
numpy against the HF weights: W_hf(base) + lora_alpha / r * lora_B @ lora_A
must be the HF weight of kdjax's merged kernels (what `peft` computes when it
merges; `peft` itself is not installed here). The merged HF export, read
back by kdjax's importer into the plain model, computes the adapted model's
logits.
"""

import json
import os
import re

import flax
import jax
import numpy as np
import pytest

from kdjax import models
from kdjax.models import lora, partitioning
from kdjax.weights import pretrained
from kdjax.weights.exporters import hf_llama, peft_llama
import word_tokenizer

FIELDS = dict(vocab_size=40, width=16, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=0, mlp_dim=24, rope_theta=10000.0,
              norm_eps=1e-5, tie_embeddings=True, max_length=16)
SETTINGS = lora.LoraSettings(rank=2, alpha=6.0,  # scale 3
                             targets=lora.DEFAULT_TARGETS["llama"])
HF_NAMES = {"query": "self_attn.q_proj", "key": "self_attn.k_proj",
            "value": "self_attn.v_proj", "out": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj",
            "down": "mlp.down_proj"}


def _student(settings=SETTINGS, scan=False, seed=0):
  """(plain model, adapted model, params with trained-looking adapters)."""
  base = models.get_model("llama", **FIELDS, scan_layers=scan)
  adapted = lora.wrap(base, settings)
  shapes = flax.traverse_util.flatten_dict(partitioning.unbox(jax.eval_shape(
      adapted.init, jax.random.key(0), np.zeros((1, 4), np.int32))["params"]))
  rng = np.random.default_rng(seed)
  params = flax.traverse_util.unflatten_dict({
      k: (1.0 if k[-1] == "scale" else 0.0)
      + rng.normal(0, 0.3, s.shape).astype(np.float32)
      for k, s in shapes.items()})
  return base, adapted, params


def _tokenizer(tmp_path):
  return word_tokenizer.write(tmp_path / "tokenizer.json",
                              [f"w{i}" for i in range(30)])


@pytest.mark.parametrize("scan", [False, True])
def test_peft_files_hold_the_adapters_under_peft_names(tmp_path, scan):
  _, _, params = _student(scan=scan)
  written = peft_llama.export_peft(str(tmp_path), params, FIELDS, SETTINGS,
                                   base_model_name_or_path="org/base")
  config, tensors = peft_llama.read_peft(str(tmp_path))
  assert written["files"] == ["adapter_config.json",
                              "adapter_model.safetensors"]
  assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
  assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (
      2, 6, 0.0)
  assert config["base_model_name_or_path"] == "org/base"
  assert not config["use_rslora"] and config["bias"] == "none"
  assert sorted(config["target_modules"]) == sorted(
      n.rsplit(".", 1)[1] for n in HF_NAMES.values())
  d, dh, f = 16, 4, 24
  hf_in_out = {"query": (d, 4 * dh), "key": (d, 2 * dh), "value": (d, 2 * dh),
               "out": (4 * dh, d), "gate": (d, f), "up": (d, f),
               "down": (f, d)}
  expected = {}
  for i in range(2):
    for ours, theirs in HF_NAMES.items():
      name = f"base_model.model.model.layers.{i}.{theirs}"
      fan_in, fan_out = hf_in_out[ours]
      expected[name + ".lora_A.weight"] = (2, fan_in)
      expected[name + ".lora_B.weight"] = (fan_out, 2)
  assert {k: v.shape for k, v in tensors.items()} == expected
  assert all(v.dtype == np.float32 for v in tensors.values())


def _hf_weights(params):
  """HF tensors of plain Llama params, float64."""
  return {k: np.asarray(v, np.float64)
          for k, v in hf_llama.to_hf_state_dict(params, FIELDS).items()}


@pytest.mark.parametrize("scan", [False, True])
def test_peft_merge_in_float64_is_kdjax_merge(tmp_path, scan):
  """W_hf + lora_alpha / r * B A (PEFT's merge, float64) == the HF weight
  of lora.merge's kernels: names, transposes and head layouts agree."""
  _, _, params = _student(scan=scan)
  peft_llama.export_peft(str(tmp_path), params, FIELDS, SETTINGS)
  config, tensors = peft_llama.read_peft(str(tmp_path))
  scale = config["lora_alpha"] / config["r"]
  adapters, base = lora.split(params)
  merged_by_peft = _hf_weights(base)
  for key in tensors:
    if key.endswith(".lora_A.weight"):
      module = key[len("base_model.model."):-len(".lora_A.weight")]
      a = tensors[key].astype(np.float64)
      b = tensors[module.join(("base_model.model.", ".lora_B.weight"))
                  ].astype(np.float64)
      merged_by_peft[module + ".weight"] += scale * (b @ a)
  merged_by_kdjax = _hf_weights(jax.device_get(lora.merge(params, SETTINGS)))
  assert merged_by_peft.keys() == merged_by_kdjax.keys()
  for name, value in merged_by_kdjax.items():
    np.testing.assert_allclose(merged_by_peft[name], value, rtol=1e-6,
                               atol=1e-6, err_msg=name)
  moved = [n for n in merged_by_kdjax
           if not np.allclose(merged_by_kdjax[n], _hf_weights(base)[n])]
  assert len(moved) == 14  # Seven projections in each of two layers.


def test_merged_hf_export_computes_the_adapted_model(tmp_path):
  """Merge, export as HF, import into the PLAIN model: the adapted logits."""
  base_model, adapted, params = _student()
  hf_llama.export_hf(str(tmp_path / "merged"),
                     jax.device_get(lora.merge(params, SETTINGS)), FIELDS,
                     tokenizer_path=_tokenizer(tmp_path))
  empty = jax.tree.map(np.zeros_like, lora.split(params)[1])
  imported = pretrained.load_pretrained(
      empty, "llama:" + str(tmp_path / "merged"), model_fields=FIELDS)
  tokens = np.array([[1, 5, 7, 3, 9, 2]], np.int32)
  forward = jax.jit(lambda m, p: m.apply({"params": p}, tokens),
                    static_argnums=0)
  np.testing.assert_allclose(forward(base_model, imported),
                             forward(adapted, params), rtol=1e-5, atol=1e-5)


def test_layer_specific_targets_export_an_exact_regex(tmp_path):
  settings = lora.LoraSettings(2, 4.0, targets=("layers_1/attention/query",
                                                "mlp/down"))
  _, _, params = _student(settings)
  written = peft_llama.export_peft(str(tmp_path), params, FIELDS, settings)
  config, tensors = peft_llama.read_peft(str(tmp_path))
  pattern = config["target_modules"]
  assert isinstance(pattern, str) and pattern == written["target_modules"]
  # PEFT full-matches the string against the base model's module names.
  names = [f"model.layers.{i}.{m}" for i in range(2)
           for m in HF_NAMES.values()] + ["lm_head", "model.embed_tokens"]
  assert [n for n in names if re.fullmatch(pattern, n)] == [
      "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
      "model.layers.1.mlp.down_proj"]
  assert len(tensors) == 6


def test_adapters_on_some_layers_name_only_those(tmp_path):
  """q_proj adapted in layer 0 of 2: the bare name 'q_proj' would make
  PEFT adapt layer 1's too, so the full module name is written."""
  settings = lora.LoraSettings(2, 4.0, targets=("layers_0/attention/query",))
  _, _, params = _student(settings)
  written = peft_llama.export_peft(str(tmp_path), params, FIELDS, settings)
  pattern = written["target_modules"]
  names = [f"model.layers.{i}.{m}" for i in range(2)
           for m in HF_NAMES.values()]
  assert isinstance(pattern, str)
  assert [n for n in names if re.fullmatch(pattern, n)] == [
      "model.layers.0.self_attn.q_proj"]


def test_refusals(tmp_path):
  _, _, params = _student()
  with pytest.raises(hf_llama.ExportError, match="no LoRA adapters"):
    peft_llama.export_peft(str(tmp_path), lora.split(params)[1], FIELDS,
                           SETTINGS)
  with pytest.raises(hf_llama.ExportError,
                     match=r"layers_1/attention/key.*num_layers=1"):
    peft_llama.export_peft(str(tmp_path), params, dict(FIELDS, num_layers=1),
                           SETTINGS)
  with pytest.raises(hf_llama.ExportError, match="do not fit"):
    peft_llama.export_peft(str(tmp_path), params, dict(FIELDS, width=8,
                                                       num_heads=2,
                                                       num_kv_heads=1),
                           SETTINGS)
  peft_llama.export_peft(str(tmp_path), params, FIELDS, SETTINGS)
  with pytest.raises(hf_llama.ExportError, match="already holds"):
    peft_llama.export_peft(str(tmp_path), params, FIELDS, SETTINGS)
  # The plain HF export refuses unmerged adapters by name.
  with pytest.raises(hf_llama.ExportError, match="lora_a"):
    hf_llama.to_hf_state_dict(params, FIELDS)
  with open(os.path.join(tmp_path, "adapter_config.json")) as f:
    assert json.load(f)["r"] == 2
