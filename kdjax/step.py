"""The fused distillation step, written per device.

One compiled program per step: teacher forward (frozen, no gradients) ->
student forward -> objective -> student gradients -> cross-device sum ->
optax update. `parallel.map_over_devices` maps it over all devices and donates
the train state. The teacher's logits never leave the device.

Normalisation: every per-example loss is divided by the GLOBAL number of valid
examples (all devices, all micro-batches), so summing gradients over devices
and micro-batches gives exactly the gradient of the full-batch mean.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from kdjax import parallel

# apply(params, inputs, train, dropout_rng) -> logits
ApplyFn = Callable[[Any, jax.Array, bool, jax.Array | None], jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything of the student a checkpoint needs besides the data position."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def create_train_state(params: Any, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=rng)


def make_apply_fn(model) -> ApplyFn:
  """Adapts a Linen classifier to the step's calling convention."""
  def apply(params, inputs, train, dropout_rng):
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    return model.apply({"params": params}, inputs, train=train, rngs=rngs)
  return apply


def _split_micro_batches(batch: dict[str, jax.Array], k: int):
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"Per-device batch {x.shape[0]} is not divisible by "
                       f"grad_accum_steps={k}.")
    return x.reshape((k, x.shape[0] // k) + x.shape[1:])
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict[str, jax.Array],
               teacher_params: Any, *, student_apply: ApplyFn,
               teacher_apply: ApplyFn | None, objective,
               tx: optax.GradientTransformation, axis: parallel.DataAxis,
               grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
  """One optimizer step on this device's piece of the global batch.

  `batch` holds 'inputs', 'labels' and optionally 'mask' (1 = real example).
  Returns the new state and metric SUMS over the global batch (divide by
  metrics['count'] for means).
  """
  mask = batch.get("mask")
  if mask is None:
    mask = jnp.ones(batch["labels"].shape, jnp.float32)
  batch = dict(batch, mask=mask.astype(jnp.float32))
  global_count = axis.sum(jnp.sum(batch["mask"]))
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                           axis.index())

  def loss_and_metrics(params, micro, micro_rng):
    teacher_logits = None
    if teacher_apply is not None:
      teacher_logits = lax.stop_gradient(
          teacher_apply(teacher_params, micro["inputs"], False, None))
    logits = student_apply(params, micro["inputs"], True, micro_rng)
    per_example, terms = objective(logits, teacher_logits, micro["labels"])
    w = micro["mask"]
    loss = jnp.sum(per_example * w) / global_count
    metrics = {"loss": jnp.sum(per_example * w),
               "correct": jnp.sum((jnp.argmax(logits, -1) == micro["labels"]) * w),
               "count": jnp.sum(w)}
    metrics.update({name: jnp.sum(v * w) for name, v in terms.items()})
    if teacher_logits is not None:
      metrics["agreement"] = jnp.sum(
          (jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)) * w)
    return loss, metrics

  grad_fn = jax.grad(loss_and_metrics, has_aux=True)
  if grad_accum_steps == 1:
    grads, metrics = grad_fn(state.params, batch, rng)
  else:
    micro_batches = _split_micro_batches(batch, grad_accum_steps)
    micro_rngs = jax.random.split(rng, grad_accum_steps)

    def accumulate(carry, xs):
      micro, micro_rng = xs
      grads, metrics = grad_fn(state.params, micro, micro_rng)
      return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    # The first micro-step seeds the carry, so its types (device-invariant
    # gradients, per-device metrics under shard_map) match the loop body's.
    first = jax.tree.map(lambda x: x[0], (micro_batches, micro_rngs))
    rest = jax.tree.map(lambda x: x[1:], (micro_batches, micro_rngs))
    (grads, metrics), _ = lax.scan(accumulate, grad_fn(state.params, *first),
                                   rest)

  grads = axis.sum_gradients(grads)
  metrics = axis.sum(metrics)
  metrics["grad_norm"] = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=opt_state)
  return new_state, metrics


def predict(apply_fn: ApplyFn, params: Any, inputs: jax.Array) -> jax.Array:
  """Deterministic logits for evaluation."""
  return apply_fn(params, inputs, False, None)
