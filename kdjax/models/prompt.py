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
out). Write the result into the params with `set_prompt`; the engine does it
from the config with kdjax.weights.prompt.init_from_config, right after the
pretrained weights are loaded, so the vectors are the imported model's
embeddings. The label words are NOT cycled over all P vectors (as PEFT's text
init repeats its tokens): prompt vectors get no position embedding here, so
two equal vectors get equal gradients forever (exactly, without dropout) and
P = 20 would collapse to 2.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kdjax.models import partitioning

PROMPT_PATH = ("prompt", "embedding")
WORD_EMBEDDINGS_PATH = ("encoder", "embeddings", "word_embeddings", "embedding")
PROMPT_INITS = ("random", "vocab", "labels")


class SoftPrompt(nn.Module):
  """P trainable vectors [P, width] (random normal init; see vocab_prompt)."""
  num_prompts: int
  width: int
  init_std: float = 0.05

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("embedding",
                      partitioning.param(nn.initializers.normal(self.init_std),
                                         ("length", "embed")),
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
