"""kdjax Llama params -> a GGUF file for llama.cpp (and Ollama, LM Studio).

One file holds the model and its tokenizer, written with the `gguf`
package's GGUFWriter the way llama.cpp's convert_hf_to_gguf.py writes a
LlamaForCausalLM:

* metadata: general.architecture 'llama', general.name, general.file_type,
  llama.{context_length, embedding_length, block_count, feed_forward_length,
  vocab_size, rope.freq_base, rope.dimension_count,
  attention.head_count, attention.head_count_kv,
  attention.layer_norm_rms_epsilon} and attention.key_length /
  value_length when the head size is not width / heads;
* Llama 3.x RoPE scaling as llama.cpp keeps it: the per-frequency divisors
  `rope_freqs.weight` (no rope.scaling.type);
* the tokenizer: byte-level BPE as tokenizer.ggml.model 'gpt2' with its
  tokens, token types, merges, bos/eos/padding ids and the pre-tokenizer
  name (tokenizer.ggml.pre: 'gpt2', 'smollm' or 'llama-bpe') that
  kdjax.data.tokenizer.from_gguf and llama.cpp rebuild it from;
* tensors under llama.cpp names (token_embd, blk.N.attn_q/k/v/output,
  ffn_gate/up/down, attn_norm, ffn_norm, output_norm, output when untied),
  attn_q/attn_k rows permuted within each head as llama.cpp's RoPE kernel
  expects (`permute_qk`); norms in F32, matrices in F32, F16 or Q8_0 (a
  matrix whose rows do not split into Q8_0's 32-value blocks falls back to
  F16, as llama.cpp's converter does, and the returned summary says so);
* with a manifest (manifest.py): the JSON text under `kdjax.manifest`.

kdjax's importer reads the file back ('llama:<file>.gguf'): F32 gives the
same bits, F16 and Q8_0 the rounded values.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from kdjax.data import tokenizer as tokenizer_lib
from kdjax.weights.exporters import hf_llama
from kdjax.weights.exporters import manifest as manifest_lib
from kdjax.weights.importers import llama as llama_import

ExportError = hf_llama.ExportError

# file_type -> (GGUF general.file_type name, matrix tensor type name).
FILE_TYPES = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"),
              "q8_0": ("MOSTLY_Q8_0", "Q8_0")}
# llama.cpp's GGUF token types (llama_token_type).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5

_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
          "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
_LAYER_NAMES = {"input_layernorm": "attn_norm",
                "self_attn.q_proj": "attn_q",
                "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output",
                "post_attention_layernorm": "ffn_norm",
                "mlp.gate_proj": "ffn_gate",
                "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
  """HF LlamaForCausalLM tensor name -> llama.cpp's."""
  if hf_name in _NAMES:
    return _NAMES[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
  module, _, suffix = rest.rpartition(".")
  return f"blk.{layer}.{_LAYER_NAMES[module]}.{suffix}"


def rope_factors(fields: Mapping[str, Any]) -> np.ndarray | None:
  """llama.cpp's rope_freqs.weight for 'llama3' scaling (None without):
  frequency i runs at theta_i / factors[i]. Transcribes convert_hf_to_gguf's
  LlamaModel (1 for short wavelengths, `factor` for long ones, the blend
  between)."""
  if fields.get("rope_type", "default") == "default":
    return None
  dim = hf_llama.head_dim(fields)
  factor = float(fields["rope_factor"])
  low = float(fields["rope_low_freq_factor"])
  high = float(fields["rope_high_freq_factor"])
  old_length = float(fields["rope_original_max_length"])
  freqs = 1.0 / (float(fields["rope_theta"])
                 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  factors = []
  for freq in freqs:
    wavelength = 2 * np.pi / float(freq)
    if wavelength < old_length / high:
      factors.append(1.0)
    elif wavelength > old_length / low:
      factors.append(factor)
    else:
      smooth = (old_length / wavelength - low) / (high - low)
      factors.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(factors, np.float32)


# --- The tokenizer. ---------------------------------------------------------


def _bpe_spec(tokenizer) -> dict[str, Any]:
  """The tokenizer's JSON, which must be a BPE model's."""
  spec = json.loads(tokenizer.to_str())
  if (spec.get("model") or {}).get("type") != "BPE":
    raise ExportError("The tokenizer is not a BPE model: GGUF export writes "
                      "byte-level BPE (tokenizer.ggml.model 'gpt2') only.")
  return spec


def tokenizer_pre(tokenizer) -> str:
  """The tokenizer.ggml.pre name of a byte-level BPE tokenizer's
  pre-tokenizer (what kdjax.data.tokenizer.from_gguf and llama.cpp rebuild
  from it): ByteLevel alone 'gpt2'; single Digits then ByteLevel 'smollm';
  Llama 3's Split regex then ByteLevel without regex 'llama-bpe'."""
  spec = _bpe_spec(tokenizer)
  pre = spec.get("pre_tokenizer") or {}
  steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [
      pre]

  def byte_level(step, regex):
    return (step.get("type") == "ByteLevel"
            and not step.get("add_prefix_space", False)
            and step.get("use_regex", True) == regex)
  if len(steps) == 1 and byte_level(steps[0], True):
    return "gpt2"
  if (len(steps) == 2 and steps[0].get("type") == "Digits"
      and steps[0].get("individual_digits") and byte_level(steps[1], True)):
    return "smollm"
  llama3 = tokenizer_lib.LLAMA3_SPLIT
  if (len(steps) == 2 and steps[0].get("type") == "Split"
      and (steps[0].get("pattern") or {}).get("Regex") == llama3
      and byte_level(steps[1], False)):
    return "llama-bpe"
  raise ExportError(
      f"The tokenizer's pre_tokenizer {pre!r} has no GGUF name kdjax knows "
      "('gpt2': ByteLevel; 'smollm': Digits(individual) + ByteLevel; "
      "'llama-bpe': Llama 3's Split + ByteLevel); pass tokenizer_pre= to "
      "name it yourself.")


def tokenizer_metadata(source: hf_llama.TokenizerSource, vocab_size: int,
                       pre: str | None = None) -> dict[str, Any]:
  """tokens, token_type, merges and pre of the GGUF tokenizer: one token per
  model row (ids the tokenizer lacks become '[PAD<i>]' of type UNUSED, as
  convert_hf_to_gguf.py pads them); added tokens are CONTROL (special) or
  USER_DEFINED."""
  spec = _bpe_spec(source.tokenizer)
  pre = pre or tokenizer_pre(source.tokenizer)
  added = {int(t["id"]): bool(t.get("special")) for t in
           spec.get("added_tokens", [])}
  tokens, types = [], []
  size = source.size  # One call: each builds the whole vocabulary.
  for i in range(vocab_size):
    token = source.tokenizer.id_to_token(i) if i < size else None
    if token is None:
      tokens.append(f"[PAD{i}]")
      types.append(_UNUSED)
    else:
      tokens.append(token)
      types.append(_NORMAL if i not in added
                   else _CONTROL if added[i] else _USER_DEFINED)
  merges = [m if isinstance(m, str) else " ".join(m)
            for m in spec["model"].get("merges", [])]
  return {"tokens": tokens, "types": types, "merges": merges, "pre": pre}


def add_tokenizer(writer, source: hf_llama.TokenizerSource, vocab_size: int,
                  pre: str | None = None) -> str:
  """Writes the tokenizer's GGUF metadata; returns its pre name."""
  meta = tokenizer_metadata(source, vocab_size, pre)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(meta["pre"])
  writer.add_token_list(meta["tokens"])
  writer.add_token_types(meta["types"])
  writer.add_token_merges(meta["merges"])
  if source.bos_id is not None:
    writer.add_bos_token_id(source.bos_id)
  if source.eos_id is not None:
    writer.add_eos_token_id(source.eos_id)
  if source.pad_id is not None:
    writer.add_pad_token_id(source.pad_id)
  writer.add_add_bos_token(source.add_bos)
  writer.add_add_eos_token(source.add_eos)
  writer.add_add_space_prefix(False)
  if source.chat_template:
    writer.add_chat_template(source.chat_template)
  return meta["pre"]


def _probe_text(tokenizer) -> str:
  """Text touching the pre-tokenizer's cases and the added tokens."""
  added = [t["content"] for t in
           json.loads(tokenizer.to_str()).get("added_tokens", [])][:8]
  return ("".join(added) + " Hello world! It's 2025: 1234567 apples, "
          "héllo wörld 🙂\n\tdef f(x):  return x_1  ")


def tokenizer_round_trips(path: str, tokenizer) -> bool:
  """Whether the tokenizer rebuilt from the GGUF at `path`
  (kdjax.data.tokenizer.load) encodes a probe text as `tokenizer` does."""
  text = _probe_text(tokenizer)
  back = tokenizer_lib.load(path)
  return all(back.encode(text, add_special_tokens=s).ids
             == tokenizer.encode(text, add_special_tokens=s).ids
             for s in (False, True))


# --- Tensors. ---------------------------------------------------------------


def _matrix(gguf, name: str, value: np.ndarray, kind: str
            ) -> tuple[np.ndarray, Any, str | None]:
  """(data, raw dtype or None, fallback reason) of a 2-D tensor."""
  types = gguf.GGMLQuantizationType
  if kind == "F32":
    return value, None, None
  reason = None
  if kind == "Q8_0":
    block = gguf.GGML_QUANT_SIZES[types.Q8_0][0]
    if value.shape[-1] % block == 0:
      return gguf.quants.quantize(value, types.Q8_0), types.Q8_0, None
    reason = (f"{value.shape[-1]} inputs per row do not split into Q8_0 "
              f"blocks of {block}: F16 instead")
  half = value.astype(np.float16)
  if not np.all(np.isfinite(half)):
    if reason is None:
      raise ExportError(f"{name} has values beyond float16's range; export "
                        "with file_type='f32' or 'q8_0'.")
    return value, None, reason.replace("F16", "F32 (beyond F16's range)")
  return half, None, reason


def export_gguf(path: str, params: Any, fields: Any, *, tokenizer_path: str,
                file_type: str = "f32",
                manifest: Mapping[str, Any] | None = None,
                name: str = "kdjax-llama", bos_id: int | None = None,
                eos_id: int | None = None,
                tokenizer_pre_name: str | None = None,
                overwrite: bool = False) -> dict[str, Any]:
  """Writes a Llama student and its tokenizer as one GGUF file.

  params / fields as hf_llama.export_hf takes them; tokenizer_path: the
  run's tokenizer (tokenizer.json, HF directory or .gguf; byte-level BPE);
  file_type: 'f32', 'f16' or 'q8_0' (matrices; norms stay F32); name:
  general.name; bos_id / eos_id override the tokenizer's;
  tokenizer_pre_name: tokenizer.ggml.pre when it cannot be told from the
  tokenizer. Returns a summary: {'path', 'file_type', 'tensor_types'
  {gguf name: type}, 'fallbacks' {gguf name: why not the file type},
  'tokenizer_pre', 'tokenizer_round_trips' (the tokenizer read back from
  the file encodes a probe text the same), 'bytes'}.
  """
  gguf = tokenizer_lib.gguf_module()
  if file_type not in FILE_TYPES:
    raise ExportError(f"file_type={file_type!r}; allowed {sorted(FILE_TYPES)}.")
  if not path.endswith(".gguf"):
    raise ExportError(f"{path}: a GGUF file's name must end in .gguf (kdjax "
                      "and llama.cpp tell the format by it).")
  if os.path.exists(path) and not overwrite:
    raise ExportError(f"{path} exists: pass overwrite=True to replace it.")
  manifest_text = None if manifest is None else manifest_lib.to_json(manifest)
  fields = hf_llama.llama_fields(fields)
  source = hf_llama.load_tokenizer_source(tokenizer_path, bos_id=bos_id,
                                          eos_id=eos_id)
  hf_llama.check_vocab(source, fields)
  state_dict = hf_llama.cast(hf_llama.to_hf_state_dict(params, fields),
                             "float32")
  file_type_name, matrix_kind = FILE_TYPES[file_type]
  dh = hf_llama.head_dim(fields)

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = path + ".partial"  # Renamed once complete: no half-written .gguf.
  writer = gguf.GGUFWriter(partial, "llama")
  writer.add_type("model")
  writer.add_name(name)
  writer.add_context_length(int(fields["max_length"]))
  writer.add_embedding_length(int(fields["width"]))
  writer.add_block_count(int(fields["num_layers"]))
  writer.add_feed_forward_length(int(fields["mlp_dim"]))
  writer.add_head_count(int(fields["num_heads"]))
  writer.add_head_count_kv(int(fields["num_kv_heads"]))
  if dh != fields["width"] // fields["num_heads"]:
    writer.add_key_length(dh)
    writer.add_value_length(dh)
  writer.add_rope_freq_base(float(fields["rope_theta"]))
  writer.add_rope_dimension_count(dh)
  writer.add_layer_norm_rms_eps(float(fields["norm_eps"]))
  writer.add_vocab_size(int(fields["vocab_size"]))
  writer.add_file_type(int(gguf.LlamaFileType[file_type_name]))
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  pre = add_tokenizer(writer, source, int(fields["vocab_size"]),
                      tokenizer_pre_name)
  if manifest_text is not None:
    writer.add_string(manifest_lib.GGUF_KEY, manifest_text)

  tensor_types, fallbacks = {}, {}
  factors = rope_factors(fields)
  if factors is not None:
    writer.add_tensor("rope_freqs.weight", factors)
    tensor_types["rope_freqs.weight"] = "F32"
  heads = {"q_proj": fields["num_heads"], "k_proj": fields["num_kv_heads"]}
  for hf_name in list(state_dict):
    value = state_dict.pop(hf_name)  # Hold each tensor once.
    target = gguf_name(hf_name)
    kind = hf_name.split(".")[-2]
    if kind in heads:
      value = llama_import.permute_qk(value, heads[kind])
    if value.ndim == 1:
      writer.add_tensor(target, value)
      tensor_types[target] = "F32"
      continue
    data, raw_dtype, reason = _matrix(gguf, target, value, matrix_kind)
    if raw_dtype is None:
      writer.add_tensor(target, data)
    else:
      writer.add_tensor(target, data, raw_shape=data.shape,
                        raw_dtype=raw_dtype)
    tensor_types[target] = ("F16" if data.dtype == np.float16 else
                            "F32" if data.dtype == np.float32 else
                            raw_dtype.name)
    if reason:
      fallbacks[target] = reason
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  os.replace(partial, path)
  return {"path": path, "file_type": file_type, "tensor_types": tensor_types,
          "fallbacks": fallbacks, "tokenizer_pre": pre,
          "tokenizer_round_trips": tokenizer_round_trips(path,
                                                         source.tokenizer),
          "bytes": os.path.getsize(path)}
