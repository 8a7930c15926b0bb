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

import dataclasses
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from kdjax import models
from kdjax.distill import losses, masks, parallel, token_loss
from kdjax.distill.objectives import ModelOutputs

# apply(params, inputs, train, dropout_rng, capture_features) -> ModelOutputs
ApplyFn = Callable[[Any, jax.Array, bool, jax.Array | None, bool], ModelOutputs]


@flax.struct.dataclass
class TrainState:
  """Everything of the student a checkpoint needs besides the data position.

  `aux_params` train with the student but are not the student (e.g. feature
  projections); they live in the train state, not in the exported params.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  aux_params: Any = flax.struct.field(default_factory=dict)


def create_train_state(params: Any, tx: optax.GradientTransformation,
                       rng: jax.Array, aux_params: Any = None) -> TrainState:
  aux_params = {} if aux_params is None else aux_params
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init((params, aux_params)), rng=rng,
                    aux_params=aux_params)


def make_apply_fn(model) -> ApplyFn:
  """Adapts a Linen model to the step's calling convention.

  With capture_features, what the model sows into 'intermediates' comes back
  too (Flax's sow; no hooks).
  """
  def apply(params, inputs, train, dropout_rng, capture_features=False):
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    if not capture_features:
      return ModelOutputs(model.apply({"params": params}, inputs, train=train,
                                      rngs=rngs))
    logits, state = model.apply({"params": params}, inputs, train=train,
                                rngs=rngs, mutable=["intermediates"])
    return ModelOutputs(logits, flax.core.unfreeze(state["intermediates"]))
  return apply


def make_lm_apply_fn(model, vocab_size: int | None = None) -> ApplyFn:
  """Like make_apply_fn for a language model, but returns its final hidden
  states and LM head instead of logits (see kdjax.distill.token_loss).

  `vocab_size`: keep the head's first vocab_size columns, for a teacher whose
  vocabulary is the student's plus padding rows (e.g. rounded up to a
  multiple of 128; the caller checks the tokenizers agree): the padded ids
  are masked out, and both distributions live on the same ids.
  """
  full_kernel = models.lm_head_kernel_fn(model)
  head_kernel = (full_kernel if vocab_size is None else
                 lambda params: full_kernel(params)[:, :vocab_size])

  def apply(params, inputs, train, dropout_rng, capture_features=False):
    if capture_features:
      raise ValueError("Feature terms are not supported for language models "
                       "(config.distill.features must be empty).")
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    hidden = model.apply({"params": params}, inputs, train, rngs=rngs,
                         method=model.hidden_states)
    return ModelOutputs(None, hidden=hidden, head=head_kernel(params))
  return apply


@dataclasses.dataclass(frozen=True)
class LiveTeachers:
  """The step's default teacher strategy: run each frozen teacher's forward.

  A strategy is called (teachers_params, batch, capture_features=, vocab=)
  and returns one ModelOutputs per teacher; kdjax.distill.teacher_cache's
  CachedTeachers is the other one (outputs read from the batch).
  """
  applies: tuple[ApplyFn, ...] = ()

  def __call__(self, teachers_params, batch, *, capture_features: bool,
               vocab: int | None) -> list[ModelOutputs]:
    del vocab  # Teachers produce their own logits (or hidden + head).
    return [jax.tree.map(lax.stop_gradient,
                         apply(p, batch["inputs"], False, None,
                               capture_features))
            for apply, p in zip(self.applies, teachers_params)]


def _split_micro_batches(batch: dict[str, jax.Array], k: int):
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"Per-device batch {x.shape[0]} is not divisible by "
                       f"grad_accum_steps={k}.")
    return x.reshape((k, x.shape[0] // k) + x.shape[1:])
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict[str, jax.Array],
               teachers_params: Sequence[Any], *, student_apply: ApplyFn,
               teacher_applies: Sequence[ApplyFn] = (), objective,
               tx: optax.GradientTransformation, axis: parallel.DataAxis,
               grad_accum_steps: int = 1,
               trainable_mask: Any = None,
               token_chunk_size: int | None = None,
               teacher_outputs: Callable[..., list[ModelOutputs]] | None = None
               ) -> tuple[TrainState, dict]:
  """One optimizer step on this device's piece of the global batch.

  `batch` holds 'inputs', 'labels' ([B] for classification, [B, L] for tokens)
  and optionally 'mask' (shape of labels; 1 = counts) and what
  `teacher_outputs` reads (cached teacher entries).
  Teachers are frozen: their outputs are under stop_gradient and they get
  no optimizer state. `teacher_outputs` is the teacher strategy: by default
  LiveTeachers(teacher_applies) runs their forwards;
  kdjax.distill.teacher_cache.CachedTeachers reads them from the batch.
  Returns the new state and metric SUMS over the global batch (divide by
  metrics['count'] for means).

  `trainable_mask` (Python bools like `state.params`, bound statically; None =
  all train): frozen params get no gradient (stop_gradient, so XLA skips
  their weight gradients) and come back bit-identical (masks.apply_updates);
  the optimizer must be `masks.freeze`d with the same mask.

  `token_chunk_size` (language models, with make_lm_apply_fn): not None =
  the applies return hidden states + LM heads and kdjax.distill.token_loss applies
  the heads, all at once (0) or chunk by chunk over the sequence (> 0), never
  holding [B, L, V] logits.
  """
  mask = batch.get("mask")
  if mask is None:
    mask = jnp.ones(batch["labels"].shape, jnp.float32)
  batch = dict(batch, mask=mask.astype(jnp.float32))
  global_count = axis.sum(jnp.sum(batch["mask"]))
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                           axis.index())
  capture = objective.needs_features
  if teacher_outputs is None:
    teacher_outputs = LiveTeachers(tuple(teacher_applies))

  def loss_and_metrics(trainable, micro, micro_rng):
    params, aux_params = trainable
    if trainable_mask is not None:
      params = jax.tree.map(
          lambda p, m: masks.select(m, p, lax.stop_gradient(p)),
          params, trainable_mask)
    student = student_apply(params, micro["inputs"], True, micro_rng, capture)
    teachers = teacher_outputs(
        teachers_params, micro, capture_features=capture,
        vocab=None if token_chunk_size is not None else student.logits.shape[-1])
    if token_chunk_size is not None:
      return token_loss.token_objective(
          objective, student.hidden, student.head,
          [t.hidden for t in teachers], [t.head for t in teachers],
          micro["labels"], micro["mask"], state.step,
          chunk_size=token_chunk_size, global_count=global_count)
    per_example, terms = objective(student, teachers, micro["labels"],
                                   state.step, aux_params)
    w = micro["mask"]
    loss = jnp.sum(per_example * w) / global_count
    predictions = losses.argmax(student.logits)  # Shares the loss's max pass.
    metrics = {"loss": jnp.sum(per_example * w),
               "correct": jnp.sum((predictions == micro["labels"]) * w),
               "count": jnp.sum(w)}
    metrics.update({name: jnp.sum(v * w) for name, v in terms.items()})
    if teachers:
      metrics["agreement"] = jnp.sum(
          (predictions == losses.argmax(teachers[0].logits)) * w)
    return loss, metrics

  grad_fn = jax.grad(loss_and_metrics, has_aux=True)
  trainable = (state.params, state.aux_params)
  if grad_accum_steps == 1:
    grads, metrics = grad_fn(trainable, batch, rng)
  else:
    micro_batches = _split_micro_batches(batch, grad_accum_steps)
    micro_rngs = jax.random.split(rng, grad_accum_steps)

    def accumulate(carry, xs):
      micro, micro_rng = xs
      grads, metrics = grad_fn(trainable, micro, micro_rng)
      return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    # The first micro-step seeds the carry, so its types (device-invariant
    # gradients, per-device metrics under shard_map) match the loop body's.
    first = jax.tree.map(lambda x: x[0], (micro_batches, micro_rngs))
    rest = jax.tree.map(lambda x: x[1:], (micro_batches, micro_rngs))
    (grads, metrics), _ = lax.scan(accumulate, grad_fn(trainable, *first),
                                   rest)

  grads = axis.sum_gradients(grads)
  metrics = axis.sum(metrics)
  metrics["grad_norm"] = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  if trainable_mask is None:
    params, aux_params = optax.apply_updates(trainable, updates)
  else:
    params, aux_params = masks.apply_updates(
        trainable, updates,
        (trainable_mask, jax.tree.map(lambda _: True, state.aux_params)))
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=opt_state, aux_params=aux_params)
  return new_state, metrics


def predict(apply_fn: ApplyFn, params: Any, inputs: jax.Array) -> jax.Array:
  """Deterministic logits for evaluation."""
  return apply_fn(params, inputs, False, None).logits
