"""mode=aot_check against real runs: the compiled program is the step that
train.train runs (the compile-only checks: tests/entry/test_aot.py)."""

import os

import jax
import ml_collections
import numpy as np
import optax

from kdjax import aot, modes
from kdjax.core import defaults
from kdjax.data import pipeline
from kdjax.data import text_sources
from kdjax.distill import parallel
from kdjax.distill import step
from kdjax.run import layout, tasks, train
from kdjax.runtime import checkpoint
from kdjax.weights import params as params_lib
from kdjax.weights import specs
from conftest import load_config
import word_tokenizer


def test_the_compiled_program_is_the_step_train_runs(digits_config, tmp_path):
  """On CPU devices: one step of aot.build_step's program == train.train's."""
  teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
  digits_config.mode = "teacher"
  digits_config.teacher.train.num_steps = 2
  modes.run(digits_config, teacher_dir)
  digits_config.mode = "distill"
  digits_config.teacher.checkpoint_dir = teacher_dir
  digits_config.student.train.update(num_steps=1, warmup_steps=0,
                                     schedule="constant")
  modes.run(digits_config, student_dir)

  mesh = parallel.make_mesh()
  plan = aot.build_step(digits_config, "distill", mesh, student_dir)
  teachers = train.build_step(digits_config, "distill", student_dir, mesh,
                             total_steps=1).teachers_params
  source = pipeline.get_source(digits_config.data, digits_config.data.train_split)
  batch = next(iter(pipeline.train_dataset(
      source, digits_config.data, seed=int(digits_config.seed),
      global_batch_size=digits_config.student.train.batch_size)))
  initial = parallel.replicate(plan.init_state(), mesh)
  before = jax.device_get(initial.params)
  state, _ = plan.program(initial, parallel.shard_batch(batch, mesh), teachers)

  model = specs.build_model(digits_config, "student")
  trained = checkpoint.restore_params(
      student_dir, params_lib.abstract(model, digits_config.data))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               jax.device_get(state.params), jax.device_get(trained))
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))))


WORDS = tuple(f"w{i}" for i in range(38))  # + [UNK], <eos>: vocabulary 40.


def _lm_config(root, workdir: str) -> ml_collections.ConfigDict:
  """A tiny Llama pair on a text directory, on data=2 x fsdp=2 x model=2."""
  source = root / "texts"
  rng = np.random.default_rng(0)
  counts = {"train": 0, "validation": 0, "test": 0}
  i = 0
  while counts["train"] < 8 or counts["validation"] < 1:
    name = f"doc{i}.txt"
    counts[text_sources.file_split(name)] += 1
    (source / name).parent.mkdir(parents=True, exist_ok=True)
    (source / name).write_text(" ".join(rng.choice(WORDS, size=60)))
    i += 1
  config = load_config("fashion_mnist")
  config.data = defaults.lm_data(
      name="text_directory", data_dir=str(root / "tfds"),
      source_dir=str(source), seq_length=12, eos_id=word_tokenizer.EOS,
      tokenizer_path=word_tokenizer.write(root / "tokenizer.json", WORDS),
      max_eval_sequences=8)
  llama = dict(name="llama", vocab_size=len(WORDS) + 2, width=16,
               num_layers=1, num_heads=2, num_kv_heads=2, head_dim=0,
               mlp_dim=24, rope_theta=10000.0, rope_type="llama3",
               rope_factor=32.0, rope_original_max_length=8,
               tie_embeddings=True, max_length=16)
  config.teacher.model = ml_collections.ConfigDict(dict(
      llama, width=24, num_layers=2, tie_embeddings=False))
  config.teacher.checkpoint_dir = os.path.join(workdir, "teacher")
  config.student.model = ml_collections.ConfigDict(llama)
  config.student.train.update(batch_size=8, num_steps=1, warmup_steps=0,
                              schedule="constant", loss_chunk_size=4)
  config.parallel.mesh.update(data=2, fsdp=2, model=2)
  config.checkpoint.async_save = False
  config.eval_every_steps = 100
  return config


def _save_random_teacher(config) -> None:
  """A random teacher as a kdjax checkpoint (step 1) at teacher.checkpoint_dir."""
  model = specs.build_model(config, "teacher")
  params = params_lib.init(model, config.data, 7)
  state = step.create_train_state(params, optax.sgd(0.1), jax.random.key(0))
  data = tasks.for_config(config).train_iterator(
      global_batch_size=8, seed=0, augment=False)
  meta = {"model": specs.model_spec(config, "teacher"), "role": "teacher",
          "num_classes": 0}
  with checkpoint.Checkpointer(config.teacher.checkpoint_dir,
                               save_every_steps=1, keep=1,
                               async_save=False) as ckpt:
    ckpt.save(1, state, data, meta)


def test_the_sharded_language_model_program_is_the_step_train_runs(
    tmp_path):
  """On 8 CPU devices, data=2 x fsdp=2 x model=2: one step of aot's program
  (token batches, the sharded layout's jit) == train.train's distill step."""
  workdir = str(tmp_path / "student")
  config = _lm_config(tmp_path, str(tmp_path))
  _save_random_teacher(config)
  config.mode = "distill"
  modes.run(config, workdir)

  mesh = layout.make_mesh(config)
  plan = aot.build_step(config, "distill", mesh, workdir)
  assert plan.layout == "sharded (data=2 x fsdp=2 x model=2)"
  assert sorted(plan.args[1]) == ["inputs", "labels", "mask"]
  teachers = train.build_step(config, "distill", workdir, mesh,
                              total_steps=1).teachers_params
  batch = next(tasks.for_config(config).train_iterator(
      global_batch_size=8, seed=int(config.seed), augment=False))
  assert {k: (v.shape, str(v.dtype)) for k, v in batch.items()} == {
      k: (v.shape, str(v.dtype)) for k, v in plan.args[1].items()}
  initial = parallel.place(plan.init_state(), jax.tree.map(
      lambda x: x.sharding, plan.args[0]))
  before = jax.device_get(initial.params)
  state, _ = plan.program(initial, batch, teachers)

  model = specs.build_model(config, "student")
  trained = checkpoint.restore_params(
      workdir, params_lib.abstract(model, config.data))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               jax.device_get(state.params), jax.device_get(trained))
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))))
