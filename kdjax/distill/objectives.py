"""Training objectives: which losses a run combines, built once from the config.

An objective turns the student's outputs, the (frozen) teachers' outputs and
the labels into a per-example (or per-token) loss plus its named terms. It is
plugged into the step; the step never branches on which objective it runs.

    loss = sum_i w_i(step) * term_i(student, teacher; T(step))      (output terms)
         + sum_j v_j(step) * feature_j(student features, teacher features)

The default (no `config.distill.terms`) is Hinton et al. (2015):
    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(hard labels)
with the hard labels the dataset's or the teacher's argmax. The 'ce' term is
the task loss on hard labels and never sees the temperature. Every other term
is a divergence from kdjax.distill.losses (conventions in its module docstring).

Several teachers: 'ensemble' mixes them in probability space at temperature T,
  p = sum_k c_k softmax(z_k / T), c = normalised teacher weights,
and passes T * log p on as the teacher's logits (so dividing by T again in a
divergence recovers log p exactly); 'sum' adds sum_k c_k * term(student, k).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from kdjax.core.config import ConfigError, fail
from kdjax.distill import features as features_lib
from kdjax.distill import losses

HARD_LABEL_SOURCES = ("dataset", "teacher")
SCHEDULES = ("constant", "linear", "cosine")
TEACHER_COMBINATIONS = ("ensemble", "sum")
TASK_TERM = "ce"
# Reverse KL on the student's sampled tokens (on-policy distillation): reads
# the labels, like 'ce', but needs a teacher, like a divergence.
SAMPLED_TERM = "sampled_reverse_kl"
DISCOUNT = "discount"  # SAMPLED_TERM's option: future costs' weight per token.


@flax.struct.dataclass
class TeacherTopK:
  """A teacher's cached outputs: [..., k] log-probs at T and indices, [...] tail.

  What kdjax.distill.teacher_cache stores per example or token instead of the
  teacher's logits; the objective turns every divergence term into the top-k
  KL with a tail bucket (losses.topk_kl_from_cache) when a teacher comes so.
  """
  log_probs: jax.Array
  indices: jax.Array
  log_tail: jax.Array

  @property
  def top1(self) -> jax.Array:
    """The teacher's argmax (the first of its descending top k)."""
    return self.indices[..., 0].astype(jnp.int32)

  def dense_log_probs(self, vocab: int) -> jax.Array:
    """[..., vocab] log-probs at T: the top k, the tail spread evenly.

    Only for argmax-based metrics of small (classification) vocabularies; the
    loss uses the k + 1 buckets.
    """
    rest = vocab - self.log_probs.shape[-1]
    fill = (self.log_tail.astype(jnp.float32) - math.log(rest) if rest
            else jnp.full(self.log_tail.shape, -jnp.inf, jnp.float32))
    dense = jnp.broadcast_to(fill[..., None], fill.shape + (vocab,))
    return jnp.put_along_axis(dense, self.indices.astype(jnp.int32),
                              self.log_probs.astype(jnp.float32), axis=-1,
                              inplace=False)


@flax.struct.dataclass
class ModelOutputs:
  """What a forward pass hands the objective: logits and sown intermediates.

  A language model may hand over its final hidden states [B, L, D] and LM
  head [D, V] instead of logits (logits=None), so the token loss can apply
  the head chunk by chunk (kdjax.distill.token_loss). A cached teacher hands
  over a TeacherTopK as `hidden` with no head (and dense `logits` only for
  the agreement metric of classification).
  """
  logits: jax.Array | None
  intermediates: dict[str, Any] = flax.struct.field(default_factory=dict)
  hidden: Any = None
  head: jax.Array | None = None

  @property
  def topk(self) -> TeacherTopK | None:
    """The cached top k when this teacher came from a cache, else None."""
    return self.hidden if isinstance(self.hidden, TeacherTopK) else None


