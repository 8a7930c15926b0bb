"""kdjax.data.augment: Tang et al. 2019's transfer-set operations.

Hand-built inputs for each operation, determinism per seed, the
probabilities over many words, and the tfds split the pipeline reads.
"""

import collections

import ml_collections
import numpy as np
import pytest

from kdjax.core.config import ConfigError
from kdjax.data import augment, pipeline

WORDS = [f"w{i}" for i in range(2000)]


def _only(**probabilities) -> augment.Settings:
  return augment.Settings(**{"p_mask": 0.0, "p_pos": 0.0, "p_ng": 0.0,
                             **probabilities})


def _groups() -> augment.FrequencyGroups:
  # the: 8 (group 3), film/movie/plot: 4 (group 2), good/bad: 2 (group 1),
  # rare: 1 (group 0, alone).
  return augment.FrequencyGroups({"the": 8, "film": 4, "movie": 4, "plot": 4,
                                  "good": 2, "bad": 2, "rare": 1})


def test_split_and_join_keep_words_and_punctuation():
  tokens = augment.split_words("A film, isn't it? 10/10!")
  assert tokens == ["A", "film", ",", "isn't", "it", "?", "10", "/", "10", "!"]
  assert [augment.is_word(t) for t in tokens] == [
      True, True, False, True, True, False, True, False, True, False]
  assert augment.join_words(tokens) == "A film , isn't it ? 10 / 10 !"


def test_masking_replaces_words_only():
  tokens = ["the", "film", ",", "good", "!"]
  out = augment.augment_tokens(tokens, np.random.default_rng(0),
                               _only(p_mask=1.0), _groups())
  assert out == ["[MASK]", "[MASK]", ",", "[MASK]", "!"]


def test_replacement_takes_another_word_of_the_same_frequency_group():
  groups = _groups()
  assert groups.group("Film") == ["film", "movie", "plot"]
  rng = np.random.default_rng(0)
  seen = collections.Counter()
  for _ in range(300):
    out = augment.augment_tokens(["film", "good", "rare", "."], rng,
                                 _only(p_pos=1.0), groups)
    assert out[1:] == ["bad", "rare", "."]  # good's only peer; rare alone.
    seen[out[0]] += 1
  assert set(seen) == {"movie", "plot"}  # Never itself; both peers drawn.
  assert min(seen.values()) > 100


def test_ngram_sampling_keeps_a_contiguous_piece_of_1_to_5_tokens():
  tokens = [f"t{i}" for i in range(12)]
  rng = np.random.default_rng(0)
  lengths = collections.Counter()
  for _ in range(500):
    out = augment.augment_tokens(tokens, rng, _only(p_ng=1.0), _groups())
    start = tokens.index(out[0])
    assert out == tokens[start:start + len(out)]
    lengths[len(out)] += 1
  assert sorted(lengths) == [1, 2, 3, 4, 5]
  short = augment.augment_tokens(["a", "b"], np.random.default_rng(1),
                                 _only(p_ng=1.0), _groups())
  assert short in (["a"], ["b"], ["a", "b"])  # n >= 2 keeps a 2-token text.


def test_probabilities_are_respected_over_many_words():
  groups = augment.FrequencyGroups({w: 1 for w in WORDS})
  settings = augment.Settings(p_mask=0.1, p_pos=0.1, p_ng=0.0)
  rng = np.random.default_rng(0)
  masked = replaced = 0
  n = 0
  for _ in range(10):
    out = augment.augment_tokens(WORDS, rng, settings, groups)
    masked += sum(o == "[MASK]" for o in out)
    replaced += sum(o not in ("[MASK]", w) for o, w in zip(out, WORDS))
    n += len(WORDS)
  # 20,000 words: standard error of a 0.1 rate ~ 0.002.
  assert masked / n == pytest.approx(0.1, abs=0.01)
  assert replaced / n == pytest.approx(0.1, abs=0.01)
  cut = sum(len(augment.augment_tokens(
      WORDS[:20], rng, augment.Settings(p_mask=0, p_pos=0, p_ng=0.25),
      groups)) < 20 for _ in range(2000))
  assert cut / 2000 == pytest.approx(0.25, abs=0.03)


