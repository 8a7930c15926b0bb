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

mode='cache_teacher' (`build`) runs config.teacher over config.cache.split
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
(SmolLM2 on Shakespeare: 163 bytes per token, benchmarks/cached_teacher.py).

`distill` with config.distill.teacher_cache = <dir> never loads a teacher:
`for_training` checks the manifest against the config (dataset, split,
packed text, tokenizer, vocabulary, k, temperature, seq_length; any mismatch
is refused naming it), the training iterator reads each batch's cached
entries by the same record indices it reads the data by (kdjax.data: the
grain iterator and its checkpointed state are unchanged), and the step hands
them to `CachedObjective` (alpha * T^2 * KL_topk + (1 - alpha) * CE by
default) as the teacher's outputs: for LMs through kdjax.distill.token_loss's
chunked path, which passes per-token teacher entries through chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import time
from typing import Any, Sequence

from absl import logging
from etils import epath
import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from kdjax import config as config_lib
from kdjax.runtime import distributed, storage
from kdjax.distill import losses, objectives, parallel
from kdjax.data import pipeline
from kdjax.distill.objectives import ModelOutputs

FORMAT = "kdjax.teacher_cache/1"
MANIFEST = "manifest.json"
INDICES_FILE = "record_indices.npy"
BATCH_KEY = "teacher_topk"  # The batch entry holding the cached entries.
# One record per chunk (random access); zstd (array_record's default).
WRITER_OPTIONS = "group_size:1"
VALUE_DTYPES = ("bfloat16", "float32")
# Distillation terms a cache can serve: the top-k KL with its tail bucket
# (forward KL when k = vocab) and the task loss.
CACHED_TERMS = ("kl", "forward_kl", "topk_kl", objectives.TASK_TERM)
# config.cache fields and their defaults (a config without them works).
DEFAULTS = dict(dir="", split="", k=64, dtype="bfloat16", records_per_shard=256,
                batch_size=0, chunk_size=0)


class CacheMismatchError(config_lib.ConfigError):
  """A teacher cache was made for another dataset/tokenizer/vocab/k/T."""


def settings(config) -> dict[str, Any]:
  """config.cache with defaults for missing fields."""
  given = config.get("cache") or {}
  return {k: given.get(k, v) for k, v in DEFAULTS.items()}


def cache_dir(config, workdir: str) -> str:
  return settings(config)["dir"] or storage.join(workdir, "teacher_cache")


def enabled(config) -> bool:
  """distill reads a cache (config.distill.teacher_cache) instead of a teacher."""
  return bool(config.distill.get("teacher_cache", ""))


def validate(config) -> None:
  """Raises ConfigError naming a bad config.cache / teacher_cache setting
  (modes cache_teacher and distill from a cache only)."""
  using = config.mode == "distill" and enabled(config)
  if config.mode != "cache_teacher" and not using:
    return
  s = settings(config)
  fail = config_lib._fail  # pylint: disable=protected-access
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
  if config.distill.get("extra_teachers", ()):
    fail("distill.extra_teachers", config.distill.extra_teachers,
         "a teacher cache holds one teacher (config.teacher); leave it empty")
  if using:
    if config.student.train.get("augment", False):
      fail("student.train.augment", True,
           "a teacher cache holds the teacher's outputs on un-augmented "
           "inputs; distilling from it needs augment=False")
    if config.distill.get("features", ()):
      fail("distill.features", config.distill.features,
           "feature terms need the teacher's activations, which a cache "
           "does not hold")
    cached_objective_terms(config.distill)  # Raises on an unsupported term.


def vocab_size(config, role: str = "student") -> int:
  """Classes (classification) or the role's vocabulary (LM)."""
  if pipeline.is_language_modelling(config.data):
    return int(config[role].model.get("vocab_size", 0))
  return int(config.data.num_classes)


def effective_k(config, role: str = "student") -> int:
  """config.cache.k, at most the vocabulary (then: the whole distribution)."""
  return min(int(settings(config)["k"]), vocab_size(config, role))


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
  """Serialized records -> {'record', 'log_probs', 'indices', 'log_tail'}."""
  rows = np.frombuffer(b"".join(raw), dtype)
  values = np.ascontiguousarray(rows["log_probs"])
  if dtype["log_probs"].base == np.dtype("<u2"):
    values = values.view(ml_dtypes.bfloat16)
  return {"record": rows["record"].astype(np.int64), "log_probs": values,
          "indices": np.ascontiguousarray(rows["indices"]),
          "log_tail": np.ascontiguousarray(rows["log_tail"])}


