"""Soft prompts: P trainable vectors in front of a frozen encoder's input.

The module (`SoftPrompt`) only holds the vectors; the encoder that takes them
(`BertEncoder(prefix_embeds=...)`, used by `BertClassifier(num_prompts=P)`)
decides how they enter: for BERT they are prepended in word-embedding space,
every token attends to them, real tokens keep their positions, and pooling
skips them (see kdjax/models/bert.py).

Initialisation (Lester et al. 2021, "The power of scale for parameter-efficient
prompt tuning"): random normal (the module's own init), sampled vocabulary
embeddings (`vocab_prompt`), or the embeddings of class-label words
(`label_word_prompt`, falling back to sampled vocabulary once the labels run
out). Write the result into the params with `set_prompt`. The engine does it
from the config (`prompt_init`, `prompt_init_words` of a 'bert' model) with
`init_from_config`, right after the pretrained weights are loaded, so the
vectors are the imported model's embeddings. The label words are NOT cycled
over all P vectors (as PEFT's text init repeats its tokens): prompt vectors
get no position embedding here, so two equal vectors get equal gradients
forever (exactly, without dropout) and P = 20 would collapse to 2.

Training only some parameters (`trainable_mask`, `freeze`, `apply_updates`):
the mask labels each leaf; `freeze(tx, mask)` is an optax.multi_transform
that runs `tx` on the trainable leaves and optax.set_to_zero (stateless) on
the rest, so the frozen backbone has NO optimizer state. Do not use
optax.masked alone: it passes the masked-out gradients through unchanged.
Apply updates with `apply_updates(params, updates, mask)`, which returns the
frozen leaves as they were: optax.apply_updates adds the zero updates, and
-0.0 + 0.0 == +0.0 flips the sign bit of negative zeros (all-MiniLM-L6-v2 has
one), so a "frozen" backbone would not stay bit-identical.
`split`/`merge` give a prompt-only tree (kilobytes) for checkpoints.

Prompt-only export: a run with `config.<role>.train.trainable` set also writes
WORKDIR/trainable_params.msgpack at its end (`export_trainable`; flax msgpack
serialisation, not Orbax: one small file), holding the trained leaves and a
note of the backbone they need (init_from, model spec, seed, a SHA-256 of the
frozen leaves). `load_onto(backbone_params, path)` puts them back on a frozen
backbone (checking it is the same one); `rebuild(path, dummy_inputs)` builds
the whole model from the note alone. The Orbax checkpoint (resume) is
unchanged.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import serialization
from flax import traverse_util

from kdjax.weights import params as params_lib
from kdjax.runtime import storage
from kdjax.data import tokenizer as tokenizer_lib

TRAINABLE, FROZEN = "trainable", "frozen"
PROMPT_PATH = ("prompt", "embedding")
WORD_EMBEDDINGS_PATH = ("encoder", "embeddings", "word_embeddings", "embedding")
PROMPT_INITS = ("random", "vocab", "labels")
EXPORT_FILE = "trainable_params.msgpack"
EXPORT_FORMAT = "kdjax-trainable-params/1"


class SoftPrompt(nn.Module):
  """P trainable vectors [P, width] (random normal init; see vocab_prompt)."""
  num_prompts: int
  width: int
  init_std: float = 0.05

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("embedding", nn.initializers.normal(self.init_std),
                      (self.num_prompts, self.width))


def _candidates(vocab_size: int, candidate_ids) -> np.ndarray:
  ids = (np.arange(vocab_size) if candidate_ids is None
         else np.asarray(candidate_ids, np.int64))
  if ids.size == 0:
    raise ValueError("No candidate token ids to sample prompt vectors from.")
  return ids


def vocab_prompt(rng: jax.Array, embedding_table, num_prompts: int,
                 candidate_ids: Sequence[int] | None = None) -> jax.Array:
  """Rows of the word-embedding table for P distinct sampled token ids.

  Args:
    rng: PRNG key.
    embedding_table: [vocab, width] word embeddings of the frozen backbone.
    num_prompts: P.
    candidate_ids: ids to sample from (e.g. `hf_bert.ordinary_token_ids`,
      which leaves out [PAD], [CLS], [unused*]...); all ids if None.

  Returns:
    [P, width] float32.
  """
  table = jnp.asarray(embedding_table, jnp.float32)
  ids = _candidates(table.shape[0], candidate_ids)
  chosen = jax.random.choice(rng, jnp.asarray(ids), (num_prompts,),
                             replace=num_prompts > len(ids))
  return table[chosen]


def label_word_prompt(rng: jax.Array, embedding_table,
                      label_token_ids: Sequence[Sequence[int]],
                      num_prompts: int,
                      candidate_ids: Sequence[int] | None = None) -> jax.Array:
  """One vector per class-label word (its word pieces averaged), then vocab.

  Args:
    rng: PRNG key (for the sampled-vocabulary remainder).
    embedding_table: [vocab, width] word embeddings.
    label_token_ids: per label word, its token ids without special tokens
      (`hf_bert.word_token_ids(tokenizer, ["rotten", "fresh"])`).
    num_prompts: P; if P < number of labels, the first P labels are used.
    candidate_ids: as in `vocab_prompt`, for prompts beyond the labels.

  Returns:
    [P, width] float32.
  """
  table = jnp.asarray(embedding_table, jnp.float32)
  rows = []
  for ids in label_token_ids:
    if len(ids) == 0:
      raise ValueError("A label word has no tokens; pass the word pieces of "
                       "each label (see hf_bert.word_token_ids).")
    rows.append(jnp.mean(table[jnp.asarray(ids)], axis=0))
  rows = rows[:num_prompts]
  extra = num_prompts - len(rows)
  if extra:
    rows.append(vocab_prompt(rng, table, extra, candidate_ids))
  return jnp.concatenate([jnp.atleast_2d(r) for r in rows], axis=0)


def set_prompt(params: dict[str, Any], vectors,
               path: Sequence[str] = PROMPT_PATH) -> dict[str, Any]:
  """A copy of `params` with the prompt at `path` replaced by `vectors`."""
  flat = traverse_util.flatten_dict(params)
  path = tuple(path)
  if path not in flat:
    raise KeyError(f"No prompt parameter at {'/'.join(path)}; is num_prompts > 0?")
  if tuple(flat[path].shape) != tuple(np.shape(vectors)):
    raise ValueError(f"Prompt shape {np.shape(vectors)} != parameter shape "
                     f"{tuple(flat[path].shape)}.")
  flat[path] = jnp.asarray(vectors, flat[path].dtype)
  return traverse_util.unflatten_dict(flat)


def trainable_mask(params: dict[str, Any],
                   trainable: Sequence[str] = ("prompt",)) -> dict[str, Any]:
  """Bool tree like `params`: True where a leaf's path starts with a name given.

  Names are '/'-separated path prefixes ('prompt', 'head', 'encoder/pooler').
  A name matching no parameter fails (a typo would silently train nothing).
  """
  flat = traverse_util.flatten_dict(params)
  prefixes = [tuple(t.split("/")) for t in trainable]
  for prefix in prefixes:
    if not any(path[:len(prefix)] == prefix for path in flat):
      tops = sorted({path[0] for path in flat})
      raise ValueError(f"No parameters under {'/'.join(prefix)!r}; top-level "
                       f"names are {tops}.")
  mask = {path: any(path[:len(p)] == p for p in prefixes) for path in flat}
  return traverse_util.unflatten_dict(mask)


def freeze(tx: optax.GradientTransformation,
           mask: dict[str, Any]) -> optax.GradientTransformation:
  """`tx` on the trainable leaves, stateless zero updates on the frozen ones.

  The mask's tree must be the one `tx.init`/`tx.update` see (e.g. a tuple
  `(params_mask, aux_mask)` if the optimizer runs on `(params, aux_params)`).
  """
  labels = jax.tree.map(lambda m: TRAINABLE if m else FROZEN, mask)
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()},
                               labels)


def apply_updates(params: Any, updates: Any, mask: Any) -> Any:
  """optax.apply_updates on trainable leaves; frozen leaves returned untouched.

  `mask` holds Python bools: close over it (or make it static) under jit.
  """
  return jax.tree.map(
      lambda p, u, m: optax.apply_updates(p, u) if m else p,
      params, updates, mask)


def split(params: dict[str, Any], mask: dict[str, Any]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(trainable, frozen) nested dicts; each holds only its own leaves."""
  flat, flat_mask = (traverse_util.flatten_dict(params),
                     traverse_util.flatten_dict(mask))
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return (traverse_util.unflatten_dict(trainable),
          traverse_util.unflatten_dict(frozen))


