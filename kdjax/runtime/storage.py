"""Workdir file I/O through etils.epath, so a workdir can be local or gs://.

Everything kdjax itself writes or reads under a workdir (run.json,
metrics.jsonl, TensorBoard events, the report, checkpoint bookkeeping) goes
through here; Orbax does its own I/O and takes gs:// paths as they are.
epath.Path handles local paths natively and gs:// with gcsfs
(`pip install 'kdjax[gcs]'`) or tf.io.gfile when TensorFlow is installed.

Paths stay strings (what configs, logs and Orbax take); helpers never call
os.path.abspath on a URL, which would turn gs://b/x into ./gs:/b/x.
"""

from __future__ import annotations

import contextlib
import json
import hashlib
import os
import posixpath
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator

from absl import logging
from etils import epath

# Object stores have no append and throttle rewrites of one object (GCS:
# about one per second), so growing files are staged locally and copied up
# at most this often, and on close.
SYNC_SECONDS = 30.0


def is_remote(path: str) -> bool:
  """True for URLs such as gs://bucket/dir, False for local paths."""
  return "://" in os.fspath(path)


def absolute(path: str) -> str:
  """Local: ~ expanded and absolute. URL: unchanged but for a trailing '/'."""
  path = os.fspath(path)
  if is_remote(path):
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{rest.rstrip('/')}"
  return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
  """os.path.join that keeps 'gs://' and lets a URL part restart the path."""
  result = os.fspath(base)
  for part in parts:
    part = os.fspath(part)
    if is_remote(part) or os.path.isabs(part):
      result = part
    elif is_remote(result):
      result = posixpath.join(result, part)
    else:
      result = os.path.join(result, part)
  return result


def relpath(path: str, start: str) -> str:
  """path relative to start; the full path when they are on different stores."""
  if is_remote(path) != is_remote(start):
    return path
  if not is_remote(path):
    return os.path.relpath(path, start)
  scheme, rest = path.split("://", 1)
  start_scheme, start_rest = start.split("://", 1)
  if scheme != start_scheme or rest.split("/")[0] != start_rest.split("/")[0]:
    return path
  return posixpath.relpath("/" + rest, "/" + start_rest)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def is_dir(path: str) -> bool:
  return epath.Path(path).is_dir()


def listdir(path: str) -> list[str]:
  """Entry names in a directory (object-store prefixes count as directories)."""
  return [p.name for p in epath.Path(path).iterdir()]


def file_size(path: str) -> int:
  return int(epath.Path(path).stat().length)


def remove(path: str) -> None:
  epath.Path(path).unlink()


def rename(source: str, target: str) -> None:
  """Renames a file or directory (on GCS: copies every object, then deletes)."""
  epath.Path(source).rename(target)


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A local temporary path to write `path` through; it appears complete or
  not at all (the one atomic-write helper).

  Local: the temporary file sits beside the target, is fsynced and renamed
  over it. Remote: it is written locally, then uploaded in one piece (object
  stores show an object only once its upload has finished).
  """
  remote = is_remote(path)
  directory = tempfile.gettempdir() if remote else os.path.dirname(
      os.path.abspath(path))
  if not remote:
    os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory,
                             prefix=f".{posixpath.basename(path)}.")
  os.close(fd)
  try:
    yield tmp
    if remote:
      with open(tmp, "rb") as f:
        epath.Path(path).write_bytes(f.read())
    else:
      with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file atomically (local or remote)."""
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def read_json(path: str, default: Any = None) -> Any:
  """The parsed file, or `default` when it does not exist."""
  p = epath.Path(path)
  if not p.exists():
    return default
  return json.loads(p.read_text())


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2))


def walk(top: str, skip: Callable[[str], bool] = lambda name: False
         ) -> Iterator[tuple[str, list[str], list[str]]]:
  """(dir, subdirs, files) under top, top-down; subdirs named skip(name) are pruned.

  epath's fsspec backend yields directories without their 'gs://' (fsspec
  strips the protocol), which would read as local relative paths; this puts
  it back.
  """
  top = absolute(top)
  scheme = top.split("://", 1)[0] + "://" if is_remote(top) else ""
  for root, dirs, files in epath.Path(top).walk():
    root = os.fspath(root)
    if scheme and not root.startswith(scheme):
      root = scheme + root.lstrip("/")
    dirs[:] = [d for d in dirs if not skip(d)]  # Pruned before descending.
    yield root, dirs, files


class StagedDir:
  """A local directory whose files are copied into a workdir directory.

  For a local target it is the target itself and sync() does nothing. For a
  remote one, files are written to a local temporary directory (they may be
  appended to, which object stores cannot do) and sync() uploads every file
  that changed since the last upload, at most every `min_interval` seconds
  unless forced. `fetch` names files to download first, so appending to them
  continues what an earlier run of the same workdir wrote.
  """

  def __init__(self, target: str, *, fetch: tuple[str, ...] = (),
               min_interval: float = SYNC_SECONDS):
    self.target = absolute(target)
    self.remote = is_remote(self.target)
    self._min_interval = min_interval
    self._last_sync = time.monotonic()
    self._uploaded: dict[str, tuple[int, int]] = {}
    if not self.remote:
      self.local = self.target
      os.makedirs(self.local, exist_ok=True)
      return
    self.local = tempfile.mkdtemp(prefix="kdjax-staging-")
    for name in fetch:
      source = epath.Path(join(self.target, name))
      if source.exists():
        with open(os.path.join(self.local, name), "wb") as f:
          f.write(source.read_bytes())
        self._uploaded[name] = self._key(name)

  def path(self, name: str) -> str:
    """Where to write `name` (a path relative to the target) locally."""
    return os.path.join(self.local, name)

  def _key(self, rel: str) -> tuple[int, int]:
    st = os.stat(os.path.join(self.local, rel))
    return st.st_size, st.st_mtime_ns

  def sync(self, force: bool = False) -> bool:
    """Uploads changed files; returns False if an upload failed (logged)."""
    if not self.remote:
      return True
    if not force and time.monotonic() - self._last_sync < self._min_interval:
      return True
    self._last_sync = time.monotonic()
    ok = True
    for root, _, files in os.walk(self.local):
      for name in files:
        rel = os.path.relpath(os.path.join(root, name), self.local)
        key = self._key(rel)
        if self._uploaded.get(rel) == key:
          continue
        try:
          with open(os.path.join(self.local, rel), "rb") as f:
            write_bytes(join(self.target, *rel.split(os.sep)), f.read())
          self._uploaded[rel] = key
        except Exception as e:  # pylint: disable=broad-except
          ok = False  # Retried at the next sync; training goes on.
          logging.warning("Could not copy %s to %s (%s: %s); will retry.",
                          rel, self.target, type(e).__name__, e)
    return ok

  def close(self) -> None:
    """Uploads what is left; keeps the local copy if that failed."""
    if not self.remote:
      return
    if self.sync(force=True):
      shutil.rmtree(self.local, ignore_errors=True)
    else:
      logging.error("Some files did not reach %s; they are in %s: copy them "
                    "there by hand (gcloud storage cp -r).", self.target,
                    self.local)


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
  """SHA-256 of a file, remembered per (path, size, mtime) in this process."""
  st = os.stat(path)
  key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
  if key not in _FILE_HASHES:
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
    _FILE_HASHES[key] = h.hexdigest()
  return _FILE_HASHES[key]
