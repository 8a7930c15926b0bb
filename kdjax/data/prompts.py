"""Prompt/completion data for on-policy distillation of language models.

On-policy distillation (GKD) trains a student on (a) its own samples
continuing prompts and (b) off-policy prompt + completion pairs from data.
This module makes both kinds of input from one list of `PromptCompletion`
records:

Sources
  JSONL files       `read_jsonl`: one object per line, text under configurable
                    fields ('prompt' / 'completion').
  tfds              `prepare_jsonl` writes such files as a tfds dataset
                    (builders.PromptCompletionJsonl, array_record, no
                    TensorFlow); `read_tfds` reads any prepared dataset with
                    prompt/completion text fields.
  synthetic tasks   `synthetic_examples('addition' | 'reversal', split, n)`:
                    tasks a small teacher learns from scratch on CPU.
                      addition: prompt '347+58=', completion '405' (operands
                        of min_digits..max_digits decimal digits, no leading
                        zeros; the sum in decimal).
                      reversal: prompt 'abcde>', completion 'edcba' (a string
                        of min_length..max_length characters of `alphabet`).
                    A problem's split is fixed by a SHA-256 of the task and
                    prompt (90/5/5 train/validation/test), for every seed, so
                    the splits are disjoint; the seed picks which problems
                    (unique within a split) and their order.
  shakespeare       `shakespeare_examples(split)`: windows of play lines from
                    text_sources' plays, split BY PLAY as the LM data is
                    (validation/test prompts come from plays never trained
                    on).

Tokens (`encode`; host-side numpy): left-padded prompts [n, P] + lengths for
the sampler, and right-padded causal-LM arrays [n, P+N-1] whose mask covers
exactly the completion tokens and their EOS. `train_batches` / `eval_batches`
iterate over them; `exact_match` scores generated completions.
`write_char_tokenizer` writes a character-level tokenizer.json for the
synthetic tasks, loadable with kdjax.data.tokenizer.load; `tokenizer_hash`
fingerprints a tokenizer's id space to compare teacher and student.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterator, Mapping, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
import tokenizers

from kdjax.core.config import fail
from kdjax.data import builders
from kdjax.data import text_sources
from kdjax.data import tokenizer as tokenizer_lib

PromptDataError = builders.PromptDataError
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class PromptCompletion:
  """One example: the prompt text and the completion that should follow it."""
  prompt: str
  completion: str


# ---------------------------------------------------------------------------
# JSONL files and their tfds dataset.


def read_jsonl(path: str, *, prompt_key: str = "prompt",
               completion_key: str = "completion") -> list[PromptCompletion]:
  """The records of a JSONL file, in order (blank lines skipped).

  A bad line raises PromptDataError naming the file and line.
  """
  return [PromptCompletion(p, c) for p, c in builders.read_prompt_jsonl(
      path, prompt_key, completion_key)]


def prepare_jsonl(split_files: Mapping[str, str | Sequence[str]],
                  data_dir: str, *, prompt_key: str = "prompt",
                  completion_key: str = "completion") -> str:
  """Prepares {split: JSONL file(s)} as a tfds dataset in data_dir (once per
  distinct set of files); returns its name for `read_tfds`/tfds.data_source
  ('prompt_completion_jsonl/<fingerprint>')."""
  builder = builders.prompt_jsonl_builder(
      split_files, data_dir, prompt_key=prompt_key,
      completion_key=completion_key)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return f"{builder.name}/{builder.builder_config.name}"


def read_tfds(name: str, split: str, *, data_dir: str,
              prompt_key: str = "prompt",
              completion_key: str = "completion") -> list[PromptCompletion]:
  """Every record of a prepared (array_record) tfds split, in its order."""
  try:
    source = tfds.data_source(name, data_dir=data_dir, split=split)
  except Exception as e:  # tfds raises several types for a missing dataset.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise builders.DatasetMissingError(
        f"Could not open tfds dataset {name!r} split {split!r} in data dir "
        f"{data_dir!r}: {first} Prepare it first (prepare_jsonl for JSONL "
        "files).") from e
  examples = []
  for start in range(0, len(source), 4096):
    for record in source.__getitems__(
        list(range(start, min(start + 4096, len(source))))):
      missing = [k for k in (prompt_key, completion_key) if k not in record]
      if missing:
        raise PromptDataError(
            f"tfds dataset {name!r} has no field(s) {missing} (fields: "
            f"{sorted(record)}); set prompt_key/completion_key.")
      examples.append(PromptCompletion(_text(record[prompt_key]),
                                       _text(record[completion_key])))
  return examples


def _text(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------
# Synthetic tasks.

ADDITION_ALPHABET = "0123456789+="
REVERSAL_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
REVERSAL_SEPARATOR = ">"
SYNTHETIC_TASKS = ("addition", "reversal")
# SHA-256 bucket (of 20) of a problem -> split: 90/5/5.
_SPLIT_OF_BUCKET = ("train",) * 18 + ("validation", "test")


def problem_split(task: str, prompt: str) -> str:
  """'train', 'validation' or 'test' of a synthetic problem (seed-free)."""
  digest = hashlib.sha256(f"{task}\0{prompt}".encode("utf-8")).digest()
  return _SPLIT_OF_BUCKET[int.from_bytes(digest[:8], "big") % 20]


def _addition_problem(rng: np.random.Generator, min_digits: int,
                      max_digits: int) -> PromptCompletion:
  operands = []
  for _ in range(2):
    digits = int(rng.integers(min_digits, max_digits + 1))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    operands.append(int(rng.integers(low, 10 ** digits)))
  a, b = operands
  return PromptCompletion(f"{a}+{b}=", str(a + b))


def _reversal_problem(rng: np.random.Generator, min_length: int,
                      max_length: int, alphabet: str) -> PromptCompletion:
  length = int(rng.integers(min_length, max_length + 1))
  text = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), length))
  return PromptCompletion(text + REVERSAL_SEPARATOR, text[::-1])


def task_alphabet(task: str, *, alphabet: str = REVERSAL_ALPHABET) -> str:
  """Every character a synthetic task's prompts and completions use."""
  if task == "addition":
    return ADDITION_ALPHABET
  if task == "reversal":
    return alphabet + REVERSAL_SEPARATOR
  raise PromptDataError(f"Unknown synthetic task {task!r}; choose from "
                        f"{SYNTHETIC_TASKS}.")


