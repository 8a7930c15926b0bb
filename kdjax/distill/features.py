"""Intermediate-feature distillation: match chosen student and teacher activations.

Activations come from Flax's `sow` (models sow into the 'intermediates'
collection; apply with mutable=['intermediates']), never from hooks. A
feature is named by its path in that collection, '/'-separated, e.g.
'hidden_0' (MLP), 'penultimate' or 'stage_1' (CNN), 'block_0/output' (transformer),
'block_0/attention/attention_weights' (attention maps). Layer names are the
unrolled ones on a scan_layers model too (kdjax/models/stacking.py).

When the student's width differs from the teacher's, a learned linear
projection (student width -> teacher width) maps the student's feature; its
parameters train with the student (`TrainState.aux_params`) and are not part
of the exported student (the checkpoint's params item).

Losses (per example, or per token for token-level runs):
  mse           mean squared difference over the feature dims
  cosine        1 - cosine similarity along the last axis, averaged over the rest
  attention_kl  KL(teacher row || student row) of attention maps [B, H, Q, K],
                averaged over heads and queries (heads averaged first if counts differ)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kdjax.models import stacking

FEATURE_LOSSES = ("mse", "cosine", "attention_kl")
SPEC_FIELDS = ("student", "teacher", "loss", "weight", "weight_end", "schedule",
               "teacher_index")


def projection_name(index: int) -> str:
  return f"feature_projection_{index}"


def lookup(intermediates: dict[str, Any], path: str) -> jax.Array:
  """The sown value at a '/'-separated path (the last one sown there).

  Layer names are the unrolled ones ('layers_3/output'); on a scan_layers
  model the value is row 3 of the stacked 'layers/output'.
  """
  try:
    parts, layer = stacking.locate(intermediates, path)
  except KeyError as e:
    available = sorted(_paths(intermediates))
    raise KeyError(f"No sown intermediate {path!r}; available: "
                   f"{available}.") from e
  node: Any = intermediates
  for part in parts:
    node = node[part]
  if isinstance(node, dict):
    raise KeyError(f"{path!r} names a group of intermediates, not one: "
                   f"{sorted(_paths(node))}")
  value = node[-1] if isinstance(node, (tuple, list)) else node
  return value if layer is None else value[layer[1]]


def _paths(tree: Any, prefix: str = "") -> list[str]:
  if isinstance(tree, dict):
    out = []
    for k, v in tree.items():
      out += _paths(v, f"{prefix}{k}/")
    return out
  return [prefix.rstrip("/")]


def _reduce_to(values: jax.Array, batch_ndim: int) -> jax.Array:
  axes = tuple(range(batch_ndim, values.ndim))
  return jnp.mean(values, axis=axes) if axes else values


@dataclasses.dataclass(frozen=True)
class FeatureTerm:
  """One student-feature <- teacher-feature matching term."""
  student: str
  teacher_path: str
  loss: str
  weight: Callable[[Any], Any]
  teacher: int = 0  # Index into the teachers list.

  @classmethod
  def from_spec(cls, spec: dict[str, Any], total_steps: int, make_schedule):
    return cls(student=spec["student"], teacher_path=spec["teacher"],
               loss=spec.get("loss", "mse"),
               weight=make_schedule(float(spec.get("weight", 1.0)),
                                    spec.get("weight_end"),
                                    spec.get("schedule", "constant"),
                                    total_steps),
               teacher=int(spec.get("teacher_index", 0)))

  def __call__(self, student_intermediates, teacher_intermediates, projection,
               batch_ndim: int = 1) -> jax.Array:
    s = lookup(student_intermediates, self.student).astype(jnp.float32)
    t = jax.lax.stop_gradient(
        lookup(teacher_intermediates, self.teacher_path).astype(jnp.float32))
    if self.loss == "attention_kl":
      return attention_kl(s, t, batch_ndim)
    if projection is not None:
      s = s @ projection["kernel"] + projection["bias"]
    if s.shape != t.shape:
      raise ValueError(f"Feature shapes differ after projection: student "
                       f"{self.student} {s.shape} vs teacher {self.teacher_path} "
                       f"{t.shape}.")
    if self.loss == "mse":
      return _reduce_to(jnp.square(s - t), batch_ndim)
    cos = jnp.sum(s * t, -1) / (jnp.linalg.norm(s, axis=-1) *
                                jnp.linalg.norm(t, axis=-1) + 1e-8)
    return _reduce_to(1.0 - cos, batch_ndim)


def attention_kl(student: jax.Array, teacher: jax.Array,
                 batch_ndim: int = 1) -> jax.Array:
  """KL(teacher || student) per attention row; maps are [B, H, Q, K] probabilities."""
  if student.shape[1] != teacher.shape[1]:
    student = jnp.mean(student, axis=1, keepdims=True)
    teacher = jnp.mean(teacher, axis=1, keepdims=True)
  eps = 1e-9
  kl = jnp.sum(jnp.where(teacher > 0, teacher * (
      jnp.log(jnp.maximum(teacher, eps)) - jnp.log(jnp.maximum(student, eps))),
                         0.0), axis=-1)  # [B, H, Q]
  if batch_ndim == 2:  # Token-level: one value per query token.
    return jnp.mean(kl, axis=1)
  return _reduce_to(kl, 1)


def init_projections(feature_terms, student_intermediates, teachers_intermediates,
                     rng: jax.Array) -> dict[str, Any]:
  """Linear maps for features whose last dims differ (shapes from eval_shape)."""
  projections = {}
  for i, term in enumerate(feature_terms):
    if term.loss == "attention_kl":
      continue
    s = lookup(student_intermediates, term.student)
    t = lookup(teachers_intermediates[term.teacher], term.teacher_path)
    if s.shape[-1] != t.shape[-1]:
      key = jax.random.fold_in(rng, i)
      scale = 1.0 / jnp.sqrt(s.shape[-1])
      projections[projection_name(i)] = {
          "kernel": scale * jax.random.normal(key, (s.shape[-1], t.shape[-1])),
          "bias": jnp.zeros((t.shape[-1],))}
  return projections


def validate_spec(spec: dict[str, Any], index: int) -> None:
  field = f"config.distill.features[{index}]"
  for required in ("student", "teacher"):
    if not spec.get(required):
      raise ValueError(f"{field}.{required} is missing: name a sown "
                       "intermediate, e.g. 'hidden_0' or 'penultimate'.")
  if spec.get("loss", "mse") not in FEATURE_LOSSES:
    raise ValueError(f"{field}.loss={spec.get('loss')!r} is invalid: allowed: "
                     f"{FEATURE_LOSSES}.")
  unknown = set(spec) - set(SPEC_FIELDS)
  if unknown:
    raise ValueError(f"{field} has unknown field(s) {sorted(unknown)}; allowed: "
                     f"{list(SPEC_FIELDS)}.")
