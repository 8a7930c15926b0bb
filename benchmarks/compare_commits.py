"""The training step's speed at two commits, side by side in one run.

    python benchmarks/compare_commits.py --base d986460 --new HEAD [--quick]
        [--rounds=4] [--hlo] [--bench-args="--only=kdjax_fused ..."]

Issue 14 (restructuring) must not slow the step. This script checks out both
commits as git worktrees in a temporary directory (removed at the end) and runs
EACH commit's own benchmarks/step_throughput.py (module paths differ between
commits: kdjax/step.py vs kdjax/distill/step.py) with PYTHONPATH pointing at
that worktree, the same step_throughput flags and the same environment
otherwise. The two sides alternate in order-balanced rounds (A B, B A, A B,
B A), so load changes on a shared machine hit both alike; every side prints its
per-repetition s/step lines, which are parsed here. The printed table gives,
per row, the median and minimum of each side and the new/base ratios, plus the
median (and range) of the per-round ratios (each round's two runs were back to
back). Nothing here is a pass/fail threshold: the ratios are for reading.

Which kdjax each side imported is checked, not assumed: a sitecustomize.py put
first on the children's PYTHONPATH reports, at exit of every process that
imported kdjax (the step workers), kdjax.__file__ and the step module in use;
the script stops if any lies outside that side's worktree. The per-repetition
losses of both sides are compared too (same seeds, same number of steps: they
should agree; a difference is printed as a NOTE).

With --hlo, each commit's fused step (built by its own step_throughput's
KdjaxWorker) is also compiled once more and compared without timing: XLA's
FLOP count and the multiset of (opcode, shape) of the optimized HLO's
instructions, plus whether the StableHLO is identical (it is not when only the
trace order changed). Equal programs mean a timing difference is noise.

`--new HEAD` measures HEAD as committed (uncommitted edits are not included).
Defaults: step_throughput `--only=kdjax_fused,kdjax_unfused --repeats=3
--steps=2 --warmup=3`, 4 rounds; `--quick`: `--only=kdjax_fused --repeats=2
--steps=1 --warmup=3`. With `--warmup=1` these took about 12 and 4 min on a
quiet 2-core machine (7-8 min quick at load average 5); each extra warm-up
step adds about 2.7 s per run. 3 warm-up steps: step_throughput's own
default, see its --warmup comment. PyTorch rows can be added with --bench-args (torch is the same code on
both sides, so their ratio shows the noise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import machine_info  # benchmarks/, next to this script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join("benchmarks", "step_throughput.py")
FULL_ARGS = "--only=kdjax_fused,kdjax_unfused --repeats=3 --steps=2 --warmup=3"
QUICK_ARGS = "--only=kdjax_fused --repeats=2 --steps=1 --warmup=3"
MARK = "[compare_commits]"

# Put first on each child's PYTHONPATH (there is no other sitecustomize in
# this environment; if one existed, this would shadow it).
SITECUSTOMIZE = f'''
import atexit, sys
def _report():
  kdjax = sys.modules.get("kdjax")
  if kdjax is None:
    return
  steps = [name for name in ("kdjax.distill.step", "kdjax.step")
           if name in sys.modules]
  step = sys.modules[steps[0]].__file__ if steps else "-"
  sys.stderr.write("{MARK} kdjax=" + kdjax.__file__ + " step=" + step + "\\n")
  sys.stderr.flush()
atexit.register(_report)
'''

REPEAT = re.compile(r"^repeat (\d+): (\S+) ([\d.]+) s/step \(([\d.]+) CPU s\), "
                    r"loss ([^;\s]+)(?:;.*)?$", re.M)
READY = re.compile(r"^(\S+): ready in (\d+) s, first loss (\S+)$", re.M)
TOKENS = re.compile(r"\((\d+) tokens/step\)")
DOT = re.compile(r"float32 \d+\^2 (jnp\.dot|torch\.matmul) \(median.*?: "
                 r"([\d.]+) GFLOP/s")
LOAD = re.compile(r"Load average at the end: ([\d.]+)")
WHERE = re.compile(re.escape(MARK) + r" kdjax=(\S+) step=(\S+)")
GFLOP = re.compile(r"^kdjax fused step: ([\d.]+) GFLOP", re.M)

# --hlo: the fused step's program as each commit's step_throughput builds it.
HLO_CHECK = r"""
import collections, hashlib, json, os, re, sys
sys.argv = sys.argv[:1]
sys.path.insert(0, "benchmarks")
import step_throughput as st
w = st.KdjaxWorker(fused=True)
lowered = w.cost_fn.lower(w.state, w.shard(w._host_batch()), w.frozen)
compiled = lowered.compile()
cost = compiled.cost_analysis()
cost = cost[0] if isinstance(cost, (list, tuple)) else cost
ops = collections.Counter()
for line in compiled.as_text().splitlines():
  m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z][\w\-]*)\(",
               re.sub(r", metadata=\{[^}]*\}", "", line))
  if m:
    ops[m.group(2) + " " + m.group(1)] += 1
