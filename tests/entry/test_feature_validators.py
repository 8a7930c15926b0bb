"""The top-level validator calls each feature's own check (kdjax.validation).

Each case breaks one section and expects the one-line ConfigError naming it,
before anything is compiled or trained.
"""

import pytest

from conftest import load_config
from kdjax import validation
from kdjax.core import config as config_lib


def test_a_config_not_built_on_the_defaults_is_refused_naming_the_fields(
    tmp_path):
  config = load_config("digits", "tiny")
  validation.validate(config, str(tmp_path))  # Complete: passes.
  with config.unlocked():
    del config.distill["combine"]
    del config.cache["k"]
  with pytest.raises(config_lib.ConfigError,
                     match=r"lacks field\(s\) cache.k, distill.combine\. "
                           r"Build it on kdjax.core.defaults"):
    validation.validate(config, str(tmp_path))


def test_model_fields_are_the_models_own_and_not_compared(tmp_path):
  config = load_config("digits", "tiny")
  config.student.model = {"name": "mlp", "hidden": (16,)}  # No dropout_rate.
  validation.validate(config, str(tmp_path))


def test_a_pretrained_teacher_is_not_trained(tmp_path):
  config = load_config("shakespeare_smollm2", "smoke")  # SmolLM2, imported.
  assert config.teacher.pretrained
  config.mode = "distill"
  validation.validate(config, str(tmp_path / "run"))  # Distilling from it.
  config.mode = "teacher"
  with pytest.raises(config_lib.ConfigError,
                     match="nothing to train in mode='teacher'"):
    validation.validate(config, str(tmp_path / "run"))


def test_generate_text_prompt_length_is_checked_before_the_run(tmp_path):
  config = load_config("shakespeare_smollm2", "smoke", resolve=False)
  config_lib.set_fields(config, {"mode": "generate_text",
                                 "seqkd.prompt_length": 0})
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.seqkd.prompt_length=0 is invalid: must "
                           r"be in \[1, config.data.seq_length=\d+\]"):
    validation.validate(config, str(tmp_path))
