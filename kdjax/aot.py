"""Check before paying for a TPU: compile the training steps for a Cloud TPU topology here.

    python -m kdjax.main --config=configs/fashion_mnist.py \
        --config.mode=aot_check --config.aot.topology=v5e:2x4

Lowers and compiles the same per-device step train.py runs (the same
`step.train_step` bound to the same models, objective, optimizer and data-axis
reduction, mapped with shard_map over a 1-D data mesh, state donated) for the
devices of a named topology, using libtpu's compiler on this machine
(`pip install "jax[tpu]==0.10.2"`; no TPU needed). It prints per-device memory
(arguments with the teacher's share, temporaries) against the chip's HBM, the
FLOPs of one step and the step time those imply at the chip's peak, and
refuses (AotDoesNotFitError, with the table) a config that would not fit.

The pmap backend is checked as shard_map: JAX runs pmap on the same machinery.
Numbers are XLA's own (compiled.memory_analysis / cost_analysis); the chip
table (kdjax/core/tpu_chips.py) is the public Cloud TPU spec (bf16 peak, nominal
HBM).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.core import errors, tpu_chips
from kdjax.core.config import fail
from kdjax.data import pipeline
from kdjax.distill import optim, parallel
from kdjax.run import train

GIB = 1024 ** 3
MIB = 1024 ** 2


class AotError(errors.KdjaxError, RuntimeError):
  """The check could not run (e.g. no libtpu); the message says what to do."""


class AotDoesNotFitError(errors.KdjaxError, RuntimeError):
  """A step would not fit in the chip's memory; the message holds the table."""


_TOPOLOGY_RE = re.compile(r"(v\d+[a-z]?):(\d+(?:x\d+){1,2})")


@dataclasses.dataclass(frozen=True)
class Topology:
  """A named Cloud TPU topology such as 'v5e:2x4' or 'v4:2x2x1'."""
  name: str
  generation: str
  chips: int

  @property
  def chip(self) -> tpu_chips.Chip:
    return tpu_chips.CHIPS[self.generation]

  @property
  def devices(self) -> int:
    return self.chips * self.chip.devices_per_chip

  @property
  def accelerator_type(self) -> str:
    """The Cloud TPU type of this many chips, e.g. v5litepod-8, v4-16."""
    return tpu_chips.accelerator_type(self.generation, self.chips)


def parse_topology(name: str) -> Topology:
  """'v5e:2x4' -> Topology; ValueError saying what is allowed."""
  m = _TOPOLOGY_RE.fullmatch(name.strip())
  if not m or m.group(1) not in tpu_chips.CHIPS:
    raise ValueError(
        "expected GENERATION:SHAPE with GENERATION one of "
        f"{sorted(tpu_chips.CHIPS)} and SHAPE like 2x2 (v5e, v6e) or 2x2x1 "
        "(v4, v5p)")
  return Topology(name.strip(), m.group(1),
                  int(np.prod([int(d) for d in m.group(2).split("x")])))


def topology_devices(topology: Topology) -> list:
  """The topology's abstract TPU devices from libtpu (no TPU needed)."""
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise AotError(
        "mode=aot_check compiles with libtpu, which is not installed: "
        f'pip install "jax[tpu]=={jax.__version__}" (about 210 MB; it works '
        "without a TPU), or skip the check (launch/tpu.py --skip-check)."
        ) from None
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Compiling touches no TPU, so another process holding libtpu's lock (any
  # jax process started without JAX_PLATFORMS=cpu while libtpu is installed)
  # must not block it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # Off a TPU VM libtpu looks for the VM's type and workers and logs scary
  # errors; naming them (as the topology's) keeps the output readable.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  try:
    desc = topologies.get_topology_desc(platform="tpu",
                                        topology_name=topology.name)
  except Exception as e:  # pylint: disable=broad-except
    raise AotError(f"libtpu does not know topology {topology.name!r}: "
                   f"{str(e).strip()[:300]}") from e
  return list(desc.devices)


