"""kdjax.distill.on_policy: the lmbda draw, the checks, the objective for
the student's own samples, and a teacher with padded vocabulary rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import validation
from kdjax.core import defaults
from kdjax.core.config import ConfigError
from kdjax.data import prompts
from kdjax.distill import objectives, on_policy, parallel, step
from kdjax.models.llama import Llama
from kdjax.weights import params as params_lib
from kdjax.weights import pretrained
from conftest import load_config


def _settings(**kwargs):
  fields = dict(lmbda=0.5, seq_kd=False, loss="jsd", beta=0.5,
                temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=4,
                log_rollouts_every=0, discount=0.0)
  fields.update(kwargs)
  return on_policy.Settings(**fields)


def test_the_lmbda_draw_is_a_fixed_coin_per_step():
  settings = _settings(lmbda=0.3)
  draws = [on_policy.source_of_step(settings, 0, s) for s in range(4000)]
  assert draws == [on_policy.source_of_step(settings, 0, s)
                   for s in range(4000)]
  share = draws.count(on_policy.STUDENT) / len(draws)
  assert abs(share - 0.3) < 0.03
  assert set(draws) == {on_policy.STUDENT, on_policy.DATA}
  other_seed = [on_policy.source_of_step(settings, 1, s) for s in range(4000)]
  assert other_seed != draws
  seq_kd = _settings(lmbda=0.3, seq_kd=True)
  assert {on_policy.source_of_step(seq_kd, 0, s) for s in range(100)} == {
      on_policy.STUDENT, on_policy.TEACHER}
  assert {on_policy.source_of_step(_settings(lmbda=0.0), 0, s)
          for s in range(100)} == {on_policy.DATA}
  assert {on_policy.source_of_step(_settings(lmbda=1.0), 0, s)
          for s in range(100)} == {on_policy.STUDENT}


def test_example_keys_depend_on_seed_step_and_index_only():
  keys = on_policy.example_keys(0, jnp.int32(5), jnp.arange(4))
  again = on_policy.example_keys(0, jnp.int32(5), jnp.arange(2, 4))
  np.testing.assert_array_equal(jax.random.key_data(keys[2:]),
                                jax.random.key_data(again))
  for other in (on_policy.example_keys(1, jnp.int32(5), jnp.arange(4)),
                on_policy.example_keys(0, jnp.int32(6), jnp.arange(4))):
    assert not np.array_equal(jax.random.key_data(other),
                              jax.random.key_data(keys))


def test_no_cross_entropy_on_the_students_own_samples():
  config = load_config("on_policy_addition", "smoke")
  config.distill.on_policy.loss = ""  # distill.terms as they are: Hinton's.
  objective = objectives.distillation(on_policy.objective_config(config),
                                     num_teachers=1, total_steps=1)
  assert {t.name for t in objective.terms} == {"kl", "ce"}
  own = on_policy.without_self_imitation(objective)
  assert {t.name for t in own.terms} == {"kl"}
  config.distill.on_policy.loss = "jsd"
  gkd = objectives.distillation(on_policy.objective_config(config),
                                num_teachers=1, total_steps=1)
  assert [(t.name, dict(t.options)) for t in gkd.terms] == [
      ("jsd", {"beta": 0.5})]
  with pytest.raises(ValueError, match="only 'ce'"):
    on_policy.without_self_imitation(objectives.cross_entropy())


@pytest.mark.parametrize("field,value,match", [
    ("lmbda", 1.5, "lmbda"), ("loss", "nope", "loss"),
    ("beta", -0.1, "beta"), ("top_p", 0.0, "top_p"),
    ("max_new_tokens", 0, "max_new_tokens"),
    ("max_new_tokens", 9, "max_completion_length"),
    ("discount", 1.5, "discount"), ("discount", 0.5, "future costs"),
    ("loss", "topk_kl", "loss"),  # Needs a k the on-policy settings lack.
])
def test_bad_settings_are_refused_by_name(field, value, match, tmp_path):
  config = load_config("on_policy_addition", "smoke")
  config.data.data_dir = str(tmp_path)
  config.mode = "distill"
  config.distill.on_policy[field] = value
  with pytest.raises(ConfigError, match=match):
    validation.validate_prompts(config)


@pytest.mark.parametrize("sampler", [dict(temperature=0.9), dict(top_k=5),
                                     dict(top_p=0.9)])
def test_sampled_reverse_kl_needs_samples_from_the_student_itself(
    sampler, tmp_path):
  """Tokens drawn at another temperature, or from a truncated q, make the
  one-sample estimate biased for KL(q || p)."""
  config = load_config("on_policy_addition", "smoke")
  config.data.data_dir = str(tmp_path)
  config.mode = "distill"
  config.distill.on_policy.update(lmbda=1.0, loss="sampled_reverse_kl",
                                  temperature=1.0, top_k=0, top_p=1.0)
  validation.validate_prompts(config)  # Sampling from q itself: fine.
  config.distill.on_policy.update(sampler)
  with pytest.raises(ConfigError, match="drawn from q itself"):
    validation.validate_prompts(config)


def test_models_must_fit_the_rollouts_and_the_tokenizer(tmp_path):
  config = load_config("on_policy_addition", "smoke")
  config.data.data_dir = str(tmp_path)
  config.mode = "distill"
  validation.validate_prompts(config)  # The preset itself is fine.
  config.student.model.max_length = 10
  with pytest.raises(ConfigError, match="max_length"):
    validation.validate_prompts(config)
  config.student.model.max_length = 16
  config.student.model.vocab_size = 8
  with pytest.raises(ConfigError, match="tokenizer's 15 ids"):
    validation.validate_prompts(config)


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, monkeypatch):
  config = load_config("on_policy_addition", "smoke")
  config.data.data_dir = str(tmp_path)
  config.mode = "distill"
  other = prompts.write_char_tokenizer(str(tmp_path / "other"), "0123456789-=")
  monkeypatch.setattr(pretrained, "teacher_tokenizer_path", lambda c: other)
  with pytest.raises(ConfigError, match="share one tokenizer"):
    validation.validate_prompts(config)
  same = prompts.write_char_tokenizer(str(tmp_path / "same"), "0123456789+=")
  monkeypatch.setattr(pretrained, "teacher_tokenizer_path", lambda c: same)
  validation.validate_prompts(config)


def test_padded_teacher_vocabulary_rows_are_masked_out():
  """A teacher whose vocabulary is the student's plus padding rows (tied
  embeddings: extra rows never looked up) distills exactly as the same
  teacher cut to the student's vocabulary."""
  length, vocab, padded = 6, 16, 32
  teacher_fields = dict(width=32, num_layers=1, num_heads=4, num_kv_heads=4,
                        head_dim=0, mlp_dim=64, max_length=length)
  data = defaults.lm_data(seq_length=length)
  big = Llama(vocab_size=padded, **teacher_fields)
  big_params = jax.tree.map(lambda x: 4 * x, params_lib.init(big, data, 1))
  cut = Llama(vocab_size=vocab, **teacher_fields)
  cut_params = jax.tree.map(lambda x: x, big_params)
  cut_params["embed"] = {"embedding": big_params["embed"]["embedding"][:vocab]}
  student = Llama(vocab_size=vocab, **dict(teacher_fields, width=16,
                                           mlp_dim=32))
  student_params = params_lib.init(student, data, 2)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (4, length + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
  distill = defaults.get_config().distill
  distill.update(terms=({"name": "jsd", "weight": 1.0, "beta": 0.5},),
                 temperature=1.0)
  objective = objectives.distillation(distill, num_teachers=1, total_steps=1)
  tx = optax.sgd(0.5)
  out = {}
  for name, apply, params in (
      ("padded", step.make_lm_apply_fn(big, vocab_size=vocab), big_params),
      ("cut", step.make_lm_apply_fn(cut), cut_params)):
    run = jax.jit(functools.partial(
        step.train_step, student_apply=step.make_lm_apply_fn(student),
        teacher_applies=(apply,), objective=objective, tx=tx,
        axis=parallel.DataAxis("shard_map"), token_chunk_size=0))
    state = step.create_train_state(student_params, tx, jax.random.key(0))
    out[name] = run(state, batch, (params,))
  jax.tree.map(np.testing.assert_array_equal, out["padded"][0].params,
               out["cut"][0].params)
  assert float(out["padded"][1]["loss"]) > 0
  with pytest.raises(ValueError, match="vocabulary 32"):
    jax.jit(functools.partial(
        step.train_step, student_apply=step.make_lm_apply_fn(student),
        teacher_applies=(step.make_lm_apply_fn(big),), objective=objective,
        tx=tx, axis=parallel.DataAxis("shard_map"), token_chunk_size=0))(
            step.create_train_state(student_params, tx, jax.random.key(0)),
            batch, (big_params,))
