"""Cached teacher outputs: build (resumable), encoding, refusals, and
distillation from the cache == online distillation when k = vocabulary."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import optax
import pytest

from kdjax import modes
from kdjax import validation
from kdjax.core import config as config_lib
from kdjax.core import defaults
from kdjax.data import lm
from kdjax.data import packing
from kdjax.data import text_sources
from kdjax.distill import step
from kdjax.distill import teacher_cache
from kdjax.run import cache_builder
from kdjax.run import tasks, train
from kdjax.runtime import checkpoint
from kdjax.weights import params as params_lib
from kdjax.weights import specs
from kdjax.weights import teachers as teachers_lib
from conftest import load_config
import word_tokenizer
from kdjax.models.partitioning import unbox

WORDS = tuple(f"w{i}" for i in range(40))
VOCAB = len(WORDS) + 2  # [UNK], <eos>, the words.
EOS = word_tokenizer.EOS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A text directory (train / validation files) and a word-level tokenizer."""
  root = tmp_path_factory.mktemp("cache_lm")
  source = root / "texts"
  rng = np.random.default_rng(0)
  counts = {"train": 0, "validation": 0, "test": 0}
  i = 0
  while counts["train"] < 8 or counts["validation"] < 1:
    name = f"doc{i}.txt"
    counts[text_sources.file_split(name)] += 1
    (source / name).parent.mkdir(parents=True, exist_ok=True)
    (source / name).write_text(" ".join(rng.choice(WORDS, size=60)))
    i += 1
  word_tokenizer.write(root / "tokenizer.json", WORDS)
  return root


def _llama(**fields):
  return dict(dict(name="llama", vocab_size=VOCAB, width=16, num_layers=1,
                   num_heads=2, num_kv_heads=1, head_dim=0, mlp_dim=24,
                   rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True,
                   max_length=16), **fields)


def _lm_config(corpus, workdir: str) -> ml_collections.ConfigDict:
  config = load_config("fashion_mnist")
  config.data = defaults.lm_data(
      name="text_directory", data_dir=str(corpus / "tfds"),
      source_dir=str(corpus / "texts"), input_key="text",
      tokenizer_path=str(corpus / "tokenizer.json"), seq_length=12,
      eos_id=EOS, train_split="train", eval_split="validation",
      train_fraction=1.0, subset_seed=0, max_eval_sequences=8,
      eval_batch_size=8, num_classes=0)
  config.teacher.model = ml_collections.ConfigDict(_llama(width=24,
                                                          num_layers=2))
  config.teacher.checkpoint_dir = os.path.join(workdir, "teacher")
  config.student.model = ml_collections.ConfigDict(_llama())
  # SGD: Adam's normalised update would turn float32 rounding of
  # near-zero gradients into lr-sized parameter differences.
  config.student.train.update(batch_size=8, num_steps=3, warmup_steps=0,
                              optimizer="sgd", learning_rate=0.5,
                              schedule="constant", loss_chunk_size=5)
  config.cache.update(k=VOCAB, dtype="float32", records_per_shard=8,
                      batch_size=8, chunk_size=5)
  config.cache.dir = os.path.join(workdir, "cache")
  config.checkpoint.every_steps = 100
  config.log_every_steps = 100
  config.eval_every_steps = 100
  return config


def _save_random_teacher(config, scale: float) -> None:
  """A random teacher as a kdjax checkpoint (step 1) at teacher.checkpoint_dir.

  Its output layer is scaled so its distribution is far from uniform.
  """
  model = specs.build_model(config, "teacher")
  params = params_lib.init(model, config.data, 7)
  last = "embed" if "embed" in params else sorted(params)[-1]
  params = dict(params, **{last: jax.tree.map(lambda x: x * scale,
                                              params[last])})
  state = step.create_train_state(params, optax.sgd(0.1), jax.random.key(0))
  data = tasks.for_config(config).train_iterator(
      global_batch_size=8, seed=0, augment=False)
  meta = {"model": specs.model_spec(config, "teacher"), "role": "teacher",
          "num_classes": int(config.data.num_classes)}
  with checkpoint.Checkpointer(config.teacher.checkpoint_dir,
                               save_every_steps=1, keep=1,
                               async_save=False) as ckpt:
    ckpt.save(1, state, data, meta)


def _run(config, mode, workdir, **changes):
  run = ml_collections.ConfigDict(config.to_dict())
  config_lib.set_fields(run, dict(mode=mode, **changes))
  return modes.run(run, workdir)


def _student_params(config, workdir):
  model = specs.build_model(config, "student")
  abstract = params_lib.abstract(model, config.data)
  return checkpoint.restore_params(workdir, abstract)


