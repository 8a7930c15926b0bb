"""A LoRA student end to end, through modes.run: distilled from a cached
teacher on a data=2 x fsdp=2 x model=2 mesh, starting from one layer of
the pretrained teacher (init_layers). Only the adapters train and hold
optimizer state, the base comes back bit-identical, the adapters-alone
export rebuilds the trained student, and the config checks name what is
wrong. (The adapters' math: tests/models/test_lora.py; PEFT export:
tests/weights/test_export_peft.py.)"""

import json
import os
import shutil

import flax
import jax
import ml_collections
import numpy as np
import pytest

from kdjax import modes
from kdjax.core import config as config_lib
from kdjax.core import defaults
from kdjax.core.config import ConfigError
from kdjax.data import text_sources
from kdjax.models import lora, partitioning
from kdjax.run import layout, train
from kdjax.runtime import checkpoint
from kdjax.weights import params as params_lib
from kdjax.weights import pretrained
from kdjax.weights import prompt as prompt_weights
from kdjax.weights import run_params
from kdjax.weights import specs
from kdjax.weights.exporters import hf_llama
from conftest import load_config
import word_tokenizer

WORDS = tuple(f"w{i}" for i in range(40))
VOCAB = len(WORDS) + 2  # [UNK], <eos>, the words.
TEACHER = dict(name="llama", vocab_size=VOCAB, width=16, num_layers=2,
               num_heads=2, num_kv_heads=2, head_dim=0, mlp_dim=24,
               rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True,
               max_length=16)


