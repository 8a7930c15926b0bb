"""kdjax's fused distillation step vs PyTorch on the reference workload.

    python benchmarks/step_throughput.py [--repeats=3] [--steps=2]
    python benchmarks/step_throughput.py --only=kdjax_fused,torch_eager
    python benchmarks/step_throughput.py --check   # kdjax == torch numerically
    python benchmarks/step_throughput.py --parts   # the step's halves alone
    python benchmarks/step_throughput.py --profile # op by op, both frameworks

The reference workload (performance issue): GPT decoder (pre-LN, learned
positions, tied embeddings, GELU MLP 4x), vocabulary 8192, sequence 256, batch
16, float32, AdamW lr 1e-3, loss 0.5 * T^2 * KL(teacher_T || student_T) +
0.5 * CE with T = 2; teacher width 512 / 8 layers / 8 heads, student width 256
/ 4 layers / 4 heads.

Contenders, each in its own worker subprocess with the SAME environment
(allocator via LD_PRELOAD, thread counts), driven in turn by this process so
their repetitions interleave (the machine is shared; ratios come from one run):
  kdjax fused    kdjax.distill.step.train_step through parallel.map_over_devices on a
                 1-device mesh, objectives.distillation(alpha=0.5, T=2): the
                 path a user runs. Teacher forward inside the step.
  kdjax unfused  the teacher forward as its own jitted call whose logits come
                 back to the host (np.asarray) and feed the same train_step
                 with a teacher that just returns them.
  torch eager    plain PyTorch of the identical model and loss (SDPA causal
                 attention, torch.optim.AdamW).
  torch.compile  the same, forward + loss under torch.compile (backward via
                 AOTAutograd), optimizer eager.
Mixed precision (kdjax's precision policy, README "Precision"):
  kdjax bf16 teacher  the fused step with the teacher held and run in
                      bfloat16 (teacher.precision params=compute=bfloat16)
  kdjax mixed bf16    and the student computing in bfloat16 over float32
                      parameters (student.precision.compute=bfloat16)
  torch eager/compile bf16  the teacher's weights in bfloat16, the student's
                      forward and loss under torch.autocast(bfloat16),
                      logits upcast to float32 for the loss, AdamW on float32
Also printed: XLA's FLOP count of the fused step (compiled.cost_analysis()) as
FLOP/s against this machine's float32 and bfloat16 matmul rates (jnp.dot and
torch.matmul of 4096 x 4096), and the bfloat16 teacher's logits against the
float32 teacher's on the same weights and batch (max and mean |error|).
PyTorch is a benchmark-only dependency, never imported by kdjax.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

import machine_info  # pylint: disable=g-bad-import-order  (benchmarks/)

# Run from a checkout: import this repo's kdjax even without `pip install -e`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROFILE_STEPS = 3  # --profile: steps traced, so one disturbed step counts 1/3.
VOCAB, SEQ, BATCH, TEMPERATURE, ALPHA, LR, WEIGHT_DECAY = (
    8192, 256, 16, 2.0, 0.5, 1e-3, 0.01)
TEACHER = dict(width=512, num_layers=8, num_heads=8)
STUDENT = dict(width=256, num_layers=4, num_heads=4)
MATMUL_N = 4096
SLOW_BF16 = 20e9  # FLOP/s; see TorchWorker.matmul.
WORKERS = ("kdjax_fused", "kdjax_unfused", "torch_eager", "torch_compile",
           "kdjax_bf16_teacher", "kdjax_mixed", "torch_eager_bf16",
           "torch_compile_bf16")
DEFAULT_WORKERS = WORKERS[:4]
LABELS = {"kdjax_fused": "kdjax fused step", "kdjax_unfused": "kdjax unfused "
          "(teacher logits via host)", "torch_eager": "PyTorch eager",
          "torch_compile": "PyTorch torch.compile",
          "kdjax_bf16_teacher": "kdjax fused, bfloat16 teacher",
          "kdjax_mixed": "kdjax fused, mixed bfloat16 (teacher + student "
                         "compute)",
          "torch_eager_bf16": "PyTorch eager, bfloat16 teacher + autocast",
          "torch_compile_bf16": "PyTorch torch.compile, bfloat16 teacher + "
                                "autocast"}
# kind -> (teacher params/compute dtype, student compute dtype)
PRECISIONS = {"kdjax_bf16_teacher": ("bfloat16", "float32"),
              "kdjax_mixed": ("bfloat16", "bfloat16")}


def _batch(batch=BATCH, seq=SEQ, seed=0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  tokens = np.random.default_rng(seed).integers(0, VOCAB, (batch, seq + 1))
  return tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)


# ----------------------------------------------------------------------------
# kdjax side.
# ----------------------------------------------------------------------------


def _kdjax_parts(teacher_dtype: str = "float32",
                 student_dtype: str = "float32"):
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from kdjax import models  # pylint: disable=g-import-not-at-top
  from kdjax.core import defaults  # pylint: disable=g-import-not-at-top
  from kdjax.distill import objectives, optim  # pylint: disable=g-import-not-at-top
  from kdjax.models.partitioning import unbox  # pylint: disable=g-import-not-at-top
  teacher = models.get_model("gpt", vocab_size=VOCAB, max_length=SEQ,
                             dtype=teacher_dtype, **TEACHER)
  student = models.get_model("gpt", vocab_size=VOCAB, max_length=SEQ,
                             dtype=student_dtype, **STUDENT)
  distill = defaults.get_config().distill
  distill.update(alpha=ALPHA, temperature=TEMPERATURE)
  objective = objectives.distillation(distill, num_teachers=1, total_steps=1)
  tx = optim.make_optimizer(ml_collections.ConfigDict(dict(
      optimizer="adamw", learning_rate=LR, weight_decay=WEIGHT_DECAY,
      warmup_steps=0, schedule="constant")), total_steps=1)
  tokens = jax.numpy.zeros((1, SEQ), jax.numpy.int32)
  init = jax.jit(lambda model, key: unbox(model.init(key, tokens)["params"]),
                 static_argnums=0)
  # The teacher is held in its compute dtype (teacher.precision.params).
  t_params = jax.tree.map(lambda x: x.astype(teacher_dtype),
                          init(teacher, jax.random.key(0)))
  return teacher, student, objective, tx, t_params, \
      init(student, jax.random.key(1))


class KdjaxWorker:
  """kdjax's real step (fused or with the teacher's logits through the host)."""

  def __init__(self, fused: bool, teacher_dtype: str = "float32",
               student_dtype: str = "float32"):
    import functools  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from kdjax.distill import parallel, step  # pylint: disable=g-import-not-at-top
    from kdjax.distill.objectives import ModelOutputs  # pylint: disable=g-import-not-at-top
    self.jax = jax
    self.teacher_dtype = teacher_dtype
    teacher, student, objective, tx, t_params, s_params = _kdjax_parts(
        teacher_dtype, student_dtype)
    mesh = parallel.make_mesh(jax.devices()[:1])
    axis = parallel.DataAxis("shard_map")
    self.tokens, self.labels = _batch()
    if fused:
      student_apply = step.make_apply_fn(student)
      teacher_applies = (step.make_apply_fn(teacher),)
      self.frozen = parallel.replicate((t_params,), mesh)
    else:
      inner = step.make_apply_fn(student)

      def student_apply(params, inputs, train, rng, capture=False):
        return inner(params, inputs["tokens"], train, rng, capture)

      def cached_teacher(params, inputs, train, rng, capture=False):
        del params, train, rng, capture
        return ModelOutputs(inputs["teacher_logits"])
      teacher_applies = (cached_teacher,)
      self.frozen = parallel.replicate(({},), mesh)
      teacher_apply = step.make_apply_fn(teacher)
      self.teacher_forward = jax.jit(
          lambda p, x: teacher_apply(p, x, False, None).logits)
      self.teacher_params = jax.device_put(t_params, jax.devices()[0])
    per_device = functools.partial(
        step.train_step, student_apply=student_apply,
        teacher_applies=teacher_applies, objective=objective, tx=tx,
        axis=axis)
    self.fused = fused
    # A host copy of the student: the step donates the device one.
    self._parts_setup = (teacher, student, objective, t_params,
                         jax.device_get(s_params))
    self.run_step = parallel.map_over_devices(per_device, mesh, "shard_map")
    self.state = parallel.replicate(step.create_train_state(
        s_params, tx, jax.random.key(2)), mesh)
    # The same program map_over_devices compiles, for XLA's cost analysis.
    self.cost_fn = parallel.jit_over_mesh(per_device, mesh)
    self.shard = lambda b: parallel.shard_batch(b, mesh)

  def _host_batch(self):
    import numpy as np  # pylint: disable=g-import-not-at-top
    if self.fused:
      return {"inputs": self.tokens, "labels": self.labels}
    logits = np.asarray(self.teacher_forward(self.teacher_params, self.tokens))
    return {"inputs": {"tokens": self.tokens, "teacher_logits": logits},
            "labels": self.labels}

  def run(self, steps: int) -> dict:
    start, cpu, faults = time.perf_counter(), time.process_time(), _faults()
    for _ in range(steps):
      self.state, metrics = self.run_step(self.state, self._host_batch(),
                                          self.frozen)
    metrics = self.jax.device_get(metrics)
    return {"seconds_per_step": (time.perf_counter() - start) / steps,
            "cpu_seconds_per_step": (time.process_time() - cpu) / steps,
            "minor_faults_per_step": (_faults() - faults) / steps,
            "loss": float(metrics["loss"] / metrics["count"])}

  def parts(self) -> dict:
    """Seconds of the step's two halves compiled alone: teacher forward to
    logits, and student forward + backward + KD loss given those logits."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from kdjax.distill import step  # pylint: disable=g-import-not-at-top
    from kdjax.distill.objectives import ModelOutputs  # pylint: disable=g-import-not-at-top
    jax = self.jax
    teacher, student, objective, t_params, s_params = self._parts_setup
    teacher_apply, student_apply = (step.make_apply_fn(teacher),
                                    step.make_apply_fn(student))
    teacher_forward = jax.jit(
        lambda p, x: teacher_apply(p, x, False, None).logits)
    teacher_logits = teacher_forward(t_params, self.tokens)

    def student_loss(params, logits, tokens, labels):
      per_token, _ = objective(student_apply(params, tokens, True, None),
                               [ModelOutputs(logits)], labels, 0)
      return per_token.mean()
    student_grad = jax.jit(jax.grad(student_loss))
    return _time_parts({
        "teacher_forward": lambda: teacher_forward(t_params, self.tokens),
        "student_step": lambda: student_grad(
            s_params, teacher_logits, self.tokens, self.labels)},
                       lambda out: jax.block_until_ready(out), np)

  def profile(self) -> dict:
    """Per-op seconds per fused step, over PROFILE_STEPS traced steps
    (jax.profiler's Perfetto trace of the CPU thunks), grouped by what the
    op does.

    Two sums per group: the ops' own durations, and their share of the wall
    clock (an interval where k ops run at once counts 1/k to each): XLA:CPU
    runs independent ops at the same time on the same cores, so only the
    second adds up to the step."""
    import gzip  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top
    jax = self.jax
    ops = _hlo_ops(self.cost_fn.lower(
        self.state, self.shard(self._host_batch()),
        self.frozen).compile().as_text())
    self.run(1)
    with tempfile.TemporaryDirectory() as trace_dir:
      jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
      wall = self.run(PROFILE_STEPS)["seconds_per_step"]
      jax.profiler.stop_trace()
      path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                       recursive=True)[0]
      with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                   if e.get("ph") == "X" and e["name"] in ops)
    labels = [_op_group(name, *ops[name]) for _, _, name in spans]
    summed, shares = {}, _wall_shares(spans)
    for (start, stop, _), label in zip(spans, labels):
      summed[label] = (summed.get(label, 0.0) +
                       (stop - start) / 1e6 / PROFILE_STEPS)
    wall_share = {}
    for label, share in zip(labels, shares):
      wall_share[label] = wall_share.get(label, 0.0) + share / PROFILE_STEPS
    return {"wall": wall, "ops_sum": sum(summed.values()),
            "ops_union": sum(shares) / PROFILE_STEPS, "groups": summed,
            "wall_share": wall_share}

  def info(self) -> dict:
    """XLA's FLOP count of the compiled step."""
    jax = self.jax
    compiled = self.cost_fn.lower(self.state, self.shard(self._host_batch()),
                                  self.frozen).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost["flops"]), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}

  def matmul(self) -> dict:
    """FLOP/s of one MATMUL_N^2 jnp.dot in float32 and in bfloat16
    (compiled on first call)."""
    jax, jnp = self.jax, self.jax.numpy
    if not hasattr(self, "_matmul"):
      a, b = (jax.random.normal(jax.random.key(i), (MATMUL_N,) * 2)
              for i in (0, 1))
      self._matmul = {dtype: (a.astype(dtype), b.astype(dtype))
                      for dtype in ("float32", "bfloat16")}
      self._dot = jax.jit(jnp.dot)
      for pair in self._matmul.values():
        self._dot(*pair).block_until_ready()
    out = {}
    for dtype, (a, b) in self._matmul.items():
      start = time.perf_counter()
      self._dot(a, b).block_until_ready()
      out[dtype] = 2 * MATMUL_N**3 / (time.perf_counter() - start)
    return {"matmul_flops_per_s": out}

  def quality(self) -> dict:
    """This worker's teacher logits against the float32 teacher's, same
    weights (rounded to bfloat16 or not) and batch."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from kdjax.distill import step  # pylint: disable=g-import-not-at-top
    jax = self.jax
    teacher, _, _, _, t_params, _ = _kdjax_parts()  # float32
    mine = _kdjax_parts(self.teacher_dtype)[0]
    forward = lambda model, params: np.asarray(jax.jit(
        lambda p, x: step.make_apply_fn(model)(p, x, False, None).logits)(
            params, self.tokens), np.float64)
    reference = forward(teacher, t_params)
    got = forward(mine, jax.tree.map(lambda x: x.astype(self.teacher_dtype),
                                     t_params))
    error = np.abs(got - reference)
    return {"teacher_logits_max_error": float(error.max()),
            "teacher_logits_mean_error": float(error.mean()),
            "teacher_logits_std": float(reference.std()),
            "teacher_argmax_agreement": float(np.mean(
                got.argmax(-1) == reference.argmax(-1)))}


def _hlo_ops(hlo: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (result shape, op_name) from optimized HLO text.

  A fusion is named after its root, so a fusion that holds dots (a matmul
  with a fused softmax or bias; YNNPACK also chains several matmuls into one
  fusion) takes the op_name of its last dot, the one nearest its root."""
  dot_names, computation = {}, None
  for line in hlo.splitlines():
    header = re.match(r"%?([\w.\-]+) \(.*\) -> .* \{$", line)
    if header:
      computation = header.group(1)
    elif computation and re.search(r" dot\(", line):
      meta = re.search(r'op_name="([^"]+)"', line)
      dot_names[computation] = meta.group(1) if meta else ""
  ops = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) [\w-]+\(", line)
    if m:
      meta = re.search(r'op_name="([^"]+)"', line)
      calls = re.search(r"calls=%?([\w.\-]+)", line)
      op_name = meta.group(1) if meta else ""
      if calls and calls.group(1) in dot_names:
        op_name = dot_names[calls.group(1)]
      ops[m.group(1)] = (m.group(2), op_name)
  return ops


def _wall_shares(spans: list[tuple[float, float, str]]) -> list[float]:
  """Seconds of wall clock per span (microsecond times), an interval shared
  by k running spans counting 1/k to each; they sum to the spans' union."""
  edges = sorted([(start, 1, i) for i, (start, _, _) in enumerate(spans)] +
                 [(stop, -1, i) for i, (_, stop, _) in enumerate(spans)])
  shares, running, last = [0.0] * len(spans), set(), None
  for time_us, change, i in edges:
    if running:
      for j in running:
        shares[j] += (time_us - last) / 1e6 / len(running)
    (running.add if change > 0 else running.discard)(i)
    last = time_us
  return shares


def _faults() -> int:
  """Minor page faults of this process so far (fresh pages it touched)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _op_group(name: str, shape: str, op_name: str) -> str:
  """A coarse label for one XLA op of the fused step, from its HLO."""
  backward = "transpose(jvp" in op_name
  if "dot_general" in op_name:
    where = ("vocabulary projection" if "tied_head" in op_name else
             "attention products (with the fused softmax)"
             if "bhqk" in op_name or "bhqd" in op_name else "layer matmuls")
    return f"matmul: {where}, {'backward' if backward else 'forward'}"
  if re.search(r"/block_\d+/(slice|concatenate)", op_name):
    return "attention: q/k/v block slices and concatenation (copies)"
  if name.startswith("wrapped_broadcast"):
    return "broadcasts written out as operands of YNNPACK fusions"
  if "copy" in name or "transpose" in name:
    return "copies and transposes"
  if f",{VOCAB}]" in shape or f"[{BATCH},{SEQ}]" in shape:
    return "loss and logits elementwise ([tokens, vocab])"
  if "optax" in op_name or "adam" in op_name.lower():
    return "optimizer update"
  return "other elementwise (norms, GELU, softmax, ...)"


# ----------------------------------------------------------------------------
# PyTorch side (benchmark only).
# ----------------------------------------------------------------------------


def _torch_model_classes():
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):
    """Pre-LN block; the same math as kdjax.models.gpt.DecoderBlock."""

    def __init__(self, width, heads):
      super().__init__()
      self.heads = heads
      self.ln_attention = nn.LayerNorm(width, eps=1e-6)  # Flax's default eps.
      self.qkv = nn.Linear(width, 3 * width)
      self.out = nn.Linear(width, width)
      self.ln_mlp = nn.LayerNorm(width, eps=1e-6)
      self.mlp_in = nn.Linear(width, 4 * width)
      self.mlp_out = nn.Linear(4 * width, width)

    def forward(self, x):
      b, l, d = x.shape
      q, k, v = self.qkv(self.ln_attention(x)).split(d, dim=-1)
      q, k, v = (t.view(b, l, self.heads, d // self.heads).transpose(1, 2)
                 for t in (q, k, v))
      h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.out(h.transpose(1, 2).reshape(b, l, d))
      h = self.mlp_in(self.ln_mlp(x))
      return x + self.mlp_out(F.gelu(h, approximate="tanh"))  # = flax nn.gelu

  class GPT(nn.Module):
    """Token ids [B, L] -> logits [B, L, V], tied embeddings."""

    def __init__(self, width, num_layers, num_heads):
      super().__init__()
      self.embed = nn.Embedding(VOCAB, width)
      self.positions = nn.Parameter(torch.zeros(SEQ, width))
      self.blocks = nn.ModuleList(Block(width, num_heads)
                                  for _ in range(num_layers))
      self.ln_final = nn.LayerNorm(width, eps=1e-6)
      for p in self.parameters():  # N(0, 0.02) matrices, as kdjax's GPT.
        if p.dim() > 1:
          nn.init.normal_(p, std=0.02)
      for m in self.modules():
        if isinstance(m, nn.Linear):
          nn.init.zeros_(m.bias)

    def forward(self, tokens):
      x = self.embed(tokens) + self.positions[:tokens.shape[1]]
      for block in self.blocks:
        x = block(x)
      return self.ln_final(x) @ self.embed.weight.T

  def loss_fn(teacher, student, tokens, labels):
    with torch.no_grad():
      teacher_logits = teacher(tokens)
    return kd_loss(student(tokens), teacher_logits, labels)

  def kd_loss(logits, teacher_logits, labels):
    # float32 losses under autocast too (as kdjax's).
    logits, teacher_logits = logits.float(), teacher_logits.float()
    log_q = F.log_softmax(logits / TEMPERATURE, dim=-1)
    log_p = F.log_softmax(teacher_logits / TEMPERATURE, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1),
                         reduction="none")
    return (ALPHA * TEMPERATURE**2 * kl.reshape(-1) + (1 - ALPHA) * ce).mean()

  return GPT, loss_fn, kd_loss


class TorchWorker:
  """The identical model, loss and optimizer in plain PyTorch."""

  def __init__(self, compiled: bool, bfloat16: bool = False):
    import contextlib  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.manual_seed(0)
    gpt, loss_fn, self.kd_loss = _torch_model_classes()
    self.teacher = gpt(**TEACHER).eval()
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    if bfloat16:  # Held in bfloat16, as kdjax's teacher.precision.params.
      self.teacher = self.teacher.to(torch.bfloat16)
    self.student = gpt(**STUDENT).train()
    self.opt = torch.optim.AdamW(self.student.parameters(), lr=LR,
                                 weight_decay=WEIGHT_DECAY)
    self.loss_fn = torch.compile(loss_fn) if compiled else loss_fn
    self.autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bfloat16
        else contextlib.nullcontext)
    tokens, labels = _batch()
    self.tokens = torch.from_numpy(tokens).long()
    self.labels = torch.from_numpy(labels).long()

  def _step(self):
    self.opt.zero_grad(set_to_none=True)
    with self.autocast():
      loss = self.loss_fn(self.teacher, self.student, self.tokens,
                          self.labels)
    loss.backward()
    self.opt.step()
    return loss

  def run(self, steps: int) -> dict:
    start, cpu, faults = time.perf_counter(), time.process_time(), _faults()
    for _ in range(steps):
      loss = self._step()
    loss = float(loss)
    return {"seconds_per_step": (time.perf_counter() - start) / steps,
            "cpu_seconds_per_step": (time.process_time() - cpu) / steps,
            "minor_faults_per_step": (_faults() - faults) / steps,
            "loss": loss}

  def parts(self) -> dict:
    """TorchWorker's counterpart of KdjaxWorker.parts (eager)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    torch = self.torch

    def teacher_forward():
      with torch.no_grad():
        return self.teacher(self.tokens)
    teacher_logits = teacher_forward()

    def student_step():
      self.student.zero_grad(set_to_none=True)
      self.kd_loss(self.student(self.tokens), teacher_logits,
                   self.labels).backward()
    return _time_parts({"teacher_forward": teacher_forward,
                        "student_step": student_step}, lambda out: out, np)

  def profile(self) -> dict:
    """Self CPU seconds per step by PyTorch op (top 12) over PROFILE_STEPS
    profiled steps, the counterpart of KdjaxWorker.profile."""
    from torch.profiler import ProfilerActivity, profile  # pylint: disable=g-import-not-at-top
    self.run(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
      wall = self.run(PROFILE_STEPS)["seconds_per_step"]
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    per_step = lambda us: us / 1e6 / PROFILE_STEPS
    return {"wall": wall,
            "ops_sum": per_step(sum(e.self_cpu_time_total for e in rows)),
            "groups": {e.key: per_step(e.self_cpu_time_total)
                       for e in rows[:12]}}

  def info(self) -> dict:
    return {"torch": self.torch.__version__,
            "torch_threads": self.torch.get_num_threads()}

  def matmul(self) -> dict:
    """FLOP/s of one MATMUL_N^2 torch.matmul in float32 and bfloat16.

    On a CPU without AVX-512 BF16 (e.g. AMD Zen 3) PyTorch's bfloat16 matmul
    falls back to a ~1 GFLOP/s path: a 4096^2 product would take minutes,
    so bfloat16 is measured at 1024^2 when a first 1024^2 product runs
    under SLOW_BF16 FLOP/s."""
    torch = self.torch
    if not hasattr(self, "_matmul"):
      a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
      self._matmul = {"float32": (a, b),
                      "bfloat16": (a.bfloat16(), b.bfloat16())}
      small = self._matmul["bfloat16"][0][:1024, :1024].contiguous()
      start = time.perf_counter()
      torch.matmul(small, small)
      if 2 * 1024**3 / (time.perf_counter() - start) < SLOW_BF16:
        self._matmul["bfloat16"] = (small, small)
      for pair in self._matmul.values():
        torch.matmul(*pair)
    out = {}
    for dtype, pair in self._matmul.items():
      start = time.perf_counter()
      torch.matmul(*pair)
      out[dtype] = 2 * pair[0].shape[0]**3 / (time.perf_counter() - start)
    return {"matmul_flops_per_s": out}


def _time_parts(parts: dict, wait, np, repeats: int = 5) -> dict:
  """Median seconds of each zero-argument callable (after one warm-up call)."""
  result = {}
  for name, fn in parts.items():
    wait(fn())
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      wait(fn())
      times.append(time.perf_counter() - start)
    result[name] = float(np.median(times))
  return result


def worker_main(kind: str) -> None:
  """Line protocol on stdin/stdout: 'run N' | 'info' | 'matmul' | 'parts' |
  'quit' -> JSON."""
  start = time.perf_counter()
  if kind.startswith("kdjax"):
    worker = KdjaxWorker(kind != "kdjax_unfused",
                         *PRECISIONS.get(kind, ("float32", "float32")))
  else:
    worker = TorchWorker(compiled=kind.startswith("torch_compile"),
                         bfloat16=kind.endswith("_bf16"))
  first = worker.run(1)  # Compile / warm up.
  out = sys.stdout
  sys.stdout = sys.stderr  # Keep library prints off the protocol channel.
  print(json.dumps({"ready": time.perf_counter() - start, **first}),
        file=out, flush=True)
  for line in sys.stdin:
    command = line.split()
    if not command or command[0] == "quit":
      break
    if command[0] == "run":
      result = worker.run(int(command[1]))
    else:
      result = getattr(worker, command[0])()
    print(json.dumps(result), file=out, flush=True)


# ----------------------------------------------------------------------------
# Equivalence check: the same parameters give the same loss in both.
# ----------------------------------------------------------------------------


def check_equivalence() -> None:
  """kdjax's objective on kdjax's GPT == the torch loss, same weights, batch 2."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from kdjax.distill import step  # pylint: disable=g-import-not-at-top
  teacher, student, objective, _, t_params, s_params = _kdjax_parts()
  tokens, labels = _batch(batch=2)
  t_out = step.make_apply_fn(teacher)(t_params, tokens, False, None)
  s_out = step.make_apply_fn(student)(s_params, tokens, True, None)
  per_token, _ = objective(s_out, [t_out], labels, jax.numpy.zeros((), int))
  jax_loss = float(per_token.mean())

  gpt, loss_fn, _ = _torch_model_classes()

  def to_torch(params, sizes):
    model = gpt(**sizes)
    p = jax.tree.map(np.asarray, params)
    d = sizes["width"]
    state = {"embed.weight": p["embed"]["embedding"],
             "positions": p["positions"],
             "ln_final.weight": p["ln_final"]["scale"],
             "ln_final.bias": p["ln_final"]["bias"]}
    for i in range(sizes["num_layers"]):
      b = p[f"block_{i}"]
      state.update({
          f"blocks.{i}.ln_attention.weight": b["ln_attention"]["scale"],
          f"blocks.{i}.ln_attention.bias": b["ln_attention"]["bias"],
          f"blocks.{i}.qkv.weight": b["qkv_kernel"].reshape(d, 3 * d).T,
          f"blocks.{i}.qkv.bias": b["qkv_bias"].reshape(3 * d),
          f"blocks.{i}.out.weight": b["out_kernel"].reshape(d, d).T,
          f"blocks.{i}.out.bias": b["out_bias"],
          f"blocks.{i}.ln_mlp.weight": b["ln_mlp"]["scale"],
          f"blocks.{i}.ln_mlp.bias": b["ln_mlp"]["bias"],
          f"blocks.{i}.mlp_in.weight": b["mlp_in"]["kernel"].T,
          f"blocks.{i}.mlp_in.bias": b["mlp_in"]["bias"],
          f"blocks.{i}.mlp_out.weight": b["mlp_out"]["kernel"].T,
          f"blocks.{i}.mlp_out.bias": b["mlp_out"]["bias"]})
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                           for k, v in state.items()})
    return model

  torch_loss = float(loss_fn(to_torch(t_params, TEACHER),
                             to_torch(s_params, STUDENT),
                             torch.from_numpy(tokens).long(),
                             torch.from_numpy(labels).long()).detach())
  print(f"loss at the same weights, batch 2: kdjax {jax_loss:.6f}, "
        f"torch {torch_loss:.6f}, |diff| {abs(jax_loss - torch_loss):.2e}")
  if not abs(jax_loss - torch_loss) < 1e-4 * abs(torch_loss):
    raise SystemExit("kdjax and torch compute different losses.")


# ----------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------


def _jemalloc() -> str | None:
  paths = glob.glob("/usr/lib/*/libjemalloc.so.2") + glob.glob(
      "/usr/lib/libjemalloc.so.2")
  return paths[0] if paths else None


def worker_env(allocator: str) -> tuple[dict[str, str], str]:
  """One environment for every worker: allocator and thread counts."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  threads = str(os.cpu_count())
  for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    env.setdefault(name, threads)
  preload = env.get("LD_PRELOAD", "")
  if allocator == "jemalloc":
    path = _jemalloc()
    if path is None:
      raise SystemExit("--allocator=jemalloc: libjemalloc.so.2 not found "
                       "(apt-get install libjemalloc2).")
    if "jemalloc" not in preload:
      env["LD_PRELOAD"] = f"{path}:{preload}" if preload else path
    env.setdefault("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")
  elif allocator == "glibc":
    env["LD_PRELOAD"] = ":".join(p for p in preload.split(":")
                                 if p and "jemalloc" not in p)
    env.pop("MALLOC_CONF", None)
  name = ("jemalloc (" + env.get("MALLOC_CONF", "") + ")"
          if "jemalloc" in env.get("LD_PRELOAD", "") else "glibc malloc")
  return env, name


def _machine() -> str:
  return f"{machine_info.describe()}, {platform.platform()}"


class Worker:
  """A worker subprocess speaking the line protocol."""

  def __init__(self, kind: str, env: dict[str, str]):
    self.kind = kind
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), f"--worker={kind}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.ready = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"worker {self.kind} died (exit {self.proc.wait()}).")
    return json.loads(line)

  def ask(self, command: str) -> dict:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    self.proc.stdin.write("quit\n")
    self.proc.stdin.close()
    self.proc.wait()


def _ask_kdjax_and_torch(env: dict[str, str], command: str) -> dict:
  """One command to a fresh kdjax fused worker, then to a torch eager one
  (one at a time: neither disturbs the other)."""
  results = {}
  for kind in ("kdjax_fused", "torch_eager"):
    worker = Worker(kind, env)
    results[kind] = worker.ask(command)
    worker.close()
  return results


def print_parts(env: dict[str, str], allocator: str) -> None:
  """Where the time goes, in both frameworks: the step's halves alone."""
  results = _ask_kdjax_and_torch(env, "parts")
  print(f"\nAllocator: {allocator}; medians of 5 calls after a warm-up; "
        f"load average at the end {os.getloadavg()[0]:.1f}")
  print("| part | kdjax (XLA) | PyTorch eager |\n|---|---|---|")
  for part, label in (("teacher_forward", "teacher forward to logits"),
                      ("student_step", "student forward + backward + KD loss, "
                       "given the teacher's logits")):
    print(f"| {label} | {results['kdjax_fused'][part]:.3f} s | "
          f"{results['torch_eager'][part]:.3f} s |")


def print_profile(env: dict[str, str], allocator: str) -> None:
  """Where each framework spends a step, op by op (issue 19, item 3)."""
  results = _ask_kdjax_and_torch(env, "profile")
  print(f"\nMachine: {_machine()}\nAllocator: {allocator}; load average at "
        f"the end {os.getloadavg()[0]:.1f}")
  xla = results["kdjax_fused"]
  print(f"\nkdjax fused step, {PROFILE_STEPS} traced steps: "
        f"{xla['wall']:.3f} s wall per step; "
        f"XLA ops {xla['ops_sum']:.3f} s summed, covering "
        f"{xla['ops_union']:.3f} s of wall time (the rest: ops running at "
        "the same time)")
  print("| XLA ops | seconds (summed) | wall-clock share (s) | of the step "
        "|\n|---|---|---|---|")
  for group, share in sorted(xla["wall_share"].items(), key=lambda g: -g[1]):
    print(f"| {group} | {xla['groups'][group]:.3f} | {share:.3f} | "
          f"{100 * share / xla['wall']:.0f}% |")
  torch_ = results["torch_eager"]
  print(f"\nPyTorch eager, {PROFILE_STEPS} profiled steps: "
        f"{torch_['wall']:.3f} s wall per step; "
        f"self CPU time of its ops {torch_['ops_sum']:.3f} s")
  print("| PyTorch op (top 12 by self CPU) | seconds | share |\n|---|---|---|")
  for op, seconds in torch_["groups"].items():
    print(f"| {op} | {seconds:.3f} | {100 * seconds / torch_['ops_sum']:.0f}% |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2,
                      help="timed steps per repetition (after warm-up)")
  # 3: kdjax's fused step still takes fresh memory pages for a few steps
  # after compiling (168k minor faults per step right after one warm-up
  # step, ~0 from the third; the repeat lines print them), and that time is
  # start-up, not the step's.
  parser.add_argument("--warmup", type=int, default=3,
                      help="untimed steps after compiling, per worker")
  parser.add_argument("--allocator", choices=("jemalloc", "glibc", "inherit"),
                      default="jemalloc")
  parser.add_argument("--only", default=",".join(WORKERS),
                      help=f"comma-separated subset of {WORKERS}")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--check", action="store_true",
                      help="only check that kdjax and torch losses agree")
  parser.add_argument("--profile", action="store_true",
                      help="only profile one step op by op, kdjax (XLA "
                      "trace) vs torch eager (torch.profiler)")
  parser.add_argument("--parts", action="store_true",
                      help="only time the teacher forward and the student "
                      "half alone, kdjax vs torch eager")
  args = parser.parse_args()
  if args.worker:
    return worker_main(args.worker)
  if args.check:
    return check_equivalence()

  kinds = [k for k in args.only.split(",") if k]
  unknown = set(kinds) - set(WORKERS)
  if unknown:
    raise SystemExit(f"--only: unknown {sorted(unknown)}; allowed: {WORKERS}.")
  env, allocator = worker_env(args.allocator)
  if args.parts:
    return print_parts(env, allocator)
  if args.profile:
    return print_profile(env, allocator)
  workers = {}
  for kind in kinds:  # Started one at a time: compiles do not overlap.
    workers[kind] = Worker(kind, env)
    print(f"{kind}: ready in {workers[kind].ready['ready']:.0f} s, first loss "
          f"{workers[kind].ready['loss']:.4f}", flush=True)
    if args.warmup:
      workers[kind].ask(f"run {args.warmup}")
  times = {kind: [] for kind in kinds}
  cpu_times = {kind: [] for kind in kinds}
  matmul = {(name, dtype): [] for name in ("jnp.dot", "torch.matmul")
            for dtype in ("float32", "bfloat16")}
  for r in range(args.repeats):  # Interleaved: load changes hit all alike.
    # The order rotates each repetition: with a fixed order a contender's
    # median moved with its slot by up to 4% (kdjax unfused 2.544 vs 2.649
    # s/step in two runs on a quiet machine), so no contender keeps one.
    order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
    for kind in order:
      result = workers[kind].ask(f"run {args.steps}")
      times[kind].append(result["seconds_per_step"])
      cpu_times[kind].append(result["cpu_seconds_per_step"])
      print(f"repeat {r}: {kind} {result['seconds_per_step']:.3f} s/step "
            f"({result['cpu_seconds_per_step']:.2f} CPU s), loss "
            f"{result['loss']:.4f}; "
            f"{result['minor_faults_per_step']:.0f} minor page faults/step",
            flush=True)
  # Compiling the cost analysis and the matmuls reshapes a worker's memory:
  # run between repetitions, they made kdjax's next repetition fault in
  # ~340k fresh pages per step. So they come after all timed steps.
  info = {}
  for kind in ("kdjax_fused", "torch_eager"):
    if kind in workers:
      info.update(workers[kind].ask("info"))
  for _ in range(args.repeats):
    for name, kind in (("jnp.dot", "kdjax_fused"),
                       ("torch.matmul", "torch_eager")):
      if kind in workers:
        rates = workers[kind].ask("matmul")["matmul_flops_per_s"]
        for dtype, rate in rates.items():
          matmul[(name, dtype)].append(rate)
  quality = {kind: workers[kind].ask("quality") for kind in PRECISIONS
             if kind in workers}
  for worker in workers.values():
    worker.close()

  median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
  cpu = {k: sorted(v)[len(v) // 2] for k, v in cpu_times.items()}
  peak = {k: sorted(v)[len(v) // 2] for k, v in matmul.items() if v}
  tokens = BATCH * SEQ
  print(f"\nMachine: {_machine()}")
  print(f"Allocator: {allocator}; threads: OMP/MKL {env['OMP_NUM_THREADS']}, "
        f"XLA all cores; each framework in its own worker subprocess with "
        f"the same environment, repetitions interleaved")
  print(f"Workload: vocab {VOCAB}, seq {SEQ}, batch {BATCH} ({tokens} tokens/"
        f"step), AdamW on float32 parameters; median of {args.repeats} x "
        f"{args.steps} "
        f"steps after {args.warmup} warm-up step(s)")
  if "xla_flags" in info:
    print(f"jax {info['jax']}, XLA_FLAGS={info['xla_flags']!r}; "
          f"torch {info.get('torch', '-')}")
  print(f"Load average at the end: {os.getloadavg()[0]:.1f} (other jobs "
        f"share the {os.cpu_count()} cores; CPU s/step = process CPU time, "
        f"which spin-waiting threads inflate)")
  def speedup(reference: str, kind: str) -> str:
    """Median over repetitions of reference time / kind time, with the range:
    each repetition's contenders ran back to back, so its ratio shares the
    load of that moment."""
    if reference not in times:
      return "-"
    ratios = sorted(a / b for a, b in zip(times[reference], times[kind]))
    return (f"{ratios[len(ratios) // 2]:.2f}x "
            f"({ratios[0]:.2f}-{ratios[-1]:.2f})")

  def same_precision(torch_kind: str, kind: str) -> str:
    """The torch row a kind is compared with: float32 with float32,
    bfloat16 (teacher + autocast) with kdjax's bfloat16 rows."""
    low = kind in PRECISIONS or kind.endswith("_bf16")
    return torch_kind + "_bf16" if low else torch_kind

  print("\n| path | s/step | tokens/s | vs torch eager | vs torch.compile "
        "| vs kdjax float32 | CPU s/step |")
  print("|---|---|---|---|---|---|---|")
  for kind in kinds:
    s = median[kind]
    print(f"| {LABELS[kind]} | {s:.3f} | {tokens / s:,.0f} | "
          f"{speedup(same_precision('torch_eager', kind), kind)} | "
          f"{speedup(same_precision('torch_compile', kind), kind)} | "
          f"{speedup('kdjax_fused', kind)} | {cpu[kind]:.2f} |")
  print("(s/step, tokens/s, CPU: medians; speed-ups: median and range of the "
        "per-repetition ratios; bfloat16 rows against PyTorch's bfloat16 "
        "rows, float32 rows against float32)")
  if {"kdjax_fused", "kdjax_unfused"} <= set(median):
    print(f"\nfused / unfused speed: {speedup('kdjax_unfused', 'kdjax_fused')}")
  if "flops" in info:
    print(f"\nkdjax fused step: {info['flops'] / 1e9:.1f} GFLOP by XLA's cost "
          "analysis (the same model FLOPs in every precision)")
    print(f"{MATMUL_N}^2 matmul rates (median of {args.repeats}, measured "
          "after the timed steps): " + ", ".join(
              f"{name} {dtype} {rate / 1e9:.1f} GFLOP/s"
              for (name, dtype), rate in peak.items()))
    print("| path | GFLOP/s | % of jnp.dot float32 | % of jnp.dot bfloat16 |")
    print("|---|---|---|---|")
    for kind in kinds:
      if not kind.startswith("kdjax") or kind == "kdjax_unfused":
        continue
      rate = info["flops"] / median[kind]
      shares = [f"{100 * rate / peak[('jnp.dot', d)]:.0f}%"
                if ("jnp.dot", d) in peak else "-"
                for d in ("float32", "bfloat16")]
      print(f"| {LABELS[kind]} | {rate / 1e9:.1f} | {' | '.join(shares)} |")
  for kind, q in quality.items():
    print(f"\n{LABELS[kind]}: teacher logits vs the float32 teacher's (same "
          f"weights, batch): max |error| {q['teacher_logits_max_error']:.4f}, "
          f"mean {q['teacher_logits_mean_error']:.4f} (logit std "
          f"{q['teacher_logits_std']:.3f}), argmax agreement "
          f"{100 * q['teacher_argmax_agreement']:.2f}%")


if __name__ == "__main__":
  main()