def synthetic_examples(task: str, split: str, num_examples: int, *,
                       seed: int = 0, min_digits: int = 1,
                       max_digits: int = 3, min_length: int = 3,
                       max_length: int = 8,
                       alphabet: str = REVERSAL_ALPHABET
                       ) -> list[PromptCompletion]:
  """`num_examples` distinct problems of `split`, deterministic per seed.

  addition uses min_digits/max_digits (each operand's digit count is
  uniform in that range, then its value uniform among such numbers);
  reversal uses min_length/max_length/alphabet (length uniform, characters
  uniform). Raises PromptDataError if the split holds fewer distinct
  problems than asked for.
  """
  if split not in SPLITS:
    raise PromptDataError(f"Unknown split {split!r}; choose from {SPLITS}.")
  if num_examples < 0:
    raise PromptDataError(f"num_examples={num_examples} must be >= 0.")
  if task == "addition":
    if not 1 <= min_digits <= max_digits:
      raise PromptDataError(f"addition digits {min_digits}..{max_digits}: "
                            "need 1 <= min_digits <= max_digits.")
    make = lambda rng: _addition_problem(rng, min_digits, max_digits)
  elif task == "reversal":
    if not 1 <= min_length <= max_length:
      raise PromptDataError(f"reversal lengths {min_length}..{max_length}: "
                            "need 1 <= min_length <= max_length.")
    if not alphabet or REVERSAL_SEPARATOR in alphabet:
      raise PromptDataError(f"reversal alphabet {alphabet!r} must be "
                            f"non-empty and not contain "
                            f"{REVERSAL_SEPARATOR!r}.")
    make = lambda rng: _reversal_problem(rng, min_length, max_length, alphabet)
  else:
    raise PromptDataError(f"Unknown synthetic task {task!r}; choose from "
                          f"{SYNTHETIC_TASKS}.")
  rng = np.random.default_rng([int(seed), SPLITS.index(split)])
  examples, seen = [], set()
  for _ in range(100 * num_examples + 10_000):
    if len(examples) == num_examples:
      break
    example = make(rng)
    if example.prompt not in seen and problem_split(task,
                                                    example.prompt) == split:
      seen.add(example.prompt)
      examples.append(example)
  if len(examples) < num_examples:
    raise PromptDataError(
        f"Found only {len(examples)} distinct {task} problems for split "
        f"{split!r}, {num_examples} asked for: ask for fewer or widen the "
        "task (more digits / longer strings).")
  return examples


