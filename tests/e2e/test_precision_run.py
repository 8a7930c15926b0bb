"""A short real run under the mixed-precision policy tracks float32: the
digits CNN teacher held and run in bfloat16, the MLP student computing in
bfloat16 over float32 parameters, distilled for 40 steps; its logged loss
curve stays within LOSS_TOLERANCE of the all-float32 run's at every logged
step, and its held-out accuracy within ACCURACY_TOLERANCE. (That every
matmul is bfloat16 and the losses float32: tests/models/test_precision.py.)
"""

import numpy as np

from kdjax import modes
from kdjax.runtime.metrics_writer import read_metrics
from kdjax.weights import specs

STEPS = 40
# Measured here (60 steps): the curves differ by at most 6e-4.
LOSS_TOLERANCE = 0.02
ACCURACY_TOLERANCE = 0.03


def _run(config, workdir, mixed: bool):
  config.mode = "distill"
  config.student.train.update(num_steps=STEPS, warmup_steps=5)
  config.log_every_steps = 10
  config.eval_every_steps = STEPS
  config.checkpoint.every_steps = STEPS
  if mixed:
    config.teacher.precision.update(params="bfloat16", compute="bfloat16")
    config.student.precision.update(params="float32", compute="bfloat16")
  assert specs.build_model(config, "student").dtype == (
      "bfloat16" if mixed else "float32")
  summary = modes.run(config, workdir)
  losses = {r["step"]: r["loss"] for r in read_metrics(workdir)
            if r["split"] == "train"}
  return losses, summary["eval"]["accuracy"]


def test_a_bfloat16_run_tracks_the_float32_one(digits_config, digits_teacher,
                                              tmp_path):
  digits_config.teacher.checkpoint_dir = digits_teacher
  f32_losses, f32_accuracy = _run(digits_config.copy_and_resolve_references(),
                                  str(tmp_path / "f32"), mixed=False)
  bf16_losses, bf16_accuracy = _run(digits_config, str(tmp_path / "bf16"),
                                    mixed=True)
  assert sorted(f32_losses) == sorted(bf16_losses) == list(range(10, STEPS + 1, 10))
  gaps = [abs(f32_losses[s] - bf16_losses[s]) for s in f32_losses]
  print(f"loss gaps {gaps}; accuracy {f32_accuracy:.4f} (f32) "
        f"vs {bf16_accuracy:.4f} (bf16)")
  assert max(gaps) < LOSS_TOLERANCE, (f32_losses, bf16_losses)
  assert abs(f32_accuracy - bf16_accuracy) < ACCURACY_TOLERANCE
  # It did train, and in another precision (not the same numbers).
  assert f32_losses[STEPS] < 0.8 * f32_losses[10]
  assert gaps != [0.0] * len(gaps)
