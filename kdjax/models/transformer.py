"""Transformer encoder classifier (pre-LayerNorm, learned positions)."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class EncoderBlock(nn.Module):
  """Pre-LN self-attention + GELU MLP, both residual."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, attention_mask, *, train: bool):
    h = nn.LayerNorm(name="ln_attention")(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        deterministic=not train, name="attention")(h, h, mask=attention_mask)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.Dense(self.mlp_dim, name="mlp_in")(h)
    h = nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(h))
    return x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)


class TransformerClassifier(nn.Module):
  """Token ids [batch, length] (0 = padding) -> class logits via masked mean pool.

  Each block's output is sown into 'intermediates' as `block_{i}`.
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
                       name=f"block_{i}")(x, attention_mask, train=train)
      self.sow("intermediates", f"block_{i}", x)
    x = nn.LayerNorm(name="ln_final")(x)
    weights = mask[..., None].astype(x.dtype)
    pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(
        jnp.sum(weights, axis=1), 1.0)
    return nn.Dense(self.num_classes, name="head")(pooled)
