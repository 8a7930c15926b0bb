"""Logical axis names of GPT, BERT and the transformer classifier.

Every parameter carries one kdjax.models.partitioning name (or None) per
dimension; the residual stream and GPT's logits are constrained at block
boundaries. Under a mesh and rules the jitted forward pass computes what it
computes without them.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from kdjax.core import defaults
from kdjax.models import bert, gpt, partitioning, transformer

BERT_TINY = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                 intermediate_size=32, max_position_embeddings=8,
                 dropout_rate=0.0, attention_dropout_rate=0.0)
MODELS = {
    "gpt": lambda: gpt.GPT(vocab_size=50, width=32, num_layers=2,
                           num_heads=4, max_length=16),
    "bert": lambda: bert.BertClassifier(**BERT_TINY, num_classes=3),
    "bert_pooler": lambda: bert.BertClassifier(**BERT_TINY, num_classes=3,
                                               pooling="pooler"),
    "transformer": lambda: transformer.TransformerClassifier(
        num_classes=3, vocab_size=50, max_length=8, width=16, num_layers=2,
        num_heads=2, mlp_dim=32),
}
TOKENS = jnp.array([[1, 5, 7, 3, 0, 0], [2, 9, 4, 8, 6, 1],
                    [3, 3, 2, 0, 0, 0], [7, 1, 1, 4, 2, 9]], jnp.int32)
RULES = defaults.PARTITION_RULES  # MaxText-style, as runs use them.

_NORM = {"scale": ("norm",), "bias": ("norm",)}


def _dense(kernel):
  return {"kernel": kernel, "bias": kernel[1:]}


def _flat(tree, prefix=()):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, prefix + (key,)))
    else:
      out["/".join(prefix + (key,))] = value
  return out


GPT_BLOCK = {
    "ln_attention": _NORM,
    "qkv_kernel": ("embed", None, "heads", "head_dim"),
    "qkv_bias": (None, "heads", None, "head_dim"),
    "out_kernel": ("heads", "head_dim", "embed"),
    "out_bias": ("embed",),
    "ln_mlp": _NORM,
    "mlp_in": _dense(("embed", "mlp")),
    "mlp_out": _dense(("mlp", "embed")),
}
BERT_LAYER = {
    "attention": {"query": _dense(("embed", "heads")),
                  "key": _dense(("embed", "heads")),
                  "value": _dense(("embed", "heads")),
                  "output": _dense(("heads", "embed"))},
    "attention_norm": _NORM,
    "intermediate": _dense(("embed", "mlp")),
    "output": _dense(("mlp", "embed")),
    "output_norm": _NORM,
}
BERT_ENCODER = {
    "embeddings": {"word_embeddings": {"embedding": ("vocab", "embed")},
                   "position_embeddings": {"embedding": ("length", "embed")},
                   "token_type_embeddings": {"embedding": (None, "embed")},
                   "layer_norm": _NORM},
    "layer_N": BERT_LAYER,
    "pooler": _dense(("embed", None)),
}
TRANSFORMER_BLOCK = {
    "ln_attention": _NORM,
    "attention": {
        **{qkv: {"kernel": ("embed", "heads", "head_dim"),
                 "bias": ("heads", "head_dim")}
           for qkv in ("query", "key", "value")},
        "out": {"kernel": ("heads", "head_dim", "embed"), "bias": ("embed",)},
    },
    "ln_mlp": _NORM,
    "mlp_in": _dense(("embed", "mlp")),
    "mlp_out": _dense(("mlp", "embed")),
}
EXPECTED = {
    "gpt": _flat({"embed": {"embedding": ("vocab", "embed")},
                  "positions": ("length", "embed"),
                  "block_N": GPT_BLOCK,
                  "ln_final": _NORM}),
    "bert": _flat({"encoder": BERT_ENCODER,
                   "head": _dense(("embed", "classes"))}),
    "transformer": _flat({"embed": {"embedding": ("vocab", "embed")},
                          "positions": ("length", "embed"),
                          "block_N": TRANSFORMER_BLOCK,
                          "ln_final": _NORM,
                          "head": _dense(("embed", "classes"))}),
}
EXPECTED["bert_pooler"] = EXPECTED["bert"]


def _is_box(x):
  return isinstance(x, nn.LogicallyPartitioned)


def _boxed_init(name):
  model = MODELS[name]()
  return model, model.init(jax.random.key(0), TOKENS[:1])["params"]


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _leaves(boxed):
  """{'a/b/c': leaf}, the boxes (not their arrays) as leaves."""
  flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=_is_box)[0]
  return {_path(path): leaf for path, leaf in flat}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_has_one_known_name_per_dim(name):
  _, boxed = _boxed_init(name)
  leaves = _leaves(boxed)
  assert leaves
  for path, leaf in leaves.items():
    assert _is_box(leaf), f"{name}: {path} carries no logical axis names"
    assert len(leaf.names) == leaf.value.ndim, (path, leaf.names,
                                                leaf.value.shape)
    for axis in leaf.names:
      assert axis is None or axis in partitioning.PARAM_AXES, (path, axis)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_names(name):
  _, boxed = _boxed_init(name)
  got = {re.sub(r"(block|layer)_\d+", r"\1_N", path): leaf.names
         for path, leaf in _leaves(boxed).items()}
  assert got == EXPECTED[name]


def test_soft_prompt_is_the_only_leaf_the_bert_classifier_may_leave_unnamed():
  # The prompt's parameter belongs to prompt.SoftPrompt; if it is named, it
  # is (length, embed) like position rows.
  model = bert.BertClassifier(**BERT_TINY, num_classes=3, num_prompts=3)
  leaves = _leaves(model.init(jax.random.key(0), TOKENS[:1])["params"])
  prompt = leaves.pop("prompt/embedding")
  if _is_box(prompt):
    assert prompt.names == ("length", "embed")
  assert all(_is_box(leaf) for leaf in leaves.values())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unboxed_init_is_plain_arrays_of_the_same_tree(name):
  _, boxed = _boxed_init(name)
  plain = partitioning.unbox(boxed)
  assert not any(_is_box(x) for x in jax.tree.leaves(plain, is_leaf=_is_box))
  assert jax.tree.structure(plain) == jax.tree.structure(
      jax.tree.map(lambda b: b.value, boxed, is_leaf=_is_box))
  specs = partitioning.logical_names(boxed)
  assert jax.tree.structure(specs, is_leaf=lambda x: x is None) == (
      jax.tree.structure(plain))


def test_helpers_take_boxed_params():
  _, boxed = _boxed_init("gpt")
  np.testing.assert_array_equal(
      gpt.lm_head_kernel(boxed),
      partitioning.unbox(boxed)["embed"]["embedding"].T)
  _, params = _boxed_init("bert")
  encoder = jax.tree.map(lambda a: a + 1, partitioning.unbox(params["encoder"]))
  merged = bert.with_encoder(params, encoder)  # Boxed head, plain encoder.
  assert not any(_is_box(x) for x in jax.tree.leaves(merged, is_leaf=_is_box))
  assert set(merged) == {"encoder", "head"}
  jax.tree.map(np.testing.assert_array_equal, merged["encoder"], encoder)
  jax.tree.map(np.testing.assert_array_equal, merged["head"],
               partitioning.unbox(params["head"]))


def _apply(model, params, tokens):
  return model.apply({"params": params}, tokens)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_under_mesh_and_rules_is_unchanged(name, mesh_shape):
  model, boxed = _boxed_init(name)
  params = partitioning.unbox(boxed)  # Outside the mesh: no constraint.
  forward = jax.jit(_apply, static_argnums=0)
  expected = forward(model, params, TOKENS)

  size = int(np.prod(mesh_shape))
  mesh = Mesh(np.asarray(jax.devices()[:size]).reshape(mesh_shape),
              ("data", "fsdp", "model"))
  shardings = nn.logical_to_mesh_sharding(
      partitioning.logical_names(boxed), mesh, list(RULES))
  placed = jax.device_put(params, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    lowered = jax.jit(_apply, static_argnums=0).lower(model, placed, TOKENS)
    got = forward(model, placed, TOKENS)
  # The block-boundary constraints are in the program (not vacuous): one
  # after the embedding and at least one per block.
  num_blocks = 2
  assert lowered.as_text().count("sharding_constraint") >= 1 + num_blocks
  if mesh_shape == (1, 1, 1):
    np.testing.assert_array_equal(got, expected)
  else:  # Split reductions may sum in another order.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_init_and_boxed_apply_under_mesh_and_rules(name):
  # DenseGeneral (the transformer's attention) initialises its kernels flat:
  # a naive 3-name box would be constrained while still 2-D and fail here.
  model = MODELS[name]()
  # Jitted both times: eager and jitted random initializers may differ in
  # the last bit.
  boxed = jax.jit(model.init)(jax.random.key(0), TOKENS[:1])["params"]
  expected = jax.jit(_apply, static_argnums=0)(
      model, partitioning.unbox(boxed), TOKENS)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2),
              ("data", "fsdp", "model"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    inited = jax.jit(model.init)(jax.random.key(0), TOKENS[:1])["params"]
    got = jax.jit(_apply, static_argnums=0)(model, inited, TOKENS)
  assert (jax.tree.map(lambda b: b.names, inited, is_leaf=_is_box)
          == jax.tree.map(lambda b: b.names, boxed, is_leaf=_is_box))
  for path, leaf in _leaves(inited).items():
    np.testing.assert_array_equal(leaf.value, _leaves(boxed)[path].value,
                                  err_msg=path)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_without_rules_the_constraints_are_not_in_the_program():
  model, boxed = _boxed_init("gpt")
  text = jax.jit(_apply, static_argnums=0).lower(
      model, partitioning.unbox(boxed), TOKENS).as_text()
  assert "sharding_constraint" not in text
