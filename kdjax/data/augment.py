"""Transfer sets for text distillation: augmented copies of the training texts.

Tang et al. 2019 ("Distilling task-specific knowledge from BERT into simple
neural networks", section 3.3) distil on a transfer set: the training
sentences plus augmented copies, labelled by the teacher. One augmented copy
of a text is drawn like this (their procedure, their default probabilities):

  1. The text is split into words and punctuation (`split_words`; word =
     letters/digits with inner apostrophes, "isn't"). For each WORD, draw
     X ~ U[0, 1):
       X < p_mask                    masking: the word becomes [MASK]
                                     (p_mask = 0.1);
       p_mask <= X < p_mask + p_pos  replacement by a word of the same part
                                     of speech (p_pos = 0.1); see below;
     else the word stays. At most one of the two per word. Punctuation is
     kept as it is.
  2. With probability p_ng (0.25) the result is cut to one random contiguous
     n-gram of its tokens, n uniform in {1, ..., max_ngram} (5); a text of
     at most n tokens is kept whole.
  3. The tokens are joined by single spaces ("film , isn't it ?"): the
     WordPiece pre-tokeniser splits punctuation anyway, so the token ids of
     an unchanged text are those of the original.

`copies` (N; Tang et al. up to 20, 2-4 fit a CPU budget) draws are made per
text; a draw equal to the original or to an earlier draw is dropped (Tang et
al.: "duplicates discarded"), so a text gets at most N copies. The transfer
set is every original text (unchanged, copy 0) followed by its copies, all
with the original's label (the teacher relabels them; a student trained on
the copies should not read those labels).

Part of speech without a tagger: no POS tagger with its model can be
installed offline here (nltk's and spaCy's taggers download their data; the
packages that re-upload it are unofficial), so replacement uses a word of
similar corpus frequency instead: the lowercased words of the source texts
are grouped by floor(log2(count)), and a word is replaced by another word of
its group drawn uniformly (frequent function words trade places with each
other, rare content words with rare words). A word alone in its group is
kept.

Deterministic: copy c of source text i depends only on (seed, i, the text,
the frequency groups), through numpy's PCG64 seeded with [seed, i], not on
other texts, the order they are processed in or the machine.

Stored as a dataset: `AugmentedTransferSet`, a tfds builder with one split,
`SPLIT` ('train_augmented'), prepared next to the source dataset in the
tfds data dir; each distinct source + settings is its own builder config
(`transfer_set_name`), so changed settings prepare a new set. The data
pipeline opens it when config.data.train_split = 'train_augmented'
(kdjax.data.pipeline.get_source, settings in config.data.transfer_set).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import re
from typing import Callable, Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from kdjax.core.config import fail

SPLIT = "train_augmented"  # The split name that selects a transfer set.
MASK_TOKEN = "[MASK]"  # BERT WordPiece vocabularies' mask token.
_TOKEN_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a transfer set is drawn (config.data.transfer_set; module docstring)."""
  copies: int = 4  # N: draws per source text (duplicates dropped).
  seed: int = 0
  p_mask: float = 0.1
  p_pos: float = 0.1  # Same-frequency-group replacement.
  p_ng: float = 0.25
  max_ngram: int = 5
  mask_token: str = MASK_TOKEN
  base_split: str = "train"  # The source split.
  max_source_examples: int = 0  # > 0: only the first N source texts (tests).

  @classmethod
  def from_config(cls, section) -> "Settings":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(section).items() if k in fields}
    return cls(**values)