# ----------------------------------------------------------------------------
# What a task caches: its records, their inputs and its fingerprint.
# ----------------------------------------------------------------------------


class _Records:
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


class _LMRecords(_Records):
  """Packed sequences (kdjax.data.lm): one record per sequence."""

  def __init__(self, config, split: str):
    from kdjax.data import lm  # pylint: disable=g-import-not-at-top
    self._config, self._split = config, split
    self._packed = lm.packed_split(config.data, split)
    self.positions = self._packed.seq_length
    self.num_records = self._packed.num_sequences
    self._lm = lm

  def inputs(self, rows):
    return self._packed.batch(rows)["inputs"]

  def default_subset(self):
    if self._split != self._config.data.train_split:
      return np.arange(self.num_records)
    return self._lm.train_sequence_indices(self.num_records, self._config.data)

  def fingerprint(self):
    data = self._config.data
    windows = np.ascontiguousarray(self._packed.windows, "<i4")
    tokenizer = self._lm.tokenizer_file(data.tokenizer_path)
    return {"task": "language_modelling", "dataset": data.name,
            "tfds_name": self._packed.stats.get("dataset", ""),
            "split": self._split, "num_records": self.num_records,
            "seq_length": self.positions,
            "eos_id": int(self._packed.stats.get("eos_id", -1)),
            "tokenizer_sha256": self._lm.file_sha256(tokenizer),
            "windows_sha256": hashlib.sha256(windows.tobytes()).hexdigest()}


class _ClassificationRecords(_Records):
  """Examples of a tfds split: one record per example."""

  positions = 1

  def __init__(self, config, split: str):
    self._config, self._split = config, split
    self._source = pipeline.get_source(config.data, split)
    self._read = pipeline.ReadBatch(self._source, config.data)
    self.num_records = len(self._source)

  def inputs(self, rows):
    return self._read.map(np.asarray(rows))["inputs"]

  def default_subset(self):
    if self._split != self._config.data.train_split:
      return np.arange(self.num_records)
    return pipeline.train_subset(self.num_records, self._config.data)

  def fingerprint(self):
    data = self._config.data
    info = getattr(self._source, "dataset_info", None)
    tokenizer = ""
    if pipeline.is_text(data):
      from kdjax.data import lm  # pylint: disable=g-import-not-at-top
      tokenizer = lm.file_sha256(os.path.join(data.tokenizer_dir,
                                              "tokenizer.json"))
    return {"task": "classification", "dataset": data.name,
            "tfds_name": info.full_name if info is not None else "",
            "split": self._split, "num_records": self.num_records,
            "input_key": data.input_key, "input_scale":
                float(data.get("input_scale", 1.0)),
            "max_length": int(data.get("max_length", 0) or 0),
            "tokenizer_sha256": tokenizer}


def _records_for(config, split: str) -> _Records:
  if pipeline.is_language_modelling(config.data):
    return _LMRecords(config, split)
  return _ClassificationRecords(config, split)


# ----------------------------------------------------------------------------
# Building the cache (mode='cache_teacher').
# ----------------------------------------------------------------------------


def _path_sha256(path: str) -> str:
  """SHA-256 of a weights file, or of a directory's files (name + hash each)."""
  from kdjax.data import lm  # pylint: disable=g-import-not-at-top
  if os.path.isfile(path):
    return lm.file_sha256(path)
  h = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    full = os.path.join(path, name)
    if os.path.isfile(full) and name.endswith((".json", ".safetensors")):
      h.update(f"{name}\0{lm.file_sha256(full)}\n".encode())
  return h.hexdigest()


