"""Distillation and task losses: pure functions on logits.

Conventions (written down once, see DESIGN.md):
  * Every function returns UNREDUCED values, one per example (or per token):
    shape ``logits.shape[:-1]``. Masking and the global normalisation happen in
    the step, which knows the global count of valid examples/tokens.
  * Arguments are ``(student_logits, teacher_logits)`` for divergences.
  * ``temperature`` T divides both students' and teachers' logits. Soft-target
    terms are multiplied by T**2 (Hinton et al. 2015) unless
    ``scale_by_temperature_squared=False``.
  * Forward KL = KL(teacher || student); reverse KL = KL(student || teacher).
  * Everything is computed in float32 in log space. Logits of -inf (masked
    vocabulary entries) contribute exactly zero and never produce NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _log_softmax(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _xlogy_terms(p: jax.Array, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Elementwise p * (log p - log q), defined as 0 where p == 0."""
  safe_diff = jnp.where(p > 0, log_p - log_q, 0.0)
  return p * safe_diff


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy with integer labels; per example, float32."""
  log_probs = _log_softmax(logits)
  return -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32),
                              axis=-1)[..., 0]


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array, *,
               temperature: float = 1.0,
               scale_by_temperature_squared: bool = True) -> jax.Array:
  """KL(teacher_T || student_T) per example, times T**2 by default."""
  log_q = _log_softmax(student_logits, temperature)
  log_p = _log_softmax(teacher_logits, temperature)
  kl = jnp.sum(_xlogy_terms(jnp.exp(log_p), log_p, log_q), axis=-1)
  if scale_by_temperature_squared:
    kl = kl * temperature**2
  return kl