def validate(section, field: str = "data.transfer_set") -> None:
  """Raises ConfigError naming a bad transfer-set setting."""
  known = {f.name for f in dataclasses.fields(Settings)}
  for key in dict(section):
    if key not in known:
      fail(f"{field}.{key}", section[key], f"unknown; allowed: {sorted(known)}")
  s = Settings.from_config(section)
  if isinstance(s.copies, bool) or not isinstance(s.copies, int) or s.copies < 0:
    fail(f"{field}.copies", s.copies, "must be an int >= 0")
  for name in ("p_mask", "p_pos", "p_ng"):
    value = getattr(s, name)
    if not 0.0 <= float(value) <= 1.0:
      fail(f"{field}.{name}", value, "must be a probability in [0, 1]")
  if s.p_mask + s.p_pos > 1.0:
    fail(f"{field}.p_pos", s.p_pos,
         f"p_mask + p_pos must be <= 1 (p_mask={s.p_mask})")
  if s.max_ngram < 1:
    fail(f"{field}.max_ngram", s.max_ngram, "must be >= 1")
  if s.max_source_examples < 0:
    fail(f"{field}.max_source_examples", s.max_source_examples,
         "must be >= 0 (0 = every source text)")
  if not s.mask_token:
    fail(f"{field}.mask_token", s.mask_token, "must be a non-empty token")


# ----------------------------------------------------------------------------
# The operations.
# ----------------------------------------------------------------------------


def split_words(text: str) -> list[str]:
  """Words (letters/digits, inner apostrophes) and punctuation marks, in order."""
  return _TOKEN_RE.findall(text)


def is_word(token: str) -> bool:
  return token[:1].isalnum() or token[:1] == "_"


def join_words(tokens: Sequence[str]) -> str:
  return " ".join(tokens)


