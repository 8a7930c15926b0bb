"""Optimizers and learning-rate schedules from the config, against float64."""

import ml_collections
import numpy as np
import pytest

from kdjax.distill import optim


def _train(**fields):
  return ml_collections.ConfigDict(dict(
      dict(learning_rate=0.1, warmup_steps=10, schedule="constant",
           optimizer="sgd", weight_decay=0.0, grad_clip_norm=0.0), **fields))


def _lr64(step_, lr, warmup, total, schedule):
  if step_ < warmup:
    return lr * step_ / warmup
  if schedule == "constant":
    return lr
  frac = min((step_ - warmup) / (total - warmup), 1.0)
  return lr * 0.5 * (1 + np.cos(np.pi * frac))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_warmup_then_constant_or_cosine_to_zero(schedule, warmup):
  sched = optim.learning_rate_schedule(
      _train(schedule=schedule, warmup_steps=warmup), total_steps=50)
  for step_ in range(0, 56):
    assert float(sched(step_)) == pytest.approx(
        _lr64(step_, 0.1, warmup, 50, schedule), rel=1e-5, abs=1e-7), step_


def test_warmup_longer_than_the_run_still_reaches_the_rate():
  sched = optim.learning_rate_schedule(_train(warmup_steps=100),
                                       total_steps=5)
  assert [float(sched(s)) for s in range(5)] == pytest.approx(
      [0.1 * s / 4 for s in range(5)])


@pytest.mark.parametrize("scale", [10.0, 0.1])
def test_gradients_are_clipped_to_the_global_norm(scale):
  """SGD (Nesterov, momentum 0.9) first step: -lr * 1.9 * g, with g scaled
  to norm 1 when its global norm is above 1 and left alone below."""
  rng = np.random.default_rng(0)
  grads = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
  norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
  grads = {k: (g * scale / norm).astype(np.float32) for k, g in grads.items()}
  tx = optim.make_optimizer(_train(warmup_steps=0, grad_clip_norm=1.0),
                            total_steps=10)
  params = {k: np.zeros_like(g) for k, g in grads.items()}
  updates, _ = tx.update(grads, tx.init(params), params)
  factor = min(1.0, 1.0 / scale)
  for k, g in grads.items():
    np.testing.assert_allclose(updates[k], -0.1 * 1.9 * factor * g,
                               rtol=1e-5)