def load_teacher(config, workdir: str):
  """(model, params, description) of config.teacher, for the manifest: the
  description names the weights' file hash or the checkpoint step and meta."""
  from kdjax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  from kdjax.weights import pretrained, teachers  # pylint: disable=g-import-not-at-top
  spec = config_lib.teacher_specs(config, workdir)[0]
  teacher = teachers.load(config, spec)
  source = dict(teacher.source)
  if spec.pretrained:
    path = (pretrained.llama_path(spec.init_from)
            if spec.init_from.startswith("llama:") else "")
    source["weights_sha256"] = _path_sha256(path) if path else ""
  else:
    source["checkpoint_meta"] = checkpoint.read_meta(spec.path)
  return teacher.model, teacher.params, source


def _topk_function(apply_fn, mesh, *, language_model: bool, k: int,
                   temperature: float, chunk_size: int, value_dtype,
                   indices_dtype):
  """Compiled (params, global inputs) -> top-k log-probs, indices, log tail.

  Per device: the teacher's forward, then its top k at temperature T. For
  LMs the head is applied chunk_size positions at a time (lax.map), so no
  [B, L, V] logits exist, as in kdjax.distill.token_loss.
  """
  from kdjax.distill import token_loss  # pylint: disable=g-import-not-at-top

  def topk(logits):
    t = losses.teacher_topk(logits, k, temperature=temperature)
    return (t.log_probs.astype(value_dtype), t.indices.astype(indices_dtype),
            t.log_tail.astype(jnp.float32))

  def per_device(params, inputs):
    out = apply_fn(params, inputs, False, None)
    if not language_model:
      return topk(out.logits)
    hidden, head = out.hidden, out.head
    batch, length = hidden.shape[:2]
    size = min(chunk_size or length, length)
    num = -(-length // size)
    hidden = jnp.pad(hidden, [(0, 0), (0, num * size - length), (0, 0)])
    chunks = jnp.moveaxis(hidden.reshape(batch, num, size, -1), 1, 0)
    results = lax.map(
        lambda h: topk(token_loss.logits_from_hidden(h, head)), chunks)
    return jax.tree.map(
        lambda x: jnp.moveaxis(x, 0, 1).reshape(
            (batch, num * size) + x.shape[3:])[:, :length], results)

  axis = parallel.DATA_AXIS
  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis)),
                               out_specs=P(axis)))


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def shard_name(index: int, count: int) -> str:
  return f"topk-{index:05d}-of-{count:05d}.array_record"


def _identity(manifest: dict[str, Any]) -> dict[str, Any]:
  """The fields that define a cache (not its progress)."""
  return {k: v for k, v in manifest.items()
          if k not in ("complete", "shards", "bytes", "bytes_per_token",
                       "seconds")}


def _json_roundtrip(value):
  return json.loads(json.dumps(value))


