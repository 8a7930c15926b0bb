"""tfds builders for the datasets kdjax ships, written so TensorFlow is never needed.

Each builder writes `array_record` files with `tfds.features.Tensor` features
(encoding `tfds.features.Image` would need TensorFlow), so the prepared data is
read back with `tfds.data_source` and fed to grain. Prepare once into a data
dir; any other dataset from the tfds catalog prepared elsewhere (e.g. a GCS
data dir on a TPU VM) is read through the same path.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct

import numpy as np
import tensorflow_datasets as tfds

from kdjax.core import errors
from kdjax.data import text

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")


class DatasetMissingError(errors.KdjaxError, FileNotFoundError):
  """The raw files of a dataset are not where the config says."""


def read_idx(path: str) -> np.ndarray:
  """Reads an idx file (the MNIST format), gzipped or not, into a uint8 array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f"{path} is not a uint8 idx file (header {data[:4]!r}).")
  shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_fashion_mnist_files(idx_dir: str) -> dict[str, tuple[str, str]]:
  """Paths of the four idx files, or a DatasetMissingError saying how to get them."""
  paths = {}
  for split, names in _FASHION_MNIST_FILES.items():
    found = []
    for name in names:
      candidates = [os.path.join(idx_dir, name),
                    os.path.join(idx_dir, name[:-len(".gz")])]
      existing = [c for c in candidates if os.path.exists(c)]
      if not existing:
        raise DatasetMissingError(
            f"Fashion-MNIST file {name} not found in {idx_dir!r}. Install it "
            "with `sudo apt-get install dataset-fashion-mnist` (files land in "
            f"{FASHION_MNIST_DEFAULT_DIR}) or point --config.data.source_dir at "
            "a directory holding the four idx files (train-images-idx3-ubyte"
            "[.gz], train-labels-idx1-ubyte[.gz], t10k-...).")
      found.append(existing[0])
    paths[split] = tuple(found)
  return paths


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST read from the standard idx files (Debian's package or any dir)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "From idx files, Tensor features, array_record."}

  def __init__(self, *, source_dir: str = FASHION_MNIST_DEFAULT_DIR, **kwargs):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Files are local; nothing is downloaded.
    paths = find_fashion_mnist_files(self._source_dir)
    return {split: self._generate_examples(*paths[split]) for split in paths}

  def _generate_examples(self, images_path, labels_path):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if len(images) != len(labels):
      raise ValueError(f"{images_path} has {len(images)} images but "
                       f"{labels_path} has {len(labels)} labels.")
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image[..., None], "label": int(label)}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits (1,797 images): a real dataset for fast smoke runs.

  Split deterministically: the first 1,500 rows train, the rest test.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sklearn.datasets.load_digits, 1500/297 split."}
  NUM_TRAIN = 1500

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # Pixel values 0..16 as in the source, kept as uint8.
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = digits.images.astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    n = self.NUM_TRAIN
    return {"train": self._generate_examples(images[:n], labels[:n]),
            "test": self._generate_examples(images[n:], labels[n:])}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}


# Builders kdjax can prepare itself, by the name used in `config.data.name`.
SHIPPED_BUILDERS = {
    "fashion_mnist_idx": FashionMnistIdx,
    "sklearn_digits": SklearnDigits,
    "rotten_tomatoes": text.RottenTomatoes,
}


def prepare(name: str, data_dir: str, source_dir: str | None = None) -> None:
  """Prepares a shipped dataset into `data_dir` once (a no-op if already there)."""
  builder_cls = SHIPPED_BUILDERS[name]
  kwargs = {"source_dir": source_dir} if (
      builder_cls is FashionMnistIdx and source_dir) else {}
  builder = builder_cls(data_dir=data_dir, file_format="array_record", **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))


# ---------------------------------------------------------------------------
# Prompt/completion pairs from JSONL files (kdjax.data.prompts reads them).


class PromptDataError(errors.KdjaxError, ValueError):
  """A prompt/completion file or record kdjax cannot read."""


