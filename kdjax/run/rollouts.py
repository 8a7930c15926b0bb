"""On-policy batches for the training loop: who writes step s's completions.

kdjax.distill.on_policy says what on-policy distillation is; this module
runs it inside kdjax.run.train's loop. Each step's prompt batch becomes an
ordinary training batch (inputs, labels, mask over completion tokens):
  * DATA: the data's own completions (off-policy KD; what lmbda=0 trains on);
  * STUDENT: the current student's rollouts;
  * TEACHER (seq_kd): the teacher's rollouts.
Rollouts are their own compiled program (one per writer, compiled once),
run on the training mesh before the fused step, once per optimizer step
(gradient accumulation splits the rollout batch like any batch). The time
spent sampling and training is measured separately and logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.distill import on_policy
from kdjax.distill import mesh as mesh_lib
from kdjax.distill import parallel
from kdjax.models import generate

TRAIN_KEYS = ("inputs", "labels", "mask")


def _training_batch(params, prompts, prompt_lengths, indices, step, *,
                    model, settings: on_policy.Settings, seed: int,
                    eos_id: int, length: int):
  """Rollouts of `model` as a training batch of sequence length `length`."""
  keys = on_policy.example_keys(seed, step, indices)
  sampling = generate.Sampling(settings.temperature, settings.top_k,
                               settings.top_p)
  completions = generate.generate_padded_jit(
      params, prompts, prompt_lengths, keys, model=model,
      max_new_tokens=settings.max_new_tokens, sampling=sampling,
      eos_id=eos_id)
  tokens, mask = generate.right_align(prompts, prompt_lengths, completions,
                                      eos_id)
  pad = length + 1 - tokens.shape[1]  # To the data's shape: one step program.
  tokens = jnp.pad(tokens, ((0, 0), (0, pad)), constant_values=max(eos_id, 0))
  mask = jnp.pad(mask, ((0, 0), (0, pad)))
  return ({"inputs": tokens[:, :-1], "labels": tokens[:, 1:],
           "mask": mask[:, 1:]}, completions)


@dataclasses.dataclass
class Rollouts:
  """Turns each step's prompt batch into the batch the step trains on."""
  settings: on_policy.Settings
  seed: int
  writers: dict[str, tuple[Callable, Any]]  # Source -> (program, params or None).
  backend: str
  eos_id: int
  seconds: dict[str, float] = dataclasses.field(
      default_factory=lambda: {"sampling": 0.0, "training": 0.0})
  last_rollout: Any = None  # (prompts, lengths, completions) of the last one.

  def source(self, step: int) -> str:
    return on_policy.source_of_step(self.settings, self.seed, step)

  def batch(self, step: int, prompt_batch: dict[str, np.ndarray],
            student_params: Any) -> tuple[str, Any]:
    """(source, the batch to train on) for optimizer step `step`."""
    source = self.source(step)
    if source == on_policy.DATA:
      return source, {k: prompt_batch[k] for k in TRAIN_KEYS}
    program, params = self.writers[source]
    start = time.perf_counter()
    batch, completions = program(
        student_params if params is None else params,
        prompt_batch["prompts"], prompt_batch["prompt_lengths"],
        prompt_batch["index"], np.int32(step))
    jax.block_until_ready(batch)
    self.seconds["sampling"] += time.perf_counter() - start
    self.last_rollout = (prompt_batch["prompts"],
                         prompt_batch["prompt_lengths"], completions)
    if self.backend == "pmap":  # pmap splits a host batch itself.
      batch = jax.tree.map(_local_rows, batch)
    return source, batch

  def due(self, step: int) -> bool:
    """Whether step `step`'s rollouts are written out as text."""
    every = self.settings.log_rollouts_every
    return bool(every) and step % every == 0 and self.last_rollout is not None

  def texts(self, tokenizer, limit: int = 4) -> list[dict[str, Any]]:
    """The last rollout's first few rows as text."""
    prompts, lengths, completions = jax.tree.map(np.asarray,
                                                 self.last_rollout)
    return on_policy.rollout_texts(tokenizer, prompts, lengths, completions,
                                   self.eos_id, limit)

  def time_split(self) -> dict[str, float]:
    total = max(sum(self.seconds.values()), 1e-9)
    return {"sampling_seconds": self.seconds["sampling"],
            "training_seconds": self.seconds["training"],
            "sampling_fraction": self.seconds["sampling"] / total}


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


def build(config, *, student_model, teacher_model, teacher_params, mesh,
          rules, student_shardings, teacher_shardings, eos_id: int,
          backend: str) -> Rollouts:
  """The rollout programs of config.distill.on_policy on the training mesh.

  `student_shardings`/`teacher_shardings`: the parameters' shardings (the
  sharded layout), or None (replicated).
  """
  settings = on_policy.Settings.from_config(config)
  sharded = student_shardings is not None
  batch_sharding = (mesh_lib.batch_sharding(mesh, rules) if sharded
                    else parallel.batch_sharded(mesh))
  replicated = parallel.replicated(mesh)
  length = int(config.data.seq_length)

  def program(model, param_shardings):
    fn = functools.partial(_training_batch, model=model, settings=settings,
                           seed=int(config.seed), eos_id=eos_id,
                           length=length)
    jitted = jax.jit(fn, in_shardings=(
        param_shardings if param_shardings is not None else replicated,
        batch_sharding, batch_sharding, batch_sharding, replicated),
                     out_shardings=(batch_sharding, batch_sharding))

    def run(params, prompts, lengths, indices, step):
      placed = parallel.place_batch((prompts, lengths, indices),
                                    batch_sharding)
      scope = (mesh_lib.active(mesh, rules) if sharded
               else contextlib.nullcontext())
      with scope:  # The sharded layout's constraints apply while tracing.
        return jitted(params, *placed, step)
    return run

  writers = {}
  if settings.lmbda > 0:
    writers[on_policy.STUDENT] = (program(student_model, student_shardings),
                                  None)
  if settings.seq_kd and settings.lmbda < 1:
    writers[on_policy.TEACHER] = (program(teacher_model, teacher_shardings),
                                  teacher_params)
  return Rollouts(settings=settings, seed=int(config.seed), writers=writers,
                  backend=backend, eos_id=eos_id)
