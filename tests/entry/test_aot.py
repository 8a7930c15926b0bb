"""mode=aot_check: the training steps compiled for a Cloud TPU topology on CPU."""

import jax
import ml_collections
import numpy as np
import pytest

from kdjax import aot, modes
from kdjax import validation
from kdjax.core import config as config_lib
from kdjax.core import defaults
from kdjax.run import layout
from kdjax.weights import params as params_lib
from kdjax.weights import specs
from kdjax.weights import teachers as teachers_lib
from conftest import load_config


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
  # runs out of HBM; the refusal carries its message and the numbers of the
  # same program compiled with xla_tpu_no_crash_on_oom.
  config.aot.hbm_limit_gib = 0.0
  config.student.model.hidden = (32768, 32768)
  with pytest.raises(aot.AotDoesNotFitError,
                     match=r"(?s)student params +4.0 GiB.*optimizer state +"
                           r"8.0 GiB.*temporaries +[0-9.]+ [GMK]iB.*total +"
                           r"1[2-9].[0-9] GiB.*ran out of memory.*"
                           r"xla_tpu_no_crash_on_oom.*DOES NOT FIT"):
    modes.run(config, "")


def _tiny_lm_config(mesh=(-1, 2, 2), topology="v5e:2x2"):
  """A tiny Llama 3-style pair (bfloat16 teacher, llama3 RoPE) on token
  batches; mesh (data, fsdp, model). No weights: the teacher is shapes."""
  config = defaults.get_config()
  config.data = defaults.lm_data(tokenizer_path="/unused/tokenizer.json",
                                 seq_length=32)
  llama = dict(name="llama", vocab_size=256, width=64, num_layers=2,
               num_heads=4, num_kv_heads=2, head_dim=0, mlp_dim=128,
               rope_theta=500000.0, rope_type="llama3", rope_factor=32.0,
               norm_eps=1e-5, tie_embeddings=True, max_length=64)
  config.teacher.model = ml_collections.ConfigDict(dict(
      llama, width=128, num_layers=3, mlp_dim=256, tie_embeddings=False,
      rope_factor=8.0))
  config.teacher.init_from = "llama:/unused/Llama-teacher"
  config.teacher.pretrained = True
  config.teacher.precision.params = "bfloat16"
  config.student.model = ml_collections.ConfigDict(llama)
  config.student.train = defaults.train(batch_size=8, num_steps=10,
                                        loss_chunk_size=16)
  config.parallel.mesh = ml_collections.ConfigDict(
      dict(zip(("data", "fsdp", "model"), mesh)))
  return _aot_config(config, topology)


def _kernels_and_norms(shapes):
  """Bytes of a params tree: (>= 2-D kernels, 1-D norm scales)."""
  kernels = norms = 0
  for x in jax.tree.leaves(shapes):
    n = int(np.prod(x.shape)) * x.dtype.itemsize
    kernels, norms = (kernels + n, norms) if x.ndim > 1 else (kernels,
                                                              norms + n)
  return kernels, norms


def test_language_model_plans_split_memory_by_the_mesh():
  """Per-device bytes follow the shardings (no compile): a kernel is split
  over fsdp x model, norm scales stay whole; the batch is [batch, length]."""
  _needs_libtpu()
  topology = aot.parse_topology("v5e:2x2")
  devices = aot.topology_devices(topology)
  plans = {}
  for mesh in ((4, 1, 1), (2, 2, 1), (1, 4, 1), (1, 2, 2)):
    config = _tiny_lm_config(mesh)
    plans[mesh] = aot.build_step(config, "distill",
                                 layout.make_mesh(config, devices))
  whole = plans[(4, 1, 1)]
  assert whole.layout == "replicated (data=4)"
  assert plans[(1, 2, 2)].layout == "sharded (data=1 x fsdp=2 x model=2)"
  config = _tiny_lm_config()
  teacher = teachers_lib.held_shapes(
      config, specs.build_model(config, "teacher"))
  kernels, norms = _kernels_and_norms(teacher)
  assert {str(x.dtype) for x in jax.tree.leaves(teacher)} == {"bfloat16"}
  assert whole.teacher_bytes == kernels + norms
  for mesh, parts in (((2, 2, 1), 2), ((1, 4, 1), 4), ((1, 2, 2), 4)):
    assert plans[mesh].teacher_bytes == kernels // parts + norms, mesh
  # fsdp 2 -> 4: the teacher's and the student's kernels per device halve.
  s_kernels, s_norms = _kernels_and_norms(
      params_lib.abstract(specs.build_model(config, "student"), config.data))
  assert whole.params_bytes == s_kernels + s_norms
  assert plans[(2, 2, 1)].params_bytes == s_kernels // 2 + s_norms
  assert plans[(1, 4, 1)].params_bytes == s_kernels // 4 + s_norms
  # AdamW: two moments per trained param, sharded like it.
  for plan in plans.values():
    assert plan.opt_bytes >= 2 * plan.params_bytes
    assert plan.opt_bytes < 2 * plan.params_bytes + 1024  # + counts.
    assert plan.state_bytes == (plan.params_bytes + plan.opt_bytes
                                + plan.other_state_bytes)
  # Token batches: inputs, labels int32 and mask float32 [8, 32], split over
  # data (replicated layout) or data x fsdp (sharded).
  batch = whole.args[1]
  assert {k: (v.shape, str(v.dtype)) for k, v in batch.items()} == {
      "inputs": ((8, 32), "int32"), "labels": ((8, 32), "int32"),
      "mask": ((8, 32), "float32")}
  assert whole.batch_bytes == 8 * 32 * 12 // 4
  assert plans[(1, 2, 2)].batch_bytes == 8 * 32 * 12 // 2
  # The analytic count: 6 N D for the student, 2 N D for the teacher
  # (N: params multiplied per token; the tied head counts once).
  flops = whole.analytic
  tokens = 8 * 32
  # Per layer: query + out (D x H x Dh each), key + value (D x KV x Dh),
  # gate, up, down (D x F); then the head (D x V).
  student_n = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 256
  teacher_n = 3 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256) + 128 * 256
  assert flops.tokens == tokens
  assert flops.student == 6 * student_n * tokens
  assert flops.teacher == 2 * teacher_n * tokens
  assert flops.student_attention == 3 * 4 * 32 * 64 * 2 * tokens
  assert flops.teacher_attention == 4 * 32 * 128 * 3 * tokens


