"""Cached teacher outputs: run the frozen teacher once, distill from its top k.

Why: the teacher's forward pass is most of a distillation step,
and the student needs only the top of the teacher's distribution. A full
distribution is too large to keep at LM vocabularies (49,152 floats per
token), so the cache keeps, per token (language models) or per example
(classification), the teacher's k largest log-probabilities at temperature T,
their indices and the exact log of the remaining (tail) mass: the k + 1
buckets of `losses.topk_kl_from_cache`. With k = vocabulary size and float32
storage that loss is the full forward KL, so a cached run trains the same
student as an online one (tested).

mode='cache_teacher' (kdjax.run.cache_builder.build) runs config.teacher over config.cache.split
(default: the training split, its config.data.train_fraction subset),
data-parallel over every device of every process, in order, and writes
config.cache.dir (default WORKDIR/teacher_cache):

    manifest.json              what the cache was made from (checked on use)
    record_indices.npy         int64 [N]: the split's record (sequence or
                               example) indices cached, ascending
    topk-SSSSS-of-TTTTT.array_record   shards of records_per_shard records

Shards are array_record files (group_size:1: random access through
grain.sources.ArrayRecordDataSource or tfds), record i of the concatenated
shards is record_indices[i]. Shard s is written by process s % P, to a
temporary file renamed into place when complete, so a restarted build skips
every finished shard. Each record is one fixed-width little-endian entry
(numpy `record_dtype`), n = positions per record (seq_length for LMs, 1 for
classification):

    uint64           record index in the split (checked on read)
    n x k  values    log softmax(teacher / T), descending per position;
                     bfloat16 bits (uint16) or float32 (config.cache.dtype)
    n x k  indices   their vocabulary ids: uint16 if vocab <= 65,536 else int32
    n      float32   log tail mass log(1 - sum of the k probabilities),
                     computed exactly in log space (-inf when k = vocab)

At k = 64, bfloat16, uint16: 64 * 2 + 64 * 2 + 4 = 260 bytes per token, plus
8 bytes per record and array_record's framing (a fixed ~64-128 KiB per shard,
hence shards of a few MB); array_record's zstd then shrinks real entries
(by how much on real data: benchmarks/cached_teacher.py).

`distill` with config.distill.teacher_cache = <dir> never loads a teacher:
the training loop opens it with `open_checked`, which checks the manifest
against the config (dataset, split,
packed text, tokenizer, vocabulary, k, temperature, seq_length; any mismatch
is refused naming it), the training iterator reads each batch's cached
entries by the same record indices it reads the data by (kdjax.data: the
grain iterator and its checkpointed state are unchanged), and and `CachedTeachers` is the step's teacher strategy: it hands
them over as the teacher's outputs (objectives.TeacherTopK), so config.distill's
own objective turns every kl term into the top-k KL with a tail bucket
(alpha * T^2 * KL_topk + (1 - alpha) * CE by default); for LMs through
kdjax.distill.token_loss's chunked path, which passes per-token teacher
entries through chunk by chunk.

Raw logits (config.cache.store = 'logits', classification only): each
record is the uint64 record index and the teacher's n x C float32 logits
(C = classes), no temperature applied, nothing dropped. Log-probabilities
lose the logits' offset, which a logit-matching loss ('mse', Tang et al.
2019's best) needs; and raw logits serve every output term at any T, exactly
as the online teacher would (the cache's manifest then has "store": "logits"
and temperature null, and a run reading it is checked for everything above
but T and k). `CachedTeachers` hands them over as the teacher's logits, so
the objective is config.distill's own, unchanged.

This module is the cache's format, settings, reader and step strategy;
kdjax.run.cache_builder writes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
from typing import Any, Sequence

from etils import epath
import jax
import ml_dtypes
import numpy as np
from jax import lax

from kdjax.core.config import ConfigError, fail
from kdjax.data import lm as lm_data
from kdjax.data import packing
from kdjax.data import pipeline
from kdjax.distill import objectives
from kdjax.distill.objectives import ModelOutputs, TeacherTopK
from kdjax.runtime import storage

FORMAT = "kdjax.teacher_cache/1"
MANIFEST = "manifest.json"
INDICES_FILE = "record_indices.npy"
BATCH_KEY = "teacher_topk"  # The batch entry holding the cached entries.
# One record per chunk (random access); zstd (array_record's default).
WRITER_OPTIONS = "group_size:1"
VALUE_DTYPES = ("bfloat16", "float32")
# What a record holds (config.cache.store, an optional field): the top k at
# T, or (classification) the raw logits.
STORE_TOPK, STORE_LOGITS = "topk", "logits"
STORES = (STORE_TOPK, STORE_LOGITS)
# Distillation terms a cache can serve: the top-k KL with its tail bucket
# (forward KL when k = vocab) and the task loss.
CACHED_TERMS = ("kl", "forward_kl", "topk_kl", objectives.TASK_TERM)


class CacheMismatchError(ConfigError):
  """A teacher cache was made for another dataset/tokenizer/vocab/k/T."""


def settings(cache_config) -> dict[str, Any]:
  """config.cache as a plain dict (its fields: kdjax/core/defaults.py)."""
  return dict(cache_config)


def store_of(cache_settings: dict[str, Any]) -> str:
  """config.cache.store ('topk' when absent)."""
  return cache_settings.get("store", STORE_TOPK) or STORE_TOPK


def cache_dir(cache_settings: dict[str, Any], workdir: str) -> str:
  return cache_settings["dir"] or storage.join(workdir, "teacher_cache")


def enabled(distill_config) -> bool:
  """distill reads a cache (config.distill.teacher_cache) instead of a teacher."""
  return bool(distill_config.teacher_cache)


def validate(cache_config, distill_config, *, mode: str,
             student_augment: bool, language_model: bool = False) -> None:
  """Raises ConfigError naming a bad config.cache / distill.teacher_cache
  setting (modes cache_teacher and distill from a cache only)."""
  using = mode == "distill" and enabled(distill_config)
  if mode != "cache_teacher" and not using:
    return
  s = settings(cache_config)
  store = store_of(s)
  if store not in STORES:
    fail("cache.store", store, f"allowed: {STORES}")
  if store == STORE_LOGITS and language_model:
    fail("cache.store", store, "raw logits are for classification (a few "
         "classes); a language model's cache keeps the top k ('topk')")
  k = s["k"]
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    fail("cache.k", k, "must be an int >= 1 (entries kept per token; more "
         "than the vocabulary/classes means all of them)")
  if s["dtype"] not in VALUE_DTYPES:
    fail("cache.dtype", s["dtype"], f"allowed: {VALUE_DTYPES}")
  if s["records_per_shard"] < 1:
    fail("cache.records_per_shard", s["records_per_shard"], "must be >= 1")
  if s["chunk_size"] < 0:
    fail("cache.chunk_size", s["chunk_size"],
         "must be >= 0 (positions per LM-head chunk; 0 = all at once)")
  batch = s["batch_size"]
  if batch < 0 or (batch and batch % jax.device_count()):
    fail("cache.batch_size", batch, f"must be 0 (the student's batch size) "
         f"or a positive multiple of the device count ({jax.device_count()})")
  if distill_config.extra_teachers:
    fail("distill.extra_teachers", distill_config.extra_teachers,
         "a teacher cache holds one teacher (config.teacher); leave it empty")
  if using:
    if student_augment:
      fail("student.train.augment", True,
           "a teacher cache holds the teacher's outputs on un-augmented "
           "inputs; distilling from it needs augment=False")
    if distill_config.features:
      fail("distill.features", distill_config.features,
           "feature terms need the teacher's activations, which a cache "
           "does not hold")
    if store == STORE_TOPK:  # Raw logits serve every output term.
      cached_objective_terms(distill_config)  # Raises on an unsupported term.


def vocab_size(data_config, model_config) -> int:
  """Classes (classification) or the model's vocabulary (LM)."""
  if pipeline.is_language_modelling(data_config):
    return int(model_config.get("vocab_size", 0))
  return int(data_config.num_classes)


