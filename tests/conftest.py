"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere.

Under CI (the environment variable CI set, as .ci/run does) a skipped test
fails the run: every package a test needs is installed there, so a skip
would be a hole in CI, not a missing optional extra. The run ends with the
list of skipped tests and their reasons.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
# Test helpers (word_tokenizer, fault_injection) for tests in every folder.
sys.path.insert(0, str(REPO / "tests"))

pytest_plugins = ["pytester"]  # tests/test_ci_skips.py runs pytest itself.


# --- Under CI a skip is a failure. -------------------------------------------

_skipped: list[str] = []


def _in_ci() -> bool:
  return os.environ.get("CI", "").strip().lower() not in ("", "0", "false",
                                                          "no")


def _record_skip(report) -> None:
  if not report.skipped or hasattr(report, "wasxfail"):  # xfail is no hole.
    return
  longrepr = report.longrepr
  reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
  reason = reason.removeprefix("Skipped: ")
  _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionstart(session):
  del session
  _skipped.clear()


def pytest_collectreport(report):
  """Modules skipped while collected (e.g. pytest.importorskip at the top)."""
  _record_skip(report)


def pytest_runtest_logreport(report):
  _record_skip(report)


def pytest_sessionfinish(session, exitstatus):
  del exitstatus
  if _in_ci() and _skipped and session.exitstatus == pytest.ExitCode.OK:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  del exitstatus, config
  if _in_ci() and _skipped:
    terminalreporter.section("skipped under CI: the run fails", sep="=",
                             red=True, bold=True)
    for line in _skipped:
      terminalreporter.line(line)
    terminalreporter.line(
        f"{len(_skipped)} test(s) skipped with CI set: install what they "
        "need (.ci/run installs every package the tests use) or remove the "
        "skip.")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A tfds data dir shared by the session; shipped datasets prepare on first use."""
  path = tmp_path_factory.mktemp("tfds")
  os.environ["TFDS_DATA_DIR"] = str(path)
  return str(path)


@pytest.fixture
def digits_config(data_dir):
  """The real digits config at its 'tiny' preset, unlocked for edits."""
  import digits  # pylint: disable=g-import-not-at-top
  config = digits.get_config("tiny")
  config.data.data_dir = data_dir
  return config


@pytest.fixture(scope="session")
def digits_teacher(data_dir, tmp_path_factory) -> str:
  """The checkpoint dir of a digits 'tiny' teacher, trained once per session.

  Shared: tests read it (distill from it, validate against it), never write.
  """
  import digits  # pylint: disable=g-import-not-at-top
  from kdjax import modes  # pylint: disable=g-import-not-at-top
  config = digits.get_config("tiny")
  config.data.data_dir = data_dir
  config.mode = "teacher"
  path = str(tmp_path_factory.mktemp("digits_teacher"))
  modes.run(config, path)
  return path
