"""A distilled Llama student's held-out perplexity in kdjax, transformers and
llama.cpp, from kdjax's own HF and GGUF exports (dev-only; not run in CI).

    pip install torch transformers llama-cpp-python   # dev only
    python benchmarks/check_export_perplexity.py \
        --config=on_policy_shakespeare \
        --run_dir=/tmp/kd_shakespeare/kd_seed0 --out=/tmp/kd_export_check

Exports the run's newest student (kdjax/weights/exporters: HF float32, GGUF
f32, f16 and q8_0), then scores the same held-out token windows (the
Shakespeare test plays, packed as the LM pipeline packs them,
kdjax/data/lm.py) with kdjax's own forward pass, transformers'
LlamaForCausalLM reading the HF directory and llama.cpp (llama-cpp-python,
logits of every position) reading each GGUF. Prints perplexity, the max abs
logit difference from kdjax and the argmax agreement per runtime and file,
with the CPU model. A runtime that is not installed is skipped and said so.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import machine_info  # pylint: disable=wrong-import-position
from kdjax.core import defaults  # pylint: disable=wrong-import-position
from kdjax.data import lm, prompts  # pylint: disable=wrong-import-position
from kdjax.run import layout  # pylint: disable=wrong-import-position
from kdjax.weights import resolve, specs  # pylint: disable=wrong-import-position
from kdjax.weights.exporters import gguf_llama, hf_llama  # pylint: disable=wrong-import-position


def _nll(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> tuple:
  """(summed NLL, counted tokens) in float64."""
  x = logits.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  log_p = x - np.log(np.exp(x).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_p, labels[..., None], -1)[..., 0]
  return float(-(picked * mask).sum()), float(mask.sum())


def _windows(config, args) -> dict[str, np.ndarray]:
  tokenizer_path = (prompts.tokenizer_path(config.data)
                    if config.data.get("format", "") == "prompts"
                    else config.data.tokenizer_path)
  data = defaults.lm_data(
      name="shakespeare", tokenizer_path=tokenizer_path,
      seq_length=args.seq_length, max_eval_sequences=args.sequences,
      data_dir=os.path.join(args.out, "data"))
  return lm.lm_eval_arrays(data, "test"), tokenizer_path


def _row(name, logits, reference, windows, seconds):
  nll, count = _nll(logits, windows["labels"], windows["mask"])
  keep = windows["mask"] > 0
  diff = np.abs(logits - reference)[keep].max()
  agree = (logits.argmax(-1) == reference.argmax(-1))[keep].mean()
  return (name, np.exp(nll / count), diff, agree, seconds)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="on_policy_shakespeare")
  parser.add_argument("--run_dir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--sequences", type=int, default=16)
  parser.add_argument("--seq_length", type=int, default=128)
  args = parser.parse_args()

  config = importlib.import_module(f"configs.{args.config}").get_config()
  config = resolve.resolve_config(config)
  model = specs.build_model(config, "student")
  fields = specs.model_kwargs(config, "student")
  if args.seq_length > int(fields.get("max_length", args.seq_length)):
    parser.error(f"--seq_length above the student's max_length "
                 f"{fields['max_length']}")
  params = layout.restore_params(config, model, args.run_dir,
                                 layout.make_mesh(config))
  windows, tokenizer_path = _windows(config, args)
  inputs = windows["inputs"]

  start = time.perf_counter()
  reference = np.asarray(model.apply({"params": params}, inputs),
                         np.float32)
  rows = [_row("kdjax (in process)", reference, reference, windows,
               time.perf_counter() - start)]

  hf_dir = os.path.join(args.out, "hf")
  hf_llama.export_hf(hf_dir, params, fields, tokenizer_path=tokenizer_path,
                     overwrite=True)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count() or 1)
    hf = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, torch_dtype=torch.float32).eval()
    start = time.perf_counter()
    with torch.no_grad():
      logits = hf(torch.as_tensor(inputs, dtype=torch.long)).logits.numpy()
    rows.append(_row(f"transformers {transformers.__version__} (HF f32)",
                     logits, reference, windows, time.perf_counter() - start))
  except ImportError as e:
    print(f"transformers skipped: {e}")

  try:
    import llama_cpp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    llama_cpp = None
    print(f"llama.cpp skipped: {e}")
  for file_type in ("f32", "f16", "q8_0"):
    path = os.path.join(args.out, f"model-{file_type}.gguf")
    gguf_llama.export_gguf(path, params, fields,
                           tokenizer_path=tokenizer_path,
                           file_type=file_type, overwrite=True)
    if llama_cpp is None:
      continue
    llm = llama_cpp.Llama(model_path=path, n_ctx=args.seq_length,
                          logits_all=True, n_threads=os.cpu_count() or 1,
                          n_batch=args.seq_length, verbose=False)
    start = time.perf_counter()
    logits = []
    for row in inputs:
      llm.reset()
      llm.eval([int(t) for t in row])
      logits.append(np.array(llm.scores[:len(row)], np.float32))
    rows.append(_row(f"llama.cpp {llama_cpp.__version__} (GGUF {file_type})",
                     np.stack(logits), reference, windows,
                     time.perf_counter() - start))

  tokens = int(windows["mask"].sum())
  print(f"\nCPU: {machine_info.describe()}; student of "
        f"{args.run_dir}; {len(inputs)} held-out windows of "
        f"{args.seq_length} tokens ({tokens} scored), Shakespeare test plays\n")
  print("| runtime (file) | perplexity | max abs logit diff vs kdjax "
        "| argmax agreement | seconds |")
  print("|---|---|---|---|---|")
  for name, ppl, diff, agree, seconds in rows:
    print(f"| {name} | {ppl:.3f} | {diff:.3g} | {agree:.4f} | "
          f"{seconds:.1f} |")


if __name__ == "__main__":
  main()
