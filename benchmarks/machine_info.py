"""Which CPU a benchmark ran on, precisely enough to compare runs.

"AMD EPYC" alone names several CPU generations on this project's machines
(Zen 3 with AVX2 only, Zen 4 with AVX-512 and its bfloat16 dot instructions)
and the matmul kernels of XLA and PyTorch take different paths on each, so
every speed ratio is printed beside the model name, family/model numbers and
the vector extensions that decide those paths.
"""

from __future__ import annotations

import os
import platform

# The instruction-set extensions that change which matmul kernels run.
_ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile",
        "amx_bf16")


def _cpuinfo() -> dict[str, str]:
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if not line.strip():
          break  # The first processor's block is enough.
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return fields


def describe() -> str:
  """E.g. 'AMD EPYC (family 25 model 1; avx2 fma), 2 cores, 24 GiB RAM'."""
  info = _cpuinfo()
  model = info.get("model name") or platform.processor() or "unknown CPU"
  flags = set(info.get("flags", "").split())
  isa = " ".join(f for f in _ISA if f in flags) or "no AVX2"
  try:
    with open("/proc/meminfo") as f:
      ram = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB RAM"
  except (OSError, ValueError, IndexError):
    ram = "RAM unknown"
  return (f"{model} (family {info.get('cpu family', '?')} model "
          f"{info.get('model', '?')}; {isa}), {os.cpu_count()} cores, {ram}")


if __name__ == "__main__":
  print(describe())
