"""Prompt initialisation from the config, prompt-only export, instructions.

Tiny random BERTs always run; tests marked `minilm` use the real
all-MiniLM-L6-v2 weights and tokenizer (skipped, with the install command,
where the package is missing). The export of real training runs is tested
on the smoke pipeline in tests/e2e/test_text_train.py.
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from kdjax import validation
from kdjax.core import config as config_lib
from kdjax.data import text as text_lib
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.distill import masks
from kdjax.models import bert
from kdjax.models import prompt as prompt_lib
from kdjax.weights import params as params_lib
from kdjax.weights import prompt as prompt_weights
from kdjax.weights import resolve
from kdjax.weights import specs
from kdjax.weights.importers import hf_bert
from kdjax.models.partitioning import unbox
from conftest import config_module, load_config

TINY = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
            intermediate_size=32, max_position_embeddings=8,
            dropout_rate=0.0, attention_dropout_rate=0.0)

minilm = pytest.mark.skipif(
    importlib.util.find_spec(hf_bert.MINILM_PACKAGE) is None,
    reason=f"all-MiniLM-L6-v2 not installed: `{hf_bert.MINILM_INSTALL}`")


def _bits_equal(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and np.array_equal(a.view(np.uint8),
                                               b.view(np.uint8))


@functools.lru_cache(maxsize=None)
def _compiled(model):
  """One compiled init and apply per model (eager Flax is slow here)."""
  return (jax.jit(lambda key, x: unbox(model.init(key, x)["params"])),
          jax.jit(lambda p, x: model.apply({"params": p}, x)))


def _init(model, tokens, seed=0):
  return _compiled(model)[0](jax.random.key(seed), tokens)


def _apply(model, params, tokens):
  return _compiled(model)[1](params, tokens)


def _tiny_prompt_params(seed=0, num_prompts=3):
  model = bert.BertClassifier(**TINY, num_classes=2, num_prompts=num_prompts)
  tokens = jnp.asarray([[1, 5, 7, 9, 2, 0], [1, 3, 2, 0, 0, 0]])
  return model, tokens, _init(model, tokens, seed)


# --- Model fields: checked when the model is built (config validation). ----


@pytest.mark.parametrize("fields, message", [
    (dict(prompt_init="label"), r"prompt_init='label'; allowed"),
    (dict(prompt_init="labels"), "needs prompt_init_words"),
    (dict(prompt_init="labels", prompt_init_words="fresh"),
     "needs prompt_init_words"),
    (dict(prompt_init="labels", prompt_init_words=("fresh", "")),
     "needs prompt_init_words"),
    (dict(num_prompts=0, prompt_init="vocab"), "needs num_prompts > 0"),
    (dict(instruction_ids=(3, 50)), r"instruction_ids must be token ids in"),
])
def test_bad_prompt_fields_fail_at_construction(fields, message):
  kwargs = dict(TINY, num_classes=2, num_prompts=3)
  kwargs.update(fields)
  with pytest.raises(ValueError, match=message):
    bert.BertClassifier(**kwargs)


@minilm
def test_config_validation_names_the_prompt_field(tmp_path):
  rotten_tomatoes = config_module("rotten_tomatoes")
  config = load_config("rotten_tomatoes", "smoke")
  config.student.model = dict(
      rotten_tomatoes._prompt_student(config, 4)["student.model"],  # pylint: disable=protected-access
      prompt_init_words=())
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.student.model: .*prompt_init_words"):
    validation.validate(config, str(tmp_path))


# --- Initialisation from the imported MiniLM. ------------------------------


@pytest.fixture(scope="module")
def minilm_prompt_params():
  """A smoke-preset prompt student's params, MiniLM imported, prompt random."""
  rotten_tomatoes = config_module("rotten_tomatoes")
  config = load_config("rotten_tomatoes", "smoke")
  config_lib.set_fields(config, rotten_tomatoes._prompt_student(config, 4))  # pylint: disable=protected-access
  model = specs.build_model(config, "student")
  params = params_lib.init(model, config.data, 0)
  fields = dict(hf_bert.load_config(hf_bert.minilm_dir()),
                add_pooler="pooler" in params["encoder"])
  imported = hf_bert.load_params(hf_bert.minilm_dir(), fields)
  params = bert.with_encoder(params, jax.tree.map(jnp.asarray, imported))
  # The word embeddings straight from the safetensors file.
  table = imported["embeddings"]["word_embeddings"]["embedding"]
  tokenizer = tokenizer_lib.load(hf_bert.minilm_dir())
  return config, params, table, tokenizer


