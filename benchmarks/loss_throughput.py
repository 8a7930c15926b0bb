"""The reference workload's loss and metrics alone: its [tokens, vocab] passes.

    python benchmarks/loss_throughput.py [--calls=40]
    python /other/checkout/benchmarks/loss_throughput.py  # (copy it there)

At vocabulary 8192 and 4096 tokens per step, every pass over the logits
reads or writes 134 MB, and the loss is memory-bound: what costs is how many
[tokens, vocab] arrays XLA writes out. This times, on random logits of the
step_throughput workload's shape, what the fused step computes from the two
models' logits: the objective (0.5 * T^2 * forward KL + 0.5 * CE, T = 2) and
its gradient with respect to the student's logits, plus the step's metrics
(the student's argmax against the labels and against the teacher's argmax).
The optimized HLO's [tokens, vocab] arrays are counted too (results of the
program's top-level ops, i.e. written to memory).

To compare two versions of the loss, run the script from each checkout:
like step_throughput.py it imports the kdjax of the checkout it lies in (the
path is printed); copy it into an older checkout's benchmarks/ to time that.
It preloads jemalloc as step_throughput's workers do.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import step_throughput  # The workload's constants and allocator setup.


def _reexec_with_allocator() -> None:
  env, _ = step_throughput.worker_env("jemalloc")
  if os.environ.get("LD_PRELOAD") != env.get("LD_PRELOAD"):
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--calls", type=int, default=40)
  args = parser.parse_args()
  _reexec_with_allocator()
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import kdjax
  from kdjax.core import defaults
  from kdjax.distill import losses, objectives
  from kdjax.distill.objectives import ModelOutputs
  import machine_info
  # pylint: enable=g-import-not-at-top
  distill = defaults.get_config().distill
  distill.update(alpha=step_throughput.ALPHA,
                 temperature=step_throughput.TEMPERATURE)
  objective = objectives.distillation(distill, num_teachers=1, total_steps=1)
  shape = (step_throughput.BATCH, step_throughput.SEQ, step_throughput.VOCAB)
  keys = jax.random.split(jax.random.key(0), 3)
  student = 2.0 * jax.random.normal(keys[0], shape)
  teacher = 2.0 * jax.random.normal(keys[1], shape)
  labels = jax.random.randint(keys[2], shape[:2], 0, shape[2])

  def loss_and_metrics(student_logits, teacher_logits):
    per_token, _ = objective(ModelOutputs(student_logits),
                             [ModelOutputs(teacher_logits)], labels, 0, None)
    predictions = losses.argmax(student_logits)
    return jnp.mean(per_token), (
        jnp.sum(predictions == labels),
        jnp.sum(predictions == losses.argmax(teacher_logits)))

  step = jax.jit(jax.value_and_grad(loss_and_metrics, has_aux=True))
  jax.block_until_ready(step(student, teacher))
  seconds = []
  for _ in range(args.calls):
    start = time.perf_counter()
    jax.block_until_ready(step(student, teacher))
    seconds.append(time.perf_counter() - start)
  hlo = step.lower(student, teacher).compile().as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  written = [m.group(1) for m in re.finditer(
      rf"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[{shape[0]},{shape[1]},{shape[2]}\]"
      r"\S* (\w+)\(", entry, re.M)
             if m.group(2) not in ("parameter", "bitcast", "tuple")]
  print(f"Machine: {machine_info.describe()}; "
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')}")
  print(f"kdjax imported from {os.path.dirname(kdjax.__file__)}; "
        f"jax {jax.__version__}")
  print(f"loss + gradient + metrics on [{shape[0] * shape[1]}, {shape[2]}] "
        f"logits: median {1e3 * statistics.median(seconds):.1f} ms, "
        f"min {1e3 * min(seconds):.1f} ms over {args.calls} calls")
  print(f"[tokens, vocab] arrays the program writes: {len(written)} "
        f"({', '.join(written)})")


if __name__ == "__main__":
  main()
