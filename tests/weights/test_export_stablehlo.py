"""Students out as StableHLO (jax.export) and back in through kdjax.serve.

Tiny models of each input kind (an MLP on images, BERT and a BiLSTM on
MiniLM's WordPiece ids, a Llama on a word-level vocabulary) are exported,
loaded by kdjax.serve and run at two batch sizes (the batch is symbolic):
their logits equal the in-process `model.apply`'s, raw text is tokenized
exactly as kdjax's data pipeline tokenizes it, and the serialized function
is lowered for cpu and tpu. mode=export runs end to end on a finished digits
run, and kdjax.serve runs (CLI included) with kdjax's other modules and Flax
blocked from import.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys

import jax
from jax import export as jax_export
import ml_collections
import numpy as np
import pytest

from kdjax import models
from kdjax import modes
from kdjax import serve
from kdjax.core import config as config_lib
from kdjax.data import text as text_lib
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.runtime import checkpoint
from kdjax.weights import params as params_lib
from kdjax.weights import specs
from kdjax.weights.exporters import manifest as manifest_lib
from kdjax.weights.exporters import stablehlo
from kdjax.weights.importers import hf_bert
import word_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]
IMAGES = ml_collections.ConfigDict(dict(
    name="fashion_mnist_idx", input_shape=(28, 28, 1), input_scale=255.0,
    num_classes=10))
LABELS = tuple(f"class_{i}" for i in range(10))
TEXT_LENGTH = 16
REVIEWS = ["a gripping , funny film", "dull",
           "an overlong , muddled and " + "very " * 30 + "tedious mess"]
WORDS = "the cat sat on a mat and dog ran to red blue hat".split()
LM_LENGTH = 8
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


MANIFEST = manifest_lib.build_manifest(
    source_run="/runs/tiny", step=7, teacher="cnn teacher", objective="kl",
    eval_metrics={"accuracy": 0.5}, fmt="stablehlo")


def _random_params(model, data, seed):
  """Random float32 params of the model's shapes (norm scales near 1):
  drawn in numpy, no compiled init."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    value = rng.normal(0.0, 0.2, shape.shape)
    if str(getattr(path[-1], "key", "")) == "scale":
      value += 1.0
    return value.astype(np.float32)
  return jax.tree_util.tree_map_with_path(
      draw, params_lib.abstract(model, data))


def _reference(model, params, inputs):
  """The in-process model: what the export must reproduce."""
  return np.asarray(jax.jit(lambda p, x: model.apply(
      {"params": p}, x, train=False))(params, inputs))


def _batch_is_symbolic(predictor):
  dims = predictor.exported.in_avals[0].shape
  return jax_export.is_symbolic_dim(dims[0]) and all(
      isinstance(d, int) for d in dims[1:])


@pytest.fixture(name="mlp", scope="module")
def mlp_fixture(tmp_path_factory):
  """(model, params, export directory) of a tiny Fashion-MNIST MLP."""
  model = models.get_model("mlp", num_classes=10, hidden=(16,))
  params = _random_params(model, IMAGES, seed=0)
  directory = str(tmp_path_factory.mktemp("mlp"))
  stablehlo.export_stablehlo(directory, model, params, IMAGES,
                             label_names=LABELS, manifest=MANIFEST,
                             model_spec={"name": "mlp", "hidden": (16,)})
  return model, params, directory


def test_image_classifier_matches_the_model(mlp):
  model, params, directory = mlp
  predictor = serve.load(directory)
  assert _batch_is_symbolic(predictor)
  assert {"cpu", "tpu"} <= set(predictor.exported.platforms)
  rng = np.random.default_rng(0)
  for batch in (1, 5):
    images = rng.random((batch, 28, 28, 1), np.float32)
    np.testing.assert_allclose(predictor(images),
                               _reference(model, params, images), **TOLERANCE)
  # Raw pixels (uint8) are divided by input_scale, as the pipeline does.
  pixels = rng.integers(0, 256, (3, 28, 28, 1)).astype(np.uint8)
  want = _reference(model, params, pixels.astype(np.float32) / 255.0)
  got = predictor.predict(pixels, batch_size=2)
  np.testing.assert_allclose(got["logits"], want, **TOLERANCE)
  np.testing.assert_array_equal(got["classes"], want.argmax(-1))
  np.testing.assert_allclose(got["probabilities"].sum(-1), 1.0, rtol=1e-5)
  assert got["labels"] == [LABELS[c] for c in want.argmax(-1)]
  one = predictor.predict(pixels[0])  # One image, no batch axis.
  np.testing.assert_allclose(one["logits"], want[:1], **TOLERANCE)

  signature = predictor.signature
  assert signature["task"] == "image_classification"
  assert signature["inputs"] == [{"name": "images", "dtype": "float32",
                                  "shape": ["batch", 28, 28, 1]}]
  assert signature["outputs"][0]["shape"] == ["batch", 10]
  assert signature["label_names"] == list(LABELS)
  assert signature["preprocessing"]["input_scale"] == 255.0
  assert signature["tokenizer"] is None
  assert signature["model"] == {"name": "mlp", "hidden": [16]}
  assert manifest_lib.read_manifest(directory) == MANIFEST
  assert not os.path.exists(os.path.join(directory, "tokenizer.json"))


