"""The classification report (report.json, report.md, report.png).

`write_report(config, workdir)` finds every finished run under the workdir
(their run.json), evaluates each on the test split next to the teacher, and
groups students by training data and method so seeds can be compared. The
numbers come from kdjax.run.metrics, the figure from kdjax.runtime.plots.
`find_runs`, `load_params` and `group_key` serve the LM report too.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from absl import logging

from kdjax.data import pipeline
from kdjax.distill import step
from kdjax.run import layout
from kdjax.run import metrics
from kdjax.runtime import checkpoint, plots, storage
from kdjax.weights import params as params_lib
from kdjax.weights import run_params
from kdjax.weights import specs

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"


def _not_a_run(name: str) -> bool:
  """Directories that hold no runs: not worth listing (many objects on GCS)."""
  return name in (checkpoint.CHECKPOINT_SUBDIR, "tensorboard")


def find_runs(workdir: str) -> list[tuple[str, dict[str, Any]]]:
  """(run dir, run.json) of every finished run under workdir, sorted by path."""
  runs = []
  for root, _, files in storage.walk(workdir, skip=_not_a_run):
    if "run.json" in files:
      runs.append((root, storage.read_json(storage.join(root, "run.json"))))
  return sorted(runs, key=lambda r: r[0])


def load_params(config, role: str, run_dir: str, spec=None, mesh=None):
  """A run's model (from `spec`, its run.json's, else the config's) and
  params (read into their shards when `mesh` is the sharded layout's)."""
  model = (specs.model_from_spec(
      {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
           if spec else specs.build_model(config, role))
  if mesh is not None:
    return model, layout.restore_params(config, model, run_dir, mesh)
  return model, run_params.restore(
      run_dir, params_lib.abstract(model, config.data), config.data)


def _run_json(run_dir: str) -> dict[str, Any]:
  return storage.read_json(storage.join(run_dir, "run.json"), default={})


def group_key(run: dict) -> str:
  """'distill (full data)', 'distill[jsd] (3% of data)', 'scratch (...)'."""
  fraction = run["train_fraction"]
  data = "full data" if fraction >= 1.0 else f"{fraction * 100:g}% of data"
  variant = f"[{run['variant']}]" if run.get("variant") else ""
  return f"{run['role']}{variant} ({data})"


def write_report(config, workdir: str) -> dict[str, Any]:
  """Evaluates the teacher and every student run under workdir; writes the report."""
  mesh = layout.make_mesh(config)
  eval_source = pipeline.get_source(config.data, config.data.eval_split)
  data = pipeline.load_split(eval_source, config.data)
  labels = data["labels"]

  teacher_path = specs.teacher_dir(config, workdir)
  teacher = layout.load_teacher(config, workdir, mesh)
  teacher_model, teacher_params = teacher.model, teacher.params
  teacher_apply = step.make_apply_fn(teacher_model)
  teacher_logits = metrics.predict_logits(teacher_apply, teacher_params,
                                          data["inputs"], mesh)
  teacher_entry = {
      **metrics.classification_metrics(teacher_logits, labels),
      "num_params": params_lib.count(teacher_params),
      "num_trainable_params": _run_json(teacher_path).get(
          "num_trainable_params", params_lib.count(teacher_params)),
      "checkpoint_bytes": checkpoint.params_bytes(teacher_path),
      "inference_examples_per_second": metrics.inference_examples_per_second(
          teacher_apply, teacher_params, data["inputs"]),
      "run_dir": storage.relpath(teacher_path, workdir),
  }

  students, speeds = [], {}
  for run_dir, run in find_runs(workdir):
    if run["role"] not in ("scratch", "distill"):
      continue
    # Each run's own model (pipeline variants may train another student).
    student_model, params = load_params(config, "student", run_dir,
                                         run.get("model"), mesh)
    student_apply = metrics.cached_apply_fn(student_model)
    logits = metrics.predict_logits(student_apply, params, data["inputs"],
                                    mesh)
    arch = json.dumps(run.get("model"), sort_keys=True)
    if arch not in speeds:  # Time each architecture once.
      speeds[arch] = metrics.inference_examples_per_second(
          student_apply, params, data["inputs"])
    students.append({
        "group": group_key(run), "method": run["role"],
        "variant": run.get("variant", ""), "seed": run["seed"],
        "train_fraction": run["train_fraction"], "objective": run["objective"],
        **metrics.classification_metrics(logits, labels, teacher_logits),
        "model": run.get("model", {}).get("name", ""),
        "num_params": params_lib.count(params),
        "num_trainable_params": run.get("num_trainable_params",
                                        params_lib.count(params)),
        "checkpoint_bytes": checkpoint.params_bytes(run_dir),
        "inference_examples_per_second": speeds[arch],
        "arch": json.dumps(specs.architecture(run.get("model", {})),
                           sort_keys=True),
        "run_dir": storage.relpath(run_dir, workdir)})

  groups: dict[str, dict[str, Any]] = {}
  for s in students:
    g = groups.setdefault(s["group"], {"method": s["method"],
                                       "train_fraction": s["train_fraction"],
                                       "objective": s["objective"],
                                       "seeds": [], "accuracy_per_seed": []})
    g["seeds"].append(s["seed"])
    g["accuracy_per_seed"].append(s["accuracy"])
  for name, g in groups.items():
    acc = np.asarray(g["accuracy_per_seed"])
    g["accuracy_mean"] = float(acc.mean())
    g["accuracy_std"] = float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
    members = [s for s in students if s["group"] == name]
    for key in ("f1_macro", "agreement_with_teacher", "kl_to_teacher"):
      g[f"{key}_mean"] = float(np.mean([m[key] for m in members]))

  # Compression and speed-up: of config.student.model (variants may differ).
  default_arch = json.dumps(
      specs.architecture(specs.model_spec(config, "student")), sort_keys=True)
  default = [s for s in students if s.pop("arch") == default_arch]
  student_params = default[0]["num_params"] if default else None
  speed = default[0]["inference_examples_per_second"] if default else None
  report = {
      "dataset": config.data.name,
      "eval_split": config.data.eval_split,
      "num_eval_examples": int(len(labels)),
      "teacher_model": specs.model_spec(config, "teacher"),
      "student_model": specs.model_spec(config, "student"),
      "teacher": teacher_entry,
      "students": students,
      "groups": groups,
      "compression_ratio": (teacher_entry["num_params"] / student_params
                            if student_params else None),
      "speedup": (speed / teacher_entry["inference_examples_per_second"]
                  if speed else None),
      "device": str(jax.local_devices()[0].device_kind),
  }
  if jax.process_index() == 0:  # A local or gs:// workdir (kdjax.runtime.storage).
    storage.write_json(storage.join(workdir, REPORT_JSON), report)
    storage.write_text(storage.join(workdir, REPORT_MD),
                       render_markdown(report))
    plots.write_report_png(report, workdir,
                           storage.join(workdir, REPORT_PNG))
    logging.info("Report written to %s", storage.join(workdir, REPORT_MD))
  return report


def render_markdown(report: dict[str, Any]) -> str:
  """The report as a Markdown page: teacher, per-group means, per-seed rows."""
  t = report["teacher"]
  lines = [
      f"# kdjax report: {report['dataset']} ({report['eval_split']}, "
      f"{report['num_eval_examples']} examples)", "",
      f"Teacher `{report['teacher_model']['name']}`: {t['num_params']:,} params; "
      f"student `{report['student_model']['name']}`: "
      + (f"{report['students'][0]['num_params']:,} params; compression "
         f"{report['compression_ratio']:.1f}x, inference speed-up "
         f"{report['speedup']:.1f}x on {report['device']}."
         if report["compression_ratio"] is not None else
         "no run of this architecture (the runs below are of others)."
         if report["students"] else "no student runs found."), "",
      "## Summary (mean over seeds)", "",
      "| model | objective | seeds | accuracy (mean ± std) | macro F1 | "
      "agreement w/ teacher | KL to teacher |",
      "|---|---|---|---|---|---|---|",
      f"| teacher | CE(labels) | - | {t['accuracy']:.4f} | {t['f1_macro']:.4f} "
      "| - | - |"]
  for name, g in report["groups"].items():
    lines.append(
        f"| {name} | {g['objective']} | {len(g['seeds'])} | "
        f"{g['accuracy_mean']:.4f} ± {g['accuracy_std']:.4f} | "
        f"{g['f1_macro_mean']:.4f} | {g['agreement_with_teacher_mean']:.4f} | "
        f"{g['kl_to_teacher_mean']:.4f} |")
  lines += ["", "## Every run", "",
            "| run | seed | accuracy | precision | recall | F1 | agreement | "
            "KL to teacher | model | params | trained params | checkpoint bytes "
            "| examples/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {t['run_dir']} | - | {t['accuracy']:.4f} | "
            f"{t['precision_macro']:.4f} | {t['recall_macro']:.4f} | "
            f"{t['f1_macro']:.4f} | - | - | {report['teacher_model']['name']} | "
            f"{t['num_params']:,} | {t['num_trainable_params']:,} | "
            f"{t['checkpoint_bytes']:,} | {t['inference_examples_per_second']:,.0f} |"]
  for s in report["students"]:
    lines.append(
        f"| {s['run_dir']} | {s['seed']} | {s['accuracy']:.4f} | "
        f"{s['precision_macro']:.4f} | {s['recall_macro']:.4f} | "
        f"{s['f1_macro']:.4f} | {s['agreement_with_teacher']:.4f} | "
        f"{s['kl_to_teacher']:.4f} | {s['model']} | {s['num_params']:,} | "
        f"{s['num_trainable_params']:,} | "
        f"{s['checkpoint_bytes']:,} | {s['inference_examples_per_second']:,.0f} |")
  lines += ["", "Training curves and the comparison: report.png.", ""]
  return "\n".join(lines)
