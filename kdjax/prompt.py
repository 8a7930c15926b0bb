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
out). Write the result into the params with `set_prompt`.

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
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

TRAINABLE, FROZEN = "trainable", "frozen"
PROMPT_PATH = ("prompt", "embedding")


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


def count_params(params: Any, mask: Any | None = None) -> int:
  """Number of parameters (only the trainable ones if a mask is given)."""
  sizes = jax.tree.map(lambda p: int(np.size(p)), params)
  if mask is not None:
    sizes = jax.tree.map(lambda s, m: s if m else 0, sizes, mask)
  return int(sum(jax.tree.leaves(sizes)))

