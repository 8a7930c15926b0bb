"""Entry point: python -m kdjax.main --config=configs/<file>.py[:preset] --workdir=DIR.

Any config field can be overridden: --config.distill.temperature=4.

Bad input (kdjax.core.errors.KdjaxError: a config value, a missing dataset, an
unwritable workdir, a checkpoint that does not match or cannot be read) and a
bad command line print one line, `kdjax: error: <message>`, and exit with
status 1 (2 for the command line); KDJAX_TRACEBACK=1 shows the traceback too.

On a host without TPU chips the run uses cpu (behind cuda/rocm when jax's
plugin for them is installed) and never loads libtpu; set JAX_PLATFORMS to
choose yourself.
"""

import glob
import importlib.metadata
import logging as py_logging
import os
import sys
from typing import NoReturn

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from kdjax import modes
from kdjax.core import errors
from kdjax.runtime import distributed, preemption

TRACEBACK_ENV = "KDJAX_TRACEBACK"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:preset]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and reports "
    "(required except with --config.mode=aot_check).")
flags.mark_flags_as_required(["config"])


class _QuietLibraries(py_logging.Filter):
  """Drops the INFO chatter of Orbax and grain (every save/restore logs ~20 lines)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain"))
    return record.levelno >= py_logging.WARNING or not noisy


def _tpu_host() -> bool:
  """TPU chips on the PCI bus, or a TPU VM's device files (v4/v5p, v5e/v6e)."""
  return bool(distributed.tpu_chips_present() or glob.glob("/dev/accel*")
              or glob.glob("/dev/vfio/[0-9]*"))


def _choose_platforms() -> None:
  """Off a TPU host, names the platforms so that jax never loads libtpu.

  jax's default initialises every installed backend; with libtpu installed
  (jax[tpu], the test extra) a CPU host loads it and prints its 'could not
  determine TPU accelerator type' warnings and a TPU_WORKER_HOSTNAMES error.
  Runs before any backend exists; a JAX_PLATFORMS the user set (even '',
  jax's default) is left alone. mode=aot_check loads libtpu itself, as a
  compiler (kdjax.aot), whatever the platforms.
  """
  if "JAX_PLATFORMS" in os.environ or jax.config.jax_platforms or _tpu_host():
    return
  plugins = [ep.name for ep in
             importlib.metadata.entry_points(group="jax_plugins")]
  platforms = ["cpu"]
  if any("rocm" in name for name in plugins) and os.path.exists("/dev/kfd"):
    platforms.insert(0, "rocm")
  if any("cuda" in name for name in plugins):  # jax skips it without a GPU.
    platforms.insert(0, "cuda")
  os.environ["JAX_PLATFORMS"] = ",".join(platforms)  # For child processes too.
  jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def _traceback_wanted() -> bool:
  return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _exit_with(message: str, status: int) -> NoReturn:
  print(f"kdjax: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _unknown_field(e: Exception, argv: list[str]) -> str | None:
  """The message for a --config.<path> the config lacks, else None."""
  while e.args and isinstance(e.args[0], Exception):  # AttributeError(KeyError)
    e = e.args[0]
  key, _, hint = str(e.args[0] if e.args else "").partition("\n")
  key = key.strip("'\"")
  flags_named = [a.split("=", 1)[0] for a in argv
                 if a.startswith("--config.") and
                 key in a.split("=", 1)[0][len("--config."):].split(".")]
  if not key or not flags_named:
    return None
  return (f"{flags_named[0]}: the config has no field {key!r}"
          + (f". {hint}" if hint else "."))


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistake on the command line as one line."""
  try:
    remaining = flags.FLAGS(argv)
    _CONFIG.value.get("mode")  # A config file that failed to load raises here.
    return remaining
  except (flags.Error, AttributeError, KeyError, OSError) as e:
    if _traceback_wanted():
      raise
    _exit_with(_command_line_error(e, argv), 2)


def _command_line_error(e: Exception, argv: list[str]) -> str:
  """One line for a flag-parsing error; re-raises what is no user mistake."""
  if isinstance(e, flags.Error):
    if "--config must have a value" in str(e):
      return "--config is required: --config=configs/<file>.py[:preset]."
    message = str(e).removeprefix("flag ")
    cause = e.__context__
    if cause is not None and str(cause).startswith("Error whilst parsing"):
      # A ValueError from the config file (e.g. an unknown preset): its text.
      original = cause.__context__ or cause
      message = f"{message.split(': Error whilst', 1)[0]}: {original}"
    return message.strip()
  if isinstance(e, OSError):  # The config file could not be loaded.
    reason = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    paths = [value for flag, value in zip(argv, argv[1:] + [""])
             if flag == "--config"] + [a.split("=", 1)[1] for a in argv
                                       if a.startswith("--config=")]
    return (f"--config={paths[-1] if paths else ''}: cannot load the config "
            f"file ({reason}).")
  message = _unknown_field(e, argv)  # --config.<path> the config lacks.
  if message is None:
    raise e  # A bug (e.g. in the config file), not a command-line mistake.
  return message


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  if _WORKDIR.value is None and config.mode != "aot_check":
    _exit_with("--workdir is required (except with --config.mode=aot_check).",
               2)
  try:
    distributed.initialize(config.get("distributed"))  # Before any jax use.
    modes.run(config, _WORKDIR.value or "")
  except preemption.Preempted as e:
    logging.warning("%s", e)  # Exit status 0: the scheduler may restart us.
  except errors.KdjaxError as e:
    if _traceback_wanted():
      raise
    _exit_with(str(e), 1)


def run() -> None:
  _choose_platforms()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
