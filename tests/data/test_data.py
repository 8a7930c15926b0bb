"""Data: tfds builders without TensorFlow, grain pipelines, clear errors."""

import gzip
import struct

import jax
import ml_collections
import numpy as np
import pytest

from kdjax.data import builders, pipeline


def _write_idx(path, array):
  header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(
      ">" + "I" * array.ndim, *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_idx_dir(tmp_path):
  """A directory holding Fashion-MNIST-format idx files (what a user points at)."""
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 40), ("t10k", 10)):
    _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
               rng.integers(0, 256, (n, 28, 28)))
    _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz",
               np.arange(n) % 10)
  return tmp_path


def _data_config(data_dir, **changes):
  config = ml_collections.ConfigDict(dict(
      name="sklearn_digits", data_dir=data_dir, source_dir="",
      input_key="image", label_key="label", input_scale=16.0,
      train_fraction=1.0, subset_seed=0, augment_max_shift=1,
      augment_flip=False))
  config.update(changes)
  return config


def test_idx_files_round_trip_through_tfds_builder(tiny_idx_dir, tmp_path):
  images = builders.read_idx(str(tiny_idx_dir / "train-images-idx3-ubyte.gz"))
  labels = builders.read_idx(str(tiny_idx_dir / "train-labels-idx1-ubyte.gz"))
  config = _data_config(str(tmp_path / "tfds"), name="fashion_mnist_idx",
                        source_dir=str(tiny_idx_dir), input_scale=255.0)
  source = pipeline.get_source(config, "train")
  # tfds stores records in its own (hashed) order: compare as multisets.
  stored = sorted((source[i]["image"][..., 0].tobytes(), int(source[i]["label"]))
                  for i in range(len(source)))
  assert stored == sorted((im.tobytes(), int(l)) for im, l in zip(images, labels))
  assert len(pipeline.get_source(config, "test")) == 10


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
  config = _data_config(str(tmp_path / "tfds"), name="fashion_mnist_idx",
                        source_dir=str(tmp_path / "nowhere"))
  with pytest.raises(builders.DatasetMissingError,
                     match="apt-get install dataset-fashion-mnist"):
    pipeline.get_source(config, "train")


def test_unknown_tfds_dataset_is_a_clear_error(tmp_path):
  config = _data_config(str(tmp_path), name="no_such_dataset_xyz")
  with pytest.raises(builders.DatasetMissingError, match="no_such_dataset_xyz"):
    pipeline.get_source(config, "train")


def test_digits_builder_is_real_data(data_dir):
  source = pipeline.get_source(_data_config(data_dir), "train")
  assert len(source) == builders.SklearnDigits.NUM_TRAIN
  from sklearn import datasets
  train_images = datasets.load_digits().images[:builders.SklearnDigits.NUM_TRAIN]
  stored = sorted(source[i]["image"][..., 0].tobytes() for i in range(len(source)))
  assert stored == sorted(im.astype(np.uint8).tobytes() for im in train_images)


def test_epochs_cover_the_set_and_reshuffle(data_dir):
  config = _data_config(data_dir, train_fraction=0.1)
  source = pipeline.get_source(config, "train")
  n = pipeline.train_num_records(source, config)
  assert n == 150
  it = iter(pipeline.train_dataset(source, config, global_batch_size=n,
                                   seed=3))
  epoch1, epoch2 = next(it), next(it)
  key = lambda b: sorted(map(bytes, b["inputs"].reshape(n, -1)))
  assert key(epoch1) == key(epoch2)  # Same fixed subset every epoch...
  assert not np.array_equal(epoch1["labels"], epoch2["labels"])  # ...reordered.
  other_seed = next(iter(pipeline.train_dataset(source, config,
                                                global_batch_size=n, seed=4)))
  assert key(other_seed) == key(epoch1)  # The subset does not depend on the seed.


@pytest.mark.parametrize("n,batch,seed", [(10, 3, 0), (17, 17, 2**32 - 1),
                                           (50, 8, 7)])
def test_index_batches_are_exactly_grains_shuffle_repeat_batch(n, batch, seed):
  # The fast path must not change which examples a run sees, nor in what order
  # (earlier runs and checkpoints stay reproducible); epochs cross batches.
  import grain  # pylint: disable=g-import-not-at-top
  indices = np.arange(n) * 3 + 1
  reference = grain.MapDataset.source(indices).shuffle(seed=seed).repeat(
      None).batch(batch, drop_remainder=True)
  fast = pipeline.ShuffledIndexBatches(indices, batch, seed)
  for k in list(range(4 * n // batch + 2)) + [5 * n]:
    np.testing.assert_array_equal(fast[k], reference[k])


def test_iterator_state_restores_the_data_position(data_dir):
  config = _data_config(data_dir)
  source = pipeline.get_source(config, "train")
  ds = pipeline.train_dataset(source, config, global_batch_size=32, seed=0,
                              augment=True)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    np.testing.assert_array_equal(got["labels"], want["labels"])


def test_processes_read_disjoint_shards(data_dir, monkeypatch):
  config = _data_config(data_dir, train_fraction=0.1)
  source = pipeline.get_source(config, "train")
  seen = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda i=index: i)
    batch = next(iter(pipeline.train_dataset(source, config,
                                             global_batch_size=150, seed=0)))
    assert batch["inputs"].shape[0] == 75
    seen.append({bytes(x) for x in batch["inputs"].reshape(75, -1)})
  assert not seen[0] & seen[1]


def test_eval_batches_pad_with_a_mask_and_drop_nothing(data_dir):
  config = _data_config(data_dir)
  source = pipeline.get_source(config, "test")
  batches = list(pipeline.eval_batches(source, config, batch_size=100))
  total = sum(int(b["mask"].sum()) for b in batches)
  assert total == len(source) == 297
  assert all(b["inputs"].shape[0] == 100 for b in batches)
  assert batches[-1]["mask"][97:].sum() == 0