# ---------------------------------------------------------------------------
# Shakespeare.


def shakespeare_examples(split: str, *, prompt_lines: int = 4,
                         completion_lines: int = 1, max_examples: int = 0,
                         plays_dir: str | None = None
                         ) -> list[PromptCompletion]:
  """Prompts from the plays of `split` (text_sources.play_split: by play).

  Each play's NON-EMPTY lines (text_sources.read_plays' plain text: speaker
  lines 'MACBETH:', headings and stage directions included) are cut into
  consecutive, non-overlapping windows of prompt_lines + completion_lines
  lines: prompt = the first prompt_lines joined with '\\n' plus a final
  '\\n', completion = the rest joined with '\\n'. Plays in name order.
  max_examples > 0 keeps that many, evenly spaced over the split.
  """
  if split not in SPLITS:
    raise PromptDataError(f"Unknown split {split!r}; choose from {SPLITS}.")
  if prompt_lines < 1 or completion_lines < 1:
    raise PromptDataError(f"prompt_lines={prompt_lines} and completion_lines="
                          f"{completion_lines} must be >= 1.")
  plays = text_sources.read_plays(plays_dir or text_sources.find_plays_dir())
  window = prompt_lines + completion_lines
  examples = []
  for name, text in plays.items():
    if text_sources.play_split(name) != split:
      continue
    lines = [line for line in text.splitlines() if line.strip()]
    for start in range(0, len(lines) - window + 1, window):
      examples.append(PromptCompletion(
          "\n".join(lines[start:start + prompt_lines]) + "\n",
          "\n".join(lines[start + prompt_lines:start + window])))
  if 0 < max_examples < len(examples):
    keep = np.linspace(0, len(examples) - 1, max_examples).round().astype(int)
    examples = [examples[i] for i in keep]
  return examples


# ---------------------------------------------------------------------------
# Tokenizers.

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHAR_SPECIAL_TOKENS = (PAD, EOS, UNK)  # Ids 0, 1, 2; characters from 3.


def write_char_tokenizer(directory: str, alphabet: str) -> str:
  """Writes <directory>/tokenizer.json: one token per character; returns it.

  Ids: '<pad>' 0, '<eos>' 1 (kdjax.data.tokenizer.resolve_eos_id finds it
  for eos_id=-1), '<unk>' 2 (characters outside the alphabet), then the
  alphabet's characters in order (repeats dropped). A BPE model with no
  merges and no pre-tokenizer, so every character is a token (spaces and
  newlines included), and a Fuse decoder, so decoding joins them back.
  """
  chars = list(dict.fromkeys(alphabet))
  if not chars:
    raise PromptDataError("The character tokenizer needs a non-empty "
                          "alphabet.")
  vocab = {token: i for i, token in enumerate(CHAR_SPECIAL_TOKENS)}
  vocab.update({c: len(CHAR_SPECIAL_TOKENS) + i for i, c in enumerate(chars)})
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab, [], unk_token=UNK, fuse_unk=False))
  tokenizer.add_special_tokens([
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t in CHAR_SPECIAL_TOKENS])
  tokenizer.decoder = tokenizers.decoders.Fuse()
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "tokenizer.json")
  tokenizer.save(path)
  return path


def tokenizer_hash(tokenizer) -> str:
  """SHA-256 (hex) of a tokenizer's id space: its vocabulary as (token, id)
  pairs sorted by id, added tokens included, and which ids are special.

  Equal hashes mean the same token behind every id (what teacher and student
  logits must share); how text is split into tokens (merges, normalisation)
  is not covered.
  """
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  special = sorted(i for i, t in tokenizer.get_added_tokens_decoder().items()
                   if t.special)
  blob = json.dumps({"vocab": sorted(([t, i] for t, i in vocab.items()),
                                     key=lambda p: (p[1], p[0])),
                     "special": special}, ensure_ascii=False,
                    separators=(",", ":"))
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------
# Encoding.


