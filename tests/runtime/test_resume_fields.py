"""resume.describe_run: the fields a resumed run must keep (resuming real
runs, with faults: tests/e2e/test_resume.py)."""

from kdjax.runtime import resume
from conftest import load_config


def test_describe_run_keeps_what_a_mode_reads():
  config = load_config("digits", "tiny")
  config.mode = "teacher"
  fields = resume.describe_run(config)
  assert "teacher.train.optimizer" in fields and "seed" in fields
  assert not any(f.startswith(("student.", "checkpoint.", "pipeline."))
                 for f in fields)
  config.mode = "distill"
  fields = resume.describe_run(config)
  assert {"teacher.model.channels", "distill.temperature",
          "student.train.optimizer"} <= set(fields)
