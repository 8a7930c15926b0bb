"""On-policy distillation: the student writes, the teacher grades.

GKD (Agarwal et al. 2024; TRL's GKDTrainer) in kdjax's terms. Each optimizer
step trains on one of:
  * the student's own rollouts (probability lmbda): the current student
    continues the batch's prompts (its own compiled program, kdjax.models.
    generate), and the loss grades those completions against the teacher;
  * with seq_kd, the teacher's online rollouts of the same prompts;
  * otherwise the data's completions (off-policy KD on prompt/completion
    pairs; lmbda=0 is exactly today's token-level KD on them).
The step itself is the ordinary fused distillation step: a rollout becomes
an ordinary batch (inputs, labels, mask) with the mask on completion tokens
only (never the prompt, never after EOS) and the prompt right-aligned, so
no attention mask is needed.

No cross-entropy on the student's own samples: it would train the student
to copy itself. The on-policy objective is the configured one without its
'ce' terms. `sampled_reverse_kl` (tinker's per-token reverse KL) only makes
sense on the student's samples, so it needs lmbda=1.

Determinism: whether step s is on-policy is drawn from (seed, s); the
sampling key of example i at step s is derived from (seed, s, i), its global
index in the dataset. A resumed run, or a run on another device count, draws
the same rollouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from kdjax.core.config import fail
from kdjax.distill import losses, objectives

# '' = config.distill's own terms (a 'ce' among them trains off-policy steps
# only). topk_kl is not offered: it needs a k, which the on-policy settings
# do not carry (a 'topk_kl' term in distill.terms with loss='' works).
ON_POLICY_LOSSES = ("",) + tuple(sorted(
    (set(losses.OBJECTIVES) - {"topk_kl"}) | {objectives.SAMPLED_TERM}))
STUDENT, TEACHER, DATA = "student", "teacher", "data"


@dataclasses.dataclass(frozen=True)
class Settings:
  """config.distill.on_policy, checked."""
  lmbda: float
  seq_kd: bool
  loss: str
  beta: float
  temperature: float
  top_k: int
  top_p: float
  max_new_tokens: int
  log_rollouts_every: int
  discount: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Settings":
    c = config.distill.on_policy
    return cls(lmbda=float(c.lmbda), seq_kd=bool(c.seq_kd), loss=str(c.loss),
               beta=float(c.beta), temperature=float(c.temperature),
               top_k=int(c.top_k), top_p=float(c.top_p),
               max_new_tokens=int(c.max_new_tokens),
               log_rollouts_every=int(c.log_rollouts_every),
               discount=float(c.discount))


def validate(config: ml_collections.ConfigDict) -> None:
  """config.distill.on_policy: ranges, the loss, what it can run with."""
  c = config.distill.on_policy
  field = "distill.on_policy"
  if not 0.0 <= float(c.lmbda) <= 1.0:
    fail(f"{field}.lmbda", c.lmbda, "a probability in [0, 1]")
  if c.loss not in ON_POLICY_LOSSES:
    fail(f"{field}.loss", c.loss, f"allowed: {ON_POLICY_LOSSES}")
  if not 0.0 <= float(c.beta) <= 1.0:
    fail(f"{field}.beta", c.beta, "in [0, 1] (GKD/TRL convention)")
  if c.loss == objectives.SAMPLED_TERM and (float(c.lmbda) != 1.0
                                           or c.seq_kd):
    fail(f"{field}.loss", c.loss,
         "estimates KL on the student's own samples only: set "
         "distill.on_policy.lmbda=1 and seq_kd=False")
  if c.loss == objectives.SAMPLED_TERM and (
      float(c.temperature) != 1.0 or int(c.top_k) or float(c.top_p) != 1.0):
    fail(f"{field}.loss", c.loss,
         "estimates KL(q || p) from tokens drawn from q itself: sample with "
         "distill.on_policy.temperature=1, top_k=0, top_p=1 (got "
         f"{c.temperature}, {c.top_k}, {c.top_p})")
  if not 0.0 <= float(c.discount) <= 1.0:
    fail(f"{field}.discount", c.discount, "in [0, 1] (0 = each token's own "
         "cost, as tinker)")
  if float(c.discount) and c.loss != objectives.SAMPLED_TERM:
    fail(f"{field}.discount", c.discount,
         f"weighs future costs of '{objectives.SAMPLED_TERM}' only; set it "
         "to 0 for other losses")
  if float(c.temperature) < 0:
    fail(f"{field}.temperature", c.temperature, ">= 0 (0 = greedy)")
  if int(c.top_k) < 0:
    fail(f"{field}.top_k", c.top_k, ">= 0 (0 = off)")
  if not 0.0 < float(c.top_p) <= 1.0:
    fail(f"{field}.top_p", c.top_p, "in (0, 1] (1 = off)")
  if int(c.max_new_tokens) < 1:
    fail(f"{field}.max_new_tokens", c.max_new_tokens, ">= 1")
  if int(c.log_rollouts_every) < 0:
    fail(f"{field}.log_rollouts_every", c.log_rollouts_every,
         ">= 0 (0 = never)")
  if config.distill.get("teacher_cache", ""):
    fail("distill.teacher_cache", config.distill.teacher_cache,
         "on-policy distillation grades new text every step: it needs the "
         "live teacher ('')")
  for role in ("teacher", "student"):
    if config[role].model.name != "llama":
      fail(f"{role}.model.name", config[role].model.name,
           "on-policy rollouts run through the KV-cache sampler: 'llama'")


def objective_config(config: ml_collections.ConfigDict
                     ) -> ml_collections.ConfigDict:
  """config.distill with its terms set to the on-policy loss (weight 1);
  as it is for loss=''."""
  c = config.distill.on_policy
  if not c.loss:
    return config.distill
  distill = ml_collections.ConfigDict(config.distill.to_dict())
  term = {"name": c.loss, "weight": 1.0}
  if c.loss == "jsd":
    term["beta"] = float(c.beta)
  if c.loss == objectives.SAMPLED_TERM and float(c.discount):
    term[objectives.DISCOUNT] = float(c.discount)
  distill.terms = (term,)
  return distill


def source_of_step(settings: Settings, seed: int, step: int) -> str:
  """Who writes step `step`'s completions: STUDENT, TEACHER or DATA.

  Drawn from (seed, step) alone, so resuming or changing the device count
  does not change it.
  """
  draw = np.random.default_rng([int(seed), int(step), 0x6B64]).random()
  if draw < settings.lmbda:
    return STUDENT
  return TEACHER if settings.seq_kd else DATA


def example_keys(seed: int, step: jax.Array, indices: jax.Array) -> jax.Array:
  """One sampling key per example: from (seed, step, global index)."""
  base = jax.random.fold_in(jax.random.key(seed), step)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)


def without_self_imitation(objective: objectives.Objective
                           ) -> objectives.Objective:
  """The objective for the student's own rollouts: its 'ce' terms dropped."""
  terms = tuple(t for t in objective.terms
                if t.name != objectives.TASK_TERM)
  if not terms:
    raise ValueError("the on-policy objective has only 'ce' terms: nothing "
                     "grades the student's samples")
  return dataclasses.replace(objective, terms=terms)


def rollout_texts(tokenizer, prompts: np.ndarray, prompt_lengths: np.ndarray,
                  completions: np.ndarray, eos_id: int, limit: int
                  ) -> list[dict[str, Any]]:
  """A few rollouts as text (for WORKDIR/rollouts.jsonl and TensorBoard)."""
  out = []
  for b in range(min(limit, len(prompts))):
    prompt = prompts[b, prompts.shape[1] - int(prompt_lengths[b]):]
    tokens = list(completions[b])
    if eos_id in tokens:
      tokens = tokens[:tokens.index(eos_id)]
    out.append({"prompt": tokenizer.decode(list(map(int, prompt))),
                "completion": tokenizer.decode(list(map(int, tokens)))})
  return out
