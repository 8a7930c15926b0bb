"""mode=aot_check against real runs: the compiled program is the step that
train.train runs (the compile-only checks: tests/entry/test_aot.py)."""

import jax
import numpy as np

from kdjax import aot, modes
from kdjax.data import pipeline
from kdjax.distill import parallel
from kdjax.run import train
from kdjax.runtime import checkpoint
from kdjax.weights import params as params_lib
from kdjax.weights import specs


def test_the_compiled_program_is_the_step_train_runs(digits_config, tmp_path):
  """On CPU devices: one step of aot.build_step's program == train.train's."""
  teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
  digits_config.mode = "teacher"
  digits_config.teacher.train.num_steps = 2
  modes.run(digits_config, teacher_dir)
  digits_config.mode = "distill"
  digits_config.teacher.checkpoint_dir = teacher_dir
  digits_config.student.train.update(num_steps=1, warmup_steps=0,
                                     schedule="constant")
  modes.run(digits_config, student_dir)

  mesh = parallel.make_mesh()
  plan = aot.build_step(digits_config, "distill", mesh, student_dir)
  teachers = train.build_step(digits_config, "distill", student_dir, mesh,
                             total_steps=1).teachers_params
  source = pipeline.get_source(digits_config.data, digits_config.data.train_split)
  batch = next(iter(pipeline.train_dataset(
      source, digits_config.data, seed=int(digits_config.seed),
      global_batch_size=digits_config.student.train.batch_size)))
  initial = parallel.replicate(plan.init_state(), mesh)
  before = jax.device_get(initial.params)
  state, _ = plan.program(initial, parallel.shard_batch(batch, mesh), teachers)

  model = specs.build_model(digits_config, "student")
  trained = checkpoint.restore_params(
      student_dir, params_lib.abstract(model, digits_config.data))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               jax.device_get(state.params), jax.device_get(trained))
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))))
