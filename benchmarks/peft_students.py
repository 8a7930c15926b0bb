"""Issue 17, item 3: parameter-efficient MiniLM students on Rotten Tomatoes.

    python benchmarks/peft_students.py --workdir=/tmp/kd_rt_transfer
    python benchmarks/peft_students.py --workdir=/tmp/kd_rt_smoke --smoke

Every arm is all-MiniLM-L6-v2 (the pretrained encoder, mean pooling, a new
2-way head) distilled with T^2 KL at T=2 from the SAME cached teacher logits
(the fully fine-tuned teacher of benchmarks/text_distillation.py, whose
`teacher` and `cache` stages must have run in WORKDIR), for the same steps
(default one epoch of 'train', 318 steps of 32), one seed. What trains:
  lora_r<K>   rank-K LoRA adapters on every attention and MLP projection
              (kdjax/models/lora.py, alpha 16) + the head; base frozen
  prompt      a 20-vector soft prompt (label-word init) + the head
  top_layer   the top encoder layer (layer_5) + the head
Printed (and written to WORKDIR/peft/results.{json,md}): trained parameters,
the optimizer state's bytes (Adam's moments exist only for trained leaves:
kdjax/distill/masks.py), the bytes of trainable_params.msgpack (what a
served adapter costs to ship), mean step time, validation and test accuracy,
agreement with the teacher on test. Each arm's run dir is WORKDIR/peft/ARM;
a finished arm (run.json) is not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import machine_info  # pylint: disable=wrong-import-position
import text_distillation as td  # pylint: disable=wrong-import-position
from kdjax.distill import masks, optim  # pylint: disable=wrong-import-position
from kdjax.run import layout, metrics  # pylint: disable=wrong-import-position
from kdjax.run import report as report_lib  # pylint: disable=wrong-import-position
from kdjax.runtime.metrics_writer import read_metrics  # pylint: disable=wrong-import-position
from kdjax.weights import params as params_lib  # pylint: disable=wrong-import-position
from kdjax.weights import resolve  # pylint: disable=wrong-import-position

DEFAULT_ARMS = ("lora_r4", "lora_r8", "lora_r16", "prompt", "top_layer")
# arm kind -> (student.train.trainable, learning rate). The rates are the
# repo's settled ones: 3e-2 for prompts and 1e-3 for the top layer
# (configs/rotten_tomatoes.py); 1e-3 for LoRA (a common choice; tunix and
# PEFT examples use 1e-4..1e-3).
KINDS = {
    "lora": (("head",), 1e-3),
    "prompt": (("prompt", "head"), 3e-2),
    "top_layer": (("encoder/layer_5", "head"), 1e-3),
}


def arm_config(args, base, arm: str):
  """The student for `arm`: all-MiniLM-L6-v2 as released, distilled from the
  'train' cache (also in --smoke, whose teacher is a tiny random BERT)."""
  kind = "lora" if arm.startswith("lora_r") else arm
  if kind not in KINDS:
    raise SystemExit(f"Unknown arm {arm!r}: lora_r<K>, prompt or top_layer.")
  trainable, lr = KINDS[kind]
  # The pretrained MiniLM (not the fine-tuned teacher), as the teacher's
  # starting point: the same architecture, pooling and head.
  model = dict(name="bert", pooling="mean", num_prompts=0,
               head_dropout_rate=0.1)
  if kind == "prompt":
    model.update(num_prompts=20, prompt_init="labels",
                 prompt_init_words=("rotten", "fresh"))
  steps = args.steps or int(base.student.train.num_steps)
  changes = {
      "mode": "distill", "seed": 0,
      "data.train_split": "train",
      "distill.terms": td.KL,
      "distill.teacher_cache": td.cache_dir(args, "train"),
      "student.model": model,
      "student.init_from": "hf_bert:",
      "student.train.trainable": trainable,
      "student.train.learning_rate": lr,
      "student.train.num_steps": steps,
      "student.train.warmup_steps": max(1, min(30, steps // 10)),
      "student.train.weight_decay": 0.0,
      "eval_every_steps": steps, "checkpoint.every_steps": steps}
  if kind == "lora":
    changes["student.lora.rank"] = int(arm[len("lora_r"):])
  return resolve.resolve_config(td.run_config(base, **changes))


def optimizer_bytes(config, params) -> int:
  """Bytes of the student's optimizer state as training builds it (masked
  Adam(W): moments only on trainable leaves)."""
  train_cfg = config.student.train
  mask = masks.trainable_mask(params, tuple(train_cfg.trainable),
                              adapters=int(config.student.lora.rank) > 0)
  tx = masks.freeze(optim.make_optimizer(train_cfg, int(train_cfg.num_steps)),
                    mask)
  state = jax.eval_shape(tx.init, params)
  return int(sum(np.prod(x.shape) * x.dtype.itemsize
                 for x in jax.tree.leaves(state)))


def measure_arm(args, base, arm: str, data, teacher_test) -> dict:
  config = arm_config(args, base, arm)
  directory = os.path.join(args.workdir, "peft", arm)
  run, seconds, _ = td.train_run(config, directory)
  mesh = layout.make_mesh(config)
  model, params = report_lib.load_params(config, "student", directory,
                                          run["model"], mesh)
  apply = metrics.cached_apply_fn(model)
  logits = td._predictions(directory, lambda: {  # pylint: disable=protected-access
      s: metrics.predict_logits(apply, params, d["inputs"], mesh)
      for s, d in data.items()})
  rates = [r["steps_per_second"] for r in read_metrics(directory)
           if r["split"] == "train" and "steps_per_second" in r]
  # The first logged window holds compilation: leave it out when possible;
  # the median of the rest shrugs off a window slowed by other work.
  rates = rates[1:] or rates
  shipped = os.path.join(directory, "trainable_params.msgpack")
  return {
      "arm": arm, "steps": int(run["steps"]),
      "trained_params": int(run["num_trainable_params"]),
      "total_params": params_lib.count(params),
      "optimizer_bytes": optimizer_bytes(config, params),
      "shipped_bytes": (os.path.getsize(shipped) if os.path.exists(shipped)
                        else None),
      "seconds_per_step": float(1.0 / np.median(rates)),
      "wall_minutes": seconds / 60,
      "learning_rate": float(config.student.train.learning_rate),
      "validation_accuracy": td._accuracy(  # pylint: disable=protected-access
          logits["validation"], data["validation"]["labels"]),
      "test_accuracy": td._accuracy(  # pylint: disable=protected-access
          logits["test"], data["test"]["labels"]),
      "test_agreement": float(np.mean(np.argmax(logits["test"], -1)
                                      == np.argmax(teacher_test, -1))),
  }


def teacher_predictions(args, base, data) -> dict[str, np.ndarray]:
  """The teacher's validation/test logits (kept in its run dir, shared with
  the driver's report stage)."""
  def compute():
    mesh = layout.make_mesh(base)
    teacher = layout.load_teacher(td.run_config(base, mode="distill"),
                                  args.workdir, mesh)
    apply = metrics.cached_apply_fn(teacher.model)
    return {s: metrics.predict_logits(apply, teacher.params, d["inputs"], mesh)
            for s, d in data.items()}
  return td._predictions(td.teacher_dir(args), compute)  # pylint: disable=protected-access


