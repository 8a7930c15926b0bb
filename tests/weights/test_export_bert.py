"""BERT classifier students out as Hugging Face directories, and back.

Tiny random BertClassifiers (a WordPiece tokenizer trained here, 2 layers,
width 32) in four shapes: mean pooling; [CLS] pooling with scan_layers, no
pooler, gelu_new and a vocabulary padded past the tokenizer; a soft prompt
with an instruction and pooler pooling (BertModel plus head file); and
pooler pooling alone (a BertForSequenceClassification). Each is exported and
read back with kdjax's own importer ('hf_bert:<dir>' through
`load_pretrained`, plus `read_head`): float32 gives the same bits and
logits, bfloat16 / float16 their rounded values. A float64 numpy BERT that
reads only the files (config.json, model.safetensors, kdjax_head.*) gives
kdjax's logits too, so exporter and importer cannot agree on a wrong layout.
"""

import functools
import json
import math
import os
import shutil

import jax
import ml_collections
import ml_dtypes
import numpy as np
import pytest
import tokenizers as tk

from kdjax.data import tokenizer as tokenizer_lib
from kdjax.models import bert
from kdjax.models import partitioning
from kdjax.weights import pretrained
from kdjax.weights.exporters import hf_bert
from kdjax.weights.exporters import manifest as manifest_lib
from kdjax.weights.importers import hf_bert as hf_bert_import

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CORPUS = ["the quick brown fox jumps over the lazy dog",
          "a charming, funny and surprisingly moving film",
          "the plot is a mess and the acting is wooden"] * 20
BASE = dict(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
            intermediate_size=64, max_position_embeddings=24,
            layer_norm_eps=1e-12, num_classes=3, pooling="mean")
MODELS = {
    "mean": BASE,
    "scan_cls": dict(BASE, vocab_size=108, pooling="cls", add_pooler=False,
                     hidden_act="gelu_new", scan_layers=True),
    "prompt": dict(BASE, pooling="pooler", num_prompts=3,
                   instruction_ids=(5, 6)),
    "pooler": dict(BASE, pooling="pooler", num_classes=2),
}
_ENCODER = ("vocab_size", "hidden_size", "num_layers", "num_heads",
            "intermediate_size", "max_position_embeddings", "type_vocab_size",
            "layer_norm_eps", "hidden_act", "dropout_rate",
            "attention_dropout_rate", "pad_id")


def full(fields):
  return dict(hf_bert.classifier_fields(fields))


@pytest.fixture(name="tokenizer_dir", scope="module")
def tokenizer_dir_fixture(tmp_path_factory):
  """A BERT-style directory: tokenizer.json (100 WordPiece tokens, [PAD] = 0),
  vocab.txt and tokenizer_config.json."""
  tokenizer = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
  tokenizer.normalizer = tk.normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = tk.decoders.WordPiece()
  tokenizer.train_from_iterator(CORPUS, tk.trainers.WordPieceTrainer(
      vocab_size=100, special_tokens=SPECIALS, show_progress=False))
  tokenizer.post_processor = tk.processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  assert tokenizer.get_vocab_size() == BASE["vocab_size"]
  directory = tmp_path_factory.mktemp("tokenizer")
  tokenizer.save(str(directory / "tokenizer.json"))
  vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
  (directory / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab))
  (directory / "tokenizer_config.json").write_text(json.dumps(dict(
      do_lower_case=True, tokenizer_class="BertTokenizer",
      name_or_path="somewhere/else", model_max_length=512,
      **{k.lower() + "_token": k.strip("[]").join("[]") for k in
         ("CLS", "SEP", "PAD", "UNK", "MASK")})))
  return str(directory)


def random_params(fields, seed=0):
  """Random float32 numpy params in the model's layout: norm scales near 1,
  biases and embeddings nonzero, kernels 1 / sqrt(fan-in)."""
  fields = full(fields)
  shapes = partitioning.unbox(jax.eval_shape(
      bert.BertClassifier(**fields).init, jax.random.key(0),
      np.ones((1, 4), np.int32))["params"])
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return (1.0 + 0.3 * rng.normal(size=shape.shape)).astype(np.float32)
    std = shape.shape[-2] ** -0.5 if name == "kernel" else (
        0.1 if name == "bias" else 1.0)
    return rng.normal(0.0, std, shape.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _apply(items):
  return jax.jit(bert.BertClassifier(**dict(items)).apply)


def logits(fields, params, tokens):
  fields = full(fields)
  hashable = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                          for k, v in fields.items()))
  return np.asarray(_apply(hashable)({"params": params}, tokens))


