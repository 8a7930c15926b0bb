"""Language-model metrics: perplexity, agreement and KL to the teacher, speed.

`token_metrics` runs student (and teacher) over packed held-out sequences,
data-parallel over the mesh, and sums per-token statistics on device, so only
scalars reach the host. The training loop (kdjax.run.tasks) evaluates with it;
the LM report (kdjax.run.lm_report) uses it and `generation_speed`.

Definitions (over tokens with mask 1):
  perplexity       exp(mean negative log-likelihood of the label token)
  accuracy         argmax == label
  agreement        student argmax == teacher argmax
  kl_to_teacher    mean KL(teacher || student) at T = 1 (nats per token)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.distill import parallel, step
from kdjax.models import generate
from kdjax.models import llama as llama_lib


def _batch_sums(student_logits, teacher_logits, labels, mask):
  """Per-batch sums of the definitions above (float32 on device)."""
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(log_q, labels[..., None], -1)[..., 0]
  prediction = jnp.argmax(log_q, -1)
  sums = {"nll": jnp.sum(nll * mask), "count": jnp.sum(mask),
          "correct": jnp.sum((prediction == labels) * mask)}
  if teacher_logits is not None:
    # A teacher vocabulary padded past the student's (same tokenizer) is
    # cut to the student's ids, as in training (run/train.py).
    teacher_logits = teacher_logits[..., :student_logits.shape[-1]]
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)
    sums["kl"] = jnp.sum(kl * mask)
    sums["agreement"] = jnp.sum(
        (prediction == jnp.argmax(log_p, -1)) * mask)
  return sums


@functools.lru_cache(maxsize=8)
def _jitted_sums(student_apply, teacher_apply):
  def sums(params, teacher_params, batch):
    student = step.predict(student_apply, params, batch["inputs"])
    teacher = (step.predict(teacher_apply, teacher_params, batch["inputs"])
               if teacher_apply is not None else None)
    return _batch_sums(student, teacher, batch["labels"], batch["mask"])
  return jax.jit(sums)


def token_metrics(apply_fn, params, arrays: dict[str, np.ndarray], mesh, *,
                  teacher_apply=None, teacher_params=None,
                  batch_size: int = 8) -> dict[str, float]:
  """Metrics of a model (apply_fn from step.make_apply_fn) on packed sequences.

  `arrays` is the global set (every process holds all of it, as
  kdjax.data.lm.lm_eval_arrays returns); rows are split over devices in
  batches of `batch_size` (rounded to a multiple of the device count).
  """
  num_devices = mesh.devices.size
  batch_size = max(num_devices, batch_size // num_devices * num_devices)
  forward = _jitted_sums(apply_fn, teacher_apply)
  params = parallel.on_mesh(params, mesh)
  if teacher_params is not None:
    teacher_params = parallel.on_mesh(teacher_params, mesh)
  n = len(arrays["inputs"])
  totals: dict[str, float] = {}
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in arrays.items()}
    pad = batch_size - len(chunk["inputs"])
    if pad:  # Padded rows have mask 0.
      chunk = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in chunk.items()}
    per_process = batch_size // jax.process_count()
    lo = jax.process_index() * per_process
    local = {k: v[lo:lo + per_process] for k, v in chunk.items()}
    sums = forward(params, teacher_params, parallel.shard_batch(local, mesh))
    sums = jax.device_get(sums)
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = max(totals.pop("count"), 1.0)
  result = {"perplexity": math.exp(totals["nll"] / count),
            "nll": totals["nll"] / count,
            "accuracy": totals["correct"] / count, "tokens": int(count)}
  if "kl" in totals:
    result["kl_to_teacher"] = totals["kl"] / count
    result["agreement_with_teacher"] = totals["agreement"] / count
  return result


def _spans_devices(params) -> bool:
  return any(isinstance(x, jax.Array) and len(x.sharding.device_set) > 1
             for x in jax.tree.leaves(params))


def generation_speed(model, params, arrays, *, batch: int, prompt_length: int,
                     new_tokens: int) -> float:
  """Greedy tokens/s of a llama model on one device, prompts from `arrays`."""
  if not isinstance(model, llama_lib.Llama):
    return float("nan")
  prompt = arrays["inputs"][:batch, :prompt_length]
  if not _spans_devices(params):  # Sharded parameters stay sharded.
    params = jax.device_put(params, jax.local_devices()[0])
  return generate.tokens_per_second(model, params, prompt,
                                    max_new_tokens=new_tokens)