def merge(trainable: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
  """Inverse of `split` (e.g. a prompt-only checkpoint onto the backbone)."""
  flat = traverse_util.flatten_dict(frozen)
  overlap = set(flat) & set(traverse_util.flatten_dict(trainable))
  if overlap:
    raise ValueError(f"Both trees hold {sorted('/'.join(k) for k in overlap)}.")
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)




# --- Initialisation from the config ----------------------------------------


def backbone_dir(init_from: str) -> str:
  """The HF directory of `init_from='hf_bert:<dir>'` ('hf_bert:' = MiniLM)."""
  from kdjax.weights.importers import hf_bert  # pylint: disable=g-import-not-at-top
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
  from kdjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from kdjax.weights.importers import hf_bert  # pylint: disable=g-import-not-at-top
  model_cfg = config[role].model
  how = model_cfg.get("prompt_init", "random")
  if how == "random" or not model_cfg.get("num_prompts", 0):
    return params
  init_from = config[role].get("init_from", "")
  if not init_from:
    raise config_lib.ConfigError(
        f"config.{role}.model.prompt_init={how!r} copies word embeddings of a "
        f"pretrained backbone, but config.{role}.init_from is '' (random "
        "weights); set it (e.g. 'hf_bert:') or use prompt_init='random'.")
  tokenizer = tokenizer_lib.load(backbone_dir(init_from))
  table = traverse_util.flatten_dict(params)[WORD_EMBEDDINGS_PATH]
  candidates = hf_bert.ordinary_token_ids(tokenizer)
  rng = jax.random.fold_in(jax.random.key(seed), 3)
  num_prompts = int(model_cfg.num_prompts)
  if how == "vocab":
    vectors = vocab_prompt(rng, table, num_prompts, candidates)
  else:
    words = tuple(model_cfg.prompt_init_words)
    label_ids = hf_bert.word_token_ids(tokenizer, words)
    empty = [w for w, ids in zip(words, label_ids) if not ids]
    if empty:
      raise config_lib.ConfigError(
          f"config.{role}.model.prompt_init_words={words!r}: {empty} have no "
          "tokens in the backbone's tokenizer; use real words.")
    vectors = label_word_prompt(rng, table, label_ids, num_prompts, candidates)
  return set_prompt(params, vectors)