@pytest.mark.parametrize("name,fields", [
    ("bert", dict(vocab_size=30522, hidden_size=16, num_layers=2,
                  num_heads=2, intermediate_size=32,
                  max_position_embeddings=32)),
    ("lstm", dict(vocab_size=30522, embed_dim=8, hidden_size=8,
                  dense_features=8, bidirectional=True)),
])
def test_text_classifier_from_raw_text(name, fields, tmp_path):
  """Raw text through serve = kdjax's own tokenizer loader and
  kdjax.data.text.tokenize, then the model."""
  data = ml_collections.ConfigDict(dict(
      tokenizer_dir=hf_bert.minilm_dir(), max_length=TEXT_LENGTH,
      num_classes=2, name="rotten_tomatoes"))
  model = models.get_model(name, num_classes=2, **fields)
  params = _random_params(model, data, seed=1)
  stablehlo.export_stablehlo(str(tmp_path), model, params, data,
                             tokenizer_path=hf_bert.minilm_dir(),
                             label_names=("rotten", "fresh"))
  predictor = serve.load(str(tmp_path))
  assert _batch_is_symbolic(predictor)
  assert {"cpu", "tpu"} <= set(predictor.exported.platforms)
  ids = text_lib.tokenize(tokenizer_lib.load(hf_bert.minilm_dir()), REVIEWS,
                          TEXT_LENGTH, pad_id=0)["input_ids"]
  assert ids[2, -1] == 102 and ids[1, -1] == 0  # Cut at [SEP]; padded.
  got_ids, lengths = predictor.tokenize(REVIEWS)
  np.testing.assert_array_equal(got_ids, ids)
  np.testing.assert_array_equal(lengths, (ids != 0).sum(-1))
  want = _reference(model, params, ids)
  result = predictor.predict(REVIEWS)
  np.testing.assert_allclose(result["logits"], want, **TOLERANCE)
  assert result["labels"] == [("rotten", "fresh")[c]
                              for c in want.argmax(-1)]
  np.testing.assert_allclose(predictor(ids[:1]), want[:1], **TOLERANCE)
  # Token ids shorter than the exported length are padded with pad_id.
  np.testing.assert_allclose(predictor.predict(ids[1:2, :5])["logits"],
                             want[1:2], **TOLERANCE)
  signature = predictor.signature
  assert signature["inputs"] == [{"name": "token_ids", "dtype": "int32",
                                  "shape": ["batch", TEXT_LENGTH]}]
  assert signature["tokenizer"] == {
      "file": "tokenizer.json", "length": TEXT_LENGTH, "pad_id": 0,
      "add_special_tokens": True, "truncation": "right", "padding": "right"}


@pytest.fixture(name="lm", scope="module")
def lm_fixture(tmp_path_factory):
  """(model, params, tokenizer path, export directory) of a tiny Llama."""
  root = tmp_path_factory.mktemp("llama")
  tokenizer_path = word_tokenizer.write(root / "tokenizer.json", WORDS)
  data = ml_collections.ConfigDict(dict(seq_length=LM_LENGTH,
                                        tokenizer_path=tokenizer_path))
  model = models.get_model(
      "llama", vocab_size=len(WORDS) + 2, width=16, num_layers=2,
      num_heads=4, num_kv_heads=2, mlp_dim=32, max_length=16)
  params = _random_params(model, data, seed=2)
  directory = str(root / "export")
  stablehlo.export_stablehlo(directory, model, params, data,
                             tokenizer_path=tokenizer_path)
  return model, params, tokenizer_path, directory


