"""Training objectives: which per-example losses a run combines, built from the config.

An objective maps (student logits, teacher logits or None, labels) to a
per-example loss and its named terms. It is plugged into the step; the step
never branches on which objective it runs.

The classic one (Hinton et al. 2015):
    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(hard labels)
where the hard labels are the dataset's or the teacher's argmax.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kdjax import losses

HARD_LABEL_SOURCES = ("dataset", "teacher")


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
  """Plain supervised training (teacher and scratch modes)."""
  uses_teacher = False

  def __call__(self, student_logits, teacher_logits, labels):
    del teacher_logits
    ce = losses.softmax_cross_entropy(student_logits, labels)
    return ce, {"ce": ce}


@dataclasses.dataclass(frozen=True)
class HintonDistillation:
  """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(hard labels)."""
  alpha: float = 0.5
  temperature: float = 2.0
  hard_labels: str = "dataset"  # Or 'teacher': the teacher's argmax.
  uses_teacher = True

  def __call__(self, student_logits, teacher_logits, labels):
    if self.hard_labels == "teacher":
      labels = jnp.argmax(teacher_logits, axis=-1)
    kl = losses.forward_kl(student_logits, teacher_logits,
                           temperature=self.temperature)
    ce = losses.softmax_cross_entropy(student_logits, labels)
    loss = self.alpha * kl + (1.0 - self.alpha) * ce
    return loss, {"kl": kl, "ce": ce}


def from_config(config, mode: str):
  """The objective a mode trains with: CE for teacher/scratch, KD for distill."""
  if mode in ("teacher", "scratch"):
    return CrossEntropy()
  d = config.distill
  return HintonDistillation(alpha=float(d.alpha),
                            temperature=float(d.temperature),
                            hard_labels=d.hard_labels)


def describe(objective) -> str:
  """A one-line human description for logs and the report."""
  if isinstance(objective, HintonDistillation):
    label = "teacher argmax" if objective.hard_labels == "teacher" else "labels"
    return (f"{objective.alpha:g} * T^2 * KL(teacher_T || student_T) + "
            f"{1 - objective.alpha:g} * CE({label}), T={objective.temperature:g}")
  return "CE(labels)"


def per_example_agreement(student_logits: jax.Array,
                          teacher_logits: jax.Array) -> jax.Array:
  return (jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
          ).astype(jnp.float32)