def _nbytes(tree: Any) -> int:
  # Typed PRNG keys have an itemsize but are not numpy dtypes.
  return int(sum(np.prod(x.shape) * x.dtype.itemsize
                 for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class StepPlan:
  """One training step ready to lower: the jitted program and abstract args."""
  mode: str
  program: Any
  args: tuple
  teacher_forward: Any  # (program, args) of the teachers' forward, or None.
  init_state: Any  # () -> the initial TrainState, as train.train makes it.
  batch_size: int
  state_bytes: int
  teacher_bytes: int
  batch_bytes: int  # Per device.


def build_step(config, mode: str, mesh, workdir: str = "") -> StepPlan:
  """The step train.train(config with mode) runs, on `mesh`, with abstract inputs.

  Built by kdjax.run.train.build_step, the function the training loop uses
  (abstract: teacher weights as shapes, nothing read); a test runs this
  program on CPU devices against train's own step.
  """
  role = train.role_of(mode)
  train_cfg = config[role].train
  # The schedule's length changes constants, not shapes, memory or FLOPs.
  total_steps = int(train_cfg.num_steps or 1000)
  replicated = NamedSharding(mesh, P())
  built = train.build_step(config, mode, workdir or "/nonexistent", mesh,
                           total_steps=total_steps, abstract=True,
                           backend="shard_map")
  state = parallel.abstract(jax.eval_shape(built.init_state), replicated)
  teachers_params = built.teachers_params
  # parallel.map_over_devices' shard_map program, as a jit we can lower.
  program = parallel.jit_over_mesh(built.per_device, mesh)
  teacher_applies = built.teacher_applies

  batch_size = int(train_cfg.batch_size)
  sharded = NamedSharding(mesh, P(parallel.DATA_AXIS))
  input_shape, input_dtype = pipeline.input_spec(config.data)
  batch = {
      "inputs": jax.ShapeDtypeStruct((batch_size,) + input_shape, input_dtype,
                                     sharding=sharded),
      "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32,
                                     sharding=sharded)}

  teacher_forward = None
  if teacher_applies:
    def forward(params, inputs):
      return [apply(p, inputs, False, None).logits
              for apply, p in zip(teacher_applies, params)]
    teacher_forward = (
        jax.jit(jax.shard_map(forward, mesh=mesh,
                              in_specs=(P(), P(parallel.DATA_AXIS)),
                              out_specs=P(parallel.DATA_AXIS))),
        (teachers_params, batch["inputs"]))
  return StepPlan(mode=mode, program=program,
                  args=(state, batch, teachers_params),
                  teacher_forward=teacher_forward, init_state=built.init_state,
                  batch_size=batch_size,
                  state_bytes=_nbytes(state), teacher_bytes=_nbytes(
                      teachers_params),
                  batch_bytes=_nbytes(batch) // mesh.devices.size)


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0] if cost else {}
  return dict(cost or {})


@dataclasses.dataclass
class StepReport:
  """Per-device memory and cost of one compiled step."""
  mode: str
  batch_size: int
  devices: int
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  state_bytes: int
  teacher_bytes: int
  batch_bytes: int
  flops: float
  bytes_accessed: float
  xla_seconds: float | None
  teacher_flops: float | None
  compiler_error: str = ""

  @property
  def total(self) -> int:
    """Peak bytes per device: live arguments + new outputs + scratch + code."""
    return (self.arguments + self.outputs - self.aliased + self.temporaries
            + self.code)


def compile_step(plan: StepPlan, devices: int) -> StepReport:
  """Lowers and compiles a plan; a compiler out-of-memory is reported, not raised."""
  known = dict(mode=plan.mode, batch_size=plan.batch_size, devices=devices,
               state_bytes=plan.state_bytes, teacher_bytes=plan.teacher_bytes,
               batch_bytes=plan.batch_bytes)
  try:
    compiled = plan.program.lower(*plan.args).compile()
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
    if not re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds", message):
      raise
    arguments = plan.state_bytes + plan.teacher_bytes + plan.batch_bytes
    return StepReport(**known, arguments=arguments, outputs=0, aliased=0,
                      temporaries=0, code=0, flops=float("nan"),
                      bytes_accessed=float("nan"), xla_seconds=None,
                      teacher_flops=None, compiler_error=message.strip())
  memory = compiled.memory_analysis()
  cost = _cost(compiled)
  teacher_flops = None
  if plan.teacher_forward is not None:
    program, args = plan.teacher_forward
    teacher_flops = _cost(program.lower(*args).compile()).get("flops")
  return StepReport(
      **known, arguments=memory.argument_size_in_bytes,
      outputs=memory.output_size_in_bytes, aliased=memory.alias_size_in_bytes,
      temporaries=memory.temp_size_in_bytes,
      code=memory.generated_code_size_in_bytes,
      flops=float(cost.get("flops", float("nan"))),
      bytes_accessed=float(cost.get("bytes accessed", float("nan"))),
      xla_seconds=cost.get("optimal_seconds"), teacher_flops=teacher_flops)


def _size(b: float) -> str:
  if not np.isfinite(b):
    return "n/a"
  for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
    if abs(b) >= scale:
      return f"{b / scale:,.1f} {unit}"
  return f"{int(b)} B"


def _seconds(s: float) -> str:
  if not np.isfinite(s):
    return "n/a"
  for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
    if s >= scale:
      return f"{s / scale:.3g} {unit}"
  return f"{s / 1e-9:.3g} ns"


def format_report(r: StepReport, topology: Topology, limit: int) -> str:
  """The table the check prints (and a refusal carries)."""
  chip, per_chip = topology.chip, max(r.devices // topology.chips, 1)
  peak = chip.peak_flops / per_chip
  bandwidth = chip.hbm_bandwidth / per_chip
  unit = "chip" if per_chip == 1 else f"core (1/{per_chip} chip)"
  fits = r.total <= limit and not r.compiler_error
  padding = r.arguments - r.state_bytes - r.teacher_bytes - r.batch_bytes

  def row(label, value, note=""):
    return f"  {label:<34}{_size(value):>12}  {note}".rstrip()

  pct = lambda b: f"{100.0 * b / limit:.3g}% of the limit"
  lines = [
      f"{r.mode} step on {topology.name} ({r.devices} devices, {chip.name}, "
      f"1 device = 1 {unit}); global batch {r.batch_size}, "
      f"{r.batch_size // r.devices} per device",
      "memory per device",
      row("arguments", r.arguments, pct(r.arguments)),
      row("  student train state", r.state_bytes, "params + optimizer state"),
      *([row("  teacher params (replicated)", r.teacher_bytes,
             f"{100.0 * r.teacher_bytes / max(r.total, 1):.3g}% of the total")]
        if r.teacher_bytes else []),
      row("  batch shard", r.batch_bytes),
      *([row("  TPU layout padding", padding, "tiles pad small arrays")]
        if padding > 0 else []),
  ]
  if r.compiler_error:
    lines += [
        f"  {'temporaries, outputs':<34}{'unknown':>12}  the TPU compiler ran "
        "out of memory:",
        "    " + r.compiler_error.splitlines()[0][:400],
        row("limit (HBM per device)", limit,
            f"{chip.hbm_bytes / GIB:g} GiB per chip"),
        "  -> DOES NOT FIT"]
    return "\n".join(lines)
  lines += [
      row("outputs not aliased", r.outputs - r.aliased,
          "state is donated: its outputs reuse the arguments"),
      row("temporaries", r.temporaries, pct(r.temporaries)),
      row("generated code", r.code),
      row("total", r.total, pct(r.total)),
      row("limit (HBM per device)", limit,
          f"{chip.hbm_bytes / GIB:g} GiB per chip"),
      f"  -> {'fits' if fits else 'DOES NOT FIT'}",
  ]
  compute = r.flops / peak
  memory_time = r.bytes_accessed / bandwidth
  teacher = (f" (teachers' forward {100.0 * r.teacher_flops / r.flops:.0f}%)"
             if r.teacher_flops and r.flops else "")
  lines += [
      "compute per step",
      f"  {'FLOPs per device':<34}{r.flops:>12.4g}{teacher}",
      f"  {'FLOPs per step (all devices)':<34}{r.flops * r.devices:>12.4g}",
      f"  {'at peak':<34}{_seconds(compute):>12}  "
      f"({peak / 1e12:g} TFLOP/s bf16 per device)",
      f"  {'HBM traffic per device':<34}{_size(r.bytes_accessed):>12}"
      f"  -> {_seconds(memory_time)} at {bandwidth / 1e9:g} GB/s",
  ]
  if r.xla_seconds and float(r.xla_seconds) > 0:  # Negative = no estimate.
    lines.append(f"  {'XLA TPU cost-model estimate':<34}"
                 f"{_seconds(float(r.xla_seconds)):>12}")
  lines.append(f"  {'implied step time (lower bound)':<34}"
               f"{_seconds(max(compute, memory_time)):>12}")
  return "\n".join(lines)


def check(config, workdir: str = "") -> list[StepReport]:
  """mode=aot_check: compile each step for config.aot.topology, print, refuse."""
  topology = parse_topology(config.aot.topology)
  devices = topology_devices(topology)
  mesh = parallel.make_mesh(devices)
  if len(devices) != topology.devices:  # Validation assumed the table's count.
    for mode in aot_steps(config):
      role = train.role_of(mode)
      optim.validate(config[role].train, f"{role}.train", len(devices))
  limit = (int(config.aot.hbm_limit_gib * GIB) if config.aot.hbm_limit_gib
           else topology.chip.hbm_bytes * topology.chips // len(devices))
  reports, tables = [], []
  for mode in aot_steps(config):
    logging.info("aot_check: compiling the %s step for %s ...", mode,
                 topology.name)
    report = compile_step(build_step(config, mode, mesh, workdir),
                          len(devices))
    reports.append(report)
    tables.append(format_report(report, topology, limit))
  text = "\n\n".join(tables)
  print(text, flush=True)
  too_big = [r.mode for r in reports if r.total > limit or r.compiler_error]
  if too_big:
    raise AotDoesNotFitError(
        f"The {', '.join(too_big)} step(s) would not fit on {topology.name}:"
        f"\n\n{text}\n\nUse a smaller config.*.train.batch_size (or raise "
        "grad_accum_steps), a smaller model, or a topology with more chips.")
  return reports


def aot_steps(config) -> list[str]:
  """The training steps mode=aot_check compiles, from config.aot.steps."""
  spec = str(config.aot.steps).strip()
  if spec == "auto":
    return (["distill"] if config.teacher.checkpoint_dir
            else ["teacher", "distill"])
  steps = [s.strip() for s in spec.split(",") if s.strip()]
  allowed = ("teacher", "scratch", "distill")
  if not steps or any(s not in allowed for s in steps):
    fail("aot.steps", config.aot.steps, f"'auto' or a comma list of {allowed}")
  return steps


def validate(config) -> None:
  """config.aot (mode=aot_check): the topology, the limit, batch vs devices."""
  if "aot" not in config or not config.aot.topology:
    fail("aot.topology", config.get("aot", {}).get("topology", ""),
         "mode=aot_check needs a Cloud TPU topology, e.g. "
         "--config.aot.topology=v5e:2x2 (v5e:2x4, v4:2x2x1, v5p:2x2x1, ...)")
  try:
    topology = parse_topology(config.aot.topology)
  except ValueError as e:
    fail("aot.topology", config.aot.topology, str(e))
  if config.aot.hbm_limit_gib < 0:
    fail("aot.hbm_limit_gib", config.aot.hbm_limit_gib,
         "must be >= 0 (0 = the chip's HBM)")
  roles = {train.role_of(s) for s in aot_steps(config)}
  for role in sorted(roles):  # Models were checked; batch vs the topology.
    optim.validate(config[role].train, f"{role}.train", topology.devices)
