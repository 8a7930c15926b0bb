"""kdjax Llama params -> a Hugging Face LlamaForCausalLM directory.

A distilled Llama student leaves kdjax as the directory every Llama tool
reads (transformers' AutoModelForCausalLM / AutoTokenizer, vLLM, TGI,
llama.cpp's convert_hf_to_gguf.py, and kdjax itself as 'llama:<dir>'):

  config.json               LlamaConfig: sizes, RoPE (and 'llama3' scaling),
                            tie_word_embeddings, bos/eos ids
  model.safetensors         the weights under HF names, [out, in] like
                            PyTorch's Linear; past `max_shard_bytes`:
                            model-0000k-of-0000n.safetensors and
                            model.safetensors.index.json (its weight_map)
  tokenizer.json            the run's tokenizer (copied, or rebuilt from a
                            GGUF's vocabulary)
  tokenizer_config.json     bos/eos/pad tokens, model_max_length,
                            chat_template (PreTrainedTokenizerFast)
  generation_config.json    bos/eos ids for generate()
  kdjax_manifest.json       where the weights came from (manifest.py), when
                            a manifest is given

The tensor conversion is the exact inverse of the importer's
(kdjax.weights.importers.llama: `layout` names each parameter's HF tensor
and how it is laid out), so exporting and importing again gives back the
same bits. The tokenizer helpers here (`load_tokenizer_source`) are shared
with the GGUF exporter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np

from kdjax.core import errors
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.models import llama as llama_model
from kdjax.models import partitioning
from kdjax.models import stacking
from kdjax.weights.exporters import manifest as manifest_lib
from kdjax.weights.importers import llama as llama_import

DTYPES = {"float32": np.dtype(np.float32),
          "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


class ExportError(errors.KdjaxError, ValueError):
  """Params, fields or a tokenizer that cannot be written as asked."""


# --- Fields and params. -----------------------------------------------------

def module_fields(module_cls: type, fields: Any, kind: str) -> dict[str, Any]:
  """A module instance, ConfigDict or mapping of a Flax module's fields ->
  a plain dict with every field (the module's defaults where absent); a
  config's 'name' key is dropped, other unknown keys fail. Shared by the
  exporters (kind names the model in the error)."""
  defaults = {f.name: f.default for f in dataclasses.fields(module_cls)
              if f.name not in ("parent", "name")}
  if isinstance(fields, module_cls):
    fields = {n: getattr(fields, n) for n in defaults}
  elif hasattr(fields, "to_dict"):
    fields = fields.to_dict()
  fields = {k: v for k, v in dict(fields).items() if k != "name"}
  unknown = sorted(set(fields) - set(defaults))
  if unknown:
    raise ExportError(f"{kind} fields {unknown} are not fields of "
                      f"{module_cls.__module__}.{module_cls.__name__}.")
  return dict(defaults, **fields)


def llama_fields(fields: Any) -> dict[str, Any]:
  """The Llama's fields as a plain dict (`module_fields`), checked."""
  out = module_fields(llama_model.Llama, fields, "Llama")
  problems = []
  if out["head_dim"] == 0 and out["width"] % out["num_heads"]:
    problems.append(f"width={out['width']} not divisible by num_heads="
                    f"{out['num_heads']} (set head_dim)")
  if out["num_heads"] % out["num_kv_heads"]:
    problems.append(f"num_heads={out['num_heads']} not a multiple of "
                    f"num_kv_heads={out['num_kv_heads']}")
  if (out["head_dim"] or out["width"] // out["num_heads"]) % 2:
    problems.append("head dim must be even (RoPE rotates pairs)")
  if out["rope_type"] not in llama_model.ROPE_TYPES:
    problems.append(f"rope_type={out['rope_type']!r} (allowed "
                    f"{llama_model.ROPE_TYPES})")
  if problems:
    raise ExportError("Llama fields: " + "; ".join(problems) + ".")
  return out


def head_dim(fields: Mapping[str, Any]) -> int:
  """The per-head size (head_dim 0 = width // num_heads)."""
  return int(fields["head_dim"] or fields["width"] // fields["num_heads"])


def host_params(params: Any) -> dict[str, Any]:
  """Model params (a {'params': ...} variables dict or the params; boxed or
  not; jax or numpy; scan_layers stacks or layers_<i>) as host numpy in the
  unrolled layers_<i> layout. Every array must be addressable here (on a
  multi-host run, gather first or export from process 0 with replicated
  params)."""
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  params = jax.tree.map(np.asarray, jax.device_get(partitioning.unbox(params)))
  if "layers" in params:
    params = stacking.unstack(params, "layers")
  return params


def flatten(tree: Mapping[str, Any], prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, prefix + (str(key),)))
    else:
      out[prefix + (str(key),)] = value
  return out


def _to_hf_layout(entry: llama_import.Entry, value: np.ndarray) -> np.ndarray:
  """A kdjax parameter -> its HF tensor (inverse of `Entry.read`)."""
  if entry.kind == "copy":
    return value
  if entry.kind == "transpose":
    return value.T
  if entry.kind == "heads_in":  # [D, N, Dh] -> [N*Dh, D]
    return value.transpose(1, 2, 0).reshape(entry.hf_shape)
  return value.transpose(2, 0, 1).reshape(entry.hf_shape)  # [H, Dh, D] ->


def to_hf_state_dict(params: Any, fields: Any) -> dict[str, np.ndarray]:
  """Llama params -> LlamaForCausalLM tensors (HF names, [out, in],
  float32), the exact inverse of the importer's `convert_hf`.

  A scan_layers model's stacked params are unstacked first. Missing,
  unexpected (e.g. lm_head with tie_embeddings) or misshapen parameters fail
  naming them.
  """
  fields = llama_fields(fields)
  flat = flatten(host_params(params))
  entries = llama_import.layout(fields)
  missing = ["/".join(e.path) for e in entries if e.path not in flat]
  if missing:
    raise ExportError(f"Params lack {missing[:6]}"
                      f"{' ...' if len(missing) > 6 else ''} that a Llama "
                      f"with these fields has (num_layers="
                      f"{fields['num_layers']}, tie_embeddings="
                      f"{fields['tie_embeddings']}).")
  known = {e.path for e in entries}
  unexpected = sorted("/".join(p) for p in set(flat) - known)
  if unexpected:
    raise ExportError(f"Params have {unexpected[:6]} that a Llama with these "
                      f"fields lacks (num_layers={fields['num_layers']}, "
                      f"tie_embeddings={fields['tie_embeddings']}).")
  out = {}
  for e in entries:
    value = np.asarray(flat[e.path], np.float32)
    if value.shape != e.shape:
      raise ExportError(f"{'/'.join(e.path)} has shape {value.shape}; the "
                        f"fields give {e.shape}.")
    out[e.name] = np.ascontiguousarray(_to_hf_layout(e, value))
  return out


def cast(state_dict: Mapping[str, np.ndarray], dtype: str
         ) -> dict[str, np.ndarray]:
  """Tensors cast to dtype ('float32', 'bfloat16', 'float16'); NaN/inf in
  the params, or values past float16's range, fail naming the tensor."""
  if dtype not in DTYPES:
    raise ExportError(f"dtype={dtype!r}; allowed {sorted(DTYPES)}.")
  out = {}
  for name, value in state_dict.items():
    if not np.all(np.isfinite(value)):
      raise ExportError(f"{name} holds NaN or inf: refusing to export a "
                        "broken model.")
    with np.errstate(over="ignore"):  # Checked next.
      value = value.astype(DTYPES[dtype])
    if not np.all(np.isfinite(value)):
      raise ExportError(f"{name} has values beyond {dtype}'s range; export "
                        "in float32 or bfloat16.")
    out[name] = value
  return out


# --- config.json. -----------------------------------------------------------


def rope_scaling(fields: Mapping[str, Any]) -> dict[str, Any] | None:
  """config.json's rope_scaling for the fields (None for plain RoPE)."""
  if fields.get("rope_type", "default") == "default":
    return None
  return {"rope_type": "llama3",
          "factor": float(fields["rope_factor"]),
          "low_freq_factor": float(fields["rope_low_freq_factor"]),
          "high_freq_factor": float(fields["rope_high_freq_factor"]),
          "original_max_position_embeddings":
              int(fields["rope_original_max_length"])}


def hf_config(fields: Any, *, bos_id: int | None, eos_id: int | None,
              dtype: str = "float32") -> dict[str, Any]:
  """config.json of a LlamaForCausalLM with these fields.

  max_position_embeddings is the model's max_length (its KV-cache capacity,
  the longest input it was built for).
  """
  fields = llama_fields(fields)
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": int(fields["vocab_size"]),
      "hidden_size": int(fields["width"]),
      "intermediate_size": int(fields["mlp_dim"]),
      "num_hidden_layers": int(fields["num_layers"]),
      "num_attention_heads": int(fields["num_heads"]),
      "num_key_value_heads": int(fields["num_kv_heads"]),
      "head_dim": head_dim(fields),
      "hidden_act": "silu",
      "max_position_embeddings": int(fields["max_length"]),
      "rms_norm_eps": float(fields["norm_eps"]),
      "rope_theta": float(fields["rope_theta"]),
      "rope_scaling": rope_scaling(fields),
      "tie_word_embeddings": bool(fields["tie_embeddings"]),
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "initializer_range": 0.02,
      "pretraining_tp": 1,
      "use_cache": True,
      "bos_token_id": bos_id,
      "eos_token_id": eos_id,
      "torch_dtype": dtype,
  }


# --- The tokenizer (shared with gguf_llama). -------------------------------


@dataclasses.dataclass
class TokenizerSource:
  """The run's tokenizer and its special tokens, whatever file held it."""
  file: str  # tokenizer.json or .gguf.
  tokenizer: Any  # tokenizers.Tokenizer.
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  add_bos: bool  # encode() puts BOS first / EOS last (its post-processor).
  add_eos: bool
  chat_template: str | None
  tokenizer_config: dict[str, Any]  # The source's tokenizer_config.json.

  @property
  def size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def token(self, token_id: int | None) -> str | None:
    return None if token_id is None else self.tokenizer.id_to_token(token_id)

  def json_text(self) -> str:
    """tokenizer.json's text: the file itself, or the rebuilt tokenizer's."""
    if self.file.endswith(".gguf"):
      return self.tokenizer.to_str()
    with open(self.file) as f:
      return f.read()


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _token_id(tokenizer, *candidates) -> int | None:
  """The first candidate that names a token ({'content': ...}, a string) or
  is an id (an int; a list: its first)."""
  for value in candidates:
    if isinstance(value, list):
      value = value[0] if value else None
    if isinstance(value, Mapping):
      value = value.get("content")
    if isinstance(value, str):
      found = tokenizer.token_to_id(value)
      if found is not None:
        return int(found)
    elif isinstance(value, int) and not isinstance(value, bool):
      return value
  return None


def _adds_specials(tokenizer) -> tuple[bool, bool]:
  """(adds BOS, adds EOS): what encode(add_special_tokens=True) puts around
  a text (its post-processor)."""
  plain = tokenizer.encode("a", add_special_tokens=False).ids
  full = tokenizer.encode("a", add_special_tokens=True).ids
  if len(full) <= len(plain):
    return False, False
  return full[0] != plain[0], full[-1] != plain[-1]


def _prepended_special(tokenizer) -> int | None:
  """The special token the post-processor puts before a text (Llama 3's
  <|begin_of_text|>), or None: the BOS a bare tokenizer.json really adds."""
  plain = tokenizer.encode("a", add_special_tokens=False).ids
  full = tokenizer.encode("a", add_special_tokens=True).ids
  if len(full) <= len(plain) or full[0] == plain[0]:
    return None
  added = tokenizer.get_added_tokens_decoder().get(full[0])
  return int(full[0]) if added is not None and added.special else None


def load_tokenizer_source(path: str, *, bos_id: int | None = None,
                          eos_id: int | None = None,
                          pad_id: int | None = None) -> TokenizerSource:
  """The tokenizer at `path` (tokenizer.json, a HF directory, a .gguf) with
  its bos/eos/pad ids: the ids given, else the GGUF's, else those of the
  tokenizer_config.json / config.json / generation_config.json beside a
  tokenizer.json, else the tokenizer's own end-of-text token for EOS and,
  for BOS, the special token its post-processor prepends (Llama 3's), else
  EOS (as GPT-2 and SmolLM do)."""
  file = tokenizer_lib.tokenizer_file(path)
  config: dict[str, Any] = {}
  chat_template = None
  if file.endswith(".gguf"):
    # One read of the file (a big vocabulary takes seconds to parse): the
    # tokenizer as tokenizer_lib.load builds it, and its special tokens.
    reader = tokenizer_lib.gguf_module().GGUFReader(file)
    tokenizer = tokenizer_lib.from_gguf(reader)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    found = [tokenizer_lib.gguf_value(reader, f"tokenizer.ggml.{k}_token_id",
                                      None) for k in ("bos", "eos", "padding")]
    chat_template = tokenizer_lib.gguf_value(reader, "tokenizer.chat_template",
                                             None)
  else:
    tokenizer = tokenizer_lib.load(file)
    directory = os.path.dirname(file)
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    model = _read_json(os.path.join(directory, CONFIG_FILE))
    generation = _read_json(os.path.join(directory,
                                         "generation_config.json"))
    found = [_token_id(tokenizer, config.get(f"{k}_token"),
                       model.get(f"{k}_token_id"),
                       generation.get(f"{k}_token_id"))
             for k in ("bos", "eos", "pad")]
    if isinstance(config.get("chat_template"), str):
      chat_template = config["chat_template"]
  bos, eos, pad = (given if given is not None else default
                   for given, default in zip((bos_id, eos_id, pad_id), found))
  if eos is None:
    try:
      eos = tokenizer_lib.resolve_eos_id(tokenizer, -1)
    except ValueError:
      eos = None
  if bos is None:
    # Declaring EOS as BOS while the tokenizer prepends another token would
    # make a GGUF/HF export's add_bos put the wrong id first.
    bos = _prepended_special(tokenizer)
  if bos is None:
    bos = eos
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  for name, value in (("bos_id", bos), ("eos_id", eos), ("pad_id", pad)):
    if value is not None and not 0 <= value < size:
      raise ExportError(f"{name}={value} is outside the tokenizer's "
                        f"{size} tokens ({file}).")
  add_bos, add_eos = _adds_specials(tokenizer)
  return TokenizerSource(file=file, tokenizer=tokenizer,
                         bos_id=None if bos is None else int(bos),
                         eos_id=None if eos is None else int(eos),
                         pad_id=None if pad is None else int(pad),
                         add_bos=add_bos, add_eos=add_eos,
                         chat_template=chat_template,
                         tokenizer_config=config)


def check_vocab(source: TokenizerSource, fields: Mapping[str, Any]) -> None:
  """The model must score every token id the tokenizer can produce."""
  if source.size > fields["vocab_size"]:
    raise ExportError(
        f"The tokenizer ({source.file}) has {source.size} tokens but the "
        f"model's vocab_size is {fields['vocab_size']}: pass the tokenizer "
        "the model was trained with.")


def tokenizer_config(source: TokenizerSource, max_length: int
                     ) -> dict[str, Any]:
  """tokenizer_config.json: the source's (if any) with bos/eos/pad tokens,
  model_max_length and chat_template set."""
  config = dict(source.tokenizer_config)
  config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
  config.setdefault("clean_up_tokenization_spaces", False)
  for key, token_id in (("bos_token", source.bos_id),
                        ("eos_token", source.eos_id),
                        ("pad_token", source.pad_id)):
    if token_id is not None:
      config[key] = source.token(token_id)
  config["model_max_length"] = int(max_length)
  if source.chat_template:
    config["chat_template"] = source.chat_template
  return config


# --- Writing. ---------------------------------------------------------------


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
    f.write("\n")


def _prepare(directory: str, overwrite: bool) -> None:
  """Creates `directory`; an earlier export's weights there fail, or with
  `overwrite` are removed (stale shards would be read with the new ones)."""
  os.makedirs(directory, exist_ok=True)
  old = sorted(n for n in os.listdir(directory)
               if n in (WEIGHTS_FILE, INDEX_FILE, CONFIG_FILE)
               or _SHARD.match(n))
  if old and not overwrite:
    raise ExportError(f"{directory} already holds {old}: export into a new "
                      "directory or pass overwrite=True.")
  if os.path.exists(os.path.join(directory, manifest_lib.MANIFEST_FILE)):
    old.append(manifest_lib.MANIFEST_FILE)  # Not this export's unless given.
  for name in old:
    os.remove(os.path.join(directory, name))


def _shards(state_dict: Mapping[str, np.ndarray], max_bytes: int
            ) -> list[list[str]]:
  """Tensor names in files of at most max_bytes each (a bigger tensor gets
  a file of its own), in order."""
  shards: list[list[str]] = [[]]
  size = 0
  for name, value in state_dict.items():
    if shards[-1] and size + value.nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += value.nbytes
  return shards


def write_safetensors(directory: str, state_dict: Mapping[str, np.ndarray],
                      max_shard_bytes: int) -> list[str]:
  """model.safetensors, or numbered shards and their index; returns the
  files written."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  metadata = {"format": "pt"}  # transformers refuses files without it.
  shards = _shards(state_dict, max_shard_bytes)
  if len(shards) == 1:
    save_file(dict(state_dict), os.path.join(directory, WEIGHTS_FILE),
              metadata=metadata)
    return [WEIGHTS_FILE]
  files, weight_map = [], {}
  for k, names in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({n: state_dict[n] for n in names},
              os.path.join(directory, file), metadata=metadata)
    files.append(file)
    weight_map.update({n: file for n in names})
  total = sum(int(v.nbytes) for v in state_dict.values())
  _write_json(os.path.join(directory, INDEX_FILE),
              {"metadata": {"total_size": total}, "weight_map": weight_map})
  return files + [INDEX_FILE]


def export_hf(directory: str, params: Any, fields: Any, *,
              tokenizer_path: str, dtype: str = "float32",
              max_shard_bytes: int = 2**30,
              manifest: Mapping[str, Any] | None = None,
              bos_id: int | None = None, eos_id: int | None = None,
              overwrite: bool = False) -> dict[str, Any]:
  """Writes a Llama student as a HF LlamaForCausalLM directory.

  params: the model's params (any layout `host_params` takes); fields: its
  Llama fields (mapping, ConfigDict or module); tokenizer_path: the run's
  tokenizer (tokenizer.json, HF directory or .gguf); dtype: 'float32',
  'bfloat16' or 'float16' (a cast); weights past max_shard_bytes are split
  into shards with an index; bos_id / eos_id override the tokenizer's.
  Returns {'directory', 'files', 'dtype', 'total_bytes'}.
  """
  fields = llama_fields(fields)
  if max_shard_bytes < 1:
    raise ExportError(f"max_shard_bytes={max_shard_bytes} must be >= 1.")
  if manifest is not None:
    manifest_lib.to_json(manifest)  # Checked before anything is written.
  source = load_tokenizer_source(tokenizer_path, bos_id=bos_id, eos_id=eos_id)
  check_vocab(source, fields)
  state_dict = cast(to_hf_state_dict(params, fields), dtype)
  _prepare(directory, overwrite)
  files = write_safetensors(directory, state_dict, max_shard_bytes)
  _write_json(os.path.join(directory, CONFIG_FILE),
              hf_config(fields, bos_id=source.bos_id, eos_id=source.eos_id,
                        dtype=dtype))
  tokenizer_file = os.path.join(directory, "tokenizer.json")
  if source.file.endswith(".gguf"):
    with open(tokenizer_file, "w") as f:
      f.write(source.json_text())
  elif os.path.abspath(source.file) != os.path.abspath(tokenizer_file):
    shutil.copyfile(source.file, tokenizer_file)
  _write_json(os.path.join(directory, "tokenizer_config.json"),
              tokenizer_config(source, fields["max_length"]))
  generation = {"bos_token_id": source.bos_id, "eos_token_id": source.eos_id}
  if source.pad_id is not None:
    generation["pad_token_id"] = source.pad_id
  _write_json(os.path.join(directory, "generation_config.json"), generation)
  files += [CONFIG_FILE, "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"]
  if manifest is not None:
    manifest_lib.write_manifest(directory, manifest)
    files.append(manifest_lib.MANIFEST_FILE)
  return {"directory": directory, "files": files, "dtype": dtype,
          "total_bytes": sum(int(v.nbytes) for v in state_dict.values())}
