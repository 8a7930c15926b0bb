"""Issue 18: a fully fine-tuned teacher, a teacher-labelled transfer set, and
BiLSTM students at enough seeds to tell (Rotten Tomatoes, Tang et al. 2019).

    python benchmarks/text_distillation.py --workdir=/tmp/kd_rt_transfer
    python benchmarks/text_distillation.py --workdir=/tmp/kd_rt_smoke --smoke

configs/rotten_tomatoes_transfer.py holds the shared settings; this driver
runs the stages below in order. Every run is skipped when its run.json
exists (a cache when its manifest is complete, the transfer set when
prepared), so the command resumes where it stopped, across sessions;
--stop_after=STAGE ends after a stage (e.g. one session per stage).
  lr_sweep      the teacher (every MiniLM layer trained) at each
                --teacher_lrs, --sweep_steps steps on a --sweep_fraction
                subset of the training reviews; the best VALIDATION accuracy
                chooses the learning rate
  teacher       the teacher at that rate on the whole training split,
                validation every config.eval_every_steps steps (the curve)
  transfer_set  the augmented split 'train_augmented' (kdjax/data/augment.py)
  cache         the teacher's raw logits over 'train' and 'train_augmented'
                (mode=cache_teacher, cache.store='logits')
  students      --methods x --seeds at the config's BiLSTM size, all for the
                same number of steps:
                  scratch           CE on the labels of 'train'
                  train_kl          T^2 KL(teacher_T || student_T) on 'train'
                  train_mse         MSE of raw logits on 'train'
                  transfer_kl       KL at T on the transfer set
                  transfer_mse      MSE on the transfer set (Tang et al.'s best)
                  transfer_scratch  (control, not by default) CE on the
                                    transfer set's copied labels
  sizes         --size_methods x --sizes (BiLSTM hidden = embedding = dense
                width) x --size_seeds; 'best' = the distilled method with
                the best mean validation accuracy in 'students'
  report        every model on validation and test (test is read here only,
                once per run: predictions are kept in each run dir); mean ±
                std, paired by seed vs scratch (t-interval), McNemar exact
                per seed and a paired bootstrap over test examples; the
                choices made on validation; examples/s. Prints the table
                and writes WORKDIR/results.{json,md}, accuracy_vs_size.png.
Wall time per stage and per run: WORKDIR/stages.json and each run's
wall_seconds.json.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import shutil
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import machine_info  # pylint: disable=wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from kdjax import modes  # pylint: disable=wrong-import-position
from kdjax.core import config as config_lib  # pylint: disable=wrong-import-position
from kdjax.data import augment, pipeline  # pylint: disable=wrong-import-position
from kdjax.distill import teacher_cache  # pylint: disable=wrong-import-position
from kdjax.run import layout, metrics, paired_stats  # pylint: disable=wrong-import-position
from kdjax.run import report as report_lib  # pylint: disable=wrong-import-position
from kdjax.runtime import checkpoint, plots  # pylint: disable=wrong-import-position
from kdjax.runtime.metrics_writer import read_metrics  # pylint: disable=wrong-import-position
from kdjax.weights import params as params_lib  # pylint: disable=wrong-import-position
from kdjax.weights import resolve  # pylint: disable=wrong-import-position

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIG = os.path.join(REPO, "configs", "rotten_tomatoes_transfer.py")
STAGES = ("lr_sweep", "teacher", "transfer_set", "cache", "students",
          "sizes", "report")
KL = ({"name": "kl", "weight": 1.0},)
MSE = ({"name": "mse", "weight": 1.0},)
# method -> (mode, training split, distill.terms)
METHODS = {
    "scratch": ("scratch", "train", ()),
    "train_kl": ("distill", "train", KL),
    "train_mse": ("distill", "train", MSE),
    "transfer_kl": ("distill", augment.SPLIT, KL),
    "transfer_mse": ("distill", augment.SPLIT, MSE),
    "transfer_scratch": ("scratch", augment.SPLIT, ()),
}
DEFAULT_METHODS = ("scratch", "train_kl", "train_mse", "transfer_kl",
                   "transfer_mse")
BASELINE = "scratch"
# Full run / --smoke defaults of the flags that differ.
DEFAULTS = {
    False: dict(teacher_lrs="3e-5,1e-4,3e-4", sweep_fraction=0.125,
                sweep_steps=40, sizes="32,64", size_seeds="0,1,2"),
    True: dict(teacher_lrs="1e-3,3e-3", sweep_fraction=1.0, sweep_steps=2,
               sizes="8", size_seeds="0,1"),
}


# ----------------------------------------------------------------------------
# Configs and runs.
# ----------------------------------------------------------------------------


def _load_module(path: str):
  spec = importlib.util.spec_from_file_location("kdjax_config_transfer", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def base_config(args) -> ml_collections.ConfigDict:
  """The config file's (smoke) preset, --set overrides, resolved, data dir
  in the workdir."""
  config = _load_module(args.config).get_config("smoke" if args.smoke else "")
  changes = {}
  for item in args.set:
    key, _, value = item.partition("=")
    changes[key] = _parse_value(value)
  config_lib.set_fields(config, changes)
  config.data.data_dir = args.data_dir or os.path.join(args.workdir, "data")
  config.teacher.checkpoint_dir = teacher_dir(args)
  return resolve.resolve_config(config)


def run_config(base, **changes) -> ml_collections.ConfigDict:
  """A copy of `base` with dotted fields changed."""
  return config_lib.set_fields(ml_collections.ConfigDict(base.to_dict()),
                               changes)


def teacher_dir(args) -> str:
  return os.path.join(args.workdir, "teacher")


def cache_dir(args, split: str) -> str:
  return os.path.join(args.workdir, "cache", split)


def run_dir(args, method: str, hidden: int, seed: int) -> str:
  return os.path.join(args.workdir, "students", method, f"h{hidden}",
                      f"seed_{seed}")


def _read_json(path: str, default=None):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def train_run(config, directory: str) -> tuple[dict, float, bool]:
  """(run.json, wall seconds, trained now): trains unless run.json exists."""
  timing = os.path.join(directory, "wall_seconds.json")
  ran = False
  if not os.path.exists(os.path.join(directory, "run.json")):
    start = time.perf_counter()
    modes.run(config, directory)
    _write_json(timing, {"seconds": time.perf_counter() - start})
    ran = True
  return (_read_json(os.path.join(directory, "run.json")),
          _read_json(timing, {"seconds": float("nan")})["seconds"], ran)


class Stages:
  """WORKDIR/stages.json: each stage's wall seconds, one entry per command
  that ran it (a stage whose runs were all done takes seconds)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "stages.json")
    self.record = _read_json(self.path, {})

  def done(self, name: str, seconds: float) -> None:
    entry = self.record.setdefault(name, {"sessions": []})
    entry["sessions"].append({"seconds": seconds,
                              "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    entry["seconds"] = sum(s["seconds"] for s in entry["sessions"])
    _write_json(self.path, self.record)


# ----------------------------------------------------------------------------
# The stages.
# ----------------------------------------------------------------------------


def lr_sweep(args, base) -> dict:
  """The teacher at each learning rate on a subset; validation picks one."""
  fraction = float(base.data.train_fraction) * args.sweep_fraction
  steps = int(args.sweep_steps)
  results = {}
  for lr in args.teacher_lrs:
    directory = os.path.join(args.workdir, "lr_sweep", f"lr_{lr:g}")
    config = run_config(base, mode="teacher", **{
        "teacher.train.learning_rate": lr, "data.train_fraction": fraction,
        "teacher.train.num_steps": steps,
        "teacher.train.warmup_steps": max(1, steps // 10),
        "eval_every_steps": steps, "checkpoint.every_steps": steps})
    run, seconds, _ = train_run(config, directory)
    # Only the run's numbers are needed again: drop its ~250 MB checkpoints.
    shutil.rmtree(os.path.join(directory, checkpoint.CHECKPOINT_SUBDIR),
                  ignore_errors=True)
    results[f"{lr:g}"] = {"learning_rate": lr,
                          "validation_accuracy": run["eval"]["accuracy"],
                          "wall_seconds": seconds}
    print(f"lr_sweep: lr {lr:g}: validation accuracy "
          f"{run['eval']['accuracy']:.4f} ({seconds / 60:.1f} min)",
          flush=True)
  # Best validation accuracy; a tie goes to the smaller rate.
  chosen = max(results.values(), key=lambda r: (r["validation_accuracy"],
                                                -r["learning_rate"]))
  summary = {"train_fraction": fraction, "steps": steps, "runs": results,
             "chosen_learning_rate": chosen["learning_rate"]}
  _write_json(os.path.join(args.workdir, "lr_sweep", "choice.json"), summary)
  return summary


def chosen_lr(args) -> float:
  choice = _read_json(os.path.join(args.workdir, "lr_sweep", "choice.json"))
  if choice is None:
    raise SystemExit("The lr_sweep stage has not finished: run it first.")
  return float(choice["chosen_learning_rate"])


def train_teacher(args, base) -> dict:
  config = run_config(base, mode="teacher", **{
      "teacher.train.learning_rate": chosen_lr(args)})
  run, seconds, _ = train_run(config, teacher_dir(args))
  print(f"teacher: validation accuracy {run['eval']['accuracy']:.4f} "
        f"({seconds / 60:.1f} min)", flush=True)
  return run


def transfer_set(args, base) -> dict:
  """Prepares 'train_augmented'; counts its records and copies."""
  config = run_config(base, **{"data.train_split": augment.SPLIT})
  source = pipeline.get_source(config.data, augment.SPLIT)
  records = source.__getitems__(list(range(len(source))))
  copies = np.bincount([int(r["copy"]) for r in records])
  examples = [r[config.data.input_key].decode("utf-8") for r in records[:6]]
  summary = {"records": len(source), "source_texts": int(copies[0]),
             "copies_per_text": {str(c): int(n) for c, n in enumerate(copies)},
             "settings": dict(config.data.transfer_set),
             "tfds_name": source.dataset_info.full_name,
             "first_records": examples}
  _write_json(os.path.join(args.workdir, "transfer_set.json"), summary)
  print(f"transfer_set: {len(source)} records from {copies[0]} reviews",
        flush=True)
  return summary


def build_caches(args, base) -> dict:
  """The teacher's raw logits over 'train' and 'train_augmented'."""
  out = {}
  for split in ("train", augment.SPLIT):
    directory = cache_dir(args, split)
    manifest = _read_json(os.path.join(directory, teacher_cache.MANIFEST))
    if not (manifest and manifest.get("complete")):
      config = run_config(base, mode="cache_teacher", **{
          "data.train_split": split, "cache.dir": directory})
      manifest = modes.run(config, args.workdir)
    out[split] = {"records": manifest["records"],
                  "seconds": manifest["seconds"], "bytes": manifest["bytes"]}
    print(f"cache {split}: {manifest['records']} records, "
          f"{manifest['seconds'] / 60:.1f} min", flush=True)
  return out


def student_config(args, base, method: str, seed: int, hidden: int):
  mode, split, terms = METHODS[method]
  steps = int(base.student.train.num_steps)
  return run_config(base, mode=mode, seed=seed, **{
      "data.train_split": split,
      "distill.terms": terms,
      "distill.teacher_cache": cache_dir(args, split) if mode == "distill"
                               else "",
      "student.model.hidden_size": hidden,
      "student.model.embed_dim": hidden,
      "student.model.dense_features": hidden,
      "eval_every_steps": steps,  # Validation once, at the end.
      "checkpoint.every_steps": steps})


def train_students(args, base, methods, seeds, hidden) -> dict:
  out = {}
  for method in methods:
    for seed in seeds:
      directory = run_dir(args, method, hidden, seed)
      run, seconds, _ = train_run(
          student_config(args, base, method, seed, hidden), directory)
      out.setdefault(method, {})[seed] = run["eval"]["accuracy"]
      print(f"{method} h{hidden} seed {seed}: validation accuracy "
            f"{run['eval']['accuracy']:.4f} ({seconds / 60:.1f} min)",
            flush=True)
  return out


def best_distilled(validation: dict[str, dict[int, float]]) -> str:
  """The distilled method with the best mean validation accuracy."""
  distilled = {m: np.mean(list(v.values())) for m, v in validation.items()
               if METHODS[m][0] == "distill" and v}
  if not distilled:
    raise SystemExit("No distilled students: add one to --methods.")
  return max(sorted(distilled), key=lambda m: distilled[m])


def default_hidden(base) -> int:
  return int(base.student.model.hidden_size)


def students_validation(args, base) -> dict[str, dict[int, float]]:
  """Validation accuracy (run.json) of the finished default-size runs."""
  out = {}
  for method in args.methods:
    for seed in args.seeds:
      run = _read_json(os.path.join(run_dir(args, method, default_hidden(base),
                                            seed), "run.json"))
      if run is not None:
        out.setdefault(method, {})[seed] = run["eval"]["accuracy"]
  return out


def size_methods(args, base) -> list[str]:
  chosen = []
  for m in args.size_methods:
    if m == "best":
      m = best_distilled(students_validation(args, base))
    if m not in chosen:
      chosen.append(m)
  return chosen


def train_sizes(args, base) -> dict:
  methods = size_methods(args, base)
  out = {}
  for hidden in args.sizes:
    if hidden != default_hidden(base):
      out[hidden] = train_students(args, base, methods, args.size_seeds,
                                   hidden)
  return {"methods": methods, "validation": out}


# ----------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------


def _predictions(directory: str, compute) -> dict[str, np.ndarray]:
  """{split: logits} kept in the run dir (test is computed once per run)."""
  path = os.path.join(directory, "predictions.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  logits = compute()
  np.savez(path, **logits)
  return logits


def evaluate_all(args, base) -> dict[str, Any]:
  """Logits of the teacher and every finished student on validation and
  test, with parameter counts and examples/s per architecture."""
  mesh = layout.make_mesh(base)
  data = {split: pipeline.load_split(pipeline.get_source(base.data, split),
                                     base.data)
          for split in ("validation", "test")}
  inputs = {s: d["inputs"] for s, d in data.items()}
  teacher = layout.load_teacher(run_config(base, mode="distill"),
                                args.workdir, mesh)
  teacher_apply = metrics.cached_apply_fn(teacher.model)
  teacher_logits = _predictions(teacher_dir(args), lambda: {
      s: metrics.predict_logits(teacher_apply, teacher.params, x, mesh)
      for s, x in inputs.items()})
  teacher_entry = {
      "logits": teacher_logits, "params": params_lib.count(teacher.params),
      "examples_per_second": metrics.inference_examples_per_second(
          teacher_apply, teacher.params, inputs["test"])}
  students, speeds = [], {}
  root = os.path.join(args.workdir, "students")
  for method in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    for size in sorted(os.listdir(os.path.join(root, method))):
      for seed_name in sorted(os.listdir(os.path.join(root, method, size))):
        directory = os.path.join(root, method, size, seed_name)
        run = _read_json(os.path.join(directory, "run.json"))
        if run is None:
          continue
        model, params = report_lib.load_params(base, "student", directory,
                                                run["model"], mesh)
        apply = metrics.cached_apply_fn(model)
        logits = _predictions(directory, lambda: {  # pylint: disable=cell-var-from-loop
            s: metrics.predict_logits(apply, params, x, mesh)
            for s, x in inputs.items()})
        hidden = int(run["model"]["hidden_size"])
        if hidden not in speeds:
          speeds[hidden] = metrics.inference_examples_per_second(
              apply, params, inputs["test"])
        students.append({
            "method": method, "hidden": hidden, "seed": int(run["seed"]),
            "logits": logits, "params": params_lib.count(params),
            "examples_per_second": speeds[hidden], "objective":
            run["objective"], "steps": run["steps"], "wall_seconds":
            _read_json(os.path.join(directory, "wall_seconds.json"),
                       {"seconds": float("nan")})["seconds"]})
  labels = {s: d["labels"] for s, d in data.items()}
  return {"labels": labels, "teacher": teacher_entry, "students": students}


def _accuracy(logits, labels) -> float:
  return float(np.mean(np.argmax(logits, -1) == labels))


def _correct(logits, labels) -> np.ndarray:
  return np.argmax(logits, -1) == labels


def summarise(args, base, evaluated: dict) -> dict[str, Any]:
  """Per-method statistics, the comparisons vs scratch, choices made on
  validation. Plain numbers (JSON)."""
  labels = evaluated["labels"]
  teacher = evaluated["teacher"]
  t_logits = teacher["logits"]
  groups: dict[tuple[str, int], list[dict]] = {}
  for s in evaluated["students"]:
    groups.setdefault((s["method"], s["hidden"]), []).append(s)

  def per_seed(runs, split):
    return {r["seed"]: _accuracy(r["logits"][split], labels[split])
            for r in runs}

  rows = {}
  for (method, hidden), runs in sorted(groups.items()):
    runs = sorted(runs, key=lambda r: r["seed"])
    row = {"method": method, "hidden": hidden, "seeds": [r["seed"] for r in runs],
           "params": runs[0]["params"],
           "examples_per_second": runs[0]["examples_per_second"],
           "objective": runs[0]["objective"], "steps": runs[0]["steps"],
           "minutes_per_run": float(np.mean([r["wall_seconds"]
                                             for r in runs]) / 60)}
    for split in ("validation", "test"):
      accs = per_seed(runs, split)
      row[split] = {"per_seed": {str(k): v for k, v in accs.items()},
                    **dict(zip(("mean", "std"),
                               paired_stats.mean_std(list(accs.values()))))}
    row["test"]["agreement_with_teacher"] = float(np.mean([
        np.mean(np.argmax(r["logits"]["test"], -1)
                == np.argmax(t_logits["test"], -1)) for r in runs]))
    base_runs = groups.get((BASELINE, hidden))
    if base_runs and method != BASELINE:
      by_seed = {r["seed"]: r for r in base_runs}
      compare = {}
      for split in ("validation", "test"):
        paired = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
        mine = np.stack([_correct(r["logits"][split], labels[split])
                         for r, _ in paired])
        theirs = np.stack([_correct(b["logits"][split], labels[split])
                           for _, b in paired])
        compare[split] = {
            "by_seed": paired_stats.seed_interval(
                per_seed(runs, split), per_seed(base_runs, split)),
            "mcnemar_per_seed": {
                str(r["seed"]): paired_stats.mcnemar_exact(m, t)
                for (r, _), m, t in zip(paired, mine, theirs)},
            "bootstrap_examples": paired_stats.bootstrap_interval(
                mine, theirs, resamples=args.bootstrap_resamples)}
      row["vs_scratch"] = compare
    rows[f"{method}/h{hidden}"] = row

  hidden0 = default_hidden(base)
  main_validation = {
      m: {int(k): v for k, v in rows[f"{m}/h{hidden0}"]["validation"][
          "per_seed"].items()}
      for m in METHODS if f"{m}/h{hidden0}" in rows}
  choices = {"teacher_learning_rate": _read_json(os.path.join(
      args.workdir, "lr_sweep", "choice.json"), {}).get(
          "chosen_learning_rate")}
  for prefix in ("train_", "transfer_"):
    candidates = {m: v for m, v in main_validation.items()
                  if m.startswith(prefix) and METHODS[m][0] == "distill"}
    if candidates:
      choices[f"best_on_{prefix.rstrip('_')}"] = best_distilled(candidates)
  if any(METHODS[m][0] == "distill" for m in main_validation):
    choices["best_distilled"] = best_distilled(main_validation)

  curve = [{"step": r["step"], "accuracy": r["accuracy"]}
           for r in read_metrics(teacher_dir(args)) if r["split"] == "eval"]
  teacher_run = _read_json(os.path.join(teacher_dir(args), "run.json"), {})
  return {
      "teacher": {
          "validation_accuracy": _accuracy(t_logits["validation"],
                                           labels["validation"]),
          "test_accuracy": _accuracy(t_logits["test"], labels["test"]),
          "params": teacher["params"],
          "model": (f"{base.teacher.model.name} from {base.teacher.init_from}"
                    if base.teacher.init_from else
                    f"{base.teacher.model.name} from random init"),
          "examples_per_second": teacher["examples_per_second"],
          "validation_curve": curve,
          "learning_rate": teacher_run.get("config", {}).get(
              "teacher.train.learning_rate", choices["teacher_learning_rate"]),
          "steps": teacher_run.get("steps")},
      "students": rows, "choices": choices,
      "num_examples": {s: int(len(v)) for s, v in labels.items()},
      "default_hidden": hidden0,
      "lr_sweep": _read_json(os.path.join(args.workdir, "lr_sweep",
                                          "choice.json")),
      "transfer_set": _read_json(os.path.join(args.workdir,
                                              "transfer_set.json")),
      "stages": _read_json(os.path.join(args.workdir, "stages.json"), {}),
  }


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def _ci(d: dict) -> str:
  if not np.isfinite(d.get("low", np.nan)):
    return f"{100 * d['mean']:+.2f}"
  return f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"


def render_markdown(summary: dict[str, Any]) -> str:
  t = summary["teacher"]
  n = summary["num_examples"]
  lines = [
      f"Validation {n['validation']} / test {n['test']} reviews. Teacher "
      f"({t['model']}, every layer trained, lr "
      f"{summary['choices'].get('teacher_learning_rate')} chosen on "
      f"validation): validation {_pct(t['validation_accuracy'])}, test "
      f"{_pct(t['test_accuracy'])}, {t['params']:,} params, "
      f"{t['examples_per_second']:,.0f} examples/s.", "",
      "| student | hidden | params | examples/s | seeds | validation acc | "
      "test acc | test vs scratch, by seed [95% CI] | McNemar p per seed "
      "(test) | test vs scratch, bootstrap over reviews [95% CI] | test "
      "agreement with teacher |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in summary["students"].values():
    v, te = row["validation"], row["test"]
    compare = row.get("vs_scratch", {}).get("test")
    lines.append(
        f"| {row['method']} | {row['hidden']} | {row['params']:,} | "
        f"{row['examples_per_second']:,.0f} | {len(row['seeds'])} | "
        f"{_pct(v['mean'])} ± {_pct(v['std'])} | {_pct(te['mean'])} ± "
        f"{_pct(te['std'])} | "
        + (_ci(compare["by_seed"]) if compare else "-") + " | "
        + (", ".join(f"{m['p_value']:.2g}"
                     for m in compare["mcnemar_per_seed"].values())
           if compare else "-") + " | "
        + (_ci(compare["bootstrap_examples"]) if compare else "-")
        + f" | {_pct(te['agreement_with_teacher'])} |")
  lines += ["", "Chosen on validation: " + ", ".join(
      f"{k} = {v}" for k, v in summary["choices"].items()) + ".", ""]
  return "\n".join(lines)


def write_report(args, base) -> dict[str, Any]:
  evaluated = evaluate_all(args, base)
  summary = summarise(args, base, evaluated)
  summary["cpu"] = machine_info.describe()
  markdown = render_markdown(summary)
  _write_json(os.path.join(args.workdir, "results.json"), summary)
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(markdown)
  curves: dict[str, list] = {}
  for row in summary["students"].values():
    curves.setdefault(row["method"], []).append({
        "params": row["params"], "mean": row["test"]["mean"],
        "std": row["test"]["std"],
        "examples_per_second": row["examples_per_second"]})
  t = summary["teacher"]
  plots.write_accuracy_vs_size_png(
      {m: c for m, c in curves.items() if len(c) > 1} or curves,
      os.path.join(args.workdir, "accuracy_vs_size.png"),
      teacher={"params": t["params"], "accuracy": t["test_accuracy"],
               "examples_per_second": t["examples_per_second"]})
  print(markdown, flush=True)
  return summary


# ----------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--smoke", action="store_true",
                      help="the config's smoke preset and tiny stages")
  parser.add_argument("--config", default=CONFIG)
  parser.add_argument("--data_dir", default="",
                      help="tfds data dir ('' = WORKDIR/data)")
  parser.add_argument("--set", action="append", default=[],
                      help="config override, dotted=value (repeatable)")
  parser.add_argument("--teacher_lrs", default=None)
  parser.add_argument("--sweep_fraction", type=float, default=None,
                      help="of the config's training subset")
  parser.add_argument("--sweep_steps", type=int, default=None)
  parser.add_argument("--seeds", default=None,
                      help="default: the config's pipeline.seeds")
  parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                      help=f"of {sorted(METHODS)}")
  parser.add_argument("--sizes", default=None,
                      help="BiLSTM widths besides the config's")
  parser.add_argument("--size_seeds", default=None)
  parser.add_argument("--size_methods", default="scratch,best",
                      help="'best': the best distilled method on validation")
  parser.add_argument("--bootstrap_resamples", type=int, default=10000)
  parser.add_argument("--stop_after", default="report", choices=STAGES)
  args = parser.parse_args(argv)
  for key, value in DEFAULTS[args.smoke].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.workdir = os.path.abspath(args.workdir)
  args.teacher_lrs = [float(x) for x in args.teacher_lrs.split(",")]
  args.methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in args.methods if m not in METHODS]
  if unknown or BASELINE not in args.methods:
    parser.error(f"--methods: {unknown or 'no ' + BASELINE}; allowed: "
                 f"{sorted(METHODS)}, {BASELINE!r} included")
  args.sizes = _ints(args.sizes)
  args.size_seeds = _ints(args.size_seeds)
  args.size_methods = [m for m in args.size_methods.split(",") if m]
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  base = base_config(args)
  if args.seeds is None:
    args.seeds = [int(s) for s in base.pipeline.seeds]
  else:
    args.seeds = _ints(args.seeds)
  os.makedirs(args.workdir, exist_ok=True)
  stages = Stages(args.workdir)
  steps = {
      "lr_sweep": lambda: lr_sweep(args, base),
      "teacher": lambda: train_teacher(args, base),
      "transfer_set": lambda: transfer_set(args, base),
      "cache": lambda: build_caches(args, base),
      "students": lambda: train_students(args, base, args.methods,
                                         args.seeds, default_hidden(base)),
      "sizes": lambda: train_sizes(args, base),
      "report": lambda: write_report(args, base),
  }
  result = {}
  for name in STAGES:
    start = time.perf_counter()
    result = steps[name]()
    stages.done(name, time.perf_counter() - start)
    if name == args.stop_after:
      break
  return result


if __name__ == "__main__":
  main()
