"""Test setup: 8 simulated CPU devices and one XLA compilation cache per run,
set before jax is imported anywhere.

Config files load by path, as kdjax.main loads them (no configs/ on
sys.path): `from conftest import config_module, load_config`.

Under CI (the environment variable CI set, as .ci/run does) a skipped test
fails the run: every package a test needs is installed there, so a skip
would be a hole in CI, not a missing optional extra. The run ends with the
list of skipped tests and their reasons.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache per test run, shared by the xdist workers and by
# every process a test starts (they inherit the environment): many tests
# compile the same small programs, and a hit skips XLA's compile (tests/distill
# 207 s -> 132 s from an empty cache). The folder is new for each run and
# removed when the process that made it exits, so no run sees another's
# programs. A cache dir set by the caller is used as is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _xla_cache = tempfile.mkdtemp(prefix="kdjax-tests-xla-cache-")
  _cache_owner = os.getpid()

  @atexit.register
  def _remove_xla_cache():
    if os.getpid() == _cache_owner:  # Not a forked child exiting normally.
      shutil.rmtree(_xla_cache, ignore_errors=True)

  os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import importlib.util  # pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position
import types  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# Test helpers (word_tokenizer, fault_injection) for tests in every folder.
sys.path.insert(0, str(REPO / "tests"))

pytest_plugins = ["pytester"]  # tests/test_ci_skips.py runs pytest itself.


# --- The shipped config files. ------------------------------------------------

_config_modules: dict[str, types.ModuleType] = {}


def config_module(name: str) -> types.ModuleType:
  """configs/<name>.py as a module, loaded from its path like kdjax.main does."""
  if name not in _config_modules:
    spec = importlib.util.spec_from_file_location(f"kdjax_config_{name}",
                                                  CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _config_modules[name] = module
  return _config_modules[name]


def load_config(name: str, preset: str | None = None, resolve: bool = True):
  """--config=configs/<name>.py[:preset] as a run sees it (unlocked).

  preset None calls get_config() with its own default, as a flag without
  ':preset' does. With `resolve`, 'hf_bert:', 'llama:' and instruction texts
  become paths and token ids, as kdjax.modes.run does before validating.
  """
  module = config_module(name)
  config = module.get_config(*([] if preset is None else [preset]))
  if resolve:
    from kdjax.weights import resolve as resolve_lib  # pylint: disable=g-import-not-at-top
    resolve_lib.resolve_config(config)
  return config


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
  config = load_config("digits", "tiny")
  config.data.data_dir = data_dir
  return config


@pytest.fixture(scope="session")
def digits_teacher(data_dir, tmp_path_factory) -> str:
  """The checkpoint dir of a digits 'tiny' teacher, trained once per session.

  Shared: tests read it (distill from it, validate against it), never write.
  """
  from kdjax import modes  # pylint: disable=g-import-not-at-top
  config = load_config("digits", "tiny")
  config.data.data_dir = data_dir
  config.mode = "teacher"
  path = str(tmp_path_factory.mktemp("digits_teacher"))
  modes.run(config, path)
  return path


# A 2-layer Llama on SmolLM2's tokenizer: small enough for 8 simulated
# devices, heads divisible by a 'model' axis of 2 (SmolLM2's 3 KV heads are
# not).
TINY_LM_TEACHER = dict(name="llama", vocab_size=49152, width=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=0, mlp_dim=128,
                       max_length=64)


def tiny_lm_distill_config(data_dir: str, teacher_dir: str):
  """configs/shakespeare_smollm2.py:smoke distilling from the tiny teacher at
  teacher_dir into a 1-layer one of width 32 (mode=distill, 4 steps,
  synchronous checkpoints every 2, SGD)."""
  config = load_config("shakespeare_smollm2", "smoke")
  config.data.data_dir = data_dir
  config.mode = "distill"
  config.teacher.model.update(TINY_LM_TEACHER)
  config.teacher.pretrained = False
  config.teacher.init_from = ""
  config.teacher.checkpoint_dir = teacher_dir
  config.student.model.update(dict(TINY_LM_TEACHER, width=32, num_layers=1))
  # SGD: Adam's update hides a gradient off by a constant factor.
  config.student.train.update(optimizer="sgd", learning_rate=0.5)
  config.checkpoint.every_steps = 2
  config.checkpoint.async_save = False
  return config


@pytest.fixture(scope="session")
def tiny_lm_teacher(data_dir, tmp_path_factory) -> str:
  """The checkpoint dir of TINY_LM_TEACHER trained 4 steps on the plays."""
  from kdjax import modes  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tiny_lm_teacher"))
  config = tiny_lm_distill_config(data_dir, path)
  config.mode = "teacher"
  config.teacher.train = config.student.train
  modes.run(config, path)
  return path