def _matching_ids(table, rows):
  """For each row, the ids of the table rows bit-identical to it."""
  return [np.flatnonzero(np.all(table == np.asarray(r), axis=1)) for r in rows]


@minilm
def test_label_word_init_is_the_imported_label_embeddings(minilm_prompt_params):
  config, params, table, tokenizer = minilm_prompt_params
  assert config.student.model.prompt_init == "labels"
  before = params["prompt"]["embedding"]
  out = prompt_weights.init_from_config(params, config, "student", seed=0)
  rows = np.asarray(out["prompt"]["embedding"])
  assert rows.shape == (20, 384)
  # 'rotten' and 'fresh' are single word pieces: rows 0 and 1 ARE their
  # imported embeddings (not the random init's).
  rotten, fresh = hf_bert.word_token_ids(tokenizer, ["rotten", "fresh"])
  assert rotten == [11083] and fresh == [4840]
  assert _bits_equal(rows[0], table[11083]) and _bits_equal(rows[1], table[4840])
  # The other 18: rows of distinct ordinary word pieces (no [PAD], [unused]).
  ordinary = set(hf_bert.ordinary_token_ids(tokenizer).tolist())
  ids = [m.tolist() for m in _matching_ids(table, rows[2:])]
  assert all(len(m) >= 1 and set(m) <= ordinary for m in ids), ids
  assert len({m[0] for m in ids}) == 18
  # Only the prompt changed, the draw is fixed by the seed and moves with it.
  for (p1, a), (p2, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                              jax.tree_util.tree_leaves_with_path(out)):
    assert p1 == p2 and (_bits_equal(a, b) or "prompt" in str(p1))
  assert not np.allclose(before, rows)
  again = prompt_weights.init_from_config(params, config, "student", seed=0)
  other = prompt_weights.init_from_config(params, config, "student", seed=1)
  assert _bits_equal(again["prompt"]["embedding"], rows)
  assert not np.array_equal(np.asarray(other["prompt"]["embedding"])[2:],
                            rows[2:])
  np.testing.assert_array_equal(np.asarray(other["prompt"]["embedding"])[:2],
                                rows[:2])


@minilm
def test_multi_piece_label_word_and_vocab_init(minilm_prompt_params):
  config, params, table, tokenizer = minilm_prompt_params
  words = ("unwatchable", "fresh")
  pieces = hf_bert.word_token_ids(tokenizer, words)
  assert len(pieces[0]) > 1  # Several word pieces: their mean (Lester et al.).
  config = config_lib.set_fields(config.copy_and_resolve_references(), {
      "student.model.prompt_init_words": words})
  rows = np.asarray(prompt_weights.init_from_config(
      params, config, "student", seed=0)["prompt"]["embedding"])
  want = table[pieces[0]].astype(np.float64).mean(0)
  np.testing.assert_allclose(rows[0], want, rtol=0, atol=1e-7)
  assert _bits_equal(rows[1], table[4840])

  config = config_lib.set_fields(config, {"student.model.prompt_init": "vocab"})
  rows = np.asarray(prompt_weights.init_from_config(
      params, config, "student", seed=0)["prompt"]["embedding"])
  ordinary = set(hf_bert.ordinary_token_ids(tokenizer).tolist())
  ids = _matching_ids(table, rows)
  assert all(len(m) >= 1 and set(m.tolist()) <= ordinary for m in ids)
  assert len({int(m[0]) for m in ids}) == 20

  config = config_lib.set_fields(config, {"student.model.prompt_init": "random"})
  assert prompt_weights.init_from_config(params, config, "student", seed=0) is params


@minilm
def test_vocab_init_needs_a_pretrained_backbone(minilm_prompt_params):
  config, params, _, _ = minilm_prompt_params
  config = config_lib.set_fields(config.copy_and_resolve_references(),
                                 {"student.init_from": ""})
  with pytest.raises(config_lib.ConfigError, match=r"config.student.init_from"):
    prompt_weights.init_from_config(params, config, "student", seed=0)


# --- Prompt-only export and loading onto the frozen backbone. --------------


