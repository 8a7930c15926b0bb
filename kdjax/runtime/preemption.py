"""Preemption: on SIGTERM every process stops at the same step, saves, exits 0.

Spot and maintenance events on Cloud TPU send SIGTERM some seconds before the
VM goes away. The loop asks `Watcher.reached(step)` after every step; when it
says yes, the loop saves a checkpoint at that step and raises `Preempted`,
which main.py turns into exit status 0. Running the same command again
resumes from that checkpoint.

How the processes agree on the step:
  several processes  JAX's preemption sync manager (started by
                     jax.distributed.initialize). Its C++ handler catches
                     SIGTERM on any host, tells the coordination service, and
                     every host gets the same step (the largest step any host
                     had reached, plus one) from
                     multihost_utils.reached_preemption_sync_point, with no
                     collective on the training path. No Python handler is
                     installed: it would replace that one.
  one process        a Python SIGTERM handler sets a flag; the next step is
                     the agreed one.

Limits: a SIGTERM that arrives outside a training loop (e.g. during the final
evaluation or the report) is handled like a crash: the next run resumes from
the newest checkpoint.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preempted(Exception):
  """A checkpoint was saved at the agreed step; the process should exit 0."""

  def __init__(self, step: int, directory: str):
    super().__init__(
        f"Preempted (SIGTERM): saved the checkpoint at step {step} in "
        f"{directory}. Run the same command again to resume.")
    self.step = step
    self.directory = directory


class Watcher:
  """Answers, after each step, whether every process should stop here."""

  def __init__(self):
    self._multi_process = jax.distributed.is_initialized()
    self._requested = False
    self._previous = None
    self._installed = False
    if self._multi_process:
      return
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Training outside the main thread: SIGTERM will not "
                      "trigger a preemption checkpoint.")
      return
    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._installed = True

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._requested = True
    logging.warning("SIGTERM received: saving a checkpoint after this step.")

  def reached(self, step: int) -> bool:
    """True at the step where every process saves and stops. Call every step."""
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def close(self) -> None:
    """Gives SIGTERM back to the handler that was there before."""
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
