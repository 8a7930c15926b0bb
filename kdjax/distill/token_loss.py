"""Token-level distillation loss without the full [batch, length, vocab] logits.

A language model's logits are its largest tensor: at vocabulary 49,152,
sequence 512 and batch 8 one float32 copy is 805 MB, and the loss with its
gradient keeps several (student and teacher logits, their log-softmaxes, the
gradient). So the LM heads are applied here, not in the models: the models hand
over their final hidden states and head matrices, and `chunked_objective` scans
over chunks of the sequence, computing both models' logits and the objective
one chunk at a time, so peak memory is O(batch * chunk_size * vocab) instead
of O(batch * length * vocab). When differentiated, each chunk's gradient is
taken inside the same iteration (a custom VJP, see `_chunked_loss`), so the
backward pass neither keeps nor recomputes any logits: the same matmuls as the
direct path, none repeated.

Both functions return what `step.train_step` computes from full logits: the
loss sum(objective per token * mask) / global_count, and metric SUMS with the
step's keys ('loss', 'correct', 'count', one per term, 'agreement' with
teachers). `direct_objective` is the same computation on the full logits, kept
as the reference for tests and the memory benchmark; both share everything but
the chunking.

A teacher may also come as precomputed per-token entries instead of hidden
states + head (kdjax.distill.teacher_cache: hidden = objectives.TeacherTopK, head = None):
they are chunked with the sequence and handed to the objective as the
teacher's ModelOutputs.hidden, with no head applied.

One deliberate difference from multiplying by the mask: masked tokens are
selected out (`jnp.where`), so a masked position whose per-token value is not
finite (e.g. a padding label of -100, as Hugging Face datasets write it)
contributes 0, not NaN, to the loss and its gradient.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from kdjax.distill import losses, objectives
from kdjax.distill.objectives import ModelOutputs
from kdjax.models import partitioning, precision

Array = jax.Array


def logits_from_hidden(hidden: Array, head: Array) -> Array:
  """hidden [..., D] @ head [D, V] -> float32 logits [..., V].

  The head is multiplied in hidden's dtype (the compute dtype: a float32
  student head is cast, a bfloat16 teacher head is used as it is, no
  float32 copy) and accumulated in float32 (kdjax.models.precision).
  """
  logits = precision.einsum_f32("...d,dv->...v", hidden,
                                head.astype(hidden.dtype))
  # Sharded layout: the vocabulary stays split over 'model' (the log-sum-exp
  # reduces across its shards); the identity without rules in scope.
  names = ("batch",) + (None,) * (logits.ndim - 2) + ("act_vocab",)
  return partitioning.constrain(logits, names[-logits.ndim:])


def direct_objective(objective, student_hidden: Array, student_head: Array,
                     teacher_hiddens: Sequence[Array],
                     teacher_heads: Sequence[Array], labels: Array,
                     mask: Array, step: Array, *, global_count: Array,
                     advantages: Array | None = None
                     ) -> tuple[Array, dict[str, Array]]:
  """The reference: full [B, L, V] logits, then the objective (module doc)."""
  teacher_hiddens, teacher_heads = _check_inputs(
      objective, student_hidden, student_head, teacher_hiddens, teacher_heads,
      labels, mask)
  sums = _token_sums(objective, student_hidden, student_head, teacher_hiddens,
                     teacher_heads, labels, mask, step, advantages)
  return sums["loss"] / global_count, lax.stop_gradient(sums)


def chunked_objective(objective, student_hidden: Array, student_head: Array,
                      teacher_hiddens: Sequence[Array],
                      teacher_heads: Sequence[Array], labels: Array,
                      mask: Array, step: Array, *, chunk_size: int,
                      global_count: Array, advantages: Array | None = None
                      ) -> tuple[Array, dict[str, Array]]:
  """Same loss, metrics and gradients as `direct_objective`, chunk by chunk.

  Args:
    objective: an `objectives.Objective` without feature terms (features need
      the models' intermediates, which never pass through here).
    student_hidden: [B, L, D] final hidden states (after the last norm).
    student_head: [D, V] LM head (for tied embeddings: embedding.T).
    teacher_hiddens: one [B, L, Dt] per teacher (may be empty); no gradient.
    teacher_heads: one [Dt, V] per teacher; no gradient.
    labels: [B, L] int target token per position (already shifted).
    mask: [B, L] float, 1 = the token counts; no gradient.
    step: the optimizer step (temperature and weight schedules).
    chunk_size: sequence positions per chunk, a positive int. Values above L
      mean one chunk; if L is not a multiple, the last chunk is padded with
      masked positions (their matmuls are computed and thrown away).
    global_count: the normaliser, the number of valid tokens of the global
      batch (all devices and micro-batches), as in `step.train_step`.
    advantages: [B, L] or None, for a discounted `sampled_reverse_kl` term
      (`token_objective` computes them); no gradient.

  Returns:
    (loss, metric sums); only the loss carries gradients (to student_hidden
    and student_head). Peak memory holds a few [B, chunk_size, V] float32
    buffers, never a [B, L, V] one.
  """
  teacher_hiddens, teacher_heads = _check_inputs(
      objective, student_hidden, student_head, teacher_hiddens, teacher_heads,
      labels, mask)
  to_chunks = _chunker(labels.shape[1], _check_chunk_size(chunk_size))

  hidden_chunks = to_chunks(student_hidden)
  data_chunks = ([jax.tree.map(to_chunks, h) for h in teacher_hiddens],
                 to_chunks(labels), to_chunks(mask),
                 None if advantages is None else to_chunks(advantages))
  # Under shard_map a replicated head meeting sharded hidden states is cast to
  # varying where they meet; inside the loop that cast's transpose would be
  # one all-reduce of the head gradient per chunk. Cast once, outside, so the
  # one all-reduce happens after the loop. The carry's zeros vary like
  # everything, so the loop body keeps its type.
  axes = partitioning.varying_axes(hidden_chunks, data_chunks, student_head,
                                   teacher_heads, step, global_count)
  student_head = partitioning.cast_varying(student_head, axes)
  teacher_heads = [w if w is None else partitioning.cast_varying(w, axes)
                   for w in teacher_heads]
  global_count = partitioning.cast_varying(
      jnp.asarray(global_count, jnp.float32), axes)
  loss, sums = _chunked_loss(objective, axes, hidden_chunks, student_head,
                             teacher_heads, data_chunks, step, global_count)
  return loss, lax.stop_gradient(sums)


def _chunker(length: int, chunk_size: int):
  """x [B, L, ...] -> [num_chunks, B, chunk_size, ...], the last chunk padded
  (chunk_size above L means one chunk)."""
  chunk_size = min(chunk_size, length)
  num_chunks = -(-length // chunk_size)
  pad = num_chunks * chunk_size - length

  def to_chunks(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((x.shape[0], num_chunks, chunk_size) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)
  return to_chunks


def _chunked_loss(objective, axes, *args):
  """(sums['loss'] / global_count, sums), scanning over the chunks.

  Custom VJP: differentiating the scan with autodiff would save every chunk's
  logits (the memory this module avoids) or, under `jax.checkpoint`,
  recompute both models' head matmuls and softmaxes in the backward pass
  (about 1.5x the loss's work). Instead, when differentiated, the forward scan
  also takes each chunk's gradient (w.r.t. its hidden states and the head;
  the chunk's logits die inside the iteration) and the backward pass only
  scales them by the loss's cotangent. Only the loss is differentiable; the
  caller returns the metric sums under stop_gradient. Everything is passed as
  arguments: a custom_vjp must not close over traced values.
  """
  def chunk_loss(hidden, student_head, teacher_heads, chunk, step,
                 global_count):
    t_hiddens, labels, mask, advantages = chunk
    sums = _token_sums(objective, hidden, student_head, t_hiddens,
                       teacher_heads, labels, mask, step, advantages)
    return sums["loss"] / global_count, sums

  def scan(with_grads, hidden_chunks, student_head, teacher_heads,
           data_chunks, step, global_count):
    first = jax.tree.map(lambda x: x[0], (hidden_chunks, data_chunks))
    zeros = jax.tree.map(
        lambda s: partitioning.cast_varying(jnp.zeros(s.shape, s.dtype), axes),
        jax.eval_shape(chunk_loss, first[0], student_head, teacher_heads,
                       first[1], step, global_count)[1])
    add = functools.partial(jax.tree.map, jnp.add)

    def body(carry, chunk):
      hidden, rest = chunk
      if not with_grads:
        _, sums = chunk_loss(hidden, student_head, teacher_heads, rest, step,
                             global_count)
        return add(carry, sums), None
      (_, sums), (d_hidden, d_head) = jax.value_and_grad(
          chunk_loss, (0, 1), has_aux=True)(
              hidden, student_head, teacher_heads, rest, step, global_count)
      return add(carry, (sums, d_head.astype(jnp.float32))), d_hidden

    if with_grads:
      zeros = (zeros, partitioning.cast_varying(
          jnp.zeros(student_head.shape, jnp.float32), axes))
    carry, d_hidden = lax.scan(body, zeros, (hidden_chunks, data_chunks))
    return carry, d_hidden

  @jax.custom_vjp
  def loss_and_sums(hidden_chunks, student_head, teacher_heads, data_chunks,
                    step, global_count):
    sums, _ = scan(False, hidden_chunks, student_head, teacher_heads,
                   data_chunks, step, global_count)
    return sums["loss"] / global_count, sums

  def forward(hidden_chunks, student_head, teacher_heads, data_chunks, step,
              global_count):
    (sums, d_head), d_hidden = scan(True, hidden_chunks, student_head,
                                    teacher_heads, data_chunks, step,
                                    global_count)
    return (sums["loss"] / global_count, sums), (d_hidden, d_head)

  hidden_dtype, head_dtype = args[0].dtype, args[1].dtype

  def backward(residuals, cotangents):
    d_hidden, d_head = residuals
    d_loss, _ = cotangents  # The metric sums are never differentiated.
    return ((d_loss * d_hidden).astype(hidden_dtype),
            (d_loss * d_head).astype(head_dtype), None, None, None, None)

  loss_and_sums.defvjp(forward, backward)
  return loss_and_sums(*args)


def token_objective(objective, student_hidden: Array, student_head: Array,
                    teacher_hiddens: Sequence[Array],
                    teacher_heads: Sequence[Array], labels: Array, mask: Array,
                    step: Array, *, chunk_size: int, global_count: Array
                    ) -> tuple[Array, dict[str, Array]]:
  """chunk_size == 0: `direct_objective`; > 0: `chunked_objective`.

  One entry point for a config field (e.g. `loss_chunk_size`, 0 = direct).
  A `sampled_reverse_kl` term with a discount > 0 charges each sampled token
  for the costs of the tokens after it, which the chunks cannot see one at a
  time: a forward-only pass over the chunks computes every token's cost
  first (one more head matmul per model, no gradient), then the discounted
  returns (`losses.discounted_returns`) weigh the term's gradient.
  """
  advantages = None
  if objective.sampled_discount > 0:
    advantages = _sampled_advantages(
        objective, student_hidden, student_head, teacher_hiddens,
        teacher_heads, labels, mask, step, chunk_size=chunk_size)
  if chunk_size == 0 and not isinstance(chunk_size, bool):
    return direct_objective(objective, student_hidden, student_head,
                            teacher_hiddens, teacher_heads, labels, mask, step,
                            global_count=global_count, advantages=advantages)
  return chunked_objective(objective, student_hidden, student_head,
                           teacher_hiddens, teacher_heads, labels, mask, step,
                           chunk_size=chunk_size, global_count=global_count,
                           advantages=advantages)


def _sampled_advantages(objective, student_hidden, student_head,
                        teacher_hiddens, teacher_heads, labels, mask, step, *,
                        chunk_size: int) -> Array:
  """[B, L] discounted returns of the sampled-token costs; no gradient."""
  if any(w is None for w in teacher_heads):
    raise ValueError("a discounted sampled_reverse_kl grades the student's "
                     "own samples: it needs the live teacher, not a cache")
  student_hidden, student_head, teacher_hiddens, teacher_heads = (
      lax.stop_gradient((student_hidden, student_head, list(teacher_hiddens),
                         list(teacher_heads))))
  batch, length = labels.shape
  to_chunks = _chunker(length, _check_chunk_size(chunk_size) if chunk_size
                       else length)

  def costs(chunk):
    hidden, t_hiddens, chunk_labels = chunk
    student_logits = logits_from_hidden(hidden, student_head)
    teachers = [ModelOutputs(logits_from_hidden(h, w))
                for h, w in zip(t_hiddens, teacher_heads)]
    _, terms = objective(ModelOutputs(student_logits), teachers, chunk_labels,
                         step)
    return terms[_sampled_label(objective)]

  per_chunk = lax.map(costs, (to_chunks(student_hidden),
                              [to_chunks(h) for h in teacher_hiddens],
                              to_chunks(labels)))
  per_token = jnp.moveaxis(per_chunk, 0, 1).reshape(batch, -1)[:, :length]
  return losses.discounted_returns(per_token, mask,
                                   objective.sampled_discount)


def _sampled_label(objective) -> str:
  return next(t.label or t.name for t in objective.terms
              if t.name == objectives.SAMPLED_TERM)


def _token_sums(objective, hidden, head, teacher_hiddens, teacher_heads,
                labels, mask, step, advantages=None) -> dict[str, Array]:
  """Masked sums of the objective and metrics over the given tokens."""
  student_logits = logits_from_hidden(hidden, head)
  teachers = [ModelOutputs(lax.stop_gradient(logits_from_hidden(h, w)))
              if w is not None else ModelOutputs(None, hidden=h)  # Cached.
              for h, w in zip(teacher_hiddens, teacher_heads)]
  per_token, terms = objective(ModelOutputs(student_logits), teachers, labels,
                               step, advantages=advantages)
  predictions = jnp.argmax(student_logits, -1)
  sums = {"loss": _masked_sum(per_token, mask),
          "correct": _masked_sum(predictions == labels, mask),
          "count": jnp.sum(mask)}
  sums.update({name: _masked_sum(v, mask) for name, v in terms.items()})
  if teachers:
    top1 = (teachers[0].topk.top1 if teachers[0].topk is not None
            else jnp.argmax(teachers[0].logits, -1))
    sums["agreement"] = _masked_sum(predictions == top1, mask)
  return sums


def _masked_sum(values: Array, mask: Array) -> Array:
  # where, not just a product: a non-finite value at a masked token must not
  # turn the sum into NaN (0 * inf).
  return jnp.sum(jnp.where(mask != 0, values * mask, 0.0))


def _check_chunk_size(chunk_size: Any) -> int:
  if (isinstance(chunk_size, bool) or
      not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0):
    raise ValueError(f"chunk_size={chunk_size!r} is invalid: must be a "
                     "positive int (sequence positions per chunk).")
  return int(chunk_size)


def _check_inputs(objective, student_hidden, student_head, teacher_hiddens,
                  teacher_heads, labels, mask):
  """Shapes and objective support, checked at trace time with clear messages."""
  if objective.needs_features:
    raise ValueError(
        "Token-level losses from hidden states do not support feature terms "
        f"(config.distill.features has {len(objective.feature_terms)}): the "
        "models' intermediates never reach the loss; use a model that returns "
        "logits (the step's default path).")
  teacher_hiddens, teacher_heads = list(teacher_hiddens), list(teacher_heads)
  if len(teacher_hiddens) != len(teacher_heads):
    raise ValueError(f"{len(teacher_hiddens)} teacher hidden states but "
                     f"{len(teacher_heads)} teacher heads: need one each.")
  if objective.uses_teacher and (len(teacher_hiddens) !=
                                 len(objective.teacher_weights)):
    raise ValueError(f"The objective combines {len(objective.teacher_weights)}"
                     f" teachers but {len(teacher_hiddens)} were given.")
  if labels.ndim != 2:
    raise ValueError(f"labels must be [batch, length], got shape "
                     f"{labels.shape}.")
  if mask.shape != labels.shape:
    raise ValueError(f"mask shape {mask.shape} != labels shape "
                     f"{labels.shape}.")
  vocab = _check_pair("student", student_hidden, student_head, labels.shape)
  for i, (hidden, head) in enumerate(zip(teacher_hiddens, teacher_heads)):
    if head is None:  # Precomputed per-token entries (module doc).
      for leaf in jax.tree.leaves(hidden):
        if leaf.shape[:2] != labels.shape:
          raise ValueError(f"teacher {i} per-token entries must be [batch, "
                           f"length, ...] with [batch, length] = "
                           f"{labels.shape}, got {leaf.shape}.")
      continue
    teacher_vocab = _check_pair(f"teacher {i}", hidden, head, labels.shape)
    if teacher_vocab != vocab:
      raise ValueError(f"teacher {i} head has vocabulary {teacher_vocab}, the "
                       f"student's has {vocab}: they must share a tokenizer.")
  return ([lax.stop_gradient(h) for h in teacher_hiddens],
          [lax.stop_gradient(w) for w in teacher_heads])


def _check_pair(name, hidden, head, labels_shape) -> int:
  if hidden.ndim != 3 or hidden.shape[:2] != labels_shape:
    raise ValueError(f"{name} hidden states must be [batch, length, width] "
                     f"with [batch, length] = {labels_shape}, got "
                     f"{hidden.shape}.")
  if head.ndim != 2 or head.shape[0] != hidden.shape[-1]:
    raise ValueError(f"{name} head must be [width={hidden.shape[-1]}, vocab],"
                     f" got {head.shape}.")
  return head.shape[1]
