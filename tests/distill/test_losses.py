"""Tests for kdjax.distill.losses: float64 numpy references, properties, numerics."""

import functools
import zlib

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from kdjax.distill import losses

# ----------------------------------------------------------------------------
# float64 numpy references, written from the definitions (not from the code).
# ----------------------------------------------------------------------------


def _np_log_softmax(x, temperature=1.0):
  x = np.asarray(x, np.float64) / temperature
  m = np.max(x, axis=-1, keepdims=True)
  z = x - m
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _np_kl(log_p, log_q):
  p = np.exp(log_p)
  with np.errstate(invalid='ignore'):
    terms = np.where(p > 0, p * (log_p - log_q), 0.0)
  return terms.sum(-1)


def _np_log_mix(log_a, log_b, weight):
  """log(weight * a + (1 - weight) * b), in log space (huge logits)."""
  with np.errstate(divide='ignore'):
    return np.logaddexp(np.log(weight) + log_a, np.log(1 - weight) + log_b)


def _np_masked_logsumexp(x, mask):
  x = np.where(mask, x, -np.inf)
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide='ignore'):
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def ref_forward_kl(s, t, temperature):
  log_p = _np_log_softmax(t, temperature)
  log_q = _np_log_softmax(s, temperature)
  return _np_kl(log_p, log_q)


def ref_reverse_kl(s, t, temperature):
  log_p = _np_log_softmax(t, temperature)
  log_q = _np_log_softmax(s, temperature)
  return _np_kl(log_q, log_p)


def ref_jsd(s, t, temperature, beta):
  if beta == 0:
    return ref_forward_kl(s, t, temperature)
  if beta == 1:
    return ref_reverse_kl(s, t, temperature)
  log_p = _np_log_softmax(t, temperature)
  log_q = _np_log_softmax(s, temperature)
  log_m = _np_log_mix(log_p, log_q, beta)
  return beta * _np_kl(log_p, log_m) + (1 - beta) * _np_kl(log_q, log_m)


def ref_skew_forward_kl(s, t, temperature, lam):
  log_p = _np_log_softmax(t, temperature)
  log_q = _np_log_softmax(s, temperature)
  return _np_kl(log_p, _np_log_mix(log_p, log_q, lam))


def ref_skew_reverse_kl(s, t, temperature, lam):
  log_p = _np_log_softmax(t, temperature)
  log_q = _np_log_softmax(s, temperature)
  return _np_kl(log_q, _np_log_mix(log_q, log_p, lam))


def ref_tvd(s, t, temperature):
  p = np.exp(_np_log_softmax(t, temperature))
  q = np.exp(_np_log_softmax(s, temperature))
  return 0.5 * np.abs(p - q).sum(-1)


def ref_mse(s, t, temperature):
  s = np.asarray(s, np.float64) / temperature
  t = np.asarray(t, np.float64) / temperature
  valid = np.isfinite(s) & np.isfinite(t)
  sq = np.square(np.where(valid, s, 0.0) - np.where(valid, t, 0.0))
  return sq.sum(-1) / valid.sum(-1)


def ref_soft_ce(s, t, temperature):
  p = np.exp(_np_log_softmax(t, temperature))
  log_q = _np_log_softmax(s, temperature)
  return -np.where(p > 0, p * np.where(p > 0, log_q, 0.0), 0.0).sum(-1)


def ref_hard_ce(s, t, temperature):
  del temperature  # Hard labels: T never applies.
  labels = np.argmax(np.asarray(t, np.float64), axis=-1)
  log_q = _np_log_softmax(s)
  return -np.take_along_axis(log_q, labels[..., None], axis=-1)[..., 0]


def ref_topk_kl(s, t, temperature, k):
  log_p = _np_log_softmax(t, temperature)
  log_q = _np_log_softmax(s, temperature)
  idx = np.argsort(-log_p, axis=-1, kind='stable')[..., :k]
  in_topk = np.zeros(log_p.shape, bool)
  np.put_along_axis(in_topk, idx, True, axis=-1)
  log_p_buckets = np.concatenate(
      [np.take_along_axis(log_p, idx, -1),
       _np_masked_logsumexp(log_p, ~in_topk)[..., None]], axis=-1)
  log_q_buckets = np.concatenate(
      [np.take_along_axis(log_q, idx, -1),
       _np_masked_logsumexp(log_q, ~in_topk)[..., None]], axis=-1)
  return _np_kl(log_p_buckets, log_q_buckets)


