"""A whitespace word-level tokenizer for text tests: id = 2 + word number."""

import tokenizers
from tokenizers import models, pre_tokenizers

EOS = 1  # '<eos>'; 0 is '[UNK]'.


def write(path, words) -> str:
  """Saves the tokenizer for `words` at `path` (tokenizer.json); returns it."""
  vocab = {"[UNK]": 0, "<eos>": EOS, **{w: i + 2 for i, w in enumerate(words)}}
  tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.save(str(path))
  return str(path)
