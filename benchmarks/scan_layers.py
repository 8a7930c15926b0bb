"""Llama's scan_layers (one nn.scan'ed layer) vs unrolled layers: compile time
and step time of kdjax's fused distillation step, by depth.

    python benchmarks/scan_layers.py                 # 6 and 30 layers
    python benchmarks/scan_layers.py --quick         # 6 layers, fewer steps
    python benchmarks/scan_layers.py --layers=6,12,30 --steps=7

The step: kdjax.distill.step.train_step with make_lm_apply_fn student and
teacher (Llama -> Llama, teacher forward inside the step), the chunked token
loss (token_chunk_size), objectives.distillation (alpha 0.5, T 2), AdamW
lr 1e-3, DataAxis('shard_map'), jitted with donate_argnums=0 on one device
(as tests/distill/test_mesh_step.py runs it). remat stays ''.

Models (SmolLM2-like, narrow; tied embeddings, float32), vocab 4096, seq 128,
batch 8:
  student  width 128, 4 heads, 2 KV heads, MLP 512
  teacher  width 256, 4 heads, 2 KV heads, MLP 1024
and the teacher has the SAME depth as the student (both 6, both 30). In the
'scanned' rows both models have scan_layers=True, in the 'unrolled' rows
neither does.

Both layouts run the same numbers: the scanned params are
kdjax.models.stacking.stack of the unrolled ones (student and teacher),
and the script asserts that the first step's loss and gradient norm agree
between layouts (so the timing cannot silently compare different programs).

Measured, per depth, in one process:
  compile s  wall time of jitted.lower(state, batch, teachers).compile(), with
             jax.clear_caches() before it (no in-memory trace/lowering/
             executable cache shared between the layouts); 'lower s' is the
             tracing + lowering part of it.
  step ms    median over --steps timed steps after --warmup untimed ones
             (block_until_ready on each); the two layouts' steps alternate,
             so load on the shared machine hits both alike. The ratio column
             is the median of the per-pair ratios scanned / unrolled.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

# Run from a checkout: import this repo's kdjax even without `pip install -e`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB, SEQ, BATCH, TEMPERATURE, ALPHA, LR = 4096, 128, 8, 2.0, 0.5, 1e-3
STUDENT = dict(width=128, num_heads=4, num_kv_heads=2, mlp_dim=512)
TEACHER = dict(width=256, num_heads=4, num_kv_heads=2, mlp_dim=1024)
LAYOUTS = ("unrolled", "scanned")
# The two layouts' first-step loss must agree to this (float32; the scan only
# changes how XLA schedules the same per-layer math).
LOSS_RTOL, GRAD_NORM_RTOL = 1e-5, 1e-4


def _machine() -> str:
  model = "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      model = next(l.split(":", 1)[1].strip() for l in f
                   if l.startswith("model name"))
    with open("/proc/meminfo") as f:
      ram = int(f.readline().split()[1]) / 2**20
  except (OSError, StopIteration):
    ram = float("nan")
  return (f"{os.cpu_count()} cores, {model}, {ram:.0f} GiB RAM, "
          f"{platform.platform()}")


def _median(xs):
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _batch(seed=0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  tokens = np.random.default_rng(seed).integers(0, VOCAB, (BATCH, SEQ + 1))
  return {"inputs": tokens[:, :-1].astype(np.int32),
          "labels": tokens[:, 1:].astype(np.int32)}


class Contender:
  """One layout at one depth: its jitted step, compiled, and its state."""

  def __init__(self, num_layers: int, scanned: bool, student_params,
               teacher_params, token_chunk_size: int):
    import functools  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from kdjax.core import defaults  # pylint: disable=g-import-not-at-top
    from kdjax.distill import objectives, parallel, step  # pylint: disable=g-import-not-at-top
    from kdjax.models.llama import Llama  # pylint: disable=g-import-not-at-top
    self.jax = jax
    common = dict(vocab_size=VOCAB, num_layers=num_layers, max_length=SEQ,
                  scan_layers=scanned)
    student = Llama(**common, **STUDENT)
    teacher = Llama(**common, **TEACHER)
    distill = defaults.get_config().distill
    distill.update(alpha=ALPHA, temperature=TEMPERATURE)
    tx = optax.adamw(LR)
    step_fn = functools.partial(
        step.train_step, student_apply=step.make_lm_apply_fn(student),
        teacher_applies=(step.make_lm_apply_fn(teacher),),
        objective=objectives.distillation(distill, num_teachers=1,
                                          total_steps=10),
        tx=tx, axis=parallel.DataAxis("shard_map"),
        token_chunk_size=token_chunk_size)
    device = jax.devices()[0]
    self.state = jax.device_put(
        step.create_train_state(student_params, tx, jax.random.key(0)),
        device)
    self.teachers = (jax.device_put(teacher_params, device),)
    self.batch = jax.device_put(_batch(), device)
    jitted = jax.jit(step_fn, donate_argnums=0)

    jax.clear_caches()  # Nothing traced, lowered or compiled before counts.
    start = time.perf_counter()
    lowered = jitted.lower(self.state, self.batch, self.teachers)
    self.lower_s = time.perf_counter() - start
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    self.step_s, self.cpu_s = [], []

  def step(self) -> dict:
    self.state, metrics = self.compiled(self.state, self.batch, self.teachers)
    self.jax.block_until_ready((self.state, metrics))
    return metrics

  def first_step(self) -> tuple[float, float]:
    """(mean loss, grad norm) of the first step (also a warm-up)."""
    metrics = self.jax.device_get(self.step())
    return (float(metrics["loss"] / metrics["count"]),
            float(metrics["grad_norm"]))

  def timed_step(self) -> float:
    start, cpu = time.perf_counter(), time.process_time()
    self.step()
    seconds = time.perf_counter() - start
    self.step_s.append(seconds)
    self.cpu_s.append(time.process_time() - cpu)
    return seconds


def bench_depth(num_layers: int, args) -> dict:
  """Both layouts at one depth; params shared (stacked for the scan)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from kdjax.core import defaults  # pylint: disable=g-import-not-at-top
  from kdjax.models.llama import Llama  # pylint: disable=g-import-not-at-top
  from kdjax.models.stacking import stack  # pylint: disable=g-import-not-at-top
  from kdjax.weights import params as params_lib  # pylint: disable=g-import-not-at-top
  data = defaults.lm_data(seq_length=SEQ)
  common = dict(vocab_size=VOCAB, num_layers=num_layers, max_length=SEQ)
  # Host copies: the step donates the student's device buffers.
  student = jax.device_get(params_lib.init(Llama(**common, **STUDENT), data, 2))
  teacher = jax.device_get(params_lib.init(Llama(**common, **TEACHER), data, 1))
  params = {"unrolled": (student, teacher),
            "scanned": (stack(student, "layers"),
                        stack(teacher, "layers"))}
  assert all(x.shape[0] == num_layers
             for x in jax.tree.leaves(params["scanned"][0]["layers"]))

  contenders, first = {}, {}
  for layout in LAYOUTS:  # One at a time: compiles do not overlap.
    s_params, t_params = jax.tree.map(np.copy, params[layout])
    c = Contender(num_layers, layout == "scanned", s_params, t_params,
                  args.token_chunk_size)
    contenders[layout] = c
    first[layout] = c.first_step()
    print(f"{num_layers} layers, {layout}: compile {c.compile_s:.1f} s "
          f"(lower {c.lower_s:.1f} s), first loss {first[layout][0]:.7f}, "
          f"grad norm {first[layout][1]:.6f}", flush=True)
  (loss_u, norm_u), (loss_s, norm_s) = first["unrolled"], first["scanned"]
  if not np.isclose(loss_s, loss_u, rtol=LOSS_RTOL, atol=0):
    raise AssertionError(f"{num_layers} layers: first-step loss differs "
                         f"between layouts: unrolled {loss_u!r}, scanned "
                         f"{loss_s!r}: not the same program")
  if not np.isclose(norm_s, norm_u, rtol=GRAD_NORM_RTOL, atol=0):
    raise AssertionError(f"{num_layers} layers: first-step grad norm differs "
                         f"between layouts: unrolled {norm_u!r}, scanned "
                         f"{norm_s!r}")

  for _ in range(args.warmup - 1):  # The first step was warm-up 1.
    for c in contenders.values():
      c.step()
  ratios = []
  for r in range(args.steps):  # Alternating, so load hits both layouts.
    order = LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]
    t = {layout: contenders[layout].timed_step() for layout in order}
    ratios.append(t["scanned"] / t["unrolled"])
    print(f"  step {r}: unrolled {1e3 * t['unrolled']:.1f} ms, scanned "
          f"{1e3 * t['scanned']:.1f} ms", flush=True)
  result = {"layers": num_layers, "loss_diff": abs(loss_s - loss_u),
            "loss": loss_u, "step_ratio": _median(ratios),
            "step_ratio_range": (min(ratios), max(ratios)),
            "scan_wins": sum(x < 1 for x in ratios), "pairs": len(ratios)}
  for layout, c in contenders.items():
    result[layout] = {"compile_s": c.compile_s, "lower_s": c.lower_s,
                      "step_ms": 1e3 * _median(c.step_s),
                      "cpu_ms": 1e3 * _median(c.cpu_s)}
  del contenders
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", default="6,30",
                      help="comma-separated depths (student = teacher depth)")
  parser.add_argument("--steps", type=int, default=5,
                      help="timed steps per layout and depth")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps after compiling (>= 1: the first "
                      "step's loss is the layouts' equality check)")
  parser.add_argument("--token-chunk-size", type=int, default=64,
                      help="train_step's token_chunk_size (positions per LM "
                      "head chunk; 0 = all at once)")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: 6 layers, 3 timed steps, 1 warm-up")
  args = parser.parse_args()
  if args.quick:
    args.layers, args.steps, args.warmup = "6", 3, 1
  args.warmup = max(args.warmup, 1)
  depths = [int(d) for d in args.layers.split(",") if d]

  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  results = [bench_depth(depth, args) for depth in depths]
  total = time.perf_counter() - start

  print(f"\nMachine: {_machine()}")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average at the "
        f"end {os.getloadavg()[0]:.1f} (other jobs share the "
        f"{os.cpu_count()} cores); {total:.0f} s in all")
  print(f"Workload: Llama student width {STUDENT['width']} -> teacher width "
        f"{TEACHER['width']} (teacher depth = student depth), heads 4, KV 2, "
        f"MLP 4x, vocab {VOCAB}, seq {SEQ}, batch {BATCH}, float32, AdamW, "
        f"token_chunk_size {args.token_chunk_size}; step = median of "
        f"{args.steps} after {args.warmup} warm-up(s), layouts alternating")
  print("\n| layers | layout | compile s (lower s) | step ms | CPU ms/step | "
        "scanned / unrolled compile | scanned / unrolled step |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    for layout in LAYOUTS:
      x = r[layout]
      ratios = "| | |"
      if layout == "scanned":
        lo, hi = r["step_ratio_range"]
        ratios = (f"| {x['compile_s'] / r['unrolled']['compile_s']:.2f}x | "
                  f"{r['step_ratio']:.2f}x ({lo:.2f}-{hi:.2f}) |")
      print(f"| {r['layers']} | {layout} | {x['compile_s']:.1f} "
            f"({x['lower_s']:.1f}) | {x['step_ms']:.0f} | {x['cpu_ms']:.0f} "
            f"{ratios}")
  print("(step ms, CPU ms: medians; step ratio: median and range of the "
        "per-pair wall-time ratios, < 1 = the scan is faster; CPU ms = "
        "process CPU time, which spin-waiting threads inflate)")
  for r in results:
    faster_step = "scanned" if r["step_ratio"] < 1 else "unrolled"
    faster_compile = ("scanned" if r["scanned"]["compile_s"] < r["unrolled"]
                      ["compile_s"] else "unrolled")
    print(f"{r['layers']} layers: faster step {faster_step} (median pair "
          f"ratio; scan faster in {r['scan_wins']}/{r['pairs']} pairs), "
          f"faster compile {faster_compile}; first-step loss "
          f"{r['loss']:.6f}, |scanned - unrolled| = {r['loss_diff']:.1e}")


if __name__ == "__main__":
  main()
