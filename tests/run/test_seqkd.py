"""Teacher-written training text (kdjax.run.seqkd, mode=generate_text).

A tiny random Llama teacher continues hand-made training windows over a
word-level vocabulary (tests/word_tokenizer.py). Only the teacher's
checkpoint and the packed training text are replaced (params and windows
made here). Checked: which prompts are taken, the windows written (prompt,
then the teacher's tokens, in order across batches), greedy text against a
reference decoded here without the KV cache, the same seed giving the same
text and another seed other text, EOS being an ordinary token (packed text
has one between documents; generation neither stops nor pads there), the
decoded samples, meta.json, resuming from finished parts, and the errors.
"""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from kdjax.core import config as config_lib
from kdjax.data import packing
from kdjax.models import generate, llama
from kdjax.run import lm_report, seqkd
from kdjax.models.partitioning import unbox
import word_tokenizer

WORDS = ("the", "king", "is", "dead", "long", "live")
VOCAB = len(WORDS) + 2  # [UNK] 0, <eos> 1, the words 2...
EOS = word_tokenizer.EOS
SEQ, PROMPT, ROWS = 8, 3, 12  # Windows of SEQ + 1 tokens.
TEACHER = dict(vocab_size=VOCAB, width=16, num_layers=1, num_heads=2,
               num_kv_heads=1, mlp_dim=24, max_length=16)


def _decode(ids) -> str:
  """The word tokenizer's decode, written out: ids -> words, spaces."""
  names = ("[UNK]", "<eos>") + WORDS
  return " ".join(names[i] for i in ids)


def _source_windows() -> np.ndarray:
  """Training windows: words, an EOS inside row 2's prompt and row 5's
  text (documents meet there), rows 0 and 4 with the same prompt."""
  rng = np.random.default_rng(0)
  windows = rng.integers(2, VOCAB, (ROWS, SEQ + 1)).astype(np.int32)
  windows[2, 1] = EOS
  windows[5, 6] = EOS
  windows[4, :PROMPT] = windows[0, :PROMPT]
  return windows