def read_prompt_jsonl(path: str, prompt_key: str = "prompt",
                      completion_key: str = "completion"
                      ) -> list[tuple[str, str]]:
  """(prompt, completion) of every line of a JSONL file, in file order.

  One JSON object per line, its text under `prompt_key` / `completion_key`
  (strings; other fields are ignored); blank lines are skipped. Errors name
  the file and the 1-based line.
  """
  if not os.path.isfile(path):
    raise DatasetMissingError(f"Prompt file {path!r} does not exist.")
  pairs = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise PromptDataError(f"{where}: not valid JSON ({e.msg} at column "
                              f"{e.colno}).") from None
      if not isinstance(record, dict):
        raise PromptDataError(f"{where}: expected a JSON object with "
                              f"{prompt_key!r} and {completion_key!r}, got "
                              f"{type(record).__name__}.")
      texts = []
      for key in (prompt_key, completion_key):
        if key not in record:
          raise PromptDataError(
              f"{where}: field {key!r} is missing (fields: "
              f"{sorted(record)}); set the prompt/completion field names if "
              "the file uses others.")
        if not isinstance(record[key], str):
          raise PromptDataError(f"{where}: field {key!r} must be a string, "
                                f"got {type(record[key]).__name__}.")
        texts.append(record[key])
      pairs.append((texts[0], texts[1]))
  return pairs


def _split_file_lists(split_files) -> dict[str, tuple[str, ...]]:
  """{split: file or files} -> {split: tuple of files}, splits sorted."""
  if not split_files:
    raise PromptDataError("No prompt files given: pass {split: file(s)}, e.g. "
                          "{'train': 'train.jsonl'}.")
  return {split: (files,) if isinstance(files, str) else tuple(files)
          for split, files in sorted(split_files.items())}


def prompt_files_fingerprint(split_files, prompt_key: str = "prompt",
                             completion_key: str = "completion") -> str:
  """Changes when a file is added, moved between splits, resized or touched,
  or the field names change."""
  h = hashlib.sha256(f"{prompt_key}\0{completion_key}\n".encode("utf-8"))
  for split, files in _split_file_lists(split_files).items():
    for path in files:
      if not os.path.isfile(path):
        raise DatasetMissingError(f"Prompt file {path!r} (split {split!r}) "
                                  "does not exist.")
      st = os.stat(path)
      h.update(f"{split}\0{os.path.abspath(path)}\0{st.st_size}\0"
               f"{st.st_mtime_ns}\n".encode("utf-8"))
  return h.hexdigest()[:16]


class PromptCompletionJsonl(tfds.core.GeneratorBasedBuilder):
  """Prompt/completion pairs from JSONL files, one split per {split: files}.

  Features: `prompt` and `completion` (tfds Text, read back as UTF-8 bytes),
  records in file order (files in the order given: shuffling is off),
  keyed '<file #>:<record #>'.
  Each distinct set of files (and field names) is its own builder config
  (`prompt_files_fingerprint`), so edited files are prepared afresh. Use
  `prompt_jsonl_builder`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "JSONL prompt/completion files, Text features."}

  def __init__(self, *, split_files, prompt_key: str = "prompt",
               completion_key: str = "completion", **kwargs):
    self._split_files = _split_file_lists(split_files)
    self._keys = (prompt_key, completion_key)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Text(),
            "completion": tfds.features.Text(),
        }),
        description="Prompt/completion pairs from JSONL files.",
        disable_shuffling=True,  # File order, not tfds' shuffle by key.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are local; nothing is downloaded.
    return {split: self._generate_examples(files)
            for split, files in self._split_files.items()}

  def _generate_examples(self, files):
    for i, path in enumerate(files):
      for j, (prompt, completion) in enumerate(
          read_prompt_jsonl(path, *self._keys)):
        yield f"{i}:{j}", {"prompt": prompt, "completion": completion}


def prompt_jsonl_builder(split_files, data_dir: str, *,
                         prompt_key: str = "prompt",
                         completion_key: str = "completion"
                         ) -> PromptCompletionJsonl:
  """The builder for these files ({split: path or paths}) in data_dir."""
  config = tfds.core.BuilderConfig(
      name=prompt_files_fingerprint(split_files, prompt_key, completion_key),
      description=", ".join(f"{s}: {list(f)}" for s, f in
                            _split_file_lists(split_files).items()))
  return PromptCompletionJsonl(split_files=split_files, prompt_key=prompt_key,
                               completion_key=completion_key,
                               data_dir=data_dir, file_format="array_record",
                               config=config)
