"""gs:// workdirs end to end, on a fake Cloud Storage backed by a local directory.

There is no GCS here. `fake_gcs` (tests/gcs_fake.py) registers an fsspec filesystem for 'gs'
that maps gs://BUCKET/PATH to ROOT/BUCKET/PATH and answers like gcsfs: paths
without 'gs://' in its listings and walks, no append. Everything kdjax reads
and writes through etils.epath (run.json, metrics.jsonl, TensorBoard events,
the report, checkpoint bookkeeping, the probe of check_workdir) then goes
through epath's real gs:// code path (its fsspec backend, as with gcsfs).

Orbax also takes the gs:// path as it is and runs its own GCS code path
(epath for its metadata, commit-file instead of rename, its GCS deleter);
only TensorStore's array I/O, which would speak HTTP to storage.googleapis.com,
is pointed at the same local directory (gcs_utils.get_kvstore_for_gcs), and
the bucket's hierarchical-namespace lookup (a Cloud API call) answers 'no'.
"""

import json
import os

import pytest
from etils import epath

from kdjax import modes
from kdjax.core import config as config_lib
from kdjax.run import train
from kdjax.runtime import checkpoint, metrics_writer, storage
from gcs_fake import fake_gcs  # pylint: disable=unused-import

WORKDIR = "gs://fake-bucket/run"


def test_fake_gcs_answers_like_gcsfs(fake_gcs):
  """The properties the rest relies on: URL paths, bare listings, no append."""
  path = epath.Path(WORKDIR) / "a" / "x.txt"
  path.write_text("x")
  assert (fake_gcs / "fake-bucket" / "run" / "a" / "x.txt").read_text() == "x"
  roots = [os.fspath(root) for root, _, _ in epath.Path(WORKDIR).walk()]
  assert roots[0] == "fake-bucket/run"  # Why kdjax.runtime.storage.walk exists.
  assert [r for r, _, _ in storage.walk(WORKDIR)] == [WORKDIR, WORKDIR + "/a"]
  with pytest.raises(NotImplementedError):
    path.open("a")


def test_gcs_workdir_end_to_end(fake_gcs, digits_config, caplog):
  """Teacher run, resume past a corrupt checkpoint, report, pipeline skip."""
  local = fake_gcs / "fake-bucket" / "run"
  teacher = WORKDIR + "/teacher"
  config = config_lib.set_fields(digits_config, {
      "mode": "teacher", "checkpoint.keep": 3})
  modes.run(config, teacher)

  # 1. Every file landed under the bucket's directory, none on local disk.
  assert not os.path.exists("gs:") and not os.path.exists("gs:/")
  summary = json.loads((local / "teacher" / "run.json").read_text())
  assert summary["steps"] == 6 and summary["role"] == "teacher"
  steps = [int(d) for d in os.listdir(local / "teacher" / "checkpoints")
           if d.isdigit()]
  assert sorted(steps) == [2, 4, 6]
  # Orbax took its GCS path: a commit file per step instead of a rename.
  assert (local / "teacher" / "checkpoints" / "6" / "commit_success.txt"
          ).exists()
  records = metrics_writer.read_metrics(teacher)
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
  assert [r["step"] for r in records if r["split"] == "eval"] == [3, 6]
  events = os.listdir(local / "teacher" / "tensorboard")
  assert len(events) == 1 and events[0].startswith("events.out.tfevents")
  assert checkpoint.read_meta(teacher)["role"] == "teacher"
  assert checkpoint.params_bytes(teacher) > 0

  # 2. The same command again, after the newest checkpoint went bad: the
  # damaged step is set aside (a rename on the bucket) and training resumes
  # from the one before, continuing metrics.jsonl. checkpoint.keep may
  # change on a resume; keeping 2 shows Orbax's GCS deleter at work.
  for f in (local / "teacher" / "checkpoints" / "6").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x13" * max(f.stat().st_size, 1))
  storage.remove(teacher + "/run.json")
  config.checkpoint.keep = 2
  with caplog.at_level("INFO"):
    modes.run(config, teacher)
  messages = [r.getMessage() for r in caplog.records]
  assert any("step 6" in m and "damaged" in m for m in messages), messages
  assert any("Resumed teacher from step 4" in m for m in messages), messages
  names = os.listdir(local / "teacher" / "checkpoints")
  assert any(n.startswith("6.unreadable-") for n in names), names
  assert {"4", "6"} <= set(names)
  assert "2" not in names  # checkpoint.keep=2: Orbax's GCS deleter ran.
  records = metrics_writer.read_metrics(teacher)
  # The first run's lines up to the restored step 4, then the resumed
  # run's: step 6 once.
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
  assert len(os.listdir(local / "teacher" / "tensorboard")) == 2
  summary = json.loads((local / "teacher" / "run.json").read_text())
  assert summary["steps"] == 6 and summary["resumed_from_step"] == 4

  # 3. The report of the workdir, written to the bucket.
  config.mode = "evaluate"
  report = modes.run(config, WORKDIR)
  assert report["teacher"]["run_dir"] == "teacher"
  assert report["teacher"]["checkpoint_bytes"] == checkpoint.params_bytes(
      teacher)
  on_disk = json.loads((local / "report.json").read_text())
  assert on_disk["teacher"]["accuracy"] == report["teacher"]["accuracy"]
  assert "kdjax report" in (local / "report.md").read_text()
  assert (local / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # 4. The pipeline's "already finished" check reads run.json on the bucket.
  def must_not_train(*args):
    raise AssertionError(f"trained again: {args}")
  with pytest.MonkeyPatch.context() as m:
    m.setattr(train, "train", must_not_train)
    assert modes._train_unless_done(config, teacher) == {}  # pylint: disable=protected-access


# check_workdir's probe and refusals on gs:// URLs: tests/runtime/test_workdir.py.
