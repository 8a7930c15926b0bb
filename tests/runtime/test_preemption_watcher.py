"""preemption.Watcher in this process (a real SIGTERM to a training process:
tests/e2e/test_preemption.py)."""

import os
import signal

from kdjax.runtime import preemption


def test_watcher_in_one_process_flags_sigterm_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Watcher() as watcher:
    assert not watcher.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.reached(2)
  assert signal.getsignal(signal.SIGTERM) == before
