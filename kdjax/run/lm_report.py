"""The language-model report: teacher and students on the test split.

`write_lm_report` evaluates the teacher and every finished student run under a
workdir on the test split (kdjax.run.lm_metrics: perplexity, agreement, KL,
generation speed) and writes report.{json,md,png}, like
report.write_report does for classification.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import jax
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from absl import logging

from kdjax.data import lm as lm_data
from kdjax.distill import parallel
from kdjax.run import layout
from kdjax.run import lm_metrics, metrics
from kdjax.run import report as report_lib
from kdjax.runtime import distributed, metrics_writer, storage
from kdjax.weights import params as params_lib
from kdjax.weights import specs

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"


def load_teacher(config, workdir: str, mesh):
  """(model, params) of config.teacher, placed on `mesh` (kdjax.run.layout)."""
  teacher = layout.load_teacher(config, workdir, mesh)
  return teacher.model, teacher.params


def write_lm_report(config, workdir: str) -> dict[str, Any]:
  """Teacher and every student run on config.data.test_split; report files."""
  mesh = layout.make_mesh(config)
  split = config.data.get("test_split", "test")
  arrays = lm_data.lm_eval_arrays(config.data, split)
  eval_batch = int(config.data.get("eval_batch_size", 8))
  speed_args = dict(batch=int(config.report.get("generation_batch", 4)),
                    prompt_length=int(config.report.get("generation_prompt", 32)),
                    new_tokens=int(config.report.get("generation_tokens", 32)))

  teacher_model, teacher_params = load_teacher(config, workdir, mesh)
  teacher_apply = metrics.cached_apply_fn(teacher_model)
  logging.info("Report: teacher on %d %s sequences.", len(arrays["inputs"]),
               split)
  teacher_entry = {
      **lm_metrics.token_metrics(teacher_apply, teacher_params, arrays, mesh,
                                 batch_size=eval_batch),
      "num_params": params_lib.count(teacher_params),
      "num_non_embedding_params":
          params_lib.count_non_embedding(teacher_params),
      "generation_tokens_per_second": lm_metrics.generation_speed(
          teacher_model, teacher_params, arrays, **speed_args),
      "source": (config.teacher.init_from if specs.pretrained_teacher(config)
                 else storage.relpath(specs.teacher_dir(config, workdir),
                                      workdir)),
  }
  teacher_params = parallel.on_mesh(teacher_params, mesh)

  students, speeds = [], {}
  for run_dir, run in report_lib.find_runs(workdir):
    if run["role"] not in ("scratch", "distill"):
      continue
    model, params = report_lib.load_params(config, "student", run_dir,
                                           run["model"], mesh)
    logging.info("Report: %s", run_dir)
    arch = json.dumps(run["model"], sort_keys=True)
    if arch not in speeds:
      speeds[arch] = lm_metrics.generation_speed(model, params, arrays,
                                                 **speed_args)
    students.append({
        "group": report_lib.group_key(run), "method": run["role"],
        "variant": run.get("variant", ""), "seed": run["seed"],
        "objective": run["objective"],
        **lm_metrics.token_metrics(
            metrics.cached_apply_fn(model), params, arrays, mesh,
            teacher_apply=teacher_apply, teacher_params=teacher_params,
            batch_size=eval_batch),
        "num_params": params_lib.count(params),
        "num_non_embedding_params":
            params_lib.count_non_embedding(params),
        "init_from": run.get("init_from", ""),
        "generation_tokens_per_second": speeds[arch],
        "run_dir": storage.relpath(run_dir, workdir)})

  groups: dict[str, dict[str, Any]] = {}
  for s in students:
    g = groups.setdefault(s["group"], {"objective": s["objective"],
                                       "seeds": [], "perplexity_per_seed": []})
    g["seeds"].append(s["seed"])
    g["perplexity_per_seed"].append(s["perplexity"])
  for name, g in groups.items():
    members = [s for s in students if s["group"] == name]
    for key in ("perplexity", "accuracy", "agreement_with_teacher",
                "kl_to_teacher"):
      g[f"{key}_mean"] = float(np.mean([m[key] for m in members]))
  report = {
      "task": "language_modelling", "dataset": config.data.name,
      "eval_split": split, "num_eval_tokens": teacher_entry["tokens"],
      "train_eval_split": config.data.eval_split,
      "teacher_model": specs.model_spec(config, "teacher"),
      "student_model": specs.model_spec(config, "student"),
      "teacher": teacher_entry, "students": students, "groups": groups,
      "device": str(jax.local_devices()[0].device_kind),
  }
  if jax.process_index() == 0:
    storage.write_json(storage.join(workdir, REPORT_JSON), report)
    storage.write_text(storage.join(workdir, REPORT_MD), render_markdown(report))
    _write_png(report, workdir)
    logging.info("Report written to %s", storage.join(workdir, REPORT_MD))
  distributed.barrier("lm_report")
  return report


def render_markdown(report: dict[str, Any]) -> str:
  t = report["teacher"]
  lines = [
      f"# kdjax report: {report['dataset']} language modelling "
      f"({report['eval_split']}, {report['num_eval_tokens']:,} tokens)", "",
      "| model | objective | seeds | perplexity | token accuracy | agreement "
      "w/ teacher | KL to teacher | params | non-embedding params | "
      "generation tokens/s |",
      "|---|---|---|---|---|---|---|---|---|---|",
      f"| teacher ({os.path.basename(t['source'])}) | - | - | "
      f"{t['perplexity']:.2f} | "
      f"{t['accuracy']:.4f} | - | - | {t['num_params']:,} | "
      f"{t['num_non_embedding_params']:,} | "
      f"{t['generation_tokens_per_second']:.1f} |"]
  for name, g in report["groups"].items():
    member = next(s for s in report["students"] if s["group"] == name)
    lines.append(
        f"| {name} | {g['objective']} | {len(g['seeds'])} | "
        f"{g['perplexity_mean']:.2f} | {g['accuracy_mean']:.4f} | "
        f"{g['agreement_with_teacher_mean']:.4f} | "
        f"{g['kl_to_teacher_mean']:.4f} | {member['num_params']:,} | "
        f"{member['num_non_embedding_params']:,} | "
        f"{member['generation_tokens_per_second']:.1f} |")
  lines += ["", "Per-seed rows: report.json. Training curves: report.png.", ""]
  return "\n".join(lines)


def _write_png(report: dict[str, Any], workdir: str) -> None:
  """Training CE and validation perplexity over steps, every student run."""
  matplotlib.use("Agg")
  fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(13, 4.5))
  for s in report["students"]:
    records = metrics_writer.read_metrics(storage.join(workdir, s["run_dir"]))
    label = f"{s['group']} s{s['seed']}"
    # CE on the next token: comparable across objectives (the loss is not).
    train = [r for r in records if r["split"] == "train" and "ce" in r]
    evals = [r for r in records if r["split"] == "eval" and "perplexity" in r]
    if train:
      ax_loss.plot([r["step"] for r in train], [r["ce"] for r in train],
                   label=label)
    if evals:
      ax_ppl.plot([r["step"] for r in evals], [r["perplexity"] for r in evals],
                  marker="o", label=label)
  ax_ppl.axhline(report["teacher"]["perplexity"], color="k", ls="--",
                 label=f"teacher ({report['eval_split']})")
  ax_loss.set(title="training CE on the next token (batch mean)",
              xlabel="step")
  ax_ppl.set(title=f"perplexity on {report.get('train_eval_split', 'eval')} "
             "during training", xlabel="step", yscale="log")
  for ax in (ax_loss, ax_ppl):
    ax.legend(fontsize=7)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  storage.write_bytes(storage.join(workdir, REPORT_PNG), buffer.getvalue())