def make_schedule(start: float, end: float | None, kind: str,
                  total_steps: int) -> optax.Schedule:
  """constant / linear / cosine from start to end over the run (optax schedules)."""
  if kind not in SCHEDULES:
    raise ValueError(f"Unknown schedule {kind!r}; allowed: {SCHEDULES}.")
  end = start if end is None else end
  if kind == "constant" or end == start:
    return optax.constant_schedule(start)
  steps = max(int(total_steps), 1)
  if kind == "linear":
    return optax.linear_schedule(start, end, steps)
  # optax's cosine schedules scale their start value, so a ramp up from 0
  # (a term switched on gradually) would stay at 0: run a unit cosine from 1
  # to 0 and map it onto [end, start].
  unit = optax.cosine_decay_schedule(1.0, steps)
  return lambda count: end + (start - end) * unit(count)


@dataclasses.dataclass(frozen=True)
class Term:
  """One weighted output-level term: `ce` or a divergence from losses.OBJECTIVES."""
  name: str
  weight: optax.Schedule
  options: tuple[tuple[str, Any], ...] = ()
  label: str = ""

  def __call__(self, student_logits, teacher_logits, labels, temperature,
               advantage=None):
    if self.name == TASK_TERM:
      return losses.softmax_cross_entropy(student_logits, labels)
    if self.name == SAMPLED_TERM:  # labels = the tokens the student sampled.
      return losses.sampled_reverse_kl(student_logits, teacher_logits, labels,
                                       advantage=advantage)
    fn = losses.get_objective(self.name)
    return fn(student_logits, teacher_logits, temperature=temperature,
              **dict(self.options))

  def from_topk(self, student_logits, teacher: TeacherTopK, temperature):
    """A divergence term against a cached top k: the top-k KL + tail bucket
    (the cache's k, so a term's own 'k' option is not used)."""
    options = {k: v for k, v in self.options if k != "k"}
    return losses.topk_kl_from_cache(
        student_logits, teacher.log_probs, teacher.indices.astype(jnp.int32),
        teacher_log_tail=teacher.log_tail, temperature=temperature, **options)


@dataclasses.dataclass(frozen=True)
class Objective:
  """Weighted output terms + feature terms, over one or several teachers."""
  terms: tuple[Term, ...]
  temperature: optax.Schedule = optax.constant_schedule(1.0)
  hard_labels: str = "dataset"
  teacher_weights: tuple[float, ...] = ()  # Empty: no teacher (CE only).
  combine: str = "ensemble"
  feature_terms: tuple[features_lib.FeatureTerm, ...] = ()
  description: str = "CE(labels)"

  @property
  def uses_teacher(self) -> bool:
    return bool(self.teacher_weights)

  @property
  def needs_features(self) -> bool:
    return bool(self.feature_terms)

  @property
  def sampled_discount(self) -> float:
    """The `sampled_reverse_kl` term's discount (0: each token's own cost)."""
    for term in self.terms:
      if term.name == SAMPLED_TERM:
        return float(dict(term.options).get(DISCOUNT, 0.0))
    return 0.0

  def __call__(self, student: ModelOutputs, teachers: Sequence[ModelOutputs],
               labels: jax.Array, step: jax.Array, aux_params: Any = None,
               advantages: jax.Array | None = None):
    """Per-example loss and {term name: per-example value} (unweighted).

    `advantages`: the weights of a `sampled_reverse_kl` term's score
    function, when its discount > 0 (kdjax/distill/token_loss.py computes
    them over the whole sequence first).
    """
    temperature = self.temperature(step)
    cached = teachers[0].topk if self.uses_teacher else None
    sampled = labels  # What sampled_reverse_kl grades: always these tokens.
    if self.uses_teacher and self.hard_labels == "teacher":
      labels = (cached.top1 if cached is not None else
                jnp.argmax(self._ensemble_logits(teachers, 1.0), axis=-1))
    total = jnp.zeros(student.logits.shape[:-1], jnp.float32)
    values: dict[str, jax.Array] = {}
    for term in self.terms:
      term_labels, advantage = self._term_inputs(term, labels, sampled,
                                                 advantages)
      if cached is not None and term.name != TASK_TERM:
        value = term.from_topk(student.logits, cached, temperature)
      elif term.name == TASK_TERM or self.combine == "ensemble":
        teacher_logits = (self._ensemble_logits(teachers, temperature)
                          if self.uses_teacher else None)
        value = term(student.logits, teacher_logits, term_labels,
                     temperature, advantage)
      else:  # 'sum': one divergence per teacher, weighted.
        # The coefficients sum to 1, so a sampled term's advantage weighs
        # the student's score function once in all.
        value = sum(c * term(student.logits, t.logits, term_labels,
                             temperature, advantage)
                    for c, t in zip(self._coefficients(), teachers))
      values[term.label or term.name] = value
      total = total + term.weight(step) * value
    for i, feature in enumerate(self.feature_terms):
      projection = (aux_params or {}).get(features_lib.projection_name(i))
      value = feature(student.intermediates,
                      teachers[feature.teacher].intermediates, projection,
                      batch_ndim=labels.ndim)
      values[f"feature_{i}_{feature.loss}"] = value
      total = total + feature.weight(step) * value
    return total, values

  @staticmethod
  def _term_inputs(term: Term, labels, sampled, advantages):
    """(labels, advantage) for one term: a sampled term grades the tokens
    the student sampled, whatever the hard labels are."""
    if term.name == SAMPLED_TERM:
      return sampled, advantages
    return labels, None

  def _coefficients(self) -> tuple[float, ...]:
    total = sum(self.teacher_weights)
    return tuple(w / total for w in self.teacher_weights)

  def _ensemble_logits(self, teachers: Sequence[ModelOutputs], temperature):
    if len(teachers) == 1:
      return teachers[0].logits
    log_probs = jnp.stack([
        jax.nn.log_softmax(t.logits.astype(jnp.float32) / temperature, -1)
        for t in teachers])
    log_c = jnp.log(jnp.asarray(self._coefficients(), jnp.float32))
    log_mix = jax.nn.logsumexp(
        log_probs + log_c.reshape((-1,) + (1,) * (log_probs.ndim - 1)), axis=0)
    return temperature * log_mix