# (registry name, options, reference, scaled by T**2 by default).
CASES = [
    ('forward_kl', {}, ref_forward_kl, True),
    ('reverse_kl', {}, ref_reverse_kl, True),
    ('jsd', {'beta': 0.0}, functools.partial(ref_jsd, beta=0.0), True),
    ('jsd', {'beta': 0.3}, functools.partial(ref_jsd, beta=0.3), True),
    ('jsd', {'beta': 0.5}, functools.partial(ref_jsd, beta=0.5), True),
    ('jsd', {'beta': 1.0}, functools.partial(ref_jsd, beta=1.0), True),
    ('skew_kl', {'lam': 0.1}, functools.partial(ref_skew_forward_kl, lam=0.1),
     True),
    ('skew_kl', {'lam': 0.6}, functools.partial(ref_skew_forward_kl, lam=0.6),
     True),
    ('skew_reverse_kl', {'lam': 0.1},
     functools.partial(ref_skew_reverse_kl, lam=0.1), True),
    ('skew_reverse_kl', {'lam': 0.0},
     functools.partial(ref_skew_reverse_kl, lam=0.0), True),
    ('tvd', {}, ref_tvd, True),
    ('mse', {}, ref_mse, True),
    ('soft_ce', {}, ref_soft_ce, True),
    ('hard_ce', {}, ref_hard_ce, False),
    ('topk_kl', {'k': 1}, functools.partial(ref_topk_kl, k=1), True),
    ('topk_kl', {'k': 3}, functools.partial(ref_topk_kl, k=3), True),
]
CASE_IDS = [name + ''.join(f'-{k}={v}' for k, v in opts.items())
            for name, opts, _, _ in CASES]

SHAPES = [(9,), (4, 9), (2, 3, 11), (2, 4, 50)]
TEMPERATURES = [1.0, 0.5, 2.0, 4.0]


def _random_logits(rng, shape, scale=3.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _tolerance(temperature):
  return dict(rtol=2e-5, atol=2e-5 * max(1.0, temperature**2))


def _call(name, s, t, temperature=1.0, **options):
  return losses.get_objective(name)(s, t, temperature=temperature, **options)


# ----------------------------------------------------------------------------
# Against the references.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('shape', SHAPES, ids=str)
@pytest.mark.parametrize('name,options,ref,scaled', CASES, ids=CASE_IDS)
def test_matches_float64_reference(name, options, ref, scaled, shape):
  rng = np.random.default_rng(zlib.crc32(f'{name}{options}{shape}'.encode()))
  s = _random_logits(rng, shape)
  t = _random_logits(rng, shape)
  fn = losses.get_objective(name)
  for temperature in TEMPERATURES:
    expected = ref(s, t, temperature)
    factor = temperature**2 if scaled else 1.0
    got = fn(s, t, temperature=temperature, **options)
    assert got.shape == shape[:-1]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, factor * expected,
                               **_tolerance(temperature))
    unscaled = fn(s, t, temperature=temperature,
                  scale_by_temperature_squared=False, **options)
    np.testing.assert_allclose(unscaled, expected, **_tolerance(1.0))


