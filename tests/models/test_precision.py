"""The precision policy reaches every model: with compute dtype bfloat16
every matmul (dot_general, convolution) of the forward AND backward pass
takes bfloat16 inputs, while parameters, logits, the distillation loss and
its gradient stay float32; in float32 every matmul is float32 (so the
check can tell). Read from the jaxpr: XLA:CPU may change dtypes after
compilation, the program kdjax asks for is what is checked. (The loss curve
of a short real run in bfloat16 against float32:
tests/e2e/test_precision_run.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.distill import losses
from kdjax.models import partitioning
from kdjax.weights import specs

IMAGES = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
TOKENS = np.array([[1, 5, 7, 3, 0, 0], [2, 4, 6, 8, 9, 3]], np.int32)
# name -> (model fields, inputs, class logits?): tiny, every layer kind.
MODELS = {
    "mlp": (dict(hidden=(16,), num_classes=3), IMAGES),
    "cnn": (dict(channels=(4,), convs_per_stage=1, dense_features=8,
                 num_classes=3), IMAGES),
    "lstm": (dict(vocab_size=20, embed_dim=8, hidden_size=8,
                  dense_features=8, num_classes=3), TOKENS),
    "transformer": (dict(vocab_size=20, max_length=8, width=8, num_layers=1,
                         num_heads=2, mlp_dim=16, num_classes=3), TOKENS),
    "bert": (dict(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2,
                  intermediate_size=16, max_position_embeddings=16,
                  num_classes=3, num_prompts=2), TOKENS),
    "gpt": (dict(vocab_size=20, width=8, num_layers=1, num_heads=2,
                 max_length=8), TOKENS),
    "llama": (dict(vocab_size=20, width=8, num_layers=1, num_heads=2,
                   num_kv_heads=1, head_dim=4, mlp_dim=16, max_length=8),
              TOKENS),
}
MATMULS = ("dot_general", "conv_general_dilated")


def _sub_jaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def matmul_input_dtypes(jaxpr) -> list[tuple[str, ...]]:
  """The input dtypes of every matmul in a jaxpr, nested ones included
  (scan, pjit, remat, custom_vjp bodies)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in MATMULS:
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for param in eqn.params.values():
      for sub in _sub_jaxprs(param):
        found.extend(matmul_input_dtypes(sub))
  return found


def _setup(name, compute):
  """(model, params' shapes, inputs, distillation loss(params, teacher
  logits), the teacher logits' shape)."""
  fields, inputs = MODELS[name]
  model = specs.model_from_spec(dict(fields, name=name, dtype=compute))
  # Shapes and dtypes are all the jaxpr needs: nothing is computed.
  params = partitioning.unbox(
      jax.eval_shape(model.init, jax.random.key(0), inputs)["params"])
  forward = lambda p: model.apply({"params": p}, inputs)
  teacher_logits = jax.ShapeDtypeStruct(
      jax.eval_shape(forward, params).shape, jnp.float32)

  def loss(p, teacher_logits):
    return jnp.mean(losses.forward_kl(forward(p), teacher_logits,
                                      temperature=2.0))
  return model, params, inputs, loss, teacher_logits


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bfloat16_compute_reaches_every_matmul_and_the_loss_stays_float32(
    name):
  for compute in ("bfloat16", "float32"):
    model, params, inputs, loss, teacher_logits = _setup(name, compute)
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"float32"}
    logits = jax.eval_shape(lambda p: model.apply({"params": p}, inputs),
                            params)
    assert logits.dtype == jnp.float32, (name, compute)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params, teacher_logits)
    dtypes = matmul_input_dtypes(jaxpr.jaxpr)
    assert dtypes, name
    wanted = {(compute,) * len(d) for d in dtypes}
    assert set(dtypes) <= wanted, (name, compute, sorted(set(dtypes)))
    value, grads = jax.eval_shape(jax.value_and_grad(loss), params,
                                  teacher_logits)
    assert value.dtype == jnp.float32
    assert {str(g.dtype) for g in jax.tree.leaves(grads)} == {"float32"}


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_bfloat16_language_models_return_unrounded_float32_logits(name):
  """The output head accumulates in float32 and its logits stay float32:
  logits rounded to bfloat16 (~0.1 off at logit scale 7) would reach every
  eval loss, perplexity and report. Rounded logits are all bfloat16 values;
  float32 accumulation gives almost none."""
  fields, inputs = MODELS[name]
  model = specs.model_from_spec(dict(fields, name=name, dtype="bfloat16"))
  params = partitioning.unbox(
      model.init(jax.random.key(0), inputs)["params"])
  params = jax.tree.map(lambda p: 4 * p, params)  # Logits well above 1.
  logits = np.asarray(model.apply({"params": params}, inputs))
  assert logits.dtype == np.float32
  as_bfloat16 = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16),
                           np.float32)
  assert np.mean(as_bfloat16 == logits) < 0.1, name
  assert np.abs(logits).max() > 1.0  # Rounding would be visible.
