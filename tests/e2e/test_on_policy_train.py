"""On-policy distillation end to end on the synthetic addition task
(configs/on_policy_addition.py:smoke): a tiny teacher trained here, then
students whose steps train on their own rollouts.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from kdjax import modes
from kdjax.core.config import ConfigError
from kdjax.run import train
from kdjax.runtime import checkpoint
from kdjax.weights import params as params_lib
from kdjax.weights import specs
from conftest import load_config


def _config(data_dir, teacher_dir="", **on_policy):
  config = load_config("on_policy_addition", "smoke")
  config.data.data_dir = data_dir
  config.mode = "distill"
  config.teacher.checkpoint_dir = teacher_dir
  # SGD: equalities below would hide a wrong gradient scale under Adam.
  config.student.train.update(optimizer="sgd", learning_rate=0.5)
  config.distill.on_policy.update(on_policy)
  return config


@pytest.fixture(scope="module")
def addition(tmp_path_factory):
  """(data dir, teacher checkpoint dir) of the smoke teacher."""
  root = tmp_path_factory.mktemp("addition")
  config = _config(str(root / "data"))
  config.mode = "teacher"
  modes.run(config, str(root / "teacher"))
  return str(root / "data"), str(root / "teacher")


def _params(config, workdir, step=4):
  shapes = params_lib.abstract(specs.build_model(config, "student"),
                               config.data)
  return checkpoint.restore_params(workdir, shapes, step=step)


def _assert_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def lmbda_zero_run(addition, tmp_path_factory):
  """(config, workdir, summary) of a finished lmbda=0 distill run."""
  data_dir, teacher = addition
  config = _config(data_dir, teacher, lmbda=0.0)
  workdir = str(tmp_path_factory.mktemp("lmbda0"))
  return config, workdir, train.train(config, workdir)


def test_lmbda_zero_is_off_policy_kd_bit_for_bit(lmbda_zero_run, tmp_path,
                                                 monkeypatch):
  """lmbda=0 trains on the data's completions through the rollout loop;
  the plain loop (no rollout machinery) gives the same student, bit for
  bit."""
  config, lmbda0, _ = lmbda_zero_run
  monkeypatch.setattr(train, "task_is_on_policy", lambda config: False)
  train.train(config, str(tmp_path / "plain"))
  before = params_lib.init(specs.build_model(config, "student"), config.data,
                           int(config.seed))
  after = _params(config, str(tmp_path / "plain"))
  assert max(float(np.abs(np.asarray(x) - y).max()) for x, y in zip(
      jax.tree.leaves(before), jax.tree.leaves(after))) > 1e-4
  _assert_equal(_params(config, lmbda0), after)
  assert not os.path.exists(os.path.join(lmbda0, "rollouts.jsonl"))


def test_on_policy_steps_agree_across_backends_and_meshes(addition, tmp_path):
  """lmbda=1: the student's rollouts (one key per example) and its steps are
  the same with shard_map and pmap on 8 devices and on a (2, 2, 2) mesh."""
  data_dir, teacher = addition
  results = {}
  for name, backend, mesh in (("shard_map", "shard_map", (8, 1, 1)),
                              ("pmap", "pmap", (8, 1, 1)),
                              ("sharded", "gspmd", (2, 2, 2))):
    config = _config(data_dir, teacher, lmbda=1.0)
    config.parallel.backend = backend
    config.parallel.mesh.update(dict(zip(("data", "fsdp", "model"), mesh)))
    workdir = str(tmp_path / name)
    summary = train.train(config, workdir)
    with open(os.path.join(workdir, "rollouts.jsonl")) as f:
      texts = [json.loads(line) for line in f]
    results[name] = (_params(config, workdir), texts, summary)
  reference, texts, summary = results["shard_map"]
  assert texts and texts[0]["step"] == 2
  assert summary["on_policy"]["sampling_seconds"] > 0
  assert 0 < summary["on_policy"]["sampling_fraction"] < 1
  for name in ("pmap", "sharded"):
    params, other_texts, _ = results[name]
    assert other_texts == texts, name
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5), params,
                 reference)


def test_a_resumed_run_draws_the_same_rollouts(addition, tmp_path):
  """lmbda=0.5: which steps are on-policy and what the student samples come
  from (seed, step, example), so a resumed run continues identically."""
  data_dir, teacher = addition
  config = _config(data_dir, teacher, lmbda=0.5)
  # Seed 2 draws data, student, student, data: a student step on each side
  # of the resume point (after step 2).
  config.seed = 2
  whole = str(tmp_path / "whole")
  train.train(config, whole)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(whole, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  summary = train.train(config, resumed)
  assert summary["resumed_from_step"] == 2
  _assert_equal(_params(config, resumed), _params(config, whole))


def test_sampled_reverse_kl_trains_on_own_samples_only(addition, tmp_path):
  data_dir, teacher = addition
  with pytest.raises(ConfigError, match="lmbda=1"):
    modes.run(_config(data_dir, teacher, loss="sampled_reverse_kl",
                      lmbda=0.5), str(tmp_path / "refused"))
  summary = modes.run(_config(data_dir, teacher, loss="sampled_reverse_kl",
                              lmbda=1.0), str(tmp_path / "srkl"))
  assert "sampled_reverse_kl" in summary["objective"]
  assert 0.0 <= summary["eval"]["exact_match"] <= 1.0


def test_mode_export_writes_what_kdjax_reimports(lmbda_zero_run, tmp_path):
  """mode=export on a finished distill run: the HF directory re-imports
  (kdjax's own importer) to the checkpoint's parameters, bit for bit, and
  its manifest names the run's objective and metrics. GGUF refuses the
  character tokenizer by name (llama.cpp has no pre-tokenizer for it)."""
  from kdjax.weights import pretrained  # pylint: disable=g-import-not-at-top
  from kdjax.weights.exporters import hf_llama, manifest  # pylint: disable=g-import-not-at-top
  config, run_dir, summary = lmbda_zero_run
  teacher_dir = config.teacher.checkpoint_dir
  config = config.copy_and_resolve_references()
  config.mode = "export"
  # The manifest names the teacher the run read, not the export config's.
  config.teacher.checkpoint_dir = ""
  config.export.update(format="hf", dir=str(tmp_path / "hf"))
  result = modes.run(config, run_dir)
  assert result["path"] == str(tmp_path / "hf")
  fields = specs.model_kwargs(config, "student")
  shapes = params_lib.abstract(specs.build_model(config, "student"),
                               config.data)
  imported = pretrained.load_pretrained(shapes, "llama:" + result["path"],
                                        model_fields=fields)
  _assert_equal(imported, _params(config, run_dir))
  made_by = manifest.read_manifest(result["path"])
  assert made_by["teacher"] == teacher_dir
  assert made_by["objective"] == summary["objective"]
  assert made_by["eval_metrics"]["exact_match"] == summary["eval"][
      "exact_match"]
  config.export.update(format="gguf", dir=str(tmp_path / "gguf"))
  with pytest.raises(hf_llama.ExportError, match="pre_tokenizer"):
    modes.run(config, run_dir)
