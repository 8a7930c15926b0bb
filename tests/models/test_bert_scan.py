"""BERT with scan_layers: the unrolled encoder layers, stacked (kdjax.models.stacking)."""

import functools
import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kdjax import models
from kdjax.distill import features
from kdjax.models import bert, partitioning, stacking
from kdjax.models.partitioning import unbox
from kdjax.weights.importers import hf_bert

TINY = dict(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2,
            intermediate_size=32, max_position_embeddings=8)
TOKENS = jnp.array([[1, 5, 7, 3, 0, 0], [2, 9, 4, 8, 6, 1]], jnp.int32)
PATH = "encoder/layer"


def _models(**fields):
  return (bert.BertClassifier(**TINY, num_classes=3, **fields),
          bert.BertClassifier(**TINY, num_classes=3, scan_layers=True,
                              **fields))


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


def test_scan_layers_is_a_shared_field_off_by_default():
  assert not bert.BertClassifier().scan_layers
  assert not bert.BertEncoder().scan_layers
  fields = bert.BertClassifier(**TINY, scan_layers=True).encoder_fields()
  assert fields["scan_layers"] is True
  assert models.get_model("bert", **TINY, scan_layers=True).scan_layers
  params = unbox(jax.eval_shape(bert.BertClassifier(**TINY).init,
                                jax.random.key(0), TOKENS)["params"])
  assert sorted(params["encoder"]) == ["embeddings", "layer_0", "layer_1",
                                       "layer_2", "pooler"]


def test_scanned_params_are_the_unrolled_ones_stacked():
  plain, scanned = _models(num_prompts=2)
  params = _init(plain)
  stacked = stacking.stack(params, PATH)
  got = unbox(jax.eval_shape(scanned.init, jax.random.key(0),
                             TOKENS)["params"])
  assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, stacked)
  assert got["encoder"]["layer"]["attention"]["query"]["kernel"].shape == (
      3, 16, 16)
  for i in range(3):  # Layer i of layer_<i> is layer[i].
    jax.tree.map(lambda s, p, i=i: np.testing.assert_array_equal(s[i], p),
                 stacked["encoder"]["layer"], params["encoder"][f"layer_{i}"])


@pytest.mark.parametrize("fields", [
    dict(), dict(pooling="pooler"), dict(pooling="cls", num_prompts=3),
    dict(num_prompts=2), dict(instruction_ids=(4, 7))])
def test_scanned_classifier_computes_what_the_unrolled_one_computes(fields):
  plain, scanned = _models(**fields)
  params = _init(plain)
  stacked = stacking.stack(params, PATH)
  mask = TOKENS != 0
  for kwargs in (dict(), dict(attention_mask=mask.at[1, 5].set(False))):
    _close(scanned.apply({"params": stacked}, TOKENS, **kwargs),
           plain.apply({"params": params}, TOKENS, **kwargs))


def test_scanned_encoder_outputs_equal_the_unrolled_ones():
  plain = bert.BertEncoder(**TINY)
  scanned = bert.BertEncoder(**TINY, scan_layers=True)
  params = _init(plain)
  prefix = jax.random.normal(jax.random.key(3), (2, 16))
  out = plain.apply({"params": params}, TOKENS, prefix_embeds=prefix)
  got = scanned.apply({"params": stacking.stack(params, "layer")}, TOKENS,
                      prefix_embeds=prefix)
  _close(got.hidden_states, out.hidden_states)
  _close(got.pooled, out.pooled)
  np.testing.assert_array_equal(got.mask, out.mask)
  assert got.num_prompts == out.num_prompts == 2


def test_scanned_gradients_are_the_unrolled_ones_stacked():
  plain, scanned = _models(num_prompts=2, pooling="pooler")
  params = _init(plain)
  labels = jnp.array([0, 2])

  def loss(model, p):
    logits = model.apply({"params": p}, TOKENS)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                         labels[:, None], -1))
  value, grads = jax.jit(jax.value_and_grad(
      functools.partial(loss, plain)))(params)
  value_s, grads_s = jax.jit(jax.value_and_grad(
      functools.partial(loss, scanned)))(stacking.stack(params, PATH))
  np.testing.assert_allclose(value_s, value, rtol=1e-6)
  expected = stacking.stack(grads, PATH)
  assert jax.tree.structure(grads_s) == jax.tree.structure(expected)
  # Gradients are O(1); the key biases' are rounding noise (exactly 0).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5,
                                                       atol=2e-6),
               expected, grads_s)


