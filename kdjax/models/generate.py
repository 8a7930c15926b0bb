"""Text generation through a Llama's KV cache: greedy, temperature, top-k, top-p.

One compiled program per (model, prompt shape, length, sampling settings): the
prompt is prefilled in one call, then `lax.scan` feeds one sampled token at a
time back through the cache. Batches share one prompt length (pack or
left-trim prompts to a common length); rows stop independently at `eos_id`
and are padded with it afterwards.

Sampling order follows transformers' logits processors: divide by the
temperature, keep the top k, keep the smallest set whose probability reaches
top_p, then draw. temperature=0 is greedy (argmax; top-k/top-p are moot).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kdjax.models import llama


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen; hashable, so it is a static jit argument."""
  temperature: float = 0.0  # 0 = greedy.
  top_k: int = 0  # 0 = no top-k filter.
  top_p: float = 1.0  # 1 = no nucleus filter.

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 "
                       "(0 = greedy).")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off).")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = off).")


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """Temperature-scaled logits with filtered-out entries set to -inf."""
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    k = min(sampling.top_k, logits.shape[-1])
    kth = lax.top_k(logits, k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Mass strictly before each entry; an entry is kept while that mass is
    # below top_p, so the most likely token always survives.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = mass_before < sampling.top_p
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1,
                        keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Next token ids [B] from logits [B, V]."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits, sampling),
                                axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens",
                                             "sampling", "eos_id"))
def _generate(params, prompt, rng, *, model: llama.Llama, max_new_tokens: int,
              sampling: Sampling, eos_id: int):
  batch, prompt_length = prompt.shape
  model = model.clone(max_length=prompt_length + max_new_tokens)
  cache = llama.init_cache(model, batch)

  def forward(cache, tokens):
    logits, variables = model.apply({"params": params, "cache": cache}, tokens,
                                    decode=True, mutable=["cache"])
    return variables["cache"], logits[:, -1]

  cache, logits = forward(cache, prompt)
  rngs = jax.random.split(rng, max_new_tokens)
  done = jnp.zeros((batch,), bool)

  def pick(logits, rng, done):
    token = sample(logits, rng, sampling)
    if eos_id >= 0:
      token = jnp.where(done, eos_id, token)
      done = done | (token == eos_id)
    return token, done

  def step(carry, rng):
    cache, logits, done = carry
    token, done = pick(logits, rng, done)
    cache, logits = forward(cache, token[:, None])
    return (cache, logits, done), token

  # The last token needs no forward pass after it.
  (_, logits, done), tokens = lax.scan(step, (cache, logits, done), rngs[:-1])
  last, _ = pick(logits, rngs[-1], done)
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def generate(model: llama.Llama, params, prompt, *, max_new_tokens: int,
             sampling: Sampling = Sampling(), rng: jax.Array | None = None,
             eos_id: int = -1) -> np.ndarray:
  """Continuations [B, max_new_tokens] of prompt ids [B, P] (one compiled call).

  Rows that produce `eos_id` (>= 0) are padded with it afterwards. The cache
  holds exactly P + max_new_tokens positions, whatever model.max_length says.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, length >= 1] token ids, got "
                     f"shape {prompt.shape}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
  rng = jax.random.key(0) if rng is None else rng
  return np.asarray(_generate(params, prompt, rng, model=model,
                              max_new_tokens=int(max_new_tokens),
                              sampling=sampling, eos_id=int(eos_id)))


def tokens_per_second(model: llama.Llama, params, prompt, *,
                      max_new_tokens: int, repeats: int = 2) -> float:
  """Generated tokens per second (greedy, batch = len(prompt)), after a compile
  run; the median of `repeats` timed calls."""
  generate(model, params, prompt, max_new_tokens=max_new_tokens)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    generate(model, params, prompt, max_new_tokens=max_new_tokens)
    times.append(time.perf_counter() - start)
  return len(prompt) * max_new_tokens / float(np.median(times))