def _teacher():
  """A tiny Llama and random params (numpy; shapes traced, nothing
  compiled), the embedding large enough for peaked next-token logits."""
  model = llama.Llama(**TEACHER)
  shapes = unbox(jax.eval_shape(model.init, jax.random.key(0),
                                np.zeros((1, SEQ), np.int32))["params"])
  rng = np.random.default_rng(7)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return (1.0 + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
    std = 0.4 if name == "embedding" else 0.5 / np.sqrt(leaf.shape[0])
    return (std * rng.normal(size=leaf.shape)).astype(np.float32)
  return model, jax.tree_util.tree_map_with_path(draw, shapes)


TEACHER_MODEL, TEACHER_PARAMS = _teacher()


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  return word_tokenizer.write(
      tmp_path_factory.mktemp("seqkd_tok") / "tokenizer.json", WORDS)


def _config(tokenizer_path, **seqkd) -> ml_collections.ConfigDict:
  settings = dict(num_sequences=10, prompt_length=PROMPT, temperature=0.0,
                  top_k=0, top_p=1.0, batch_size=4)
  settings.update(seqkd)
  return ml_collections.ConfigDict(dict(
      seed=3,
      data=dict(seq_length=SEQ, train_split="train",
                tokenizer_path=tokenizer_path,
                # As the pipeline's seqkd variant sets it: the prompts must
                # still come from the real training text.
                train_windows_file="/elsewhere/teacher_text/windows.npy"),
      teacher=dict(init_from="", checkpoint_dir=""),
      seqkd=settings))


@pytest.fixture
def fakes(monkeypatch):
  """The training text and the teacher; records what was asked of them."""
  calls = {"packed_split": [], "load_teacher": 0, "generate": 0}

  def packed_split(data_config, split):
    calls["packed_split"].append((split, data_config.train_windows_file))
    windows = _source_windows()
    return packing.PackedSplit(windows=windows, num_tokens=windows.size,
                               seq_length=SEQ, stats={})

  def load_teacher(config, workdir, mesh):
    del config, workdir, mesh
    calls["load_teacher"] += 1
    return TEACHER_MODEL, TEACHER_PARAMS

  real_generate = generate.generate

  def counted_generate(*args, **kwargs):
    calls["generate"] += 1
    return real_generate(*args, **kwargs)

  monkeypatch.setattr(packing, "packed_split", packed_split)
  monkeypatch.setattr(lm_report, "load_teacher", load_teacher)
  monkeypatch.setattr(generate, "generate", counted_generate)
  return calls


def _written(workdir):
  return np.load(seqkd.windows_path(workdir))


def _greedy_reference(prompts: np.ndarray, new_tokens: int) -> np.ndarray:
  """Greedy continuation without the KV cache: the full causal forward of
  the text so far (right-padded; padding cannot reach earlier positions),
  the argmax at its last real position, appended, again."""
  forward = jax.jit(lambda p, x: TEACHER_MODEL.apply({"params": p}, x))
  text = np.zeros((len(prompts), SEQ + 1), np.int32)
  text[:, :PROMPT] = prompts
  for position in range(PROMPT, PROMPT + new_tokens):
    logits = np.asarray(forward(TEACHER_PARAMS, text), np.float64)
    last = logits[:, position - 1]
    top2 = np.sort(last, -1)[:, -2:]
    assert np.min(top2[:, 1] - top2[:, 0]) > 1e-4  # No near-tie.
    text[:, position] = last.argmax(-1)
  return text


def test_greedy_windows_prompts_then_the_teachers_tokens(
    tokenizer_path, fakes, tmp_path):
  workdir = str(tmp_path)
  config = _config(tokenizer_path)
  meta = seqkd.generate_text(config, workdir)

  # The prompts: the first num_sequences windows of the real training text.
  assert fakes["packed_split"] == [("train", "")]
  assert config.data.train_windows_file.endswith("windows.npy")  # Unchanged.
  windows = _written(workdir)
  source = _source_windows()
  assert windows.shape == (10, SEQ + 1) and windows.dtype == np.int32
  np.testing.assert_array_equal(windows[:, :PROMPT], source[:10, :PROMPT])
  # Batches of 4, 4, 2, in order; each the teacher's greedy text.
  expected = _greedy_reference(source[:10, :PROMPT], SEQ + 1 - PROMPT)
  np.testing.assert_array_equal(windows, expected)
  assert fakes["generate"] == 3
  parts = sorted(os.listdir(os.path.join(workdir, seqkd.SUBDIR, "parts")))
  assert parts == ["00000000-00000004.npy", "00000004-00000008.npy",
                   "00000008-00000010.npy"]
  np.testing.assert_array_equal(
      np.load(os.path.join(workdir, seqkd.SUBDIR, "parts", parts[2])),
      windows[8:])
  # Not the training text: the teacher wrote the rest.
  assert (windows[:, PROMPT:] != source[:10, PROMPT:]).mean() > 0.5

  with open(os.path.join(workdir, seqkd.SUBDIR, "meta.json")) as f:
    assert json.load(f) == meta
  assert meta["teacher"] == os.path.join(workdir, "teacher")
  assert (meta["num_sequences"], meta["prompt_length"], meta["new_tokens"],
          meta["seq_length"]) == (10, PROMPT, SEQ + 1 - PROMPT, SEQ)
  assert meta["sampling"] == {"temperature": 0.0, "top_k": 0, "top_p": 1.0}

  # The first five windows, decoded: prompt >>> continuation.
  with open(os.path.join(workdir, seqkd.SUBDIR, "samples.txt")) as f:
    samples = f.read()
  assert samples == "\n\n----\n\n".join(
      _decode(w[:PROMPT]) + " >>> " + _decode(w[PROMPT:])
      for w in expected[:5]) + "\n"
  assert "<eos>" in samples.split("\n\n----\n\n")[2]  # Row 2's prompt.


def test_same_seed_same_text_other_seed_other_text(tokenizer_path, fakes,
                                                   tmp_path):
  def run(seed, name):
    config = _config(tokenizer_path, temperature=2.0, num_sequences=50)
    config.seed = seed
    seqkd.generate_text(config, str(tmp_path / name))
    return _written(str(tmp_path / name))

  first, again, other = run(3, "a"), run(3, "b"), run(4, "c")
  # num_sequences beyond the text: every window, once.
  assert first.shape == (ROWS, SEQ + 1)
  np.testing.assert_array_equal(first[:, :PROMPT],
                                _source_windows()[:, :PROMPT])
  np.testing.assert_array_equal(first, again)
  assert (first[:, PROMPT:] != other[:, PROMPT:]).mean() > 0.3
  np.testing.assert_array_equal(first[:, :PROMPT], other[:, :PROMPT])
  # Rows 0 and 4 share a prompt but not a batch: each batch draws anew.
  assert (first[0, PROMPT:] != first[4, PROMPT:]).any()

  # EOS is an ordinary token of packed text: rows go on after one.
  generated = first[:, PROMPT:]
  after_eos = [row[np.argmax(row == EOS) + 1:] for row in generated
               if (row[:-1] == EOS).any()]
  assert after_eos, "no EOS generated: pick another seed"
  assert any((rest != EOS).any() for rest in after_eos)


def test_restart_keeps_finished_work(tokenizer_path, fakes, tmp_path):
  workdir = str(tmp_path)
  config = _config(tokenizer_path)
  meta = seqkd.generate_text(config, workdir)
  full = _written(workdir)
  assert fakes["load_teacher"] == 1 and fakes["generate"] == 3

  # windows.npy present: nothing is generated, the meta is read back.
  assert seqkd.generate_text(config, workdir) == meta
  assert fakes["load_teacher"] == 1 and fakes["generate"] == 3

  # Interrupted: no windows.npy, the last part missing. Finished parts are
  # kept as they are (marked here), only the missing one is generated.
  parts = os.path.join(workdir, seqkd.SUBDIR, "parts")
  os.remove(seqkd.windows_path(workdir))
  os.remove(os.path.join(parts, "00000008-00000010.npy"))
  marked = np.full((4, SEQ + 1), 7, np.int32)
  np.save(os.path.join(parts, "00000004-00000008.npy"), marked)
  seqkd.generate_text(config, workdir)
  assert fakes["generate"] == 4
  resumed = _written(workdir)
  np.testing.assert_array_equal(resumed[4:8], marked)
  np.testing.assert_array_equal(np.delete(resumed, np.s_[4:8], 0),
                                np.delete(full, np.s_[4:8], 0))


def test_restart_with_another_batch_size_writes_each_window_once(
    tokenizer_path, fakes, tmp_path):
  """Lowering batch_size after an interrupted run (e.g. out of memory):
  parts of the old size are not reused as if they were of the new one."""
  workdir = str(tmp_path)
  seqkd.generate_text(_config(tokenizer_path), workdir)
  full = _written(workdir)
  os.remove(seqkd.windows_path(workdir))
  parts = os.path.join(workdir, seqkd.SUBDIR, "parts")
  os.remove(os.path.join(parts, sorted(os.listdir(parts))[-1]))
  seqkd.generate_text(_config(tokenizer_path, batch_size=2), workdir)
  again = _written(workdir)
  assert again.shape == full.shape == (10, SEQ + 1)
  np.testing.assert_array_equal(again, full)  # Greedy: the same text.


@pytest.mark.parametrize("pretrained", [True, False])
def test_meta_names_the_teacher_that_wrote_the_text(tokenizer_path, fakes,
                                                    tmp_path, pretrained):
  """Imported weights used as they are: their path. A teacher trained from
  them: its run directory, not the weights it started from."""
  config = _config(tokenizer_path)
  config.teacher.update(init_from="llama:/weights", pretrained=pretrained)
  meta = seqkd.generate_text(config, str(tmp_path))
  assert meta["teacher"] == ("llama:/weights" if pretrained
                             else os.path.join(str(tmp_path), "teacher"))


@pytest.mark.parametrize("prompt_length", [0, SEQ + 1])
def test_prompt_length_out_of_range(tokenizer_path, fakes, tmp_path,
                                    prompt_length):
  config = _config(tokenizer_path, prompt_length=prompt_length)
  with pytest.raises(config_lib.ConfigError, match="prompt_length"):
    seqkd.generate_text(config, str(tmp_path))
  assert fakes["load_teacher"] == 0


def test_remote_workdir_is_refused(tokenizer_path, fakes):
  with pytest.raises(config_lib.ConfigError, match="remote"):
    seqkd.generate_text(_config(tokenizer_path), "gs://bucket/run")
  assert fakes["packed_split"] == []


def test_prompt_length_equal_to_seq_length_generates_one_token(
    tokenizer_path, fakes, tmp_path):
  config = _config(tokenizer_path, prompt_length=SEQ, num_sequences=4)
  meta = seqkd.generate_text(config, str(tmp_path))
  windows = _written(str(tmp_path))
  assert meta["new_tokens"] == 1 and windows.shape == (4, SEQ + 1)
  np.testing.assert_array_equal(windows[:, :SEQ], _source_windows()[:4, :SEQ])
