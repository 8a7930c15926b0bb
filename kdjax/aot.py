"""Check before paying for a TPU: compile the training steps for a Cloud TPU topology here.

    python -m kdjax.main --config=configs/fashion_mnist.py \
        --config.mode=aot_check --config.aot.topology=v5e:2x4
    python -m kdjax.main --config=configs/llama_slices.py:8b_1b_v5e16 \
        --config.mode=aot_check

Lowers and compiles the same step train.py runs (kdjax.run.train.build_step:
the same `step.train_step` bound to the same models, objective, optimizer and
reduction, state donated) for the devices of a named topology, using libtpu's
compiler on this machine (`pip install "jax[tpu]==0.10.2"`; no TPU needed),
on the mesh train.py would build there: the replicated layout's per-device
program (shard_map over a 1-D data mesh), or, when config.parallel.mesh
shards, the sharded layout's program (jit with the state's and the teachers'
shardings over ('data', 'fsdp', 'model')). Inputs are abstract: a
classification batch (inputs, labels [batch]) or, when data.seq_length > 0,
the language-model batch (inputs and labels int32 [batch, length], mask
float32); teacher weights are shapes (nothing is read).

It prints per-device memory split into teacher params, student params,
optimizer state, batch, temporaries (bytes per device of each array = its
shard) against the chip's HBM, the FLOPs of one step and the step time they
imply at the chip's peak, and refuses (AotDoesNotFitError, with the table) a
config that would not fit; a layout the TPU compiler refuses is compiled
again with xla_tpu_no_crash_on_oom, so the refusal still has its numbers.

FLOPs: for language models an analytic count (6 x student matmul params x
tokens + 2 x teacher matmul params x tokens + attention), because XLA's
cost_analysis counts a scan or while body once (the chunked loss, gradient
accumulation) and, under FSDP, the TPU compiler's collective matmul loops
are undercounted too; XLA's number is printed beside it. Classifiers keep
XLA's count (no scans, replicated). The pmap backend is checked as shard_map:
JAX runs pmap on the same machinery. The chip table (kdjax/core/tpu_chips.py)
is the public Cloud TPU spec (bf16 peak, nominal HBM).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.core import errors, tpu_chips
from kdjax.core.config import fail
from kdjax.data import pipeline
from kdjax.distill import mesh as mesh_lib
from kdjax.distill import optim, parallel
from kdjax.run import layout as layout_lib
from kdjax.run import train
from kdjax.weights import params as params_lib
from kdjax.weights import specs

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


def device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of (abstract) arrays: each leaf's
  shard (its sharding's shard shape), the whole leaf if it has none.
  (Typed PRNG keys have an itemsize but are not numpy dtypes.)"""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = tuple(x.shape)
    sharding = getattr(x, "sharding", None)
    if sharding is not None:
      shape = tuple(sharding.shard_shape(shape))
    total += int(np.prod(shape)) * x.dtype.itemsize
  return int(total)


@dataclasses.dataclass(frozen=True)
class AnalyticFlops:
  """FLOPs of one training step by formula (the README says why not XLA's).

  Matmul params are those multiplied per token: every kernel, the LM head
  (D x V, also when tied to the embedding), not the embedding lookups.
  Attention: scores and probabilities x values over the full L x L (the
  models compute the masked half too), 4 x L x heads x head_dim per token
  per layer forward. Training = 3 x forward (forward, two backward matmuls);
  a frozen teacher runs forward only. The loss's softmaxes, norms and the
  optimizer are left out (< 1% at these sizes). These are model FLOPs, as
  utilisation (MFU) counts them: what rematerialisation recomputes is not
  included.
  """
  tokens: int
  student: float  # Trained model: 6 x matmul params x tokens.
  student_attention: float  # 3 x forward attention.
  teacher: float  # Frozen teachers: 2 x matmul params x tokens.
  teacher_attention: float

  @property
  def total(self) -> float:
    return (self.student + self.student_attention + self.teacher
            + self.teacher_attention)


