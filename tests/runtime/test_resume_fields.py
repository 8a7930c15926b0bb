"""resume.describe_run: the fields a resumed run must keep (resuming real
runs, with faults: tests/e2e/test_resume.py)."""

import pytest

from kdjax.runtime import checkpoint, resume
from conftest import load_config


def test_describe_run_keeps_what_a_mode_reads():
  config = load_config("digits", "tiny")
  config.mode = "teacher"
  fields = resume.describe_run(config)
  assert "teacher.train.optimizer" in fields and "seed" in fields
  assert not any(f.startswith(("student.", "checkpoint.", "pipeline.",
                               "export.", "report."))
                 for f in fields)
  config.mode = "distill"
  fields = resume.describe_run(config)
  assert {"teacher.model.channels", "distill.temperature",
          "student.train.optimizer"} <= set(fields)


def test_a_field_recorded_before_it_became_safe_is_not_compared():
  """A checkpoint written when export.* was still recorded resumes under a
  config with another export format; a changed read field is still named."""
  config = load_config("digits", "tiny")
  config.mode = "teacher"
  meta = {"config": resume.describe_run(config)}
  old = {"config": {**meta["config"], "export.format": "hf"}}
  config.export.format = "gguf"
  resume.check_same_run(old, {"config": resume.describe_run(config)}, "w")
  old["config"]["seed"] = 7
  with pytest.raises(checkpoint.CheckpointMismatchError, match="seed"):
    resume.check_same_run(old, {"config": resume.describe_run(config)}, "w")