def cross_entropy() -> Objective:
  """Plain supervised training (teacher and scratch modes)."""
  return Objective(terms=(Term(TASK_TERM, optax.constant_schedule(1.0)),))


def term_specs(distill) -> list[dict[str, Any]]:
  """config.distill.terms as dicts; without terms, Hinton's alpha-weighted kl + ce."""
  if distill.terms:
    return [dict(spec) for spec in distill.terms]
  return [dict(name="kl", weight=float(distill.alpha)),
          dict(name=TASK_TERM, weight=1.0 - float(distill.alpha))]


TERM_FIELDS = ("name", "weight", "weight_end", "schedule")


def distillation(distill, *, num_teachers: int, total_steps: int) -> Objective:
  """The objective described by `config.distill` for a run of total_steps."""
  terms = []
  for spec in term_specs(distill):
    options = tuple(sorted((k, v) for k, v in spec.items()
                           if k not in TERM_FIELDS))
    terms.append(Term(
        name=spec["name"],
        weight=make_schedule(float(spec["weight"]), spec.get("weight_end"),
                             spec.get("schedule", "constant"), total_steps),
        options=options, label=spec["name"]))
  temperature_end = distill.temperature_end
  temperature = make_schedule(
      float(distill.temperature),
      None if temperature_end is None or temperature_end < 0 else temperature_end,
      distill.temperature_schedule, total_steps)
  feature_terms = tuple(
      features_lib.FeatureTerm.from_spec(dict(spec), total_steps, make_schedule)
      for spec in distill.features)
  weights = tuple(float(w) for w in teacher_weights(distill, num_teachers))
  return Objective(terms=tuple(terms), temperature=temperature,
                   hard_labels=distill.hard_labels, teacher_weights=weights,
                   combine=distill.combine,
                   feature_terms=feature_terms,
                   description=describe_distill(distill, num_teachers))


def teacher_weights(distill, num_teachers: int) -> list[float]:
  extra = [float(t.get("weight", 1.0)) for t in distill.extra_teachers]
  return ([float(distill.teacher_weight)] + extra)[:num_teachers]


