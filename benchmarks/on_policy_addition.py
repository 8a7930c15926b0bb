"""Ways to train a small student on multi-digit addition, side by side.

    python benchmarks/on_policy_addition.py --workdir=/tmp/kd_add   # ~1 hour
    python benchmarks/on_policy_addition.py --workdir=/tmp/kd_add --quick

    # SmolLM2-135M-Instruct teaching a 2-layer Llama on Shakespeare prompts:
    python benchmarks/on_policy_addition.py --config=on_policy_shakespeare \
        --methods=kd,gkd_0.5,gkd_1.0 --seeds=0 --sft_steps=0 \
        --workdir=/tmp/kd_shakespeare

configs/on_policy_addition.py: a teacher trained here from scratch (CE on
the answers), then a student about 5x smaller trained for the SAME number
of gradient steps by each method below, at several seeds. As in the GKD
paper, every student first gets --sft_steps of CE on the data (per seed,
shared by all methods: exported with kdjax's HF exporter and imported as
`student.init_from`), then the remaining steps of its method: JSD and
reverse KL from a random student barely move (a first run here: token-level
JSD from scratch reached 2% exact match where CE reached 50-89%), and the
student's samples are noise to grade until it writes digits.
  ce          CE on the data's answers (mode=scratch)
  kd          token-level KD on the data's answers: JSD(0.5), lmbda=0
  seqkd       the teacher's online rollouts (sampled), JSD(0.5)
  gkd_0.5     half the steps on the student's own rollouts (GKD), JSD(0.5)
  gkd_1.0     every step on the student's rollouts, JSD(0.5)
  srkl        every step on the student's rollouts, per-token reverse KL
              on its sampled tokens (REINFORCE; tinker's on-policy KD)
  srkl_lr3e-4, srkl_d0.9_lr3e-4 (not in the default --methods): srkl at a
              tenth of the learning rate, per token and with discount 0.9
Reported on the test split (disjoint problems): exact match of the greedy
answer, and on the student's own samples (temperature 1) the teacher's
per-token NLL and the exact reverse KL KL(student || teacher) per token
(kdjax/run/on_policy_eval.py), plus wall time per run. Finished runs are
skipped, so the script resumes where it stopped. Prints a table and writes
WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import importlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import machine_info  # pylint: disable=wrong-import-position
from kdjax import modes  # pylint: disable=wrong-import-position
from kdjax.data import prompts  # pylint: disable=wrong-import-position
from kdjax.models import generate  # pylint: disable=wrong-import-position
from kdjax.run import layout, on_policy_eval, tasks  # pylint: disable=wrong-import-position
from kdjax.weights import resolve, specs  # pylint: disable=wrong-import-position
from kdjax.weights.exporters import hf_llama  # pylint: disable=wrong-import-position

METHODS = {
    "ce": ("scratch", {}),
    "kd": ("distill", dict(lmbda=0.0)),
    "seqkd": ("distill", dict(lmbda=0.0, seq_kd=True)),
    "gkd_0.5": ("distill", dict(lmbda=0.5)),
    "gkd_1.0": ("distill", dict(lmbda=1.0)),
    "srkl": ("distill", dict(lmbda=1.0, loss="sampled_reverse_kl")),
    # The same at a tenth of the learning rate, per token and discounted.
    "srkl_lr3e-4": ("distill", dict(lmbda=1.0, loss="sampled_reverse_kl"),
                    dict(learning_rate=3e-4)),
    "srkl_d0.9_lr3e-4": ("distill", dict(lmbda=1.0, loss="sampled_reverse_kl",
                                         discount=0.9),
                         dict(learning_rate=3e-4)),
}
DEFAULT_METHODS = ("ce", "kd", "seqkd", "gkd_0.5", "gkd_1.0", "srkl")


def _config(args, mode, seed, on_policy=None, train=None):
  module = importlib.import_module(f"configs.{args.config}")
  config = module.get_config(*(["smoke"] if args.quick else []))
  config = resolve.resolve_config(config)  # 'llama:' -> the installed GGUF.
  config.data.data_dir = os.path.join(args.workdir, "data")
  if not config.teacher.get("pretrained", False):
    config.teacher.checkpoint_dir = os.path.join(args.workdir, "teacher")
  config.mode = mode
  config.seed = seed
  if args.quick and not config.teacher.get("pretrained", False):
    config.teacher.train.num_steps = 20
    config.student.train.num_steps = 8
    args.sft_steps = min(args.sft_steps, 4)
  config.distill.on_policy.update(on_policy or {})
  config.student.train.update(train or {})
  return config


def _run(config, workdir) -> float:
  """Trains unless WORKDIR/run.json says it finished; returns wall seconds."""
  timing = os.path.join(workdir, "wall_seconds.json")
  if os.path.exists(os.path.join(workdir, "run.json")) and os.path.exists(
      timing):
    with open(timing) as f:
      return json.load(f)["seconds"]
  start = time.perf_counter()
  modes.run(config, workdir)
  seconds = time.perf_counter() - start
  with open(timing, "w") as f:
    json.dump({"seconds": seconds}, f)
  return seconds


def _sft_start(args, seed) -> str:
  """'llama:<dir>': the seed's CE warm start, exported as a HF directory."""
  run_dir = os.path.join(args.workdir, f"sft_seed{seed}")
  hf_dir = os.path.join(run_dir, "hf")
  config = _config(args, "scratch", seed)
  config.student.train.num_steps = args.sft_steps
  _run(config, run_dir)
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    model = specs.build_model(config, "student")
    params = layout.restore_params(config, model, run_dir,
                                   layout.make_mesh(config))
    hf_llama.export_hf(hf_dir, params, specs.model_kwargs(config, "student"),
                       tokenizer_path=prompts.tokenizer_path(config.data))
  return "llama:" + hf_dir


