"""Input pipelines: tfds data sources -> grain -> per-host numpy batches.

Training: a fixed (optionally fractional) subset of the split, this process's
shard of it, reshuffled every epoch, preprocessed, batched; the iterator is
grain's, so its position goes into the checkpoint. Evaluation: the whole split
in order, padded to whole batches with a mask so no example is dropped.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from kdjax.data import builders


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR",
                        os.path.expanduser("~/tensorflow_datasets"))


def get_source(data_config, split: str):
  """Random-access source of a split; shipped datasets are prepared on first use."""
  data_dir = data_config.data_dir or default_data_dir()
  if data_config.name in builders.SHIPPED_BUILDERS:
    builders.prepare(data_config.name, data_dir,
                     source_dir=data_config.get("source_dir") or None)
  try:
    return tfds.data_source(data_config.name, data_dir=data_dir, split=split)
  except Exception as e:  # tfds raises several types for a missing dataset.
    raise builders.DatasetMissingError(
        f"Could not open tfds dataset {data_config.name!r} split {split!r} in "
        f"data dir {data_dir!r}: {e}. Prepare it there (tfds build, "
        f"array_record format) or use one of the shipped builders: "
        f"{sorted(builders.SHIPPED_BUILDERS)}.") from e


class Preprocess(grain.transforms.Map):
  """Record dict -> {'inputs': float32 scaled, 'labels': int32}."""

  def __init__(self, input_key: str, label_key: str, scale: float):
    self._input_key, self._label_key, self._scale = input_key, label_key, scale

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    x = np.asarray(record[self._input_key])
    if np.issubdtype(x.dtype, np.floating) or self._scale != 1.0:
      x = x.astype(np.float32) / self._scale
    return {"inputs": x, "labels": np.int32(record[self._label_key])}


class RandomShiftFlip(grain.transforms.RandomMap):
  """Pad-and-crop by up to `max_shift` pixels and a horizontal flip."""

  def __init__(self, max_shift: int, flip: bool):
    self._max_shift, self._flip = max_shift, flip

  def random_map(self, example, rng: np.random.Generator):
    x = example["inputs"]
    if self._max_shift:
      s = self._max_shift
      padded = np.pad(x, ((s, s), (s, s), (0, 0)))
      dy, dx = rng.integers(0, 2 * s + 1, size=2)
      x = padded[dy:dy + x.shape[0], dx:dx + x.shape[1]]
    if self._flip and rng.random() < 0.5:
      x = x[:, ::-1]
    return dict(example, inputs=np.ascontiguousarray(x))


class _Indexed:
  """Random access to chosen records of a source.

  Explicit indices rather than grain slices: a sliced MapDataset under
  shuffle + repeat reads past its slice in later epochs (grain 0.2.18).
  """

  def __init__(self, source, indices: np.ndarray):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._source[int(self._indices[index])]


def train_indices(num_records: int, data_config) -> np.ndarray:
  """This process's share of the (possibly fractional) training subset.

  The subset is a fixed permutation's prefix: the same for every seed and
  process, so runs with different seeds see the same examples.
  """
  fraction = float(data_config.train_fraction)
  if fraction < 1.0:
    rng = np.random.default_rng(int(data_config.subset_seed))
    indices = np.sort(rng.permutation(num_records)[
        :subset_size(num_records, fraction)])
  else:
    indices = np.arange(num_records)
  return indices[jax.process_index()::jax.process_count()]


def subset_size(num_records: int, fraction: float) -> int:
  return max(1, int(round(num_records * fraction)))


def train_dataset(source, data_config, *, global_batch_size: int, seed: int,
                  augment: bool = False) -> grain.IterDataset:
  """Infinite, per-epoch reshuffled batches of this process's share."""
  num_processes = jax.process_count()
  if global_batch_size % num_processes:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible "
                     f"by the number of processes {num_processes}.")
  ds = grain.MapDataset.source(
      _Indexed(source, train_indices(len(source), data_config)))
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.map(Preprocess(data_config.input_key, data_config.label_key,
                         float(data_config.input_scale)))
  if augment:
    ds = ds.random_map(RandomShiftFlip(int(data_config.augment_max_shift),
                                       bool(data_config.augment_flip)),
                       seed=seed)
  ds = ds.batch(global_batch_size // num_processes, drop_remainder=True)
  return ds.to_iter_dataset()


def train_num_records(source, data_config) -> int:
  fraction = float(data_config.train_fraction)
  return subset_size(len(source), fraction) if fraction < 1.0 else len(source)


def eval_batches(source, data_config, batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The whole split in order, in batches padded to `batch_size` with a mask."""
  preprocess = Preprocess(data_config.input_key, data_config.label_key,
                          float(data_config.input_scale))
  ds = grain.MapDataset.source(source).map(preprocess).batch(batch_size)
  for batch in ds:
    n = len(batch["labels"])
    mask = np.zeros(batch_size, np.float32)
    mask[:n] = 1.0
    if n < batch_size:
      batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:],
                                              v.dtype)]) for k, v in batch.items()}
    yield dict(batch, mask=mask)


def load_split(source, data_config) -> dict[str, np.ndarray]:
  """The whole split as arrays (evaluation sets are small enough)."""
  preprocess = Preprocess(data_config.input_key, data_config.label_key,
                          float(data_config.input_scale))
  ds = grain.MapDataset.source(source).map(preprocess).batch(4096)
  parts = list(ds)
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
