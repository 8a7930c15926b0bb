"""kdjax BERT classifier students -> a Hugging Face BERT directory.

transformers' BertForSequenceClassification classifies tanh(dense([CLS]))
and nothing else; kdjax's BertClassifier may mean-pool, take [CLS] without
the pooler, read a soft prompt or insert a fixed instruction after [CLS].
So the encoder goes out as the `BertModel` every BERT tool reads
(transformers' AutoModel, sentence-transformers, kdjax itself as
'hf_bert:<dir>'), and the classifier's own parts go in a file beside it:

  config.json               BertConfig: sizes, hidden_act, eps, pad id,
                            dropout rates; architectures BertModel, or
                            BertForSequenceClassification when the student
                            is exactly that (pooling 'pooler', no prompt,
                            no instruction: `is_sequence_classifier`)
  model.safetensors         embeddings, encoder layers and pooler under
                            HF BertModel names, Dense kernels [out, in]
                            like PyTorch's Linear; with 'bert.' prefixes
                            and `classifier.*` for a
                            BertForSequenceClassification; sharded past
                            `max_shard_bytes` (hf_llama.write_safetensors).
                            A student without a pooler has none here
                            (transformers then makes one up and warns;
                            last_hidden_state is unaffected)
  kdjax_head.safetensors    classifier.weight [C, H], classifier.bias [C]
                            and, with a soft prompt, prompt.embedding [P, H]
  kdjax_head.json           pooling, num_classes, num_prompts,
                            instruction_ids, pad_id: how kdjax turns the
                            encoder's output into logits (HEAD_RECIPE)
  tokenizer.json            the run's tokenizer, plus vocab.txt and
                            special_tokens_map.json when the source has them
  tokenizer_config.json     the source's, or [CLS]/[SEP]/... found in the
                            vocabulary; model_max_length
  kdjax_manifest.json       where the weights came from (manifest.py)

A soft prompt is prepended in word-embedding space with no position
embedding while the real tokens keep positions 0..L-1 (kdjax.models.bert).
BertModel runs it as `inputs_embeds` = [prompt - position_embeddings[0],
word_embeddings[ids]] with `position_ids` = [0] * P + [0..L-1]: the 0th
position embedding it adds back cancels (to float32 rounding).

The tensor names are the inverse of kdjax.weights.importers.hf_bert's, so
'hf_bert:<dir>' plus `read_head` gives back the same bits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Mapping

import jax
import numpy as np

from kdjax.data import tokenizer as tokenizer_lib
from kdjax.models import bert
from kdjax.models import partitioning
from kdjax.models import stacking
from kdjax.weights.exporters import hf_llama
from kdjax.weights.exporters import manifest as manifest_lib
from kdjax.weights.importers import hf_bert as hf_bert_import

ExportError = hf_llama.ExportError
CONFIG_FILE = "config.json"
HEAD_WEIGHTS_FILE = "kdjax_head.safetensors"
HEAD_CONFIG_FILE = "kdjax_head.json"
HEAD_FORMAT = "kdjax-bert-head/1"
HEAD_RECIPE = (
    "h = BertModel(input_ids, attention_mask).last_hidden_state; with "
    "num_prompts P: inputs_embeds = [prompt.embedding - "
    "position_embeddings[0], word_embeddings[input_ids]], position_ids = "
    "[0]*P + [0..L-1], attention_mask = [1]*P + mask, then drop h's first P "
    "positions. pooling 'mean': mean of h over attention_mask; 'cls': "
    "h[:, 0]; 'pooler': tanh(pooler.dense(h[:, 0])). logits = pooled @ "
    "classifier.weight.T + classifier.bias. instruction_ids go right after "
    "[CLS] (attended) before all of this.")
# Copied beside tokenizer.json when the source directory has them.
_TOKENIZER_EXTRAS = ("vocab.txt", "special_tokens_map.json")
_SPECIAL_TOKENS = {"cls_token": "[CLS]", "sep_token": "[SEP]",
                   "pad_token": "[PAD]", "unk_token": "[UNK]",
                   "mask_token": "[MASK]"}
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def classifier_fields(fields: Any) -> dict[str, Any]:
  """A BertClassifier, ConfigDict or mapping of its fields -> a plain dict
  with every field (hf_llama.module_fields), checked."""
  out = hf_llama.module_fields(bert.BertClassifier, fields, "BERT")
  out["instruction_ids"] = tuple(int(i) for i in out["instruction_ids"])
  out["prompt_init_words"] = tuple(out["prompt_init_words"])
  try:
    bert.BertClassifier(**out)  # Its own checks (pooling, ids, ...).
  except ValueError as e:
    raise ExportError(f"BERT fields: {e}") from e
  problems = []
  if out["hidden_size"] % out["num_heads"]:
    problems.append(f"hidden_size={out['hidden_size']} not divisible by "
                    f"num_heads={out['num_heads']}")
  if out["hidden_act"] not in bert.ACTIVATIONS:
    problems.append(f"hidden_act={out['hidden_act']!r} (allowed "
                    f"{sorted(bert.ACTIVATIONS)})")
  if problems:
    raise ExportError("BERT fields: " + "; ".join(problems) + ".")
  return out


def is_sequence_classifier(fields: Mapping[str, Any]) -> bool:
  """Whether HF's BertForSequenceClassification computes the same logits:
  its pooler on the first input token, nothing before or inserted."""
  return (fields["pooling"] == "pooler" and not fields["num_prompts"]
          and not fields["instruction_ids"])


def host_params(params: Any) -> dict[str, Any]:
  """Classifier params (a {'params': ...} dict or the params; boxed or not;
  jax or numpy; scan_layers stacks or layer_<i>) as host numpy with the
  encoder's layers unrolled. Every array must be addressable here."""
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  params = jax.tree.map(np.asarray, jax.device_get(partitioning.unbox(params)))
  encoder = params.get("encoder")
  if isinstance(encoder, Mapping) and "layer" in encoder:
    params = stacking.unstack(params, "encoder/layer")
  return params


