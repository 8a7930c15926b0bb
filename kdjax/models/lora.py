"""LoRA: low-rank adapters on the projections of a frozen pretrained model.

`wrap(model, settings)` returns the same model (same class, as a subclass,
same fields) whose every `init`/`apply` runs under a Flax method interceptor
(`nn.intercept_methods`): each projection module whose path matches one of
`settings.targets` adds

    y = W x (+ bias)  +  scale * B(A(dropout(x))),   scale = alpha / rank

(PEFT's convention; Hu et al. 2021). A [in..., r] starts from PyTorch
Linear's (and PEFT's) kaiming-uniform init and B [r, out...] at zero, so
the adapted model starts exactly at the base model. The adapters are
ordinary parameters created in the projection's own scope, beside its
kernel:

    layers_3/attention/query/{kernel, lora_a, lora_b}

so every path that exists keeps its meaning (importers, checkpoints,
trainable-mask patterns), nn.scan stacks them with the layer axis
(`layers/attention/query/lora_a` [num_layers, D, r]) and they carry the
logical axis names of the kernel's input (A) and output (B) axes, so a
sharded mesh shards them like the kernel they adapt. Training, evaluation,
generation and export all apply the model, so all of them see the adapters.

Projections: flax `nn.Dense` (BERT, Llama's MLP, GPT's MLP) and Llama's
`llama.Projection` (attention: q/k/v [D, H, Dh], out [H, Dh, D]). A target
is matched against a projection's path with the unrolled layer names
('layers_0/attention/query'; with scan_layers the stacked
'layers/attention/query', where a target reaches every layer): it matches
when it is the path, a '/'-suffix of it ('query', 'attention/out'), or a
shell pattern matching either ('layers_1*/mlp/*'). A target that matches
no projection fails at init, naming the projections there are.

Dropout (`settings.dropout`) drops the adapter's input only (as PEFT's
lora_dropout), when the model is applied with train=True (a 'dropout' rng
is then needed, as for the model's own dropout).

`merge` folds the adapters into the kernels (W + scale * A B, in the
kernel's own layout, stacked or not) and drops them: the plain model's
params, whose forward is the adapted one's.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import inspect
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kdjax.models import llama, partitioning

A, B = "lora_a", "lora_b"
ADAPTERS = (A, B)

# targets=() means these: every projection of every layer (attention
# q/k/v/o and the MLP's), not the heads, pooler or embeddings.
DEFAULT_TARGETS = {
    "llama": ("query", "key", "value", "out", "gate", "up", "down"),
    # 'output' is both the attention's output and the feed-forward's.
    "bert": ("query", "key", "value", "output", "intermediate"),
    # GPT's attention weights are raw parameters of its block (a fused QKV
    # einsum), not projection modules: only its MLP can be adapted.
    "gpt": ("mlp_in", "mlp_out"),
}


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  """rank r, alpha (scale = alpha / r), dropout of the adapter's input,
  targets (patterns, see the module docstring)."""
  rank: int
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ()

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready (targets a list): how checkpoint meta records it."""
    return {"rank": int(self.rank), "alpha": float(self.alpha),
            "dropout": float(self.dropout), "targets": list(self.targets)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LoraSettings":
    return cls(rank=int(d["rank"]), alpha=float(d["alpha"]),
               dropout=float(d.get("dropout", 0.0)),
               targets=tuple(d["targets"]))


def check(settings: LoraSettings) -> None:
  """Raises ValueError naming what is wrong with the settings."""
  problems = []
  if not isinstance(settings.rank, int) or settings.rank < 1:
    problems.append(f"rank={settings.rank!r} (an int >= 1)")
  if not settings.alpha > 0:
    problems.append(f"alpha={settings.alpha!r} (> 0)")
  if not 0.0 <= settings.dropout < 1.0:
    problems.append(f"dropout={settings.dropout!r} (in [0, 1))")
  if isinstance(settings.targets, str) or not settings.targets or not all(
      isinstance(t, str) and t.strip("/") for t in settings.targets):
    problems.append(f"targets={settings.targets!r} (a tuple of module name "
                    "patterns)")
  if problems:
    raise ValueError("LoRA: " + "; ".join(problems) + ".")


def matches(path: str, target: str) -> bool:
  """Does a '/'-path ('layers_0/attention/query') match a target?"""
  target = target.strip("/")
  return (path == target or path.endswith("/" + target)
          or fnmatch.fnmatchcase(path, target)
          or fnmatch.fnmatchcase(path, "*/" + target))


# --- The projections and their layouts. ------------------------------------


def _input_axes(module: nn.Module) -> int | None:
  """How many trailing input axes a projection contracts (its kernel is
  [in..., out...]), or None for a module LoRA does not adapt."""
  if isinstance(module, nn.Dense):
    return 1
  if isinstance(module, llama.Projection):
    inputs, result = module.equation.replace(" ", "").split("->")
    x, kernel = inputs.split(",")
    contracted = "".join(c for c in kernel if c in x)
    if not (kernel.startswith(contracted) and x.endswith(contracted)
            and result == x[:len(x) - len(contracted)]
            + kernel[len(contracted):]):
      raise NotImplementedError(
          f"LoRA on a Projection with equation {module.equation!r}: only "
          "'<batch><in>,<in><out>-><batch><out>' layouts are adapted.")
    return len(contracted)
  return None


def _dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def low_rank(x: jax.Array, a: jax.Array, b: jax.Array,
             num_inputs: int) -> jax.Array:
  """(x A) B: x [..., in...] -> [..., out...], never forming A B."""
  h = jnp.tensordot(x, a, axes=num_inputs)
  return jnp.tensordot(h, b, axes=1)


class _Interceptor:
  """Adds the adapters to the targeted projections of one init/apply call.

  Remembers which projections it saw and which targets matched (`check`
  after an init), and the `train` argument of the model's own call (for
  dropout).
  """

  def __init__(self, settings: LoraSettings):
    self.settings = settings
    self.projections: list[str] = []
    self.matched: set[str] = set()
    self._train: list[bool] = []

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    scope = module.scope
    if scope is not None and not scope.path:  # The model's own method.
      return self._root(next_fun, args, kwargs, context)
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    num_inputs = _input_axes(module)
    if num_inputs is None:
      return next_fun(*args, **kwargs)
    path = "/".join(scope.path)
    self.projections.append(path)
    hits = [t for t in self.settings.targets if matches(path, t)]
    y = next_fun(*args, **kwargs)
    if not hits:
      return y
    self.matched.update(hits)
    x = args[0] if args else next(iter(kwargs.values()))
    return y + self._delta(module, x, num_inputs, y.dtype)

  def _root(self, next_fun, args, kwargs, context):
    try:
      bound = inspect.signature(context.orig_method).bind(*args, **kwargs)
    except TypeError:
      return next_fun(*args, **kwargs)  # The method itself will complain.
    parameter = bound.signature.parameters.get("train")
    if parameter is None:
      return next_fun(*args, **kwargs)
    self._train.append(bool(bound.arguments.get("train", parameter.default)))
    try:
      return next_fun(*args, **kwargs)
    finally:
      self._train.pop()

  def _delta(self, module, x, num_inputs: int, dtype) -> jax.Array:
    s = self.settings
    kernel = module.get_variable("params", "kernel")
    names = (kernel.names if isinstance(kernel, nn.LogicallyPartitioned)
             else None)
    shape = np.shape(partitioning.unbox(kernel))
    in_shape, out_shape = shape[:num_inputs], shape[num_inputs:]
    # PyTorch Linear's / PEFT's kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(in)).
    a_init = nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(num_inputs)),
        out_axis=-1)
    b_init = nn.initializers.zeros_init()
    if names is not None:
      a_init = partitioning.param(a_init, tuple(names[:num_inputs]) + (None,))
      b_init = partitioning.param(b_init, (None,) + tuple(names[num_inputs:]))
    a = module.param(A, a_init, in_shape + (s.rank,), jnp.float32)
    b = module.param(B, b_init, (s.rank,) + out_shape, jnp.float32)
    h = x.astype(dtype)
    if s.dropout > 0 and self._train and self._train[-1]:
      h = _dropout(h, s.dropout, module.make_rng("dropout"))
    h = low_rank(h, a.astype(dtype), b.astype(dtype), num_inputs)
    return (h * jnp.asarray(s.scale, dtype)).astype(dtype)

  def check(self) -> None:
    unmatched = [t for t in self.settings.targets if t not in self.matched]
    if unmatched:
      there = sorted(set(self.projections))
      raise ValueError(
          f"LoRA targets {unmatched} match no projection of the model; its "
          f"projections are {there[:12]}{' ...' if len(there) > 12 else ''} "
          "(a target is a path, a '/'-suffix of one such as 'query', or a "
          "shell pattern).")