def _matmul_params(model, data_config) -> int:
  """Params a language model multiplies per token (kernels + the LM head)."""
  shapes = params_lib.abstract(model, data_config)
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = [str(getattr(k, "key", k)) for k in path]
    if (leaf.ndim < 2 or names[-1] in ("scale", "bias")
        or any("bias" in n or "norm" in n for n in names)):
      continue  # Norm scales and biases (stacked too, scan_layers): no matmul.
    if names[0] == "embed" or names[-1] == "positions":
      continue  # Embedding lookups (a tied head is added below).
    total += int(np.prod(leaf.shape))
  if getattr(model, "tie_embeddings", True):
    total += int(model.vocab_size) * int(model.width)
  return total


def _attention_flops_per_token(model, length: int) -> float:
  """Forward: QK^T and probabilities x values, full L x L, every layer."""
  heads = int(model.num_heads)
  head_dim = int(getattr(model, "resolved_head_dim", 0)
                 or model.width // heads)
  return 4.0 * length * heads * head_dim * int(model.num_layers)


def analytic_flops(config, mode: str, workdir: str = "") -> AnalyticFlops | None:
  """The step's FLOPs by formula for a language-model config, else None."""
  if not pipeline.is_language_modelling(config.data):
    return None
  length = int(config.data.seq_length)
  role = train.role_of(mode)
  tokens = int(config[role].train.batch_size) * length
  trained = specs.build_model(config, role)
  student = 6.0 * _matmul_params(trained, config.data) * tokens
  student_attn = 3.0 * _attention_flops_per_token(trained, length) * tokens
  teacher = teacher_attn = 0.0
  if mode == "distill" and not config.distill.get("teacher_cache", ""):
    for spec in specs.teacher_specs(config, workdir or "/nonexistent"):
      model = specs.model_from_spec(spec.model)
      teacher += 2.0 * _matmul_params(model, config.data) * tokens
      teacher_attn += _attention_flops_per_token(model, length) * tokens
  return AnalyticFlops(tokens=tokens, student=student,
                       student_attention=student_attn, teacher=teacher,
                       teacher_attention=teacher_attn)


@dataclasses.dataclass
class StepPlan:
  """One training step ready to lower: the jitted program and abstract args.

  Byte counts are per device (each array's shard on one device).
  """
  mode: str
  program: Any  # Has .lower(state, batch, teachers_params).
  args: tuple
  teacher_forward: Any  # (program, args) of the teachers' forward, or None.
  init_state: Any  # () -> the initial TrainState, as train.train makes it.
  batch_size: int
  state_bytes: int  # The whole train state: the three below.
  teacher_bytes: int
  batch_bytes: int
  params_bytes: int = 0  # Student params (+ trained projections).
  opt_bytes: int = 0  # Optimizer state.
  other_state_bytes: int = 0  # Step, rng.
  layout: str = ""  # 'replicated (data=4)' or 'sharded (data=1 x fsdp=2 ...)'.
  teacher_dtype: str = ""
  analytic: AnalyticFlops | None = None


def _layout(mesh) -> str:
  sizes = " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
  return (f"sharded ({sizes})" if mesh_lib.is_mesh(mesh)
          else f"replicated ({sizes})")


def abstract_batch(config, batch_size: int, sharding) -> dict[str, Any]:
  """The batch train.py feeds, as shapes: a language model's token batch
  (data.seq_length > 0) or a classification batch."""
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                  sharding=sharding)
  if pipeline.is_language_modelling(config.data):
    shape = (batch_size, int(config.data.seq_length))
    return {"inputs": sds(shape, jnp.int32), "labels": sds(shape, jnp.int32),
            "mask": sds(shape, jnp.float32)}
  input_shape, input_dtype = pipeline.input_spec(config.data)
  return {"inputs": sds((batch_size,) + input_shape, input_dtype),
          "labels": sds((batch_size,), jnp.int32)}


