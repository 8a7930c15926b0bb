"""A soft prompt's weights: initialised from the backbone, exported alone.

`init_from_config` writes the prompt `config.<role>.model.prompt_init` asks
for ('vocab' or 'labels': rows of the imported word-embedding table) right
after the pretrained weights are loaded (kdjax.models.prompt has the math).

Prompt-only export: a run with `config.<role>.train.trainable` set (or LoRA
adapters: kdjax/models/lora.py) also writes
WORKDIR/trainable_params.msgpack at its end (`export_trainable`; flax msgpack
serialisation, not Orbax: one small file), holding the trained leaves and a
note of the backbone they need (init_from, init_layers, model spec with its
LoRA settings, seed, a SHA-256 of the frozen leaves).
`load_onto(backbone_params, path)` puts them back on a frozen
backbone (checking it is the same one); `rebuild(path, data_config)` builds
the whole model from the note alone (kdjax.core.trees splits and merges the
trees). The Orbax checkpoint holds the whole model, or the trained leaves
alone with checkpoint.trainable_only (kdjax.weights.run_params reads both).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath
from flax import serialization
from flax import traverse_util

from kdjax.core import trees
from kdjax.core.config import ConfigError
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.models import prompt as prompt_lib
from kdjax.runtime import storage
from kdjax.weights import params as params_lib
from kdjax.weights import pretrained, specs
from kdjax.weights.importers import hf_bert

EXPORT_FILE = "trainable_params.msgpack"
EXPORT_FORMAT = "kdjax-trainable-params/1"


def backbone_dir(init_from: str) -> str:
  """The HF directory of `init_from='hf_bert:<dir>'` ('hf_bert:' = MiniLM)."""
  kind, _, path = init_from.partition(":")
  if kind != "hf_bert":
    raise ValueError(f"init_from={init_from!r}: only 'hf_bert:<dir>' names a "
                     "backbone with a tokenizer.")
  return path or hf_bert.minilm_dir()


def init_from_config(params: dict[str, Any], config, role: str,
                     seed: int) -> dict[str, Any]:
  """Params with the prompt `config.<role>.model.prompt_init` asks for.

  Call after the pretrained weights are in (pretrained.load_pretrained): 'vocab'
  and 'labels' copy rows of the imported word-embedding table, sampled from
  the ordinary word pieces of the backbone's tokenizer (no [PAD], [CLS],
  [unused*]); 'labels' first puts one vector per word of
  `prompt_init_words` (its word pieces averaged). 'random' (or no prompt)
  returns `params` unchanged. The draw is fixed by `seed`.
  """
  model_cfg = config[role].model
  how = model_cfg.get("prompt_init", "random")
  if how == "random" or not model_cfg.get("num_prompts", 0):
    return params
  init_from = config[role].get("init_from", "")
  if not init_from:
    raise ConfigError(
        f"config.{role}.model.prompt_init={how!r} copies word embeddings of a "
        f"pretrained backbone, but config.{role}.init_from is '' (random "
        "weights); set it (e.g. 'hf_bert:') or use prompt_init='random'.")
  tokenizer = tokenizer_lib.load(backbone_dir(init_from))
  table = traverse_util.flatten_dict(params)[prompt_lib.WORD_EMBEDDINGS_PATH]
  candidates = hf_bert.ordinary_token_ids(tokenizer)
  rng = jax.random.fold_in(jax.random.key(seed), 3)
  num_prompts = int(model_cfg.num_prompts)
  if how == "vocab":
    vectors = prompt_lib.vocab_prompt(rng, table, num_prompts, candidates)
  else:
    words = tuple(model_cfg.prompt_init_words)
    label_ids = hf_bert.word_token_ids(tokenizer, words)
    empty = [w for w, ids in zip(words, label_ids) if not ids]
    if empty:
      raise ConfigError(
          f"config.{role}.model.prompt_init_words={words!r}: {empty} have no "
          "tokens in the backbone's tokenizer; use real words.")
    vectors = prompt_lib.label_word_prompt(rng, table, label_ids, num_prompts, candidates)
  return prompt_lib.set_prompt(params, vectors)


def fingerprint(tree: Any) -> str:
  """SHA-256 of a params tree's leaves (paths, dtypes, shapes and bits)."""
  digest = hashlib.sha256()
  for path, leaf in sorted(traverse_util.flatten_dict(tree).items()):
    value = np.ascontiguousarray(jax.device_get(leaf))
    digest.update(f"{'/'.join(path)}|{value.dtype}|{value.shape}|".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def export_trainable(workdir: str, params: dict[str, Any],
                     mask: dict[str, Any], meta: dict[str, Any],
                     init_from: str) -> str | None:
  """Writes WORKDIR/trainable_params.msgpack: trained leaves + backbone note.

  `meta` is the run's checkpoint meta (model spec, seed, ...). Only process
  0 writes (the params are replicated). Returns the path (None elsewhere).
  """
  if jax.process_index() != 0:
    return None
  trained, frozen = trees.split(params, mask)
  note = {"init_from": init_from, "model": meta.get("model"),
          "seed": meta.get("seed"), "role": meta.get("role"),
          "variant": meta.get("variant", ""),
          "init_layers": meta.get("init_layers", []),
          "num_params": params_lib.count(trained),
          "frozen_sha256": fingerprint(frozen)}
  blob = serialization.msgpack_serialize({
      "format": EXPORT_FORMAT, "note": json.dumps(note, sort_keys=True),
      "params": jax.device_get(trained)})
  path = storage.join(workdir, EXPORT_FILE)  # Local or gs://.
  storage.write_bytes(path, blob)  # Never a half-written export.
  return path


def read_export(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(note, trained params) of an export file or a run dir holding one."""
  path = epath.Path(path)
  if path.is_dir():
    path = path / EXPORT_FILE
  content = serialization.msgpack_restore(path.read_bytes())
  if not isinstance(content, dict) or content.get("format") != EXPORT_FORMAT:
    raise ValueError(f"{path} is not a kdjax prompt export ({EXPORT_FORMAT}).")
  return json.loads(content["note"]), content["params"]


def load_onto(backbone_params: dict[str, Any], path: str, *,
              verify: bool = True) -> dict[str, Any]:
  """The exported trained leaves written onto a frozen backbone's params.

  `backbone_params` are the model's params with the backbone imported (the
  prompt and head there, if any, are replaced). With `verify`, every other
  leaf must be bit-identical to the backbone the prompt was trained on.
  """
  note, trained = read_export(path)
  flat = traverse_util.flatten_dict(backbone_params)
  for key, value in traverse_util.flatten_dict(trained).items():
    if key in flat and np.shape(flat[key]) != np.shape(value):
      raise ValueError(f"{path}: {'/'.join(key)} has shape {np.shape(value)}, "
                       f"the backbone's model has {np.shape(flat[key])}.")
  frozen = {k: v for k, v in flat.items()
            if k not in traverse_util.flatten_dict(trained)}
  if verify and fingerprint(traverse_util.unflatten_dict(frozen)) != note[
      "frozen_sha256"]:
    raise ValueError(
        f"{path} was trained on another backbone than the params given (the "
        f"frozen leaves differ; it needs init_from={note['init_from']!r}, "
        f"model {note['model']}, seed {note['seed']}). Pass verify=False to "
        "load it anyway.")
  return trees.merge(trained, traverse_util.unflatten_dict(frozen))


def base_params(description: dict[str, Any], data_config
                ) -> tuple[nn.Module, dict[str, Any]]:
  """(model, params) as a run started: the model `description` names (an
  export's note or a checkpoint's meta: model spec, seed, init_from,
  init_layers), initialised with its seed, the backbone imported, the
  prompt initialised. Its frozen leaves are those the run trained over."""
  spec = {k: tuple(v) if isinstance(v, list) else v
          for k, v in description["model"].items()}
  model = specs.model_from_spec(spec)  # With its LoRA adapters, if any.
  seed = int(description["seed"])
  params = params_lib.init(model, data_config, seed)
  params = pretrained.load_pretrained(
      params, description["init_from"],
      model_fields={k: v for k, v in spec.items() if k not in ("name", "lora")},
      layers=tuple(description.get("init_layers", ())))
  run = ml_collections.ConfigDict(
      {"run": {"model": description["model"],
               "init_from": description["init_from"]}})
  return model, init_from_config(params, run, "run", seed)


def rebuild(path: str, data_config) -> tuple[nn.Module, dict[str, Any]]:
  """(model, params) from an export alone, as the run built them: its
  base (base_params), then the export loaded (and verified)."""
  note, _ = read_export(path)
  model, params = base_params(note, data_config)
  return model, load_onto(params, path)
