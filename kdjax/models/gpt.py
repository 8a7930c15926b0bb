"""GPT-style causal decoder: the reference model of the performance issue.

Pre-LayerNorm blocks, learned positions, GELU MLP of 4x width, tied input and
output embeddings (logits = h @ E^T), causal self-attention. No dropout.

Written for speed on CPU (where the reference workload is measured):
  * one fused QKV projection in the matmul's natural layout [B, L, 3, H, Dh],
    then one transpose to head-major ([3, B, H, L, Dh]) so both attention
    products are plain batched matmuls. Asking the einsum for head-major
    output directly let XLA compute the product transposed ([3*H*Dh, B*L])
    and gather every q/k/v slice from it element by element: 6% slower per
    teacher block forward, 3% per step (benchmarks/README.md);
  * causal attention over query blocks: query block i only multiplies the key
    blocks 0..i, so fully masked blocks are never computed;
  * the tied output head's backward computes d(embedding)^T = h^T g and
    transposes that [width, vocab] result, instead of XLA copying the
    [tokens, vocab] logits gradient into [vocab, tokens] (134 MB on the
    reference workload) for g^T h (`tied_logits`);
  * softmax normalised AFTER the probabilities-times-values product (one
    divide over [B, H, L, Dh] instead of [B, H, L, L]), with the row maximum
    under stop_gradient (softmax is shift invariant, so the gradient is exact
    and XLA skips the max's backward).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from kdjax.models import partitioning, precision

_INIT = nn.initializers.normal(0.02)
_ZEROS = nn.initializers.zeros_init()  # nn.Dense's default bias init.
_NORM = dict(scale_init=partitioning.param(nn.initializers.ones, ("norm",)),
             bias_init=partitioning.param(nn.initializers.zeros, ("norm",)))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     block_size: int = 128) -> jax.Array:
  """softmax(q k^T / sqrt(Dh) + causal mask) v for head-major [B, H, L, Dh].

  Query block [s, s + block_size) attends keys [0, s + block_size): the
  blocks above the diagonal are skipped, not masked.
  """
  length, head_dim = q.shape[-2], q.shape[-1]
  q = q * jnp.asarray(head_dim**-0.5, q.dtype)
  outputs = []
  for start in range(0, length, block_size):
    stop = min(start + block_size, length)
    scores = precision.einsum_f32("bhqd,bhkd->bhqk", q[:, :, start:stop],
                                  k[:, :, :stop])
    query_pos = jnp.arange(start, stop)[:, None]
    allowed = jnp.arange(stop)[None, :] <= query_pos
    scores = jnp.where(allowed, scores, -jnp.inf)
    # The diagonal is always allowed, so every row has a finite maximum.
    row_max = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    unnormalised = jnp.exp(scores - row_max)
    denominator = jnp.sum(unnormalised, axis=-1, keepdims=True)
    out = precision.einsum_f32("bhqk,bhkd->bhqd", unnormalised.astype(v.dtype),
                               v[:, :, :stop])
    outputs.append((out / denominator).astype(q.dtype))
  return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=2)


def tied_logits(hidden: jax.Array, embedding: jax.Array) -> jax.Array:
  """hidden [B, L, D] @ embedding [V, D]^T: the tied output head's logits,
  accumulated and returned in float32 whatever the compute dtype (as
  kdjax.models.precision.einsum_f32: bfloat16 logits would be off by ~0.1
  at logit scale 7, in every loss and metric read from them)."""
  # Under shard_map the embedding is the same on every device and hidden is
  # not; the custom VJP must see both alike (autodiff then sums d embedding).
  return _tied_logits(hidden, partitioning.cast_varying(
      embedding, partitioning.varying_axes(hidden)))


@jax.custom_vjp
def _tied_logits(hidden, embedding):
  with jax.named_scope("tied_head"):
    return jnp.einsum("bld,vd->blv", hidden, embedding,
                      preferred_element_type=jnp.float32)


def _tied_logits_forward(hidden, embedding):
  return _tied_logits(hidden, embedding), (hidden, embedding)


def _tied_logits_backward(residuals, grad):
  hidden, embedding = residuals
  # In the compute dtype, like the forward's inputs (precision.einsum_f32).
  grad = grad.astype(jnp.result_type(hidden, embedding))
  with jax.named_scope("tied_head"):
    grad_hidden = jnp.einsum("blv,vd->bld", grad, embedding)
    # [D, V] read along the logits gradient's rows, then a small transpose
    # (XLA folds the same transpose away when autodiff writes g^T h).
    grad_embedding = jnp.einsum("bld,blv->dv", hidden, grad).T
  return grad_hidden, grad_embedding


_tied_logits.defvjp(_tied_logits_forward, _tied_logits_backward)


class DecoderBlock(nn.Module):
  """x + attn(LN(x)), then x + MLP(LN(x)); causal, no dropout."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width={width} is not divisible by "
                       f"num_heads={self.num_heads}.")
    head_dim = width // self.num_heads
    x = partitioning.constrain(x, partitioning.RESIDUAL)
    h = nn.LayerNorm(dtype=self.dtype, name="ln_attention", **_NORM)(x)
    # [width, q/k/v, heads, head_dim]: the q/k/v axis (size 3) is unnamed.
    qkv_kernel = self.param(
        "qkv_kernel",
        partitioning.param(_INIT, ("embed", None, "heads", "head_dim")),
        (width, 3, self.num_heads, head_dim))
    qkv_bias = self.param(
        "qkv_bias",
        partitioning.param(nn.initializers.zeros,
                           (None, "heads", None, "head_dim")),
        (3, self.num_heads, 1, head_dim))
    qkv = jnp.einsum("bld,dthk->blthk", h, qkv_kernel.astype(self.dtype))
    qkv = qkv + qkv_bias.astype(self.dtype)[:, :, 0]
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # [3, B, H, L, Dh]
    attended = causal_attention(q, k, v)
    out_kernel = self.param(
        "out_kernel",
        partitioning.param(_INIT, ("heads", "head_dim", "embed")),
        (self.num_heads, head_dim, width))
    out_bias = self.param(
        "out_bias", partitioning.param(nn.initializers.zeros, ("embed",)),
        (width,))
    x = x + (jnp.einsum("bhlk,hkd->bld", attended,
                        out_kernel.astype(self.dtype)) + out_bias)
    h = nn.LayerNorm(dtype=self.dtype, name="ln_mlp", **_NORM)(x)
    h = nn.Dense(4 * width, dtype=self.dtype,
                 kernel_init=partitioning.param(_INIT, ("embed", "mlp")),
                 bias_init=partitioning.param(_ZEROS, ("mlp",)),
                 name="mlp_in")(h)
    h = nn.Dense(width, dtype=self.dtype,
                 kernel_init=partitioning.param(_INIT, ("mlp", "embed")),
                 bias_init=partitioning.param(_ZEROS, ("embed",)),
                 name="mlp_out")(nn.gelu(h))
    x = partitioning.constrain(x + h, partitioning.RESIDUAL)
    self.sow("intermediates", "output", x)
    return x