@dataclasses.dataclass(frozen=True)
class EncodedPrompts:
  """Token arrays of n examples (host numpy), P = max_prompt_length,
  N = max_completion_length, T = P + N - 1.

  prompts: int32 [n, P], LEFT-padded with pad_id (for the sampler).
  prompt_lengths: int32 [n], real tokens in each row of `prompts` (>= 1).
  inputs, labels: int32 [n, T], the sequence prompt + completion + EOS,
    RIGHT-padded with pad_id to P + N: inputs = seq[:-1], labels = seq[1:].
  mask: float32 [n, T], 1 exactly where the label is a completion token or
    the EOS after it.
  completion_lengths: int32 [n], completion tokens kept (EOS not counted).
  prompt_texts, completions: the texts (completions: the references of
    `exact_match`, uncut).
  prompts_cut / completions_cut: how many prompts / completions were too long.
  """
  prompts: np.ndarray
  prompt_lengths: np.ndarray
  inputs: np.ndarray
  labels: np.ndarray
  mask: np.ndarray
  completion_lengths: np.ndarray
  prompt_texts: tuple[str, ...]
  completions: tuple[str, ...]
  prompts_cut: int
  completions_cut: int
  eos_id: int
  pad_id: int

  def __len__(self) -> int:
    return len(self.prompt_lengths)

  def arrays(self) -> dict[str, np.ndarray]:
    """The per-example arrays by name (what the batch iterators slice)."""
    return {k: getattr(self, k) for k in _ARRAY_FIELDS}


_ARRAY_FIELDS = ("prompts", "prompt_lengths", "inputs", "labels", "mask",
                 "completion_lengths")


def encode(examples: Sequence[PromptCompletion], tokenizer, *,
           max_prompt_length: int, max_completion_length: int,
           eos_id: int, pad_id: int = 0) -> EncodedPrompts:
  """Tokenises prompts and completions (separately, no special tokens).

  A prompt longer than P = max_prompt_length keeps its LAST P tokens (the
  ones next to the completion); a completion longer than
  N - 1 = max_completion_length - 1 keeps its FIRST N - 1, leaving room for
  EOS. Both cuts are counted. eos_id = -1 takes the tokenizer's own
  (tokenizer.resolve_eos_id). Use a tokenizer from kdjax.data.tokenizer.load
  (padding and truncation off). An empty prompt is an error.
  """
  p, n_max = int(max_prompt_length), int(max_completion_length)
  if p < 1 or n_max < 1:
    raise PromptDataError(
        f"max_prompt_length={p} and max_completion_length={n_max} must be "
        ">= 1 (the completion length counts its EOS).")
  if tokenizer.padding is not None or tokenizer.truncation is not None:
    raise PromptDataError("The tokenizer pads or truncates; load it with "
                          "kdjax.data.tokenizer.load (both off).")
  eos_id = tokenizer_lib.resolve_eos_id(tokenizer, int(eos_id))
  vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
  if not 0 <= pad_id < vocab_size:
    raise PromptDataError(f"pad_id={pad_id} is not an id of the tokenizer "
                          f"(vocabulary of {vocab_size}).")
  examples = list(examples)
  count, length = len(examples), p + n_max - 1
  prompt_ids = [e.ids for e in tokenizer.encode_batch(
      [x.prompt for x in examples], add_special_tokens=False)]
  completion_ids = [e.ids for e in tokenizer.encode_batch(
      [x.completion for x in examples], add_special_tokens=False)]
  prompts = np.full((count, p), pad_id, np.int32)
  sequences = np.full((count, length + 1), pad_id, np.int32)
  mask = np.zeros((count, length), np.float32)
  prompt_lengths = np.zeros(count, np.int32)
  completion_lengths = np.zeros(count, np.int32)
  prompts_cut = completions_cut = 0
  for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
    if not prompt:
      raise PromptDataError(f"Example {i} has an empty prompt "
                            f"({examples[i].prompt!r} has no tokens).")
    prompts_cut += len(prompt) > p
    completions_cut += len(completion) > n_max - 1
    prompt, completion = prompt[-p:], completion[:n_max - 1]
    lp, lc = len(prompt), len(completion)
    prompts[i, p - lp:] = prompt
    sequences[i, :lp + lc + 1] = prompt + completion + [eos_id]
    mask[i, lp - 1:lp + lc] = 1.0  # Labels seq[lp .. lp + lc].
    prompt_lengths[i], completion_lengths[i] = lp, lc
  return EncodedPrompts(
      prompts=prompts, prompt_lengths=prompt_lengths,
      inputs=np.ascontiguousarray(sequences[:, :-1]),
      labels=np.ascontiguousarray(sequences[:, 1:]), mask=mask,
      completion_lengths=completion_lengths,
      prompt_texts=tuple(x.prompt for x in examples),
      completions=tuple(x.completion for x in examples),
      prompts_cut=int(prompts_cut), completions_cut=int(completions_cut),
      eos_id=int(eos_id), pad_id=int(pad_id))


