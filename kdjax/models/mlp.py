"""Multi-layer perceptron: the default small student for images."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """Flatten -> [Dense -> ReLU -> Dropout] * len(hidden) -> Dense(num_classes).

  Hidden activations are sown into 'intermediates' as `hidden_{i}` so feature
  distillation can read them without hooks. `dtype` is the compute dtype
  (matmul inputs and activations; parameters stay float32, logits come out
  float32 for the losses).
  """
  num_classes: int
  hidden: Sequence[int] = (128,)
  dropout_rate: float = 0.0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"dense_{i}")(x))
      self.sow("intermediates", f"hidden_{i}", x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return logits.astype(jnp.float32)
