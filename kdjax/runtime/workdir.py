"""The workdir is checked writable before any compile, not at the first save."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid

from kdjax.core.config import ConfigError
from kdjax.runtime import storage


class WorkdirError(ConfigError):
  """The workdir cannot be created or written."""


def check_workdir(workdir: str) -> None:
  """Creates the workdir and writes a probe file: fails now, not at the first save."""
  if storage.is_remote(workdir):
    _check_remote_workdir(workdir)
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise WorkdirError(
        f"--workdir={workdir!r} cannot be written ({type(e).__name__}: "
        f"{e.strerror or e}). Pass a directory you can write, e.g. "
        "--workdir=$HOME/kdjax_runs/<name>.") from None


def _check_remote_workdir(workdir: str) -> None:
  """gs://BUCKET/PATH only; creates and removes a probe object in it."""
  scheme, rest = workdir.split("://", 1)
  if scheme != "gs":
    raise WorkdirError(
        f"--workdir={workdir!r}: {scheme}:// is not supported; use a local "
        "directory or a Cloud Storage path gs://BUCKET/PATH.")
  bucket = rest.split("/", 1)[0]
  if not bucket or not rest[len(bucket):].strip("/"):
    raise WorkdirError(
        f"--workdir={workdir!r}: give a bucket and a path in it, e.g. "
        "--workdir=gs://BUCKET/kdjax/<name>.")
  # Unique per process: on several hosts each checks its own credentials.
  probe = storage.join(workdir, f".kdjax-write-probe-{socket.gethostname()}-"
                       f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    storage.write_text(probe, "")
    storage.remove(probe)
  except ImportError as e:  # epath without gcsfs (or tensorflow) for gs://.
    raise WorkdirError(
        f"--workdir={workdir!r}: reading and writing gs:// needs gcsfs, which "
        f"is not installed ({e}). Install kdjax with its GCS extra: "
        "pip install -e '.[gcs]' (or pip install gcsfs).") from None
  except Exception as e:  # pylint: disable=broad-except
    raise WorkdirError(
        f"--workdir={workdir!r} cannot be written: writing and deleting {probe} "
        f"failed ({type(e).__name__}: {str(e)[:300]}). Check that bucket "
        f"gs://{bucket} exists and that this machine's credentials may "
        "create and delete objects in it (on a TPU VM: its service account "
        "needs e.g. roles/storage.objectUser on the bucket), or pass another "
        "--workdir.") from None
