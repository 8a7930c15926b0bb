"""config.cache.store='logits': raw teacher logits in the cache (for logit
MSE, Tang et al. 2019), read back as the teacher's logits, so every term is
the online objective's (the whole pipeline on real reviews:
tests/e2e/test_text_distillation_pipeline.py)."""

import io
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdjax.core import defaults
from kdjax.core.config import ConfigError
from kdjax.distill import objectives
from kdjax.distill import teacher_cache
from kdjax.run import cache_builder

CLASSES = 3


def _write_cache(directory, rows, logits):
  """A finished 'logits' cache as cache_builder.build writes one."""
  dtype = teacher_cache.logits_record_dtype(1, CLASSES)
  raw = teacher_cache.encode_logits(rows, logits[:, None], dtype)
  shard = cache_builder.shard_name(0, 1)
  cache_builder._write_shard(str(directory / shard), raw)  # pylint: disable=protected-access
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(rows, np.int64))
  (directory / teacher_cache.INDICES_FILE).write_bytes(buffer.getvalue())
  manifest = {"format": teacher_cache.FORMAT, "store": "logits",
              "temperature": None, "k": CLASSES, "vocab_size": CLASSES,
              "positions_per_record": 1, "complete": True,
              "encoding": {"values": "float32"}, "shards": [shard],
              "data": {"task": "classification", "dataset": "d",
                       "split": "train", "num_records": 100}}
  (directory / teacher_cache.MANIFEST).write_text(json.dumps(manifest))


def test_records_round_trip_exactly(tmp_path):
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(5, CLASSES)) * 7 + 40).astype(np.float32)
  rows = np.array([3, 8, 9, 20, 41])
  _write_cache(tmp_path, rows, logits)
  cache = teacher_cache.TeacherCache(str(tmp_path))
  assert cache.store == "logits"
  entries = cache.read(np.array([9, 3]))
  assert set(entries) == {"logits"}
  np.testing.assert_array_equal(entries["logits"], logits[[2, 0]])  # Bits.
  with pytest.raises(KeyError, match=r"\[4\]"):
    cache.read(np.array([4]))


@pytest.mark.parametrize("terms, temperature", [
    (({"name": "mse", "weight": 1.0},), 2.0),
    (({"name": "kl", "weight": 0.7}, {"name": "ce", "weight": 0.3}), 3.0),
    (({"name": "jsd", "weight": 1.0, "beta": 0.5},), 1.0),
])
def test_the_objective_is_the_online_teachers(tmp_path, terms, temperature):
  """Teacher outputs from the cache strategy give the online objective's
  loss and terms, exactly: the logits' offset (which log-probs lose) kept."""
  rng = np.random.default_rng(1)
  teacher = (rng.normal(size=(4, CLASSES)) * 3 + 25).astype(np.float32)
  student = jnp.asarray(rng.normal(size=(4, CLASSES)), jnp.float32)
  labels = jnp.asarray([0, 2, 1, 1])
  _write_cache(tmp_path, np.arange(4), teacher)
  cache = teacher_cache.TeacherCache(str(tmp_path))
  distill = defaults.get_config().distill
  distill.terms = terms
  distill.temperature = temperature
  cached_objective = cache.objective(distill, total_steps=10)
  batch = jax.tree.map(jnp.asarray, cache.batch_entries(np.arange(4)))
  teachers = cache.strategy()({}, batch, capture_features=False,
                              vocab=CLASSES)
  assert teachers[0].topk is None
  np.testing.assert_array_equal(teachers[0].logits, teacher)
  online = objectives.distillation(distill, num_teachers=1, total_steps=10)
  step = jnp.asarray(0)
  got = cached_objective(objectives.ModelOutputs(student), teachers, labels,
                         step)
  want = online(objectives.ModelOutputs(student),
                [objectives.ModelOutputs(jnp.asarray(teacher))], labels, step)
  np.testing.assert_array_equal(got[0], want[0])
  assert got[1].keys() == want[1].keys()
  if terms[0]["name"] == "mse":  # The raw logits' offset counts.
    np.testing.assert_allclose(
        got[0], np.mean((np.asarray(student) - teacher) ** 2, -1), rtol=1e-6)


def test_the_check_ignores_temperature_and_k_for_logits(tmp_path,
                                                         monkeypatch):
  _write_cache(tmp_path, np.arange(4), np.zeros((4, CLASSES), np.float32))

  class Records:  # The split the cache was made from.
    def fingerprint(self):
      return {"num_records": 100}

  monkeypatch.setattr(teacher_cache, "records_for", lambda *a: Records())
  data = ml_collections.ConfigDict(dict(name="d", train_split="train"))
  cache = teacher_cache.TeacherCache(str(tmp_path))
  assert cache.manifest["temperature"] is None
  for temperature, k in ((1.0, 1), (4.0, CLASSES)):  # Any T, any k.
    cache.check(data, temperature=temperature, vocab=CLASSES, k=k,
                train_rows=np.arange(4))
  with pytest.raises(teacher_cache.CacheMismatchError, match="class count"):
    cache.check(data, temperature=1.0, vocab=CLASSES + 1, k=1,
                train_rows=np.arange(4))
  cache.store = "topk"  # The same manifest read as a top-k cache: refused.
  cache.manifest = dict(cache.manifest, temperature=2.0)
  with pytest.raises(teacher_cache.CacheMismatchError, match="temperature"):
    cache.check(data, temperature=1.0, vocab=CLASSES, k=CLASSES,
                train_rows=np.arange(4))


def test_validation_of_the_store():
  config = defaults.get_config()
  config.distill.teacher_cache = "/some/cache"
  config.distill.terms = ({"name": "mse", "weight": 1.0},)
  check = lambda **kw: teacher_cache.validate(
      config.cache, config.distill, mode="distill", student_augment=False,
      **kw)
  with pytest.raises(ConfigError, match="distill.terms"):  # top k: no MSE.
    check()
  config.cache.store = "logits"
  check()  # Raw logits serve it.
  with pytest.raises(ConfigError, match="cache.store"):
    check(language_model=True)
  config.cache.store = "probs"
  with pytest.raises(ConfigError, match="cache.store"):
    check()