def build_step(config, mode: str, mesh, workdir: str = "") -> StepPlan:
  """The step train.train(config with mode) runs, on `mesh`, with abstract inputs.

  Built by kdjax.run.train.build_step, the function the training loop uses
  (abstract: teacher weights as shapes, nothing read); a test runs this
  program on CPU devices against train's own step. `mesh` is
  layout.make_mesh's: 1-D (replicated layout) or ('data', 'fsdp', 'model').
  """
  role = train.role_of(mode)
  train_cfg = config[role].train
  # The schedule's length changes constants, not shapes, memory or FLOPs.
  total_steps = int(train_cfg.num_steps or 1000)
  backend = ("shard_map" if config.parallel.backend == "pmap"
             else config.parallel.backend)
  built = train.build_step(config, mode, workdir or "/nonexistent", mesh,
                           total_steps=total_steps, abstract=True,
                           backend=backend)
  shapes = jax.eval_shape(built.init_state)
  teachers_params = built.teachers_params
  batch_size = int(train_cfg.batch_size)
  teacher_forward = None
  if built.sharded:
    state = parallel.abstract_like(shapes, built.state_shardings)
    program = built.program(backend)  # jit with shardings; has .lower.
    batch = abstract_batch(config, batch_size, program.batch_sharding)
  else:
    state = parallel.abstract(shapes, NamedSharding(mesh, P()))
    # parallel.map_over_devices' shard_map program, as a jit we can lower.
    program = parallel.jit_over_mesh(built.per_device, mesh)
    batch = abstract_batch(config, batch_size,
                           NamedSharding(mesh, P(parallel.DATA_AXIS)))
    teacher_applies = built.teacher_applies
    if teacher_applies and not pipeline.is_language_modelling(config.data):
      def forward(params, inputs):
        return [apply(p, inputs, False, None).logits
                for apply, p in zip(teacher_applies, params)]
      teacher_forward = (
          jax.jit(jax.shard_map(forward, mesh=mesh,
                                in_specs=(P(), P(parallel.DATA_AXIS)),
                                out_specs=P(parallel.DATA_AXIS))),
          (teachers_params, batch["inputs"]))
  params_bytes = device_bytes((state.params, state.aux_params))
  opt_bytes = device_bytes(state.opt_state)
  state_bytes = device_bytes(state)
  dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(teachers_params)})
  return StepPlan(mode=mode, program=program,
                  args=(state, batch, teachers_params),
                  teacher_forward=teacher_forward, init_state=built.init_state,
                  batch_size=batch_size, state_bytes=state_bytes,
                  teacher_bytes=device_bytes(teachers_params),
                  batch_bytes=device_bytes(batch), params_bytes=params_bytes,
                  opt_bytes=opt_bytes,
                  other_state_bytes=state_bytes - params_bytes - opt_bytes,
                  layout=_layout(mesh), teacher_dtype="/".join(dtypes),
                  analytic=analytic_flops(config, mode, workdir))


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
  flops: float  # XLA's count, per device.
  bytes_accessed: float
  xla_seconds: float | None
  teacher_flops: float | None
  compiler_error: str = ""
  params_bytes: int = 0
  opt_bytes: int = 0
  other_state_bytes: int = 0
  layout: str = ""
  teacher_dtype: str = ""
  # Language models: the analytic count of the whole step (all devices).
  analytic_flops: float | None = None
  analytic_terms: dict | None = None
  tokens: int = 0
  compile_seconds: float = 0.0
  numbers_from_no_crash_compile: bool = False

  @property
  def total(self) -> int:
    """Peak bytes per device: live arguments + new outputs + scratch + code."""
    return (self.arguments + self.outputs - self.aliased + self.temporaries
            + self.code)


TIGHT = 0.05  # Less headroom than this is flagged.
_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds")
# Compiles a layout that does not fit and reports its sizes (README, "Which
# slice does my pair need?").
NO_CRASH_ON_OOM = {"xla_tpu_no_crash_on_oom": "true"}


