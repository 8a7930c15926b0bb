"""Resuming never loses or ignores training silently (real digits runs).

Each fault test checks the step the run resumed from (run.json's
resumed_from_step) and that the final parameters equal an uninterrupted
run's: training is deterministic, so equality alone would also pass a run
that silently restarted from step 0.
"""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from kdjax import modes
from kdjax.core import config as config_lib
from kdjax.run import train
from kdjax.runtime import checkpoint
from kdjax.weights import params as params_lib
from kdjax.weights import specs
from conftest import load_config

REPO = str(pathlib.Path(__file__).resolve().parents[2])
import fault_injection  # pylint: disable=g-import-not-at-top,wrong-import-position


def _teacher_config(digits_config):
  digits_config.mode = "teacher"
  digits_config.teacher.train.num_steps = 6
  digits_config.checkpoint.keep = 3
  digits_config.eval_every_steps = 6
  return digits_config


def _params(config, workdir):
  model = specs.build_model(config, "teacher")
  abstract = params_lib.abstract(model, config.data)
  return checkpoint.restore_params(workdir, abstract)


def _assert_same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                if d.isdigit())


def _set_aside(workdir):
  return sorted(d for d in os.listdir(os.path.join(workdir, "checkpoints"))
                if ".unreadable-" in d)


def _resumed_from(workdir):
  with open(os.path.join(workdir, train.RUN_FILE)) as f:
    return json.load(f)["resumed_from_step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """An uninterrupted 6-step teacher run with checkpoints at steps 2, 4, 6."""
  config = load_config("digits", "tiny")
  config.data.data_dir = data_dir
  workdir = str(tmp_path_factory.mktemp("reference"))
  modes.run(_teacher_config(config), workdir)
  assert _steps(workdir) == [2, 4, 6]
  return workdir, _params(config, workdir)


def _interrupted_copy(reference_dir, tmp_path, drop_steps=()):
  """The reference run as if it had stopped: no run.json, steps dropped."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_dir, workdir)
  os.remove(os.path.join(workdir, train.RUN_FILE))
  for step in drop_steps:
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  return workdir


def _data_files(step_dir):
  return sorted(os.path.join(root, f) for root, _, files in os.walk(step_dir)
                for f in files if os.sep + "d" + os.sep in os.path.join(root, f))


def _truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def _zero_bytes(path):
  open(path, "wb").close()


@pytest.mark.parametrize("damage", [_truncate, _zero_bytes],
                         ids=["truncated", "zero_bytes"])
def test_damaged_newest_step_is_set_aside_and_the_one_before_resumed(
    digits_config, reference, tmp_path, damage, caplog):
  reference_dir, reference_params = reference
  workdir = _interrupted_copy(reference_dir, tmp_path)
  for path in _data_files(os.path.join(workdir, "checkpoints", "6", "params")):
    damage(path)
  with caplog.at_level("WARNING"):
    modes.run(_teacher_config(digits_config), workdir)
  assert _resumed_from(workdir) == 4
  assert len(_set_aside(workdir)) == 1 and _set_aside(workdir)[0].startswith("6.")
  assert any("step 6" in r.getMessage() and "damaged" in r.getMessage()
             for r in caplog.records)
  _assert_same_params(_params(digits_config, workdir), reference_params)


def test_every_step_damaged_stops_and_moves_nothing_unless_told(
    digits_config, reference, tmp_path):
  reference_dir, reference_params = reference
  workdir = _interrupted_copy(reference_dir, tmp_path)
  for step in (2, 4, 6):
    for path in _data_files(os.path.join(workdir, "checkpoints", str(step))):
      _truncate(path)
  config = _teacher_config(digits_config)
  with pytest.raises(checkpoint.UnreadableCheckpointError,
                     match=r"(?s)step 6: .*step 4: .*step 2: .*"
                           r"restart_if_unreadable=True"):
    modes.run(config, workdir)
  assert _steps(workdir) == [2, 4, 6] and not _set_aside(workdir)

  config.checkpoint.restart_if_unreadable = True
  modes.run(config, workdir)
  assert _resumed_from(workdir) is None
  assert len(_set_aside(workdir)) == 3
  _assert_same_params(_params(config, workdir), reference_params)


def test_transient_restore_error_is_retried_and_nothing_set_aside(
    digits_config, reference, tmp_path, monkeypatch, caplog):
  reference_dir, reference_params = reference
  workdir = _interrupted_copy(reference_dir, tmp_path, drop_steps=(6,))
  monkeypatch.setattr(checkpoint, "RETRY_SECONDS", 0.0)
  original = checkpoint.ocp.CheckpointManager.restore
  failures = []

  def flaky_restore(self, step, *args, **kwargs):
    if not failures and "train" in kwargs["args"].keys():
      failures.append(step)
      raise ConnectionResetError(errno.ECONNRESET, "injected: 503 from storage")
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore",
                      flaky_restore)
  with caplog.at_level("WARNING"):
    modes.run(_teacher_config(digits_config), workdir)
  assert failures == [4]
  assert any("retrying" in r.getMessage() for r in caplog.records)
  assert _resumed_from(workdir) == 4 and not _set_aside(workdir)
  _assert_same_params(_params(digits_config, workdir), reference_params)


