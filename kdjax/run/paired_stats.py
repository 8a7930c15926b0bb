"""Statistics for comparing two training methods run at the same seeds.

Two sources of noise, two tests:
  * seeds: `seed_interval` pairs the methods' accuracies by seed (same seed =
    same data order and, for equal architectures, the same initialisation)
    and gives the mean difference with its t-interval (Student's t with
    n - 1 degrees of freedom): mean +- t_{(1+c)/2, n-1} * sd / sqrt(n).
  * examples: `mcnemar_exact` compares two classifiers on the same evaluation
    examples: of the b examples only A gets right and the c only B gets
    right, under "equally good" each discordant example is a fair coin, so
    the exact two-sided p-value is min(1, 2 * P(Binomial(b + c, 1/2) <=
    min(b, c))) (1 when b + c = 0). `bootstrap_interval` resamples examples
    (with replacement, the same resample for both methods) to give an
    interval for the difference in seed-averaged accuracy.
Everything is float64 numpy / scipy.stats; inputs are per-seed accuracies or
per-example correctness (bool).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for one value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def t_interval(values: Sequence[float], confidence: float = 0.95
               ) -> tuple[float, float, float]:
  """(mean, low, high): the t-interval of the mean of `values`.

  One value: (value, nan, nan) (no spread to estimate).
  """
  v = np.asarray(values, np.float64)
  mean = float(v.mean())
  if len(v) < 2:
    return mean, math.nan, math.nan
  half = (stats.t.ppf((1.0 + confidence) / 2.0, len(v) - 1)
          * v.std(ddof=1) / math.sqrt(len(v)))
  return mean, float(mean - half), float(mean + half)


def seed_interval(a_by_seed: dict[int, float], b_by_seed: dict[int, float],
                  confidence: float = 0.95) -> dict:
  """A - B paired by seed (seeds both have): differences, mean, interval."""
  seeds = sorted(set(a_by_seed) & set(b_by_seed))
  diffs = [float(a_by_seed[s]) - float(b_by_seed[s]) for s in seeds]
  if not diffs:
    return {"seeds": [], "diffs": [], "mean": math.nan, "low": math.nan,
            "high": math.nan, "confidence": confidence}
  mean, low, high = t_interval(diffs, confidence)
  return {"seeds": seeds, "diffs": diffs, "mean": mean, "low": low,
          "high": high, "confidence": confidence}


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
  """Exact McNemar test of A vs B on the same examples.

  Returns b (A right, B wrong), c (A wrong, B right) and the two-sided
  p-value.
  """
  a = np.asarray(correct_a, bool)
  b_ = np.asarray(correct_b, bool)
  if a.shape != b_.shape:
    raise ValueError(f"Shapes differ: {a.shape} vs {b_.shape}.")
  b = int(np.sum(a & ~b_))
  c = int(np.sum(~a & b_))
  n = b + c
  p = 1.0 if n == 0 else min(1.0, 2.0 * float(stats.binom.cdf(min(b, c), n,
                                                              0.5)))
  return {"b": b, "c": c, "p_value": p}


def bootstrap_interval(correct_a: np.ndarray, correct_b: np.ndarray, *,
                       resamples: int = 10000, confidence: float = 0.95,
                       seed: int = 0) -> dict:
  """Percentile bootstrap over examples of mean(A) - mean(B).

  `correct_a`, `correct_b`: bool [seeds, examples] (or [examples]); each
  example's correctness is averaged over seeds first, then examples are
  resampled, the same indices for A and B (paired).
  """
  a = np.atleast_2d(np.asarray(correct_a, np.float64)).mean(0)
  b = np.atleast_2d(np.asarray(correct_b, np.float64)).mean(0)
  if a.shape != b.shape:
    raise ValueError(f"Example counts differ: {a.shape} vs {b.shape}.")
  diff = a - b
  rng = np.random.default_rng(seed)
  means = np.empty(resamples)
  for start in range(0, resamples, 1000):  # Bounded memory.
    stop = min(start + 1000, resamples)
    idx = rng.integers(0, len(diff), size=(stop - start, len(diff)))
    means[start:stop] = diff[idx].mean(1)
  tail = (1.0 - confidence) / 2.0
  low, high = np.quantile(means, [tail, 1.0 - tail])
  return {"mean": float(diff.mean()), "low": float(low), "high": float(high),
          "confidence": confidence, "resamples": resamples}
