"""Preemption: a real SIGTERM to a real training process (one process here;
2 processes in test_multihost.py)."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from kdjax.run import train
from kdjax.runtime import checkpoint
from kdjax.weights import params as params_lib
from kdjax.weights import specs
from conftest import load_config

REPO = str(pathlib.Path(__file__).resolve().parents[2])
NUM_STEPS = 100


def _command(workdir):
  return [sys.executable, "-m", "kdjax.main", "--config=configs/digits.py:tiny",
          f"--workdir={workdir}", "--config.mode=teacher",
          f"--config.teacher.train.num_steps={NUM_STEPS}",
          "--config.checkpoint.every_steps=10", "--config.eval_every_steps=1000",
          "--config.log_every_steps=10"]


def _steps(workdir) -> list[int]:
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if (
      os.path.isdir(path)) else []


def _params(workdir):
  config = load_config("digits", "tiny")
  model = specs.build_model(config, "teacher")
  abstract = params_lib.abstract(model, config.data)
  return checkpoint.restore_params(workdir, abstract)


def test_sigterm_saves_at_the_agreed_step_exits_0_and_resumes(data_dir,
                                                               tmp_path):
  # The three runs compile the same programs: a shared persistent cache.
  env = dict(os.environ, TFDS_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  workdir, reference = str(tmp_path / "preempted"), str(tmp_path / "reference")
  log = tmp_path / "preempted.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(_command(workdir), cwd=REPO, env=env, stdout=f,
                            stderr=subprocess.STDOUT)
  deadline = time.time() + 180
  while time.time() < deadline and proc.poll() is None:
    if _steps(workdir) and _steps(workdir)[-1] >= 10:
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be preempted"
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]

  output = log.read_text()
  saved = [int(s) for s in re.findall(r"saved the checkpoint at step (\d+)",
                                      output)]
  assert len(saved) == 1, output[-3000:]
  assert 10 <= saved[0] < NUM_STEPS
  assert _steps(workdir)[-1] == saved[0]  # The newest checkpoint is that step.
  assert "Run the same command again to resume" in output
  assert not os.path.exists(os.path.join(workdir, train.RUN_FILE))

  resumed = subprocess.run(_command(workdir), cwd=REPO, env=env,
                           capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed teacher from step {saved[0]}" in resumed.stderr
  subprocess.run(_command(reference), cwd=REPO, env=env, check=True,
                 capture_output=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               _params(workdir), _params(reference))
