"""Issue 19, item 2: what the bfloat16 policy costs in quality, on short real
runs: the same distillation in float32 and under mixed precision.

    python benchmarks/precision_quality.py --workdir=/tmp/kd_precision

Mixed = the teacher held and run in bfloat16 (teacher.precision
params=compute=bfloat16), the student computing in bfloat16 over float32
parameters (student.precision.compute=bfloat16); float32 = both float32.
Everything else (data order, seeds, steps) is the same.
  fashion_mnist  configs/fashion_mnist.py:smoke's CNN teacher, trained once
                 in float32 (300 steps), then its MLP student distilled for
                 200 steps each way; held-out = the test split (the
                 builder has train and test only)
  shakespeare    configs/shakespeare_smollm2.py: SmolLM2-135M (imported)
                 distilled into the 6-layer Llama for --lm_steps steps of
                 8 x 128 tokens each way; held-out = the validation plays
Prints per task the held-out metric as the run's own evaluation reports
it, the last logged training loss and the wall time of each run, with the
CPU model. Finished runs (run.json) are
not rerun.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import machine_info  # pylint: disable=wrong-import-position
from kdjax import modes  # pylint: disable=wrong-import-position
from kdjax.core import config as config_lib  # pylint: disable=wrong-import-position
from kdjax.runtime.metrics_writer import read_metrics  # pylint: disable=wrong-import-position

MIXED = {"teacher.precision.params": "bfloat16",
         "teacher.precision.compute": "bfloat16",
         "student.precision.params": "float32",
         "student.precision.compute": "bfloat16"}


def _run(config, workdir: str, **changes) -> tuple[dict, float]:
  """(run.json, wall seconds); a finished run is read back."""
  path = os.path.join(workdir, "run.json")
  timing = os.path.join(workdir, "wall_seconds.json")
  if not os.path.exists(path):
    config = config_lib.set_fields(config.copy_and_resolve_references(),
                                   changes)
    start = time.perf_counter()
    modes.run(config, workdir)
    with open(timing, "w") as f:
      json.dump({"seconds": time.perf_counter() - start}, f)
  with open(path) as f:
    summary = json.load(f)
  seconds = float("nan")
  if os.path.exists(timing):
    with open(timing) as f:
      seconds = json.load(f)["seconds"]
  return summary, seconds


def _last_loss(workdir: str) -> float:
  rows = [r for r in read_metrics(workdir) if r["split"] == "train"]
  return rows[-1]["loss"] if rows else float("nan")


def fashion_mnist(args) -> list[tuple]:
  config = importlib.import_module("configs.fashion_mnist").get_config("smoke")
  config.data.data_dir = os.path.join(args.workdir, "tfds")
  root = os.path.join(args.workdir, "fashion_mnist")
  teacher_dir = os.path.join(root, "teacher")
  _run(config, teacher_dir, mode="teacher")
  rows = []
  for name, changes in (("float32", {}), ("mixed bfloat16", MIXED)):
    workdir = os.path.join(root, name.split()[0])
    summary, seconds = _run(config, workdir, mode="distill",
                            **{"teacher.checkpoint_dir": teacher_dir},
                            **changes)
    rows.append(("Fashion-MNIST MLP", name, "accuracy",
                 summary["eval"]["accuracy"], _last_loss(workdir), seconds))
  return rows


def shakespeare(args) -> list[tuple]:
  config = importlib.import_module(
      "configs.shakespeare_smollm2").get_config("hour")
  config.data.data_dir = os.path.join(args.workdir, "tfds")
  root = os.path.join(args.workdir, "shakespeare")
  rows = []
  for name, changes in (("float32", {}), ("mixed bfloat16", MIXED)):
    workdir = os.path.join(root, name.split()[0])
    summary, seconds = _run(config, workdir, mode="distill", **{
        "student.train.num_steps": args.lm_steps,
        "eval_every_steps": args.lm_steps,
        "checkpoint.every_steps": args.lm_steps}, **changes)
    rows.append(("Shakespeare 6-layer Llama", name, "perplexity",
                 summary["eval"]["perplexity"], _last_loss(workdir), seconds))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--tasks", default="fashion_mnist,shakespeare")
  parser.add_argument("--lm_steps", type=int, default=60)
  args = parser.parse_args()
  tasks = {"fashion_mnist": fashion_mnist, "shakespeare": shakespeare}
  rows = []
  for task in args.tasks.split(","):
    rows += tasks[task](args)
  print(f"\nCPU: {machine_info.describe()}\n")
  print("| task | precision | held-out metric | value | last logged train "
        "loss | wall min |")
  print("|---|---|---|---|---|---|")
  for task, name, metric, value, loss, seconds in rows:
    print(f"| {task} | {name} | {metric} | {value:.4f} | {loss:.4f} | "
          f"{seconds / 60:.1f} |")


if __name__ == "__main__":
  main()