def test_softmax_cross_entropy_matches_reference():
  rng = np.random.default_rng(0)
  logits = _random_logits(rng, (2, 3, 11))
  labels = rng.integers(0, 11, size=(2, 3))
  log_q = _np_log_softmax(logits)
  expected = -np.take_along_axis(log_q, labels[..., None], -1)[..., 0]
  got = losses.softmax_cross_entropy(logits, labels)
  assert got.shape == (2, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_forward_kl_keeps_legacy_signature():
  rng = np.random.default_rng(1)
  s, t = _random_logits(rng, (4, 9)), _random_logits(rng, (4, 9))
  np.testing.assert_allclose(
      losses.forward_kl(s, t, temperature=2.0,
                        scale_by_temperature_squared=True),
      4.0 * ref_forward_kl(s, t, 2.0), rtol=2e-5, atol=1e-4)
  np.testing.assert_allclose(losses.forward_kl(s, t),
                             ref_forward_kl(s, t, 1.0), rtol=2e-5, atol=2e-5)


def test_entropy_matches_reference():
  rng = np.random.default_rng(2)
  x = _random_logits(rng, (4, 9))
  log_p = _np_log_softmax(x, 2.0)
  expected = -(np.exp(log_p) * log_p).sum(-1)
  np.testing.assert_allclose(losses.entropy(x, temperature=2.0), expected,
                             rtol=2e-5, atol=2e-5)


def test_hard_ce_ignores_temperature():
  rng = np.random.default_rng(3)
  s, t = _random_logits(rng, (4, 9)), _random_logits(rng, (4, 9))
  np.testing.assert_array_equal(_call('hard_ce', s, t, temperature=1.0),
                                _call('hard_ce', s, t, temperature=5.0))


def test_bfloat16_inputs_are_upcast():
  rng = np.random.default_rng(4)
  s = jnp.asarray(_random_logits(rng, (2, 3, 11)), jnp.bfloat16)
  t = jnp.asarray(_random_logits(rng, (2, 3, 11)), jnp.bfloat16)
  s32, t32 = s.astype(jnp.float32), t.astype(jnp.float32)
  for name, options, ref, scaled in CASES:
    got = _call(name, s, t, 2.0, **options)
    assert got.dtype == jnp.float32, name
    factor = 4.0 if scaled else 1.0
    np.testing.assert_allclose(got, factor * ref(s32, t32, 2.0),
                               **_tolerance(2.0), err_msg=name)


def test_objectives_jit_with_traced_temperature():
  rng = np.random.default_rng(5)
  s, t = _random_logits(rng, (4, 9)), _random_logits(rng, (4, 9))
  first_per_name = {name: options for name, options, _, _ in reversed(CASES)}
  for name, options in first_per_name.items():
    fn = functools.partial(losses.get_objective(name), **options)
    jitted = jax.jit(lambda a, b, temp, fn=fn: fn(a, b, temperature=temp))
    np.testing.assert_allclose(jitted(s, t, jnp.float32(2.0)),
                               fn(s, t, temperature=2.0),
                               rtol=1e-5, atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------
# Properties (hypothesis).
# ----------------------------------------------------------------------------

_VOCAB = 9
_logits = hnp.arrays(np.float32, (4, _VOCAB),
                     elements=st.floats(-30, 30, width=32))
_temperatures = st.sampled_from([0.5, 1.0, 2.0, 5.0])
_PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)

# Objectives that are divergences: zero iff the distributions agree.
DIVERGENCES = [(n, o) for n, o, _, _ in CASES
               if n not in ('mse', 'soft_ce', 'hard_ce')]


@_PROPERTY_SETTINGS
@given(s=_logits, t=_logits, temperature=_temperatures)
def test_all_objectives_non_negative(s, t, temperature):
  for name, options, _, _ in CASES:
    value = np.asarray(_call(name, s, t, temperature, **options))
    assert np.all(np.isfinite(value)), name
    assert np.all(value >= -1e-5 * max(1.0, temperature**2)), (name, value)


@_PROPERTY_SETTINGS
@given(x=_logits, shift=st.floats(-50, 50), temperature=_temperatures)
def test_divergences_zero_when_distributions_equal(x, shift, temperature):
  # A constant shift of the logits leaves the distribution unchanged.
  shifted = x + np.float32(shift)
  for name, options in DIVERGENCES:
    value = _call(name, x, shifted, temperature, **options)
    np.testing.assert_allclose(value, 0.0, atol=2e-5 * max(1, temperature**2),
                               err_msg=name)
  # Logit MSE sees the shift: mean of shift**2 (times T**2 / T**2).
  np.testing.assert_allclose(_call('mse', x, shifted, temperature),
                             np.square(shifted - x).mean(-1), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_array_equal(_call('mse', x, x, temperature), 0.0)


@_PROPERTY_SETTINGS
@given(s=_logits, t=_logits, temperature=_temperatures,
       beta=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.8, 1.0]))
def test_jsd_symmetry(s, t, temperature, beta):
  tol = dict(rtol=1e-5, atol=1e-5 * max(1, temperature**2))
  # beta = 0.5 is symmetric ...
  np.testing.assert_allclose(_call('jsd', s, t, temperature, beta=0.5),
                             _call('jsd', t, s, temperature, beta=0.5), **tol)
  # ... and in general swapping the models maps beta to 1 - beta.
  np.testing.assert_allclose(_call('jsd', s, t, temperature, beta=beta),
                             _call('jsd', t, s, temperature, beta=1 - beta),
                             **tol)
  # The ends are forward and reverse KL.
  np.testing.assert_allclose(_call('jsd', s, t, temperature, beta=0.0),
                             _call('forward_kl', s, t, temperature), **tol)
  np.testing.assert_allclose(_call('jsd', s, t, temperature, beta=1.0),
                             _call('reverse_kl', s, t, temperature), **tol)
  # JSD(0.5) <= log 2 (before the T**2 factor).
  assert np.all(np.asarray(_call('jsd', s, t, temperature, beta=0.5,
                                 scale_by_temperature_squared=False))
                <= np.log(2.0) + 1e-6)