def describe_distill(distill, num_teachers: int) -> str:
  """One line naming the objective, for logs, run.json and the report."""
  def fmt(spec):
    name = spec["name"]
    opts = ",".join(f"{k}={v}" for k, v in sorted(spec.items())
                    if k not in TERM_FIELDS)
    if name == TASK_TERM:
      label = "teacher argmax" if distill.hard_labels == "teacher" else "labels"
      body = f"CE({label})"
    else:
      body = f"{name}{'(' + opts + ')' if opts else ''}"
    weight = f"{float(spec['weight']):g}"
    if spec.get("weight_end") is not None and spec.get(
        "schedule", "constant") != "constant":
      weight += f"->{float(spec['weight_end']):g} {spec['schedule']}"
    return f"{weight} * {body}"
  parts = [fmt(s) for s in term_specs(distill)]
  parts += [f"{float(f.get('weight', 1.0)):g} * feature_{f.get('loss', 'mse')}"
            f"({f['student']}<-{f['teacher']})"
            for f in distill.features]
  temperature = f"T={float(distill.temperature):g}"
  if distill.temperature_schedule != "constant":
    temperature += (f"->{float(distill.temperature_end):g} "
                    f"{distill.temperature_schedule}")
  text = " + ".join(parts) + f", {temperature}"
  if num_teachers > 1:
    text += f", {num_teachers} teachers ({distill.get('combine', 'ensemble')})"
  return text


def from_config(distill_config, mode: str, *, total_steps: int = 1,
                num_teachers: int = 1) -> Objective:
  """CE for the teacher and scratch modes, config.distill's objective otherwise."""
  if mode in ("teacher", "scratch"):
    return cross_entropy()
  return distillation(distill_config, num_teachers=num_teachers,
                      total_steps=total_steps)


def describe(objective: Objective) -> str:
  return objective.description


def validate_distill(distill) -> None:
  """config.distill: alpha, temperature, hard labels, terms, schedules, features."""
  if not 0.0 <= distill.alpha <= 1.0:
    fail("distill.alpha", distill.alpha, "must be in [0, 1]")
  if distill.temperature <= 0:
    fail("distill.temperature", distill.temperature, "must be > 0")
  if distill.hard_labels not in HARD_LABEL_SOURCES:
    fail("distill.hard_labels", distill.hard_labels,
         f"allowed: {HARD_LABEL_SOURCES}")
  allowed = sorted(set(losses.OBJECTIVES) | {TASK_TERM, SAMPLED_TERM})
  for i, spec in enumerate(term_specs(distill)):
    if spec.get("name") not in allowed:
      fail(f"distill.terms[{i}].name", spec.get("name"), f"allowed: {allowed}")
    if "weight" not in spec or float(spec["weight"]) < 0:
      fail(f"distill.terms[{i}].weight", spec.get("weight"), "must be >= 0")
    if spec.get("schedule", "constant") not in SCHEDULES:
      fail(f"distill.terms[{i}].schedule", spec.get("schedule"),
           f"allowed: {SCHEDULES}")
    if DISCOUNT in spec and (spec["name"] != SAMPLED_TERM
                             or not 0.0 <= float(spec[DISCOUNT]) <= 1.0):
      fail(f"distill.terms[{i}].{DISCOUNT}", spec[DISCOUNT],
           f"in [0, 1], and only for '{SAMPLED_TERM}'")
    k = spec.get("k")
    if (spec["name"] == "topk_kl" and not distill.get("teacher_cache", "")
        and (isinstance(k, bool) or not isinstance(k, int) or k < 1)):
      fail(f"distill.terms[{i}].k", k, "topk_kl keeps the teacher's top k "
           "tokens: an int >= 1 (with a teacher cache, the cache's k)")
    if (spec["name"] == "mse" and distill.extra_teachers
        and distill.combine == "ensemble"):
      fail(f"distill.terms[{i}].name", spec["name"],
           "matches raw logits, which an ensemble of teachers (mixed as "
           "probabilities) does not have: set distill.combine='sum' (one "
           "mse per teacher, weighted)")
  if distill.temperature_schedule not in SCHEDULES:
    fail("distill.temperature_schedule", distill.temperature_schedule,
         f"allowed: {SCHEDULES}")
  if distill.combine not in TEACHER_COMBINATIONS:
    fail("distill.combine", distill.combine,
         f"allowed: {TEACHER_COMBINATIONS}")
  for i, spec in enumerate(distill.features):
    try:
      features_lib.validate_spec(dict(spec), i)
    except ValueError as e:
      raise ConfigError(str(e)) from e


