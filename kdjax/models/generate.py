"""Text generation through a Llama's KV cache: greedy, temperature, top-k, top-p.

One compiled program per (model, prompt shape, length, sampling settings): the
prompt is prefilled in one call, then `lax.scan` feeds one sampled token at a
time back through the cache. `generate` takes prompts of one common length;
`generate_padded` (and its jitted core `generate_padded_jit`, callable inside
another jitted program, e.g. an on-policy distillation step) takes LEFT-padded
prompts of different lengths: the attention mask hides the pads and each row's
positions start at 0 on its first real token, so a row generates what it
would alone. Rows stop independently at `eos_id` and are padded with it
afterwards. `right_align` turns prompts + completions into training rows.

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
  """Next token ids [B] from logits [B, V]; `rng` one key, or one per row
  ([B] keys: a row's draw then does not depend on the rest of the batch)."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, sampling)
  if rng.ndim:
    return jax.vmap(jax.random.categorical)(rng, filtered).astype(jnp.int32)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def _decode(params, prompt, prompt_lengths, rng, model: llama.Llama,
            max_new_tokens: int, sampling: Sampling, eos_id: int):
  """The prefill + scan; prompt_lengths None = every row is all real tokens
  (then the model runs without a mask, exactly as before padding existed)."""
  batch, prompt_length = prompt.shape
  model = model.clone(max_length=prompt_length + max_new_tokens)
  cache = llama.init_cache(model, batch)

  def forward(cache, tokens, **kwargs):
    logits, variables = model.apply({"params": params, "cache": cache}, tokens,
                                    decode=True, mutable=["cache"], **kwargs)
    return variables["cache"], logits[:, -1]

  if prompt_lengths is None:
    cache, logits = forward(cache, prompt)
    placed = lambda t: {}
  else:
    pads = prompt_length - prompt_lengths  # [B]
    slots = jnp.arange(prompt_length)[None, :] - pads[:, None]
    cache, logits = forward(cache, prompt, positions=jnp.maximum(slots, 0),
                            attention_mask=slots >= 0)
    # Generated token t sits at position prompt_length[b] + t.
    placed = lambda t: {"positions": (prompt_lengths + t)[:, None]}
  if rng.ndim:  # [B] keys -> [max_new_tokens, B].
    rngs = jnp.swapaxes(
        jax.vmap(lambda key: jax.random.split(key, max_new_tokens))(rng), 0, 1)
  else:
    rngs = jax.random.split(rng, max_new_tokens)
  done = jnp.zeros((batch,), bool)

  def pick(logits, rng, done):
    token = sample(logits, rng, sampling)
    if eos_id >= 0:
      token = jnp.where(done, eos_id, token)
      done = done | (token == eos_id)
    return token, done

  def step(carry, inputs):
    cache, logits, done = carry
    rng, t = inputs
    token, done = pick(logits, rng, done)
    cache, logits = forward(cache, token[:, None], **placed(t))
    return (cache, logits, done), token

  # The last token needs no forward pass after it.
  (_, logits, done), tokens = lax.scan(
      step, (cache, logits, done),
      (rngs[:-1], jnp.arange(max_new_tokens - 1, dtype=jnp.int32)))
  last, _ = pick(logits, rngs[-1], done)
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens",
                                             "sampling", "eos_id"))
def _generate(params, prompt, rng, *, model: llama.Llama, max_new_tokens: int,
              sampling: Sampling, eos_id: int):
  return _decode(params, prompt, None, rng, model, max_new_tokens, sampling,
                 eos_id)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens",
                                             "sampling", "eos_id"))