def _random_llama(fields, seed):
  """Params of a Llama, drawn with numpy (no compiled init needed)."""
  model = specs.model_from_spec(fields)
  shapes = flax.traverse_util.flatten_dict(partitioning.unbox(jax.eval_shape(
      model.init, jax.random.key(0), np.zeros((1, 4), np.int32))["params"]))
  rng = np.random.default_rng(seed)
  return flax.traverse_util.unflatten_dict({
      k: (1.0 if k[-1] == "scale" else 0.0)
      + rng.normal(0, 0.3, s.shape).astype(np.float32)
      for k, s in shapes.items()})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Texts, a word tokenizer and a 'pretrained' Llama as a HF directory."""
  root = tmp_path_factory.mktemp("lora")
  rng = np.random.default_rng(0)
  counts = {"train": 0, "validation": 0, "test": 0}
  i = 0
  while counts["train"] < 8 or counts["validation"] < 1:
    name = f"doc{i}.txt"
    counts[text_sources.file_split(name)] += 1
    (root / "texts").mkdir(exist_ok=True)
    (root / "texts" / name).write_text(" ".join(rng.choice(WORDS, size=60)))
    i += 1
  tokenizer = word_tokenizer.write(root / "tokenizer.json", WORDS)
  hf_dir = str(root / "pretrained")
  hf_llama.export_hf(hf_dir, _random_llama(TEACHER, seed=1), TEACHER,
                     tokenizer_path=tokenizer)
  return root, hf_dir


def _config(root, hf_dir, workdir):
  config = load_config("fashion_mnist")
  config.data = defaults.lm_data(
      name="text_directory", data_dir=str(root / "tfds"),
      source_dir=str(root / "texts"), input_key="text",
      tokenizer_path=str(root / "tokenizer.json"), seq_length=12,
      eos_id=word_tokenizer.EOS, max_eval_sequences=8, eval_batch_size=8)
  config.teacher.model = ml_collections.ConfigDict(TEACHER)
  config.teacher.init_from = "llama:" + hf_dir
  config.teacher.pretrained = True
  # The student: the teacher's second layer, with adapters.
  config.student.model = ml_collections.ConfigDict(dict(TEACHER,
                                                        num_layers=1))
  config.student.init_from = "llama:" + hf_dir
  config.student.init_layers = (1,)
  config.student.lora.update(rank=2, alpha=4.0)
  config.student.train.update(batch_size=8, num_steps=3, warmup_steps=0,
                              optimizer="adam", learning_rate=3e-2,
                              schedule="constant", loss_chunk_size=6)
  config.parallel.mesh.update(data=2, fsdp=2, model=2)
  config.cache.update(k=8, dtype="float32", records_per_shard=8,
                      batch_size=8, chunk_size=6,
                      dir=os.path.join(workdir, "cache"))
  config.checkpoint.every_steps = 100
  config.log_every_steps = 100
  config.eval_every_steps = 100
  return config


def _run(config, mode, workdir, **changes):
  run = ml_collections.ConfigDict(config.to_dict())
  config_lib.set_fields(run, dict(mode=mode, **changes))
  return modes.run(run, workdir)


def test_a_lora_student_distils_from_the_cache_on_a_sharded_mesh(
    setup, tmp_path):
  root, hf_dir = setup
  workdir = str(tmp_path)
  config = _config(root, hf_dir, workdir)
  _run(config, "cache_teacher", workdir)
  student_dir = os.path.join(workdir, "student")
  # Checkpoints of the adapters alone, at steps 2 and 3.
  distill = {"distill.teacher_cache": config.cache.dir,
             "checkpoint.trainable_only": True, "checkpoint.every_steps": 2}
  summary = _run(config, "distill", student_dir, **distill)
  assert "teacher cache" in summary["objective"]
  assert np.isfinite(summary["eval"]["perplexity"])
  model = specs.build_model(config, "student")
  assert lora.is_adapted(model)
  shapes = params_lib.abstract(model, config.data)
  adapters, base_shapes = lora.split(shapes)
  num_adapters = params_lib.count(adapters)
  assert summary["num_trainable_params"] == num_adapters > 0
  assert summary["model"]["lora"] == dict(
      rank=2, alpha=4.0, dropout=0.0,
      targets=list(lora.DEFAULT_TARGETS["llama"]))

  # The checkpoint stores the adapters alone; reading it rebuilds the base.
  assert checkpoint.stored_param_paths(student_dir) == sorted(
      flax.traverse_util.flatten_dict(adapters))
  with pytest.raises(ValueError, match="trained leaves alone"):
    checkpoint.restore_params(student_dir, shapes)
  trained = run_params.restore(student_dir, shapes, config.data)
  trained_adapters, trained_base = lora.split(jax.device_get(trained))
  # The base: the teacher's layer 1, bit for bit, after training.
  imported = pretrained.load_pretrained(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), base_shapes),
      config.student.init_from, layers=(1,),
      model_fields=specs.model_kwargs(config, "student"))
  jax.tree.map(np.testing.assert_array_equal, trained_base, imported)
  moved = [np.abs(v).max() for k, v in
           flax.traverse_util.flatten_dict(trained_adapters).items()
           if k[-1] == lora.B]
  assert min(moved) > 1e-3  # Every B left zero.

  # A resume from the adapters-alone checkpoint of step 2 ends where the
  # uninterrupted run did.
  shutil.rmtree(os.path.join(student_dir, checkpoint.CHECKPOINT_SUBDIR, "3"))
  os.remove(os.path.join(student_dir, "run.json"))
  resumed = _run(config, "distill", student_dir, **distill)
  assert resumed["resumed_from_step"] == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(
      run_params.restore(student_dir, shapes, config.data)),
      jax.device_get(trained))

  # The step the run built holds optimizer state for the adapters alone.
  mesh = layout.make_mesh(config)
  built = train.build_step(config, "distill", workdir, mesh, total_steps=3,
                           abstract=True)
  state = jax.eval_shape(lambda: built.init_state(load=False))
  assert built.sharded
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert n_opt == 2 * num_adapters  # Adam's two moments.

  # The adapters alone (kilobytes) rebuild the trained student.
  note, alone = prompt_weights.read_export(os.path.join(workdir, "student"))
  assert note["init_layers"] == [1] and note["model"]["lora"]["rank"] == 2
  assert set(flax.traverse_util.flatten_dict(alone)) == set(
      flax.traverse_util.flatten_dict(trained_adapters))
  rebuilt_model, rebuilt = prompt_weights.rebuild(
      os.path.join(workdir, "student"), config.data)
  assert lora.is_adapted(rebuilt_model)
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % VOCAB
  forward = jax.jit(lambda m, p: m.apply({"params": p}, tokens),
                    static_argnums=0)
  trained = jax.device_get(trained)
  got = forward(model, trained)
  np.testing.assert_array_equal(forward(rebuilt_model, rebuilt), got)

  # mode=export: hf merges the adapters into the kernels; peft writes them
  # in PEFT's format beside the frozen base as a HF directory.
  plain_fields = specs.model_kwargs(config, "student")
  plain = specs.model_from_spec(dict(plain_fields, name="llama"))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), base_shapes)
  for fmt in ("hf", "peft"):
    _run(config, "export", os.path.join(workdir, "student"),
         **{"export.format": fmt,
            "export.dir": os.path.join(workdir, fmt)})
  merged = pretrained.load_pretrained(
      zeros, "llama:" + os.path.join(workdir, "hf"),
      model_fields=plain_fields)
  np.testing.assert_allclose(forward(plain, merged), got, atol=1e-5)
  base = pretrained.load_pretrained(
      zeros, "llama:" + os.path.join(workdir, "peft", "base"),
      model_fields=plain_fields)
  jax.tree.map(np.testing.assert_array_equal, base, imported)
  with open(os.path.join(workdir, "peft", "adapter_config.json")) as f:
    adapter_config = json.load(f)
  assert adapter_config["r"] == 2 and adapter_config["lora_alpha"] == 4.0
  assert adapter_config["base_model_name_or_path"] == os.path.join(
      workdir, "peft", "base")


@pytest.mark.parametrize("change, field, message", [
    ({"student.init_from": ""}, "student.lora.rank",
     "LoRA adapts a pretrained model"),
    ({"student.lora.dropout": 1.0}, "student.lora.dropout", r"in \[0, 1\)"),
    ({"student.lora.alpha": 0.0}, "student.lora.alpha", "> 0"),
    ({"student.lora.rank": -1}, "student.lora.rank", "an int"),
    ({"student.lora.targets": ("query", "q_proj")}, "student.lora.targets",
     r"\['q_proj'\] match no projection"),
])
def test_lora_settings_are_checked_when_the_config_loads(
    setup, tmp_path, change, field, message):
  root, hf_dir = setup
  config = _config(root, hf_dir, str(tmp_path))
  config_lib.set_fields(config, change)
  with pytest.raises(ConfigError, match=rf"config\.{field}.*{message}"):
    specs.validate_model(config, "student")


def test_rank_zero_is_the_plain_student(setup, tmp_path):
  root, hf_dir = setup
  config = _config(root, hf_dir, str(tmp_path))
  config.student.lora.rank = 0
  specs.validate_model(config, "student")
  assert not lora.is_adapted(specs.build_model(config, "student"))
  assert "lora" not in specs.model_spec(config, "student")
