"""Input pipelines: tfds data sources -> grain -> per-host numpy batches.

Training: a fixed (optionally fractional) subset of the split, this process's
shard of it, reshuffled every epoch, preprocessed, batched; the iterator is
grain's, so its position goes into the checkpoint. Evaluation: the whole split
in order, padded to whole batches with a mask so no example is dropped.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from typing import Any, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from kdjax.core.config import fail
from kdjax.data import augment
from kdjax.data import builders
from kdjax.data import text as text_lib
from kdjax.data import tokenizer as tokenizer_lib


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR",
                        os.path.expanduser("~/tensorflow_datasets"))


def get_source(data_config, split: str):
  """Random-access source of a split; shipped datasets are prepared on first use.

  Split augment.SPLIT ('train_augmented') is the transfer set of
  config.data.transfer_set's source split (kdjax.data.augment), prepared
  on first use too.
  """
  data_dir = data_config.data_dir or default_data_dir()
  if split == augment.SPLIT:
    source = transfer_builder(data_config).as_data_source(split=split)
    return _maybe_in_memory(source, data_config)
  if data_config.name in builders.SHIPPED_BUILDERS:
    builders.prepare(data_config.name, data_dir,
                     source_dir=data_config.get("source_dir") or None)
  try:
    source = tfds.data_source(data_config.name, data_dir=data_dir, split=split)
  except Exception as e:  # tfds raises several types for a missing dataset.
    raise builders.DatasetMissingError(
        f"Could not open tfds dataset {data_config.name!r} split {split!r} in "
        f"data dir {data_dir!r}: {_one_line(e)} Prepare it there (tfds "
        f"build, array_record format) or use one of the shipped builders: "
        f"{sorted(builders.SHIPPED_BUILDERS)}.") from e
  return _maybe_in_memory(source, data_config)


def _maybe_in_memory(source, data_config):
  if data_config.get("cache_in_memory", False):
    return InMemorySource(source, keys=(data_config.input_key,
                                        data_config.label_key))
  return source


def transfer_builder(data_config) -> augment.AugmentedTransferSet:
  """The prepared transfer set of config.data (kdjax.data.augment): the
  augmented copies of config.data.transfer_set.base_split's texts."""
  if "transfer_set" not in data_config or not is_text(data_config):
    fail("data.train_split", augment.SPLIT,
         "a transfer set needs text data (data.tokenizer_dir) and "
         "config.data.transfer_set (kdjax.data.augment.Settings' fields)")
  settings = augment.Settings.from_config(data_config.transfer_set)
  base = get_source(data_config, settings.base_split)
  info = getattr(base, "dataset_info", None)
  source_name = info.full_name if info is not None else str(data_config.name)
  num = len(base)
  if settings.max_source_examples > 0:
    num = min(num, settings.max_source_examples)
  key, label_key = data_config.input_key, data_config.label_key

  def read_source() -> list[tuple[str, int]]:
    records = base.__getitems__(list(range(num)))
    return [(r[key].decode("utf-8") if isinstance(r[key], bytes)
             else str(r[key]), int(r[label_key])) for r in records]

  builder = augment.transfer_builder(
      data_dir=data_config.data_dir or default_data_dir(),
      source_name=f"{source_name}:{settings.base_split}",
      read_source=read_source, num_source=num, settings=settings,
      num_classes=int(data_config.num_classes), input_key=key,
      label_key=label_key)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder


def _one_line(e: Exception) -> str:
  """tfds' error in one line: its first line and its 'Did you mean' hint.

  (Between them tfds lists every registered dataset: hundreds of lines.)
  """
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  kept = lines[:1] + [line for line in lines[1:]
                      if line.startswith("Did you mean")]
  text = " ".join(kept) or type(e).__name__
  return text if text.endswith((".", "?")) else text + "."


