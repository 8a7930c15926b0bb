"""The report's figure: training curves of every run and the accuracy comparison."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from kdjax.runtime import storage  # pylint: disable=g-import-not-at-top
from kdjax.runtime.metrics_writer import read_metrics  # pylint: disable=g-import-not-at-top


def write_report_png(report: dict[str, Any], workdir: str, path: str) -> None:
  """Three panels: train loss, eval accuracy over steps, per-seed accuracy."""
  fig, (ax_loss, ax_acc, ax_cmp) = plt.subplots(1, 3, figsize=(18, 5))
  runs = [("teacher", report["teacher"]["run_dir"])] + [
      (f"{s['group']} s{s['seed']}", s["run_dir"]) for s in report["students"]]
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  group_names = ["teacher"] + list(report["groups"])
  for label, run_dir in runs:
    group = label.rsplit(" s", 1)[0] if label != "teacher" else "teacher"
    color = colors[group_names.index(group) % len(colors)]
    records = read_metrics(storage.join(workdir, run_dir))
    train = [r for r in records if r["split"] == "train" and "loss" in r]
    evals = [r for r in records if r["split"] == "eval"]
    if train:
      ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train],
                   color=color, alpha=0.7, label=group)
    if evals:
      ax_acc.plot([r["step"] for r in evals], [r["accuracy"] for r in evals],
                  color=color, alpha=0.7, label=group)
  for ax, title in ((ax_loss, "training loss"), (ax_acc, "test accuracy")):
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xlabel("step")
    ax.set_title(title)
  ax_loss.set_yscale("log")

  names = ["teacher"] + list(report["groups"])
  for i, name in enumerate(names):
    if name == "teacher":
      values = [report["teacher"]["accuracy"]]
    else:
      values = report["groups"][name]["accuracy_per_seed"]
    ax_cmp.scatter([i] * len(values), values, color=colors[i % len(colors)],
                   zorder=3)
    ax_cmp.hlines(sum(values) / len(values), i - 0.3, i + 0.3,
                  color=colors[i % len(colors)])
  ax_cmp.set_xticks(range(len(names)))
  ax_cmp.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
  ax_cmp.set_ylabel("test accuracy (dots: seeds, bar: mean)")
  ax_cmp.set_title("teacher vs students")
  ax_cmp.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  png = io.BytesIO()  # Rendered here, written once: path may be gs://.
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  storage.write_bytes(path, png.getvalue())


def write_accuracy_vs_size_png(curves: dict[str, list[dict[str, float]]],
                               path: str, *, teacher: dict | None = None,
                               ylabel: str = "test accuracy") -> None:
  """Accuracy against parameter count (log x), one line per method.

  `curves`: {method: [{'params', 'mean', 'std', 'examples_per_second'}, ...]}
  (error bars: std over seeds; each point labelled with its examples/s);
  `teacher`: {'params', 'accuracy', 'examples_per_second'} drawn as a
  dashed line and a star.
  """
  fig, ax = plt.subplots(figsize=(7.5, 5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (name, points) in enumerate(curves.items()):
    points = sorted(points, key=lambda p: p["params"])
    x = [p["params"] for p in points]
    ax.errorbar(x, [p["mean"] for p in points],
                yerr=[p.get("std", 0.0) for p in points], marker="o",
                capsize=3, color=colors[i % len(colors)], label=name)
    for p in points:
      if p.get("examples_per_second"):
        ax.annotate(f"{p['examples_per_second']:,.0f}/s",
                    (p["params"], p["mean"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=7)
  if teacher:
    ax.axhline(teacher["accuracy"], color="gray", linestyle="--",
               label="teacher")
    ax.scatter([teacher["params"]], [teacher["accuracy"]], marker="*",
               s=120, color="gray", zorder=3)
    if teacher.get("examples_per_second"):
      ax.annotate(f"{teacher['examples_per_second']:,.0f}/s",
                  (teacher["params"], teacher["accuracy"]),
                  textcoords="offset points", xytext=(-30, 6), fontsize=7)
  ax.set_xscale("log")
  ax.set_xlabel("parameters (labels: inference examples/s)")
  ax.set_ylabel(f"{ylabel} (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  storage.write_bytes(path, png.getvalue())