class _ScannedBlock(DecoderBlock):
  """A DecoderBlock as nn.scan's body: (carry, output) = (x, None)."""

  def __call__(self, x):
    return super().__call__(x), None


class GPT(nn.Module):
  """Token ids [batch, length] -> next-token logits [batch, length, vocab].

  `dtype` is the compute dtype (parameters stay float32). Each block's output
  is sown into 'intermediates' at `block_{i}/output` for feature distillation
  (with scan_layers: at `block/output`, stacked [num_layers, B, L, D]).
  """
  vocab_size: int
  width: int = 256
  num_layers: int = 4
  num_heads: int = 4
  max_length: int = 256
  dtype: Any = jnp.float32
  # One scanned block (nn.scan) instead of num_layers unrolled ones: compile
  # time flat in depth; params stacked under block/ with a leading
  # [num_layers] axis (logical name 'layers'). kdjax.models.stacking
  # converts to and from the block_{i} layout of checkpoints.
  scan_layers: bool = False

  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    return self._forward(tokens, logits=True)

  def hidden_states(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """Final (normalised) hidden states [B, L, width]: logits = h @ head.

    For kdjax.distill.token_loss, which applies `lm_head_kernel(params)` itself
    (chunked over the sequence) instead of building [B, L, vocab] logits.
    """
    return self._forward(tokens, logits=False)

  @nn.compact
  def _forward(self, tokens: jax.Array, *, logits: bool) -> jax.Array:
    # No dropout: train and eval compute the same function.
    if tokens.ndim != 2:
      raise ValueError(f"GPT expects token ids [batch, length], got shape "
                       f"{tokens.shape}.")
    if tokens.shape[1] > self.max_length:
      raise ValueError(f"Sequence length {tokens.shape[1]} exceeds the "
                       f"model's max_length={self.max_length}.")
    embed = nn.Embed(
        self.vocab_size, self.width,
        embedding_init=partitioning.param(_INIT, ("vocab", "embed")),
        dtype=self.dtype, name="embed")
    positions = self.param(
        "positions", partitioning.param(_INIT, ("length", "embed")),
        (self.max_length, self.width))
    x = embed(tokens) + positions[:tokens.shape[1]].astype(self.dtype)
    x = partitioning.constrain(x, partitioning.RESIDUAL)
    if self.scan_layers:
      x, _ = nn.scan(
          _ScannedBlock, length=self.num_layers,
          variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True},
          metadata_params={nn.PARTITION_NAME: "layers"})(
              self.num_heads, self.dtype, name="block")(x)
    else:
      for i in range(self.num_layers):
        x = DecoderBlock(self.num_heads, self.dtype, name=f"block_{i}")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="ln_final", **_NORM)(x)
    x = partitioning.constrain(x, partitioning.RESIDUAL)
    if not logits:
      return x
    # Tied output embedding; float32 logits for the losses.
    logits = tied_logits(x, embed.embedding.astype(self.dtype))
    return partitioning.constrain(logits, partitioning.LOGITS)


def lm_head_kernel(params: Any) -> jax.Array:
  """The [width, vocab] output head: the transposed (tied) input embedding."""
  return partitioning.unbox(params["embed"]["embedding"]).T