def _mb(n) -> str:
  return "-" if n is None else f"{n / 2**20:.2f}"


def table(rows, teacher) -> str:
  lines = [
      "| student | trained params | optimizer state MB | shipped MB | "
      "s/step | validation acc | test acc | test agreement |",
      "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['arm']} | {r['trained_params']:,} | {_mb(r['optimizer_bytes'])}"
        f" | {_mb(r['shipped_bytes'])} | {r['seconds_per_step']:.2f} | "
        f"{100 * r['validation_accuracy']:.2f} | {100 * r['test_accuracy']:.2f}"
        f" | {100 * r['test_agreement']:.2f} |")
  lines.append(f"| teacher (every layer trained) | {teacher['params']:,} | - | "
               f"- | - | {100 * teacher['validation_accuracy']:.2f} | "
               f"{100 * teacher['test_accuracy']:.2f} | 100 |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True,
                      help="text_distillation.py's workdir (teacher, cache).")
  parser.add_argument("--arms", default=",".join(DEFAULT_ARMS))
  parser.add_argument("--steps", type=int, default=0,
                      help="Steps per arm; 0 = student.train.num_steps "
                           "(one epoch of 'train' for the full run).")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--config", default=td.CONFIG)
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--set", action="append", default=[])
  args = parser.parse_args(argv)
  if not args.smoke and not args.steps:
    args.steps = 318  # One epoch of 'train' at batch 32.
  base = td.base_config(args)
  if not os.path.exists(os.path.join(td.teacher_dir(args), "run.json")):
    raise SystemExit(f"No teacher in {td.teacher_dir(args)}: run "
                     "benchmarks/text_distillation.py --stop_after=cache first.")
  start = time.perf_counter()
  from kdjax.data import pipeline  # pylint: disable=import-outside-toplevel
  data = {s: pipeline.load_split(pipeline.get_source(base.data, s), base.data)
          for s in ("validation", "test")}
  teacher_logits = teacher_predictions(args, base, data)
  teacher_run = td._read_json(os.path.join(td.teacher_dir(args), "run.json"))  # pylint: disable=protected-access
  teacher = {
      "params": int(teacher_run.get("num_trainable_params", 0)),
      "validation_accuracy": td._accuracy(  # pylint: disable=protected-access
          teacher_logits["validation"], data["validation"]["labels"]),
      "test_accuracy": td._accuracy(  # pylint: disable=protected-access
          teacher_logits["test"], data["test"]["labels"])}
  rows = []
  for arm in args.arms.split(","):
    rows.append(measure_arm(args, base, arm, data, teacher_logits["test"]))
    print(f"{arm}: test accuracy {100 * rows[-1]['test_accuracy']:.2f} "
          f"({rows[-1]['wall_minutes']:.1f} min)", flush=True)
  text = table(rows, teacher)
  out = os.path.join(args.workdir, "peft")
  cpu = machine_info.describe()
  td._write_json(os.path.join(out, "results.json"),  # pylint: disable=protected-access
                 {"arms": rows, "teacher": teacher, "cpu": cpu,
                  "minutes": (time.perf_counter() - start) / 60})
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(f"CPU: {cpu}\n\n{text}\n")
  print(f"CPU: {cpu}\n{text}")


if __name__ == "__main__":
  main()
