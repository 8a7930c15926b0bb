"""sampled_reverse_kl: the on-policy per-token reverse KL (REINFORCE).

Checked against a float64 numpy reference: its value is the sampled
log-ratio, its gradient the REINFORCE estimator written by hand, and that
gradient averaged over many student samples is the exact gradient of
KL(q || p).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kdjax.core import defaults
from kdjax.distill import losses, objectives, token_loss


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(2, 9))
def test_value_and_gradient_are_reinforce_by_hand(seed, vocab):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(3, 4, vocab)).astype(np.float32) * 2
  t = rng.normal(size=(3, 4, vocab)).astype(np.float32) * 2
  y = rng.integers(0, vocab, (3, 4))
  weights = rng.random((3, 4)).astype(np.float32)  # A token mask / scale.
  log_q, log_p = _log_softmax64(s), _log_softmax64(t)
  pick = lambda a: np.take_along_axis(a, y[..., None], -1)[..., 0]
  ratio = pick(log_q) - pick(log_p)
  value, grad = jax.value_and_grad(lambda x: jnp.sum(
      weights * losses.sampled_reverse_kl(x, t, y)))(s)
  np.testing.assert_allclose(value, np.sum(weights * ratio), rtol=1e-5,
                             atol=1e-5)
  # d log q(y) / d logits = onehot(y) - q; REINFORCE: ratio * that.
  onehot = np.eye(vocab)[y]
  expected = (weights * ratio)[..., None] * (onehot - np.exp(log_q))
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


def test_expected_gradient_is_the_reverse_kl_gradient():
  """Averaged over student samples, the estimator is grad KL(q || p)."""
  rng = np.random.default_rng(0)
  vocab, n = 5, 200_000
  s = rng.normal(size=(vocab,)).astype(np.float32)
  t = rng.normal(size=(vocab,)).astype(np.float32)
  q = np.exp(_log_softmax64(s))
  y = rng.choice(vocab, size=n, p=q)
  grad = jax.grad(lambda x: jnp.mean(losses.sampled_reverse_kl(
      jnp.broadcast_to(x, (n, vocab)), jnp.broadcast_to(t, (n, vocab)),
      y)))(s)
  exact = jax.grad(lambda x: losses.reverse_kl(
      x[None], jnp.asarray(t)[None], scale_by_temperature_squared=False)[0])(s)
  np.testing.assert_allclose(grad, exact, atol=1e-2)
  assert np.abs(exact).max() > 0.05  # The test has something to compare.


def test_is_a_term_that_reads_the_sampled_tokens():
  distill = defaults.get_config().distill
  distill.terms = ({"name": "sampled_reverse_kl", "weight": 1.0},)
  objectives.validate_distill(distill)
  objective = objectives.distillation(distill, num_teachers=1, total_steps=1)
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7))
  y = rng.integers(0, 7, (2, 3))
  total, terms = objective(objectives.ModelOutputs(jnp.asarray(s)),
                           [objectives.ModelOutputs(jnp.asarray(t))],
                           jnp.asarray(y), jnp.int32(0))
  np.testing.assert_allclose(
      total, losses.sampled_reverse_kl(s, t, y), rtol=1e-6)
  assert set(terms) == {"sampled_reverse_kl"}


def test_teacher_hard_labels_do_not_replace_the_sampled_tokens():
  """hard_labels='teacher' changes what 'ce' reads, never which tokens the
  sampled term grades."""
  distill = defaults.get_config().distill
  distill.terms = ({"name": "sampled_reverse_kl", "weight": 1.0},
                   {"name": "ce", "weight": 0.5})
  distill.hard_labels = "teacher"
  objectives.validate_distill(distill)
  objective = objectives.distillation(distill, num_teachers=1, total_steps=1)
  rng = np.random.default_rng(4)
  s, t = rng.normal(size=(2, 3, 7)) * 2, rng.normal(size=(2, 3, 7)) * 2
  top = t.argmax(-1)
  y = (top + 1 + rng.integers(0, 6, top.shape)) % 7  # Never the argmax.
  _, terms = objective(objectives.ModelOutputs(jnp.asarray(s)),
                       [objectives.ModelOutputs(jnp.asarray(t))],
                       jnp.asarray(y), jnp.int32(0))
  pick = lambda a, idx: np.take_along_axis(a, idx[..., None], -1)[..., 0]
  log_q, log_p = _log_softmax64(s), _log_softmax64(t)
  np.testing.assert_allclose(terms["sampled_reverse_kl"],
                             pick(log_q, y) - pick(log_p, y), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(terms["ce"], -pick(log_q, top), rtol=1e-5)


def test_summed_teachers_weigh_the_score_by_the_advantage_once():
  """combine='sum': the value is the weighted sum of each teacher's
  log-ratio, and the gradient is advantage * grad log q(y) (the weights sum
  to 1), float64 by hand."""
  distill = defaults.get_config().distill
  distill.terms = ({"name": "sampled_reverse_kl", "weight": 1.0,
                    "discount": 0.5},)
  distill.combine, distill.teacher_weight = "sum", 1.0
  distill.extra_teachers = (dict(checkpoint_dir="x", model={}, weight=3.0),)
  objectives.validate_distill(distill)
  objective = objectives.distillation(distill, num_teachers=2, total_steps=1)
  rng = np.random.default_rng(5)
  s = rng.normal(size=(2, 3, 6)).astype(np.float32)
  t1, t2 = (rng.normal(size=(2, 3, 6)).astype(np.float32) for _ in range(2))
  y = rng.integers(0, 6, (2, 3))
  advantages = rng.normal(size=(2, 3)).astype(np.float32) * 3

  def total(x):
    value, _ = objective(objectives.ModelOutputs(x),
                         [objectives.ModelOutputs(jnp.asarray(t1)),
                          objectives.ModelOutputs(jnp.asarray(t2))],
                         jnp.asarray(y), jnp.int32(0),
                         advantages=jnp.asarray(advantages))
    return jnp.sum(value), value

  (_, value), grad = jax.value_and_grad(total, has_aux=True)(jnp.asarray(s))
  pick = lambda a: np.take_along_axis(a, y[..., None], -1)[..., 0]
  log_q = _log_softmax64(s)
  ratios = [pick(log_q) - pick(_log_softmax64(t)) for t in (t1, t2)]
  np.testing.assert_allclose(value, 0.25 * ratios[0] + 0.75 * ratios[1],
                             rtol=1e-5, atol=1e-5)
  expected = advantages[..., None] * (np.eye(6)[y] - np.exp(log_q))
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


def _returns64(costs, mask, discount):
  out = np.zeros_like(costs, np.float64)
  later = np.zeros(costs.shape[:-1])
  for t in reversed(range(costs.shape[-1])):
    later = mask[..., t] * costs[..., t] + discount * later
    out[..., t] = later
  return out


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), discount=st.floats(0.0, 1.0))
def test_discounted_returns_sum_the_counted_costs_ahead(seed, discount):
  rng = np.random.default_rng(seed)
  costs = rng.normal(size=(3, 6))
  mask = (rng.random((3, 6)) > 0.3).astype(np.float32)
  np.testing.assert_allclose(
      losses.discounted_returns(jnp.asarray(costs, jnp.float32), mask,
                                discount),
      _returns64(costs, mask, discount), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_a_discounted_term_weighs_each_token_by_the_costs_ahead(chunk_size):
  """Through the token loss (chunks of 3 of 7 positions cannot see each
  other's tokens): the gradient is sum_t A_t grad log q(y_t) / count, A_t
  the discounted sum of the masked costs from t on, computed in float64."""
  distill = defaults.get_config().distill
  distill.terms = ({"name": "sampled_reverse_kl", "weight": 1.0,
                    "discount": 0.8},)
  objectives.validate_distill(distill)
  objective = objectives.distillation(distill, num_teachers=1, total_steps=1)
  assert objective.sampled_discount == 0.8
  rng = np.random.default_rng(3)
  b, length, d, v = 2, 7, 5, 6
  hidden = rng.normal(size=(b, length, d)).astype(np.float32)
  head = rng.normal(size=(d, v)).astype(np.float32)
  t_hidden = rng.normal(size=(b, length, d)).astype(np.float32)
  t_head = rng.normal(size=(d, v)).astype(np.float32)
  y = rng.integers(0, v, (b, length))
  mask = np.ones((b, length), np.float32)
  mask[0, 5:] = 0  # After EOS: charged to no one.
  mask[1, :2] = 0  # The prompt.
  count = mask.sum()

  def loss(x):
    return token_loss.token_objective(
        objective, x, jnp.asarray(head), [jnp.asarray(t_hidden)],
        [jnp.asarray(t_head)], jnp.asarray(y), jnp.asarray(mask),
        jnp.int32(0), chunk_size=chunk_size, global_count=jnp.float32(count))

  (value, sums), grad = jax.value_and_grad(loss, has_aux=True)(
      jnp.asarray(hidden))
  pick = lambda a: np.take_along_axis(a, y[..., None], -1)[..., 0]
  log_q = _log_softmax64(hidden.astype(np.float64) @ head)
  log_p = _log_softmax64(t_hidden.astype(np.float64) @ t_head)
  cost = pick(log_q) - pick(log_p)
  advantage = _returns64(cost, mask, 0.8)
  np.testing.assert_allclose(value, np.sum(mask * cost) / count, rtol=1e-5)
  g_logits = (mask * advantage)[..., None] * (
      np.eye(v)[y] - np.exp(log_q)) / count
  np.testing.assert_allclose(grad, g_logits @ head.T, rtol=1e-4, atol=1e-6)
  # Without the discount the weights differ: the test can tell them apart.
  assert np.abs(advantage - mask * cost).max() > 0.1