def tokens_for(fields, seed=1):
  """[3, 10] ids in [1, vocab); the last row padded after 6 tokens."""
  tokens = np.random.default_rng(seed).integers(
      1, fields["vocab_size"], (3, 10)).astype(np.int32)
  tokens[:, 0] = 2  # [CLS]
  tokens[-1, 6:] = 0
  return tokens


def assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def reimport(fields, directory):
  """kdjax's own importer: the encoder through load_pretrained('hf_bert:'),
  then the head file."""
  init = random_params(fields, seed=99)
  loaded = pretrained.load_pretrained(init, "hf_bert:" + directory)
  _, head = hf_bert.read_head(directory)
  return jax.tree.map(np.asarray, {**loaded, **head})


# --- Round trips. -----------------------------------------------------------


def test_state_dicts_are_the_importers_inverse():
  for name, fields in MODELS.items():
    params = random_params(fields, seed=2)
    model, head = hf_bert.to_hf_state_dicts(params, fields)
    hf = hf_bert.is_sequence_classifier(full(fields))
    assert hf == (name == "pooler")
    assert model["bert.encoder.layer.1.intermediate.dense.weight" if hf else
                 "encoder.layer.1.intermediate.dense.weight"].shape == (64, 32)
    assert head["classifier.weight"].shape == (fields["num_classes"], 32)
    assert ("prompt.embedding" in head) == (name == "prompt")
    assert ("pooler.dense.weight" in model) == (name in ("mean", "prompt"))
    config = {k: full(fields)[k] for k in _ENCODER}
    encoder = hf_bert_import.convert_params(model, config)
    want = params["encoder"]
    if fields.get("scan_layers"):
      want = hf_bert.host_params(params)["encoder"]
    assert_same_tree(encoder, want)
  # A module or ConfigDict works as fields, {'params': ...} as params.
  params = random_params(BASE)
  for fields in (bert.BertClassifier(**BASE),
                 ml_collections.ConfigDict(dict(name="bert", **BASE))):
    got = hf_bert.to_hf_state_dicts({"params": params}, fields)
    assert set(got[0]) == set(hf_bert.to_hf_state_dicts(params, BASE)[0])


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_export_reimports_bit_for_bit(kind, tokenizer_dir, tmp_path):
  fields = MODELS[kind]
  params = random_params(fields, seed=3)
  directory = str(tmp_path / "hf")
  summary = hf_bert.export_hf_bert(
      directory, params, fields,
      tokenizer_path=os.path.join(tokenizer_dir, "tokenizer.json"),
      manifest=manifest_lib.build_manifest(
          source_run="/runs/tiny", step=7, teacher="hf_bert:",
          objective="kl", eval_metrics={"eval/accuracy": 0.5}, fmt="hf"))
  assert sorted(os.listdir(directory)) == sorted(summary["files"]) == [
      "config.json", "kdjax_head.json", "kdjax_head.safetensors",
      "kdjax_manifest.json", "model.safetensors", "tokenizer.json",
      "tokenizer_config.json", "vocab.txt"]
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  want_arch = ("BertForSequenceClassification" if kind == "pooler"
               else "BertModel")
  assert config["architectures"] == [want_arch] == [summary["architecture"]]
  if kind == "mean":
    assert config == {
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 24,
        "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "position_embedding_type": "absolute", "use_cache": True,
        "torch_dtype": "float32"}
  if kind == "pooler":
    assert config["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
  # kdjax's importer: the fields, then the same bits and logits.
  assert hf_bert_import.load_config(directory) == {
      k: full(fields)[k] for k in _ENCODER}
  head_fields, _ = hf_bert.read_head(directory)
  assert head_fields == {k: full(fields)[k] for k in head_fields}
  loaded = reimport(fields, directory)
  assert_same_tree(loaded, params)
  tokens = tokens_for(fields)
  np.testing.assert_array_equal(logits(fields, loaded, tokens),
                                logits(fields, params, tokens))
  # The tokenizer files: the same ids; the source's name is not carried.
  original = tokenizer_lib.load(tokenizer_dir)
  copied = tokenizer_lib.load(directory)
  assert copied.encode(CORPUS[1]).ids == original.encode(CORPUS[1]).ids
  with open(os.path.join(directory, "tokenizer_config.json")) as f:
    tokenizer_config = json.load(f)
  assert tokenizer_config["model_max_length"] == 24
  assert tokenizer_config["cls_token"] == "[CLS]"
  assert "name_or_path" not in tokenizer_config
  assert manifest_lib.read_manifest(directory)["step"] == 7


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_export(dtype, tokenizer_dir, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  fields = MODELS["prompt"]
  params = random_params(fields, seed=5)
  directory = str(tmp_path / dtype)
  hf_bert.export_hf_bert(directory, params, fields,
                         tokenizer_path=tokenizer_dir, dtype=dtype)
  for name in ("model.safetensors", "kdjax_head.safetensors"):
    stored = load_file(os.path.join(directory, name))
    assert {str(v.dtype) for v in stored.values()} == {dtype}
  half = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
  rounded = jax.tree.map(lambda x: x.astype(half).astype(np.float32), params)
  loaded = reimport(fields, directory)
  assert_same_tree(loaded, rounded)
  assert not np.array_equal(loaded["prompt"]["embedding"],
                            params["prompt"]["embedding"])


# --- The directory's own meaning. -------------------------------------------


def _gelu(x, act):
  if act == "gelu":
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_logits(directory, tokens):
  """float64 logits from the files alone: HF's BertModel (post-LN, erf or
  tanh gelu, additive padding mask), then kdjax_head.json's recipe."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, "config.json")) as f:
    c = json.load(f)
  with open(os.path.join(directory, "kdjax_head.json")) as f:
    head = json.load(f)
  sd = {k.removeprefix("bert."): np.asarray(v, np.float64) for k, v in
        load_file(os.path.join(directory, "model.safetensors")).items()}
  hw = {k: np.asarray(v, np.float64) for k, v in
        load_file(os.path.join(directory, head["weights"])).items()}
  mask = tokens != c["pad_token_id"]
  if head["instruction_ids"]:
    k = len(head["instruction_ids"])
    ids = np.broadcast_to(np.asarray(head["instruction_ids"]), (len(tokens), k))
    tokens = np.concatenate([tokens[:, :1], ids, tokens[:, 1:]], 1)
    mask = np.concatenate([mask[:, :1], np.ones((len(mask), k), bool),
                           mask[:, 1:]], 1)
  b, length = tokens.shape
  p, h = head["num_prompts"], c["num_attention_heads"]
  kind = sd["embeddings.token_type_embeddings.weight"][0]

  def ln(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + c["layer_norm_eps"]) * sd[name + ".weight"]
            + sd[name + ".bias"])

  def dense(x, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]

  x = (sd["embeddings.word_embeddings.weight"][tokens]
       + sd["embeddings.position_embeddings.weight"][:length] + kind)
  if p:  # No position embedding for the prompt.
    prompt = np.broadcast_to(hw["prompt.embedding"] + kind, (b, p, x.shape[-1]))
    x = np.concatenate([prompt, x], 1)
    mask = np.concatenate([np.ones((b, p), bool), mask], 1)
  x = ln(x, "embeddings.LayerNorm")
  dh = x.shape[-1] // h
  for i in range(c["num_hidden_layers"]):
    n = f"encoder.layer.{i}."
    q, k, v = (dense(x, n + f"attention.self.{t}").reshape(b, -1, h, dh)
               for t in ("query", "key", "value"))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    scores = np.where(mask[:, None, None, :], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
    x = ln(x + dense(y, n + "attention.output.dense"),
           n + "attention.output.LayerNorm")
    y = _gelu(dense(x, n + "intermediate.dense"), c["hidden_act"])
    x = ln(x + dense(y, n + "output.dense"), n + "output.LayerNorm")
  x, mask = x[:, p:], mask[:, p:]
  if head["pooling"] == "mean":
    pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  elif head["pooling"] == "cls":
    pooled = x[:, 0]
  else:
    pooled = np.tanh(dense(x[:, 0], "pooler.dense"))
  return pooled @ hw["classifier.weight"].T + hw["classifier.bias"]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_export_runs_as_bert_model(kind, tokenizer_dir, tmp_path):
  fields = MODELS[kind]
  params = random_params(fields, seed=6)
  directory = str(tmp_path / "hf")
  hf_bert.export_hf_bert(directory, params, fields,
                         tokenizer_path=tokenizer_dir)
  tokens = tokens_for(fields, seed=7)
  ours = logits(fields, params, tokens)
  expected = reference_logits(directory, tokens)
  np.testing.assert_allclose(ours, expected, rtol=0,
                             atol=1e-5 * max(1.0, np.abs(expected).max()))


# --- Refusals, shards, overwrite. ---------------------------------------------


def test_sharded_export_and_overwrite(tokenizer_dir, tmp_path):
  """Shards and their index; a bare tokenizer.json gets a config naming
  BERT's special tokens; an earlier export is not mixed into a new one."""
  fields = MODELS["scan_cls"]
  params = random_params(fields, seed=8)
  directory = str(tmp_path / "sharded")
  bare = str(tmp_path / "bare.json")
  shutil.copyfile(os.path.join(tokenizer_dir, "tokenizer.json"), bare)
  hf_bert.export_hf_bert(directory, params, fields, tokenizer_path=bare,
                         max_shard_bytes=8192)
  shards = sorted(n for n in os.listdir(directory) if n.startswith("model-"))
  assert len(shards) > 2 and "model.safetensors" not in os.listdir(directory)
  assert "vocab.txt" not in os.listdir(directory)
  with open(os.path.join(directory, "tokenizer_config.json")) as f:
    assert json.load(f) == {
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "unk_token": "[UNK]", "mask_token": "[MASK]",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": True, "model_max_length": 24}
  assert_same_tree(reimport(fields, directory), params)
  with pytest.raises(hf_bert.ExportError, match="overwrite=True"):
    hf_bert.export_hf_bert(directory, params, fields,
                           tokenizer_path=tokenizer_dir)
  hf_bert.export_hf_bert(directory, params, fields,
                         tokenizer_path=tokenizer_dir, overwrite=True)
  assert not [n for n in os.listdir(directory) if n.startswith("model-")]
  assert_same_tree(reimport(fields, directory), params)


def test_export_refuses_what_cannot_be_written(tokenizer_dir, tmp_path):
  params = random_params(BASE)
  out = lambda name: str(tmp_path / name)
  export = functools.partial(hf_bert.export_hf_bert,
                             tokenizer_path=tokenizer_dir)
  small = dict(BASE, vocab_size=90)
  with pytest.raises(hf_bert.ExportError, match="100 tokens but the model's "
                     "vocab_size is 90"):
    export(out("a"), random_params(small), small)
  broken = jax.tree.map(np.copy, params)
  broken["encoder"]["layer_1"]["output"]["kernel"][0, 0] = np.nan
  with pytest.raises(hf_bert.ExportError,
                     match="encoder.layer.1.output.dense.weight holds NaN"):
    export(out("b"), broken, BASE)
  big = jax.tree.map(np.copy, params)
  big["head"]["kernel"][0, 0] = 1e6
  with pytest.raises(hf_bert.ExportError,
                     match="classifier.weight has values beyond float16"):
    export(out("c"), big, BASE, dtype="float16")
  with pytest.raises(hf_bert.ExportError, match=r"\['bogus'\]"):
    export(out("d"), params, dict(BASE, bogus=1))
  with pytest.raises(hf_bert.ExportError, match="pooling='max'"):
    export(out("e"), params, dict(BASE, pooling="max"))
  with pytest.raises(hf_bert.ExportError, match=r"lack \['prompt/embedding'\]"):
    export(out("f"), params, dict(BASE, num_prompts=2))
  with pytest.raises(hf_bert.ExportError, match="encoder/pooler/bias"):
    export(out("g"), params, dict(BASE, add_pooler=False))
  with pytest.raises(hf_bert.ExportError, match=r"head/bias has shape \(3,\); "
                     r"the fields give \(2,\)"):
    export(out("h"), params, dict(BASE, num_classes=2))
  (tmp_path / "x.gguf").write_bytes(b"GGUF")
  with pytest.raises(hf_bert.ExportError, match="not a GGUF"):
    export(out("i"), params, BASE, tokenizer_path=str(tmp_path / "x.gguf"))
  assert not any(os.path.exists(out(n)) for n in "abcdefghi")
