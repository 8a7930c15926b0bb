"""Config validation: each mistake fails before any compile, naming field, value, allowed."""

from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from kdjax import validation
from kdjax.core import config as config_lib
from conftest import load_config


def _config(**changes):
  config = load_config("fashion_mnist")
  return config_lib.set_fields(config, changes)


@pytest.mark.parametrize("changes,message", [
    ({"student.train.batch_size": 100},
     r"config\.student\.train\.batch_size=100 is invalid: must be a positive "
     r"multiple of device count \(8\)"),
    ({"student.train.batch_size": 64, "student.train.grad_accum_steps": 16},
     r"batch_size=64 .* device count \(8\) x grad_accum_steps \(16\) = 128"),
    # A sharded mesh splits the batch over data x fsdp only.
    ({"student.train.batch_size": 6, "parallel.mesh.data": 2,
      "parallel.mesh.fsdp": 2, "parallel.mesh.model": 2},
     r"batch_size=6 .* data=2 x fsdp=2 \(4\) x grad_accum_steps \(1\) = 4"),
    ({"parallel.mesh.data": 3}, r"data x fsdp x model = 3, but there are 8"),
    ({"parallel.mesh.model": 2, "parallel.backend": "pmap"},
     r"pmap runs the replicated layout only"),
    ({"parallel.rules": (("batch", "tensor"),)}, r"names mesh axes \['tensor'\]"),
    ({"distill.alpha": 1.5}, r"config\.distill\.alpha=1\.5 is invalid: must be in \[0, 1\]"),
    ({"distill.alpha": -0.1}, r"distill\.alpha=-0\.1"),
    ({"distill.temperature": 0.0}, r"config\.distill\.temperature=0\.0 is invalid: must be > 0"),
    ({"distill.temperature": -2.0}, r"temperature=-2\.0"),
    ({"student.model.name": "resnet9000"},
     r"config\.student\.model\.name='resnet9000' is invalid: allowed: \[.*'cnn'"),
    ({"teacher.model.name": "vit"}, r"config\.teacher\.model\.name='vit'"),
    ({"distill.hard_labels": "oracle"},
     r"config\.distill\.hard_labels='oracle' is invalid: allowed: \('dataset', 'teacher'\)"),
    ({"mode": "train"}, r"config\.mode='train' is invalid: allowed: \('teacher'"),
    ({"parallel.backend": "xmap"}, r"config\.parallel\.backend='xmap'"),
    ({"student.train.optimizer": "lion"}, r"config\.student\.train\.optimizer='lion'"),
    ({"data.train_fraction": 0.0}, r"config\.data\.train_fraction=0\.0"),
    ({"checkpoint.trainable_only": True},
     r"checkpoint\.trainable_only=True is invalid: a teacher run with every "
     r"leaf trained has nothing to leave out"),
    ({"distill.terms": (dict(name="kld", weight=1.0),)},
     r"config\.distill\.terms\[0\]\.name='kld' is invalid: allowed: \[.*'jsd'"),
    ({"distill.terms": (dict(name="topk_kl", weight=1.0),)},
     r"config\.distill\.terms\[0\]\.k=None is invalid: topk_kl keeps"),
    ({"distill.terms": (dict(name="topk_kl", weight=1.0, k=0),)},
     r"config\.distill\.terms\[0\]\.k=0 is invalid"),
    ({"distill.terms": (dict(name="mse", weight=1.0),),
      "distill.extra_teachers": (dict(checkpoint_dir="t2", model={},
                                      weight=1.0),)},
     r"terms\[0\]\.name='mse' is invalid: matches raw logits.*combine='sum'"),
])
def test_bad_fields_are_named(changes, message, tmp_path):
  with pytest.raises(config_lib.ConfigError, match=message):
    validation.validate(_config(**changes), str(tmp_path))


