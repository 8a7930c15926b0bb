"""Embedding + (Bi)LSTM text classifier (the student of Tang et al. 2019)."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class LSTMClassifier(nn.Module):
  """Token ids [batch, length] (0 = padding) -> class logits.

  The (bidirectional) LSTM runs over the real tokens only (`seq_lengths`), its
  per-token outputs are max-pooled over valid positions, then a ReLU dense
  layer and the head. `dtype` is the compute dtype (the cells' matmuls and
  state; parameters stay float32; logits come out float32).
  """
  num_classes: int
  vocab_size: int
  embed_dim: int = 128
  hidden_size: int = 128
  bidirectional: bool = True
  dense_features: int = 128
  dropout_rate: float = 0.0
  pad_id: int = 0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    mask = tokens != self.pad_id
    lengths = jnp.sum(mask, axis=-1).astype(jnp.int32)
    x = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                 name="embed")(tokens)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    cell = lambda: nn.OptimizedLSTMCell(self.hidden_size, dtype=self.dtype)
    forward = nn.RNN(cell(), name="lstm_fwd")
    carry = _zero_carry_like(x, self.hidden_size)
    if self.bidirectional:
      backward = nn.RNN(cell(), name="lstm_bwd")
      x = nn.Bidirectional(forward, backward)(
          x, seq_lengths=lengths, initial_carry=(carry, carry))
    else:
      x = forward(x, seq_lengths=lengths, initial_carry=carry)
    self.sow("intermediates", "sequence", x)
    x = jnp.max(jnp.where(mask[..., None], x, jnp.asarray(-1e9, x.dtype)),
                axis=1)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.relu(nn.Dense(self.dense_features, dtype=self.dtype,
                         name="dense")(x))
    self.sow("intermediates", "pooled", x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32)


def _zero_carry_like(x: jax.Array, hidden_size: int):
  """Zero (c, h) derived from the inputs.

  Under shard_map, a carry built with jnp.zeros is device-invariant while the
  scan body's output varies over the data axis, and scan refuses the type
  mismatch; deriving the zeros from x gives them x's (varying) type.
  """
  zeros = jnp.zeros((x.shape[0], hidden_size), x.dtype) + 0.0 * x[:, 0, :1]
  return (zeros, zeros)
