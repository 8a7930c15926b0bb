"""Does input starve the fused step? Steps/s with the real pipeline vs a batch on device.

    python benchmarks/input_pipeline.py [--config=configs/fashion_mnist.py]
        [--steps=50] [--repeats=9]

Runs the distillation step of the config (teacher in the step) in one process,
fed by the real grain pipeline (bulk reads, in-memory cache) the way
kdjax.run.train feeds it (next batch placed on the devices while the step runs)
and the way it used to (host batch copied right before each step), and fed one
batch already on the devices (no input cost: the baseline) or copied from the
host each step. Prints a table of medians; the ratios are what matters (the
machine is shared and noisy). Uses a freshly initialised teacher (same cost as
a trained one).
"""

import argparse
import functools
import importlib.util
import os
import sys
import time

import jax
import numpy as np

from kdjax.data import pipeline
from kdjax.distill import objectives, optim, parallel, step
from kdjax.weights import params as params_lib
from kdjax.weights import resolve, specs


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
  spec.loader.exec_module(module)
  return resolve.resolve_config(module.get_config())


def _time(run_step, state, frozen, feed, steps: int, prefetch: bool
          ) -> tuple[float, float]:
  """(steps/s, process CPU ms/step) in the train loop's order: with
  `prefetch`, the next batch is fetched (and placed) right after the step is
  dispatched, as kdjax.run.train does."""
  state, metrics = run_step(state, feed(), frozen)  # Compile.
  jax.block_until_ready(metrics)
  batch = feed() if prefetch else None
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    state, metrics = run_step(state, batch if prefetch else feed(), frozen)
    if prefetch:
      batch = feed()
  jax.block_until_ready((state, metrics))
  cpu_ms = (time.process_time() - cpu) / steps * 1e3
  return steps / (time.perf_counter() - start), cpu_ms


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/fashion_mnist.py")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args()
  config = _load_config(args.config)
  mesh = parallel.make_mesh()
  train_cfg = config.student.train
  student = specs.build_model(config, "student")
  teacher = specs.build_model(config, "teacher")
  tx = optim.make_optimizer(train_cfg, 10_000)
  objective = objectives.distillation(config.distill, num_teachers=1,
                                      total_steps=10_000)
  per_device = functools.partial(
      step.train_step, student_apply=step.make_apply_fn(student),
      teacher_applies=(step.make_apply_fn(teacher),), objective=objective,
      tx=tx, axis=parallel.DataAxis(config.parallel.backend))
  run_step = parallel.map_over_devices(per_device, mesh,
                                       config.parallel.backend)
  frozen = parallel.replicate((params_lib.init(teacher, config.data, 0),), mesh)
  source = pipeline.get_source(config.data, config.data.train_split)
  it = iter(pipeline.train_dataset(source, config.data,
                                   global_batch_size=train_cfg.batch_size,
                                   seed=0, augment=bool(train_cfg.augment)))
  fixed = next(it)
  backend = config.parallel.backend
  on_device = parallel.put_batch(fixed, mesh, backend)
  jax.block_until_ready(on_device)

  # (row, feed, prefetch): the real pipeline as the loop feeds it now (next
  # batch placed while the step runs) and as it did before (host batch pulled
  # and copied right before the step); no input at all (the baseline);
  # and the same host batch copied each step (the copy alone).
  cases = (
      ("real pipeline, device prefetch (kdjax.run.train)",
       lambda: parallel.put_batch(next(it), mesh, backend), True),
      ("real pipeline, host batch per step", lambda: next(it), False),
      ("same batch already on device (no input cost)", lambda: on_device,
       False),
      ("same host batch, copied each step", lambda: fixed, False))
  rates = {name: [] for name, _, _ in cases}
  cpu_ms = {name: [] for name, _, _ in cases}
  for _ in range(args.repeats):  # Short interleaved rounds: load drifts.
    for name, feed, prefetch in cases:
      state = parallel.replicate(step.create_train_state(
          params_lib.init(student, config.data, 1), tx, jax.random.key(0)), mesh)
      rate, cpu = _time(run_step, state, frozen, feed, args.steps, prefetch)
      rates[name].append(rate)
      cpu_ms[name].append(cpu)
  baseline = np.asarray(rates[cases[2][0]])
  print(f"\n{args.config}: distill step, global batch {train_cfg.batch_size}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{backend}, medians of {args.repeats} interleaved rounds x "
        f"{args.steps} steps")
  print("| input | steps/s | / on device (median of per-round ratios) "
        "| process CPU ms/step |\n|---|---|---|---|")
  for name, _, _ in cases:
    ratio = np.median(np.asarray(rates[name]) / baseline)
    print(f"| {name} | {np.median(rates[name]):.1f} | {ratio:.3f} "
          f"| {np.median(cpu_ms[name]):.1f} |")


if __name__ == "__main__":
  main()
