"""GPT with scan_layers: the unrolled blocks, stacked (kdjax.models.stacking)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kdjax.models import gpt, partitioning, stacking
from kdjax.models.partitioning import unbox

SIZES = dict(vocab_size=50, width=32, num_layers=3, num_heads=4,
             max_length=16)
TOKENS = jnp.array([[1, 5, 7, 3, 0, 2], [2, 9, 4, 8, 6, 1]], jnp.int32)


def _models():
  return gpt.GPT(**SIZES), gpt.GPT(**SIZES, scan_layers=True)


def _init(model, seed=0):
  params = unbox(model.init(jax.random.key(seed), TOKENS)["params"])
  # Non-zero biases and LayerNorm affine terms, and layers that differ.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [
      leaf + 0.1 * jax.random.normal(k, leaf.shape)
      for leaf, k in zip(leaves, keys)])


def _close(a, b):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scanned_params_are_the_unrolled_ones_stacked():
  plain, scanned = _models()
  params = _init(plain)
  stacked = stacking.stack(params, "block")
  assert "block" in stacked and not any(k.startswith("block_")
                                        for k in stacked)
  got = unbox(jax.eval_shape(scanned.init, jax.random.key(0),
                             TOKENS)["params"])
  assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, stacked)
  assert got["block"]["qkv_kernel"].shape == (3, 32, 3, 4, 8)
  for i in range(3):  # Layer i of block_<i> is block[i].
    jax.tree.map(lambda s, p, i=i: np.testing.assert_array_equal(s[i], p),
                 stacked["block"], params[f"block_{i}"])


def test_scanned_blocks_compute_what_unrolled_blocks_compute():
  plain, scanned = _models()
  params = _init(plain)
  stacked = stacking.stack(params, "block")
  _close(scanned.apply({"params": stacked}, TOKENS),
         plain.apply({"params": params}, TOKENS))
  _close(scanned.apply({"params": stacked}, TOKENS,
                       method=gpt.GPT.hidden_states),
         plain.apply({"params": params}, TOKENS,
                     method=gpt.GPT.hidden_states))
  np.testing.assert_array_equal(gpt.lm_head_kernel(stacked),
                                gpt.lm_head_kernel(params))


def test_scanned_gradients_are_the_unrolled_ones_stacked():
  plain, scanned = _models()
  params = _init(plain)

  def loss(model, p):
    logits = model.apply({"params": p}, TOKENS)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 1])
  value, grads = jax.jit(jax.value_and_grad(
      functools.partial(loss, plain)))(params)
  value_s, grads_s = jax.jit(jax.value_and_grad(
      functools.partial(loss, scanned)))(stacking.stack(params, "block"))
  np.testing.assert_allclose(value_s, value, rtol=1e-6)
  assert jax.tree.structure(grads_s) == jax.tree.structure(
      stacking.stack(grads, "block"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               stacking.stack(grads, "block"), grads_s)


def test_scanned_intermediates_stack_the_block_outputs():
  plain, scanned = _models()
  params = _init(plain)
  _, state = plain.apply({"params": params}, TOKENS,
                         mutable=["intermediates"])
  _, state_s = scanned.apply({"params": stacking.stack(params, "block")},
                             TOKENS, mutable=["intermediates"])
  (outputs,) = state_s["intermediates"]["block"]["output"]
  assert outputs.shape == (3, 2, 6, 32)
  for i in range(3):
    (expected,) = state["intermediates"][f"block_{i}"]["output"]
    _close(outputs[i], expected)


def test_scanned_logical_names_put_layers_first():
  plain, scanned = _models()
  names = partitioning.logical_names(
      jax.eval_shape(plain.init, jax.random.key(0), TOKENS)["params"])
  names_s = partitioning.logical_names(
      jax.eval_shape(scanned.init, jax.random.key(0), TOKENS)["params"])
  expected = jax.tree.map(lambda spec: P("layers", *spec), names["block_0"],
                          is_leaf=lambda x: isinstance(x, P))
  assert names_s["block"] == expected
  assert names_s["block"]["qkv_kernel"] == P("layers", "embed", None, "heads",
                                             "head_dim")
  for key in ("embed", "positions", "ln_final"):
    assert names_s[key] == names[key]


def test_unrolled_layout_is_unchanged_by_default():
  assert not gpt.GPT(**SIZES).scan_layers
  params = unbox(jax.eval_shape(gpt.GPT(**SIZES).init, jax.random.key(0),
                                TOKENS)["params"])
  assert sorted(params) == ["block_0", "block_1", "block_2", "embed",
                            "ln_final", "positions"]


def test_scanned_init_is_boxed_with_the_layers_axis():
  _, scanned = _models()
  boxed = scanned.init(jax.random.key(0), TOKENS)["params"]
  leaf = boxed["block"]["mlp_in"]["kernel"]
  assert isinstance(leaf, nn.LogicallyPartitioned)
  assert leaf.names == ("layers", "embed", "mlp")
  assert leaf.value.shape == (3, 32, 128)
  # Each layer initialised with its own key.
  assert not np.allclose(leaf.value[0], leaf.value[1])
