"""End to end on real data (sklearn digits): pipeline, report, SIGKILL resume, NaN.

The other resume faults are in test_resume.py."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from kdjax import modes
from kdjax.run import train
from kdjax.runtime import checkpoint
from kdjax.weights import params as params_lib
from kdjax.weights import specs
from conftest import load_config

REPO = str(pathlib.Path(__file__).resolve().parents[2])

# Every key report.json documents in the README.
REPORT_KEYS = {"dataset", "eval_split", "num_eval_examples", "teacher_model",
               "student_model", "teacher", "students", "groups",
               "compression_ratio", "speedup", "device"}
MODEL_ENTRY_KEYS = {"accuracy", "precision_macro", "recall_macro", "f1_macro",
                    "num_params", "checkpoint_bytes",
                    "inference_examples_per_second", "run_dir"}
STUDENT_KEYS = MODEL_ENTRY_KEYS | {"agreement_with_teacher", "kl_to_teacher",
                                   "group", "method", "seed", "train_fraction",
                                   "objective"}


def _params(config, role, run_dir):
  model = specs.build_model(config, role)
  abstract = params_lib.abstract(model, config.data)
  return checkpoint.restore_params(run_dir, abstract)


def test_pipeline_writes_the_documented_report(digits_config, tmp_path):
  workdir = str(tmp_path)
  report = modes.run(digits_config, workdir)
  for name in ("report.json", "report.md", "report.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, "report.json")) as f:
    on_disk = json.load(f)
  assert REPORT_KEYS <= set(on_disk)
  assert MODEL_ENTRY_KEYS <= set(on_disk["teacher"])
  assert {s["method"] for s in on_disk["students"]} == {"scratch", "distill"}
  for student in on_disk["students"]:
    assert STUDENT_KEYS <= set(student)
    assert 0.0 <= student["accuracy"] <= 1.0
    assert student["kl_to_teacher"] >= 0.0
  assert report["compression_ratio"] == pytest.approx(
      report["teacher"]["num_params"] / report["students"][0]["num_params"])
  # Training curves were written for TensorBoard, without TensorFlow.
  assert os.listdir(os.path.join(workdir, "teacher", "tensorboard"))
  # A student's checkpoint holds the student only: no teacher weights.
  distilled = os.path.join(workdir, "full_data", "distill", "seed_0")
  params = _params(digits_config, "student", distilled)
  assert set(params) == {"dense_0", "head"}
  assert checkpoint.params_bytes(distilled) < checkpoint.params_bytes(
      os.path.join(workdir, "teacher")) / 2


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    digits_config, tmp_path):
  digits_config.mode = "teacher"
  digits_config.teacher.train.update(num_steps=12, optimizer="sgd",
                                     learning_rate=1e12, warmup_steps=0,
                                     schedule="constant")
  digits_config.checkpoint.every_steps = 1
  digits_config.log_every_steps = 1
  with pytest.raises(train.NonFiniteLossError,
                     match=r"NaN/Inf at or before step \d+.*last good checkpoint"):
    modes.run(digits_config, str(tmp_path))
  kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert kept, "the last good checkpoint must survive"
  params = _params(digits_config, "teacher", str(tmp_path))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def _main_command(workdir, num_steps):
  return [sys.executable, "-m", "kdjax.main", "--config=configs/digits.py:tiny",
          f"--workdir={workdir}", "--config.mode=teacher",
          f"--config.teacher.train.num_steps={num_steps}",
          "--config.checkpoint.every_steps=5", "--config.eval_every_steps=1000",
          "--config.log_every_steps=5"]


def test_killed_run_resumes_to_the_same_parameters(data_dir, tmp_path):
  """SIGKILL mid-run, restart the same command, compare to an uninterrupted run."""
  env = dict(os.environ, TFDS_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  num_steps = 400
  interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
  proc = subprocess.Popen(_main_command(interrupted, num_steps), cwd=REPO,
                          env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt_dir = interrupted / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if (
        ckpt_dir.exists()) else []
    if steps and max(steps) >= 20:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (interrupted / train.RUN_FILE).exists()
  killed_at = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert killed_at < num_steps

  subprocess.run(_main_command(interrupted, num_steps), cwd=REPO, env=env,
                 check=True, capture_output=True)
  subprocess.run(_main_command(reference, num_steps), cwd=REPO, env=env,
                 check=True, capture_output=True)
  with open(interrupted / train.RUN_FILE) as f:  # Resumed, not restarted.
    assert json.load(f)["resumed_from_step"] == killed_at
  config = load_config("digits", "tiny")
  resumed = _params(config, "teacher", str(interrupted))
  uninterrupted = _params(config, "teacher", str(reference))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               resumed, uninterrupted)


def test_pipeline_variants_features_and_two_teachers(digits_config, tmp_path):
  """Objective families side by side in one report, on real data."""
  digits_config.pipeline.extra_teachers = (dict(name="b", seed=1),)
  digits_config.pipeline.variants = (
      dict(name="jsd", overrides={
          "distill.terms": (dict(name="jsd", weight=0.5, beta=0.5),
                            dict(name="ce", weight=0.5))}),
      dict(name="features", overrides={
          "distill.features": (dict(student="hidden_0", teacher="penultimate",
                                    loss="mse", weight=1.0),)}),
      dict(name="two_teachers", overrides={
          "distill.extra_teachers": (dict(
              checkpoint_dir="{workdir}/teacher_b",
              model=digits_config.teacher.model.to_dict(), weight=1.0),)}),
  )
  report = modes.run(digits_config, str(tmp_path))
  groups = report["groups"]
  for name in ("scratch", "distill", "distill[jsd]", "distill[features]",
               "distill[two_teachers]"):
    assert f"{name} (full data)" in groups, sorted(groups)
  assert "jsd(beta=0.5)" in groups["distill[jsd] (full data)"]["objective"]
  assert "feature_mse(hidden_0<-penultimate)" in groups[
      "distill[features] (full data)"]["objective"]
  assert "2 teachers (ensemble)" in groups[
      "distill[two_teachers] (full data)"]["objective"]
  # The learned projection (16 -> 128) trained but is not in the export.
  run_dir = str(tmp_path / "full_data" / "distill_features" / "seed_0")
  assert set(_params(digits_config, "student", run_dir)) == {"dense_0", "head"}
  with open(os.path.join(str(tmp_path), "report.md")) as f:
    assert "distill[two_teachers]" in f.read()


def _file_hashes(directory: str) -> dict[str, str]:
  """sha256 of every file under directory, by relative path."""
  hashes = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        hashes[os.path.relpath(path, directory)] = hashlib.sha256(
            f.read()).hexdigest()
  return hashes


def test_teacher_checkpoint_files_unchanged_by_distillation(
    digits_config, digits_teacher, tmp_path):
  """A real distill run reads the teacher's checkpoint and writes none of it:
  every file under the teacher's dir is byte-identical afterwards."""
  before = _file_hashes(digits_teacher)
  assert len(before) > 3, before  # A checkpoint with its files, not an empty dir.
  digits_config.mode = "distill"
  digits_config.teacher.checkpoint_dir = digits_teacher
  digits_config.student.train.num_steps = 2
  student_dir = str(tmp_path / "student")
  modes.run(digits_config, student_dir)
  with open(os.path.join(student_dir, "run.json")) as f:
    assert json.load(f)["role"] == "distill"
  assert _file_hashes(digits_teacher) == before


