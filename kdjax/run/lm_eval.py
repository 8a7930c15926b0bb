"""Language-model evaluation: perplexity, agreement and KL to the teacher, speed.

`token_metrics` runs student (and teacher) over packed held-out sequences,
data-parallel over the mesh, and sums per-token statistics on device, so only
scalars reach the host. `write_lm_report` evaluates the teacher and every
finished student run under a workdir on the test split and writes
report.{json,md,png}, like evaluate.write_report does for classification.

Definitions (over tokens with mask 1):
  perplexity       exp(mean negative log-likelihood of the label token)
  accuracy         argmax == label
  agreement        student argmax == teacher argmax
  kl_to_teacher    mean KL(teacher || student) at T = 1 (nats per token)
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kdjax.data import lm as lm_data
from kdjax.distill import parallel, step
from kdjax.models import generate
from kdjax.models import llama as llama_lib
from kdjax.run import evaluate
from kdjax.runtime import distributed, metrics_writer, storage
from kdjax.weights import params as params_lib
from kdjax.weights import pretrained
from kdjax.weights import specs
from kdjax.weights import teachers as teachers_lib

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"


def _batch_sums(student_logits, teacher_logits, labels, mask):
  """Per-batch sums of the definitions above (float32 on device)."""
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(log_q, labels[..., None], -1)[..., 0]
  prediction = jnp.argmax(log_q, -1)
  sums = {"nll": jnp.sum(nll * mask), "count": jnp.sum(mask),
          "correct": jnp.sum((prediction == labels) * mask)}
  if teacher_logits is not None:
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)
    sums["kl"] = jnp.sum(kl * mask)
    sums["agreement"] = jnp.sum(
        (prediction == jnp.argmax(log_p, -1)) * mask)
  return sums


@functools.lru_cache(maxsize=8)
def _jitted_sums(student_apply, teacher_apply):
  def sums(params, teacher_params, batch):
    student = step.predict(student_apply, params, batch["inputs"])
    teacher = (step.predict(teacher_apply, teacher_params, batch["inputs"])
               if teacher_apply is not None else None)
    return _batch_sums(student, teacher, batch["labels"], batch["mask"])
  return jax.jit(sums)


def token_metrics(apply_fn, params, arrays: dict[str, np.ndarray], mesh, *,
                  teacher_apply=None, teacher_params=None,
                  batch_size: int = 8) -> dict[str, float]:
  """Metrics of a model (apply_fn from step.make_apply_fn) on packed sequences.

  `arrays` is the global set (every process holds all of it, as
  kdjax.data.lm.lm_eval_arrays returns); rows are split over devices in
  batches of `batch_size` (rounded to a multiple of the device count).
  """
  num_devices = mesh.devices.size
  batch_size = max(num_devices, batch_size // num_devices * num_devices)
  forward = _jitted_sums(apply_fn, teacher_apply)
  params = parallel.replicate(params, mesh)
  if teacher_params is not None:
    teacher_params = parallel.replicate(teacher_params, mesh)
  n = len(arrays["inputs"])
  totals: dict[str, float] = {}
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in arrays.items()}
    pad = batch_size - len(chunk["inputs"])
    if pad:  # Padded rows have mask 0.
      chunk = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in chunk.items()}
    per_process = batch_size // jax.process_count()
    lo = jax.process_index() * per_process
    local = {k: v[lo:lo + per_process] for k, v in chunk.items()}
    sums = forward(params, teacher_params, parallel.shard_batch(local, mesh))
    sums = jax.device_get(sums)
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = max(totals.pop("count"), 1.0)
  result = {"perplexity": math.exp(totals["nll"] / count),
            "nll": totals["nll"] / count,
            "accuracy": totals["correct"] / count, "tokens": int(count)}
  if "kl" in totals:
    result["kl_to_teacher"] = totals["kl"] / count
    result["agreement_with_teacher"] = totals["agreement"] / count
  return result


# ----------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------


def load_teacher(config, workdir: str):
  """(model, params) of config.teacher (kdjax.weights.teachers)."""
  teacher = teachers_lib.load(config,
                              specs.teacher_specs(config, workdir)[0])
  return teacher.model, teacher.params


def generation_speed(model, params, arrays, *, batch: int, prompt_length: int,
                     new_tokens: int) -> float:
  """Greedy tokens/s of a llama model on one device, prompts from `arrays`."""
  if not isinstance(model, llama_lib.Llama):
    return float("nan")
  prompt = arrays["inputs"][:batch, :prompt_length]
  params = jax.device_put(params, jax.local_devices()[0])
  return generate.tokens_per_second(model, params, prompt,
                                    max_new_tokens=new_tokens)


def write_lm_report(config, workdir: str) -> dict[str, Any]:
  """Teacher and every student run on config.data.test_split; report files."""
  mesh = parallel.make_mesh()
  split = config.data.get("test_split", "test")
  arrays = lm_data.lm_eval_arrays(config.data, split)
  eval_batch = int(config.data.get("eval_batch_size", 8))
  speed_args = dict(batch=int(config.report.get("generation_batch", 4)),
                    prompt_length=int(config.report.get("generation_prompt", 32)),
                    new_tokens=int(config.report.get("generation_tokens", 32)))

  teacher_model, teacher_params = load_teacher(config, workdir)
  teacher_apply = evaluate.cached_apply_fn(teacher_model)
  logging.info("Report: teacher on %d %s sequences.", len(arrays["inputs"]),
               split)
  teacher_entry = {
      **token_metrics(teacher_apply, teacher_params, arrays, mesh,
                      batch_size=eval_batch),
      "num_params": params_lib.count(teacher_params),
      "num_non_embedding_params":
          pretrained.count_non_embedding_params(teacher_params),
      "generation_tokens_per_second": generation_speed(
          teacher_model, teacher_params, arrays, **speed_args),
      "source": (config.teacher.init_from if specs.pretrained_teacher(config)
                 else storage.relpath(specs.teacher_dir(config, workdir),
                                      workdir)),
  }
  teacher_params = parallel.replicate(teacher_params, mesh)

  students, speeds = [], {}
  for run_dir, run in evaluate.find_runs(workdir):
    if run["role"] not in ("scratch", "distill"):
      continue
    model, params = evaluate.load_params(config, "student", run_dir,
                                         run["model"])
    logging.info("Report: %s", run_dir)
    arch = json.dumps(run["model"], sort_keys=True)
    if arch not in speeds:
      speeds[arch] = generation_speed(model, params, arrays, **speed_args)
    students.append({
        "group": evaluate.group_key(run), "method": run["role"],
        "variant": run.get("variant", ""), "seed": run["seed"],
        "objective": run["objective"],
        **token_metrics(evaluate.cached_apply_fn(model), params, arrays, mesh,
                        teacher_apply=teacher_apply,
                        teacher_params=teacher_params, batch_size=eval_batch),
        "num_params": params_lib.count(params),
        "num_non_embedding_params":
            pretrained.count_non_embedding_params(params),
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
  import io  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
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
