"""Packing a split's text into fixed-length token windows, and its cache.

Every record's text is tokenised WITHOUT the tokenizer's special tokens,
followed by one end-of-document id (eos_id); the records of a split are
concatenated in the data source's (fixed) order into one token stream, cut
into consecutive, non-overlapping windows of seq_length + 1 tokens:
inputs = window[:-1], labels = window[1:], mask = 1 where the label is a real
token. The final window is padded (with eos_id, mask 0) on every split, so
no text is dropped (at most one partly padded sequence per split; the loss
normalises by the mask). Tokens are never predicted across a window
boundary: a window's first token is only an input, so every token but
those (1 in seq_length + 1) is a label exactly once per epoch.

The token stream of a split is computed once and cached as
`<tfds dataset dir>/lm_tokens/<split>-<fingerprint>.npy` (+ a .json of
counts), written atomically. The fingerprint covers the dataset (full name,
split, record count, input_key), the tokenizer file's SHA-256, the tokenizers
library version and eos_id, but NOT seq_length: the windows are cut from the
cached stream on load (instant), so a new seq_length re-packs without
re-tokenising. A data dir that is not a writable local directory (gs://)
caches under ~/.cache/kdjax/lm_tokens instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Iterable

from absl import logging
import numpy as np
import tokenizers

from kdjax.data import builders
from kdjax.data import text_sources
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.runtime import storage


def tokenizer_file(path: str) -> str:
  """The tokenizer file behind config.data.tokenizer_path."""
  try:
    return tokenizer_lib.tokenizer_file(path)
  except tokenizer_lib.TokenizerMissingError as e:
    raise tokenizer_lib.TokenizerMissingError(
        f"config.data.tokenizer_path: {e}") from None


@dataclasses.dataclass(frozen=True)
class PackedSplit:
  """A split's token stream cut into windows of seq_length + 1 tokens.

  windows: int32 [num_sequences, seq_length + 1], the stream in order, the
  last window padded with eos_id. num_tokens: length of the real stream.
  stats: documents, characters, tokens, eos_id, sequences, seq_length.
  """
  windows: np.ndarray
  num_tokens: int
  seq_length: int
  stats: dict[str, Any]

  @property
  def num_sequences(self) -> int:
    return len(self.windows)

  def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """{'inputs', 'labels': int32 [n, L], 'mask': float32 [n, L]} of rows."""
    rows = np.asarray(rows, np.int64)
    windows = self.windows[rows]
    width = self.seq_length + 1
    label_pos = rows[:, None] * width + 1 + np.arange(self.seq_length)
    return {"inputs": np.ascontiguousarray(windows[:, :-1]),
            "labels": np.ascontiguousarray(windows[:, 1:]),
            "mask": (label_pos < self.num_tokens).astype(np.float32)}


def pack(tokens: np.ndarray, seq_length: int, pad_id: int) -> np.ndarray:
  """A token stream -> [N, L + 1] consecutive windows, the last one padded.

  N = ceil((T - 1) / (L + 1)): every window holds at least one label (a
  lone final token, which would predict nothing, is not given a window).
  """
  width = seq_length + 1
  num = max(0, -(-(len(tokens) - 1) // width))
  out = np.full(num * width, pad_id, np.int32)
  real = min(len(tokens), num * width)
  out[:real] = tokens[:real]
  return out.reshape(num, width)


def _cache_dir(source) -> str:
  """<dataset dir>/lm_tokens, or a local fallback if that is not writable."""
  data_dir = str(source.dataset_info.data_dir)
  if "://" not in data_dir and os.access(data_dir, os.W_OK):
    return os.path.join(data_dir, "lm_tokens")
  return os.path.join(os.path.expanduser("~/.cache/kdjax/lm_tokens"),
                      source.dataset_info.full_name.replace("/", "_"))


def _fingerprint(data_config, split: str, source, tokenizer_sha: str) -> str:
  key = json.dumps({
      "format": 1,
      "dataset": source.dataset_info.full_name,
      "split": split,
      "records": len(source),
      "input_key": data_config.input_key,
      "tokenizer_sha256": tokenizer_sha,
      "tokenizers": tokenizers.__version__,
      "eos_id": int(data_config.eos_id),
  }, sort_keys=True)
  return hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]


def _read_texts(source, input_key: str, chunk: int) -> Iterable[list[str]]:
  for start in range(0, len(source), chunk):
    records = source.__getitems__(
        list(range(start, min(start + chunk, len(source)))))
    if input_key not in records[0]:
      raise KeyError(
          f"config.data.input_key={input_key!r} is not a field of the "
          f"records (fields: {sorted(records[0])}).")
    yield [r[input_key].decode("utf-8") if isinstance(r[input_key], bytes)
           else str(r[input_key]) for r in records]


def token_stream(data_config, split: str, *, source=None
                 ) -> tuple[np.ndarray, dict[str, Any]]:
  """The split's tokens (each record's + eos_id, concatenated) and counts.

  Computed once per (dataset, split, tokenizer, eos_id) and cached as .npy.
  """
  if source is None:
    source = text_sources.get_text_source(data_config, split)
  tok_path = tokenizer_file(data_config.tokenizer_path)
  tok_sha = storage.file_sha256(tok_path)
  fingerprint = _fingerprint(data_config, split, source, tok_sha)
  base = os.path.join(_cache_dir(source),
                      f"{re.sub(r'[^A-Za-z0-9_.-]', '_', split)}-{fingerprint}")
  if os.path.exists(base + ".npy") and os.path.exists(base + ".json"):
    with open(base + ".json", encoding="utf-8") as f:
      stats = json.load(f)
    return np.load(base + ".npy"), stats

  tokenizer = tokenizer_lib.load(tok_path)
  eos_id = tokenizer_lib.resolve_eos_id(tokenizer, int(data_config.eos_id))
  pieces, documents, characters = [], 0, 0
  for texts in _read_texts(source, data_config.input_key, chunk=64):
    texts = [t for t in texts if t.strip()]
    documents += len(texts)
    characters += sum(len(t) for t in texts)
    if texts:
      pieces.extend(tokenizer_lib.tokenize_documents(tokenizer, texts,
                                                     eos_id))
  if not documents:
    raise builders.DatasetMissingError(
        f"Split {split!r} of dataset {data_config.name!r} has no text under "
        f"config.data.input_key={data_config.input_key!r} "
        f"({len(source)} records, all empty).")
  tokens = np.concatenate(pieces).astype(np.int32)
  stats = {"dataset": source.dataset_info.full_name, "split": split,
           "documents": documents, "characters": characters,
           "tokens": int(len(tokens)), "eos_id": eos_id,
           "tokenizer_sha256": tok_sha}
  # The .json first: the .npy's presence marks a complete entry.
  storage.write_bytes(base + ".json", json.dumps(stats, indent=1).encode())
  with storage.atomic_path(base + ".npy") as tmp, open(tmp, "wb") as f:
    np.save(f, tokens)
  return tokens, stats


def packed_split(data_config, split: str) -> PackedSplit:
  """The split's token stream cut into windows of config.data.seq_length + 1.

  With config.data.train_windows_file set, the training split is that .npy
  of ready windows instead (e.g. teacher-generated text, kdjax.run.seqkd).
  """
  seq_length = int(data_config.seq_length)
  if seq_length < 1:
    raise ValueError(f"config.data.seq_length={seq_length} is invalid: must "
                     "be >= 1.")
  windows_file = data_config.get("train_windows_file", "")
  if windows_file and split == data_config.train_split:
    return windows_split(windows_file, seq_length)
  tokens, stats = token_stream(data_config, split)
  windows = pack(tokens, seq_length, pad_id=stats["eos_id"])
  stats = dict(stats, sequences=len(windows), seq_length=seq_length)
  logging.info(
      "LM data %s[%s]: %d documents, %d characters, %d tokens (with eos "
      "%d), %d sequences of %d+1.", stats["dataset"], split,
      stats["documents"], stats["characters"], stats["tokens"],
      stats["eos_id"], len(windows), seq_length)
  return PackedSplit(windows=windows, num_tokens=int(len(tokens)),
                     seq_length=seq_length, stats=stats)


def windows_split(path: str, seq_length: int) -> PackedSplit:
  """A .npy of int32 [N, seq_length + 1] windows, every label counted."""
  if not os.path.exists(path):
    raise text_sources.TextSourceMissingError(
        f"config.data.train_windows_file={path!r} does not exist (make it "
        "with mode='generate_text').")
  windows = np.load(path).astype(np.int32)
  if windows.ndim != 2 or windows.shape[1] != seq_length + 1:
    raise ValueError(
        f"{path} holds windows of shape {windows.shape}; "
        f"config.data.seq_length={seq_length} needs [N, {seq_length + 1}].")
  stats = {"dataset": path, "documents": len(windows), "characters": 0,
           "tokens": int(windows.size), "eos_id": -1,
           "sequences": len(windows), "seq_length": seq_length}
  return PackedSplit(windows=windows, num_tokens=int(windows.size),
                     seq_length=seq_length, stats=stats)