def test_logged_means_cover_every_step_and_exports_name_their_step(
    digits_config, tmp_path):
  """A save between two log lines does not drop its steps from the next
  line's mean; an export of an earlier checkpoint says that step and does
  not borrow the final step's eval metrics."""
  from kdjax.runtime import metrics_writer  # pylint: disable=g-import-not-at-top
  digits_config.mode = "scratch"
  digits_config.student.train.num_steps = 6
  digits_config.checkpoint.update(every_steps=2, keep=3)
  digits_config.eval_every_steps = 1000

  def train_losses(log_every, workdir):
    digits_config.log_every_steps = log_every
    summary = modes.run(digits_config, workdir)
    rows = metrics_writer.read_metrics(workdir)
    return summary, {r["step"]: r["loss"] for r in rows
                     if r["split"] == "train"}

  _, each = train_losses(1, str(tmp_path / "each"))
  summary, every_third = train_losses(3, str(tmp_path / "third"))
  assert sorted(each) == list(range(1, 7)) and sorted(every_third) == [3, 6]
  for step_ in (3, 6):  # Equal batches: the mean of the three steps.
    assert every_third[step_] == pytest.approx(
        np.mean([each[s] for s in range(step_ - 2, step_ + 1)]), rel=1e-5)

  workdir = str(tmp_path / "third")
  export_config = digits_config.copy_and_resolve_references()
  export_config.mode = "export"
  for step_, expected_step in ((4, 4), (0, 6)):
    export_config.export.update(format="stablehlo", step=step_,
                                dir=str(tmp_path / f"export_{step_}"))
    made_by = modes.run(export_config, workdir)["manifest"]
    assert made_by["step"] == expected_step
    assert made_by["teacher"] == ""  # A scratch run has none.
    assert made_by["eval_metrics"] == (summary["eval"] if expected_step == 6
                                       else {})
