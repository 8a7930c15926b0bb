"""Distillation and task losses: pure functions on logits.

Conventions (written down once, here):
  * Every function returns UNREDUCED float32 values, one per example (or per
    token): shape ``logits.shape[:-1]``. Masking and the global normalisation
    happen in the step, which knows the global count of valid examples/tokens.
  * Arguments are ``(student_logits, teacher_logits)`` for divergences; p is the
    teacher's distribution, q the student's.
  * ``temperature`` T divides both students' and teachers' logits. Soft-target
    terms are multiplied by T**2 (Hinton et al. 2015) unless
    ``scale_by_temperature_squared=False``. The T**2 factor is applied to every
    soft-target objective alike (KL family, JSD, skew KL, TVD, logit MSE, soft
    CE, top-k KL) so that switching objectives never silently changes the
    scaling rule; the hard pseudo-label CE ignores T (see its docstring).
  * Forward KL = KL(teacher || student); reverse KL = KL(student || teacher).
  * Generalised JSD(beta) follows the GKD paper (Agarwal et al. 2024) and TRL:
    beta=0 is forward KL, beta=1 is reverse KL, beta=0.5 is the symmetric JSD.
  * Everything is computed in float32 (bfloat16 inputs are upcast) in log
    space. Logits of -inf (masked vocabulary entries, masked at the same
    positions in teacher and student) contribute exactly zero and produce
    neither NaN values nor NaN gradients; each row needs at least one finite
    logit. Terms that would evaluate ``0 * log 0`` use the double-where trick:
    a single ``jnp.where`` on the output still back-propagates NaN/inf from the
    unselected branch, so the inputs of that branch are made safe too.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Objective = Callable[..., Array]

_NEG_INF = -jnp.inf
# Vocabulary block of `argmax`: one vector-friendly row segment.
_ARGMAX_BLOCK = 128


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _check_temperature(temperature: Any) -> None:
  # Traced temperatures cannot be checked here; Python numbers can, early.
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f'temperature must be > 0, got {temperature!r}.')


def _check_unit_interval(name: str, value: float) -> float:
  # Mixture weights select Python-level branches at the ends, so they must be
  # concrete numbers (config values), not traced arrays.
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'{name} must be in [0, 1], got {value!r}.')
  return value


def _shift(logits: Array, temperature: Any = 1.0
           ) -> tuple[Array, Array, Array]:
  """(z - max z) / T, its log-sum-exp over the last axis, and max z; float32.

  log_softmax(z / T) = shifted - lse[..., None]. The shift is the maximum of
  the RAW logits (max(z / T) == max(z) / T for T > 0), so all temperatures,
  terms and `argmax` of one logits tensor share a single reduce-max that XLA
  merges: the loss is memory-bound at LM vocabulary sizes and every pass over
  [tokens, vocab] counts.
  """
  _check_temperature(temperature)
  logits = logits.astype(jnp.float32)
  row_max = _row_max(logits)[..., None]
  row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  shifted = (logits - row_max) / temperature
  return shifted, jnp.log(jnp.sum(jnp.exp(shifted), axis=-1)), row_max[..., 0]


def _log_softmax(logits: Array, temperature: Any = 1.0) -> Array:
  shifted, lse, _ = _shift(logits, temperature)
  return shifted - lse[..., None]


def argmax(logits: Array) -> Array:
  """First index of the maximum over the last axis, as jnp.argmax; for metrics.

  Why not jnp.argmax: on XLA:CPU its variadic (value, index) reduction is
  slow, and a "min index where x == max" reduction over [tokens, vocab] makes
  XLA write that whole int32 index array out before reducing it
  (benchmarks/loss_throughput.py lists the arrays a loss writes). With a
  vocabulary of whole blocks this takes the
  per-block maxima (the same ones `_row_max` gives the losses, so XLA reads
  the logits once for both), picks the first block holding the row maximum,
  and searches only that block: tensors of [tokens, vocab / block] and
  [tokens, block] instead of [tokens, vocab]. A row holding NaN gives
  vocab_size (an index that matches no label) instead of the NaN's index.
  """
  vocab = logits.shape[-1]
  if not _whole_blocks(vocab):
    return _first_index(logits == _row_max(logits)[..., None], vocab)
  blocks = _blocks(logits)
  block_max = jnp.max(blocks, axis=-1)
  row_max = jnp.max(block_max, axis=-1, keepdims=True)
  num_blocks = block_max.shape[-1]
  block = _first_index(block_max == row_max, num_blocks)
  chosen = jnp.take_along_axis(
      blocks, jnp.minimum(block, num_blocks - 1)[..., None, None], axis=-2,
      mode="promise_in_bounds")[..., 0, :]
  within = _first_index(chosen == row_max, _ARGMAX_BLOCK)
  return jnp.where(block < num_blocks, block * _ARGMAX_BLOCK + within, vocab)


def _whole_blocks(vocab: int) -> bool:
  return vocab % _ARGMAX_BLOCK == 0 and vocab >= 2 * _ARGMAX_BLOCK


def _blocks(logits: Array) -> Array:
  return logits.reshape(logits.shape[:-1] + (-1, _ARGMAX_BLOCK))


def _row_max(logits: Array) -> Array:
  """Maximum over the last axis, via `argmax`'s block maxima where it uses
  them: identical reductions of one tensor, which XLA then computes once."""
  if _whole_blocks(logits.shape[-1]):
    return jnp.max(jnp.max(_blocks(logits), axis=-1), axis=-1)
  return jnp.max(logits, axis=-1)


def _first_index(hits: Array, size: int) -> Array:
  """Index of the first True along the last axis; `size` if there is none."""
  index = lax.broadcasted_iota(jnp.int32, hits.shape, hits.ndim - 1)
  return jnp.min(jnp.where(hits, index, size), axis=-1)


def _maybe_scale(values: Array, temperature: Any, scale: bool) -> Array:
  return values * temperature**2 if scale else values


def _kl_from_log_probs(log_p: Array, log_q: Array) -> Array:
  """sum_i p_i (log p_i - log q_i) over the last axis; 0 log 0 := 0.

  Double where: entries outside p's support get safe finite inputs, so neither
  the value nor the gradient sees ``-inf - -inf``. If q is zero where p is not,
  the true KL is +inf and so is the result.
  """
  support = log_p > _NEG_INF
  safe_log_p = jnp.where(support, log_p, 0.0)
  safe_log_q = jnp.where(support, log_q, 0.0)
  terms = jnp.exp(safe_log_p) * (safe_log_p - safe_log_q)
  return jnp.sum(jnp.where(support, terms, 0.0), axis=-1)


def _log_mixture(log_a: Array, log_b: Array, weight: float) -> Array:
  """log(weight * a + (1 - weight) * b) elementwise, for 0 < weight < 1.

  ``jnp.logaddexp(-inf, -inf)`` has a NaN gradient, hence the double where on
  entries where both a and b are zero (masked vocabulary).
  """
  either = (log_a > _NEG_INF) | (log_b > _NEG_INF)
  safe_a = jnp.where(either, log_a, 0.0)
  safe_b = jnp.where(either, log_b, 0.0)
  mixed = jnp.logaddexp(safe_a + math.log(weight),
                        safe_b + math.log1p(-weight))
  return jnp.where(either, mixed, _NEG_INF)


def _masked_logsumexp(x: Array, mask: Array) -> Array:
  """logsumexp of x over the last axis restricted to mask; -inf if empty."""
  has_mass = jnp.any(mask & (x > _NEG_INF), axis=-1, keepdims=True)
  safe_x = jnp.where(has_mass, jnp.where(mask, x, _NEG_INF), 0.0)
  lse = jax.nn.logsumexp(safe_x, axis=-1, keepdims=True)
  return jnp.where(has_mass, lse, _NEG_INF)[..., 0]


def _index_mask(indices: Array, size: int) -> Array:
  """Boolean [..., size] mask that is True at ``indices`` ([..., k])."""
  mask = jnp.zeros(indices.shape[:-1] + (size,), dtype=bool)
  return jnp.put_along_axis(mask, indices, True, axis=-1, inplace=False)


def _safe_log(x: Array) -> Array:
  """log(x) for x >= 0 with a finite gradient at x == 0 (value -inf there)."""
  positive = x > 0
  return jnp.where(positive, jnp.log(jnp.where(positive, x, 1.0)), _NEG_INF)


# ----------------------------------------------------------------------------
# Task loss and a helper metric.
# ----------------------------------------------------------------------------


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
  """Cross-entropy with integer labels; per example, float32, no temperature.

  This is the hard-label task loss. Masked (-inf) vocabulary entries are fine
  as long as the label itself is not masked.
  """
  _, lse, row_max = _shift(logits)
  # -log_softmax(logits)[label] from the raw label logit: no [..., vocab]
  # log-softmax is built.
  label_logits = jnp.take_along_axis(
      logits.astype(jnp.float32), labels[..., None].astype(jnp.int32),
      axis=-1)[..., 0]
  return lse - (label_logits - row_max)


def sampled_reverse_kl(student_logits: Array, teacher_logits: Array,
                       sampled: Array, *, advantage: Array | None = None
                       ) -> Array:
  """Reverse KL estimated on the student's own sampled tokens (on-policy).

  Per token y (sampled from the student): r = log q(y) - log p(y), an
  unbiased one-sample estimate of KL(q || p) at that position. The value
  returned is r; its gradient is r * grad log q(y) (REINFORCE with the
  log-ratio as a detached per-token cost, as tinker's on-policy
  distillation), which is the gradient of KL(q || p) in expectation over y:
  the score-function term E_q[grad log q] is zero. No temperature: the
  samples must come from q itself (on-policy validation asks for sampling
  temperature 1 and no top-k/top-p). Only meaningful on tokens the
  student sampled; on other text it is a biased estimate.

  `advantage` (same shape as `sampled`, detached) replaces r as the weight
  of grad log q(y): e.g. the discounted sum of the costs from this token on
  (`discounted_returns`), so a token is also charged for the text it leads
  to. The value returned stays r.
  """
  sampled = sampled[..., None].astype(jnp.int32)
  log_q = jnp.take_along_axis(_log_softmax(student_logits), sampled,
                              axis=-1)[..., 0]
  log_p = jnp.take_along_axis(_log_softmax(teacher_logits), sampled,
                              axis=-1)[..., 0]
  cost = lax.stop_gradient(log_q - log_p)
  weight = cost if advantage is None else lax.stop_gradient(advantage)
  return cost + weight * (log_q - lax.stop_gradient(log_q))


def discounted_returns(costs: Array, mask: Array, discount: float) -> Array:
  """returns[t] = sum over later counted tokens t' >= t of
  discount**(t' - t) * costs[t'], along the last axis.

  Positions with mask 0 add nothing, and the discount counts positions, so a
  row's masked tail (padding, text after EOS) is not charged to anyone.
  discount=0 gives the counted costs themselves.
  """
  counted = jnp.where(mask > 0, costs, 0.0).astype(jnp.float32)

  def step(later, cost):
    total = cost + discount * later
    return total, total

  _, out = lax.scan(step, jnp.zeros(counted.shape[:-1], jnp.float32),
                    jnp.moveaxis(counted, -1, 0), reverse=True)
  return jnp.moveaxis(out, 0, -1)


def entropy(logits: Array, *, temperature: Any = 1.0) -> Array:
  """Shannon entropy (nats) of softmax(logits / T); never scaled by T**2.

  Used for metrics and to relate soft CE to forward KL.
  """
  log_p = _log_softmax(logits, temperature)
  support = log_p > _NEG_INF
  safe_log_p = jnp.where(support, log_p, 0.0)
  terms = jnp.exp(safe_log_p) * safe_log_p
  return -jnp.sum(jnp.where(support, terms, 0.0), axis=-1)


# ----------------------------------------------------------------------------
# Divergences on full distributions.
# ----------------------------------------------------------------------------


def forward_kl(student_logits: Array, teacher_logits: Array, *,
               temperature: Any = 1.0,
               scale_by_temperature_squared: bool = True) -> Array:
  """KL(teacher_T || student_T) per example, times T**2 by default.

  Mode-covering (Hinton et al. 2015): the student is penalised for missing
  any mass the teacher has.
  """
  # With log p = t - lse_p and log q = s - lse_q (t, s the max-shifted logits
  # over T) and sum_i p_i = 1: KL = sum_i p_i (t_i - s_i) - lse_p + lse_q, so
  # no [..., vocab] log-softmax of either side is built. p_i = exp(t_i) /
  # exp(lse_p) reuses the exp(t) that lse_p sums (XLA computes it once), and
  # the 1 / exp(lse_p) is applied per row, after the sum.
  teacher, lse_p, _ = _shift(teacher_logits, temperature)
  student, lse_q, _ = _shift(student_logits, temperature)
  support = teacher > _NEG_INF  # Double where, as in _kl_from_log_probs.
  diff = jnp.where(support, teacher, 0.0) - jnp.where(support, student, 0.0)
  weighted = jnp.sum(jnp.where(support, jnp.exp(teacher) * diff, 0.0), axis=-1)
  kl = weighted * jnp.exp(-lse_p) - lse_p + lse_q
  return _maybe_scale(kl, temperature, scale_by_temperature_squared)


def reverse_kl(student_logits: Array, teacher_logits: Array, *,
               temperature: Any = 1.0,
               scale_by_temperature_squared: bool = True) -> Array:
  """KL(student_T || teacher_T) per example, times T**2 by default.

  Mode-seeking (MiniLLM, Gu et al. 2024): the student may ignore teacher modes
  but is penalised for mass where the teacher has little.
  """
  log_q = _log_softmax(student_logits, temperature)
  log_p = _log_softmax(teacher_logits, temperature)
  kl = _kl_from_log_probs(log_q, log_p)
  return _maybe_scale(kl, temperature, scale_by_temperature_squared)


def generalized_jsd(student_logits: Array, teacher_logits: Array, *,
                    temperature: Any = 1.0, beta: float = 0.5,
                    scale_by_temperature_squared: bool = True) -> Array:
  """Generalised Jensen-Shannon divergence, GKD/TRL convention; times T**2.

  With p = teacher_T, q = student_T and M = beta * p + (1 - beta) * q:

    0 < beta < 1:  JSD_beta = beta * KL(p || M) + (1 - beta) * KL(q || M)
    beta == 0:     KL(p || q)   (forward KL)
    beta == 1:     KL(q || p)   (reverse KL)

  This is Eq. (1) of Agarwal et al. 2024 (GKD) and TRL's
  ``GKDTrainer.generalized_jsd_loss``, so a ``beta`` copied from those configs
  means the same here. beta=0.5 is the usual symmetric JSD (bounded by log 2).
  Note the ends are limits of the *gradient direction*, not of the value: the
  interior formula tends to beta * KL(p || q) as beta -> 0 (and to
  (1 - beta) * KL(q || p) as beta -> 1), so the value jumps at exactly 0 and 1.
  Swapping student and teacher maps beta to 1 - beta.

  Args:
    student_logits: [..., vocab] student logits.
    teacher_logits: [..., vocab] teacher logits.
    temperature: T dividing both logits.
    beta: teacher weight in the mixture, a Python number in [0, 1].
    scale_by_temperature_squared: multiply by T**2.

  Returns:
    float32 [...] per-example divergence.
  """
  beta = _check_unit_interval('beta', beta)
  log_q = _log_softmax(student_logits, temperature)
  log_p = _log_softmax(teacher_logits, temperature)
  if beta == 0.0:
    jsd = _kl_from_log_probs(log_p, log_q)
  elif beta == 1.0:
    jsd = _kl_from_log_probs(log_q, log_p)
  else:
    log_m = _log_mixture(log_p, log_q, beta)
    jsd = (beta * _kl_from_log_probs(log_p, log_m) +
           (1.0 - beta) * _kl_from_log_probs(log_q, log_m))
  return _maybe_scale(jsd, temperature, scale_by_temperature_squared)


def skew_forward_kl(student_logits: Array, teacher_logits: Array, *,
                    temperature: Any = 1.0, lam: float = 0.1,
                    scale_by_temperature_squared: bool = True) -> Array:
  """Skew forward KL (DistiLLM, Ko et al. 2024); times T**2 by default.

  KL(p || lam * p + (1 - lam) * q) with p = teacher_T, q = student_T.
  lam=0 is forward KL; lam=1 is identically 0. Mixing a little of p into the
  student's side bounds the log-ratio by -log(lam), which keeps gradients
  stable when the student puts near-zero mass on teacher modes. DistiLLM's
  default is lam=0.1.
  """
  lam = _check_unit_interval('lam', lam)
  log_q = _log_softmax(student_logits, temperature)
  log_p = _log_softmax(teacher_logits, temperature)
  if lam == 0.0:
    kl = _kl_from_log_probs(log_p, log_q)
  elif lam == 1.0:
    kl = jnp.zeros(log_p.shape[:-1], jnp.float32)
  else:
    kl = _kl_from_log_probs(log_p, _log_mixture(log_p, log_q, lam))
  return _maybe_scale(kl, temperature, scale_by_temperature_squared)


def skew_reverse_kl(student_logits: Array, teacher_logits: Array, *,
                    temperature: Any = 1.0, lam: float = 0.1,
                    scale_by_temperature_squared: bool = True) -> Array:
  """Skew reverse KL (DistiLLM, Ko et al. 2024); times T**2 by default.

  KL(q || lam * q + (1 - lam) * p) with p = teacher_T, q = student_T.
  lam=0 is reverse KL; lam=1 is identically 0.
  """
  lam = _check_unit_interval('lam', lam)
  log_q = _log_softmax(student_logits, temperature)
  log_p = _log_softmax(teacher_logits, temperature)
  if lam == 0.0:
    kl = _kl_from_log_probs(log_q, log_p)
  elif lam == 1.0:
    kl = jnp.zeros(log_q.shape[:-1], jnp.float32)
  else:
    kl = _kl_from_log_probs(log_q, _log_mixture(log_q, log_p, lam))
  return _maybe_scale(kl, temperature, scale_by_temperature_squared)


def total_variation(student_logits: Array, teacher_logits: Array, *,
                    temperature: Any = 1.0,
                    scale_by_temperature_squared: bool = True) -> Array:
  """Total variation distance 0.5 * sum_i |p_i - q_i|; times T**2 by default.

  Unscaled it lies in [0, 1]. The T**2 factor is kept for uniformity with the
  other soft targets, but TVD's gradients shrink like 1/T (not 1/T**2) as T
  grows, so at large T the scaled loss weighs more than a scaled KL would; pass
  ``scale_by_temperature_squared=False`` to get the plain distance.
  """
  p = jnp.exp(_log_softmax(teacher_logits, temperature))
  q = jnp.exp(_log_softmax(student_logits, temperature))
  tvd = 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)
  return _maybe_scale(tvd, temperature, scale_by_temperature_squared)


def logit_mse(student_logits: Array, teacher_logits: Array, *,
              temperature: Any = 1.0,
              scale_by_temperature_squared: bool = True) -> Array:
  """Mean over vocabulary of (student/T - teacher/T)**2; times T**2 by default.

  Raw logits, not centred (Ba & Caruana 2014), so a constant offset between the
  two models counts. With the default T**2 factor the temperature cancels and
  this is the plain MSE of the raw logits for every T; with
  ``scale_by_temperature_squared=False`` it is the MSE of the T-divided logits,
  i.e. the plain MSE divided by T**2. Entries that are -inf in either model
  (masked vocabulary) are left out of the mean.
  """
  _check_temperature(temperature)
  s = student_logits.astype(jnp.float32) / temperature
  t = teacher_logits.astype(jnp.float32) / temperature
  valid = jnp.isfinite(s) & jnp.isfinite(t)
  diff = jnp.where(valid, s, 0.0) - jnp.where(valid, t, 0.0)
  count = jnp.maximum(jnp.sum(valid, axis=-1), 1).astype(jnp.float32)
  mse = jnp.sum(jnp.square(diff), axis=-1) / count
  return _maybe_scale(mse, temperature, scale_by_temperature_squared)


def soft_cross_entropy(student_logits: Array, teacher_logits: Array, *,
                       temperature: Any = 1.0,
                       scale_by_temperature_squared: bool = True) -> Array:
  """-sum_i p_i log q_i (p = teacher_T, q = student_T); times T**2 by default.

  Equals forward_kl + entropy(teacher_T) (before scaling): the same gradient
  w.r.t. the student as forward KL, but the value does not go to zero when the
  student matches the teacher, which matters when it is logged or compared.
  """
  log_q = _log_softmax(student_logits, temperature)
  log_p = _log_softmax(teacher_logits, temperature)
  support = log_p > _NEG_INF
  safe_log_p = jnp.where(support, log_p, 0.0)
  safe_log_q = jnp.where(support, log_q, 0.0)
  terms = jnp.exp(safe_log_p) * safe_log_q
  ce = -jnp.sum(jnp.where(support, terms, 0.0), axis=-1)
  return _maybe_scale(ce, temperature, scale_by_temperature_squared)


def pseudo_label_cross_entropy(student_logits: Array, teacher_logits: Array,
                               *, temperature: Any = 1.0,
                               scale_by_temperature_squared: bool = True
                               ) -> Array:
  """Cross-entropy of the student against the teacher's argmax (hard labels).

  Temperature does not apply: the argmax is invariant to T, and the student
  side is a hard-label CE like the task loss, so it is computed at T=1 and
  never scaled by T**2. Both keyword arguments are accepted only so that every
  objective shares one calling signature; they are ignored. Ties in the
  teacher go to the lowest index (``jnp.argmax``).
  """
  del temperature, scale_by_temperature_squared  # Hard target: see docstring.
  labels = jnp.argmax(teacher_logits.astype(jnp.float32), axis=-1)
  return softmax_cross_entropy(student_logits, jax.lax.stop_gradient(labels))


# ----------------------------------------------------------------------------
# Top-k sparse KL (also for cached teacher outputs).
# ----------------------------------------------------------------------------


class TeacherTopK(NamedTuple):
  """The teacher's k most likely entries at one temperature, for caching.

  Attributes:
    log_probs: [..., k] log-probabilities log softmax(teacher / T), descending.
      May be stored in bfloat16.
    indices: [..., k] vocabulary indices of those entries.
    log_tail: [...] log of the remaining mass 1 - sum(top-k probs), computed
      exactly in log space (-inf when nothing remains). Worth storing in
      float32: recomputing it from bfloat16 log_probs loses a ~0.4% mass error.
  """
  log_probs: Array
  indices: Array
  log_tail: Array


def _check_k(k: Any, vocab_size: int) -> int:
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
    raise ValueError(
        f'k must be an int in [1, vocab_size={vocab_size}], got {k!r}.')
  return k


def teacher_topk(teacher_logits: Array, k: int, *,
                 temperature: Any = 1.0) -> TeacherTopK:
  """Top-k of the teacher's distribution at temperature T (what a cache stores).

  The cache is tied to T: softmax(z / T) restricted to the top k cannot be
  recomputed for another T without the full logits.
  """
  k = _check_k(k, teacher_logits.shape[-1])
  log_p = _log_softmax(teacher_logits, temperature)
  log_probs, indices = jax.lax.top_k(log_p, k)
  in_topk = _index_mask(indices, log_p.shape[-1])
  log_tail = _masked_logsumexp(log_p, ~in_topk)
  return TeacherTopK(log_probs, indices, log_tail)


def _bucketed_kl(log_q: Array, in_topk: Array, teacher_topk_log_probs: Array,
                 indices: Array, teacher_log_tail: Optional[Array]) -> Array:
  """KL(p || q) over k + 1 buckets: the top-k entries and one tail bucket."""
  # Student buckets: exact, the tail from a logsumexp over the complement
  # (no 1 - sum cancellation when the tail is tiny).
  log_q_topk = jnp.take_along_axis(log_q, indices, axis=-1)
  log_q_tail = _masked_logsumexp(log_q, ~in_topk)

  # Teacher buckets, renormalised to sum to 1 (bfloat16 storage error).
  log_p_topk = teacher_topk_log_probs.astype(jnp.float32)
  topk_mass = jnp.sum(jnp.exp(log_p_topk), axis=-1)
  if teacher_log_tail is None:
    tail_mass = jnp.maximum(1.0 - topk_mass, 0.0)
  else:
    tail_mass = jnp.exp(teacher_log_tail.astype(jnp.float32))
  # When the top-k cover all the student's support (e.g. k = vocab), any
  # leftover teacher tail is rounding error; drop it rather than return inf.
  tail_mass = jnp.where(log_q_tail > _NEG_INF, tail_mass, 0.0)
  log_norm = jnp.log(topk_mass + tail_mass)
  log_p_topk = log_p_topk - log_norm[..., None]
  log_p_tail = _safe_log(tail_mass) - log_norm

  return (_kl_from_log_probs(log_p_topk, log_q_topk) +
          _kl_from_log_probs(log_p_tail[..., None], log_q_tail[..., None]))


def topk_kl_from_cache(student_logits: Array, topk_log_probs: Array,
                       topk_indices: Array, *,
                       teacher_log_tail: Optional[Array] = None,
                       temperature: Any = 1.0,
                       scale_by_temperature_squared: bool = True) -> Array:
  """Top-k sparse forward KL from a teacher's precomputed top-k; times T**2.

  Buckets: the teacher's k entries plus one tail bucket. Teacher tail mass is
  ``exp(teacher_log_tail)`` if given, else 1 - sum(exp(topk_log_probs)) clipped
  at 0; the k + 1 teacher masses are then renormalised to sum to 1, which
  absorbs bfloat16 rounding of the stored values. The student's tail is its
  exact mass outside ``topk_indices``.

  Args:
    student_logits: [..., vocab] student logits.
    topk_log_probs: [..., k] teacher log-probabilities at THIS temperature
      (as returned by ``teacher_topk(..., temperature=T)``); float32 or
      bfloat16. T is not applied to them again.
    topk_indices: [..., k] their vocabulary indices (distinct per row).
    teacher_log_tail: optional [...] exact log tail mass (``TeacherTopK``).
    temperature: T dividing the student's logits (and giving the T**2 factor).
    scale_by_temperature_squared: multiply by T**2.

  Returns:
    float32 [...] per-example divergence.
  """
  log_q = _log_softmax(student_logits, temperature)
  in_topk = _index_mask(topk_indices, log_q.shape[-1])
  kl = _bucketed_kl(log_q, in_topk, topk_log_probs, topk_indices,
                    teacher_log_tail)
  return _maybe_scale(kl, temperature, scale_by_temperature_squared)


def topk_kl(student_logits: Array, teacher_logits: Array, *, k: int,
            temperature: Any = 1.0,
            scale_by_temperature_squared: bool = True) -> Array:
  """Top-k sparse forward KL from full teacher logits; times T**2 by default.

  Same buckets as ``topk_kl_from_cache`` (teacher's top k at temperature T plus
  one exact tail bucket each side). With k = vocab size it equals forward_kl.
  """
  k = _check_k(k, teacher_logits.shape[-1])
  log_q = _log_softmax(student_logits, temperature)
  log_p = _log_softmax(teacher_logits, temperature)
  topk_log_p, indices = jax.lax.top_k(log_p, k)
  in_topk = _index_mask(indices, log_p.shape[-1])
  log_p_tail = _masked_logsumexp(log_p, ~in_topk)
  kl = _bucketed_kl(log_q, in_topk, topk_log_p, indices, log_p_tail)
  return _maybe_scale(kl, temperature, scale_by_temperature_squared)


# ----------------------------------------------------------------------------
# Registry: config name -> fn(student_logits, teacher_logits, *,
#                              temperature=1.0, **options).
# ----------------------------------------------------------------------------

OBJECTIVES: dict[str, Objective] = {
    'kl': forward_kl,
    'forward_kl': forward_kl,
    'reverse_kl': reverse_kl,
    'jsd': generalized_jsd,  # option: beta (GKD/TRL convention).
    'skew_kl': skew_forward_kl,  # option: lam.
    'skew_forward_kl': skew_forward_kl,
    'skew_reverse_kl': skew_reverse_kl,  # option: lam.
    'tvd': total_variation,
    'mse': logit_mse,
    'soft_ce': soft_cross_entropy,
    'hard_ce': pseudo_label_cross_entropy,
    'pseudo_label': pseudo_label_cross_entropy,
    'topk_kl': topk_kl,  # option: k (required).
}


def get_objective(name: str) -> Objective:
  """Looks up a distillation objective by its config name."""
  try:
    return OBJECTIVES[name]
  except (KeyError, TypeError):
    allowed = ', '.join(sorted(OBJECTIVES))
    raise ValueError(f'Unknown distillation objective {name!r}; '
                     f'allowed: {allowed}.') from None
