"""Multi-layer perceptron: the default small student for images."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """Flatten -> [Dense -> ReLU -> Dropout] * len(hidden) -> Dense(num_classes).

  Hidden activations are sown into 'intermediates' as `hidden_{i}` so feature
  distillation can read them without hooks.
  """
  num_classes: int
  hidden: Sequence[int] = (128,)
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
      self.sow("intermediates", f"hidden_{i}", x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="head")(x)