class _Adapted:
  """Mixin of the adapted model classes: init and apply under the
  interceptor. `lora` is the dataclass field `wrap` adds."""

  def init_with_output(self, rngs, *args, **kwargs):
    interceptor = _Interceptor(self.lora)
    with nn.intercept_methods(interceptor):
      out = super().init_with_output(rngs, *args, **kwargs)
    interceptor.check()
    return out

  def apply(self, variables, *args, **kwargs):
    with nn.intercept_methods(_Interceptor(self.lora)):
      return super().apply(variables, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def _adapted_class(cls: type) -> type:
  namespace = {"__module__": __name__, "__qualname__": f"LoRA{cls.__name__}",
               "__annotations__": {"lora": LoraSettings},
               "lora": None}
  return type(f"LoRA{cls.__name__}", (_Adapted, cls), namespace)


def wrap(model: nn.Module, settings: LoraSettings) -> nn.Module:
  """`model` with LoRA adapters on the projections `settings` targets (an
  instance of a subclass of its class, with the same fields)."""
  check(settings)
  if is_adapted(model):
    raise ValueError("The model already has LoRA adapters.")
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")}
  return _adapted_class(type(model))(**fields, lora=settings)


def is_adapted(model: Any) -> bool:
  return isinstance(model, _Adapted)


def default_targets(model_name: str) -> tuple[str, ...]:
  """The targets `targets=()` stands for, for a registered model name."""
  if model_name not in DEFAULT_TARGETS:
    raise ValueError(f"No default LoRA targets for a {model_name!r} model "
                     f"(defaults exist for {sorted(DEFAULT_TARGETS)}); name "
                     "the projections to adapt.")
  return DEFAULT_TARGETS[model_name]


# --- Parameter trees. ------------------------------------------------------


def _is_adapter(path: tuple[str, ...]) -> bool:
  return path[-1] in ADAPTERS


def split(params: Any) -> tuple[dict, dict]:
  """(adapters, base): each holds only its own leaves ({} if none)."""
  flat = traverse_util.flatten_dict(params)
  adapters = {k: v for k, v in flat.items() if _is_adapter(k)}
  base = {k: v for k, v in flat.items() if not _is_adapter(k)}
  return (traverse_util.unflatten_dict(adapters),
          traverse_util.unflatten_dict(base))


def combine(base: Any, adapters: Any) -> dict:
  """The inverse of `split`."""
  flat = traverse_util.flatten_dict(base)
  flat.update(traverse_util.flatten_dict(adapters))
  return traverse_util.unflatten_dict(flat)


def adapted_kernels(params: Any) -> list[tuple[str, ...]]:
  """Paths of the modules holding adapters ('layers_0', 'attention',
  'query'), in order."""
  flat = traverse_util.flatten_dict(params)
  return sorted({k[:-1] for k in flat if k[-1] == A})


def kernel_delta(kernel: Any, a: Any, b: Any, scale: float, xp=jnp) -> Any:
  """scale * A B in the kernel's layout [in..., out...], for a kernel alone
  or stacked [num_layers, ...] with its adapters (`xp`: jnp or numpy, whose
  float64 a reference can use)."""
  stacked = np.ndim(kernel) == np.ndim(a) + np.ndim(b) - 3
  if not stacked and np.ndim(kernel) != np.ndim(a) + np.ndim(b) - 2:
    raise ValueError(f"Adapters {np.shape(a)} x {np.shape(b)} do not fit a "
                     f"kernel {np.shape(kernel)}.")
  if stacked:
    return xp.stack([kernel_delta(kernel[i], a[i], b[i], scale, xp)
                     for i in range(np.shape(kernel)[0])])
  rank = np.shape(a)[-1]
  a2 = xp.reshape(a, (-1, rank))
  b2 = xp.reshape(b, (rank, -1))
  if xp is jnp:
    product = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
  else:
    product = a2 @ b2
  return xp.reshape(product * scale, np.shape(kernel))


def merge(params: Any, settings: LoraSettings) -> dict:
  """The plain model's params: each adapted kernel W -> W + scale * A B
  (float32, in W's dtype), adapters dropped. Where A B is zero (B = 0) the
  kernels come back bit-identical."""
  params = partitioning.unbox(params)
  adapters, base = split(params)
  flat = traverse_util.flatten_dict(base)
  for module in adapted_kernels(adapters):
    node = adapters
    for part in module:
      node = node[part]
    kernel = jnp.asarray(flat[module + ("kernel",)])
    delta = kernel_delta(kernel, node[A], node[B], settings.scale)
    merged = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    # A zero delta keeps the kernel's bits (-0.0 + 0.0 would be +0.0).
    flat[module + ("kernel",)] = jnp.where(delta == 0, kernel, merged)
  return traverse_util.unflatten_dict(flat)