class FrequencyGroups:
  """Words grouped by floor(log2(count)) over source texts: the stand-in for
  a part-of-speech tagger (module docstring)."""

  def __init__(self, counts: dict[str, int]):
    self.counts = dict(counts)
    groups: dict[int, list[str]] = collections.defaultdict(list)
    for word in sorted(self.counts):  # Sorted: independent of text order.
      groups[self.group_of_count(self.counts[word])].append(word)
    self._groups = dict(groups)
    self._position = {w: i for ws in self._groups.values()
                      for i, w in enumerate(ws)}

  @classmethod
  def from_texts(cls, texts: Iterable[str]) -> "FrequencyGroups":
    counts = collections.Counter(
        t.lower() for text in texts for t in split_words(text) if is_word(t))
    return cls(counts)

  @staticmethod
  def group_of_count(count: int) -> int:
    return int(math.floor(math.log2(max(int(count), 1))))

  def group(self, word: str) -> list[str]:
    """The words of `word`'s group (an unseen word: the count-1 group)."""
    key = self.group_of_count(self.counts.get(word.lower(), 1))
    return self._groups.get(key, [])

  def replace(self, word: str, rng: np.random.Generator) -> str:
    """Another word of the same group, uniformly; the word itself if alone."""
    lower = word.lower()
    words = self.group(lower)
    own = self._position.get(lower) if lower in self.counts else None
    others = len(words) - (own is not None)
    if others <= 0:
      return word
    j = int(rng.integers(others))
    if own is not None and j >= own:
      j += 1  # Skip the word itself.
    return words[j]

  def fingerprint(self) -> str:
    data = json.dumps(sorted(self.counts.items()), ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


def augment_tokens(tokens: Sequence[str], rng: np.random.Generator,
                   settings: Settings, groups: FrequencyGroups) -> list[str]:
  """One augmented draw of a tokenised text (steps 1 and 2 of the docstring)."""
  out = []
  for token in tokens:
    if is_word(token):
      x = rng.random()
      if x < settings.p_mask:
        out.append(settings.mask_token)
        continue
      if x < settings.p_mask + settings.p_pos:
        out.append(groups.replace(token, rng))
        continue
    out.append(token)
  if rng.random() < settings.p_ng:
    n = int(rng.integers(1, settings.max_ngram + 1))
    if n < len(out):
      start = int(rng.integers(0, len(out) - n + 1))
      out = out[start:start + n]
  return out


def example_rng(seed: int, index: int) -> np.random.Generator:
  """The random stream of source text `index` (PCG64 seeded with [seed, index])."""
  return np.random.default_rng([int(seed), int(index)])


def augment_text(text: str, index: int, settings: Settings,
                 groups: FrequencyGroups) -> list[str]:
  """Up to settings.copies distinct augmented copies of source text `index`
  (none equal to the original), in draw order."""
  tokens = split_words(text)
  rng = example_rng(settings.seed, index)
  seen = {join_words(tokens), text}
  copies = []
  for _ in range(settings.copies):
    candidate = join_words(augment_tokens(tokens, rng, settings, groups))
    if candidate and candidate not in seen:
      seen.add(candidate)
      copies.append(candidate)
  return copies


def transfer_examples(examples: Sequence[tuple[str, int]], settings: Settings,
                      groups: FrequencyGroups | None = None
                      ) -> Iterable[tuple[int, int, str, int]]:
  """(source index, copy, text, label): each source text (copy 0) then its
  augmented copies (1, 2, ...)."""
  if groups is None:
    groups = FrequencyGroups.from_texts(t for t, _ in examples)
  for i, (text, label) in enumerate(examples):
    yield i, 0, text, label
    for c, copy in enumerate(augment_text(text, i, settings, groups), start=1):
      yield i, c, copy, label


# ----------------------------------------------------------------------------
# The stored dataset.
# ----------------------------------------------------------------------------


def transfer_set_name(source_name: str, num_source: int, settings: Settings
                      ) -> str:
  """The builder config name: the source dataset (tfds full name and size)
  and every setting, hashed (a change prepares a new set)."""
  data = json.dumps({"source": source_name, "num_source": int(num_source),
                     **dataclasses.asdict(settings)}, sort_keys=True)
  digest = hashlib.sha256(data.encode("utf-8")).hexdigest()[:12]
  base = re.sub(r"[^a-z0-9]+", "_",
                source_name.split("/")[0].split(":")[0].lower())
  return f"{base}_n{settings.copies}_s{settings.seed}_{digest}"


class AugmentedTransferSet(tfds.core.GeneratorBasedBuilder):
  """A source split's texts and their augmented copies (module docstring).

  Features: the source's text and label keys (Text, ClassLabel), plus
  `source_index` (int64: the text's index in the source split) and `copy`
  (int32: 0 = the original). One split, SPLIT, in generation order (tfds'
  shuffling off). Build with `transfer_builder`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Tang et al. 2019 masking, frequency-group "
                            "replacement, n-gram sampling."}

  def __init__(self, *, read_source: Callable[[], list[tuple[str, int]]],
               settings: Settings, num_classes: int, input_key: str,
               label_key: str, **kwargs):
    self._read_source = read_source
    self._settings = settings
    self._num_classes = int(num_classes)
    self._keys = (input_key, label_key)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text_key, label_key = self._keys
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            text_key: tfds.features.Text(),
            label_key: tfds.features.ClassLabel(num_classes=self._num_classes),
            "source_index": tfds.features.Tensor(shape=(), dtype=np.int64),
            "copy": tfds.features.Tensor(shape=(), dtype=np.int32),
        }),
        description="Augmented transfer set (kdjax.data.augment).",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    text_key, label_key = self._keys
    examples = self._read_source()
    for i, c, text, label in transfer_examples(examples, self._settings):
      yield f"{i:08d}:{c:03d}", {text_key: text, label_key: int(label),
                                 "source_index": i, "copy": c}


def transfer_builder(*, data_dir: str, source_name: str,
                     read_source: Callable[[], list[tuple[str, int]]],
                     num_source: int, settings: Settings, num_classes: int,
                     input_key: str = "text", label_key: str = "label"
                     ) -> AugmentedTransferSet:
  """The builder of this source + settings in data_dir (prepare it with
  download_and_prepare; read it with as_data_source(split=SPLIT)).

  `read_source` returns the source's (text, label) pairs, in split order,
  at most settings.max_source_examples of them when that is > 0.
  """
  config = tfds.core.BuilderConfig(
      name=transfer_set_name(source_name, num_source, settings),
      description=json.dumps({"source": source_name,
                              **dataclasses.asdict(settings)}))
  return AugmentedTransferSet(read_source=read_source, settings=settings,
                              num_classes=num_classes, input_key=input_key,
                              label_key=label_key, data_dir=data_dir,
                              file_format="array_record", config=config)
