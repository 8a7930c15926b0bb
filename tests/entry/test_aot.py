"""mode=aot_check: the training steps compiled for a Cloud TPU topology on CPU."""

import pytest

from kdjax import aot, modes
from kdjax import validation
from kdjax.core import config as config_lib


def _aot_config(config, topology="v5e:2x2", **changes):
  config.mode = "aot_check"
  config.aot.topology = topology
  return config_lib.set_fields(config, changes)


def _needs_libtpu():
  pytest.importorskip(
      "libtpu", reason='libtpu is not installed: pip install "jax[tpu]==0.10.2"')


def test_topology_names_and_validation_before_any_compile(digits_config):
  assert aot.parse_topology("v5e:2x4").devices == 8
  assert aot.parse_topology("v4:2x2x1").devices == 8  # 2 cores per v4 chip.
  assert aot.parse_topology("v5p:2x2x1").devices == 4
  for bad in ("v5e", "v5litepod-8", "v9:2x2", "v5e:2"):
    with pytest.raises(ValueError, match="GENERATION:SHAPE"):
      aot.parse_topology(bad)
  config = _aot_config(digits_config, topology="")
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.aot.topology=''.*needs a Cloud TPU topology"):
    validation.validate(config, "")
  config.aot.topology = "v5e:2x4"
  config.student.train.batch_size = 36  # Not a multiple of 8 devices.
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.student.train.batch_size=36 .*device count "
                           r"\(8\)"):
    validation.validate(config, "")
  config.student.train.batch_size = 64
  config.aot.steps = "distill,serve"
  with pytest.raises(config_lib.ConfigError, match="config.aot.steps"):
    validation.validate(config, "")
  config.aot.steps = "auto"
  validation.validate(config, "")  # No workdir needed.
  assert aot.aot_steps(config) == ["teacher", "distill"]
  config.teacher.checkpoint_dir = "/some/imported/teacher"
  assert aot.aot_steps(config) == ["distill"]


def test_digits_compiles_for_v5e_2x2_and_prints_the_table(digits_config,
                                                          capsys):
  _needs_libtpu()
  result = modes.run(_aot_config(digits_config), "")
  table = capsys.readouterr().out
  reports = {r["mode"]: r for r in result["aot"]}
  assert set(reports) == {"teacher", "distill"}
  for r in reports.values():
    assert r["devices"] == 4 and r["batch_size"] == 64
    # A digits-sized step may fuse every intermediate on TPU: temporaries
    # can be 0 (they are since the loss stopped materialising log-softmaxes).
    assert 0 <= r["temporaries"] and 0 < r["arguments"] < 16 * aot.GIB
    assert r["flops"] > 0
  distill = reports["distill"]
  assert distill["teacher_bytes"] > distill["state_bytes"]  # CNN vs tiny MLP.
  assert 0.5 < distill["teacher_flops"] / distill["flops"] < 1.0
  for text in ("teacher step on v5e:2x2", "distill step on v5e:2x2",
               "teacher params (replicated)", "temporaries", "-> fits",
               "FLOPs per device", "teachers' forward",
               "197 TFLOP/s bf16 per device", "implied step time"):
    assert text in table


def test_a_config_that_does_not_fit_is_refused_with_the_table(digits_config):
  _needs_libtpu()
  config = _aot_config(digits_config, **{"aot.steps": "distill",
                                         "aot.hbm_limit_gib": 1e-4})
  with pytest.raises(aot.AotDoesNotFitError,
                     match=r"(?s)distill step\(s\) would not fit on v5e:2x2.*"
                           r"DOES NOT FIT.*batch_size"):
    modes.run(config, "")
  # A student of 3 x 4 GiB (params, Adam moments): the TPU compiler itself
  # runs out of HBM, and the refusal carries its message.
  config.aot.hbm_limit_gib = 0.0
  config.student.model.hidden = (32768, 32768)
  with pytest.raises(aot.AotDoesNotFitError,
                     match=r"(?s)student train state +12.0 GiB.*ran out of "
                           r"memory.*DOES NOT FIT"):
    modes.run(config, "")


# The compiled program == the step train.train runs (two real runs):
# tests/e2e/test_aot_e2e.py.
