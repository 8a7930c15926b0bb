"""Transformer encoder classifier (pre-LayerNorm, learned positions)."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class EncoderBlock(nn.Module):
  """Pre-LN self-attention + GELU MLP, both residual."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  sow_attention: bool = False

  @nn.compact
  def __call__(self, x, attention_mask, *, train: bool):
    h = nn.LayerNorm(name="ln_attention")(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        deterministic=not train, name="attention")(
            h, h, mask=attention_mask, sow_weights=self.sow_attention)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.Dense(self.mlp_dim, name="mlp_in")(h)
    h = nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(h))
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    self.sow("intermediates", "output", x)
    return x


class TransformerClassifier(nn.Module):
  """Token ids [batch, length] (0 = padding) -> class logits via masked mean pool.

  Each block's output is sown into 'intermediates' at `block_{i}/output`; with
  sow_attention, its attention maps too, at `block_{i}/attention/attention_weights`
  ([batch, heads, query, key]), for attention-map distillation.
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

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    if tokens.shape[1] > self.max_length:
      raise ValueError(f"Sequence length {tokens.shape[1]} exceeds the "
                       f"model's max_length={self.max_length}.")
    mask = tokens != self.pad_id
    x = nn.Embed(self.vocab_size, self.width, name="embed")(tokens)
    positions = self.param("positions", nn.initializers.normal(0.02),
                           (self.max_length, self.width))
    x = x + positions[None, :tokens.shape[1]]
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    attention_mask = nn.make_attention_mask(mask, mask)
    for i in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate,
                       self.sow_attention, name=f"block_{i}")(
                           x, attention_mask, train=train)
    x = nn.LayerNorm(name="ln_final")(x)
    weights = mask[..., None].astype(x.dtype)
    pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(
        jnp.sum(weights, axis=1), 1.0)
    return nn.Dense(self.num_classes, name="head")(pooled)
