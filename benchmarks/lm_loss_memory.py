"""Peak memory of the token-level distillation loss: full logits vs chunked.

    python benchmarks/lm_loss_memory.py [--vocab=49152 --length=512 --batch=8]
        [--student_width=576 --teacher_width=576] [--chunk_sizes=32,64,128]
        [--dtype=float32] [--no_run] [--platform=cpu]

Compiles value_and_grad (w.r.t. the student's hidden states and LM head) of
kdjax.distill.token_loss.direct_objective and chunked_objective with jax.jit and
prints XLA's buffer assignment from `compiled.memory_analysis()`: temporaries,
arguments and outputs, and their sum as the peak (an upper bound: arguments
and outputs are live for the whole call, temporaries are XLA's packed scratch
allocation). The objective is the default KD loss, 0.5 * T^2 * KL + 0.5 * CE,
T = 2, one teacher. Unless --no_run, each compiled function also runs once
(random inputs) to print its loss, the largest gradient difference to the
direct path and the wall time (one run, not a benchmark of speed; the machine
may be shared). The defaults are issue 4's case (SmolLM2's vocabulary and
width); the direct path then needs about 6 GB.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.core import defaults
from kdjax.distill import objectives, token_loss

MB = 1e6


def _inputs(args):
  rng = np.random.default_rng(0)
  dtype = jnp.dtype(args.dtype)

  def normal(shape, scale):
    return jnp.asarray(rng.normal(size=shape) * scale, dtype)

  b, l, v = args.batch, args.length, args.vocab
  ds, dt = args.student_width, args.teacher_width
  return dict(
      student_hidden=normal((b, l, ds), 1.0),
      student_head=normal((ds, v), ds**-0.5),
      teacher_hidden=normal((b, l, dt), 1.0),
      teacher_head=normal((dt, v), 2 * dt**-0.5),
      labels=jnp.asarray(rng.integers(0, v, (b, l)), jnp.int32),
      mask=jnp.asarray(rng.random((b, l)) < 0.9, jnp.float32))


def _loss_fn(objective, path, chunk_size):
  def loss(student_hidden, student_head, teacher_hidden, teacher_head, labels,
           mask):
    common = dict(global_count=jnp.sum(mask))
    if path == "chunked":
      common["chunk_size"] = chunk_size
    fn = (token_loss.chunked_objective if path == "chunked"
          else token_loss.direct_objective)
    return fn(objective, student_hidden, student_head, [teacher_hidden],
              [teacher_head], labels, mask, jnp.int32(0), **common)
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--vocab", type=int, default=49152)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--student_width", type=int, default=576)
  parser.add_argument("--teacher_width", type=int, default=576)
  parser.add_argument("--chunk_sizes", default="32,64,128")
  parser.add_argument("--dtype", default="float32",
                      help="of hidden states and heads; logits are float32.")
  parser.add_argument("--no_run", action="store_true",
                      help="compile only: no loss values or times.")
  parser.add_argument("--platform", default="cpu",
                      help="JAX platform to compile for ('' = JAX's default).")
  args = parser.parse_args()
  if args.platform:
    jax.config.update("jax_platforms", args.platform)

  distill = defaults.get_config().distill
  distill.update(alpha=0.5, temperature=2.0)
  objective = objectives.distillation(distill, num_teachers=1, total_steps=1)
  inputs = _inputs(args)
  operands = tuple(inputs.values())
  logits_mb = args.batch * args.length * args.vocab * 4 / MB
  print(f"batch {args.batch}, length {args.length}, vocab {args.vocab}, "
        f"widths {args.student_width}/{args.teacher_width}, {args.dtype}, "
        f"{objective.description}; one [B, L, V] float32 array = "
        f"{logits_mb:,.0f} MB; {jax.devices()[0].platform}, jax "
        f"{jax.__version__}\n")

  runs = [("direct", 0)] + [
      ("chunked", int(c)) for c in args.chunk_sizes.split(",")]
  rows, reference = [], None
  for path, chunk_size in runs:
    start = time.perf_counter()
    compiled = jax.jit(_loss_fn(objective, path, chunk_size)).lower(
        *operands).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    peak = (stats.temp_size_in_bytes + stats.argument_size_in_bytes +
            stats.output_size_in_bytes - stats.alias_size_in_bytes)
    row = dict(path=path, chunk=chunk_size or "-",
               temp=stats.temp_size_in_bytes / MB,
               args=stats.argument_size_in_bytes / MB,
               out=stats.output_size_in_bytes / MB, peak=peak / MB,
               compile_s=compile_s)
    if not args.no_run:
      start = time.perf_counter()
      (loss, _), grads = jax.block_until_ready(compiled(*operands))
      row["run_s"] = time.perf_counter() - start
      row["loss"] = float(loss)
      grads = [np.asarray(g, np.float32) for g in grads]
      if reference is None:
        reference = grads
      row["grad_diff"] = max(
          float(np.max(np.abs(g - r)) / np.max(np.abs(r)))
          for g, r in zip(grads, reference))
      del grads
    rows.append(row)
    del compiled

  direct_peak = rows[0]["peak"]
  header = ("| path | chunk | temp MB | arguments MB | outputs MB | "
            "peak MB (temp + args + outputs) | peak / direct |")
  rule = "|---|---|---|---|---|---|---|"
  if not args.no_run:
    header += " loss | max grad diff / max grad | run s (once) |"
    rule += "---|---|---|"
  print(header)
  print(rule)
  for row in rows:
    line = (f"| {row['path']} | {row['chunk']} | {row['temp']:,.1f} | "
            f"{row['args']:,.1f} | {row['out']:,.1f} | {row['peak']:,.1f} | "
            f"{row['peak'] / direct_peak:.3f} |")
    if not args.no_run:
      line += (f" {row['loss']:.6f} | {row['grad_diff']:.1e} | "
               f"{row['run_s']:.1f} |")
    print(line)
  best = min(r["peak"] for r in rows[1:])
  print(f"\nBest chunked peak / direct peak = {best / direct_peak:.3f} "
        f"(target <= 0.25).")


if __name__ == "__main__":
  main()
