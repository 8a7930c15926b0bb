"""workdir.check_workdir on gs:// URLs, against the fake Cloud Storage of
tests/gcs_fake.py (whole runs on a gs:// workdir: tests/e2e/test_gcs.py)."""

import sys

import pytest

from kdjax.runtime import storage
from kdjax.runtime import workdir as workdir_lib
from gcs_fake import FakeGCS, clear_epath_cache, fake_gcs  # pylint: disable=unused-import

WORKDIR = "gs://fake-bucket/run"


def test_check_workdir_probes_the_bucket(fake_gcs, monkeypatch):
  written = []
  write_text = storage.write_text
  monkeypatch.setattr(storage, "write_text",
                      lambda path, text: written.append(path) or write_text(
                          path, text))
  workdir_lib.check_workdir(WORKDIR)
  # A probe object was written in the workdir, and removed again.
  (probe,) = written
  assert probe.startswith(WORKDIR + "/.kdjax-write-probe-")
  assert not storage.exists(probe)
  assert not [f for f in fake_gcs.rglob("*") if f.is_file()]


@pytest.mark.parametrize("workdir,match", [
    ("s3://bucket/run", r"s3:// is not supported"),
    ("gs://", r"give a bucket and a path"),
    ("gs://bucket", r"give a bucket and a path"),
    ("gs:///run", r"give a bucket and a path"),
])
def test_check_workdir_refuses_bad_urls(fake_gcs, workdir, match):
  with pytest.raises(workdir_lib.WorkdirError, match=match):
    workdir_lib.check_workdir(workdir)


def test_check_workdir_says_to_install_the_gcs_extra(monkeypatch):
  """Without gcsfs, epath raises ImportError for gs://: the error says what to add."""
  registry = sys.modules["fsspec.registry"]._registry  # pylint: disable=protected-access
  monkeypatch.delitem(registry, "gcs", raising=False)
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs fails.
  clear_epath_cache()
  try:
    with pytest.raises(workdir_lib.WorkdirError,
                       match=r"needs gcsfs.*pip install -e '\.\[gcs\]'"):
      workdir_lib.check_workdir(WORKDIR)
  finally:
    clear_epath_cache()


def test_check_workdir_names_the_bucket_when_it_cannot_write(fake_gcs,
                                                             monkeypatch):
  def denied(self, *args, **kwargs):
    raise PermissionError("403 does not have storage.objects.create access")
  monkeypatch.setattr(FakeGCS, "open", denied)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"gs://fake-bucket exists.*roles/storage\.objectUser"):
    workdir_lib.check_workdir(WORKDIR)
