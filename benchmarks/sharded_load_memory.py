"""Host-memory peak of loading a pretrained teacher: replicated vs sharded.

    python benchmarks/sharded_load_memory.py [--init_from=llama:]
        [--devices=8] [--fsdp=8] [--model=1] [--dtype=float32]
        [--ways=host,replicated,whole_then_place,sharded]

Each way runs in a fresh Python process with --devices simulated CPU devices
(XLA's --xla_force_host_platform_device_count) and reports that process's
peak resident set (VmHWM in /proc/self/status; ru_maxrss agrees), its
resident set just before loading (jax and the model's shapes set up), the
bytes the loaded parameters hold on the devices, and the wall time of the
load. The ways (all through kdjax.weights.pretrained.load_pretrained):

  host              the unsharded import alone: host numpy (what
                    teachers.load returns without shardings).
  replicated        that, then placed on every device (the replicated
                    layout: parallel.replicate, as kdjax.run.train does).
  whole_then_place  the whole import on the host, then each device's shard
                    cut from it with jax.make_array_from_callback (what the
                    sharded layout did before it read shards from the file).
  sharded           load_pretrained(..., shardings=...): each shard read from
                    the file by itself (kdjax.weights.importers.llama
                    TensorBlocks), nothing whole on the host.

On one host every simulated device's buffers live in this same process, so
a process holds the model once per device copy it places: `replicated`
holds it --devices times; `sharded` over fsdp=8 (SmolLM2: 576 = 8 x 72)
holds one copy in total, 1/8 per device, and its peak approaches the
model's size once plus the process's baseline. On a real multi-host run
each process would hold only its own devices' shards. The resident set
also counts the pages of the checkpoint file that are mapped and touched
(the GGUF is read through a memory map): at most the file's size, 98 MB for
SmolLM2's Q4_1 file. The unsharded import briefly holds the float32 model
twice (the HF-layout tensors and the kdjax-layout copy), hence its peak.
"""

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

# A child process gets its device count from XLA_FLAGS, set before this runs.
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

import machine_info  # benchmarks/, next to this script
from kdjax.core import defaults
from kdjax.distill import mesh as mesh_lib
from kdjax.models import llama as llama_model
from kdjax.weights import params as params_lib
from kdjax.weights import pretrained
from kdjax.weights.importers import llama as llama_import

WAYS = ("host", "replicated", "whole_then_place", "sharded")
MB = 1 << 20


def _status(key: str) -> int:
  """A /proc/self/status size in bytes (VmHWM, VmRSS, RssFile, ...)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  return 0


def child(args) -> dict:
  """One way, in this (fresh) process; returns the measurements."""
  assert len(jax.devices()) == args.devices, jax.devices()
  init_from = args.init_from
  if init_from == "llama:":
    init_from += llama_import.smollm2_gguf_path()
  path = pretrained.llama_path(init_from)
  fields, _ = llama_import.open_checkpoint(path)  # No tensor read yet.
  fields = dict(fields, max_length=64)
  model = llama_model.Llama(**fields)
  data = defaults.lm_data(seq_length=8)
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, args.dtype),
                        params_lib.abstract(model, data))
  mesh = mesh_lib.make({"data": -1, "fsdp": args.fsdp, "model": args.model})
  shardings = mesh_lib.param_shardings(
      params_lib.logical_specs(model, data), mesh, defaults.PARTITION_RULES)
  mesh_lib.check_divisible(shapes, shardings, "the teacher")
  gc.collect()
  before = _status("VmRSS")
  start = time.perf_counter()
  kwargs = dict(model_fields=fields, field="teacher")
  if args.child == "sharded":
    params = pretrained.load_pretrained(shapes, init_from,
                                        shardings=shardings, **kwargs)
  else:
    params = pretrained.load_pretrained(shapes, init_from, **kwargs)
    if args.child == "replicated":
      params = jax.device_put(params, NamedSharding(mesh, P()))
    elif args.child == "whole_then_place":
      place = pretrained._place_sharded  # pylint: disable=protected-access
      params = jax.tree.map(place, params, shardings)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  leaves = jax.tree.leaves(params)
  on_devices = sum(s.data.nbytes for x in leaves if isinstance(x, jax.Array)
                   for s in x.addressable_shards)
  return {"way": args.child, "seconds": seconds,
          "peak_bytes": _status("VmHWM"), "before_bytes": before,
          "maxrss_bytes": resource.getrusage(
              resource.RUSAGE_SELF).ru_maxrss * 1024,
          "model_bytes": sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
                             for s in jax.tree.leaves(shapes)),
          "device_bytes": on_devices}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--init_from", default="llama:")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--fsdp", type=int, default=8)
  parser.add_argument("--model", type=int, default=1)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--ways", default=",".join(WAYS))
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print("RESULT " + json.dumps(child(args)), flush=True)
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count="
                        f"{args.devices}").strip())
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  rows = []
  for way in args.ways.split(","):
    command = [sys.executable, os.path.abspath(__file__), "--child", way] + [
        f"--{k}={getattr(args, k)}" for k in ("init_from", "devices", "fsdp",
                                              "model", "dtype")]
    out = subprocess.run(command, env=env, capture_output=True, text=True,
                         check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not lines:
      print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
      raise SystemExit(f"{way}: exit {out.returncode}")
    rows.append(json.loads(lines[-1][len("RESULT "):]))
    print(f"{way}: done ({rows[-1]['seconds']:.1f} s)", file=sys.stderr,
          flush=True)
  model_mb = rows[0]["model_bytes"] / MB
  print(f"{args.init_from}: {model_mb:.1f} MiB of {args.dtype} parameters; "
        f"{args.devices} simulated CPU devices, sharded mesh data="
        f"{args.devices // (args.fsdp * args.model)} fsdp={args.fsdp} "
        f"model={args.model}; CPU: {machine_info.describe()}")
  print()
  print("| way | peak RSS (MiB) | RSS before load (MiB) | peak - before "
        "(MiB) | on devices (MiB) | load time (s) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['way']} | {r['peak_bytes'] / MB:.0f} | "
          f"{r['before_bytes'] / MB:.0f} | "
          f"{(r['peak_bytes'] - r['before_bytes']) / MB:.0f} | "
          f"{r['device_bytes'] / MB:.0f} | "
          f"{r['seconds']:.1f} |")


if __name__ == "__main__":
  main()