def test_scanned_training_with_dropout_runs():
  _, scanned = _models(num_prompts=2, dropout_rate=0.3,
                       attention_dropout_rate=0.3)
  params = unbox(scanned.init(jax.random.key(0), TOKENS)["params"])
  apply = jax.jit(functools.partial(scanned.apply, train=True))

  def train(seed):
    return apply({"params": params}, TOKENS,
                 rngs={"dropout": jax.random.key(seed)})
  logits = train(1)
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))
  np.testing.assert_array_equal(train(1), logits)  # Same key, same masks.
  assert not np.allclose(train(2), logits)
  assert not np.allclose(scanned.apply({"params": params}, TOKENS), logits)
  grads = jax.grad(lambda p: jnp.sum(scanned.apply(
      {"params": p}, TOKENS, train=True,
      rngs={"dropout": jax.random.key(1)})))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_scanned_logical_names_put_layers_first():
  plain, scanned = _models()
  names = partitioning.logical_names(
      jax.eval_shape(plain.init, jax.random.key(0), TOKENS)["params"])
  names_s = partitioning.logical_names(
      jax.eval_shape(scanned.init, jax.random.key(0), TOKENS)["params"])
  expected = jax.tree.map(lambda spec: P("layers", *spec),
                          names["encoder"]["layer_0"],
                          is_leaf=lambda x: isinstance(x, P))
  assert names_s["encoder"]["layer"] == expected
  assert names_s["encoder"]["layer"]["intermediate"]["kernel"] == P(
      "layers", "embed", "mlp")
  for key in ("embeddings", "pooler"):
    assert names_s["encoder"][key] == names["encoder"][key]
  assert names_s["head"] == names["head"]
  boxed = scanned.init(jax.random.key(0), TOKENS)["params"]
  leaf = boxed["encoder"]["layer"]["output"]["kernel"]
  assert isinstance(leaf, nn.LogicallyPartitioned)
  assert leaf.names == ("layers", "mlp", "embed")
  assert not np.allclose(leaf.value[0], leaf.value[1])  # Own key per layer.


def test_with_encoder_takes_a_stacked_import():
  plain, scanned = _models()
  encoder = _init(plain)["encoder"]  # As hf_bert imports: layer_<i>.
  boxed = scanned.init(jax.random.key(0), TOKENS)["params"]
  merged = bert.with_encoder(boxed, stacking.stack(encoder, "layer"))
  plain_merged = bert.with_encoder(
      plain.init(jax.random.key(0), TOKENS)["params"], encoder)
  jax.tree.map(np.testing.assert_array_equal, merged["head"],
               plain_merged["head"])  # Same init key, same head.
  _close(scanned.apply({"params": merged}, TOKENS),
         plain.apply({"params": plain_merged}, TOKENS))
  with pytest.raises(ValueError, match="do not fit"):
    bert.with_encoder(boxed, encoder)


def test_scanned_intermediates_stack_the_unrolled_ones():
  """Layer outputs are sown as 'hidden' (the layer's Dense is named 'output',
  the HF name), and read by their unrolled names on both layouts."""
  plain, scanned = _models(num_prompts=2, sow_attention=True)
  params = _init(plain)
  _, state = plain.apply({"params": params}, TOKENS,
                         mutable=["intermediates"])
  _, state_s = scanned.apply({"params": stacking.stack(params, PATH)},
                             TOKENS, mutable=["intermediates"])
  unrolled = state["intermediates"]["encoder"]
  stacked = state_s["intermediates"]["encoder"]["layer"]
  (outputs,) = stacked["hidden"]
  (maps,) = stacked["attention"]["attention_weights"]
  assert outputs.shape == (3, 2, 8, 16) and maps.shape == (3, 2, 2, 8, 8)
  for i in range(3):
    _close(outputs[i], unrolled[f"layer_{i}"]["hidden"][0])
    _close(features.lookup(state_s["intermediates"], f"encoder/layer_{i}/hidden"),
           features.lookup(state["intermediates"], f"encoder/layer_{i}/hidden"))
    _close(maps[i], unrolled[f"layer_{i}"]["attention"]["attention_weights"][0])


@pytest.mark.skipif(
    importlib.util.find_spec(hf_bert.MINILM_PACKAGE) is None,
    reason=f"all-MiniLM-L6-v2 not installed: `{hf_bert.MINILM_INSTALL}`")
@pytest.mark.parametrize("layers", [(), (5, 1, 3)])
def test_hf_import_into_a_scanned_classifier(layers):
  """init_from='hf_bert:' (and init_layers) into scan_layers=True: the
  per-layer import, stacked; the two classifiers agree."""
  from kdjax.weights import pretrained  # pylint: disable=g-import-not-at-top
  fields = dict(hf_bert.load_config(hf_bert.minilm_dir()),
                num_layers=len(layers) or 6)
  fields.pop("add_pooler", None)
  tokens = jnp.asarray(np.random.default_rng(0).integers(
      1000, 2000, (2, 12)), jnp.int32)
  out = {}
  for scan in (False, True):
    model = bert.BertClassifier(**fields, num_classes=2, scan_layers=scan)
    params = unbox(model.init(jax.random.key(0), tokens)["params"])
    params = pretrained.load_pretrained(params, "hf_bert:", layers=layers)
    out[scan] = (params, model.apply({"params": params}, tokens))
  jax.tree.map(np.testing.assert_array_equal,
               stacking.stack(out[False][0]["encoder"], "layer"),
               out[True][0]["encoder"])
  _close(out[True][1], out[False][1])
  full = hf_bert.load_params(hf_bert.minilm_dir(),
                             hf_bert.load_config(hf_bert.minilm_dir()))
  for k, i in enumerate(layers or range(6)):
    jax.tree.map(np.testing.assert_array_equal,
                 out[False][0]["encoder"][f"layer_{k}"], full[f"layer_{i}"])
