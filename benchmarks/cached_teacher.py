"""Online vs cached-teacher distillation on the language-model config.

    python benchmarks/cached_teacher.py [--workdir=/tmp/kd_cache_bench]
        [--steps=40] [--seq_length=128] [--batch=8] [--k=64]
        [--student_layers=0] [--preset=hour]

configs/shakespeare_smollm2.py (SmolLM2-135M teacher from its GGUF, a Llama
student, Shakespeare) at a reduced setting: one epoch = --steps steps of
--batch sequences of --seq_length tokens (data.train_fraction picks that many
training sequences), the student trained for exactly one epoch, three ways
in one process, each timed:

  1. mode=cache_teacher: the teacher's top --k log-probs at T, per token
     (bfloat16 values, uint16 indices, float32 log tail) for the epoch's
     sequences; cache building is counted separately;
  2. mode=distill, online: teacher forward inside every step;
  3. mode=distill from the cache (config.distill.teacher_cache): no teacher.

Prints, per run: wall time of the whole run (startup, compile, training,
final evaluation) and of one epoch of training steps at the steady rate
(from metrics.jsonl: every logged interval but the first, which includes
compilation, scaled to --steps), the cache's storage bytes per token
(shard files / cached tokens; 260 by the encoding at k = 64 plus 8 bytes per
sequence and array_record's framing) and the held-out perplexity of both
students on config.data.eval_split (its first data.max_eval_sequences).
Results go to WORKDIR/results.json too. Runs already finished in WORKDIR are
not repeated (delete it to re-measure).
"""

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "configs")]

from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position

from kdjax import modes  # pylint: disable=g-import-not-at-top,wrong-import-position
from kdjax.core import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from kdjax.data import lm  # pylint: disable=g-import-not-at-top,wrong-import-position
from kdjax.runtime import metrics_writer, storage  # pylint: disable=g-import-not-at-top,wrong-import-position
from kdjax.weights import resolve  # pylint: disable=g-import-not-at-top,wrong-import-position


def _config(args) -> ml_collections.ConfigDict:
  import shakespeare_smollm2  # pylint: disable=g-import-not-at-top
  config = resolve.resolve_config(shakespeare_smollm2.get_config(args.preset))
  config.data.seq_length = args.seq_length
  num = lm.num_train_sequences(config.data)  # All training sequences.
  wanted = args.steps * args.batch
  if wanted > num:
    raise SystemExit(f"--steps x --batch = {wanted} sequences, the training "
                     f"split has {num} of {args.seq_length} tokens.")
  changes = {
      "data.train_fraction": wanted / num,  # round() gives exactly `wanted`.
      "student.train.batch_size": args.batch,
      "student.train.num_steps": args.steps,
      "student.train.warmup_steps": min(args.steps // 4, 10),
      "cache.k": args.k, "cache.dtype": "bfloat16",
      "cache.batch_size": args.batch,
      "cache.chunk_size": int(config.student.train.loss_chunk_size),
      "cache.dir": os.path.join(args.workdir, "cache"),
      "eval_every_steps": args.steps, "log_every_steps": args.log_every,
      "checkpoint.every_steps": args.steps}
  if args.student_layers:
    changes["student.model.num_layers"] = args.student_layers
  return config_lib.set_fields(config, changes)


def _run(config, mode, workdir, **changes):
  run = ml_collections.ConfigDict(config.to_dict())
  config_lib.set_fields(run, dict(mode=mode, **changes))
  done = os.path.join(workdir, "benchmark_run.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  start = time.time()
  result = modes.run(run, workdir)
  result = {"wall_seconds": time.time() - start, "summary": result}
  storage.write_json(done, result)
  return result


def _epoch_seconds(workdir: str, steps: int) -> float:
  """Seconds for `steps` steps at the steady rate (intervals after the first)."""
  records = [r for r in metrics_writer.read_metrics(workdir)
             if r["split"] == "train"]
  steady, previous = [], 0
  for i, r in enumerate(records):
    interval = r["step"] - previous
    previous = r["step"]
    if i:  # The first interval includes compilation.
      steady.append((interval, interval / r["steps_per_second"]))
  if not steady:
    raise SystemExit("Need at least two logged intervals: lower --log_every.")
  return steps * sum(s for _, s in steady) / sum(n for n, _ in steady)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/kd_cache_bench")
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--seq_length", type=int, default=128)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--k", type=int, default=64)
  parser.add_argument("--student_layers", type=int, default=0,
                      help="0 = the preset's student")
  parser.add_argument("--log_every", type=int, default=5)
  parser.add_argument("--preset", default="hour")
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)
  config = _config(args)

  cache = _run(config, "cache_teacher", args.workdir)
  manifest = cache["summary"]
  online_dir = os.path.join(args.workdir, "online")
  cached_dir = os.path.join(args.workdir, "cached")
  online = _run(config, "distill", online_dir)
  cached = _run(config, "distill", cached_dir,
                **{"distill.teacher_cache": config.cache.dir})

  tokens = manifest["records"] * manifest["positions_per_record"]
  rows = [
      ("build the cache (teacher forward, once)", cache["wall_seconds"], None,
       None),
      ("distill, online teacher", online["wall_seconds"],
       _epoch_seconds(online_dir, args.steps),
       online["summary"]["eval"]["perplexity"]),
      ("distill, cached teacher", cached["wall_seconds"],
       _epoch_seconds(cached_dir, args.steps),
       cached["summary"]["eval"]["perplexity"]),
  ]
  print(f"\nconfigs/shakespeare_smollm2.py:{args.preset}, student "
        f"{config.student.model.num_layers} layers, one epoch = {args.steps} "
        f"steps x {args.batch} sequences x {args.seq_length} tokens "
        f"({tokens} tokens), T = {config.distill.temperature:g}, "
        f"alpha = {config.distill.alpha:g}, k = {args.k}\n")
  print("| run | wall time of the run (s) | one epoch of steps (s) | "
        "held-out perplexity |")
  print("|---|---|---|---|")
  for name, wall, epoch, ppl in rows:
    print(f"| {name} | {wall:.0f} | {'-' if epoch is None else f'{epoch:.1f}'}"
          f" | {'-' if ppl is None else f'{ppl:.2f}'} |")
  speedup = rows[1][2] / rows[2][2]
  print(f"\nCached / online epoch speed-up: {speedup:.2f}x. Cache: "
        f"{manifest['bytes']:,} bytes for {tokens:,} tokens = "
        f"{manifest['bytes_per_token']:.1f} bytes per token at k = {args.k} "
        f"(encoding: {2 * args.k + 2 * args.k + 4} + 8 per sequence; "
        f"vocabulary {manifest['vocab_size']:,}, "
        f"{manifest['encoding']['indices']} indices; at most 300: "
        f"{'yes' if manifest['bytes_per_token'] <= 300 else 'NO'}).")
  perplexity_of = {"online": rows[1][3], "cached": rows[2][3]}
  results = {"args": vars(args), "tokens": tokens,
             "bytes_per_token": manifest["bytes_per_token"],
             "cache_build_seconds": cache["wall_seconds"],
             "online": {"wall_seconds": rows[1][1], "epoch_seconds": rows[1][2]},
             "cached": {"wall_seconds": rows[2][1], "epoch_seconds": rows[2][2]},
             "perplexity": perplexity_of, "speedup": speedup}
  storage.write_json(os.path.join(args.workdir, "results.json"), results)


if __name__ == "__main__":
  main()