def effective_k(k: int, vocab: int) -> int:
  """config.cache.k, at most the vocabulary (then: the whole distribution)."""
  return min(int(k), int(vocab))


def index_dtype(vocab: int) -> np.dtype:
  return np.dtype("<u2") if vocab <= 65536 else np.dtype("<i4")


def record_dtype(positions: int, k: int, value_dtype: str,
                 indices_dtype: str) -> np.dtype:
  """The fixed-width record layout (module docstring), packed, little-endian."""
  values = "<u2" if value_dtype == "bfloat16" else "<f4"
  return np.dtype([("record", "<u8"),
                   ("log_probs", values, (positions, k)),
                   ("indices", np.dtype(indices_dtype).str, (positions, k)),
                   ("log_tail", "<f4", (positions,))])


def logits_record_dtype(positions: int, classes: int) -> np.dtype:
  """The layout of a 'logits' cache record: index, float32 logits."""
  return np.dtype([("record", "<u8"), ("logits", "<f4", (positions, classes))])


def encode_logits(records: np.ndarray, logits: np.ndarray,
                  dtype: np.dtype) -> list[bytes]:
  """Rows [n, positions, C] of raw logits -> one serialized record per row."""
  out = np.zeros(len(records), dtype)
  out["record"] = records
  out["logits"] = np.asarray(logits, np.float32).reshape(out["logits"].shape)
  data, size = out.tobytes(), dtype.itemsize
  return [data[i * size:(i + 1) * size] for i in range(len(records))]