@pytest.fixture(scope="module")
def lm_runs(corpus, tmp_path_factory):
  """A trained tiny teacher checkpoint and its k = vocab float32 cache."""
  workdir = str(tmp_path_factory.mktemp("cache_runs"))
  config = _lm_config(corpus, workdir)
  _save_random_teacher(config, scale=60.0)
  manifest = _run(config, "cache_teacher", workdir)
  return config, workdir, manifest


def test_cached_distillation_equals_online_when_k_is_the_vocabulary(
    lm_runs, monkeypatch):
  config, workdir, manifest = lm_runs
  assert manifest["complete"] and manifest["k"] == VOCAB
  assert manifest["teacher"]["checkpoint_step"] == 1
  online_dir = os.path.join(workdir, "online")
  # Online through the direct token loss, cached through the chunked one
  # (the two paths are equal, tests/e2e/test_lm_train.py).
  online = _run(config, "distill", online_dir,
                **{"student.train.loss_chunk_size": 0})

  def no_teacher(*args, **kwargs):
    raise AssertionError("the teacher was loaded")
  monkeypatch.setattr(teachers_lib, "load_all", no_teacher)
  cached_dir = os.path.join(workdir, "cached")
  cached = _run(config, "distill", cached_dir,
                **{"distill.teacher_cache": config.cache.dir,
                   "teacher.checkpoint_dir": "/nonexistent/teacher"})
  assert "teacher cache" in cached["objective"]
  a = _student_params(config, online_dir)
  b = _student_params(config, cached_dir)
  init = params_lib.init(specs.build_model(config, "student"), config.data, 0)
  moved = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, init)
  assert max(jax.tree.leaves(moved)) > 1e-3  # Training changed the params.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4,
                                                       atol=1e-6), a, b)
  np.testing.assert_allclose(cached["eval"]["perplexity"],
                             online["eval"]["perplexity"], rtol=1e-4)


