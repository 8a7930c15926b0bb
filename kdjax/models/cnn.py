"""A small VGG-style convolutional network: the default image teacher."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class CNN(nn.Module):
  """Stages of [Conv3x3 -> ReLU] * convs_per_stage -> MaxPool, then Dense head.

  No batch norm, so the model has no mutable state and the per-device step
  needs no cross-device statistics. Stage outputs are sown into
  'intermediates' as `stage_{i}` for feature distillation. `dtype` is the
  compute dtype (parameters stay float32; logits come out float32).
  """
  num_classes: int
  channels: Sequence[int] = (32, 64)
  convs_per_stage: int = 2
  dense_features: int = 512
  dropout_rate: float = 0.0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.astype(self.dtype)
    if x.ndim == 3:  # [batch, height, width] -> add a channel axis.
      x = x[..., None]
    for i, channels in enumerate(self.channels):
      for j in range(self.convs_per_stage):
        x = nn.relu(nn.Conv(channels, (3, 3), dtype=self.dtype,
                                 name=f"conv_{i}_{j}")(x))
      x = _max_pool_2x2(x)
      self.sow("intermediates", f"stage_{i}", x)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.relu(nn.Dense(self.dense_features, dtype=self.dtype,
                         name="dense")(x))
    self.sow("intermediates", "penultimate", x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32)


def _max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2/2 max pooling as reshape + max (floor on odd sizes).

  Same values as nn.max_pool, but its gradient avoids XLA's select-and-scatter,
  which is slow on CPU.
  """
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