def test_export_loads_onto_the_same_backbone_only(tmp_path):
  model, tokens, params = _tiny_prompt_params(seed=0)
  params = prompt_lib.set_prompt(params, np.full((3, 16), 0.25, np.float32))
  mask = masks.trainable_mask(params, ("prompt", "head"))
  meta = {"model": {"name": "bert", **TINY, "num_classes": 2,
                    "num_prompts": 3}, "seed": 0, "role": "scratch"}
  path = prompt_weights.export_trainable(str(tmp_path), params, mask, meta, "")
  assert path == os.path.join(str(tmp_path), prompt_weights.EXPORT_FILE)
  assert not os.path.exists(path + ".tmp")
  note, trained = prompt_weights.read_export(str(tmp_path))  # A run dir works too.
  assert set(trained) == {"prompt", "head"}
  assert note["num_params"] == 3 * 16 + 16 * 2 + 2 and note["seed"] == 0

  # Onto the same backbone with another (random) prompt and head: identical.
  _, _, fresh = _tiny_prompt_params(seed=0)
  fresh = prompt_lib.set_prompt(fresh, np.zeros((3, 16), np.float32))
  fresh["head"] = jax.tree.map(jnp.zeros_like, fresh["head"])
  loaded = prompt_weights.load_onto(fresh, path)
  for (p1, a), (p2, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                              jax.tree_util.tree_leaves_with_path(loaded)):
    assert p1 == p2 and _bits_equal(a, b), jax.tree_util.keystr(p1)
  np.testing.assert_array_equal(_apply(model, loaded, tokens),
                                _apply(model, params, tokens))
  # The backbone alone ({'encoder': ...}) is enough.
  alone = prompt_weights.load_onto({"encoder": params["encoder"]}, path)
  assert set(alone) == {"encoder", "prompt", "head"}

  # Another backbone (one bit of one weight) is refused, unless asked.
  _, _, other = _tiny_prompt_params(seed=1)
  with pytest.raises(ValueError, match="trained on another backbone"):
    prompt_weights.load_onto(other, path)
  prompt_weights.load_onto(other, path, verify=False)
  # A model with another prompt length does not fit.
  _, _, wrong = _tiny_prompt_params(num_prompts=4)
  with pytest.raises(ValueError, match=r"prompt/embedding has shape \(3, 16\)"):
    prompt_weights.load_onto(wrong, path)


def test_read_export_refuses_other_files(tmp_path):
  path = tmp_path / "x.msgpack"
  path.write_bytes(serialization.msgpack_serialize({"params": {}}))
  with pytest.raises(ValueError, match="not a kdjax prompt export"):
    prompt_weights.read_export(str(path))


# --- Instruction-prompted models. -------------------------------------------


def test_insert_instruction_puts_ids_after_cls():
  tokens = jnp.asarray([[101, 7, 8, 102, 0], [101, 9, 102, 0, 0]])
  out, mask = bert.insert_instruction(tokens, None, (4, 5))
  np.testing.assert_array_equal(
      out, [[101, 4, 5, 7, 8, 102, 0], [101, 4, 5, 9, 102, 0, 0]])
  np.testing.assert_array_equal(mask, out != 0)


@minilm
def test_instructed_model_reads_instruction_then_review():
  """The instructed model on review ids == the plain model on the tokenised
  text '<instruction> <review>' (same params: the instruction adds none)."""
  rotten_tomatoes = config_module("rotten_tomatoes")
  tokenizer = tokenizer_lib.load(hf_bert.minilm_dir())
  ids = resolve.instruction_ids(hf_bert.minilm_dir(),
                                rotten_tomatoes.INSTRUCTION)
  assert len(ids) == 8  # is this movie review fresh or rotten ?
  reviews = ["A triumph.", "Dull, overlong and badly acted from start to end",
             "fine"]
  length = 16
  fields = dict(TINY, vocab_size=30522, max_position_embeddings=32)
  plain = bert.BertClassifier(**fields, num_classes=2)
  instructed = bert.BertClassifier(**fields, num_classes=2,
                                   instruction_ids=ids)
  review_ids = text_lib.tokenize(tokenizer, reviews, length)["input_ids"]
  joined = text_lib.tokenize(
      tokenizer, [f"{rotten_tomatoes.INSTRUCTION} {r}" for r in reviews],
      length + len(ids))["input_ids"]
  inserted, _ = bert.insert_instruction(jnp.asarray(review_ids), None, ids)
  np.testing.assert_array_equal(inserted, joined)
  params = _init(plain, joined)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, jax.eval_shape(lambda: unbox(instructed.init(
          jax.random.key(0), review_ids)["params"])))
  np.testing.assert_array_equal(_apply(instructed, params, review_ids),
                                _apply(plain, params, joined))