def compile_step(plan: StepPlan, devices: int) -> StepReport:
  """Lowers and compiles a plan; a compiler out-of-memory is reported, not
  raised (with the sizes of a compile that is told not to stop at it)."""
  analytic = plan.analytic
  known = dict(mode=plan.mode, batch_size=plan.batch_size, devices=devices,
               state_bytes=plan.state_bytes, teacher_bytes=plan.teacher_bytes,
               batch_bytes=plan.batch_bytes, params_bytes=plan.params_bytes,
               opt_bytes=plan.opt_bytes,
               other_state_bytes=plan.other_state_bytes, layout=plan.layout,
               teacher_dtype=plan.teacher_dtype,
               analytic_flops=analytic.total if analytic else None,
               analytic_terms=({k: v for k, v in vars(analytic).items()
                                if k != "tokens"} if analytic else None),
               tokens=analytic.tokens if analytic else 0)
  started = time.perf_counter()
  lowered = plan.program.lower(*plan.args)
  message, no_crash = "", False
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
    if not _OOM.search(message):
      raise
    try:
      compiled = lowered.compile(compiler_options=NO_CRASH_ON_OOM)
      no_crash = True
    except Exception as again:  # pylint: disable=broad-except
      logging.warning("aot_check: the compile with %s failed too: %s",
                      NO_CRASH_ON_OOM, str(again)[:2000])
      arguments = plan.state_bytes + plan.teacher_bytes + plan.batch_bytes
      return StepReport(**known, arguments=arguments, outputs=0, aliased=0,
                        temporaries=0, code=0, flops=float("nan"),
                        bytes_accessed=float("nan"), xla_seconds=None,
                        teacher_flops=None, compiler_error=message.strip(),
                        compile_seconds=time.perf_counter() - started)
  seconds = time.perf_counter() - started
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
      xla_seconds=cost.get("optimal_seconds"), teacher_flops=teacher_flops,
      compiler_error=message.strip(), compile_seconds=seconds,
      numbers_from_no_crash_compile=no_crash)


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


def _flops(f: float) -> str:
  return f"{f:.3g}" if np.isfinite(f) else "n/a"