def test_language_model_next_token(lm):
  model, params, tokenizer_path, directory = lm
  predictor = serve.load(directory)
  assert _batch_is_symbolic(predictor)
  assert {"cpu", "tpu"} <= set(predictor.exported.platforms)
  rng = np.random.default_rng(3)
  for batch in (2, 3):
    ids = rng.integers(0, len(WORDS) + 2, (batch, LM_LENGTH)).astype(np.int32)
    got = predictor(ids)
    assert got.shape == (batch, LM_LENGTH, len(WORDS) + 2)
    np.testing.assert_allclose(got, _reference(model, params, ids),
                               **TOLERANCE)

  texts = ["the cat sat", "a dog ran to the red hat on the blue mat and sat"]
  encoded = [e.ids for e in tokenizer_lib.load(tokenizer_path).encode_batch(
      texts, add_special_tokens=False)]
  assert len(encoded[1]) > LM_LENGTH  # Cut to its last LM_LENGTH tokens.
  padded = np.zeros((2, LM_LENGTH), np.int32)
  padded[0, :len(encoded[0])] = encoded[0]
  padded[1] = encoded[1][-LM_LENGTH:]
  result = predictor.predict(texts)
  want = _reference(model, params, padded)
  np.testing.assert_allclose(result["logits"][0],
                             want[0, len(encoded[0]) - 1], **TOLERANCE)
  np.testing.assert_allclose(result["logits"][1], want[1, -1], **TOLERANCE)
  # The next token after the short text alone: right padding changed nothing.
  alone = _reference(model, params, np.asarray(encoded[:1], np.int32))
  np.testing.assert_allclose(result["logits"][0], alone[0, -1], **TOLERANCE)
  tokenizer = tokenizer_lib.load(tokenizer_path)
  assert result["tokens"] == [tokenizer.id_to_token(int(c))
                              for c in result["classes"]]
  assert result["labels"] is None
  signature = predictor.signature
  assert signature["task"] == "language_modelling"
  assert signature["outputs"][0]["shape"] == ["batch", LM_LENGTH,
                                              len(WORDS) + 2]
  assert signature["tokenizer"]["add_special_tokens"] is False
  assert signature["tokenizer"]["truncation"] == "left"


def test_unlowerable_cuda_is_skipped_with_its_reason(mlp, tmp_path,
                                                     monkeypatch):
  model, params, _ = mlp
  real_export = jax_export.export

  def no_cuda(fn, *, platforms=None, **kwargs):
    if "cuda" in (platforms or ()):
      raise NotImplementedError("no CUDA lowering in this test")
    return real_export(fn, platforms=platforms, **kwargs)
  monkeypatch.setattr(jax_export, "export", no_cuda)
  written = stablehlo.export_stablehlo(str(tmp_path), model, params, IMAGES)
  assert written["platforms"] == ("cpu", "tpu")
  assert "no CUDA lowering" in written["skipped_platforms"]["cuda"]
  assert serve.load(str(tmp_path)).signature["skipped_platforms"] == (
      written["skipped_platforms"])
  with pytest.raises(stablehlo.ExportError, match="cannot export"):
    stablehlo.export_stablehlo(str(tmp_path / "x"), model, params, IMAGES,
                               platforms=("cuda",))


def test_refusals(mlp, tmp_path):
  model, params, directory = mlp
  with pytest.raises(stablehlo.ExportError, match="already holds"):
    stablehlo.export_stablehlo(directory, model, params, IMAGES)
  with pytest.raises(stablehlo.ExportError, match="distinct names"):
    stablehlo.export_stablehlo(str(tmp_path), model, params, IMAGES,
                               platforms=("cpu", "gpu"))
  with pytest.raises(stablehlo.ExportError, match="one name per class"):
    stablehlo.export_stablehlo(str(tmp_path), model, params, IMAGES,
                               label_names=("a", "b"))
  predictor = serve.load(directory)
  with pytest.raises(serve.ServeError, match="text given"):
    predictor.predict("a jumper")
  with pytest.raises(serve.ServeError, match=r"takes \[n, 28, 28, 1\]"):
    predictor(np.zeros((2, 28, 28), np.float32))
  with pytest.raises(serve.ServeError, match="no inputs"):
    predictor.predict([])
  with pytest.raises(serve.ServeError, match="no signature.json"):
    serve.load(str(tmp_path))