def encode(records: np.ndarray, log_probs: np.ndarray, indices: np.ndarray,
           log_tail: np.ndarray, dtype: np.dtype) -> list[bytes]:
  """Rows [n, positions, ...] -> one serialized record (bytes) per row."""
  out = np.zeros(len(records), dtype)
  out["record"] = records
  values = np.asarray(log_probs)
  if dtype["log_probs"].base == np.dtype("<u2"):  # bfloat16 bits.
    values = values.astype(ml_dtypes.bfloat16).view(np.uint16)
  out["log_probs"] = values.reshape(out["log_probs"].shape)
  out["indices"] = np.asarray(indices).reshape(out["indices"].shape)
  out["log_tail"] = np.asarray(log_tail, np.float32).reshape(
      out["log_tail"].shape)
  data, size = out.tobytes(), dtype.itemsize
  return [data[i * size:(i + 1) * size] for i in range(len(records))]


def decode(raw: Sequence[bytes], dtype: np.dtype) -> dict[str, np.ndarray]:
  """Serialized records -> {'record', 'log_probs', 'indices', 'log_tail'}
  (or {'record', 'logits'} for a 'logits' cache)."""
  rows = np.frombuffer(b"".join(raw), dtype)
  if "logits" in dtype.names:
    return {"record": rows["record"].astype(np.int64),
            "logits": np.ascontiguousarray(rows["logits"])}
  values = np.ascontiguousarray(rows["log_probs"])
  if dtype["log_probs"].base == np.dtype("<u2"):
    values = values.view(ml_dtypes.bfloat16)
  return {"record": rows["record"].astype(np.int64), "log_probs": values,
          "indices": np.ascontiguousarray(rows["indices"]),
          "log_tail": np.ascontiguousarray(rows["log_tail"])}


# ----------------------------------------------------------------------------
# What a task caches: its records, their inputs and its fingerprint.
# ----------------------------------------------------------------------------


