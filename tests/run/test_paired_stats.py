"""kdjax.run.paired_stats against hand computations."""

import math

import numpy as np
import pytest

from kdjax.run import paired_stats


def test_t_interval_by_hand():
  # Differences 1..5: mean 3, sd sqrt(2.5), t_{0.975, 4} = 2.7764451.
  mean, low, high = paired_stats.t_interval([1, 2, 3, 4, 5])
  half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
  assert mean == 3.0
  assert (low, high) == pytest.approx((3 - half, 3 + half), abs=1e-9)
  mean, low, high = paired_stats.t_interval([0.5])
  assert mean == 0.5 and math.isnan(low) and math.isnan(high)


def test_seed_interval_pairs_by_seed():
  a = {0: 0.80, 1: 0.82, 2: 0.79, 7: 0.5}
  b = {2: 0.78, 0: 0.78, 1: 0.81}
  result = paired_stats.seed_interval(a, b)
  assert result["seeds"] == [0, 1, 2]  # Seed 7 has no partner.
  assert result["diffs"] == pytest.approx([0.02, 0.01, 0.01])
  mean, low, high = paired_stats.t_interval([0.02, 0.01, 0.01])
  assert (result["mean"], result["low"], result["high"]) == pytest.approx(
      (mean, low, high))


def test_mcnemar_exact_by_hand():
  # b = 1 (A right, B wrong), c = 5: p = 2 * (C(6,0) + C(6,1)) / 2^6.
  a = np.array([1, 0, 0, 0, 0, 0, 1, 1, 0], bool)
  b = np.array([0, 1, 1, 1, 1, 1, 1, 0, 0], bool)
  a[7] = b[7] = True  # A concordant pair: ignored.
  result = paired_stats.mcnemar_exact(a, b)
  assert (result["b"], result["c"]) == (1, 5)
  assert result["p_value"] == pytest.approx(2 * 7 / 64)
  assert paired_stats.mcnemar_exact(a, a)["p_value"] == 1.0  # No discord.
  even = paired_stats.mcnemar_exact(np.array([1, 0], bool),
                                    np.array([0, 1], bool))
  assert even["p_value"] == 1.0  # Capped at 1.


def test_bootstrap_interval_contains_the_difference_and_is_paired():
  rng = np.random.default_rng(0)
  truth = rng.random(400) < 0.8
  a = np.stack([truth, truth])
  flip = rng.random(400) < 0.1
  b = np.stack([truth ^ flip, truth ^ flip])
  result = paired_stats.bootstrap_interval(a, b, resamples=2000)
  diff = a.mean() - b.mean()
  assert result["mean"] == pytest.approx(diff)
  assert result["low"] < diff < result["high"]
  # Paired: identical classifiers give a zero-width interval.
  same = paired_stats.bootstrap_interval(a, a, resamples=500)
  assert same["low"] == same["high"] == 0.0