print(json.dumps({"flops": cost["flops"], "instructions": sum(ops.values()),
                  "ops": hashlib.sha256(repr(sorted(ops.items())).encode())
                  .hexdigest()[:16],
                  "stablehlo": hashlib.sha256(lowered.as_text().encode())
                  .hexdigest()[:16]}))
"""


def git(*args: str) -> str:
  return subprocess.run(["git", "-C", REPO, *args], check=True, text=True,
                        capture_output=True).stdout.strip()


def child_env(worktree: str, site_dir: str) -> dict[str, str]:
  """The caller's environment (XLA_FLAGS etc. as they are), PYTHONPATH
  replaced: the reporting sitecustomize, then this side's worktree."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([site_dir, worktree])
  return env


def preflight(side: str, worktree: str, env: dict[str, str]) -> str:
  """Which kdjax a plain `python` of this side imports (before any long run)."""
  out = subprocess.run(
      [sys.executable, "-c", "import kdjax; print(kdjax.__file__)"],
      cwd=worktree, env=env, text=True, capture_output=True)
  path = out.stdout.strip()
  if out.returncode or not path.startswith(worktree + os.sep):
    raise SystemExit(f"{side}: kdjax resolves to {path!r}, not under "
                     f"{worktree}\n{out.stderr[-2000:]}")
  return path


def run_side(side: str, worktree: str, env: dict[str, str],
             bench_args: list[str]) -> dict:
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, BENCH, *bench_args], cwd=worktree,
                        env=env, text=True, capture_output=True)
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f"{side}: step_throughput.py exited {proc.returncode}:\n"
                     f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  where = WHERE.findall(proc.stderr)
  if not where:
    raise SystemExit(f"{side}: no worker reported which kdjax it imported.")
  for kdjax_file, step_file in where:
    for path in (kdjax_file, step_file):
      if not path.startswith(worktree + os.sep):
        raise SystemExit(f"{side}: a worker imported {path}, outside "
                         f"{worktree}.")
  samples = {}
  for _, kind, sec, cpu, loss in REPEAT.findall(proc.stdout):
    samples.setdefault(kind, []).append((float(sec), float(cpu), float(loss)))
  if not samples:
    raise SystemExit(f"{side}: no 'repeat N: ...' lines in the output:\n"
                     f"{proc.stdout[-3000:]}")
  tokens = TOKENS.search(proc.stdout)
  load = LOAD.search(proc.stdout)
  return {"seconds": seconds, "samples": samples,
          "ready": {k: (float(r), float(l))
                    for k, r, l in READY.findall(proc.stdout)},
          "dot": {name: float(v) for name, v in DOT.findall(proc.stdout)},
          "tokens": int(tokens.group(1)) if tokens else None,
          "load": float(load.group(1)) if load else float("nan"),
          "stdout": proc.stdout,
          "where": sorted(set(where))}


