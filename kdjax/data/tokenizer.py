"""Tokenizers: the one loader, for tokenizer.json, an HF directory or a .gguf.

Every path that needs a tokenizer (text classification data, language-model
data and its token cache, teacher-written text, prompt initialisation, the
HF and GGUF weight importers) loads it here, so the same file always gives
the same tokens. The GGUF metadata reader lives here too: a .gguf carries its
tokenizer, and the Llama importer reads its fields with the same function.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from kdjax.core import errors


class TokenizerError(errors.KdjaxError, ValueError):
  """A tokenizer kdjax cannot rebuild (e.g. a GGUF vocabulary type)."""


class TokenizerMissingError(TokenizerError, FileNotFoundError):
  """No tokenizer file at the path given."""


# GGUF tokenizer.ggml.pre -> (pre-tokenizer kind, BPE ignore_merges). See
# llama.cpp's llama-vocab.cpp for what each name means there.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                 r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|"
                 r"\s+")
_GGUF_PRE = {
    "default": ("gpt2", False),
    "gpt2": ("gpt2", False),
    "smollm": ("digits+gpt2", False),  # Every digit alone, then GPT-2's regex.
    "llama-bpe": ("llama3", True),
}
# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4


def _tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("HF `tokenizers` is needed: pip install tokenizers") from e
  return tokenizers


def gguf_module():
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Reading GGUF files needs the `gguf` package: "
                      "pip install gguf") from e
  return gguf


_REQUIRED = object()


def gguf_value(reader, key: str, default: Any = _REQUIRED,
               error: type[Exception] = TokenizerError) -> Any:
  """A GGUF metadata value; float32 scalars as their shortest decimal (1e-05,
  not 9.999999747378752e-06: the value the original config held). A missing
  key without a default raises `error`."""
  field = reader.fields.get(key)
  if field is None:
    if default is _REQUIRED:
      raise error(f"GGUF metadata lacks {key!r}.")
    return default
  value = field.contents()
  if field.types == [gguf_module().GGUFValueType.FLOAT32]:
    value = float(str(np.float32(value)))
  return value


def tokenizer_file(path: str) -> str:
  """The file holding the tokenizer: tokenizer.json (or a directory holding
  one) or a .gguf."""
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise TokenizerMissingError(
        f"{path!r} does not exist: give a tokenizer.json, a HF-format "
        "directory holding one, or a .gguf file.")
  return path


def load(path: str):
  """tokenizers.Tokenizer from a tokenizer.json, a HF directory or a .gguf,
  with padding and truncation off (kdjax's data pipelines set their own)."""
  path = tokenizer_file(path)
  if path.endswith(".gguf"):
    tokenizer = from_gguf(gguf_module().GGUFReader(path))
  else:
    tokenizer = _tokenizers().Tokenizer.from_file(path)
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return tokenizer


def from_gguf(reader):
  """Byte-level BPE from tokenizer.ggml.{tokens,merges,token_type,pre}.

  Control and user-defined tokens become added tokens (matched whole, never
  split); BOS/EOS are added by encode() only if the file's add_bos_token /
  add_eos_token say so (SmolLM2's say no).
  """
  tk = _tokenizers()
  model = gguf_value(reader, "tokenizer.ggml.model", None)
  if model != "gpt2":
    raise TokenizerError(
        f"GGUF tokenizer.ggml.model={model!r}: only byte-level BPE ('gpt2', "
        "as in SmolLM and Llama 3) can be rebuilt; point the loader at "
        "the model's tokenizer.json instead.")
  pre = gguf_value(reader, "tokenizer.ggml.pre", "default")
  if pre not in _GGUF_PRE:
    raise TokenizerError(f"GGUF tokenizer.ggml.pre={pre!r}; supported: "
                          f"{sorted(_GGUF_PRE)} (or use a tokenizer.json).")
  kind, ignore_merges = _GGUF_PRE[pre]
  tokens = gguf_value(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in gguf_value(reader,
                                                   "tokenizer.ggml.merges")]
  types = gguf_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tokenizer = tk.Tokenizer(tk.models.BPE(vocab, merges, fuse_unk=False,
                                         ignore_merges=ignore_merges))
  byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                           use_regex=kind != "llama3")
  if kind == "digits+gpt2":
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif kind == "llama3":
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Split(tk.Regex(LLAMA3_SPLIT), behavior="isolated"),
         byte_level])
  else:
    tokenizer.pre_tokenizer = byte_level
  tokenizer.decoder = tk.decoders.ByteLevel()
  tokenizer.add_special_tokens([
      tk.AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
      for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)])

  bos = gguf_value(reader, "tokenizer.ggml.bos_token_id", None)
  eos = gguf_value(reader, "tokenizer.ggml.eos_token_id", None)
  add_bos = bool(gguf_value(reader, "tokenizer.ggml.add_bos_token", False))
  add_eos = bool(gguf_value(reader, "tokenizer.ggml.add_eos_token", False))
  processors = [tk.processors.ByteLevel(trim_offsets=False)]
  if (add_bos and bos is not None) or (add_eos and eos is not None):
    first = [tokens[bos]] if add_bos else []
    last = [tokens[eos]] if add_eos else []
    single = " ".join(first + ["$A"] + last)
    pair = " ".join(first + ["$A"] + last + first + ["$B:1"] + last)
    specials = sorted({(tokens[i], i) for i, on in ((bos, add_bos),
                                                    (eos, add_eos)) if on})
    processors.append(tk.processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials))
  tokenizer.post_processor = tk.processors.Sequence(processors)
  return tokenizer


# Tried in order when eos_id = -1.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


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
