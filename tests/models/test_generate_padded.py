"""Left-padded batches of prompts of different lengths generate, row by row,
what each prompt generates alone; right_align builds on-policy training rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.models import generate as gen
from kdjax.models import llama, stacking
from kdjax.models.partitioning import unbox

FIELDS = dict(vocab_size=50, width=32, num_layers=2, num_heads=4,
              num_kv_heads=2, mlp_dim=48, max_length=32)
MODEL = llama.Llama(**FIELDS)
LENGTHS = np.array([2, 5, 7, 1])
P = 7


@pytest.fixture(scope="module")
def params():
  """Weights 8x the init: at init scale a tied model mostly repeats its last
  token, whatever it attends to, and a broken mask would go unnoticed."""
  params = unbox(jax.jit(lambda key: MODEL.init(
      key, jnp.zeros((1, 4), jnp.int32)))(jax.random.key(0))["params"])
  return jax.tree.map(lambda x: x * 8 if x.ndim >= 2 else x, params)


def _left_padded(lengths=LENGTHS, width=P, seed=0, pad=0):
  """Random prompts, LEFT-padded with `pad` to [B, width]."""
  rng = np.random.default_rng(seed)
  prompts = np.full((len(lengths), width), pad, np.int32)
  for b, n in enumerate(lengths):
    prompts[b, width - n:] = rng.integers(0, FIELDS["vocab_size"], n)
  return prompts


def _positions(lengths, width):
  return np.maximum(np.arange(width)[None] - (width - lengths)[:, None], 0)


def _real(lengths, width):
  return np.arange(width)[None] >= (width - lengths)[:, None]


@functools.lru_cache(maxsize=None)
def _apply(model):
  return jax.jit(model.apply)


def test_greedy_rows_equal_each_prompt_alone(params):
  prompts = _left_padded()
  batch = gen.generate_padded(MODEL, params, prompts, LENGTHS,
                              max_new_tokens=9)
  assert batch.shape == (4, 9) and batch.dtype == np.int32
  for b, n in enumerate(LENGTHS):
    alone = gen.generate(MODEL, params, prompts[b:b + 1, P - n:],
                         max_new_tokens=9)
    np.testing.assert_array_equal(batch[b:b + 1], alone, err_msg=f"row {b}")


def test_pad_ids_do_not_matter(params):
  zeros = gen.generate_padded(MODEL, params, _left_padded(pad=0), LENGTHS,
                              max_new_tokens=6)
  others = gen.generate_padded(MODEL, params, _left_padded(pad=13), LENGTHS,
                               max_new_tokens=6)
  np.testing.assert_array_equal(zeros, others)


@pytest.mark.parametrize("decode", [False, True])
def test_padded_logits_equal_unpadded_forward(params, decode):
  """The real slots of a left-padded forward (and of the decode prefill) give
  the logits each prompt gets alone; pad slots stay finite."""
  prompts = _left_padded()
  kwargs = dict(positions=_positions(LENGTHS, P),
                attention_mask=_real(LENGTHS, P))
  if decode:
    logits, _ = MODEL.apply({"params": params,
                             "cache": llama.init_cache(MODEL, len(LENGTHS))},
                            prompts, decode=True, mutable=["cache"], **kwargs)
  else:
    logits = MODEL.apply({"params": params}, prompts, **kwargs)
  assert np.isfinite(np.asarray(logits)).all()
  for b, n in enumerate(LENGTHS):
    alone = _apply(MODEL)({"params": params}, prompts[b:b + 1, P - n:])
    np.testing.assert_allclose(logits[b, P - n:], alone[0], atol=1e-5, rtol=0)


def test_common_length_equals_generate(params):
  prompts = _left_padded(lengths=[P, P, P])
  np.testing.assert_array_equal(
      gen.generate_padded(MODEL, params, prompts, [P] * 3, max_new_tokens=7),
      gen.generate(MODEL, params, prompts, max_new_tokens=7))


def test_sampling_is_deterministic_and_stops_at_eos(params):
  prompts = _left_padded(seed=3)
  sampling = gen.Sampling(temperature=1.0)
  key = jax.random.key(7)
  run = functools.partial(gen.generate_padded, MODEL, params, prompts,
                          LENGTHS, max_new_tokens=10, sampling=sampling,
                          rng=key)
  free = run()
  np.testing.assert_array_equal(free, run())
  assert len(np.unique(free)) > 5  # Sampled, not one repeated token.
  eos = int(free[0, 2])  # A token row 0 is known to draw at step 2.
  stopped = run(eos_id=eos)
  hits = 0
  for b in range(len(LENGTHS)):
    at = np.flatnonzero(free[b] == eos)
    first = int(at[0]) if at.size else free.shape[1]
    # The same draws up to and including the first EOS, EOS after it.
    np.testing.assert_array_equal(stopped[b, :first + 1], free[b, :first + 1])
    assert (stopped[b, first:] == eos).all()
    hits += at.size > 0
  assert hits >= 1 and (stopped[0, 3:] == eos).all()


@pytest.mark.parametrize("extra", [dict(scan_layers=True),
                                   dict(scan_layers=True, remat="full")])
def test_scanned_and_remat_layers_generate_the_same(params, extra):
  model = llama.Llama(**FIELDS, **extra)
  layers = (stacking.stack(params, "layers") if extra.get("scan_layers")
            else params)
  prompts = _left_padded(seed=4)
  sampling = gen.Sampling(temperature=1.0, top_k=10)
  for kwargs in (dict(), dict(sampling=sampling, rng=jax.random.key(1))):
    np.testing.assert_array_equal(
        gen.generate_padded(model, layers, prompts, LENGTHS, max_new_tokens=6,
                            **kwargs),
        gen.generate_padded(MODEL, params, prompts, LENGTHS, max_new_tokens=6,
                            **kwargs))


def test_jitted_core_runs_inside_another_jit(params):
  prompts, lengths = _left_padded(seed=5), jnp.asarray(LENGTHS)
  eos = 3

  @jax.jit
  def rollout(params, prompts, lengths, key):
    completions = gen.generate_padded_jit(
        params, prompts, lengths, key, model=MODEL, max_new_tokens=5,
        sampling=gen.Sampling(temperature=1.0), eos_id=eos)
    return completions, gen.right_align(prompts, lengths, completions, eos)

  completions, (tokens, mask) = rollout(params, prompts, lengths,
                                        jax.random.key(2))
  np.testing.assert_array_equal(
      completions,
      gen.generate_padded(MODEL, params, prompts, LENGTHS, max_new_tokens=5,
                          sampling=gen.Sampling(temperature=1.0),
                          rng=jax.random.key(2), eos_id=eos))
  assert tokens.shape == mask.shape == (4, P + 5)


def test_bad_lengths_are_refused(params):
  prompts = _left_padded()
  for lengths in ([0, 5, 7, 1], [2, 5, 8, 1], [2, 5, 7]):
    with pytest.raises(ValueError, match="prompt_lengths"):
      gen.generate_padded(MODEL, params, prompts, lengths, max_new_tokens=2)


# --- right_align. ------------------------------------------------------------


def test_right_align_with_eos():
  prompts = np.array([[0, 0, 5, 6], [1, 2, 3, 4], [0, 0, 0, 7]])
  completions = np.array([[8, 9, 9], [10, 11, 12], [9, 9, 9]])
  tokens, mask = gen.right_align(prompts, np.array([2, 4, 1]), completions,
                                 eos_id=9)
  np.testing.assert_array_equal(tokens, [[5, 6, 8, 9, 9, 9, 9],
                                         [1, 2, 3, 4, 10, 11, 12],
                                         [7, 9, 9, 9, 9, 9, 9]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 0, 0, 0],
                                       [0, 0, 0, 0, 1, 1, 1],
                                       [0, 1, 0, 0, 0, 0, 0]])
  assert tokens.dtype == jnp.int32 and mask.dtype == jnp.float32


def test_right_align_without_eos_and_under_jit():
  prompts = np.array([[0, 4, 5], [6, 7, 8]])
  completions = np.array([[1, 2], [9, 1]])
  expected_tokens = [[4, 5, 1, 2, 0], [6, 7, 8, 9, 1]]
  expected_mask = [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
  # eos_id=-1: no stop token; 1 is then an ordinary id.
  aligned = jax.jit(functools.partial(gen.right_align, eos_id=-1))
  for fn in (functools.partial(gen.right_align, eos_id=-1), aligned):
    tokens, mask = fn(prompts, np.array([2, 3]), completions)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(mask, expected_mask)
  # An EOS in the last slot is kept; nothing follows it.
  tokens, mask = gen.right_align(prompts, np.array([2, 3]), completions,
                                 eos_id=1)
  np.testing.assert_array_equal(tokens, [[4, 5, 1, 2, 1], [6, 7, 8, 9, 1]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 0, 0], [0, 0, 0, 1, 1]])


def test_per_row_keys_make_a_row_independent_of_its_batch(params):
  """With one key per row, a row's sampled continuation is the same alone
  and inside any batch (on-policy rollouts must not depend on the device
  count that splits the batch)."""
  prompts = _left_padded()
  keys = jax.random.split(jax.random.key(7), len(LENGTHS))
  sampling = gen.Sampling(temperature=1.0)
  together = gen.generate_padded(MODEL, params, prompts, LENGTHS,
                                 max_new_tokens=6, sampling=sampling, rng=keys)
  for b in range(len(LENGTHS)):
    alone = gen.generate_padded(
        MODEL, params, prompts[b:b + 1], LENGTHS[b:b + 1], max_new_tokens=6,
        sampling=sampling, rng=keys[b:b + 1])
    np.testing.assert_array_equal(alone[0], together[b], err_msg=f"row {b}")
  shared = gen.generate_padded(MODEL, params, prompts, LENGTHS,
                               max_new_tokens=6, sampling=sampling,
                               rng=keys[0])
  assert not np.array_equal(shared, together)
