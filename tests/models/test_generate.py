"""Generation through the KV cache agrees with full forwards; filters match numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdjax.models import generate as gen
from kdjax.models import llama
from kdjax.models.partitioning import unbox

MODEL = llama.Llama(vocab_size=53, width=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, mlp_dim=48, max_length=64)


@pytest.fixture(scope="module")
def params():
  """Weights 12x the init: at init scale greedy decoding repeats one token
  whatever it attends to, so a cache read from the wrong slots or the wrong
  row would go unnoticed (tests/models/test_generate_padded.py does the
  same)."""
  params = unbox(jax.jit(lambda key: MODEL.init(
      key, jnp.zeros((1, 4), jnp.int32)))(jax.random.key(0))["params"])
  return jax.tree.map(lambda x: x * 12 if x.ndim >= 2 else x, params)


def _assert_not_one_repeated_token(generated):
  for row in np.asarray(generated):
    assert len(np.unique(row)) > 3, f"degenerate greedy output {row}"


@jax.jit
def _forward(params, tokens):
  return MODEL.apply({"params": params}, tokens)


def _greedy_without_cache(params, prompt, n):
  """Full forwards over a fixed-size buffer (causal: later slots are unseen)."""
  batch, length = prompt.shape
  tokens = np.zeros((batch, length + n), np.int32)
  tokens[:, :length] = prompt
  for t in range(length, length + n):
    logits = np.asarray(_forward(params, jnp.asarray(tokens)))
    tokens[:, t] = np.argmax(logits[:, t - 1], -1)
  return tokens[:, length:]


def _logits_through_cache(params, prompt, fed):
  """Logits [B, P + n, V] of the prompt prefilled into the KV cache in one
  call, then of the tokens `fed` [B, n] fed back one at a time."""
  model = MODEL.clone(max_length=prompt.shape[1] + fed.shape[1])
  decode = jax.jit(lambda cache, t: model.apply(
      {"params": params, "cache": cache}, t, decode=True, mutable=["cache"]))
  logits, state = decode(llama.init_cache(model, prompt.shape[0]), prompt)
  chunks = [logits]
  for t in range(fed.shape[1]):
    logits, state = decode(state["cache"], fed[:, t:t + 1])
    chunks.append(logits)
  return np.concatenate(chunks, axis=1)


def test_greedy_with_cache_equals_full_forwards(params):
  prompt = np.random.default_rng(0).integers(0, 53, (3, 5))
  cached = gen.generate(MODEL, params, prompt, max_new_tokens=10)
  np.testing.assert_array_equal(cached,
                                _greedy_without_cache(params, prompt, 10))
  _assert_not_one_repeated_token(cached)
  # Not only the argmax: every logit read through the cache is the full
  # forward's.
  through_cache = _logits_through_cache(params, prompt, cached)
  full = np.asarray(_forward(params, np.concatenate([prompt, cached], 1)))
  assert through_cache.shape == full.shape == (3, 15, 53)
  np.testing.assert_allclose(through_cache, full,
                             atol=1e-5 * np.abs(full).max(), rtol=0)


def test_batch_rows_are_independent(params):
  prompt = np.random.default_rng(1).integers(0, 53, (2, 4))
  both = gen.generate(MODEL, params, prompt, max_new_tokens=10)
  _assert_not_one_repeated_token(both)
  assert not np.array_equal(both[0], both[1])  # Different prompts, outputs.
  for i in range(2):
    alone = gen.generate(MODEL, params, prompt[i:i + 1], max_new_tokens=10)
    np.testing.assert_array_equal(both[i:i + 1], alone, err_msg=f"row {i}")


def test_rows_stop_at_eos(params):
  prompt = np.random.default_rng(2).integers(0, 53, (2, 4))
  free = gen.generate(MODEL, params, prompt, max_new_tokens=6)
  eos = int(free[0, 1])  # A token row 0 is known to produce at step 1.
  stopped = gen.generate(MODEL, params, prompt, max_new_tokens=6, eos_id=eos)
  np.testing.assert_array_equal(stopped[0, :2], free[0, :2])
  assert (stopped[0, 2:] == eos).all()
  first = np.argmax(free[1] == eos) if (free[1] == eos).any() else 6
  np.testing.assert_array_equal(stopped[1, :first], free[1, :first])


def _numpy_filter(logits, temperature, top_k, top_p):
  x = logits.astype(np.float64) / temperature
  if top_k:
    kth = np.sort(x)[-top_k]
    x = np.where(x < kth, -np.inf, x)
  if top_p < 1:
    order = np.argsort(-x)
    p = np.exp(x[order] - x[order][0])
    p /= p.sum()
    keep = np.cumsum(p) - p < top_p
    removed = order[~keep]
    x = x.copy()
    x[removed] = -np.inf
  return x


@settings(deadline=None, max_examples=30)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.5, 1.0, 2.0]),
       st.integers(0, 12), st.sampled_from([1.0, 0.9, 0.5, 0.1]))
def test_filters_match_numpy(seed, temperature, top_k, top_p):
  logits = np.random.default_rng(seed).normal(0, 3, (20,)).astype(np.float32)
  got = np.asarray(gen.filter_logits(
      jnp.asarray(logits), gen.Sampling(temperature, top_k, top_p)))
  want = _numpy_filter(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  finite = np.isfinite(want)
  np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6)


def test_sampling_frequencies_follow_the_filtered_softmax():
  logits = jnp.asarray([2.0, 1.5, 1.0, 0.0, -1.0])
  rngs = jax.random.split(jax.random.key(3), 20000)
  draw = jax.vmap(lambda r: gen.sample(logits[None], r, gen.Sampling(
      temperature=1.0, top_k=3))[0])
  counts = np.bincount(np.asarray(draw(rngs)), minlength=5) / 20000
  p = np.exp(np.array([2.0, 1.5, 1.0]))
  p /= p.sum()
  np.testing.assert_allclose(counts[:3], p, atol=0.015)
  assert counts[3:].sum() == 0


def test_bad_settings_fail_clearly(params):
  with pytest.raises(ValueError, match="top_p"):
    gen.Sampling(temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    gen.Sampling(temperature=-1.0)
  with pytest.raises(ValueError, match="prompt"):
    gen.generate(MODEL, params, np.zeros((3,), np.int32), max_new_tokens=2)
