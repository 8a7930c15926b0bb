"""`python -m kdjax.main` as a user runs it: bad input is one line, no traceback.

Each test starts the entry point as a subprocess with the environment a user's
shell would have (no JAX_PLATFORMS, no simulated devices), so it also sees
what kdjax prints on a host without a TPU: nothing from libtpu.
"""

import glob
import os
import pathlib
import re
import subprocess
import sys

import pytest

from kdjax.runtime import distributed

REPO = str(pathlib.Path(__file__).resolve().parents[2])
_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # absl/glog line header.
_TPU_NOISE = ("TPU_WORKER_HOSTNAMES", "TPU accelerator", "backend 'tpu'",
              "libtpu")


def _kdjax(*args, tfds_dir, **env):
  """Runs the entry point (digits, tiny) with a user's environment plus env."""
  clean = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "KDJAX_TRACEBACK")}
  clean.update(TFDS_DATA_DIR=str(tfds_dir), **env)
  return subprocess.run(
      [sys.executable, "-m", "kdjax.main", "--config=configs/digits.py:tiny",
       "--config.mode=teacher", *args],
      cwd=REPO, env=clean, capture_output=True, text=True, timeout=120)


def _one_error_line(result, status: int = 1) -> str:
  """The run failed with `status` and printed one error line, no traceback."""
  output = result.stdout + result.stderr
  assert result.returncode == status, output
  assert "Traceback" not in output, output
  lines = result.stderr.splitlines()
  not_logs = [line for line in lines if not _LOG_LINE.match(line)]
  assert not_logs == lines[-1:], output  # Only absl log lines above it.
  assert lines[-1].startswith("kdjax: error: "), output
  for noise in _TPU_NOISE:  # No TPU here: libtpu was never loaded.
    assert noise not in output, output
  return lines[-1]


def test_bad_config_value_is_one_line(tmp_path):
  result = _kdjax(f"--workdir={tmp_path / 'run'}", "--config.distill.alpha=1.5",
                  tfds_dir=tmp_path / "tfds")
  assert _one_error_line(result) == (
      "kdjax: error: config.distill.alpha=1.5 is invalid: must be in [0, 1].")
  assert result.stderr.count("\n") == 1  # Nothing else at all.


def test_traceback_on_request(tmp_path):
  result = _kdjax(f"--workdir={tmp_path / 'run'}", "--config.distill.alpha=1.5",
                  tfds_dir=tmp_path / "tfds", KDJAX_TRACEBACK="1")
  assert result.returncode != 0
  assert "Traceback (most recent call last)" in result.stderr
  assert ("kdjax.core.config.ConfigError: config.distill.alpha=1.5 is invalid"
          in result.stderr)


def test_missing_dataset_is_one_line_after_a_quiet_cpu_start(tmp_path):
  if distributed.tpu_chips_present() or glob.glob("/dev/accel*"):
    pytest.skip("a TPU host: jax's default platforms load libtpu here")
  result = _kdjax(f"--workdir={tmp_path / 'run'}",
                  "--config.data.name=no_such_dataset_xyz",
                  tfds_dir=tmp_path / "tfds")
  line = _one_error_line(result)  # Includes: no libtpu output.
  assert "Could not open tfds dataset 'no_such_dataset_xyz'" in line
  assert "Prepare it there" in line
  # jax started (on the CPU) before the dataset was opened.
  assert "on 1 cpu device(s)" in result.stderr


def test_unwritable_workdir_is_one_line(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")  # Unwritable even for root.
  result = _kdjax(f"--workdir={blocker / 'run'}", tfds_dir=tmp_path / "tfds")
  line = _one_error_line(result)
  assert f"--workdir='{blocker / 'run'}' cannot be written" in line


@pytest.mark.parametrize("args, expected", [
    (("--config.distill.alph=0.5",),
     "kdjax: error: --config.distill.alph: the config has no field 'alph'. "
     'Did you mean "alpha" instead of "alph"?'),
    (("--config=configs/digits.py:huge",),
     "kdjax: error: --config=configs/digits.py:huge: Unknown preset 'huge'; "
     "allowed: 'tiny'."),
    ((), "kdjax: error: --workdir is required (except with "
         "--config.mode=aot_check)."),
])
def test_command_line_mistake_is_one_line_with_status_2(tmp_path, args,
                                                        expected):
  workdir = () if not args else (f"--workdir={tmp_path / 'run'}",)
  result = _kdjax(*workdir, *args, tfds_dir=tmp_path / "tfds")
  assert _one_error_line(result, status=2) == expected