# ---------------------------------------------------------------------------
# Batches.


class _GatherRows(grain.transforms.Map):
  """A batch of example indices -> the arrays' rows (+ 'index')."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self._arrays = arrays

  def map(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    rows = np.asarray(rows)
    batch = {k: v[rows] for k, v in self._arrays.items()}
    batch["index"] = rows.astype(np.int32)
    return batch


def train_batches(encoded: EncodedPrompts, *, global_batch_size: int,
                  seed: int) -> grain.IterDataset:
  """Infinite host-local batches of this process's share, reshuffled per epoch.

  Batches: encoded.arrays() rows plus 'index' (int32 [B], the examples'
  rows in `encoded`), B = global_batch_size // jax.process_count(). Process p
  reads examples p, p + P, ... (as kdjax.data.lm does); batches may cross
  an epoch boundary. The iterator's get_state()/set_state() is the data
  position for a checkpoint.
  """
  num_processes = jax.process_count()
  if global_batch_size < 1 or global_batch_size % num_processes:
    raise ValueError(f"Global batch size {global_batch_size} must be >= 1 and "
                     f"divisible by the number of processes {num_processes}.")
  share = np.arange(len(encoded))[jax.process_index()::num_processes]
  if not len(share):
    raise PromptDataError(
        f"{len(encoded)} examples leave none for process "
        f"{jax.process_index()} of {num_processes}; use more examples.")
  # As in kdjax.data.lm: explicit indices, shuffled and batched, then one
  # gather per batch.
  ds = grain.MapDataset.source(share).shuffle(seed=seed).repeat(None)
  ds = ds.batch(global_batch_size // num_processes, drop_remainder=True)
  return ds.map(_GatherRows(encoded.arrays())).to_iter_dataset()


def eval_batches(encoded: EncodedPrompts, batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every example in order (every process gets all), in whole batches.

  Batches as train_batches' plus 'weight' (float32 [B]: 1 for a real
  example). The last batch is padded with copies of its first row (valid
  prompts for a sampler) with weight 0, mask 0 and index -1.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  arrays, n = encoded.arrays(), len(encoded)
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    pad = batch_size - len(rows)
    padded = np.concatenate([rows, np.full(pad, start)])
    batch = {k: v[padded] for k, v in arrays.items()}
    weight = np.zeros(batch_size, np.float32)
    weight[:len(rows)] = 1.0
    batch["mask"] = batch["mask"] * weight[:, None]
    batch["index"] = np.concatenate([rows, np.full(pad, -1)]).astype(np.int32)
    batch["weight"] = weight
    yield batch


# ---------------------------------------------------------------------------
# Scoring.


def decode_completions(tokenizer, generated: np.ndarray, eos_id: int
                       ) -> list[str]:
  """Each row of generated ids [n, N] decoded up to (not incl.) its first EOS.

  Special tokens other than EOS are kept in the text, so a stray pad or
  unknown token is never silently dropped.
  """
  generated = np.asarray(generated)
  if generated.ndim != 2:
    raise ValueError(f"generated must be [n, N] token ids, got shape "
                     f"{generated.shape}.")
  texts = []
  for row in generated.tolist():
    end = row.index(eos_id) if eos_id in row else len(row)
    texts.append(tokenizer.decode(row[:end], skip_special_tokens=False))
  return texts


def exact_match(tokenizer, generated: np.ndarray, references: Sequence[str],
                eos_id: int) -> np.ndarray:
  """bool [n]: the decoded completion (decode_completions) equals the
  reference, both stripped of surrounding whitespace."""
  texts = decode_completions(tokenizer, generated, eos_id)
  if len(texts) != len(references):
    raise ValueError(f"{len(texts)} generated rows but {len(references)} "
                     "references.")
  return np.asarray([t.strip() == r.strip() for t, r in zip(texts, references)],
                    bool)


# --- From config.data (format='prompts'). ------------------------------------


def tokenizer_path(data_config) -> str:
  """The tokenizer of a prompts config: data.tokenizer_path, or for the
  synthetic tasks (when empty) a character tokenizer written once under
  data_dir/<task>_chars_<alphabet hash> (another alphabet, another file:
  its new characters would otherwise all read as '<unk>')."""
  path = str(data_config.get("tokenizer_path", ""))
  if path or data_config.name not in SYNTHETIC_TASKS:
    if not path:
      raise PromptDataError(
          f"config.data.tokenizer_path is empty; data.name="
          f"{data_config.name!r} needs one (tokenizer.json, an HF directory "
          "or a .gguf)")
    return path
  alphabet = task_alphabet(data_config.name, **_alphabet_option(data_config))
  digest = hashlib.sha256(alphabet.encode("utf-8")).hexdigest()[:12]
  directory = os.path.join(_data_dir(data_config),
                           f"{data_config.name}_chars_{digest}")
  target = os.path.join(directory, "tokenizer.json")
  if not os.path.exists(target):
    write_char_tokenizer(directory, alphabet)
  return target


def _data_dir(data_config) -> str:
  return os.path.expanduser(str(data_config.get("data_dir", "")) or os.environ.get(
      "TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _alphabet_option(data_config) -> dict:
  options = dict(data_config.get("task_options", {}) or {})
  return {"alphabet": options["alphabet"]} if "alphabet" in options else {}


def examples_for(data_config, split: str) -> list[PromptCompletion]:
  """The records of `split` as config.data names them.

  data.name: 'addition' | 'reversal' (data.num_examples[split] problems,
  data.task_options), 'shakespeare' (data.task_options: prompt_lines,
  completion_lines; data.num_examples[split] caps, 0 = all), 'jsonl'
  (data.files = {split: path}, prepared once as a tfds dataset under
  data_dir), or a prepared tfds dataset with prompt/completion fields.
  """
  name = data_config.name
  counts = dict(data_config.get("num_examples", {}) or {})
  options = dict(data_config.get("task_options", {}) or {})
  keys = dict(prompt_key=str(data_config.get("prompt_key", "prompt")),
              completion_key=str(data_config.get("completion_key",
                                                 "completion")))
  if name in SYNTHETIC_TASKS:
    if split not in counts:
      raise PromptDataError(
          f"config.data.num_examples has no {split!r} entry: how many "
          f"{name} problems to draw for it")
    return synthetic_examples(name, split, int(counts[split]),
                              seed=int(data_config.get("subset_seed", 0)),
                              **options)
  if name == "shakespeare":
    return shakespeare_examples(split, max_examples=int(counts.get(split, 0)),
                                **options)
  if name == "jsonl":
    files = dict(data_config.get("files", {}) or {})
    if not files:
      raise PromptDataError("config.data.files is empty: give "
                            "{split: path to a .jsonl file}")
    name = prepare_jsonl(files, _data_dir(data_config), **keys)
  return read_tfds(name, split, data_dir=_data_dir(data_config), **keys)


def load_split(data_config, split: str, tokenizer=None) -> EncodedPrompts:
  """`split` of config.data tokenised (`encode`) with its tokenizer."""
  if tokenizer is None:
    tokenizer = tokenizer_lib.load(tokenizer_path(data_config))
  return encode(examples_for(data_config, split), tokenizer,
                max_prompt_length=int(data_config.max_prompt_length),
                max_completion_length=int(data_config.max_completion_length),
                eos_id=int(data_config.get("eos_id", -1)),
                pad_id=int(data_config.get("pad_id", 0)))


def validate(data_config) -> None:
  """config.data of format 'prompts': lengths consistent, the source named."""
  p = int(data_config.get("max_prompt_length", 0))
  n = int(data_config.get("max_completion_length", 0))
  if p < 1:
    fail("data.max_prompt_length", p, ">= 1")
  if n < 2:
    fail("data.max_completion_length", n, ">= 2 (a token and its EOS)")
  if int(data_config.seq_length) != p + n - 1:
    fail("data.seq_length", data_config.seq_length,
         f"max_prompt_length + max_completion_length - 1 = {p + n - 1} "
         "(the training rows hold prompt + completion, shifted by one)")
  counts = dict(data_config.get("num_examples", {}) or {})
  if data_config.name in SYNTHETIC_TASKS:
    for split in (data_config.train_split, data_config.eval_split):
      if int(counts.get(split, 0)) < 1:
        fail(f"data.num_examples.{split}", counts.get(split),
             f"how many {data_config.name} problems to draw (>= 1)")
  if data_config.name == "jsonl" and not dict(data_config.get("files", {})
                                              or {}):
    fail("data.files", {}, "{split: path to a .jsonl file} for name='jsonl'")