def _write_shard(path: str, records: list[bytes]) -> None:
  """Writes an array_record file atomically (storage.atomic_path)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  with storage.atomic_path(path) as tmp:
    writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
    for r in records:
      writer.write(r)
    writer.close()


def _shard_complete(path: str, expected_records: int) -> bool:
  if not storage.exists(path):
    return False
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  try:
    reader = array_record_module.ArrayRecordReader(path)
    count = reader.num_records()
    reader.close()
  except Exception:  # pylint: disable=broad-except
    return False
  return count == expected_records


def build(config, workdir: str) -> dict[str, Any]:
  """mode='cache_teacher': writes the cache (module docstring); its manifest.

  Resumable: finished shards are kept and skipped. A directory holding a
  cache of another teacher/data/k/T is refused.
  """
  s = settings(config)
  directory = cache_dir(config, workdir)
  split = s["split"] or config.data.train_split
  records = _records_for(config, split)
  rows_all = np.asarray(records.default_subset(), np.int64)
  language_model = pipeline.is_language_modelling(config.data)
  vocab = vocab_size(config, "teacher")  # The teacher's output size.
  k, temperature = effective_k(config, "teacher"), float(
      config.distill.temperature)
  idx_dtype = index_dtype(vocab)
  dtype = record_dtype(records.positions, k, s["dtype"], idx_dtype.str)
  per_shard = int(s["records_per_shard"])
  num_shards = max(1, -(-len(rows_all) // per_shard))
  indices_sha = hashlib.sha256(rows_all.astype("<i8").tobytes()).hexdigest()

  model, params, teacher = load_teacher(config, workdir)
  manifest = _json_roundtrip({
      "format": FORMAT, "teacher": teacher, "temperature": temperature,
      "k": k, "vocab_size": vocab, "data": records.fingerprint(),
      "records": int(len(rows_all)), "record_indices_sha256": indices_sha,
      "positions_per_record": records.positions,
      "encoding": {"values": s["dtype"], "indices": str(idx_dtype.name),
                   "log_tail": "float32", "record_bytes": dtype.itemsize,
                   "layout": str(dtype.descr), "writer_options": WRITER_OPTIONS},
      "records_per_shard": per_shard, "num_shards": num_shards,
      "complete": False})
  found = storage.read_json(storage.join(directory, MANIFEST))
  if found is not None and _identity(found) != _identity(manifest):
    diff = sorted(k for k in set(_identity(found)) | set(_identity(manifest))
                  if found.get(k) != manifest.get(k))
    raise CacheMismatchError(
        f"config.cache.dir={directory!r} holds a teacher cache made with "
        f"different {', '.join(diff)}; use another config.cache.dir or "
        "delete that directory to rebuild it.")
  if jax.process_index() == 0 and found is None:
    storage.write_bytes(storage.join(directory, INDICES_FILE),
                        _npy_bytes(rows_all))
    storage.write_json(storage.join(directory, MANIFEST), manifest)
  distributed.barrier("kdjax_teacher_cache_start")

  mesh = parallel.make_mesh()
  batch = int(s["batch_size"] or config.student.train.batch_size)
  batch = max(jax.device_count(), batch // jax.device_count()
              * jax.device_count())
  processes, me = jax.process_count(), jax.process_index()
  local_batch = batch // processes
  from kdjax.distill import step as step_lib  # pylint: disable=g-import-not-at-top
  apply_fn = (step_lib.make_lm_apply_fn(model) if language_model
              else step_lib.make_apply_fn(model))
  forward = _topk_function(
      apply_fn, mesh, language_model=language_model, k=k,
      temperature=temperature, chunk_size=int(s["chunk_size"]),
      value_dtype=(jnp.bfloat16 if s["dtype"] == "bfloat16" else jnp.float32),
      indices_dtype=jnp.dtype(idx_dtype.name))
  params = parallel.replicate(params, mesh)

  def shard_rows(index: int) -> np.ndarray:
    return rows_all[index * per_shard:(index + 1) * per_shard]

  # Round r: process p writes shard r * P + p. Every process takes part in
  # every forward (a global computation); a round is skipped only if all of
  # its shards are done, which all processes agree on here.
  rounds = -(-num_shards // processes)
  done = np.array([r * processes + me >= num_shards or _shard_complete(
      storage.join(directory, shard_name(r * processes + me, num_shards)),
      len(shard_rows(r * processes + me))) for r in range(rounds)])
  if processes > 1:
    done = np.asarray(multihost_utils.process_allgather(done)).all(axis=0)
  steps_per_shard = -(-per_shard // local_batch)
  start, computed = time.time(), 0
  for r in range(rounds):
    if done[r]:
      continue
    index = r * processes + me
    mine = shard_rows(index) if index < num_shards else rows_all[:1]
    path = storage.join(directory, shard_name(index, num_shards))
    keep = index < num_shards and not _shard_complete(path, len(mine))
    outputs = []
    for j in range(steps_per_shard):
      rows = mine[j * local_batch:(j + 1) * local_batch]
      real = len(rows)
      if not real and processes == 1:
        continue  # Others need not take part: nothing to compute.
      if real < local_batch:  # Padding rows: computed, thrown away.
        rows = np.concatenate([rows, np.resize(mine, local_batch - real)])
      result = forward(params, parallel.shard_batch(records.inputs(rows),
                                                    mesh))
      if keep and real:
        outputs.append((rows[:real], [_local_rows(x)[:real] for x in result]))
      computed += real
    if keep:
      encoded = []
      for rows, (log_probs, indices, log_tail) in outputs:
        encoded += encode(rows, log_probs, indices, log_tail, dtype)
      _write_shard(path, encoded)
      logging.info("teacher cache: shard %d/%d written (%d records, %.1f "
                   "records/s)", index + 1, num_shards, len(mine),
                   computed / max(time.time() - start, 1e-9))
  distributed.barrier("kdjax_teacher_cache_end")

  shards = [shard_name(i, num_shards) for i in range(num_shards)]
  total = sum(storage.file_size(storage.join(directory, f)) for f in shards)
  manifest.update(complete=True, shards=shards, bytes=total,
                  bytes_per_token=total / (len(rows_all) * records.positions),
                  seconds=time.time() - start)
  if jax.process_index() == 0:
    storage.write_json(storage.join(directory, MANIFEST), manifest)
  logging.info("teacher cache complete in %s: %d records, %d shards, %.1f "
               "bytes per %s", directory, len(rows_all), num_shards,
               manifest["bytes_per_token"],
               "token" if language_model else "example")
  return manifest


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()



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
      raise config_lib.ConfigError(
          f"config.distill.teacher_cache={directory!r} holds no teacher "
          f"cache ({MANIFEST} missing); make one with --config.mode="
          f"cache_teacher --config.cache.dir={directory}.")
    if manifest.get("format") != FORMAT:
      raise CacheMismatchError(
          f"{directory!r}: cache format {manifest.get('format')!r}, this "
          f"kdjax reads {FORMAT!r}; rebuild it with mode=cache_teacher.")
    if not manifest.get("complete"):
      raise config_lib.ConfigError(
          f"config.distill.teacher_cache={directory!r} is incomplete (an "
          "interrupted mode=cache_teacher run); run mode=cache_teacher "
          "again with the same config to finish it (finished shards are "
          "kept).")
    self.manifest = manifest
    self.record_indices = np.load(io.BytesIO(
        epath.Path(storage.join(directory, INDICES_FILE)).read_bytes()))
    enc = manifest["encoding"]
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
    log_tail [n, (L)]."""
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

  def check(self, config, train_rows: np.ndarray) -> None:
    """Refuses a cache made for another dataset/text/tokenizer/vocab/k/T."""
    m, where = self.manifest, f"The teacher cache {self.directory!r}"

    def refuse(what, cached, configured, hint=""):
      raise CacheMismatchError(
          f"{where} was made for {what} {cached!r}, this config has "
          f"{configured!r}{hint}. Rebuild it with --config.mode="
          "cache_teacher for this config, or point config.distill."
          "teacher_cache at a matching cache.")

    data = m["data"]
    language_model = pipeline.is_language_modelling(config.data)
    task = "language_modelling" if language_model else "classification"
    if data["task"] != task:
      refuse("task", data["task"], task)
    if data["dataset"] != config.data.name:
      refuse("dataset (config.data.name)", data["dataset"], config.data.name)
    if data["split"] != config.data.train_split:
      refuse("split (config.data.train_split)", data["split"],
             config.data.train_split)
    if not math.isclose(m["temperature"], float(config.distill.temperature),
                        rel_tol=0, abs_tol=1e-12):
      refuse("temperature (config.distill.temperature)", m["temperature"],
             float(config.distill.temperature),
             " (the top k are tied to T)")
    if m["vocab_size"] != vocab_size(config):
      refuse("vocabulary size" if language_model else "class count",
             m["vocab_size"], vocab_size(config))
    if m["k"] != effective_k(config):
      refuse("k (config.cache.k)", m["k"], effective_k(config))
    records = _records_for(config, config.data.train_split)
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

  def objective(self, config, total_steps: int) -> "CachedObjective":
    return cached_objective(config, total_steps, self)