# --- Prompt-only export ----------------------------------------------------


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
  trained, frozen = split(params, mask)
  note = {"init_from": init_from, "model": meta.get("model"),
          "seed": meta.get("seed"), "role": meta.get("role"),
          "variant": meta.get("variant", ""),
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
  return merge(trained, traverse_util.unflatten_dict(frozen))


def rebuild(path: str, dummy_inputs) -> tuple[nn.Module, dict[str, Any]]:
  """(model, params) from an export alone, as the run built them: the model
  its note names, initialised with its seed, the backbone imported, the
  prompt initialised, then the export loaded (and verified)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from kdjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from kdjax.weights import pretrained  # pylint: disable=g-import-not-at-top
  note, _ = read_export(path)
  spec = {k: tuple(v) if isinstance(v, list) else v
          for k, v in note["model"].items()}
  model = config_lib.model_from_spec(spec)
  seed = int(note["seed"])
  params = jax.jit(lambda key: model.init(key, dummy_inputs)["params"])(
      jax.random.key(seed))
  params = pretrained.load_pretrained(params, note["init_from"])
  run = ml_collections.ConfigDict(
      {"run": {"model": note["model"], "init_from": note["init_from"]}})
  params = init_from_config(params, run, "run", seed)
  return model, load_onto(params, path)