def generate_padded_jit(params, prompts: jax.Array, prompt_lengths: jax.Array,
                        rng: jax.Array, *, model: llama.Llama,
                        max_new_tokens: int, sampling: Sampling = Sampling(),
                        eos_id: int = -1) -> jax.Array:
  """int32 [B, max_new_tokens] continuations of LEFT-padded prompts [B, P]
  with real lengths prompt_lengths [B] (each in 1..P, not checked here).

  Pure arrays in and out, so it also runs inside another jitted program; one
  compile per (model, P, batch, max_new_tokens, sampling, eos_id). `rng`: one
  key, or [B] keys, one per row (on-policy distillation derives each from
  the example, so rollouts do not depend on how the batch is split).
  """
  return _decode(params, prompts.astype(jnp.int32),
                 prompt_lengths.astype(jnp.int32), rng, model, max_new_tokens,
                 sampling, eos_id)


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


def generate_padded(model: llama.Llama, params, prompts, prompt_lengths, *,
                    max_new_tokens: int, sampling: Sampling = Sampling(),
                    rng: jax.Array | None = None,
                    eos_id: int = -1) -> np.ndarray:
  """Continuations [B, max_new_tokens] of LEFT-padded prompts [B, P] whose
  rows hold prompt_lengths[b] real tokens at the end (pad ids are ignored).

  Row b continues as `generate` would continue prompts[b, P - len_b:] alone
  (greedy: the same ids). `rng`: one key for the batch, or [B] keys, one
  per row.
  """
  prompts = jnp.asarray(prompts, jnp.int32)
  if prompts.ndim != 2 or prompts.shape[1] < 1:
    raise ValueError(f"prompts must be [batch, length >= 1] token ids, got "
                     f"shape {prompts.shape}.")
  lengths = np.asarray(prompt_lengths)
  if lengths.shape != prompts.shape[:1]:
    raise ValueError(f"prompt_lengths must be [batch={prompts.shape[0]}], "
                     f"got shape {lengths.shape}.")
  if lengths.size and (lengths.min() < 1 or lengths.max() > prompts.shape[1]):
    raise ValueError(f"prompt_lengths must lie in 1..{prompts.shape[1]}, got "
                     f"{lengths.tolist()}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
  rng = jax.random.key(0) if rng is None else rng
  return np.asarray(generate_padded_jit(
      params, prompts, jnp.asarray(lengths, jnp.int32), rng, model=model,
      max_new_tokens=int(max_new_tokens), sampling=sampling,
      eos_id=int(eos_id)))


def right_align(prompts: jax.Array, prompt_lengths: jax.Array,
                completions: jax.Array,
                eos_id: int) -> tuple[jax.Array, jax.Array]:
  """Left-padded prompts [B, P] + completions [B, N] -> training rows.

  Returns (tokens int32 [B, P + N], completion_mask float32 [B, P + N]): row b
  is prompts[b, P - len_b:], then its completion, then padding (eos_id, or 0
  without one), so every pad comes after every real token and a plain causal
  forward needs no attention mask. The mask is 1 on completion tokens up to
  and including the first `eos_id` (all of them if eos_id < 0 or none
  occurs); train on inputs = tokens[:, :-1], labels = tokens[:, 1:],
  mask = completion_mask[:, 1:]. Pure jnp: jit-friendly.
  """
  prompts = jnp.asarray(prompts, jnp.int32)
  completions = jnp.asarray(completions, jnp.int32)
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  prompt_length, new = prompts.shape[1], completions.shape[1]
  total = prompt_length + new
  joined = jnp.concatenate([prompts, completions], axis=1)
  source = (jnp.arange(total)[None, :]
            + (prompt_length - lengths)[:, None])  # Slot in `joined`.
  inside = source < total
  tokens = jnp.take_along_axis(joined, jnp.minimum(source, total - 1), axis=1)
  tokens = jnp.where(inside, tokens, max(eos_id, 0))
  if eos_id >= 0:
    is_eos = (completions == eos_id).astype(jnp.int32)
    kept = jnp.cumsum(is_eos, axis=1) - is_eos == 0  # Through the first EOS.
  else:
    kept = jnp.ones(completions.shape, bool)
  completion = source - prompt_length  # Index into completions; < 0: prompt.
  kept = jnp.take_along_axis(kept, jnp.clip(completion, 0, new - 1), axis=1)
  mask = (completion >= 0) & inside & kept
  return tokens, mask.astype(jnp.float32)


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