class InMemorySource:
  """A split decoded once into numpy arrays: random access without re-parsing.

  For datasets that fit in host memory (the image sets here are tens of MB);
  records and their order are exactly the wrapped source's.
  """

  def __init__(self, source, keys: tuple[str, ...], chunk: int = 4096):
    columns: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for start in range(0, len(source), chunk):
      records = source.__getitems__(
          list(range(start, min(start + chunk, len(source)))))
      for k in keys:
        columns[k].append(np.stack([np.asarray(r[k]) for r in records]))
    self._columns = {k: np.concatenate(v) for k, v in columns.items()}
    self._length = len(source)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self._columns.items()}

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self[i] for i in indices]

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Columns for many records at once (fancy indexing)."""
    return {k: v[indices] for k, v in self._columns.items()}


def _records(source, indices: np.ndarray) -> list[dict[str, Any]] | dict:
  if isinstance(source, InMemorySource):
    return source.gather(indices)
  return source.__getitems__([int(i) for i in indices])


def is_text(data_config) -> bool:
  """Text data: inputs are strings, tokenised with config.data.tokenizer_dir."""
  return bool(data_config.get("tokenizer_dir", ""))


def is_language_modelling(data_config) -> bool:
  """Token sequences for next-token prediction (kdjax.data.lm), not examples."""
  return bool(data_config.get("seq_length", 0))


def input_spec(data_config) -> tuple[tuple[int, ...], Any]:
  """(shape of one example, dtype) of the model input, e.g. for init."""
  if is_language_modelling(data_config):
    return (int(data_config.seq_length),), np.int32
  if is_text(data_config):
    return (int(data_config.max_length),), np.int32
  dtype = np.int32 if data_config.get("input_dtype") == "int32" else np.float32
  return tuple(data_config.input_shape), dtype


_THREAD = threading.local()


def dummy_inputs(data_config):
  """A batch of one zero example: what model.init and shape tracing need."""
  shape, dtype = input_spec(data_config)
  return jnp.zeros((1,) + shape, dtype)


def load_tokenizer(tokenizer_dir: str):
  """The tokenizer.json of an HF directory, loaded once per thread.

  One per thread: `text.tokenize` sets the tokenizer's padding, and grain
  reads batches from several threads ("Already borrowed" if shared).
  """
  cache = _THREAD.__dict__.setdefault("tokenizers", {})
  if tokenizer_dir not in cache:
    cache[tokenizer_dir] = tokenizer_lib.load(tokenizer_dir)
  return cache[tokenizer_dir]


def preprocess_batch(records, data_config) -> dict[str, np.ndarray]:
  """Records (or gathered columns) -> {'inputs', 'labels': int32}.

  Images: inputs scaled float32. Text (config.data.tokenizer_dir set): inputs
  are WordPiece ids, int32 [B, max_length], padded with id 0.
  """
  key, label_key = data_config.input_key, data_config.label_key
  if isinstance(records, dict):
    x, y = records[key], records[label_key]
  elif is_text(data_config):
    x = [r[key] for r in records]
    y = np.asarray([r[label_key] for r in records])
  else:
    x = np.stack([np.asarray(r[key]) for r in records])
    y = np.asarray([r[label_key] for r in records])
  if is_text(data_config):
    ids = text_lib.tokenize(load_tokenizer(data_config.tokenizer_dir), list(x),
                        int(data_config.max_length), pad_id=0)["input_ids"]
    return {"inputs": ids, "labels": np.asarray(y).astype(np.int32)}
  scale = float(data_config.input_scale)
  if np.issubdtype(x.dtype, np.floating) or scale != 1.0:
    x = x.astype(np.float32) / scale
  return {"inputs": x, "labels": y.astype(np.int32)}


class ReadBatch(grain.transforms.Map):
  """A batch of record indices -> a preprocessed batch (one bulk read).

  With a teacher cache (kdjax.distill.teacher_cache.TeacherCache), the batch also
  carries the cached teacher entries of the same records.
  """

  def __init__(self, source, data_config, teacher_cache=None):
    self._source, self._config = source, data_config
    self._teacher_cache = teacher_cache

  def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    batch = preprocess_batch(_records(self._source, indices), self._config)
    if self._teacher_cache is not None:
      batch.update(self._teacher_cache.batch_entries(indices))
    return batch


class RandomShiftFlip(grain.transforms.RandomMap):
  """Per-example pad-and-crop by up to `max_shift` pixels and horizontal flips."""

  def __init__(self, max_shift: int, flip: bool):
    self._max_shift, self._flip = max_shift, flip

  def random_map(self, batch, rng: np.random.Generator):
    x = batch["inputs"]
    n, h, w = x.shape[:3]
    if self._max_shift:
      s = self._max_shift
      padded = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)))
      offsets = rng.integers(0, 2 * s + 1, size=(n, 2))
      x = np.stack([padded[i, dy:dy + h, dx:dx + w]
                    for i, (dy, dx) in enumerate(offsets)])
    if self._flip:
      flips = rng.random(n) < 0.5
      x = np.where(flips[:, None, None, None], x[:, :, ::-1], x)
    return dict(batch, inputs=np.ascontiguousarray(x))


def train_indices(num_records: int, data_config) -> np.ndarray:
  """This process's share of the (possibly fractional) training subset.

  The subset is a fixed permutation's prefix: the same for every seed and
  process, so runs with different seeds see the same examples.
  """
  indices = train_subset(num_records, data_config)
  return indices[jax.process_index()::jax.process_count()]


def train_subset(num_records: int, data_config) -> np.ndarray:
  """The (possibly fractional) training subset of every process, sorted."""
  fraction = float(data_config.train_fraction)
  if fraction < 1.0:
    rng = np.random.default_rng(int(data_config.subset_seed))
    return np.sort(rng.permutation(num_records)[
        :subset_size(num_records, fraction)])
  return np.arange(num_records)


def subset_size(num_records: int, fraction: float) -> int:
  return max(1, int(round(num_records * fraction)))


class ShuffledIndexBatches:
  """Endless batches of record indices, reshuffled every epoch.

  Exactly the batches of grain's `MapDataset.source(indices).shuffle(seed)
  .repeat(None).batch(batch_size, drop_remainder=True)` (same index_shuffle
  permutation per epoch, batches crossing epoch boundaries alike), so runs and
  checkpoints are unchanged; but each epoch's permutation is computed once and
  batches are array slices, instead of grain's per-element Python shuffle and
  batch (their cost next to the fused step: benchmarks/input_pipeline.py).
  """

  def __init__(self, indices: np.ndarray, batch_size: int, seed: int):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    self._indices = np.asarray(indices)
    self._batch_size, self._seed = int(batch_size), int(seed)
    self._epochs: dict[int, np.ndarray] = {}  # The last few epochs' orders.
    self._lock = threading.Lock()  # grain reads batches from several threads.

  def __len__(self) -> int:
    return sys.maxsize  # Endless, like repeat(None).

  def _epoch(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._epochs:
        n = len(self._indices)
        seed = (self._seed + epoch) % 2**32  # grain's per-epoch seed.
        order = np.fromiter(map(  # index_shuffle(i, max_index, seed, rounds).
            grain.experimental.index_shuffle, range(n), itertools.repeat(n - 1),
            itertools.repeat(seed), itertools.repeat(4)), np.int64, n)
        for old in [e for e in self._epochs if e < epoch - 1]:
          del self._epochs[old]
        self._epochs[epoch] = self._indices[order]
      return self._epochs[epoch]

  def __getitem__(self, index: int) -> np.ndarray:
    n = len(self._indices)
    start = int(index) * self._batch_size
    stop = start + self._batch_size
    pieces = []
    while start < stop:  # Usually one epoch; two at an epoch boundary.
      epoch, offset = divmod(start, n)
      take = min(stop - start, n - offset)
      pieces.append(self._epoch(epoch)[offset:offset + take])
      start += take
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def train_dataset(source, data_config, *, global_batch_size: int, seed: int,
                  augment: bool = False,
                  teacher_cache=None) -> grain.IterDataset:
  """Infinite, per-epoch reshuffled batches of this process's share.

  With `teacher_cache`, each batch carries its records' cached teacher
  entries (ReadBatch).
  """
  num_processes = jax.process_count()
  if global_batch_size % num_processes:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible "
                     f"by the number of processes {num_processes}.")
  # Shuffle and batch record INDICES, then read each batch in one bulk call:
  # per-batch rather than per-record Python overhead.
  ds = grain.MapDataset.source(ShuffledIndexBatches(
      train_indices(len(source), data_config),
      global_batch_size // num_processes, seed))
  ds = ds.map(ReadBatch(source, data_config, teacher_cache))
  if augment:
    ds = ds.random_map(RandomShiftFlip(int(data_config.augment_max_shift),
                                       bool(data_config.augment_flip)),
                       seed=seed)
  return ds.to_iter_dataset()


def train_num_records(source, data_config) -> int:
  fraction = float(data_config.train_fraction)
  return subset_size(len(source), fraction) if fraction < 1.0 else len(source)


def eval_batches(source, data_config, batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The split in order (its first config.data.eval_max_examples if > 0), in
  batches padded to `batch_size` with a mask."""
  n = len(source)
  if data_config.get("eval_max_examples", 0) > 0:
    n = min(n, int(data_config.eval_max_examples))
  for start in range(0, n, batch_size):
    indices = np.arange(start, min(start + batch_size, n))
    batch = preprocess_batch(_records(source, indices), data_config)
    mask = np.zeros(batch_size, np.float32)
    mask[:len(indices)] = 1.0
    pad = batch_size - len(indices)
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    yield dict(batch, mask=mask)


def load_split(source, data_config) -> dict[str, np.ndarray]:
  """The whole split as arrays, in order (evaluation sets are small enough)."""
  batches = list(eval_batches(source, data_config, batch_size=4096))
  mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
  return {k: np.concatenate([b[k] for b in batches])[mask]
          for k in ("inputs", "labels")}


def validate(data_config, *, language_model: bool) -> None:
  """config.data: classes, tokenizer and lengths for text, the train fraction."""
  if data_config.num_classes <= 1 and not language_model:
    fail("data.num_classes", data_config.num_classes, "must be >= 2")
  if data_config.get("tokenizer_dir", ""):
    if not os.path.exists(os.path.join(data_config.tokenizer_dir,
                                       "tokenizer.json")):
      fail("data.tokenizer_dir", data_config.tokenizer_dir,
           "must be a directory with a tokenizer.json ('' for non-text data)")
    if data_config.get("max_length", 0) <= 0:
      fail("data.max_length", data_config.get("max_length"),
           "must be > 0 tokens for text data")
  if not 0.0 < data_config.train_fraction <= 1.0:
    fail("data.train_fraction", data_config.train_fraction, "must be in (0, 1]")
  if "transfer_set" in data_config:
    augment.validate(data_config.transfer_set)
  if augment.SPLIT in (data_config.get("train_split"),
                       data_config.get("eval_split")):
    if "transfer_set" not in data_config:
      fail("data.train_split", data_config.train_split,
           f"{augment.SPLIT!r} needs config.data.transfer_set "
           "(kdjax.data.augment.Settings' fields)")
    if not data_config.get("tokenizer_dir", ""):
      fail("data.train_split", data_config.train_split,
           f"{augment.SPLIT!r} is for text data (data.tokenizer_dir)")