def for_training(config, mode: str) -> TeacherCache | None:
  """The checked cache a distill run reads instead of a teacher, else None."""
  if mode != "distill" or not enabled(config):
    return None
  cache = TeacherCache(config.distill.teacher_cache)
  records = _records_for(config, config.data.train_split)
  cache.check(config, records.default_subset())
  return cache


# ----------------------------------------------------------------------------
# The teacher's cached outputs in the step, and the objective on them.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class CachedTeacher:
  """A batch of cached entries: [..., k] log-probs at T and indices, [...] tail."""
  log_probs: jax.Array
  indices: jax.Array
  log_tail: jax.Array

  @property
  def top1(self) -> jax.Array:
    """The teacher's argmax (the first of its descending top k)."""
    return self.indices[..., 0].astype(jnp.int32)

  def dense_log_probs(self, vocab: int) -> jax.Array:
    """[..., vocab] log-probs at T: the top k, the tail spread evenly.

    Only for argmax-based metrics of small (classification) vocabularies; the
    loss uses the k + 1 buckets.
    """
    rest = vocab - self.log_probs.shape[-1]
    fill = (self.log_tail.astype(jnp.float32) - math.log(rest) if rest
            else jnp.full(self.log_tail.shape, -jnp.inf, jnp.float32))
    dense = jnp.broadcast_to(fill[..., None], fill.shape + (vocab,))
    return jnp.put_along_axis(dense, self.indices.astype(jnp.int32),
                              self.log_probs.astype(jnp.float32), axis=-1,
                              inplace=False)


