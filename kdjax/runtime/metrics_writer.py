"""Where training metrics go: absl log lines with progress, TensorBoard, metrics.jsonl.

Only process 0 writes. TensorBoard event files come from tensorboardX, so
TensorFlow is not needed to write them. Both files grow line by line, which
an object store cannot do in place: for a gs:// workdir they are written to a
local staging directory and copied to the workdir every
storage.SYNC_SECONDS and on close (kdjax.runtime.storage.StagedDir; tensorboardX's
own gs:// writer would need google-cloud-storage and re-uploads the event
file on every flush).
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import logging

from kdjax.runtime import storage

METRICS_FILE = "metrics.jsonl"
ROLLOUTS_TAG = "rollouts"  # WORKDIR/rollouts.jsonl (MetricsWriter.text).
TENSORBOARD_DIR = "tensorboard"


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _drop_records_after(path: str, step: int) -> None:
  """Keeps the records of steps <= `step`: a run resumed from that step
  writes the later ones again (once, not twice)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if json.loads(line)["step"] <= step]
  if len(kept) != len(lines):  # Atomic: a crash here loses no record.
    with storage.atomic_path(path) as tmp, open(tmp, "w") as f:
      f.writelines(kept)


class MetricsWriter:
  """Writes scalars to TensorBoard and WORKDIR/metrics.jsonl; logs progress."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               name: str = ""):
    self._enabled = jax.process_index() == 0
    self._total_steps = total_steps
    self._name = name
    # The first interval's rate includes compilation; later ones do not.
    self._last_time = time.time()
    self._last_step = start_step
    self._jsonl = None
    self._tb = None
    self._staged = None
    if self._enabled:
      # A resumed run continues the metrics.jsonl it wrote before, from
      # the step it resumed at.
      self._staged = storage.StagedDir(
          workdir, fetch=(METRICS_FILE, f"{ROLLOUTS_TAG}.jsonl"))
      for name in (METRICS_FILE, f"{ROLLOUTS_TAG}.jsonl"):
        _drop_records_after(self._staged.path(name), start_step)
      self._jsonl = open(self._staged.path(METRICS_FILE), "a")
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(self._staged.path(TENSORBOARD_DIR))

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    if not self._enabled:
      return
    self._jsonl.write(json.dumps({"step": step, "split": split,
                                  **{k: float(v) for k, v in scalars.items()}})
                      + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(f"{split}/{k}", float(v), step)
    self._tb.flush()
    self._staged.sync()

  def text(self, step: int, tag: str, records: list[dict]) -> None:
    """Records (e.g. a few rollouts) to WORKDIR/<tag>.jsonl and TensorBoard
    text, for a person to read what the model writes."""
    if not self._enabled or not records:
      return
    with open(self._staged.path(f"{tag}.jsonl"), "a") as f:
      for record in records:
        f.write(json.dumps({"step": step, **record}) + "\n")
    self._tb.add_text(tag, "\n\n".join(
        "  \n".join(f"**{k}**: {v}" for k, v in record.items())
        for record in records), step)
    self._tb.flush()
    self._staged.sync()

  def progress(self, step: int, scalars: dict[str, float]) -> None:
    """Logs step, metrics, steps/s and ETA since the previous call."""
    now = time.time()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    eta = (self._total_steps - step) / rate if rate > 0 else 0.0
    if self._enabled:
      metrics = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
      logging.info("%s step %d/%d (%.0f%%) %s | %.1f steps/s, ETA %s",
                   self._name, step, self._total_steps,
                   100.0 * step / max(self._total_steps, 1), metrics, rate,
                   _format_duration(eta))
      self.write(step, "train", {**scalars, "steps_per_second": rate})

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()
      self._staged.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl (local or gs://), [] if none."""
  path = storage.join(workdir, METRICS_FILE)
  if not storage.exists(path):
    return []
  return [json.loads(line) for line in storage.read_text(path).splitlines()
          if line.strip()]