@_PROPERTY_SETTINGS
@given(s=_logits, t=_logits, temperature=_temperatures,
       lam=st.sampled_from([0.0, 0.1, 0.5, 0.9]))
def test_skew_forward_is_skew_reverse_with_models_swapped(s, t, temperature,
                                                          lam):
  np.testing.assert_allclose(
      _call('skew_kl', s, t, temperature, lam=lam),
      _call('skew_reverse_kl', t, s, temperature, lam=lam),
      rtol=1e-5, atol=1e-5 * max(1, temperature**2))


@_PROPERTY_SETTINGS
@given(s=_logits, t=_logits, temperature=_temperatures)
def test_topk_kl(s, t, temperature):
  full = _call('forward_kl', s, t, temperature)
  tol = dict(rtol=1e-5, atol=1e-5 * max(1, temperature**2))
  np.testing.assert_allclose(_call('topk_kl', s, t, temperature, k=_VOCAB),
                             full, **tol)
  # Merging entries into a tail bucket can only lose information.
  for k in (1, 4, _VOCAB - 1):
    sparse = np.asarray(_call('topk_kl', s, t, temperature, k=k))
    bound = np.asarray(full) * (1 + tol['rtol']) + tol['atol']
    assert np.all(sparse <= bound), (k, sparse, full)


@_PROPERTY_SETTINGS
@given(s=_logits, t=_logits, temperature=_temperatures)
def test_soft_ce_is_forward_kl_plus_teacher_entropy(s, t, temperature):
  no_scale = dict(scale_by_temperature_squared=False)
  soft_ce = _call('soft_ce', s, t, temperature, **no_scale)
  expected = (_call('forward_kl', s, t, temperature, **no_scale) +
              losses.entropy(t, temperature=temperature))
  np.testing.assert_allclose(soft_ce, expected, rtol=1e-5, atol=2e-5)


@_PROPERTY_SETTINGS
@given(s=_logits, t=_logits, temperature=_temperatures)
def test_tvd_in_unit_interval(s, t, temperature):
  tvd = np.asarray(_call('tvd', s, t, temperature,
                         scale_by_temperature_squared=False))
  assert np.all(tvd >= 0.0) and np.all(tvd <= 1.0 + 1e-6), tvd


# ----------------------------------------------------------------------------
# Numerics: masked vocabulary, huge logits, gradients.
# ----------------------------------------------------------------------------


def _options_for(name):
  return {'topk_kl': {'k': 3}, 'jsd': {'beta': 0.3}, 'skew_kl': {'lam': 0.1},
          'skew_forward_kl': {'lam': 0.1},
          'skew_reverse_kl': {'lam': 0.1}}.get(name, {})


def _assert_finite_value_and_grad(fn, s, t):
  value = fn(s, t)
  grads = jax.grad(lambda a, b: jnp.sum(fn(a, b)), argnums=(0, 1))(s, t)
  assert np.all(np.isfinite(value)), value
  for g in grads:
    assert np.all(np.isfinite(g)), g
  return value, grads


def _masked_logits(rng, shape, n_masked):
  """Teacher and student logits sharing -inf at random vocab positions."""
  s, t = _random_logits(rng, shape), _random_logits(rng, shape)
  rows = s.reshape(-1, shape[-1]), t.reshape(-1, shape[-1])
  for r in range(rows[0].shape[0]):
    cols = rng.choice(shape[-1], size=n_masked, replace=False)
    rows[0][r, cols] = -np.inf
    rows[1][r, cols] = -np.inf
  return s, t