def test_a_language_model_step_compiles_sharded_and_replicated(capsys):
  """mode=aot_check on token batches for v5e:2x2: data=1 x fsdp=2 x model=2
  and the data-only layout; the printed split adds up."""
  _needs_libtpu()
  reports = {}
  for mesh in ((-1, 2, 2), (-1, 1, 1)):
    result = modes.run(_tiny_lm_config(mesh), "")
    [reports[mesh]] = result["aot"]
  table = capsys.readouterr().out
  sharded, replicated = reports[(-1, 2, 2)], reports[(-1, 1, 1)]
  assert sharded["layout"] == "sharded (data=1 x fsdp=2 x model=2)"
  assert replicated["layout"] == "replicated (data=4)"
  for r in (sharded, replicated):
    assert r["devices"] == 4 and r["tokens"] == 8 * 32
    assert not r["compiler_error"]
    split = (r["teacher_bytes"] + r["params_bytes"] + r["opt_bytes"]
             + r["other_state_bytes"] + r["batch_bytes"])
    # XLA's arguments are our split plus TPU tile padding, never less.
    assert split <= r["arguments"] < split + 4 * aot.MIB
    assert r["analytic_flops"] == sum(r["analytic_terms"].values())
  # Sharding the teacher over fsdp x model = 4 quarters its kernels.
  assert sharded["teacher_bytes"] < replicated["teacher_bytes"] / 3
  assert sharded["params_bytes"] < replicated["params_bytes"] / 3
  for text in ("distill step on v5e:2x2", "sharded (data=1 x fsdp=2 x "
               "model=2)", "teacher params (sharded)", "bfloat16",
               "teacher params (replicated)", "student params",
               "optimizer state", "temporaries", "-> fits",
               "FLOPs per step (analytic)", "XLA cost_analysis per device",
               "step time at peak", "compiled in"):
    assert text in table, text


def test_the_llama_8b_1b_preset_plans_the_readme_split():
  """configs/llama_slices.py: the public shapes (Llama-3.1-8B has
  8,030,261,248 params, Llama-3.2-1B 1,235,814,400) and the per-chip split
  of the README's table on v5e:4x4, fsdp=16 (no compile)."""
  _needs_libtpu()
  config = load_config("llama_slices", "8b_1b_v5e16")
  config.mode = "aot_check"
  validation.validate(config, "")
  counts = {role: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      params_lib.abstract(specs.build_model(config, role), config.data)))
            for role in ("teacher", "student")}
  assert counts == {"teacher": 8_030_261_248, "student": 1_235_814_400}
  devices = aot.topology_devices(aot.parse_topology(config.aot.topology))
  plan = aot.build_step(config, "distill", layout.make_mesh(config, devices))
  assert plan.layout == "sharded (data=1 x fsdp=16 x model=1)"
  # Sixteenths, plus the norm scales every chip holds whole (< 1 MiB).
  teacher, student = 2 * counts["teacher"] // 16, 4 * counts["student"] // 16
  assert teacher < plan.teacher_bytes < teacher + aot.MIB  # bfloat16.
  assert student < plan.params_bytes < student + aot.MIB
  assert 2 * student < plan.opt_bytes < 2 * student + 2 * aot.MIB
  assert plan.batch_bytes == 16 * 2048 * 12 // 16
  assert plan.analytic.total == pytest.approx(7.96e14, rel=1e-3)


def test_a_mesh_for_other_devices_is_refused_naming_the_field():
  config = _tiny_lm_config((1, 2, 4))  # 8 devices on a 4-chip topology.
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.parallel.mesh=.*there are 4 devices"):
    aot.validate(config)


# The compiled program == the step train.train runs (two real runs):
# tests/e2e/test_aot_e2e.py.