def test_records_hold_the_teacher_topk_in_order(lm_runs):
  config, _, manifest = lm_runs
  cache = teacher_cache.TeacherCache(config.cache.dir)
  packed = packing.packed_split(config.data, "train")
  assert manifest["records"] == packed.num_sequences
  assert manifest["num_shards"] == -(-packed.num_sequences // 8)
  rows = np.array([packed.num_sequences - 1, 0, 3])
  entries = cache.read(rows)
  assert entries["log_probs"].shape == (3, 12, VOCAB)
  assert entries["indices"].dtype == np.uint16
  # k = vocab: all of the distribution, descending, no tail left.
  probs = np.exp(entries["log_probs"].astype(np.float64))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert (np.diff(entries["log_probs"], axis=-1) <= 0).all()
  assert np.isneginf(entries["log_tail"]).all()
  np.testing.assert_array_equal(np.sort(entries["indices"], -1),
                                np.broadcast_to(np.arange(VOCAB), (3, 12, VOCAB)))
  # The same entries as the teacher computed here, in float64.
  model = specs.build_model(config, "teacher")
  inputs = packed.batch(rows)["inputs"]
  params = checkpoint.restore_params(
      config.teacher.checkpoint_dir,
      jax.eval_shape(lambda: unbox(model.init(jax.random.key(0), inputs)["params"])))
  logits = np.asarray(model.apply({"params": params}, inputs), np.float64)
  z = logits / config.distill.temperature
  log_p = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - z.max(-1, keepdims=True)
  np.testing.assert_allclose(
      np.take_along_axis(log_p, entries["indices"].astype(np.int64), -1),
      entries["log_probs"], atol=2e-5)
  assert np.exp(log_p.max(-1)).mean() > 5 / VOCAB  # Far from uniform.


def test_training_batches_carry_their_records_entries_and_resume(lm_runs):
  """The iterator reads entries by the batch's sequence indices; its
  checkpointed state restores batches and entries alike."""
  config, _, _ = lm_runs
  run = ml_collections.ConfigDict(config.to_dict())
  run.distill.teacher_cache = config.cache.dir
  cache = train.open_teacher_cache(run, "distill")
  packed = packing.packed_split(config.data, "train")
  ds = lm.lm_train_dataset(config.data, global_batch_size=4, seed=3,
                           teacher_cache=cache)
  it = iter(ds)
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  for batch in expected:  # Rows recovered from the inputs (all distinct).
    rows = [int(np.flatnonzero((packed.windows[:, :-1] == x).all(1))[0])
            for x in batch["inputs"]]
    entries = cache.read(np.array(rows))
    for key in ("log_probs", "indices", "log_tail"):
      np.testing.assert_array_equal(batch[teacher_cache.BATCH_KEY][key],
                                    entries[key])
  resumed = iter(ds)
  resumed.set_state(state)
  for batch in expected:
    jax.tree.map(np.testing.assert_array_equal, next(resumed), batch)


def test_interrupted_build_resumes_and_skips_finished_shards(
    lm_runs, monkeypatch, tmp_path):
  config, workdir, manifest = lm_runs
  config = ml_collections.ConfigDict(config.to_dict())
  config.cache.dir = str(tmp_path / "cache")
  real_write = cache_builder._write_shard  # pylint: disable=protected-access
  written = []

  def write_then_die(path, records):
    if len(written) == 2:
      raise KeyboardInterrupt("killed")
    written.append(os.path.basename(path))
    real_write(path, records)
  monkeypatch.setattr(cache_builder, "_write_shard", write_then_die)
  with pytest.raises(KeyboardInterrupt):
    _run(config, "cache_teacher", workdir)
  assert sorted(f for f in os.listdir(config.cache.dir)
                if f.endswith(".array_record")) == written
  assert not any(f.startswith(".") for f in os.listdir(config.cache.dir))
  with pytest.raises(config_lib.ConfigError, match="incomplete"):
    _run(config, "distill", str(tmp_path / "d"),
         **{"distill.teacher_cache": config.cache.dir})

  monkeypatch.setattr(cache_builder, "_write_shard", real_write)
  first = os.path.join(config.cache.dir, written[0])
  mtime = os.stat(first).st_mtime_ns
  os.remove(os.path.join(config.cache.dir, written[1]))  # A lost shard.
  resumed = _run(config, "cache_teacher", workdir)
  assert os.stat(first).st_mtime_ns == mtime  # Kept, not rewritten.
  assert resumed["complete"] and resumed["shards"] == manifest["shards"]
  for name in manifest["shards"]:  # Byte-identical to the uninterrupted build.
    with open(os.path.join(config.cache.dir, name), "rb") as f, open(
        os.path.join(lm_runs[0].cache.dir, name), "rb") as g:
      assert f.read() == g.read(), name


@pytest.mark.parametrize("field,value,message", [
    ("cache.k", 8, "k \\(config.cache.k\\) 42"),
    ("distill.temperature", 1.0, "temperature"),
    ("data.seq_length", 10, "seq_length"),
    ("data.eos_id", 0, "eos_id"),
    ("student.model.vocab_size", VOCAB + 1, "vocabulary size"),
    ("data.train_split", "validation", "split"),
])
def test_a_cache_for_other_settings_is_refused(lm_runs, tmp_path, field, value,
                                               message):
  config, _, _ = lm_runs
  run = ml_collections.ConfigDict(config.to_dict())
  config_lib.set_fields(run, {"mode": "distill", field: value,
                              "distill.teacher_cache": config.cache.dir})
  with pytest.raises(teacher_cache.CacheMismatchError, match=message):
    train.open_teacher_cache(run, "distill")


def test_other_tokenizer_or_text_is_refused(lm_runs, corpus, tmp_path):
  config, _, _ = lm_runs
  run = ml_collections.ConfigDict(config.to_dict())
  run.distill.teacher_cache = config.cache.dir
  other = tmp_path / "tokenizer.json"
  text = (corpus / "tokenizer.json").read_text()
  other.write_text(text.replace('"w0"', '"w00"'))  # Another vocabulary file.
  run.data.tokenizer_path = str(other)
  with pytest.raises(teacher_cache.CacheMismatchError, match="tokenizer"):
    train.open_teacher_cache(run, "distill")
  # Same tokenizer and sequence length, other text: the windows differ.
  run.data.tokenizer_path = config.data.tokenizer_path
  source = tmp_path / "texts"
  shutil.copytree(corpus / "texts", source)
  for path in sorted(source.iterdir()):
    if text_sources.file_split(path.name) == "train":
      path.write_text(path.read_text().replace("w1 ", "w2 "))
  run.data.source_dir = str(source)
  run.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(teacher_cache.CacheMismatchError,
                     match="packed training text|tfds dataset"):
    train.open_teacher_cache(run, "distill")


def test_unsupported_objectives_and_settings_are_refused(lm_runs):
  config, workdir, _ = lm_runs
  run = ml_collections.ConfigDict(config.to_dict())
  config_lib.set_fields(run, {"mode": "distill",
                              "distill.teacher_cache": config.cache.dir,
                              "distill.terms": (dict(name="jsd", weight=1.0),)})
  with pytest.raises(config_lib.ConfigError, match="jsd"):
    validation.validate(run, workdir)
  run.distill.terms = ()
  run.cache.dtype = "float16"
  with pytest.raises(config_lib.ConfigError, match="cache.dtype"):
    validation.validate(run, workdir)
  run.cache.dtype = "bfloat16"
  run.distill.teacher_cache = workdir  # No manifest there.
  with pytest.raises(config_lib.ConfigError, match="no teacher cache"):
    train.open_teacher_cache(run, "distill")


# The record format (encode/decode, bytes per token):
# tests/distill/test_teacher_cache_format.py.


@pytest.fixture(scope="module")
def digits_runs(data_dir, tmp_path_factory):
  """Digits (half the training set): a random CNN teacher checkpoint and its
  k = classes, float32 cache, 5 shards, written by this process."""
  config = load_config("digits", "tiny")
  workdir = str(tmp_path_factory.mktemp("cache_digits"))
  config_lib.set_fields(config, {
      "data.data_dir": data_dir, "data.train_fraction": 0.5,
      "teacher.checkpoint_dir": os.path.join(workdir, "teacher"),
      "cache.k": 10, "cache.dtype": "float32", "cache.records_per_shard": 150,
      "cache.batch_size": 64, "cache.dir": os.path.join(workdir, "cache")})
  config.student.train.update(num_steps=3, optimizer="sgd", warmup_steps=0,
                              schedule="constant", learning_rate=0.1)
  _save_random_teacher(config, scale=30.0)
  manifest = _run(config, "cache_teacher", workdir)
  return config, workdir, manifest


def test_classification_cache_matches_online_distillation(digits_runs):
  """Per-example records; k = classes, float32: the same student as online."""
  config, workdir, manifest = digits_runs
  assert manifest["records"] == 750 and manifest["num_shards"] == 5
  assert manifest["positions_per_record"] == 1
  online = _run(config, "distill", os.path.join(workdir, "online"))
  cached = _run(config, "distill", os.path.join(workdir, "cached"),
                **{"distill.teacher_cache": config.cache.dir,
                   "teacher.checkpoint_dir": "/nonexistent"})
  a = _student_params(config, os.path.join(workdir, "online"))
  b = _student_params(config, os.path.join(workdir, "cached"))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4,
                                                       atol=1e-6), a, b)
  assert cached["eval"]["accuracy"] == online["eval"]["accuracy"]
  # A smaller subset of the cached records is fine; a larger one is not.
  run = ml_collections.ConfigDict(config.to_dict())
  run.distill.teacher_cache = config.cache.dir
  run.data.train_fraction = 0.25
  assert train.open_teacher_cache(run, "distill") is not None
  run.data.train_fraction = 1.0
  with pytest.raises(teacher_cache.CacheMismatchError, match="not among"):
    train.open_teacher_cache(run, "distill")


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_write_the_cache_one_process_writes(digits_runs,
                                                          data_dir, tmp_path):
  """2 processes x 4 devices (process p writes shards p, p + 2, ...; in the
  last round process 1 has none) == 1 process x 8 devices."""
  config, _, one = digits_runs
  two_dir = str(tmp_path / "cache")
  overrides = {k: _get(config, k) for k in (
      "cache.k", "cache.dtype", "cache.records_per_shard", "cache.batch_size",
      "data.train_fraction", "teacher.checkpoint_dir")}
  overrides.update({"mode": "cache_teacher", "cache.dir": two_dir,
                    "data.data_dir": data_dir})
  command = ([sys.executable, "-m", "kdjax.main",
              "--config=configs/digits.py:tiny",
              f"--workdir={tmp_path}"]
             + [f"--config.{k}={v}" for k, v in overrides.items()])
  env = dict(os.environ, TFDS_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             KDJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
             KDJAX_NUM_PROCESSES="2")
  repo = str(pathlib.Path(__file__).resolve().parents[2])
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as f:  # Files, not pipes: neither process blocks.
      procs.append(subprocess.Popen(command, cwd=repo, stdout=f,
                                    stderr=subprocess.STDOUT,
                                    env=dict(env, KDJAX_PROCESS_ID=str(i))))
  try:
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = [log.read_text() for log in logs]
  assert codes == [0, 0], "\n---\n".join(o[-3000:] for o in outputs)
  assert "on 8 cpu device(s), 2 process(es)" in outputs[0]

  with open(os.path.join(two_dir, teacher_cache.MANIFEST)) as f:
    two = json.load(f)
  assert two["complete"] and two["shards"] == one["shards"]
  rows = teacher_cache.TeacherCache(config.cache.dir).record_indices
  a = teacher_cache.TeacherCache(config.cache.dir).read(rows)
  b = teacher_cache.TeacherCache(two_dir).read(rows)
  np.testing.assert_array_equal(a["indices"], b["indices"])
  np.testing.assert_allclose(a["log_probs"], b["log_probs"], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(a["log_tail"], b["log_tail"], rtol=1e-5,
                             atol=1e-6)
