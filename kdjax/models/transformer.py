"""Transformer encoder classifier (pre-LayerNorm, learned positions)."""

from typing import Any

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from kdjax.models import partitioning

_NORM = dict(scale_init=partitioning.param(nn.initializers.ones, ("norm",)),
             bias_init=partitioning.param(nn.initializers.zeros, ("norm",)))


def _dense(features: int, names: tuple[str, str], name: str,
           dtype: str = "float32") -> nn.Dense:
  """nn.Dense with its default initializers, kernel axes `names`, computing
  in `dtype` (float32 parameters)."""
  return nn.Dense(
      features, dtype=dtype,
      kernel_init=partitioning.param(nn.initializers.lecun_normal(), names),
      bias_init=partitioning.param(nn.initializers.zeros_init(), names[1:]),
      name=name)


class _FlatInit(struct.PyTreeNode, nn.meta.AxisMetadata):
  """A DenseGeneral parameter as its initializer returns it: flat, unnamed.

  DenseGeneral (the projections of nn.MultiHeadDotProductAttention) calls its
  initializer with a 2-D shape and reshapes the result to [embed, heads,
  head_dim]; a `partitioning.param` box would be constrained to its three
  names while still 2-D, which fails under a mesh and rules
  (google/flax#3676). This box holds the flat value unconstrained and, once
  reshaped, becomes the ordinary nn.LogicallyPartitioned that
  `partitioning.param(init, names)` would give.
  """
  value: Any
  names: tuple = struct.field(pytree_node=False)

  def unbox(self, apply_constraint: bool = True) -> Any:
    del apply_constraint
    return self.value

  def replace_boxed(self, val: Any) -> nn.LogicallyPartitioned:
    return partitioning.param(lambda: val, self.names)()

  def add_axis(self, index, params):
    raise NotImplementedError("a flat DenseGeneral init is never lifted")

  def remove_axis(self, index, params):
    raise NotImplementedError("a flat DenseGeneral init is never lifted")


def _dense_general_param(init, names: tuple[str | None, ...]):
  """`partitioning.param(init, names)` for a DenseGeneral kernel or bias."""
  partitioning.param(init, names)  # Checks the names.

  def flat_init(key, shape, dtype=jnp.float32):
    return _FlatInit(init(key, shape, dtype), tuple(names))
  return flat_init


class EncoderBlock(nn.Module):
  """Pre-LN self-attention + GELU MLP, both residual."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  sow_attention: bool = False
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, attention_mask, *, train: bool):
    x = partitioning.constrain(x, partitioning.RESIDUAL)
    h = nn.LayerNorm(dtype=self.dtype, name="ln_attention", **_NORM)(x)
    # query/key/value kernels [embed, heads, head_dim], biases [heads,
    # head_dim]; out kernel [heads, head_dim, embed], bias [embed]. The
    # initializers are MultiHeadDotProductAttention's defaults.
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        deterministic=not train, dtype=self.dtype,
        kernel_init=_dense_general_param(nn.initializers.lecun_normal(),
                                         ("embed", "heads", "head_dim")),
        bias_init=_dense_general_param(nn.initializers.zeros_init(),
                                       ("heads", "head_dim")),
        out_kernel_init=_dense_general_param(
            nn.initializers.lecun_normal(), ("heads", "head_dim", "embed")),
        out_bias_init=_dense_general_param(nn.initializers.zeros_init(),
                                           ("embed",)),
        name="attention")(
            h, h, mask=attention_mask, sow_weights=self.sow_attention)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = nn.LayerNorm(dtype=self.dtype, name="ln_mlp", **_NORM)(x)
    h = _dense(self.mlp_dim, ("embed", "mlp"), "mlp_in", self.dtype)(h)
    h = _dense(x.shape[-1], ("mlp", "embed"), "mlp_out", self.dtype)(
        nn.gelu(h))
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    x = partitioning.constrain(x, partitioning.RESIDUAL)
    self.sow("intermediates", "output", x)
    return x


class TransformerClassifier(nn.Module):
  """Token ids [batch, length] (0 = padding) -> class logits via masked mean pool.

  Each block's output is sown into 'intermediates' at `block_{i}/output`; with
  sow_attention, its attention maps too, at `block_{i}/attention/attention_weights`
  ([batch, heads, query, key]), for attention-map distillation.
  `dtype` is the compute dtype (parameters stay float32; logits come out
  float32).
  """
  num_classes: int
  vocab_size: int
  max_length: int = 128
  width: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 256
  dropout_rate: float = 0.0
  pad_id: int = 0
  sow_attention: bool = False
  dtype: str = "float32"

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    if tokens.shape[1] > self.max_length:
      raise ValueError(f"Sequence length {tokens.shape[1]} exceeds the "
                       f"model's max_length={self.max_length}.")
    mask = tokens != self.pad_id
    x = nn.Embed(
        self.vocab_size, self.width,
        # nn.Embed's default initializer.
        embedding_init=partitioning.param(
            nn.initializers.variance_scaling(1.0, "fan_in", "normal",
                                             out_axis=0),
            ("vocab", "embed")),
        dtype=self.dtype, name="embed")(tokens)
    positions = self.param(
        "positions",
        partitioning.param(nn.initializers.normal(0.02), ("length", "embed")),
        (self.max_length, self.width))
    x = x + positions[None, :tokens.shape[1]].astype(self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = partitioning.constrain(x, partitioning.RESIDUAL)
    attention_mask = nn.make_attention_mask(mask, mask)
    for i in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate,
                       self.sow_attention, self.dtype, name=f"block_{i}")(
                           x, attention_mask, train=train)
    x = nn.LayerNorm(dtype=self.dtype, name="ln_final", **_NORM)(x)
    # The mean over tokens in float32 (a long sum), the head in dtype.
    weights = mask[..., None].astype(jnp.float32)
    pooled = jnp.sum(x.astype(jnp.float32) * weights, axis=1) / jnp.maximum(
        jnp.sum(weights, axis=1), 1.0)
    logits = _dense(self.num_classes, ("embed", "classes"), "head",
                    self.dtype)(pooled)
    return logits.astype(jnp.float32)