def test_copies_are_deterministic_per_seed_distinct_and_not_the_original():
  texts = ["A bracing, unblinking work that serves as a painful elegy.",
           "It aimlessly attempts to fuse three dull plots into one.", "Ok."]
  groups = augment.FrequencyGroups.from_texts(texts)
  settings = augment.Settings(copies=6, seed=3)
  first = [augment.augment_text(t, i, settings, groups)
           for i, t in enumerate(texts)]
  assert first == [augment.augment_text(t, i, settings, groups)
                   for i, t in enumerate(texts)]
  # A text's copies do not depend on the other texts or their order.
  assert augment.augment_text(texts[1], 1, settings, groups) == first[1]
  other = [augment.augment_text(t, i, augment.Settings(copies=6, seed=4),
                                groups) for i, t in enumerate(texts)]
  assert other != first
  for text, copies in zip(texts, first):
    assert len(copies) == len(set(copies)) <= 6
    assert text not in copies
    assert augment.join_words(augment.split_words(text)) not in copies
  assert len(first[0]) >= 4  # A long text rarely repeats a draw.

  examples = list(augment.transfer_examples(
      [(t, i % 2) for i, t in enumerate(texts)], settings))
  assert [e[:2] for e in examples[:1 + len(first[0])]] == [
      (0, c) for c in range(1 + len(first[0]))]
  assert [e[2] for e in examples if e[0] == 0] == [texts[0]] + first[0]
  assert {e[3] for e in examples if e[0] == 1} == {1}  # The source's label.


def test_settings_are_validated():
  good = ml_collections.ConfigDict(dict(copies=2, seed=0, p_mask=0.1))
  augment.validate(good)
  for bad, field in ((dict(copies=-1), "copies"), (dict(p_ng=1.5), "p_ng"),
                     (dict(p_mask=0.6, p_pos=0.6), "p_pos"),
                     (dict(max_ngram=0), "max_ngram"),
                     (dict(colour="red"), "colour")):
    with pytest.raises(ConfigError, match=f"data.transfer_set.{field}"):
      augment.validate(ml_collections.ConfigDict(bad))


def test_the_pipeline_reads_the_stored_split(tmp_path):
  """A mocked source split -> the prepared 'train_augmented' split: originals
  first, copies after, the settings in the builder config's name."""
  texts = [(f"review number {i} was a rather good film , said the critic .",
            i % 2) for i in range(6)]

  class Source:  # What tfds.data_source gives: records with bytes text.
    def __len__(self):
      return len(texts)

    def __getitems__(self, indices):
      return [{"text": texts[i][0].encode(), "label": texts[i][1]}
              for i in indices]

  data = ml_collections.ConfigDict(dict(
      name="mock", data_dir=str(tmp_path), input_key="text",
      label_key="label", num_classes=2, tokenizer_dir="unused",
      cache_in_memory=False, train_split=augment.SPLIT,
      transfer_set=dict(copies=2, seed=1)))
  original = pipeline.get_source

  def get_source(config, split):
    return Source() if split == "train" else original(config, split)

  pipeline.get_source, saved = get_source, pipeline.get_source
  try:
    source = pipeline.get_source(data, augment.SPLIT)
  finally:
    pipeline.get_source = saved
  records = source.__getitems__(list(range(len(source))))
  assert [r["copy"] for r in records if r["source_index"] == 0][0] == 0
  originals = [r["text"].decode() for r in records if r["copy"] == 0]
  assert originals == [t for t, _ in texts]
  assert 6 < len(records) <= 18
  assert [int(r["label"]) for r in records] == [
      texts[r["source_index"]][1] for r in records]
  name = source.dataset_info.full_name
  assert name.startswith("augmented_transfer_set/mock_n2_s1_")