def _expected_shapes(fields: Mapping[str, Any]) -> dict[tuple[str, ...], tuple]:
  """Every parameter's shape in the unrolled layout, from the module."""
  model = bert.BertClassifier(**dict(fields, scan_layers=False))
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          np.ones((1, 1), np.int32))["params"]
  return {k: tuple(v.shape)
          for k, v in hf_llama.flatten(partitioning.unbox(shapes)).items()}


def layout(num_layers: int, pooler: bool
           ) -> list[tuple[str, tuple[str, ...], bool]]:
  """(BertModel tensor name, kdjax path under `encoder`, transpose?) of
  every encoder parameter: the importer's table, plus the pooler."""
  rows = hf_bert_import.hf_names(num_layers)
  if pooler:
    rows += [("pooler.dense.weight", ("pooler", "kernel"), True),
             ("pooler.dense.bias", ("pooler", "bias"), False)]
  return rows


def to_hf_state_dicts(params: Any, fields: Any
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Classifier params -> (model.safetensors tensors, kdjax_head tensors),
  float32, HF names and [out, in] layout.

  Missing, unexpected or misshapen parameters fail naming them. A
  BertForSequenceClassification's model tensors carry 'bert.' prefixes and
  the head as classifier.*; the head file holds it either way.
  """
  fields = classifier_fields(fields)
  flat = hf_llama.flatten(host_params(params))
  expected = _expected_shapes(fields)
  missing = sorted("/".join(p) for p in set(expected) - set(flat))
  if missing:
    raise ExportError(f"Params lack {missing[:6]}"
                      f"{' ...' if len(missing) > 6 else ''} that a "
                      f"BertClassifier with these fields has (num_layers="
                      f"{fields['num_layers']}, num_prompts="
                      f"{fields['num_prompts']}, pooling="
                      f"{fields['pooling']!r}).")
  unexpected = sorted("/".join(p) for p in set(flat) - set(expected))
  if unexpected:
    raise ExportError(f"Params have {unexpected[:6]} that a BertClassifier "
                      f"with these fields lacks (num_layers="
                      f"{fields['num_layers']}, num_prompts="
                      f"{fields['num_prompts']}, add_pooler="
                      f"{fields['add_pooler']}).")
  for path, shape in expected.items():
    if flat[path].shape != shape:
      raise ExportError(f"{'/'.join(path)} has shape {flat[path].shape}; the "
                        f"fields give {shape}.")

  def get(path, transpose=False):
    value = np.asarray(flat[path], np.float32)
    return np.ascontiguousarray(value.T if transpose else value)
  classifier = is_sequence_classifier(fields)
  prefix = "bert." if classifier else ""
  pooler = ("encoder", "pooler", "kernel") in flat
  model = {prefix + hf: get(("encoder",) + path, transpose)
           for hf, path, transpose in layout(fields["num_layers"], pooler)}
  head = {"classifier.weight": get(("head", "kernel"), True),
          "classifier.bias": get(("head", "bias"))}
  if classifier:
    model.update(head)
  if fields["num_prompts"]:
    head["prompt.embedding"] = get(("prompt", "embedding"))
  return model, head


def hf_config(fields: Any, dtype: str = "float32") -> dict[str, Any]:
  """config.json of the exported encoder (or sequence classifier)."""
  fields = classifier_fields(fields)
  config = {
      "architectures": ["BertModel"],
      "model_type": "bert",
      "vocab_size": int(fields["vocab_size"]),
      "hidden_size": int(fields["hidden_size"]),
      "num_hidden_layers": int(fields["num_layers"]),
      "num_attention_heads": int(fields["num_heads"]),
      "intermediate_size": int(fields["intermediate_size"]),
      "hidden_act": fields["hidden_act"],
      "hidden_dropout_prob": float(fields["dropout_rate"]),
      "attention_probs_dropout_prob": float(fields["attention_dropout_rate"]),
      "max_position_embeddings": int(fields["max_position_embeddings"]),
      "type_vocab_size": int(fields["type_vocab_size"]),
      "initializer_range": 0.02,
      "layer_norm_eps": float(fields["layer_norm_eps"]),
      "pad_token_id": int(fields["pad_id"]),
      "position_embedding_type": "absolute",
      "use_cache": True,
      "torch_dtype": dtype,
  }
  if is_sequence_classifier(fields):
    labels = {str(i): f"LABEL_{i}" for i in range(int(fields["num_classes"]))}
    config.update(
        architectures=["BertForSequenceClassification"],
        id2label=labels, label2id={v: int(k) for k, v in labels.items()},
        classifier_dropout=float(fields["head_dropout_rate"]),
        problem_type="single_label_classification")
  return config


def head_config(fields: Any) -> dict[str, Any]:
  """kdjax_head.json: what turns the encoder's output into logits."""
  fields = classifier_fields(fields)
  return {
      "format": HEAD_FORMAT,
      "weights": HEAD_WEIGHTS_FILE,
      "pooling": fields["pooling"],
      "num_classes": int(fields["num_classes"]),
      "num_prompts": int(fields["num_prompts"]),
      "instruction_ids": list(fields["instruction_ids"]),
      "pad_id": int(fields["pad_id"]),
      "head_dropout_rate": float(fields["head_dropout_rate"]),
      "add_pooler": bool(fields["add_pooler"]),
      "recipe": HEAD_RECIPE,
  }


def read_head(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(BertClassifier fields the head file fixes, params {'head', 'prompt'}
  as float32 numpy) of an exported directory; put these beside the
  encoder that 'hf_bert:<directory>' loads."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, HEAD_CONFIG_FILE)
  if not os.path.exists(path):
    raise ExportError(f"{path} not found: not a kdjax BERT classifier export.")
  with open(path) as f:
    config = json.load(f)
  if config.get("format") != HEAD_FORMAT:
    raise ExportError(f"{path}: format {config.get('format')!r}, expected "
                      f"{HEAD_FORMAT!r}.")
  tensors = load_file(os.path.join(directory, config["weights"]))
  as32 = lambda name: np.asarray(tensors[name], np.float32)
  params: dict[str, Any] = {"head": {
      "kernel": np.ascontiguousarray(as32("classifier.weight").T),
      "bias": as32("classifier.bias")}}
  if config["num_prompts"]:
    params["prompt"] = {"embedding": as32("prompt.embedding")}
  fields = {k: config[k] for k in ("pooling", "num_classes", "num_prompts",
                                   "pad_id", "head_dropout_rate",
                                   "add_pooler")}
  fields["instruction_ids"] = tuple(config["instruction_ids"])
  return fields, params


# --- The tokenizer. ---------------------------------------------------------


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
    f.write("\n")


def check_tokenizer(tokenizer_path: str, fields: Mapping[str, Any]) -> str:
  """The tokenizer.json to export (refusing a GGUF or one with more tokens
  than the model scores)."""
  file = tokenizer_lib.tokenizer_file(tokenizer_path)
  if file.endswith(".gguf"):
    raise ExportError(f"{file}: a BERT student needs its WordPiece "
                      "tokenizer.json, not a GGUF's vocabulary.")
  size = tokenizer_lib.load(file).get_vocab_size(with_added_tokens=True)
  if size > fields["vocab_size"]:
    raise ExportError(f"The tokenizer ({file}) has {size} tokens but the "
                      f"model's vocab_size is {fields['vocab_size']}: pass "
                      "the tokenizer the model was trained with.")
  return file


def write_tokenizer(directory: str, file: str, fields: Mapping[str, Any]
                    ) -> list[str]:
  """Copies tokenizer.json `file` (and vocab.txt, special_tokens_map.json
  beside it) and writes tokenizer_config.json; returns the files written."""
  source = os.path.dirname(file)
  files = ["tokenizer.json"]
  copies = [(file, "tokenizer.json")] + [
      (os.path.join(source, n), n) for n in _TOKENIZER_EXTRAS
      if os.path.exists(os.path.join(source, n))]
  for src, name in copies:
    dst = os.path.join(directory, name)
    if os.path.abspath(src) != os.path.abspath(dst):
      shutil.copyfile(src, dst)
    if name != "tokenizer.json":
      files.append(name)
  config = {k: v for k, v in _read_json(
      os.path.join(source, "tokenizer_config.json")).items()
            if k not in ("name_or_path", "_name_or_path")}
  if not config:  # Special tokens from the vocabulary, BERT's names.
    tokenizer = tokenizer_lib.load(file)
    config = {k: v for k, v in _SPECIAL_TOKENS.items()
              if tokenizer.token_to_id(v) is not None}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
  config.setdefault("clean_up_tokenization_spaces", True)
  config["model_max_length"] = int(fields["max_position_embeddings"])
  _write_json(os.path.join(directory, "tokenizer_config.json"), config)
  return files + ["tokenizer_config.json"]


# --- Writing. ---------------------------------------------------------------


def _prepare(directory: str, overwrite: bool) -> None:
  """Creates `directory`; an earlier export's weights there fail, or with
  `overwrite` are removed (stale shards would be read with the new ones)."""
  os.makedirs(directory, exist_ok=True)
  ours = (hf_llama.WEIGHTS_FILE, hf_llama.INDEX_FILE, CONFIG_FILE,
          HEAD_WEIGHTS_FILE, HEAD_CONFIG_FILE)
  old = sorted(n for n in os.listdir(directory)
               if n in ours or _SHARD.match(n))
  if old and not overwrite:
    raise ExportError(f"{directory} already holds {old}: export into a new "
                      "directory or pass overwrite=True.")
  if os.path.exists(os.path.join(directory, manifest_lib.MANIFEST_FILE)):
    old.append(manifest_lib.MANIFEST_FILE)  # Not this export's unless given.
  for name in old:
    os.remove(os.path.join(directory, name))


def export_hf_bert(target_dir: str, params: Any, fields: Any, *,
                   tokenizer_path: str, dtype: str = "float32",
                   max_shard_bytes: int = 2**30,
                   manifest: Mapping[str, Any] | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
  """Writes a BertClassifier student as a HF BERT directory plus its head.

  params: the classifier's params (any layout `host_params` takes); fields:
  its BertClassifier fields (mapping, ConfigDict or module); tokenizer_path:
  the run's tokenizer.json or a HF directory holding one; dtype: 'float32',
  'bfloat16' or 'float16' (a cast, of the head file too); weights past
  max_shard_bytes are split into shards with an index.
  Returns {'directory', 'files', 'dtype', 'architecture', 'total_bytes'}.
  """
  fields = classifier_fields(fields)
  if max_shard_bytes < 1:
    raise ExportError(f"max_shard_bytes={max_shard_bytes} must be >= 1.")
  if manifest is not None:
    manifest_lib.to_json(manifest)  # Checked before anything is written.
  model, head = to_hf_state_dicts(params, fields)
  model, head = hf_llama.cast(model, dtype), hf_llama.cast(head, dtype)
  tokenizer_file = check_tokenizer(tokenizer_path, fields)
  _prepare(target_dir, overwrite)
  files = hf_llama.write_safetensors(target_dir, model, max_shard_bytes)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(head, os.path.join(target_dir, HEAD_WEIGHTS_FILE),
            metadata={"format": "pt"})
  config = hf_config(fields, dtype)
  _write_json(os.path.join(target_dir, CONFIG_FILE), config)
  _write_json(os.path.join(target_dir, HEAD_CONFIG_FILE), head_config(fields))
  files += [HEAD_WEIGHTS_FILE, CONFIG_FILE, HEAD_CONFIG_FILE]
  files += write_tokenizer(target_dir, tokenizer_file, fields)
  if manifest is not None:
    manifest_lib.write_manifest(target_dir, manifest)
    files.append(manifest_lib.MANIFEST_FILE)
  return {"directory": target_dir, "files": files, "dtype": dtype,
          "architecture": config["architectures"][0],
          "total_bytes": sum(int(v.nbytes) for v in model.values())}
