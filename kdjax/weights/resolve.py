"""Config values derived from files, resolved once when a run starts.

Building a config (configs/*.py on kdjax.core.defaults) reads no file and
looks up no installed package; a value that depends on one is written
symbolically, and `resolve_config` turns it into the concrete value:

  <role>.init_from 'hf_bert:'     -> 'hf_bert:<all-MiniLM-L6-v2 dir>'
  <role>.init_from 'llama:'       -> 'llama:<SmolLM2-135M-Instruct .gguf>'
  data.tokenizer_dir / data.tokenizer_path 'hf_bert:' or 'llama:'
                                  -> that directory / file
  <model>.instruction '<text>'    -> <model>.instruction_ids: the text's word
                                     pieces under data.tokenizer_dir (no
                                     [CLS]/[SEP]); the text field is removed

wherever the field is: the config's sections, distill.extra_teachers and
pipeline.variants' overrides. kdjax.modes.run calls it before validating;
code that validates or trains a config without modes.run calls it too.
Resolving a resolved config changes nothing.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from kdjax.core import config as config_lib
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.weights.importers import hf_bert, llama

_INIT_FIELDS = ("init_from",)
_TOKENIZER_FIELDS = ("tokenizer_dir", "tokenizer_path")
_DEFAULT_PATHS = {"hf_bert:": hf_bert.minilm_dir,
                  "llama:": llama.smollm2_gguf_path}


def instruction_ids(tokenizer_dir: str, text: str) -> tuple[int, ...]:
  """The instruction's word-piece ids (no [CLS]/[SEP]) for a model field."""
  tokenizer = tokenizer_lib.load(tokenizer_dir)
  return tuple(hf_bert.word_token_ids(tokenizer, [text])[0])


def resolve_config(config: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """Resolves `config`'s symbolic values in place (even locked); returns it."""
  with config.unlocked():
    if "data" in config:  # First: an instruction needs its tokenizer.
      _resolve_mapping(config.data, "data", "")
    tokenizer_dir = config.get("data", {}).get("tokenizer_dir", "")
    for key in config.keys():
      if key != "data":
        value = config[key]
        resolved = _resolve(value, key, key, tokenizer_dir)
        if resolved is not value:
          config[key] = resolved
  return config


def _resolve(value: Any, leaf: str, field: str, tokenizer_dir: str) -> Any:
  """`value` of the field named `leaf`, resolved: the same object if unchanged.

  ConfigDicts are resolved in place; dicts, tuples and lists (e.g. variant
  overrides) are copied when something in them changes.
  """
  if isinstance(value, str) and value in _DEFAULT_PATHS:
    if leaf in _INIT_FIELDS:
      return value + _DEFAULT_PATHS[value]()
    if leaf in _TOKENIZER_FIELDS:
      return _DEFAULT_PATHS[value]()
    return value
  if isinstance(value, ml_collections.ConfigDict):
    _resolve_mapping(value, field, tokenizer_dir)
    return value
  if isinstance(value, dict):
    copy = dict(value)
    _resolve_mapping(copy, field, tokenizer_dir)
    same = copy.keys() == value.keys() and all(
        copy[k] is value[k] for k in copy)
    return value if same else copy
  if isinstance(value, (tuple, list)):
    items = [_resolve(v, "", f"{field}[{i}]", tokenizer_dir)
             for i, v in enumerate(value)]
    if all(a is b for a, b in zip(items, value)):
      return value
    return type(value)(items)
  return value


def _resolve_mapping(node: Any, field: str, tokenizer_dir: str) -> None:
  """Resolves every entry of a ConfigDict or dict in place."""
  for key in list(node.keys()):
    # Variant overrides name fields with dotted keys ('student.init_from').
    prefix, _, leaf = key.rpartition(".")
    name = f"{field}.{key}"
    if leaf == "instruction" and prefix.endswith("model"):
      text = node[key]
      del node[key]
      ids = _instruction(text, name, tokenizer_dir)
      if ids:
        node[f"{prefix}.instruction_ids"] = ids
      continue
    value = node[key]
    if leaf == "model" and isinstance(
        value, (dict, ml_collections.ConfigDict)) and "instruction" in value:
      if isinstance(value, dict):
        value = node[key] = dict(value)  # Not the caller's dict.
      if "instruction_ids" in value:
        config_lib.fail(f"{name}.instruction", value["instruction"],
                        "set instruction (text) or instruction_ids, not both")
      text = value["instruction"]
      del value["instruction"]
      ids = _instruction(text, f"{name}.instruction", tokenizer_dir)
      if ids:
        value["instruction_ids"] = ids
    resolved = _resolve(value, leaf, name, tokenizer_dir)
    if resolved is not value:
      node[key] = resolved


def _instruction(text: Any, field: str, tokenizer_dir: str) -> tuple[int, ...]:
  """The ids of an instruction field's text; () for ''."""
  if not isinstance(text, str):
    config_lib.fail(field, text, "a string (the instruction's text)")
  if text and not tokenizer_dir:
    config_lib.fail(field, text,
                    "an instruction needs data.tokenizer_dir (its tokenizer)")
  return instruction_ids(tokenizer_dir, text) if text else ()