def test_a_sharded_batch_needs_only_data_x_fsdp_shards(tmp_path):
  config = _config(**{"mode": "scratch", "student.train.batch_size": 4,
                      "parallel.mesh.data": 2, "parallel.mesh.fsdp": 2,
                      "parallel.mesh.model": 2})
  validation.validate(config, str(tmp_path))  # 4 rows over data x fsdp = 4.


def test_unknown_model_field_is_named(tmp_path):
  config = _config()
  with config.unlocked():
    config.student.model.hidden_sizes = (3,)
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.student\.model: .*hidden_sizes"):
    validation.validate(config, str(tmp_path))


def test_class_counts_that_disagree(tmp_path):
  config = _config()
  with config.unlocked():
    config.student.model.num_classes = 7
  with pytest.raises(config_lib.ConfigError,
                     match=r"student\.model\.num_classes=7 disagrees with "
                           r"config\.data\.num_classes=10"):
    validation.validate(config, str(tmp_path))


def test_missing_teacher_checkpoint(tmp_path):
  config = _config(mode="distill",
                   **{"teacher.checkpoint_dir": str(tmp_path / "nope")})
  with pytest.raises(config_lib.ConfigError,
                     match=r"teacher\.checkpoint_dir=.*nope.* no teacher checkpoint"):
    validation.validate(config, str(tmp_path))


def _mismatched_teacher_config(digits_config, teacher_dir):
  """A distill config whose teacher.model differs from the checkpoint's:
  caught by the last check validate() makes (check_checkpoint_model)."""
  digits_config.mode = "distill"
  digits_config.teacher.checkpoint_dir = teacher_dir
  digits_config.teacher.model.dense_features = 99
  return digits_config


MISMATCH = (r"does not match config\.teacher\.model: "
            r"dense_features: checkpoint has 128, config has 99")


def test_teacher_checkpoint_of_another_model_is_refused(digits_config,
                                                        digits_teacher,
                                                        tmp_path):
  with pytest.raises(config_lib.ConfigError, match=MISMATCH):
    validation.validate(
        _mismatched_teacher_config(digits_config, digits_teacher),
        str(tmp_path))


def test_validation_compiles_nothing(digits_config, digits_teacher, tmp_path,
                                     monkeypatch):
  """The last error validate() detects still comes before any XLA compile.

  Counted two ways: jax.jit is never called, and no compile (of a jit or of
  an eager op) is reported to jax.monitoring, with the compile caches cleared
  first so that a cached op would compile again.
  """
  compiles = []

  def on_event(name, *args, **kwargs):
    del args, kwargs
    if name.startswith("/jax/core/compile/"):
      compiles.append(name)

  config = _mismatched_teacher_config(digits_config, digits_teacher)
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    jax.jit(lambda x: x * 2.0 + 1.0)(jnp.arange(3.0)).block_until_ready()
    assert compiles, "jax.monitoring reports no compile; the check is blind."
    compiles.clear()
    jax.clear_caches()  # An op compiled earlier in the session would not show.

    def no_jit(*a, **k):
      raise AssertionError("validate() called jax.jit")
    with monkeypatch.context() as patch:
      patch.setattr(jax, "jit", no_jit)
      with pytest.raises(config_lib.ConfigError, match=MISMATCH):
        validation.validate(config, str(tmp_path))
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert not compiles, f"validate() compiled: {compiles}"


def test_shipped_configs_validate(tmp_path):
  for config in (load_config("fashion_mnist"),
                 load_config("fashion_mnist", "smoke"), load_config("digits"),
                 load_config("digits", "tiny")):
    validation.validate(config, str(tmp_path))
  with pytest.raises(ValueError, match="Unknown preset 'fast'"):
    load_config("fashion_mnist", "fast")


def test_pmap_backend_with_several_processes_is_refused(digits_config,
                                                        tmp_path):
  digits_config.mode = "teacher"
  digits_config.parallel.backend = "pmap"
  with mock.patch.object(jax, "process_count", lambda: 2):
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.parallel.backend='pmap'.*use 'shard_map'"):
      validation.validate(digits_config, str(tmp_path))