def test_persistent_storage_error_stops_without_setting_anything_aside(
    digits_config, reference, tmp_path, monkeypatch):
  reference_dir, _ = reference
  workdir = _interrupted_copy(reference_dir, tmp_path)
  monkeypatch.setattr(checkpoint, "RETRY_SECONDS", 0.0)

  def unavailable(self, step, *args, **kwargs):
    raise TimeoutError("injected: storage timed out")

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", unavailable)
  with pytest.raises(checkpoint.UnreadableCheckpointError,
                     match="may be transient.*Nothing was set aside"):
    modes.run(_teacher_config(digits_config), workdir)
  assert _steps(workdir) == [2, 4, 6] and not _set_aside(workdir)


def test_changed_optimizer_is_refused_by_name_and_checkpoints_untouched(
    digits_config, reference, tmp_path):
  reference_dir, _ = reference
  workdir = _interrupted_copy(reference_dir, tmp_path, drop_steps=(6,))
  before = {p: os.path.getmtime(p) for p in _data_files(workdir)}
  config = _teacher_config(digits_config)
  config.teacher.train.optimizer = "sgd"
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"opt_state: checkpoint has adamw \(.*mu, nu\), "
                           r"this run builds sgd \(.*trace\)"):
    modes.run(config, workdir)
  assert _steps(workdir) == [2, 4] and not _set_aside(workdir)
  assert {p: os.path.getmtime(p) for p in _data_files(workdir)} == before


@pytest.mark.parametrize("field, value", [
    ("teacher.train.num_steps", 8),  # The schedule's length.
    ("teacher.train.learning_rate", 3e-3),
    ("data.train_fraction", 0.5),
    ("seed", 1),
])
def test_changed_run_fields_are_refused_by_name(digits_config, reference,
                                                tmp_path, field, value):
  reference_dir, _ = reference
  workdir = _interrupted_copy(reference_dir, tmp_path, drop_steps=(6,))
  config = config_lib.set_fields(_teacher_config(digits_config),
                                 {field: value})
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=f"{field}: checkpoint has .*, this config has"):
    modes.run(config, workdir)
  assert _steps(workdir) == [2, 4] and not _set_aside(workdir)


def test_safe_fields_may_change_on_resume(digits_config, reference, tmp_path):
  reference_dir, reference_params = reference
  workdir = _interrupted_copy(reference_dir, tmp_path, drop_steps=(6,))
  config = _teacher_config(digits_config)
  config.log_every_steps = 1
  config.checkpoint.every_steps = 3
  config.student.train.learning_rate = 0.5  # Not read by a teacher run.
  modes.run(config, workdir)
  assert _resumed_from(workdir) == 4
  _assert_same_params(_params(config, workdir), reference_params)


def test_failed_background_save_stops_the_run_and_keeps_the_previous_step(
    digits_config, reference, tmp_path):
  """ENOSPC in Orbax's async writer: surfaces at the next save, names it."""
  _, reference_params = reference
  workdir = str(tmp_path / "run")
  config = _teacher_config(digits_config)
  fault_injection.fail_background_save(
      4, OSError(errno.ENOSPC, "No space left on device (injected)"))
  try:
    with pytest.raises(checkpoint.CheckpointSaveError,
                       match=r"step 4 .*No space left.*step 2 is intact"):
      modes.run(config, workdir)
  finally:
    fault_injection.restore()
  assert _steps(workdir) == [2]
  modes.run(config, workdir)
  assert _resumed_from(workdir) == 2
  _assert_same_params(_params(config, workdir), reference_params)


def _main_command(workdir, num_steps, prefix=("-m", "kdjax.main")):
  return [sys.executable, *prefix, "--config=configs/digits.py:tiny",
          f"--workdir={workdir}", "--config.mode=teacher",
          f"--config.teacher.train.num_steps={num_steps}",
          "--config.checkpoint.every_steps=5", "--config.eval_every_steps=1000",
          "--config.log_every_steps=5"]


def test_sigkill_while_a_checkpoint_is_written_resumes_from_the_one_before(
    data_dir, tmp_path):
  """The step being written is partial on disk (a held Orbax writer)."""
  env = dict(os.environ, TFDS_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  num_steps = 30
  workdir, reference_dir = tmp_path / "killed", tmp_path / "reference"
  proc = subprocess.Popen(
      _main_command(workdir, num_steps, prefix=(
          os.path.join(REPO, "tests", "fault_injection.py"),
          "--delay-save-of-step=15", "--")),
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
      text=True)
  try:
    line = proc.stdout.readline()  # Printed when the writer is held.
    assert "holding the save of step 15" in line, line
    time.sleep(0.5)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  ckpt_dir = workdir / "checkpoints"
  assert _steps(str(workdir)) == [5, 10]
  assert any(d.startswith("15.") for d in os.listdir(ckpt_dir)), (
      "the step being written should be left partial")

  subprocess.run(_main_command(workdir, num_steps), cwd=REPO, env=env,
                 check=True, capture_output=True)
  subprocess.run(_main_command(reference_dir, num_steps), cwd=REPO, env=env,
                 check=True, capture_output=True)
  assert _resumed_from(str(workdir)) == 10
  config = load_config("digits", "tiny")
  _assert_same_params(_params(config, str(workdir)),
                      _params(config, str(reference_dir)))
