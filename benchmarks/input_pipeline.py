"""Does input starve the fused step? Steps/s with the real pipeline vs a batch on device.

    python benchmarks/input_pipeline.py [--config=configs/fashion_mnist.py] [--steps=300]

Runs the distillation step of the config (teacher in the step) twice in one
process: fed by the real grain pipeline (bulk reads, in-memory cache), and fed
the same batch again and again (no input cost). Prints a table; the ratio is
what matters (the machine is shared and noisy). Needs a teacher checkpoint or
uses a freshly initialised teacher (same cost).
"""

import argparse
import functools
import importlib.util
import os
import sys
import time

import jax
import numpy as np

from kdjax import config as config_lib
from kdjax import objectives, optim, parallel, step, train
from kdjax.data import pipeline


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
  spec.loader.exec_module(module)
  return module.get_config()


def _time(run_step, state, frozen, next_batch, steps: int) -> float:
  state, metrics = run_step(state, next_batch(), frozen)  # Compile.
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = run_step(state, next_batch(), frozen)
  jax.block_until_ready((state, metrics))
  return steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/fashion_mnist.py")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  config = _load_config(args.config)
  mesh = parallel.make_mesh()
  train_cfg = config.student.train
  student = config_lib.build_model(config, "student")
  teacher = config_lib.build_model(config, "teacher")
  tx = optim.make_optimizer(train_cfg, 10_000)
  objective = objectives.distillation(config.distill, num_teachers=1,
                                      total_steps=10_000)
  per_device = functools.partial(
      step.train_step, student_apply=step.make_apply_fn(student),
      teacher_applies=(step.make_apply_fn(teacher),), objective=objective,
      tx=tx, axis=parallel.DataAxis(config.parallel.backend))
  run_step = parallel.map_over_devices(per_device, mesh,
                                       config.parallel.backend)
  frozen = parallel.replicate((train.init_params(teacher, config, 0),), mesh)
  source = pipeline.get_source(config.data, config.data.train_split)
  it = iter(pipeline.train_dataset(source, config.data,
                                   global_batch_size=train_cfg.batch_size,
                                   seed=0, augment=bool(train_cfg.augment)))
  fixed = next(it)

  rows = []
  for _ in range(args.repeats):
    for name, feed in (("real pipeline", lambda: next(it)),
                       ("same batch", lambda: fixed)):
      state = parallel.replicate(step.create_train_state(
          train.init_params(student, config, 1), tx, jax.random.key(0)), mesh)
      rows.append((name, _time(run_step, state, frozen, feed, args.steps)))
  real = np.median([r for n, r in rows if n == "real pipeline"])
  fixed_rate = np.median([r for n, r in rows if n == "same batch"])
  print(f"\n{args.config}: distill step, global batch {train_cfg.batch_size}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"median of {args.repeats} x {args.steps} steps")
  print("| input | steps/s |\n|---|---|")
  print(f"| real grain pipeline | {real:.1f} |")
  print(f"| same batch (no input cost) | {fixed_rate:.1f} |")
  print(f"| ratio real / no-input | {real / fixed_rate:.3f} |")


if __name__ == "__main__":
  main()
