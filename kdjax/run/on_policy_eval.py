"""How good is what the student writes, by the teacher's judgement.

Off-policy metrics (perplexity on reference text) say how well the student
predicts text it is shown; on-policy distillation aims at the text the
student writes itself. So: sample the student's completions of held-out
prompts, then per completion token
  teacher_nll   -log p_teacher(token | prefix): how likely the teacher finds
                the student's text (lower is better);
  reverse_kl    KL(student || teacher) of the next-token distributions at
                those positions, exactly (sum over the vocabulary);
  student_nll   -log p_student(token | prefix) (the samples' own entropy).
Averaged over completion tokens (EOS included, nothing after it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kdjax.data import prompts as prompts_lib
from kdjax.distill import on_policy, step
from kdjax.models import generate


@functools.lru_cache(maxsize=8)
def _sums_fn(student_model, teacher_model):
  student_apply = step.make_apply_fn(student_model)
  teacher_apply = step.make_apply_fn(teacher_model)

  @jax.jit
  def sums(student_params, teacher_params, inputs, labels, mask):
    log_q = jax.nn.log_softmax(step.predict(student_apply, student_params,
                                            inputs).astype(jnp.float32), -1)
    log_p = jax.nn.log_softmax(step.predict(teacher_apply, teacher_params,
                                            inputs).astype(jnp.float32), -1)
    vocab = log_q.shape[-1]
    log_p = log_p[..., :vocab]  # Padded teacher rows (same tokenizer).
    pick = lambda x: jnp.take_along_axis(x, labels[..., None], -1)[..., 0]
    reverse_kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), -1)
    return {"teacher_nll": jnp.sum(-pick(log_p) * mask),
            "student_nll": jnp.sum(-pick(log_q) * mask),
            "reverse_kl": jnp.sum(reverse_kl * mask),
            "count": jnp.sum(mask)}
  return sums


def sampled_quality(student_model, student_params, teacher_model,
                    teacher_params, data: prompts_lib.EncodedPrompts, *,
                    sampling: generate.Sampling, max_new_tokens: int,
                    seed: int = 0, batch_size: int = 64) -> dict[str, float]:
  """The module's metrics on the student's samples of `data`'s prompts
  (sampling keys from (seed, example index), so runs compare on the same
  draws' randomness)."""
  totals: dict[str, float] = {}
  sums = _sums_fn(student_model, teacher_model)
  for start in range(0, len(data), batch_size):
    rows = slice(start, min(start + batch_size, len(data)))
    prompts, lengths = data.prompts[rows], data.prompt_lengths[rows]
    keys = on_policy.example_keys(seed, jnp.int32(-1),
                                  jnp.arange(rows.start, rows.stop))
    completions = generate.generate_padded(
        student_model, student_params, prompts, lengths,
        max_new_tokens=max_new_tokens, sampling=sampling, rng=keys,
        eos_id=data.eos_id)
    tokens, mask = generate.right_align(prompts, lengths, completions,
                                        data.eos_id)
    batch = sums(student_params, teacher_params, tokens[:, :-1],
                 tokens[:, 1:], mask[:, 1:])
    for k, v in jax.device_get(batch).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = max(totals.pop("count"), 1.0)
  return {k: v / count for k, v in totals.items()} | {
      "sampled_tokens": int(count)}