class Records:
  """The records of one split: inputs by index and what identifies them."""
  positions: int  # Per record: seq_length (LM) or 1 (classification).
  num_records: int  # In the whole split.

  def inputs(self, rows: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def default_subset(self) -> np.ndarray:
    """The indices cached by default (the training subset, all hosts)."""
    raise NotImplementedError

  def fingerprint(self) -> dict[str, Any]:
    raise NotImplementedError


class _LMRecords(Records):
  """Packed sequences (kdjax.data.lm): one record per sequence."""

  def __init__(self, data_config, split: str):
    self._data, self._split = data_config, split
    self._packed = packing.packed_split(data_config, split)
    self.positions = self._packed.seq_length
    self.num_records = self._packed.num_sequences

  def inputs(self, rows):
    return self._packed.batch(rows)["inputs"]

  def default_subset(self):
    if self._split != self._data.train_split:
      return np.arange(self.num_records)
    return lm_data.train_sequence_indices(self.num_records, self._data)

  def fingerprint(self):
    data = self._data
    windows = np.ascontiguousarray(self._packed.windows, "<i4")
    tokenizer = packing.tokenizer_file(data.tokenizer_path)
    return {"task": "language_modelling", "dataset": data.name,
            "tfds_name": self._packed.stats.get("dataset", ""),
            "split": self._split, "num_records": self.num_records,
            "seq_length": self.positions,
            "eos_id": int(self._packed.stats.get("eos_id", -1)),
            "tokenizer_sha256": storage.file_sha256(tokenizer),
            "windows_sha256": hashlib.sha256(windows.tobytes()).hexdigest()}


class _ClassificationRecords(Records):
  """Examples of a tfds split: one record per example."""

  positions = 1

  def __init__(self, data_config, split: str):
    self._data, self._split = data_config, split
    self._source = pipeline.get_source(data_config, split)
    self._read = pipeline.ReadBatch(self._source, data_config)
    self.num_records = len(self._source)

  def inputs(self, rows):
    return self._read.map(np.asarray(rows))["inputs"]

  def default_subset(self):
    if self._split != self._data.train_split:
      return np.arange(self.num_records)
    return pipeline.train_subset(self.num_records, self._data)

  def fingerprint(self):
    data = self._data
    info = getattr(self._source, "dataset_info", None)
    tokenizer = ""
    if pipeline.is_text(data):
      tokenizer = storage.file_sha256(os.path.join(data.tokenizer_dir,
                                                   "tokenizer.json"))
    return {"task": "classification", "dataset": data.name,
            "tfds_name": info.full_name if info is not None else "",
            "split": self._split, "num_records": self.num_records,
            "input_key": data.input_key, "input_scale":
                float(data.get("input_scale", 1.0)),
            "max_length": int(data.get("max_length", 0) or 0),
            "tokenizer_sha256": tokenizer}


def records_for(data_config, split: str) -> Records:
  """The records of `split` a cache holds: sequences (LM) or examples."""
  if pipeline.is_language_modelling(data_config):
    return _LMRecords(data_config, split)
  return _ClassificationRecords(data_config, split)


# ----------------------------------------------------------------------------
# Reading the cache (distill with config.distill.teacher_cache).
# ----------------------------------------------------------------------------


class TeacherCache:
  """A finished cache: random access to the entries of given record indices.

  Picklable (grain may copy the transform that holds it into workers).
  """

  def __init__(self, directory: str):
    self.directory = directory
    manifest = storage.read_json(storage.join(directory, MANIFEST))
    if manifest is None:
      raise ConfigError(
          f"config.distill.teacher_cache={directory!r} holds no teacher "
          f"cache ({MANIFEST} missing); make one with --config.mode="
          f"cache_teacher --config.cache.dir={directory}.")
    if manifest.get("format") != FORMAT:
      raise CacheMismatchError(
          f"{directory!r}: cache format {manifest.get('format')!r}, this "
          f"kdjax reads {FORMAT!r}; rebuild it with mode=cache_teacher.")
    if not manifest.get("complete"):
      raise ConfigError(
          f"config.distill.teacher_cache={directory!r} is incomplete (an "
          "interrupted mode=cache_teacher run); run mode=cache_teacher "
          "again with the same config to finish it (finished shards are "
          "kept).")
    self.manifest = manifest
    self.record_indices = np.load(io.BytesIO(
        epath.Path(storage.join(directory, INDICES_FILE)).read_bytes()))
    enc = manifest["encoding"]
    self.store = manifest.get("store", STORE_TOPK)
    if self.store == STORE_LOGITS:
      self._dtype = logits_record_dtype(manifest["positions_per_record"],
                                        manifest["vocab_size"])
    else:
      self._dtype = record_dtype(manifest["positions_per_record"],
                                 manifest["k"], enc["values"],
                                 np.dtype(enc["indices"]).str)
    self._per_token = manifest["data"]["task"] == "language_modelling"
    self._source = None

  @property
  def k(self) -> int:
    return int(self.manifest["k"])

  def _open(self):
    if self._source is None:
      import grain  # pylint: disable=g-import-not-at-top
      self._source = grain.sources.ArrayRecordDataSource(
          [storage.join(self.directory, f) for f in self.manifest["shards"]])
    return self._source

  def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Entries of split records `rows`: log_probs, indices [n, (L,) k],
    log_tail [n, (L)]; or logits [n, C] ('logits' store)."""
    rows = np.asarray(rows, np.int64)
    keys = np.searchsorted(self.record_indices, rows)
    keys = np.minimum(keys, len(self.record_indices) - 1)
    if not np.array_equal(self.record_indices[keys], rows):
      missing = rows[self.record_indices[keys] != rows]
      raise KeyError(f"Records {missing[:8].tolist()} are not in the teacher "
                     f"cache {self.directory!r}.")
    entries = decode(self._open().__getitems__(keys.tolist()), self._dtype)
    if not np.array_equal(entries.pop("record"), rows):
      raise ValueError(f"The teacher cache {self.directory!r} is corrupt: "
                       "records are not where the manifest puts them.")
    if not self._per_token:  # One position per example.
      entries = {k: v[:, 0] for k, v in entries.items()}
    return entries

  def batch_entries(self, rows: np.ndarray) -> dict[str, Any]:
    """{BATCH_KEY: entries}: what a training batch of `rows` carries."""
    return {BATCH_KEY: self.read(rows)}

  def __getstate__(self):
    return dict(self.__dict__, _source=None)

  def check(self, data_config, *, temperature: float, vocab: int, k: int,
            train_rows: np.ndarray) -> None:
    """Refuses a cache made for another dataset/text/tokenizer/vocab/k/T.

    `vocab`: the student's classes or vocabulary; `k`: the configured k
    (at most vocab); `train_rows`: the records this run trains on.
    """
    m, where = self.manifest, f"The teacher cache {self.directory!r}"

    def refuse(what, cached, configured, hint=""):
      raise CacheMismatchError(
          f"{where} was made for {what} {cached!r}, this config has "
          f"{configured!r}{hint}. Rebuild it with --config.mode="
          "cache_teacher for this config, or point config.distill."
          "teacher_cache at a matching cache.")

    data = m["data"]
    language_model = pipeline.is_language_modelling(data_config)
    task = "language_modelling" if language_model else "classification"
    if data["task"] != task:
      refuse("task", data["task"], task)
    if data["dataset"] != data_config.name:
      refuse("dataset (data_config.name)", data["dataset"], data_config.name)
    if data["split"] != data_config.train_split:
      refuse("split (data_config.train_split)", data["split"],
             data_config.train_split)
    logits = self.store == STORE_LOGITS  # Raw: any T, every class.
    if not logits and not math.isclose(m["temperature"], float(temperature),
                                       rel_tol=0, abs_tol=1e-12):
      refuse("temperature (config.distill.temperature)", m["temperature"],
             float(temperature),
             " (the top k are tied to T)")
    if m["vocab_size"] != vocab:
      refuse("vocabulary size" if language_model else "class count",
             m["vocab_size"], vocab)
    if not logits and m["k"] != k:
      refuse("k (config.cache.k)", m["k"], k)
    records = records_for(data_config, data_config.train_split)
    found = records.fingerprint()
    for key, label in (("seq_length", "seq_length (config.data.seq_length)"),
                       ("tokenizer_sha256", "tokenizer (sha256 of "
                        + ("config.data.tokenizer_path" if language_model
                           else "config.data.tokenizer_dir/tokenizer.json")
                        + ")"),
                       ("eos_id", "eos_id (config.data.eos_id)"),
                       ("windows_sha256", "packed training text (sha256 of "
                        "the token windows)"),
                       ("tfds_name", "tfds dataset"),
                       ("num_records", "number of records in the split"),
                       ("max_length", "max_length (config.data.max_length)"),
                       ("input_key", "input_key (config.data.input_key)"),
                       ("input_scale", "input_scale (config.data.input_scale)")):
      if key in data and data[key] != found.get(key):
        refuse(label, data[key], found.get(key))
    train_rows = np.asarray(train_rows, np.int64)
    covered = np.isin(train_rows, self.record_indices)
    if not covered.all():
      raise CacheMismatchError(
          f"{where} covers {len(self.record_indices)} records of split "
          f"{data['split']!r} but {int((~covered).sum())} of this run's "
          f"{len(train_rows)} training records are not among them (e.g. "
          f"{train_rows[~covered][:5].tolist()}): config.data.train_fraction/"
          "subset_seed select records the cache was not made for.")

  def objective(self, distill_config, total_steps: int) -> objectives.Objective:
    if self.store == STORE_LOGITS:  # The online teacher's objective.
      base = objectives.distillation(distill_config, num_teachers=1,
                                     total_steps=total_steps)
      return dataclasses.replace(
          base, teacher_weights=(1.0,),
          description=f"{base.description} (teacher logits from the "
          f"cache {self.directory})")
    return cached_objective(distill_config, total_steps, self)

  def strategy(self) -> "CachedTeachers":
    """The step's teacher strategy: outputs from each batch's BATCH_KEY."""
    return CachedTeachers(BATCH_KEY)


def open_checked(directory: str, data_config, *, temperature: float,
                 vocab: int, k: int) -> TeacherCache:
  """The cache in `directory`, checked against this run's data, T, vocab, k."""
  cache = TeacherCache(directory)
  records = records_for(data_config, data_config.train_split)
  cache.check(data_config, temperature=temperature, vocab=vocab, k=k,
              train_rows=records.default_subset())
  return cache


# ----------------------------------------------------------------------------
# The teacher's cached outputs in the step (a teacher strategy), the objective.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CachedTeachers:
  """The step's teacher strategy for a cache: the batch carries the outputs.

  Called like step.LiveTeachers; `teachers_params` is empty and unused.
  """
  key: str = BATCH_KEY

  def __call__(self, teachers_params, batch, *, capture_features: bool,
               vocab: int | None) -> list[ModelOutputs]:
    del teachers_params, capture_features  # Validation refuses feature terms.
    return [teacher_outputs(batch[self.key], vocab)]


def teacher_outputs(entries: dict[str, jax.Array],
                    vocab: int | None) -> ModelOutputs:
  """The teacher's ModelOutputs from a batch's cached entries.

  A 'logits' cache's entries are the teacher's logits: handed over as a live
  teacher's would be (no TeacherTopK).

  `hidden` carries the TeacherTopK and `head` is None: kdjax.distill.token_loss
  passes such per-token teacher entries through chunk by chunk instead of
  applying a head. `vocab` (classification) adds dense `logits` for the
  step's agreement metric; None (token loss) leaves them out.
  """
  if "logits" in entries:
    return ModelOutputs(lax.stop_gradient(entries["logits"]))
  cached = TeacherTopK(**jax.tree.map(lax.stop_gradient, entries))
  logits = None if vocab is None else cached.dense_log_probs(vocab)
  return ModelOutputs(logits, hidden=cached, head=None)


def cached_objective_terms(distill) -> list[dict[str, Any]]:
  """config.distill's terms, checked to be servable from a cache."""
  specs = objectives.term_specs(distill)
  for i, spec in enumerate(specs):
    if spec.get("name") not in CACHED_TERMS:
      fail(
          f"distill.terms[{i}].name", spec.get("name"),
          "a teacher cache holds the teacher's top k only, which serves "
          f"{CACHED_TERMS} (the kl terms become the top-k KL with a tail "
          "bucket); use an online teacher for other divergences")
  if (distill.temperature_schedule != "constant"
      and distill.temperature_end >= 0
      and distill.temperature_end != distill.temperature):
    fail(
        "distill.temperature_schedule", distill.temperature_schedule,
        "a teacher cache is made at one temperature; use 'constant'")
  return specs


def cached_objective(distill_config, total_steps: int,
                     cache: TeacherCache) -> objectives.Objective:
  """config.distill's own objective, one teacher: the cache's (see TeacherTopK)."""
  specs = cached_objective_terms(distill_config)
  for i, spec in enumerate(specs):
    if spec["name"] == "topk_kl" and spec.get("k", cache.k) != cache.k:
      fail(
          f"distill.terms[{i}].k", spec["k"],
          f"must equal the cache's k={cache.k} (or be left out)")
  base = objectives.distillation(distill_config, num_teachers=1,
                                 total_steps=total_steps)
  description = (f"{base.description} (every kl: top-{cache.k} KL + tail "
                 f"bucket from the teacher cache {cache.directory})")
  return dataclasses.replace(base, description=description,
                             teacher_weights=(1.0,))