def teacher_outputs(entries: dict[str, jax.Array],
                    vocab: int | None) -> ModelOutputs:
  """The teacher's ModelOutputs from a batch's cached entries.

  `hidden` carries the CachedTeacher and `head` is None: kdjax.distill.token_loss
  passes such per-token teacher entries through chunk by chunk instead of
  applying a head. `vocab` (classification) adds dense `logits` for the
  step's agreement metric; None (token loss) leaves them out.
  """
  cached = CachedTeacher(**jax.tree.map(lax.stop_gradient, entries))
  logits = None if vocab is None else cached.dense_log_probs(vocab)
  return ModelOutputs(logits, hidden=cached, head=None)


def cached_objective_terms(distill) -> list[dict[str, Any]]:
  """config.distill's terms, checked to be servable from a cache."""
  specs = objectives._term_specs(distill)  # pylint: disable=protected-access
  for i, spec in enumerate(specs):
    if spec.get("name") not in CACHED_TERMS:
      config_lib._fail(  # pylint: disable=protected-access
          f"distill.terms[{i}].name", spec.get("name"),
          "a teacher cache holds the teacher's top k only, which serves "
          f"{CACHED_TERMS} (the kl terms become the top-k KL with a tail "
          "bucket); use an online teacher for other divergences")
  if (distill.get("temperature_schedule", "constant") != "constant"
      and distill.get("temperature_end", -1.0) >= 0
      and distill.temperature_end != distill.temperature):
    config_lib._fail(  # pylint: disable=protected-access
        "distill.temperature_schedule", distill.temperature_schedule,
        "a teacher cache is made at one temperature; use 'constant'")
  return specs


@dataclasses.dataclass(frozen=True)
class CachedObjective(objectives.Objective):
  """config.distill's objective with the cache's top k as the teacher.

  Every KL term is `losses.topk_kl_from_cache` (k + 1 buckets, times T^2),
  'ce' the task loss: by default alpha * T^2 * KL_topk + (1 - alpha) * CE.
  """
  k: int = 0

  def __call__(self, student, teachers, labels, step, aux_params=None):
    del aux_params  # No feature terms from a cache.
    cached = teachers[0].hidden
    temperature = self.temperature(step)
    if self.hard_labels == "teacher":
      labels = cached.top1
    total = jnp.zeros(student.logits.shape[:-1], jnp.float32)
    values = {}
    for term in self.terms:
      if term.name == objectives.TASK_TERM:
        value = losses.softmax_cross_entropy(student.logits, labels)
      else:
        options = {k: v for k, v in term.options if k != "k"}
        value = losses.topk_kl_from_cache(
            student.logits, cached.log_probs, cached.indices.astype(jnp.int32),
            teacher_log_tail=cached.log_tail, temperature=temperature,
            **options)
      values[term.label or term.name] = value
      total = total + term.weight(step) * value
    return total, values


def cached_objective(config, total_steps: int,
                     cache: TeacherCache) -> CachedObjective:
  specs = cached_objective_terms(config.distill)
  for i, spec in enumerate(specs):
    if spec["name"] == "topk_kl" and spec.get("k", cache.k) != cache.k:
      config_lib._fail(  # pylint: disable=protected-access
          f"distill.terms[{i}].k", spec["k"],
          f"must equal the cache's k={cache.k} (or be left out)")
  base = objectives.distillation(config.distill, num_teachers=1,
                                 total_steps=total_steps)
  description = (f"{base.description} (every kl: top-{cache.k} KL + tail "
                 f"bucket from the teacher cache {cache.directory})")
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
  fields.update(description=description, teacher_weights=(1.0,))
  return CachedObjective(**fields, k=cache.k)