def test_serve_imports_no_kdjax_module():
  """serve.py names only jax, numpy, tokenizers and the standard library."""
  tree = ast.parse((REPO / "kdjax" / "serve.py").read_text())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      assert not node.level, "relative import in kdjax/serve.py"
      imported.add(node.module.split(".")[0])
  allowed = {"__future__", "argparse", "json", "os", "sys", "typing", "jax",
             "numpy", "tokenizers"}
  assert imported <= allowed, imported - allowed
  # The two sides of the format agree.
  assert serve.SIGNATURE_FILE == stablehlo.SIGNATURE_FILE
  assert serve.FORMAT_VERSION == stablehlo.FORMAT_VERSION
  assert serve.LANGUAGE_MODELLING in stablehlo.TASKS


BLOCKED_RUN = """
import importlib.abc, json, runpy, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    top = name.split(".")[0]
    if (name.startswith("kdjax.") and name != "kdjax.serve") or top in (
        "flax", "optax", "orbax", "grain", "tensorflow_datasets",
        "ml_collections", "tensorflow"):
      raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.argv = ["kdjax.serve"] + json.loads(sys.argv[1])
runpy.run_module("kdjax.serve", run_name="__main__")
"""


def test_cli_runs_without_the_training_code(mlp, lm, tmp_path):
  """python -m kdjax.serve with kdjax's other modules and Flax blocked."""
  model, params, directory = mlp
  pixels = np.random.default_rng(4).integers(0, 256, (3, 28, 28, 1))
  np.save(tmp_path / "images.npy", pixels.astype(np.uint8))
  lm_dir = lm[3]

  def run(args):
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, json.dumps(args)], cwd=REPO,
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]

  lines = run([directory, "--npy", str(tmp_path / "images.npy"),
               "--top_k", "2"])
  want = _reference(model, params, pixels.astype(np.float32) / 255.0)
  assert [line["class"] for line in lines] == list(want.argmax(-1))
  assert [line["label"] for line in lines] == [LABELS[c]
                                               for c in want.argmax(-1)]
  assert len(lines[0]["top"]) == 2
  lines = run([lm_dir, "--text", "the cat sat", "--text", "a dog"])
  assert [line["input"] for line in lines] == ["the cat sat", "a dog"]
  assert lines[0]["token"] in WORDS + ["[UNK]", "<eos>"]


def test_mode_export_end_to_end(digits_config, tmp_path):
  """A finished digits run -> mode=export stablehlo -> serve = the
  checkpoint's model; the manifest names the run."""
  config = digits_config
  config.mode = "scratch"
  config.student.train.num_steps = 2
  workdir = str(tmp_path / "run")
  summary = modes.run(config, workdir)
  config.mode = "export"
  config.export.format = "hf"
  with pytest.raises(config_lib.ConfigError, match="stablehlo"):
    modes.run(config, workdir)  # An MLP is not a Llama.
  config.export.update(format="stablehlo", platforms=("cpu", "cuda", "x"))
  with pytest.raises(config_lib.ConfigError, match="export.platforms"):
    modes.run(config, workdir)
  config.export.platforms = ("cpu", "tpu")
  result = modes.run(config, workdir)
  assert result["path"] == os.path.join(workdir, "export", "stablehlo")
  predictor = serve.load(result["path"])
  model = specs.build_model(config, "student")
  params = checkpoint.restore_params(
      workdir, params_lib.abstract(model, config.data))
  digits = np.random.default_rng(5).integers(0, 17, (4, 8, 8, 1))
  got = predictor.predict(digits)
  want = _reference(model, params, digits.astype(np.float32) / 16.0)
  np.testing.assert_allclose(got["logits"], want, **TOLERANCE)
  assert got["labels"] == [str(c) for c in want.argmax(-1)]
  assert tuple(predictor.exported.platforms) == ("cpu", "tpu")
  made_by = manifest_lib.read_manifest(result["path"])
  assert made_by["source_run"] == workdir
  assert made_by["format"] == "stablehlo"
  assert made_by["eval_metrics"] == summary["eval"]
  assert predictor.signature["model"]["name"] == "mlp"
