"""Models: output shapes, parameter counts from the config, registry errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.models.partitioning import unbox


def _num_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_mlp_parameter_count_is_what_the_sizes_say():
  model = models.get_model("mlp", num_classes=10, hidden=(128,))
  params = unbox(model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])
  assert _num_params(params) == 784 * 128 + 128 + 128 * 10 + 10


def test_cnn_shapes_and_count():
  model = models.get_model("cnn", num_classes=10, channels=(8, 16),
                           convs_per_stage=1, dense_features=32)
  x = jnp.zeros((3, 28, 28, 1))
  params = unbox(model.init(jax.random.key(0), x)["params"])
  assert model.apply({"params": params}, x).shape == (3, 10)
  expected = (9 * 1 * 8 + 8) + (9 * 8 * 16 + 16) + (7 * 7 * 16 * 32 + 32) + (
      32 * 10 + 10)
  assert _num_params(params) == expected


def test_cnn_max_pool_matches_flax_max_pool():
  import flax.linen as nn
  from kdjax.models.cnn import _max_pool_2x2
  x = jax.random.normal(jax.random.key(0), (2, 7, 9, 3))
  np.testing.assert_array_equal(_max_pool_2x2(x),
                                nn.max_pool(x, (2, 2), strides=(2, 2)))


@pytest.mark.parametrize("name,kwargs", [
    ("lstm", dict(vocab_size=50, embed_dim=8, hidden_size=6, dense_features=5)),
    ("lstm", dict(vocab_size=50, embed_dim=8, hidden_size=6, dense_features=5,
                  bidirectional=False)),
    ("transformer", dict(vocab_size=50, max_length=12, width=16, num_layers=2,
                         num_heads=2, mlp_dim=32)),
])
def test_text_classifiers_ignore_padding(name, kwargs):
  model = models.get_model(name, num_classes=3, **kwargs)
  tokens = jnp.array([[5, 6, 7, 0, 0, 0], [8, 9, 0, 0, 0, 0]])
  params = unbox(model.init(jax.random.key(0), tokens)["params"])
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 3)
  # Appending more padding must not change the prediction.
  padded = jnp.concatenate([tokens, jnp.zeros((2, 4), jnp.int32)], axis=1)
  np.testing.assert_allclose(model.apply({"params": params}, padded), logits,
                             rtol=1e-5, atol=1e-5)
  # Changing a real token must.
  changed = tokens.at[0, 0].set(11)
  assert not np.allclose(model.apply({"params": params}, changed)[0], logits[0])


def test_bilstm_has_two_directions_worth_of_params():
  kw = dict(num_classes=2, vocab_size=20, embed_dim=4, hidden_size=3,
            dense_features=2)
  tokens = jnp.ones((1, 5), jnp.int32)
  uni = models.get_model("lstm", bidirectional=False, **kw)
  bi = models.get_model("lstm", bidirectional=True, **kw)
  n_uni = _num_params(unbox(uni.init(jax.random.key(0), tokens)["params"]))
  n_bi = _num_params(unbox(bi.init(jax.random.key(0), tokens)["params"]))
  lstm = 4 * (4 * 3 + 3 * 3 + 3)  # Four gates: input, recurrent, bias.
  assert n_bi - n_uni == lstm + 3 * 2  # One more LSTM and a wider dense input.


def test_unknown_model_and_field_errors_name_allowed_values():
  with pytest.raises(ValueError, match=r"Unknown model name 'resnet9000'.*mlp"):
    models.get_model("resnet9000", num_classes=2)
  with pytest.raises(ValueError, match=r"no field\(s\) \['widht'\].*hidden"):
    models.get_model("mlp", num_classes=2, widht=3)
