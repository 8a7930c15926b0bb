"""Entry point: python -m kdjax.main --config=configs/<file>.py[:preset] --workdir=DIR.

Any config field can be overridden: --config.distill.temperature=4.
"""

import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

from kdjax import distributed, modes, preemption

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


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  if _WORKDIR.value is None and config.mode != "aot_check":
    raise app.UsageError("--workdir is required.")
  distributed.initialize(config)  # Before anything touches jax devices.
  try:
    modes.run(config, _WORKDIR.value or "")
  except preemption.Preempted as e:
    logging.warning("%s", e)  # Exit status 0: the scheduler may restart us.


if __name__ == "__main__":
  app.run(main)
