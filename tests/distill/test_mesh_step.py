"""The sharded layout: one step function under jit with shardings (GSPMD)
gives the same student on every ('data', 'fsdp', 'model') mesh as on one
device.

A tiny Llama teacher -> Llama student through the chunked token loss, trained
with SGD (Adam would hide a wrong gradient scale: see test_step.py). 8
simulated CPU devices (tests/conftest.py).
"""

import functools
import re

import jax
import numpy as np
import optax
import pytest

from kdjax.core import defaults
from kdjax.distill import mesh as mesh_lib
from kdjax.distill import objectives, parallel, step
from kdjax.models.llama import Llama
from kdjax.weights import params as params_lib

VOCAB, LENGTH, BATCH, STEPS = 64, 8, 16, 2
RULES = defaults.PARTITION_RULES
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1), (1, 1, 8)]
# Reductions reorder across meshes (and XLA:CPU's dots differ by layout):
# float32 rounding, not a wrong gradient (x2 fails by ~1e-2).
RTOL, ATOL = 2e-4, 2e-6

TEACHER = Llama(vocab_size=VOCAB, width=32, num_layers=2, num_heads=8,
                num_kv_heads=8, head_dim=4, mlp_dim=64, max_length=LENGTH,
                tie_embeddings=False)
STUDENT = Llama(vocab_size=VOCAB, width=16, num_layers=1, num_heads=8,
                num_kv_heads=8, head_dim=2, mlp_dim=32, max_length=LENGTH)


def _data_config():
  return defaults.lm_data(seq_length=LENGTH)


def _batches():
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    tokens = rng.integers(0, VOCAB, (BATCH, LENGTH + 1)).astype(np.int32)
    mask = (rng.random((BATCH, LENGTH)) > 0.2).astype(np.float32)
    out.append({"inputs": tokens[:, :-1], "labels": tokens[:, 1:],
                "mask": mask})
  return out


def _objective():
  distill = defaults.get_config().distill
  distill.update(alpha=0.6, temperature=2.0)
  return objectives.distillation(distill, num_teachers=1, total_steps=10)


def _step_fn(tx):
  return functools.partial(
      step.train_step, student_apply=step.make_lm_apply_fn(STUDENT),
      teacher_applies=(step.make_lm_apply_fn(TEACHER),),
      objective=_objective(), tx=tx, axis=parallel.DataAxis("shard_map"),
      token_chunk_size=4)


def _params():
  data = _data_config()
  teacher = params_lib.init(TEACHER, data, 1)
  teacher = jax.tree.map(lambda p: p * 4.0, teacher)  # Away from its init.
  return teacher, params_lib.init(STUDENT, data, 2)


def _run_one_device(tx):
  teacher, student = _params()
  run = jax.jit(_step_fn(tx))
  state = step.create_train_state(student, tx, jax.random.key(0))
  for batch in _batches():
    state, metrics = run(state, batch, (teacher,))
  return state, metrics


def _run_mesh(shape, tx, devices=None):
  data = _data_config()
  teacher, student = _params()
  mesh = mesh_lib.make(dict(zip(mesh_lib.AXES, shape)), devices)
  student_sh = mesh_lib.param_shardings(
      params_lib.logical_specs(STUDENT, data), mesh, RULES)
  teacher_sh = mesh_lib.param_shardings(
      params_lib.logical_specs(TEACHER, data), mesh, RULES)
  state = step.create_train_state(student, tx, jax.random.key(0))
  state_sh = mesh_lib.state_shardings(state, student_sh, student, mesh)
  run = parallel.jit_sharded(_step_fn(tx), mesh, RULES,
                             state_shardings=state_sh,
                             frozen_shardings=(teacher_sh,))
  state = parallel.place(state, state_sh)
  frozen = (parallel.place(teacher, teacher_sh),)
  for batch in _batches():
    state, metrics = run(state, batch, frozen)
  return state, metrics, run, frozen


@pytest.fixture(scope="module")
def reference():
  return _run_one_device(optax.sgd(0.5))


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL), a, b)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_every_mesh_trains_the_same_student(shape, reference):
  ref_state, ref_metrics = reference
  state, metrics, _, _ = _run_mesh(shape, optax.sgd(0.5))
  _assert_close(state.params, ref_state.params)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  assert int(state.step) == STEPS


