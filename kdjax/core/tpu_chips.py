"""Cloud TPU generations: the one table, shared by the AOT check (kdjax.aot)
and the TPU launcher (launch/tpu.py).

Standard library only: launch/tpu.py imports it on a laptop without jax.
Numbers are the public Cloud TPU documentation's, per chip.
"""

from __future__ import annotations

import dataclasses

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One Cloud TPU generation."""
  name: str
  peak_flops: float  # bf16 FLOP/s per chip.
  hbm_bytes: int  # HBM per chip.
  hbm_bandwidth: float  # Bytes/s per chip.
  # Compiler devices per chip for topologies named without options (v2-v4:
  # a device is a TensorCore; libtpu 0.0.42 gives v4:2x2x1 8 devices).
  devices_per_chip: int
  type_prefix: str  # Accelerator types are '<prefix>-<N>'.
  # v2/v3/v4/v5p types count TensorCores (2 per chip, 4 chips per host);
  # v5e/v6e types count chips (up to 8 on one host, 4 per host beyond).
  type_counts_cores: bool
  runtime_version: str  # Default TPU VM image.
  topology_dims: int  # 2 (v5e, v6e) or 3 (v4, v5p); 0: none known.


CHIPS = {
    "v2": Chip("TPU v2", 45e12, 16 * GIB, 700e9, 2, "v2", True,
               "tpu-ubuntu2204-base", 0),
    "v3": Chip("TPU v3", 123e12, 32 * GIB, 900e9, 2, "v3", True,
               "tpu-ubuntu2204-base", 0),
    "v4": Chip("TPU v4", 275e12, 32 * GIB, 1200e9, 2, "v4", True,
               "tpu-ubuntu2204-base", 3),
    "v5e": Chip("TPU v5e", 197e12, 16 * GIB, 819e9, 1, "v5litepod", False,
                "v2-alpha-tpuv5-lite", 2),
    "v5p": Chip("TPU v5p", 459e12, 95 * GIB, 2765e9, 1, "v5p", True,
                "v2-alpha-tpuv5", 3),
    "v6e": Chip("TPU v6e", 918e12, 32 * GIB, 1640e9, 1, "v6e", False,
                "v2-alpha-tpuv6e", 2),
}

# Chip count -> topology shape, by the generation's torus dimensions.
TOPOLOGY_SHAPES = {
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8",
        128: "8x16", 256: "16x16"},
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
        128: "4x4x8", 256: "4x8x8", 512: "8x8x8"},
}


def generation_of_prefix(prefix: str) -> str | None:
  """'v5litepod' -> 'v5e'; None for an unknown accelerator-type prefix."""
  return next((g for g, c in CHIPS.items() if c.type_prefix == prefix), None)


def chips_in_type(generation: str, size: int) -> int:
  """Chips of accelerator type '<prefix>-<size>'."""
  return size // 2 if CHIPS[generation].type_counts_cores else size


def accelerator_type(generation: str, chips: int) -> str:
  """The Cloud TPU type of this many chips, e.g. v5litepod-8, v4-16."""
  chip = CHIPS[generation]
  return f"{chip.type_prefix}-{chips * 2 if chip.type_counts_cores else chips}"


def topology(generation: str, chips: int) -> str | None:
  """Topology name for the AOT check, e.g. 'v5e:2x4'; None if unknown."""
  shape = TOPOLOGY_SHAPES.get(CHIPS[generation].topology_dims, {}).get(chips)
  return f"{generation}:{shape}" if shape else None
