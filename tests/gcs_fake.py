"""A fake Cloud Storage backed by a local directory, for gs:// workdir tests.

`fake_gcs` (a pytest fixture: `from gcs_fake import fake_gcs` in a test
module) registers an fsspec filesystem for 'gs' that maps gs://BUCKET/PATH
to ROOT/BUCKET/PATH and answers like gcsfs: paths without 'gs://' in its
listings and walks, no append. Orbax's TensorStore array I/O is pointed at
the same local directory (gcs_utils.get_kvstore_for_gcs), and the bucket's
hierarchical-namespace lookup (a Cloud API call) answers 'no'. Used by
tests/e2e/test_gcs.py and tests/runtime/test_workdir.py.
"""

import os
import sys

import pytest
from etils import epath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem
from orbax.checkpoint._src.path import gcs_utils


class FakeGCS(DirFileSystem):
  """gs://BUCKET/PATH -> ROOT/BUCKET/PATH; lists 'BUCKET/PATH' names like gcsfs."""

  protocol = ("gs", "gcs")
  cachable = False  # A new ROOT per test.
  root = ""

  def __init__(self, *args, **kwargs):  # gcsfs options (finalize_on_close).
    del args, kwargs
    # No directories on GCS: writing a/b/c needs no a/b first.
    super().__init__(path=FakeGCS.root, fs=LocalFileSystem(auto_mkdir=True))

  def walk(self, path, *args, **kwargs):
    # gcsfs walks with fsspec's generic walk: top-down pruning works.
    yield from AbstractFileSystem.walk(self, path, *args, **kwargs)

  def open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError("Cloud Storage objects cannot be appended to")
    return super().open(path, mode=mode, **kwargs)


def clear_epath_cache():
  epath.backend._FileSystemSpecBackend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """The local directory that gs://... maps to."""
  root = tmp_path / "gcs"
  root.mkdir()
  monkeypatch.setattr(FakeGCS, "root", str(root))
  registry = sys.modules["fsspec.registry"]._registry  # pylint: disable=protected-access
  monkeypatch.setitem(registry, "gcs", FakeGCS)
  monkeypatch.setitem(registry, "gs", FakeGCS)

  def local_kvstore(path):
    bucket, rest = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": os.path.join(root, bucket, rest)}

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", local_kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled",
                      lambda path: False)
  clear_epath_cache()
  yield root
  clear_epath_cache()
