"""Faults injected into Orbax's checkpoint writer, for the resume tests.

In-process tests call `fail_background_save` / `delay_background_save`
directly. As a script it runs `python -m kdjax.main ARGS...` with a fault
armed, so a test can SIGKILL a process at a known moment:

    python tests/fault_injection.py --delay-save-of-step=10 -- --config=...

Orbax writes a step into a temporary directory in a background thread and
renames it to <step>/ when done; the delay holds that thread before it
starts waiting on the writes, so the step directory stays partial until the
process is killed.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time

from orbax.checkpoint._src.checkpointers import async_checkpointer

_ORIGINAL = async_checkpointer._background_wait_for_commit_futures  # pylint: disable=protected-access


def _is_step(directory, step: int) -> bool:
  name = os.path.basename(os.fspath(directory).rstrip("/"))
  return name.split(".", 1)[0] == str(step)


def fail_background_save(step: int, error: BaseException):
  """Makes the background write of `step` raise `error` (restore: call it
  with the returned function)."""
  def failing(directory, *args, **kwargs):
    if _is_step(directory, step):
      raise error
    return _ORIGINAL(directory, *args, **kwargs)
  async_checkpointer._background_wait_for_commit_futures = failing  # pylint: disable=protected-access
  return restore


def delay_background_save(step: int, seconds: float):
  """Holds the background write of `step` for `seconds` before it finishes."""
  def delayed(directory, *args, **kwargs):
    if _is_step(directory, step):
      print(f"fault_injection: holding the save of step {step}", flush=True)
      time.sleep(seconds)
    return _ORIGINAL(directory, *args, **kwargs)
  async_checkpointer._background_wait_for_commit_futures = delayed  # pylint: disable=protected-access
  return restore


def restore():
  async_checkpointer._background_wait_for_commit_futures = _ORIGINAL  # pylint: disable=protected-access


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--delay-save-of-step", type=int, required=True)
  parser.add_argument("--delay-seconds", type=float, default=600.0)
  parser.add_argument("main_args", nargs="*")
  args = parser.parse_args()
  delay_background_save(args.delay_save_of_step, args.delay_seconds)
  sys.argv = ["kdjax.main", *args.main_args]
  runpy.run_module("kdjax.main", run_name="__main__")


if __name__ == "__main__":
  main()