def test_parameters_really_are_sharded():
  state, _, _, frozen = _run_mesh((2, 2, 2), optax.adam(1e-3))
  query = state.params["layers_0"]["attention"]["query"]["kernel"]
  # [embed, heads, head_dim] = [16, 8, 2] over (fsdp, model): 8 x 4 pieces.
  assert query.sharding.spec[:2] == ("fsdp", "model")
  assert query.addressable_shards[0].data.shape == (8, 4, 2)
  mu = state.opt_state[0].mu[0]["layers_0"]["attention"]["query"]["kernel"]
  assert mu.sharding == query.sharding  # Optimizer state sharded like it.
  head = frozen[0]["lm_head"]["kernel"]  # [32, 64] over (fsdp, model).
  assert head.addressable_shards[0].data.shape == (16, 32)


def test_teacher_logits_are_equal_across_meshes():
  data = _data_config()
  teacher, _ = _params()
  tokens = _batches()[0]["inputs"]
  expected = TEACHER.apply({"params": teacher}, tokens)
  for shape in MESHES:
    mesh = mesh_lib.make(dict(zip(mesh_lib.AXES, shape)))
    sh = mesh_lib.param_shardings(params_lib.logical_specs(TEACHER, data),
                                  mesh, RULES)
    with mesh_lib.active(mesh, RULES):
      logits = jax.jit(lambda p, x: TEACHER.apply({"params": p}, x))(
          parallel.place(teacher, sh),
          parallel.place_batch(tokens, mesh_lib.batch_sharding(mesh, RULES)))
    # Vocabulary-sharded logits stay sharded (no gather inside the model).
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_the_chunked_loss_never_gathers_the_vocabulary():
  """With the vocabulary over 'model' the log-sum-exp reduces across its
  shards: no [batch, length, vocab] logits and no whole LM head on a device."""
  _, _, run, frozen = _run_mesh((1, 1, 8), optax.sgd(0.5))
  _, student = _params()
  tx = optax.sgd(0.5)
  hlo = run.lower(
      jax.eval_shape(lambda: step.create_train_state(
          student, tx, jax.random.key(0))),
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=run.batch_sharding), _batches()[0]),
      frozen).compile().as_text()
  gathered = [re.search(r"= \S+\[([\d,]*)\]", line).group(1)
              for line in hlo.splitlines()
              if re.search(r"all-gather(-start)?\(", line)]
  assert gathered  # The check sees collectives at all (attention's).
  # Neither logits [batch, chunk, vocab] nor an LM head [width, vocab] is
  # gathered (a replicated logits constraint makes XLA gather both heads).
  whole_vocab = [shape for shape in gathered if shape.endswith(f",{VOCAB}")]
  assert not whole_vocab, whole_vocab


def test_heads_the_model_axis_does_not_divide_are_refused():
  model = Llama(vocab_size=VOCAB, width=18, num_layers=1, num_heads=9,
                num_kv_heads=3, head_dim=2, mlp_dim=32, max_length=LENGTH)
  data = _data_config()
  mesh = mesh_lib.make({"data": 4, "model": 2})
  shardings = mesh_lib.param_shardings(
      params_lib.logical_specs(model, data), mesh, RULES)
  with pytest.raises(ValueError, match=r"query/kernel dim 1 = 9 over model = 2"):
    mesh_lib.check_divisible(params_lib.abstract(model, data), shardings,
                             "config.teacher.model")


@pytest.mark.parametrize("given, message", [
    ({"data": 3, "fsdp": 1, "model": 1}, "= 3, but there are 8 devices"),
    ({"data": -1, "fsdp": 3, "model": 1}, "not divisible by 3"),
    ({"data": -1, "fsdp": -1}, "at most one may be -1"),
    ({"data": 8, "tensor": 1}, "unknown axes"),
])
def test_mesh_sizes_are_checked(given, message):
  from kdjax.core.config import ConfigError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=message):
    mesh_lib.sizes(given, 8)
  assert mesh_lib.sizes({"data": -1, "model": 2}, 8) == {
      "data": 4, "fsdp": 1, "model": 2}


def test_the_default_mesh_program_has_only_the_replicated_collectives():
  """All devices on 'data': the per-device program of the replicated layout,
  whose only collectives are the all-reduces of gradients and metrics. The
  logical names and activation constraints add none (no rules in scope)."""
  tx = optax.adam(1e-3)
  teacher, student = _params()
  mesh = parallel.make_mesh()
  program = parallel.jit_over_mesh(_step_fn(tx), mesh)
  state = parallel.replicate(
      step.create_train_state(student, tx, jax.random.key(0)), mesh)
  hlo = program.lower(state, parallel.shard_batch(_batches()[0], mesh),
                      parallel.replicate((teacher,), mesh)).compile().as_text()
  ops = set(re.findall(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|"
                       r"collective-permute)(?:-start)?\(", hlo))
  assert ops == {"all-reduce"}