@pytest.mark.parametrize('name', sorted(losses.OBJECTIVES))
def test_masked_vocab_finite_value_grad_and_matches_reference(name):
  rng = np.random.default_rng(6)
  s, t = _masked_logits(rng, (2, 3, 11), n_masked=4)
  options = _options_for(name)
  for temperature in (1.0, 3.0):
    fn = functools.partial(losses.get_objective(name), temperature=temperature,
                           **options)
    value, (g_s, g_t) = _assert_finite_value_and_grad(fn, s, t)
    # Masked entries get exactly zero gradient.
    masked = np.isneginf(s)
    np.testing.assert_array_equal(np.asarray(g_s)[masked], 0.0)
    np.testing.assert_array_equal(np.asarray(g_t)[masked], 0.0)
    fn_ = losses.get_objective(name)
    refs = [(r, sc) for n, o, r, sc in CASES
            if losses.get_objective(n) is fn_ and o == options]
    assert refs, name  # Every objective has a reference at these options.
    ref, scaled = refs[0]
    factor = temperature**2 if scaled else 1.0
    np.testing.assert_allclose(value, factor * ref(s, t, temperature),
                               **_tolerance(temperature))


@pytest.mark.parametrize('name', sorted(losses.OBJECTIVES))
def test_masked_columns_equal_deleted_columns(name):
  rng = np.random.default_rng(7)
  s, t = _random_logits(rng, (4, 13)), _random_logits(rng, (4, 13))
  keep = np.ones(13, bool)
  keep[[0, 5, 6, 12]] = False
  s_masked = np.where(keep, s, -np.inf).astype(np.float32)
  t_masked = np.where(keep, t, -np.inf).astype(np.float32)
  options = _options_for(name)
  np.testing.assert_allclose(
      _call(name, s_masked, t_masked, 2.0, **options),
      _call(name, s[:, keep], t[:, keep], 2.0, **options),
      rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', sorted(losses.OBJECTIVES))
def test_huge_logits_finite_value_and_grad(name):
  rng = np.random.default_rng(8)
  s = rng.uniform(-1e4, 1e4, (2, 3, 11)).astype(np.float32)
  t = rng.uniform(-1e4, 1e4, (2, 3, 11)).astype(np.float32)
  s[0, 0, :3] = t[0, 0, :3] = -np.inf  # Masking and huge logits together.
  options = _options_for(name)
  for temperature in (1.0, 2.0):
    fn = functools.partial(losses.get_objective(name), temperature=temperature,
                           **options)
    _assert_finite_value_and_grad(fn, s, t)
  value, _ = _assert_finite_value_and_grad(fn, s, s)  # Equal, saturated.
  if name not in ('soft_ce', 'hard_ce', 'pseudo_label'):
    np.testing.assert_allclose(value, 0.0, atol=1e-3)


@pytest.mark.parametrize('name,options,ref,scaled', CASES, ids=CASE_IDS)
def test_huge_logits_match_reference(name, options, ref, scaled):
  rng = np.random.default_rng(9)
  s = rng.uniform(-1e4, 1e4, (4, 9)).astype(np.float32)
  t = rng.uniform(-1e4, 1e4, (4, 9)).astype(np.float32)
  factor = 4.0 if scaled else 1.0
  np.testing.assert_allclose(_call(name, s, t, 2.0, **options),
                             factor * ref(s, t, 2.0), rtol=1e-4, atol=1e-3)


def test_finite_check_catches_naive_mixture():
  """The harness above has teeth: a naive log-mixture leaks NaN gradients."""

  def naive_jsd(s, t):
    log_p = jax.nn.log_softmax(t)
    log_q = jax.nn.log_softmax(s)
    log_m = jnp.logaddexp(log_p + jnp.log(0.5), log_q + jnp.log(0.5))
    kl = lambda a, b: jnp.sum(jnp.where(a > -jnp.inf, jnp.exp(a) * (a - b),
                                        0.0), -1)
    return 0.5 * kl(log_p, log_m) + 0.5 * kl(log_q, log_m)

  s, t = _masked_logits(np.random.default_rng(10), (4, 9), n_masked=2)
  with pytest.raises(AssertionError):
    _assert_finite_value_and_grad(naive_jsd, s, t)
  _assert_finite_value_and_grad(
      functools.partial(losses.generalized_jsd, beta=0.5), s, t)


@pytest.mark.parametrize('fn,order', [
    (losses.forward_kl, 2),
    (functools.partial(losses.generalized_jsd, beta=0.3), 2),
    (functools.partial(losses.skew_reverse_kl, lam=0.2), 1),
    (functools.partial(losses.topk_kl, k=3), 1),
], ids=['forward_kl', 'jsd', 'skew_reverse_kl', 'topk_kl'])
def test_check_grads(fn, order):
  rng = np.random.default_rng(11)
  s, t = _random_logits(rng, (4, 9), 1.0), _random_logits(rng, (4, 9), 1.0)
  f = jax.jit(lambda a, b: fn(a, b, temperature=2.0))
  # float32 central differences need a larger step than the default.
  check_grads(f, (s, t), order=order, modes=('fwd', 'rev'), eps=3e-3)


@pytest.mark.parametrize('name,options,ref,scaled', CASES, ids=CASE_IDS)
def test_student_gradient_matches_float64_numeric_gradient(name, options, ref,
                                                           scaled):
  """jax.grad of the float32 code vs central differences of the reference."""
  rng = np.random.default_rng(zlib.crc32(f'grad{name}{options}'.encode()))
  s, t = _random_logits(rng, (4, 9), 2.0), _random_logits(rng, (4, 9), 2.0)
  temperature = 2.0
  grad = jax.grad(lambda a: jnp.sum(
      _call(name, a, t, temperature, **options)))(s)
  factor = temperature**2 if scaled else 1.0
  s64, eps = s.astype(np.float64), 1e-6
  numeric = np.zeros_like(s64)
  for i in np.ndindex(s.shape):
    step = np.zeros_like(s64)
    step[i] = eps
    numeric[i] = factor * (ref(s64 + step, t, temperature).sum() -
                           ref(s64 - step, t, temperature).sum()) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Top-k from a cache.
# ----------------------------------------------------------------------------


def test_teacher_topk_fields():
  rng = np.random.default_rng(12)
  t = _random_logits(rng, (2, 3, 11))
  cache = losses.teacher_topk(t, 5, temperature=2.0)
  log_p = _np_log_softmax(t, 2.0)
  expected = -np.sort(-log_p, axis=-1)[..., :5]
  np.testing.assert_allclose(cache.log_probs, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(
      np.take_along_axis(log_p, np.asarray(cache.indices), -1), expected)
  np.testing.assert_allclose(
      cache.log_tail, np.log1p(-np.exp(expected).sum(-1)), rtol=1e-5,
      atol=1e-5)


@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_topk_from_cache_equals_topk_from_logits(temperature):
  rng = np.random.default_rng(13)
  s, t = _random_logits(rng, (2, 3, 11)), _random_logits(rng, (2, 3, 11))
  expected = losses.topk_kl(s, t, k=4, temperature=temperature)
  cache = losses.teacher_topk(t, 4, temperature=temperature)
  with_tail = losses.topk_kl_from_cache(
      s, cache.log_probs, cache.indices, teacher_log_tail=cache.log_tail,
      temperature=temperature)
  without_tail = losses.topk_kl_from_cache(s, cache.log_probs, cache.indices,
                                           temperature=temperature)
  np.testing.assert_allclose(with_tail, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(without_tail, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('give_tail', [True, False])
def test_topk_from_bfloat16_cache(give_tail):
  """bf16 values: renormalised teacher buckets, checked in float64."""
  rng = np.random.default_rng(14)
  s, t = _random_logits(rng, (2, 3, 11)), _random_logits(rng, (2, 3, 11))
  temperature, k = 2.0, 6
  cache = losses.teacher_topk(t, k, temperature=temperature)
  log_probs_bf16 = cache.log_probs.astype(jnp.bfloat16)
  got = losses.topk_kl_from_cache(
      s, log_probs_bf16, cache.indices,
      teacher_log_tail=cache.log_tail if give_tail else None,
      temperature=temperature, scale_by_temperature_squared=False)
  # float64 reference of the documented rule.
  p_topk = np.exp(np.asarray(log_probs_bf16.astype(jnp.float32), np.float64))
  tail = (np.exp(np.asarray(cache.log_tail, np.float64)) if give_tail else
          np.maximum(1.0 - p_topk.sum(-1), 0.0))
  p = np.concatenate([p_topk, tail[..., None]], -1)
  p /= p.sum(-1, keepdims=True)
  q_all = np.exp(_np_log_softmax(s, temperature))
  idx = np.asarray(cache.indices)
  q_topk = np.take_along_axis(q_all, idx, -1)
  in_topk = np.zeros(q_all.shape, bool)
  np.put_along_axis(in_topk, idx, True, -1)
  q = np.concatenate([q_topk, np.where(in_topk, 0, q_all).sum(-1)[..., None]],
                     -1)
  np.testing.assert_allclose(got, _np_kl(np.log(p), np.log(q)), rtol=1e-5,
                             atol=1e-5)
  # And close to the exact float32 top-k KL.
  exact = losses.topk_kl(s, t, k=k, temperature=temperature,
                         scale_by_temperature_squared=False)
  np.testing.assert_allclose(got, exact, rtol=0.05, atol=0.02)
  _assert_finite_value_and_grad(
      lambda a, _: losses.topk_kl_from_cache(
          a, log_probs_bf16, cache.indices, temperature=temperature), s, t)


def test_topk_from_cache_full_vocab_with_rounding():
  """k = vocab from a cache: leftover tail mass is dropped, not inf."""
  rng = np.random.default_rng(15)
  s, t = _random_logits(rng, (4, 9)), _random_logits(rng, (4, 9))
  cache = losses.teacher_topk(t, 9)
  got = losses.topk_kl_from_cache(s, cache.log_probs.astype(jnp.bfloat16),
                                  cache.indices)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, losses.forward_kl(s, t), rtol=0.05,
                             atol=0.02)


# ----------------------------------------------------------------------------
# Registry and argument checking.
# ----------------------------------------------------------------------------


def test_registry_names_and_aliases():
  expected = {'kl', 'forward_kl', 'reverse_kl', 'jsd', 'skew_kl',
              'skew_forward_kl', 'skew_reverse_kl', 'tvd', 'mse', 'soft_ce',
              'hard_ce', 'pseudo_label', 'topk_kl'}
  assert set(losses.OBJECTIVES) == expected
  assert losses.get_objective('kl') is losses.forward_kl
  assert losses.get_objective('jsd') is losses.generalized_jsd
  assert losses.get_objective('hard_ce') is losses.get_objective('pseudo_label')
  assert losses.get_objective('topk_kl') is losses.topk_kl


def test_get_objective_unknown_name():
  with pytest.raises(ValueError) as excinfo:
    losses.get_objective('kl_divergence')
  message = str(excinfo.value)
  assert "'kl_divergence'" in message
  for name in losses.OBJECTIVES:
    assert name in message


@pytest.mark.parametrize('call', [
    lambda s, t: losses.generalized_jsd(s, t, beta=1.5),
    lambda s, t: losses.skew_forward_kl(s, t, lam=-0.1),
    lambda s, t: losses.topk_kl(s, t, k=0),
    lambda s, t: losses.topk_kl(s, t, k=9),
    lambda s, t: losses.teacher_topk(t, 2.5),
    lambda s, t: losses.forward_kl(s, t, temperature=0.0),
    lambda s, t: losses.logit_mse(s, t, temperature=-1.0),
], ids=['beta', 'lam', 'k0', 'k_too_big', 'k_float', 'temperature0',
        'temperature_negative'])
def test_invalid_options_raise(call):
  s = t = np.zeros((2, 8), np.float32)
  with pytest.raises(ValueError):
    call(s, t)


@pytest.mark.parametrize("vocab", [7, 128, 512, 640])
def test_argmax_is_jnp_argmax_including_ties_and_masked_entries(vocab):
  # Integer-valued logits make ties common (across argmax's 128-entry blocks
  # too, from 256 on); -inf entries are masked vocab.
  rng = np.random.default_rng(vocab)
  x = rng.integers(-3, 3, (3, 5, vocab)).astype(np.float32)
  x[rng.random(x.shape) < 0.2] = -np.inf
  x[0, 0] = -np.inf
  x[0, 0, vocab - 1] = 1.0  # A lone maximum in the last block.
  x[0, 1] = -np.inf  # All masked: index 0, as jnp.argmax.
  x[1, 2, :] = 0.0
  x[1, 2, vocab // 2] = 0.5  # A lone maximum mid-row.
  np.testing.assert_array_equal(losses.argmax(jnp.asarray(x)),
                                jnp.argmax(jnp.asarray(x), axis=-1))


@pytest.mark.parametrize("vocab", [7, 512])
def test_argmax_of_a_nan_row_matches_no_label(vocab):
  x = np.zeros((2, vocab), np.float32)
  x[1, 3] = np.nan
  np.testing.assert_array_equal(losses.argmax(jnp.asarray(x)), [0, vocab])
