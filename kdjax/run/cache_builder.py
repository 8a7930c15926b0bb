"""mode='cache_teacher': run the frozen teacher once over a split and write its
top k (the format, settings and reader are kdjax.distill.teacher_cache's).

Data-parallel over every device of every process, in order; resumable:
finished shards are kept and skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from kdjax.data import pipeline
from kdjax.distill import losses, parallel, step as step_lib, token_loss
from kdjax.distill import mesh as mesh_lib
from kdjax.core.config import ConfigError
from kdjax.distill.teacher_cache import (
    INDICES_FILE, MANIFEST, STORE_LOGITS, WRITER_OPTIONS, FORMAT,
    CacheMismatchError, cache_dir, effective_k, encode, encode_logits,
    index_dtype, logits_record_dtype, record_dtype, records_for, settings,
    store_of, vocab_size)
from kdjax.run import layout
from kdjax.runtime import checkpoint, distributed, storage
from kdjax.weights import pretrained, specs


def _path_sha256(path: str) -> str:
  """SHA-256 of a weights file, or of a directory's files (name + hash each)."""
  if os.path.isfile(path):
    return storage.file_sha256(path)
  h = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    full = os.path.join(path, name)
    if os.path.isfile(full) and name.endswith((".json", ".safetensors")):
      h.update(f"{name}\0{storage.file_sha256(full)}\n".encode())
  return h.hexdigest()


def load_teacher(config, workdir: str, mesh):
  """(model, params placed on `mesh`, description) of config.teacher, for
  the manifest: the description names the weights' file hash or the
  checkpoint step and meta."""
  spec = specs.teacher_specs(config, workdir)[0]
  teacher = layout.load_teacher(config, workdir, mesh)
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
                   indices_dtype, batch_sharding=None, raw_logits=False):
  """Compiled (params, global inputs) -> top-k log-probs, indices, log tail.

  Per device: the teacher's forward, then its top k at temperature T. For
  LMs the head is applied chunk_size positions at a time (lax.map), so no
  [B, L, V] logits exist, as in kdjax.distill.token_loss. `raw_logits`
  (classification): (float32 logits,) instead.
  """
  def topk(logits):
    if raw_logits:
      return (logits.astype(jnp.float32),)
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

  if batch_sharding is not None:  # Sharded layout: GSPMD, global batch.
    return jax.jit(per_device, in_shardings=(None, batch_sharding),
                   out_shardings=batch_sharding)
  axis = parallel.DATA_AXIS
  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis)),
                               out_specs=P(axis)))


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  # Replicas (e.g. over a 'model' axis) hold the same rows: keep one each.
  by_start = {s.index[0].start or 0: s for s in x.addressable_shards}
  return np.concatenate([np.asarray(by_start[k].data)
                         for k in sorted(by_start)])


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
  """Writes the cache (kdjax.distill.teacher_cache's docstring); its manifest.

  Resumable: finished shards are kept and skipped. A directory holding a
  cache of another teacher/data/k/T is refused.
  """
  s = settings(config.cache)
  directory = cache_dir(s, workdir)
  split = s["split"] or config.data.train_split
  language_model = pipeline.is_language_modelling(config.data)
  raw_logits = store_of(s) == STORE_LOGITS
  if raw_logits and language_model:
    raise ConfigError("config.cache.store='logits' is for classification; a "
                      "language model's cache keeps the top k ('topk').")
  records = records_for(config.data, split)
  rows_all = np.asarray(records.default_subset(), np.int64)
  vocab = vocab_size(config.data, config.teacher.model)  # Teacher's outputs.
  k = vocab if raw_logits else effective_k(s["k"], vocab)
  temperature = float(config.distill.temperature)
  idx_dtype = index_dtype(vocab)
  dtype = (logits_record_dtype(records.positions, vocab) if raw_logits else
           record_dtype(records.positions, k, s["dtype"], idx_dtype.str))
  per_shard = int(s["records_per_shard"])
  num_shards = max(1, -(-len(rows_all) // per_shard))
  indices_sha = hashlib.sha256(rows_all.astype("<i8").tobytes()).hexdigest()

  mesh = layout.make_mesh(config)
  model, params, teacher = load_teacher(config, workdir, mesh)
  encoding = ({"values": "float32", "record_bytes": dtype.itemsize,
               "layout": str(dtype.descr), "writer_options": WRITER_OPTIONS}
              if raw_logits else
              {"values": s["dtype"], "indices": str(idx_dtype.name),
               "log_tail": "float32", "record_bytes": dtype.itemsize,
               "layout": str(dtype.descr), "writer_options": WRITER_OPTIONS})
  manifest = _json_roundtrip({
      "format": FORMAT, "teacher": teacher,
      # Raw logits hold no temperature (any T reads them).
      "temperature": None if raw_logits else temperature,
      "k": k, "vocab_size": vocab, "data": records.fingerprint(),
      "records": int(len(rows_all)), "record_indices_sha256": indices_sha,
      "positions_per_record": records.positions,
      "encoding": encoding,
      "records_per_shard": per_shard, "num_shards": num_shards,
      "complete": False})
  if raw_logits:  # Absent = 'topk' (the caches made before the option).
    manifest["store"] = STORE_LOGITS
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

  batch = int(s["batch_size"] or config.student.train.batch_size)
  batch = max(jax.device_count(), batch // jax.device_count()
              * jax.device_count())
  processes, me = jax.process_count(), jax.process_index()
  local_batch = batch // processes
  apply_fn = (step_lib.make_lm_apply_fn(model) if language_model
              else step_lib.make_apply_fn(model))
  forward = _topk_function(
      apply_fn, mesh, language_model=language_model, k=k,
      temperature=temperature, chunk_size=int(s["chunk_size"]),
      value_dtype=(jnp.bfloat16 if s["dtype"] == "bfloat16" else jnp.float32),
      indices_dtype=jnp.dtype(idx_dtype.name),
      batch_sharding=(mesh_lib.batch_sharding(mesh, layout.rules(config, mesh))
                      if layout.is_sharded(mesh) else None),
      raw_logits=raw_logits)
  params = parallel.on_mesh(params, mesh)

  def place(inputs):
    if layout.is_sharded(mesh):
      return parallel.place_batch(
          inputs, mesh_lib.batch_sharding(mesh, layout.rules(config, mesh)))
    return parallel.shard_batch(inputs, mesh)

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
      with layout.scope(config, mesh):
        result = forward(params, place(records.inputs(rows)))
      if keep and real:
        outputs.append((rows[:real], [_local_rows(x)[:real] for x in result]))
      computed += real
    if keep:
      encoded = []
      for rows, result in outputs:
        encoded += (encode_logits(rows, result[0], dtype) if raw_logits
                    else encode(rows, *result, dtype))
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