def hlo_check(worktree: str, env: dict[str, str]) -> dict:
  """XLA's FLOP count, instruction count and (opcode, shape) multiset hash of
  the compiled fused step, and the hash of its StableHLO (trace order)."""
  out = subprocess.run([sys.executable, "-c", HLO_CHECK], cwd=worktree,
                       env=dict(env, JAX_PLATFORMS="cpu"), text=True,
                       capture_output=True)
  if out.returncode:
    return {"error": out.stderr.strip().splitlines()[-1:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def summary(rows: list[tuple[str, list[float], list[float], list[float]]]):
  """Markdown table: per row the base/new medians and best values (minimum of
  a time, maximum of a rate), their ratios, and the median (range) of the
  per-round ratios."""
  lines = ["| row | base median | new median | new/base (medians) | base best "
           "| new best | new/base (best) | per-round new/base: median "
           "(range) |", "|---|---|---|---|---|---|---|---|"]
  for name, base, new, rounds in rows:
    best = max if ("/s" in name and "s/step" not in name) else min
    top = max(base + new)
    fmt = "{:,.0f}" if top >= 100 else "{:.1f}" if top >= 10 else "{:.3f}"
    bm, nm = statistics.median(base), statistics.median(new)
    rs = sorted(rounds)
    per_round = (f"{statistics.median(rs):.3f} ({rs[0]:.3f}-{rs[-1]:.3f})"
                 if rs else "-")
    lines.append(
        f"| {name} | {fmt.format(bm)} | {fmt.format(nm)} | {nm / bm:.3f} | "
        f"{fmt.format(best(base))} | {fmt.format(best(new))} | "
        f"{best(new) / best(base):.3f} | {per_round} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--base", default="d986460",
                      help="commit before the change (default d986460)")
  parser.add_argument("--new", default="HEAD", help="commit after (HEAD)")
  parser.add_argument("--rounds", type=int, default=4,
                      help="runs per side, in the order base new, new base, "
                      "... (default 4: each side first equally often)")
  parser.add_argument("--quick", action="store_true",
                      help=f"step_throughput flags {QUICK_ARGS!r} instead of "
                      f"{FULL_ARGS!r}")
  parser.add_argument("--hlo", action="store_true",
                      help="also compile each commit's fused step once and "
                      "compare the programs (FLOPs, instruction multiset)")
  parser.add_argument("--bench-args", default=None,
                      help="step_throughput.py flags for both sides "
                      "(overrides --quick's / the default set)")
  args = parser.parse_args()
  if args.rounds < 1:
    parser.error("--rounds must be >= 1")
  bench_args = shlex.split(args.bench_args if args.bench_args is not None
                           else QUICK_ARGS if args.quick else FULL_ARGS)
  commits = {}
  for side, ref in (("base", args.base), ("new", args.new)):
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    commits[side] = (ref, sha, git("log", "-1", "--format=%s", sha)[:90])
  dirty = git("status", "--porcelain", "--", "kdjax", BENCH)
  start_wall, start_time = time.perf_counter(), datetime.datetime.now(
      datetime.timezone.utc)
  load_start = os.getloadavg()

  tmp = tempfile.mkdtemp(prefix="kdjax_compare_")
  worktrees = {}
  try:
    for side, (_, sha, _) in commits.items():
      path = os.path.join(tmp, side)
      git("worktree", "add", "--detach", path, sha)
      worktrees[side] = path
    site_dir = os.path.join(tmp, "site")
    os.makedirs(site_dir)
    with open(os.path.join(site_dir, "sitecustomize.py"), "w") as f:
      f.write(SITECUSTOMIZE)
    envs = {side: child_env(path, site_dir) for side, path in worktrees.items()}
    for side, path in worktrees.items():
      found = preflight(side, path, envs[side])
      print(f"{side}: {commits[side][1][:10]} worktree {path}; kdjax "
            f"{found}", flush=True)
    print(f"step_throughput.py {' '.join(bench_args)}; {args.rounds} rounds, "
          f"order-balanced", flush=True)

    runs = {"base": [], "new": []}
    for r in range(args.rounds):
      order = ("base", "new") if r % 2 == 0 else ("new", "base")
      for side in order:
        result = run_side(side, worktrees[side], envs[side], bench_args)
        runs[side].append(result)
        per_kind = "; ".join(
            f"{kind} " + " ".join(f"{s:.3f}" for s, _, _ in v)
            for kind, v in result["samples"].items())
        print(f"round {r + 1}/{args.rounds} {side}: {result['seconds']:.0f} s "
              f"run, s/step {per_kind}; load {result['load']:.1f}", flush=True)
    hlo = ({side: hlo_check(path, envs[side]) for side, path in
            worktrees.items()} if args.hlo else {})
  finally:
    for path in worktrees.values():
      subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", path],
                     check=False)
    shutil.rmtree(tmp, ignore_errors=True)

  rows, notes = [], []
  kinds = [k for k in runs["base"][0]["samples"]
           if k in runs["new"][0]["samples"]]
  tokens = runs["base"][0]["tokens"]

  def per_round(fn):
    return [statistics.median(fn(runs["new"][i])) /
            statistics.median(fn(runs["base"][i])) for i in range(args.rounds)]

  for kind in kinds:
    def col(i, kind=kind):
      return lambda run: [s[i] for s in run["samples"][kind]]
    base = [x for run in runs["base"] for x in col(0)(run)]
    new = [x for run in runs["new"] for x in col(0)(run)]
    rows.append((f"{kind} s/step", base, new, per_round(col(0))))
    if tokens:
      rows.append((f"{kind} tokens/s", [tokens / s for s in base],
                   [tokens / s for s in new],
                   [1 / x for x in per_round(col(0))]))
    rows.append((f"{kind} CPU s/step",
                 [x for run in runs["base"] for x in col(1)(run)],
                 [x for run in runs["new"] for x in col(1)(run)],
                 per_round(col(1))))
    if all(kind in run["ready"] for run in runs["base"] + runs["new"]):
      rows.append((f"{kind} ready s (compile + 1st step)",
                   [run["ready"][kind][0] for run in runs["base"]],
                   [run["ready"][kind][0] for run in runs["new"]],
                   per_round(lambda run, kind=kind: [run["ready"][kind][0]])))
    # Same seeds and step counts: the losses should match across commits.
    losses = {side: [(run["ready"].get(kind, (0, float("nan")))[1],
                      *[s[2] for s in run["samples"][kind]])
                     for run in runs[side]] for side in runs}
    diff = max(abs(a - b) for rb, rn in zip(losses["base"], losses["new"])
               for a, b in zip(rb, rn))
    if not diff <= 1e-4 * max(1.0, abs(losses["base"][0][0])):
      notes.append(f"NOTE: {kind} losses differ between commits (max |diff| "
                   f"{diff:.2e}): base {losses['base'][0]}, new "
                   f"{losses['new'][0]}")
    else:
      notes.append(f"{kind} losses (first loss, then per repetition) equal "
                   f"in both commits within {diff:.1e}: {losses['base'][0]}")
  for name in ("jnp.dot", "torch.matmul"):
    if all(name in run["dot"] for run in runs["base"] + runs["new"]):
      rows.append((f"{name} 4096^2 GFLOP/s (same code: noise control)",
                   [run["dot"][name] for run in runs["base"]],
                   [run["dot"][name] for run in runs["new"]],
                   per_round(lambda run, name=name: [run["dot"][name]])))
  gflop = {side: sorted({g for run in runs[side]
                         for g in GFLOP.findall(run["stdout"])})
           for side in runs}
  if gflop["base"] or gflop["new"]:
    notes.append(f"XLA's FLOP count of the fused step (GFLOP): base "
                 f"{', '.join(gflop['base'])}, new {', '.join(gflop['new'])}")
  if hlo:
    b, n = hlo["base"], hlo["new"]
    notes.append(f"--hlo: compiled fused step, base {b}, new {n}: " + (
        "same FLOPs and same (opcode, shape) instruction multiset" if
        all(k in b and b[k] == n.get(k) for k in ("flops", "instructions",
                                                  "ops"))
        else "NOTE: the compiled programs differ") + (
        "; StableHLO identical" if b.get("stablehlo") == n.get("stablehlo")
        else "; StableHLO differs (trace order or ops)"))
  only = sorted(set(runs["base"][0]["samples"]) ^ set(runs["new"][0]["samples"]))
  if only:
    notes.append(f"NOTE: rows printed by one side only: {only}")

  elapsed = time.perf_counter() - start_wall
  print(f"\nkdjax step: base vs new commit, one interleaved run "
        f"({start_time:%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min)")
  for side, (ref, sha, subject) in commits.items():
    print(f"  {side}: {sha} ({ref}) {subject}")
  if dirty:
    print("  (the working tree has uncommitted changes under kdjax/ or the "
          "benchmark; they are not measured)")
  affinity = len(os.sched_getaffinity(0))
  print(f"CPU: {machine_info.describe()} ({affinity} usable); "
        f"Python {sys.version.split()[0]}; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}")
  print(f"step_throughput.py {' '.join(bench_args)} per run; {args.rounds} "
        f"runs per side, order base/new, new/base, ...; load average "
        f"{load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
        f"end")
  for side in runs:
    where = sorted({w for run in runs[side] for w in run["where"]})
    print(f"  {side} workers imported (from {worktrees[side]}): " + "; ".join(
        f"{os.path.relpath(k, worktrees[side])}, step "
        f"{os.path.relpath(s, worktrees[side])}" for k, s in where))
  print()
  print(summary(rows))
  print("(ratios: new / base, so < 1 is faster for s/step and slower for "
        "tokens/s and GFLOP/s; best: min of a time, max of a rate; samples: "
        "every repetition of every run; CPU s/step: the worker's process CPU "
        "time, less sensitive to other jobs than wall time)")
  for note in notes:
    print(note)


if __name__ == "__main__":
  main()