def format_report(r: StepReport, topology: Topology, limit: int) -> str:
  """The table the check prints (and a refusal carries)."""
  chip, per_chip = topology.chip, max(r.devices // topology.chips, 1)
  peak = chip.peak_flops / per_chip
  bandwidth = chip.hbm_bandwidth / per_chip
  unit = "chip" if per_chip == 1 else f"core (1/{per_chip} chip)"
  fits = r.total <= limit and not r.compiler_error
  known = (r.params_bytes + r.opt_bytes + r.other_state_bytes
           + r.teacher_bytes + r.batch_bytes)
  padding = r.arguments - known
  sharded = r.layout.startswith("sharded")
  batch = (f"{r.batch_size} x {r.tokens // max(r.batch_size, 1)} tokens"
           if r.tokens else f"{r.batch_size}")

  def row(label, value, note=""):
    return f"  {label:<34}{_size(value):>12}  {note}".rstrip()

  pct = lambda b: f"{100.0 * b / limit:.3g}% of the limit"
  of_total = lambda b: f"{100.0 * b / max(r.total, 1):.3g}% of the total"
  held = f"{r.teacher_dtype}, " if r.teacher_dtype else ""
  lines = [
      f"{r.mode} step on {topology.name} ({r.devices} devices, {chip.name}, "
      f"1 device = 1 {unit}), {r.layout or 'replicated'}; global batch "
      f"{batch}",
      "memory per device",
      row("arguments", r.arguments, pct(r.arguments)),
      *([row(f"  teacher params ({'sharded' if sharded else 'replicated'})",
             r.teacher_bytes, f"{held}{of_total(r.teacher_bytes)}")]
        if r.teacher_bytes else []),
      row("  student params", r.params_bytes,
          "sharded like the teacher" if sharded else "replicated"),
      row("  optimizer state", r.opt_bytes),
      *([row("  step, rng", r.other_state_bytes)]
        if r.other_state_bytes else []),
      row("  batch shard", r.batch_bytes),
      *([row("  TPU layout padding", padding, "tiles pad small arrays")]
        if padding > 0 else []),
  ]
  if r.compiler_error and not r.numbers_from_no_crash_compile:
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
  ]
  if r.compiler_error:
    lines += [
        "  the TPU compiler ran out of memory (numbers above: the same "
        "program compiled with xla_tpu_no_crash_on_oom):",
        "    " + r.compiler_error.splitlines()[0][:400]]
  if fits and r.total > (1 - TIGHT) * limit:
    lines.append(f"  -> fits, but tight: {_size(limit - r.total)} "
                 f"({100.0 * (limit - r.total) / limit:.2g}%) to spare (the "
                 "TPU runtime keeps some HBM for itself)")
  else:
    lines.append(f"  -> {'fits' if fits else 'DOES NOT FIT'}")
  memory_time = r.bytes_accessed / bandwidth
  lines.append("compute per step")
  if r.analytic_flops is not None:
    t = r.analytic_terms or {}
    compute = r.analytic_flops / (peak * r.devices)
    lines += [
        f"  {'FLOPs per step (analytic)':<34}{_flops(r.analytic_flops):>12}"
        f"  student 6ND {_flops(t.get('student', 0))} + attention "
        f"{_flops(t.get('student_attention', 0))}"
        + (f"; teacher 2ND {_flops(t.get('teacher', 0))} + attention "
           f"{_flops(t.get('teacher_attention', 0))}" if t.get("teacher")
           else ""),
        f"  {'FLOPs per device (analytic)':<34}"
        f"{_flops(r.analytic_flops / r.devices):>12}",
        f"  {'step time at peak':<34}{_seconds(compute):>12}  "
        f"({peak / 1e12:g} TFLOP/s bf16 per device, 100% utilisation)",
        f"  {'XLA cost_analysis per device':<34}{_flops(r.flops):>12}  not "
        "used: it counts a scan/while body once (chunked loss, gradient "
        "accumulation) and misses FSDP's collective-matmul loops",
    ]
  else:
    compute = r.flops / peak
    teacher = (f" (teachers' forward {100.0 * r.teacher_flops / r.flops:.0f}%)"
               if r.teacher_flops and r.flops else "")
    lines += [
        f"  {'FLOPs per device':<34}{r.flops:>12.4g}{teacher}",
        f"  {'FLOPs per step (all devices)':<34}{r.flops * r.devices:>12.4g}",
        f"  {'at peak':<34}{_seconds(compute):>12}  "
        f"({peak / 1e12:g} TFLOP/s bf16 per device)",
    ]
  lines.append(f"  {'HBM traffic per device':<34}{_size(r.bytes_accessed):>12}"
               f"  -> {_seconds(memory_time)} at {bandwidth / 1e9:g} GB/s")
  if r.xla_seconds and float(r.xla_seconds) > 0:  # Negative = no estimate.
    lines.append(f"  {'XLA TPU cost-model estimate':<34}"
                 f"{_seconds(float(r.xla_seconds)):>12}")
  lines.append(f"  {'implied step time (lower bound)':<34}"
               f"{_seconds(max(compute, memory_time)):>12}")
  if r.compile_seconds:
    lines.append(f"compiled in {r.compile_seconds:.0f} s on this machine")
  return "\n".join(lines)


def check(config, workdir: str = "") -> list[StepReport]:
  """mode=aot_check: compile each step for config.aot.topology, print, refuse."""
  topology = parse_topology(config.aot.topology)
  devices = topology_devices(topology)
  # The mesh train.py builds there (mesh sizes checked against this
  # topology's devices, not this machine's). A 3-axis mesh is a reshape of
  # the device list: topologies.make_mesh refuses shapes that are not the
  # physical torus (README, "Models too big for one chip").
  mesh = layout_lib.make_mesh(config, devices)
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
        "grad_accum_steps), shard the models (config.parallel.mesh, e.g. "
        "fsdp=-1), a smaller model, or a topology with more chips.")
  return reports


def aot_steps(config) -> list[str]:
  """The training steps mode=aot_check compiles, from config.aot.steps."""
  spec = str(config.aot.steps).strip()
  if spec == "auto":  # A trained or imported teacher is not trained again.
    return (["distill"] if config.teacher.checkpoint_dir
            or specs.pretrained_teacher(config) else ["teacher", "distill"])
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
  # The mesh is sized for the topology's devices, not this machine's.
  mesh_lib.sizes(config.parallel.mesh, topology.devices)
  roles = {train.role_of(s) for s in aot_steps(config)}
  for role in sorted(roles):  # Models were checked; batch vs the topology.
    optim.validate(config[role].train, f"{role}.train", topology.devices)
