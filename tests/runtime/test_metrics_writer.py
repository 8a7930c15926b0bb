"""metrics.jsonl across a resume: every step's records once, in order."""

from kdjax.runtime import metrics_writer


def _run(workdir, start_step, stop_step):
  writer = metrics_writer.MetricsWriter(workdir, total_steps=6,
                                        start_step=start_step)
  for step in range(start_step + 1, stop_step + 1):
    writer.write(step, "train", {"loss": float(step)})
    writer.text(step, metrics_writer.ROLLOUTS_TAG, [{"text": str(step)}])
  writer.close()


def test_a_resumed_run_rewrites_the_steps_after_its_checkpoint_once(
    tmp_path):
  """Killed after logging step 5, resumed from the checkpoint of step 4:
  step 5 is logged again, and is in the file once."""
  workdir = str(tmp_path)
  _run(workdir, 0, 5)
  _run(workdir, 4, 6)
  steps = [r["step"] for r in metrics_writer.read_metrics(workdir)]
  assert steps == [1, 2, 3, 4, 5, 6]
  with open(tmp_path / f"{metrics_writer.ROLLOUTS_TAG}.jsonl") as f:
    assert f.read().count('"step": 5,') == 1