def _test_metrics(config, run_dir, teacher) -> dict:
  """Exact match on the test split and the teacher's view of the samples."""
  config = config.copy_and_resolve_references()
  config.data.eval_split = config.data.test_split
  mesh = layout.make_mesh(config)
  task = tasks.PromptCompletion(config)
  model = specs.build_model(config, "student")
  params = layout.restore_params(config, model, run_dir, mesh)
  result = task.evaluate(model, params, mesh)
  test = task._eval  # pylint: disable=protected-access
  result.update(on_policy_eval.sampled_quality(
      model, params, teacher.model, teacher.params, test,
      sampling=generate.Sampling(temperature=1.0),
      max_new_tokens=int(config.distill.on_policy.max_new_tokens),
      seed=1234))
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="on_policy_addition",
                      help="a configs/ module with prompt/completion data")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                      help=f"of {sorted(METHODS)}")
  parser.add_argument("--sft_steps", type=int, default=500,
                      help="CE steps every student starts from (of the "
                      "config's student.train.num_steps)")
  parser.add_argument("--quick", action="store_true",
                      help="smoke-sized models and a few steps (a check)")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  methods = args.methods.split(",")

  teacher_config = _config(args, "teacher", 0)
  teacher_seconds = 0.0
  if not teacher_config.teacher.get("pretrained", False):
    teacher_seconds = _run(teacher_config,
                           teacher_config.teacher.checkpoint_dir)
  mesh = layout.make_mesh(teacher_config)
  teacher = layout.load_teacher(_config(args, "distill", 0), args.workdir,
                                mesh)
  teacher_test = _test_metrics_teacher(teacher_config, teacher, mesh)
  starts = ({seed: _sft_start(args, seed) for seed in seeds}
            if args.sft_steps else {})
  rows = {}
  for seed in starts:  # Where every method starts: the CE warm start.
    config = _config(args, "scratch", seed)
    config.student.train.num_steps = args.sft_steps
    metrics = _test_metrics(config, os.path.join(args.workdir,
                                                 f"sft_seed{seed}"), teacher)
    metrics["wall_seconds"] = _run(config, os.path.join(
        args.workdir, f"sft_seed{seed}"))
    rows.setdefault("start", []).append(metrics)
  for method in methods:
    mode, on_policy, *train = METHODS[method]
    for seed in seeds:
      config = _config(args, mode, seed, on_policy, *train)
      if starts:  # The layers are the warm start's own.
        config.student.update(init_from=starts[seed], init_layers=())
        config.student.train.num_steps -= args.sft_steps
        config.student.train.warmup_steps = 0
      run_dir = os.path.join(args.workdir, f"{method}_seed{seed}")
      seconds = _run(config, run_dir)
      metrics = _test_metrics(config, run_dir, teacher)
      metrics["wall_seconds"] = seconds
      rows.setdefault(method, []).append(metrics)
      print(f"{method} seed {seed}: " + ", ".join(
          f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)

  summary = {"cpu": machine_info.describe(), "teacher": dict(teacher_test,
                                            wall_seconds=teacher_seconds),
             "steps": int(_config(args, "distill", 0).student.train.num_steps),
             "sft_steps": args.sft_steps,
             "seeds": seeds, "methods": {}}
  print(f"\nCPU: {summary['cpu']}; student steps: {summary['steps']} "
        f"({args.sft_steps} CE, then the method's); seeds {seeds}")
  print(f"teacher: exact match {teacher_test['exact_match']:.3f}, NLL of "
        f"its own samples {teacher_test['teacher_nll']:.3f}, trained in "
        f"{teacher_seconds / 60:.1f} min\n")
  header = ("method", "exact match", "vs ce, paired by seed",
            "teacher NLL", "reverse KL", "held-out perplexity", "minutes/run")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for method, results in rows.items():
    stats = {}
    for key in ("exact_match", "teacher_nll", "reverse_kl", "perplexity",
                "wall_seconds"):
      values = [r[key] for r in results]
      stats[key] = (statistics.mean(values),
                    statistics.stdev(values) if len(values) > 1 else 0.0)
    summary["methods"][method] = {"runs": results, "mean_std": stats}
    cell = lambda k, f: f"{stats[k][0]:{f}} ± {stats[k][1]:{f}}"
    paired = ""
    if "ce" in rows and method != "ce":  # Same seed = same warm start.
      diffs = [r["exact_match"] - c["exact_match"]
               for r, c in zip(results, rows["ce"])]
      summary["methods"][method]["exact_match_minus_ce"] = diffs
      paired = (f"{statistics.mean(diffs):+.3f} ("
                + ", ".join(f"{d:+.2f}" for d in diffs) + ")")
    print(f"| {method} | {cell('exact_match', '.3f')} | {paired} | "
          f"{cell('teacher_nll', '.3f')} | {cell('reverse_kl', '.3f')} | "
          f"{cell('perplexity', '.4g')} | "
          f"{stats['wall_seconds'][0] / 60:.1f} |")
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)


def _test_metrics_teacher(config, teacher, mesh) -> dict:
  """The teacher's test metrics, and its own samples graded by itself (the
  floor of teacher NLL a student's samples can reach: the teacher's
  entropy on them)."""
  config = config.copy_and_resolve_references()
  config.data.eval_split = config.data.test_split
  task = tasks.PromptCompletion(config)
  result = task.evaluate(teacher.model, teacher.params, mesh)
  result.update(on_policy_eval.sampled_quality(
      teacher.model, teacher.params, teacher.model, teacher.params,
      task._eval, sampling=generate.Sampling(temperature=1.0),  # pylint: disable=protected-access
      max_new_tokens=int(config.distill.on_policy.max_new_tokens),
      seed=1234))
  return result


if __name__ == "__main__":
  main()
