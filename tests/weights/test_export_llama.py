"""Llama students out as Hugging Face directories and GGUF files, and back.

A tiny random Llama (a 300-token byte-level BPE trained here, 2 layers,
4 heads / 2 KV heads) and a variant with everything that can go wrong
(untied head, head_dim != width / heads, Llama 3 RoPE scaling, scan_layers,
a vocabulary padded past the tokenizer, an MLP whose rows do not fit Q8_0
blocks) are exported and read back with kdjax's own importer
(`load_pretrained('llama:<dir or .gguf>')`): float32 files give the same
bits and logits, bfloat16 / float16 / Q8_0 files their rounded values. The
HF directory is also run by a float64 numpy LlamaForCausalLM that reads only
the files (and by transformers when it is installed), and the GGUF's
attn_q rows and rope_freqs are checked against llama.cpp's converter,
transcribed, so exporter and importer cannot agree on a wrong layout.
"""

import functools
import importlib.util
import json
import math
import os

import jax
import ml_collections
import ml_dtypes
import numpy as np
import pytest
import tokenizers as tk

from kdjax.data import tokenizer as tokenizer_lib
from kdjax.models import llama as llama_model
from kdjax.models import partitioning
from kdjax.models import stacking
from kdjax.weights import pretrained
from kdjax.weights.exporters import gguf_llama
from kdjax.weights.exporters import hf_llama
from kdjax.weights.exporters import manifest as manifest_lib
from kdjax.weights.importers import llama as llama_import

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_SIZE = 300
BASE = dict(vocab_size=TOKENIZER_SIZE, width=32, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=0, mlp_dim=64, rope_theta=10000.0,
            norm_eps=1e-5, tie_embeddings=True, max_length=16)
# head_dim 16 at theta 500000: wavelengths 6 .. 616000; Llama 3.1's scaling
# (8, 1, 4, 8192) slows three of the eight and blends one.
VARIANT = dict(BASE, vocab_size=320, tie_embeddings=False, head_dim=16,
               mlp_dim=48, rope_theta=500000.0, rope_type="llama3",
               rope_factor=8.0, rope_low_freq_factor=1.0,
               rope_high_freq_factor=4.0, rope_original_max_length=8192,
               scan_layers=True)
MODELS = {"base": BASE, "variant": VARIANT}
TEXTS = ["Hello world! 12345", "<|im_start|>user\nthe lazy dog<|im_end|>",
         "héllo wörld, a tiny corpus  \t 7 foxes"]

smollm2 = pytest.mark.skipif(
    importlib.util.find_spec(llama_import.SMOLLM2_PACKAGE) is None,
    reason=f"SmolLM2 GGUF not installed: `{llama_import.SMOLLM2_INSTALL}`")


def train_tokenizer(digits: bool = False) -> tk.Tokenizer:
  """A 300-token byte-level BPE (GPT-2's pre-tokenizer, or SmolLM's with
  every digit alone)."""
  tokenizer = tk.Tokenizer(tk.models.BPE())
  byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.pre_tokenizer = (tk.pre_tokenizers.Sequence(
      [tk.pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if digits else byte_level)
  tokenizer.decoder = tk.decoders.ByteLevel()
  tokenizer.post_processor = tk.processors.ByteLevel(trim_offsets=False)
  trainer = tk.trainers.BpeTrainer(
      vocab_size=TOKENIZER_SIZE, special_tokens=SPECIALS,
      initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  corpus = ["the quick brown fox jumps over the lazy dog 12345",
            "hello world, this is a tiny corpus for a tiny tokenizer"] * 40
  tokenizer.train_from_iterator(corpus, trainer)
  assert tokenizer.get_vocab_size() == TOKENIZER_SIZE
  return tokenizer


@pytest.fixture(name="tokenizers", scope="module")
def tokenizers_fixture(tmp_path_factory):
  """{'base': tokenizer.json path (GPT-2 style), 'variant': (SmolLM
  style)}."""
  out = {}
  for kind, digits in (("base", False), ("variant", True)):
    path = str(tmp_path_factory.mktemp(f"tok_{kind}") / "tokenizer.json")
    train_tokenizer(digits).save(path)
    out[kind] = path
  return out


def abstract(fields):
  """The model's params as float32 ShapeDtypeStructs (unboxed)."""
  model = llama_model.Llama(**fields)
  return partitioning.unbox(jax.eval_shape(
      model.init, jax.random.key(0), np.zeros((1, 4), np.int32))["params"])


def random_params(fields, seed=0):
  """Random float32 numpy params, any layout: norm scales near 1, the
  embedding of unit scale, kernels 1 / sqrt(fan-in) (activations keep their
  size through the layers)."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    names = [str(getattr(k, "key", k)) for k in path]
    if any("norm" in n for n in names):
      return (1.0 + 0.3 * rng.normal(size=shape.shape)).astype(np.float32)
    fan_in = (1 if "embed" in names
              else shape.shape[-3] if names[-2] in ("query", "key", "value")
              else math.prod(shape.shape[-3 if names[-2] == "out" else -2:-1]))
    return rng.normal(0.0, fan_in ** -0.5, shape.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, abstract(fields))


@functools.lru_cache(maxsize=None)
def _apply(items):
  return jax.jit(llama_model.Llama(**dict(items)).apply)


def logits(fields, params, tokens):
  return np.asarray(_apply(tuple(sorted(fields.items())))({"params": params},
                                                         tokens))


def tokens_for(seed=1):
  return np.random.default_rng(seed).integers(
      0, TOKENIZER_SIZE, (2, 12)).astype(np.int32)


def assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def imported_fields(fields):
  """What the importer reads back: no scan_layers, head_dim 0 for the
  default size."""
  out = {k: v for k, v in fields.items() if k != "scan_layers"}
  if out["head_dim"] == out["width"] // out["num_heads"]:
    out["head_dim"] = 0
  return out


def manifest(fmt):
  return manifest_lib.build_manifest(
      source_run="/runs/tiny", step=np.int64(40), teacher="llama:",
      objective={"name": "kl", "temperature": np.float32(2.0)},
      eval_metrics={"eval/loss": np.float32(1.5), "eval/ppl": float("nan")},
      fmt=fmt)


# --- Hugging Face directories. ---------------------------------------------


def test_hf_state_dict_is_the_importers_inverse():
  for fields in MODELS.values():
    params = random_params(fields, seed=2)
    sd = hf_llama.to_hf_state_dict(params, fields)
    h, kv, dh = fields["num_heads"], fields["num_kv_heads"], (
        fields["head_dim"] or 8)
    assert sd["model.layers.1.self_attn.q_proj.weight"].shape == (h * dh, 32)
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (kv * dh, 32)
    assert sd["model.layers.0.self_attn.o_proj.weight"].shape == (32, h * dh)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (
        32, fields["mlp_dim"])
    assert ("lm_head.weight" in sd) == (not fields["tie_embeddings"])
    back = llama_import.convert_hf(sd, imported_fields(fields))
    if fields.get("scan_layers"):
      back = stacking.stack(back, "layers")
    assert_same_tree(back, params)
  # A module or ConfigDict works as fields; the head must match tying.
  params = random_params(BASE)
  for fields in (llama_model.Llama(**BASE),
                 ml_collections.ConfigDict(dict(name="llama", **BASE))):
    sd = hf_llama.to_hf_state_dict({"params": params}, fields)
    assert set(sd) == set(hf_llama.to_hf_state_dict(params, BASE))
  with pytest.raises(hf_llama.ExportError, match="lm_head/kernel"):
    hf_llama.to_hf_state_dict(
        dict(params, lm_head={"kernel": np.zeros((32, 300), np.float32)}),
        BASE)
  with pytest.raises(hf_llama.ExportError, match=r"layers_0/mlp/gate/kernel "
                     r"has shape \(32, 64\); the fields give \(32, 48\)"):
    hf_llama.to_hf_state_dict(params, dict(BASE, mlp_dim=48))


@pytest.mark.parametrize("kind", ["base", "variant"])
def test_hf_export_reimports_bit_for_bit(kind, tokenizers, tmp_path):
  fields, tokenizer_path = MODELS[kind], tokenizers[kind]
  params = random_params(fields, seed=3)
  directory = str(tmp_path / "hf")
  summary = hf_llama.export_hf(directory, params, fields,
                               tokenizer_path=tokenizer_path,
                               manifest=manifest("hf"))
  assert sorted(os.listdir(directory)) == sorted(summary["files"]) == [
      "config.json", "generation_config.json", "kdjax_manifest.json",
      "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  eos = SPECIALS.index("<|endoftext|>")
  assert config == {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": fields["vocab_size"], "hidden_size": 32,
      "intermediate_size": fields["mlp_dim"], "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2,
      "head_dim": fields["head_dim"] or 8, "hidden_act": "silu",
      "max_position_embeddings": 16, "rms_norm_eps": 1e-5,
      "rope_theta": fields["rope_theta"],
      "rope_scaling": None if kind == "base" else {
          "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
      "tie_word_embeddings": kind == "base", "attention_bias": False,
      "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
      "pretraining_tp": 1, "use_cache": True, "bos_token_id": eos,
      "eos_token_id": eos, "torch_dtype": "float32"}
  # kdjax's importer: the fields, then the same bits and logits.
  fields_back, _ = llama_import.load_hf(directory)
  assert fields_back == imported_fields(fields)
  loaded = pretrained.load_pretrained(abstract(fields), "llama:" + directory,
                                      model_fields=fields)
  assert_same_tree(loaded, params)
  tokens = tokens_for()
  np.testing.assert_array_equal(logits(fields, loaded, tokens),
                                logits(fields, params, tokens))
  # The tokenizer files.
  original = tokenizer_lib.load(tokenizer_path)
  copied = tokenizer_lib.load(directory)
  for text in TEXTS:
    assert copied.encode(text).ids == original.encode(text).ids
  with open(os.path.join(directory, "tokenizer_config.json")) as f:
    tokenizer_config = json.load(f)
  assert tokenizer_config["bos_token"] == tokenizer_config["eos_token"] == (
      "<|endoftext|>")
  assert tokenizer_config["model_max_length"] == 16
  with open(os.path.join(directory, "generation_config.json")) as f:
    assert json.load(f) == {"bos_token_id": eos, "eos_token_id": eos}
  written = manifest_lib.read_manifest(directory)
  assert written["format_version"] == manifest_lib.FORMAT_VERSION
  assert written["step"] == 40 and written["format"] == "hf"
  assert written["eval_metrics"] == {"eval/loss": 1.5, "eval/ppl": None}


def test_hf_sharded_export(tokenizers, tmp_path):
  fields = VARIANT
  params = random_params(fields, seed=4)
  directory = str(tmp_path / "sharded")
  summary = hf_llama.export_hf(directory, params, fields,
                               tokenizer_path=tokenizers["variant"],
                               max_shard_bytes=16384)
  shards = sorted(n for n in os.listdir(directory)
                  if n.endswith(".safetensors"))
  assert len(shards) > 2 and "model.safetensors" not in shards
  assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  with open(os.path.join(directory, "model.safetensors.index.json")) as f:
    index = json.load(f)
  sd = hf_llama.to_hf_state_dict(params, fields)
  assert set(index["weight_map"]) == set(sd)
  assert set(index["weight_map"].values()) == set(shards)
  assert index["metadata"]["total_size"] == summary["total_bytes"] == sum(
      v.nbytes for v in sd.values())
  for shard in shards:  # None past the limit unless one tensor is.
    size = os.path.getsize(os.path.join(directory, shard))
    names = [n for n, file in index["weight_map"].items() if file == shard]
    assert len(names) == 1 or size < 16384 + 4096
  loaded = pretrained.load_pretrained(abstract(fields), "llama:" + directory,
                                      model_fields=fields)
  assert_same_tree(loaded, params)
  # An earlier export is not mixed into a new one.
  with pytest.raises(hf_llama.ExportError, match="overwrite=True"):
    hf_llama.export_hf(directory, params, fields,
                       tokenizer_path=tokenizers["variant"])
  hf_llama.export_hf(directory, params, fields,
                     tokenizer_path=tokenizers["variant"], overwrite=True)
  assert not [n for n in os.listdir(directory) if n.startswith("model-")]
  assert_same_tree(stacking.stack(llama_import.load_hf(directory)[1],
                                  "layers"), params)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_hf_half_precision_export(dtype, tokenizers, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  fields = VARIANT
  params = random_params(fields, seed=5)
  directory = str(tmp_path / dtype)
  hf_llama.export_hf(directory, params, fields,
                     tokenizer_path=tokenizers["variant"], dtype=dtype)
  stored = load_file(os.path.join(directory, "model.safetensors"))
  assert {str(v.dtype) for v in stored.values()} == {dtype}
  with open(os.path.join(directory, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == dtype
  half = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
  rounded = jax.tree.map(lambda x: x.astype(half).astype(np.float32), params)
  loaded = pretrained.load_pretrained(abstract(fields), "llama:" + directory,
                                      model_fields=fields)
  assert_same_tree(loaded, rounded)
  assert not np.array_equal(loaded["layers"]["mlp"]["up"]["kernel"],
                            params["layers"]["mlp"]["up"]["kernel"])


def reference_logits(directory, tokens):
  """float64 logits of a HF Llama directory, from its files alone
  (transformers' LlamaForCausalLM: rotate_half RoPE with 'llama3' scaling,
  GQA, SwiGLU, RMSNorm), transcribed independently of kdjax."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, "config.json")) as f:
    c = json.load(f)
  sd = {}
  for name in os.listdir(directory):
    if name.endswith(".safetensors"):
      sd.update({k: np.asarray(v, np.float64) for k, v in
                 load_file(os.path.join(directory, name)).items()})
  b, length = tokens.shape
  h, kv, dh = (c["num_attention_heads"], c["num_key_value_heads"],
               c["head_dim"])
  inv_freq = 1.0 / c["rope_theta"] ** (np.arange(0, dh, 2) / dh)
  scaling = c["rope_scaling"]
  if scaling:  # transformers' _compute_llama3_parameters.
    old = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    slowed = np.where(wavelength > old / low, inv_freq / scaling["factor"],
                      inv_freq)
    smooth = (old / wavelength - low) / (high - low)
    blended = (1 - smooth) * slowed / scaling["factor"] + smooth * slowed
    medium = ~(wavelength < old / high) & ~(wavelength > old / low)
    inv_freq = np.where(medium, blended, slowed)
  angles = np.arange(length)[:, None] * inv_freq
  angles = np.concatenate([angles, angles], -1)[None, :, None, :]

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True)
                       + c["rms_norm_eps"]) * w

  def rope(x):
    x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
    return x * np.cos(angles) + np.concatenate([-x2, x1], -1) * np.sin(angles)

  x = sd["model.embed_tokens.weight"][tokens]
  causal = np.tril(np.ones((length, length), bool))
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    y = rms(x, sd[p + "input_layernorm.weight"])
    q = rope((y @ sd[p + "self_attn.q_proj.weight"].T).reshape(b, length, h,
                                                               dh))
    k = rope((y @ sd[p + "self_attn.k_proj.weight"].T).reshape(b, length, kv,
                                                               dh))
    v = (y @ sd[p + "self_attn.v_proj.weight"].T).reshape(b, length, kv, dh)
    k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    scores = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(dh)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attention = np.einsum("bhls,bshd->blhd", probs, v).reshape(b, length, -1)
    x = x + attention @ sd[p + "self_attn.o_proj.weight"].T
    y = rms(x, sd[p + "post_attention_layernorm.weight"])
    gate = y @ sd[p + "mlp.gate_proj.weight"].T
    up = y @ sd[p + "mlp.up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ sd[p + "mlp.down_proj.weight"].T
  x = rms(x, sd["model.norm.weight"])
  head = (sd["model.embed_tokens.weight"] if c["tie_word_embeddings"]
          else sd["lm_head.weight"])
  return x @ head.T


def transformers_logits(directory, tokens):
  """LlamaForCausalLM's logits, or None when transformers/torch are not
  installed (the numpy reference stands in: no skip, CI fails on skips)."""
  if not all(importlib.util.find_spec(m) for m in ("transformers", "torch")):
    return None
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.LlamaForCausalLM.from_pretrained(
      directory, torch_dtype=torch.float32)
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("kind", ["base", "variant"])
def test_hf_export_runs_as_llama_for_causal_lm(kind, tokenizers, tmp_path):
  """The directory's own semantics (not kdjax's importer): a float64
  LlamaForCausalLM on the files gives kdjax's logits (and transformers, if
  installed, within 1e-4)."""
  fields = MODELS[kind]
  params = random_params(fields, seed=6)
  directory = str(tmp_path / "hf")
  hf_llama.export_hf(directory, params, fields,
                     tokenizer_path=tokenizers[kind])
  tokens = tokens_for(seed=7)
  ours = logits(fields, params, tokens)
  expected = reference_logits(directory, tokens)
  np.testing.assert_allclose(ours, expected, rtol=0,
                             atol=1e-5 * max(1.0, np.abs(expected).max()))
  theirs = transformers_logits(directory, tokens)
  if theirs is not None:
    assert np.abs(theirs - ours).max() < 1e-4


# --- GGUF. ------------------------------------------------------------------


def llama_cpp_permute(weights, n_head):
  """convert_hf_to_gguf.py's LlamaModel.permute, transcribed."""
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2,
                          *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def gguf_meta(reader):
  return {k: tokenizer_lib.gguf_value(reader, k) for k in reader.fields
          if not k.startswith("GGUF.") and not k.startswith("tokenizer.ggml.t")
          and k != "tokenizer.ggml.merges"}


@pytest.mark.parametrize("kind", ["base", "variant"])
def test_gguf_f32_reimports_bit_for_bit(kind, tokenizers, tmp_path):
  import gguf  # pylint: disable=g-import-not-at-top
  fields, tokenizer_path = MODELS[kind], tokenizers[kind]
  params = random_params(fields, seed=8)
  path = str(tmp_path / "student.gguf")
  summary = gguf_llama.export_gguf(path, params, fields,
                                   tokenizer_path=tokenizer_path,
                                   manifest=manifest("gguf:f32"))
  assert summary["fallbacks"] == {}
  assert set(summary["tensor_types"].values()) == {"F32"}
  assert summary["tokenizer_pre"] == ("gpt2" if kind == "base" else "smollm")
  assert summary["tokenizer_round_trips"]
  assert os.listdir(tmp_path) == ["student.gguf"]  # No partial file left.
  with pytest.raises(hf_llama.ExportError, match="overwrite=True"):
    gguf_llama.export_gguf(path, params, fields, tokenizer_path=tokenizer_path)
  # The metadata and tensors llama.cpp reads.
  reader = gguf.GGUFReader(path)
  meta = gguf_meta(reader)
  dh = fields["head_dim"] or 8
  want = {"general.architecture": "llama", "general.type": "model",
          "general.name": "kdjax-llama", "general.file_type": 0,
          "general.quantization_version": 2,
          "llama.context_length": 16, "llama.embedding_length": 32,
          "llama.block_count": 2,
          "llama.feed_forward_length": fields["mlp_dim"],
          "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
          "llama.rope.freq_base": fields["rope_theta"],
          "llama.rope.dimension_count": dh,
          "llama.attention.layer_norm_rms_epsilon": 1e-5,
          "llama.vocab_size": fields["vocab_size"],
          "tokenizer.ggml.model": "gpt2",
          "tokenizer.ggml.pre": summary["tokenizer_pre"],
          "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0,
          "tokenizer.ggml.add_bos_token": False,
          "tokenizer.ggml.add_eos_token": False,
          "tokenizer.ggml.add_space_prefix": False}
  if kind == "variant":
    want.update({"llama.attention.key_length": 16,
                 "llama.attention.value_length": 16})
  manifest_text = meta.pop(manifest_lib.GGUF_KEY)
  assert meta == want
  assert json.loads(manifest_text)["format"] == "gguf:f32"
  assert manifest_lib.read_manifest(path)["step"] == 40
  tokens = tokenizer_lib.gguf_value(reader, "tokenizer.ggml.tokens")
  types = tokenizer_lib.gguf_value(reader, "tokenizer.ggml.token_type")
  assert len(tokens) == fields["vocab_size"]
  assert tokens[:3] == SPECIALS and types[:4] == [3, 3, 3, 1]
  if kind == "variant":  # Rows past the tokenizer: llama.cpp's padding.
    assert tokens[-1] == "[PAD319]" and types[-1] == 5
  tensors = {t.name: t for t in reader.tensors}
  names = {"token_embd.weight", "output_norm.weight"} | {
      f"blk.{i}.{n}.weight" for i in range(2) for n in (
          "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
          "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
  if kind == "variant":
    names |= {"output.weight", "rope_freqs.weight"}
  assert set(tensors) == names
  sd = hf_llama.to_hf_state_dict(params, fields)
  for i, (proj, heads) in enumerate((("q", 4), ("k", 2))):
    np.testing.assert_array_equal(
        np.asarray(tensors[f"blk.{i}.attn_{proj}.weight"].data),
        llama_cpp_permute(sd[f"model.layers.{i}.self_attn.{proj}_proj.weight"],
                          heads))
  if kind == "variant":  # llama.cpp's divisors: theta_i / factor_i.
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    np.testing.assert_allclose(
        llama_model.rope_frequencies(dh, fields["rope_theta"]) / factors,
        llama_model.rope_frequencies(dh, fields["rope_theta"], "llama3", 8.0,
                                     1.0, 4.0, 8192), rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == 8.0
  # kdjax's importer: the fields, the bits, the logits, the tokenizer.
  assert llama_import.load_gguf(path)[0] == imported_fields(fields)
  loaded = pretrained.load_pretrained(abstract(fields), "llama:" + path,
                                      model_fields=fields)
  assert_same_tree(loaded, params)
  tokens = tokens_for()
  np.testing.assert_array_equal(logits(fields, loaded, tokens),
                                logits(fields, params, tokens))
  original, back = tokenizer_lib.load(tokenizer_path), tokenizer_lib.load(path)
  for text in TEXTS:
    assert back.encode(text).ids == original.encode(text).ids
    assert back.decode(back.encode(text).ids,
                       skip_special_tokens=False) == text


def test_gguf_f16(tokenizers, tmp_path):
  fields = VARIANT
  params = random_params(fields, seed=9)
  path = str(tmp_path / "student-f16.gguf")
  summary = gguf_llama.export_gguf(path, params, fields,
                                   tokenizer_path=tokenizers["variant"],
                                   file_type="f16")
  types = summary["tensor_types"]
  assert {t for n, t in types.items() if "norm" in n or "rope" in n} == {
      "F32"}
  assert {t for n, t in types.items()
          if "norm" not in n and "rope" not in n} == {"F16"}
  loaded = pretrained.load_pretrained(abstract(fields), "llama:" + path,
                                      model_fields=fields)

  def rounded(path_, x):
    if any("norm" in str(getattr(k, "key", k)) for k in path_):
      return x
    return x.astype(np.float16).astype(np.float32)
  assert_same_tree(loaded, jax.tree_util.tree_map_with_path(rounded, params))
  tokens = tokens_for()
  want = logits(fields, params, tokens)
  np.testing.assert_allclose(logits(fields, loaded, tokens), want, rtol=0,
                             atol=3e-3 * np.abs(want).max())


def test_gguf_rope_without_blend_reimports(tokenizers, tmp_path):
  """'llama3' scaling at original_max_length 4096 leaves no frequency in
  the blend (divisors 1,1,1,1,8,8,8,8): the GGUF still imports."""
  fields = dict(VARIANT, scan_layers=False, rope_original_max_length=4096)
  params = random_params(fields, seed=14)
  path = str(tmp_path / "student.gguf")
  gguf_llama.export_gguf(path, params, fields,
                         tokenizer_path=tokenizers["variant"])
  np.testing.assert_array_equal(gguf_llama.rope_factors(fields),
                                [1.0] * 4 + [8.0] * 4)
  loaded = pretrained.load_pretrained(abstract(fields), "llama:" + path,
                                      model_fields=imported_fields(fields))
  assert_same_tree(loaded, params)


@pytest.mark.parametrize("kind", ["base", "variant"])
def test_gguf_q8_0(kind, tokenizers, tmp_path):
  fields = MODELS[kind]
  params = random_params(fields, seed=10)
  path = str(tmp_path / "student-q8_0.gguf")
  summary = gguf_llama.export_gguf(path, params, fields,
                                   tokenizer_path=tokenizers[kind],
                                   file_type="q8_0")
  types = summary["tensor_types"]
  matrices = {n for n in types if "norm" not in n and "rope" not in n}
  if kind == "base":
    assert summary["fallbacks"] == {}
    assert {types[n] for n in matrices} == {"Q8_0"}
  else:  # mlp_dim 48: ffn_down's rows are not whole blocks of 32.
    assert set(summary["fallbacks"]) == {"blk.0.ffn_down.weight",
                                         "blk.1.ffn_down.weight"}
    assert "F16 instead" in summary["fallbacks"]["blk.0.ffn_down.weight"]
    assert {types[n] for n in matrices if "ffn_down" in n} == {"F16"}
    assert {types[n] for n in matrices if "ffn_down" not in n} == {"Q8_0"}
  loaded = pretrained.load_pretrained(abstract(fields), "llama:" + path,
                                      model_fields=fields)

  def check(path_, got, want):
    name = "/".join(str(getattr(k, "key", k)) for k in path_)
    if "norm" in name:
      np.testing.assert_array_equal(got, want)
    else:  # Half a Q8_0 step (amax / 127 per block of 32), with slack.
      error = np.abs(got - want).max()
      assert 0 < error <= np.abs(want).max() / 127, name
  jax.tree_util.tree_map_with_path(check, loaded, params)
  tokens = tokens_for()
  want = logits(fields, params, tokens)
  got = logits(fields, loaded, tokens)
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
  assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85


def test_hf_export_from_a_gguf_tokenizer(tokenizers, tmp_path):
  """A run whose tokenizer is a .gguf: tokenizer.json is the rebuilt
  tokenizer, bos/eos ids come from the GGUF."""
  fields = BASE
  params = random_params(fields, seed=11)
  path = str(tmp_path / "student.gguf")
  gguf_llama.export_gguf(path, params, fields,
                         tokenizer_path=tokenizers["base"], bos_id=1,
                         eos_id=2)
  directory = str(tmp_path / "hf")
  hf_llama.export_hf(directory, params, fields, tokenizer_path=path)
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
  with open(os.path.join(directory, "tokenizer_config.json")) as f:
    tokenizer_config = json.load(f)
  assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == (
      "<|im_start|>", "<|im_end|>")
  original = tokenizer_lib.load(tokenizers["base"])
  rebuilt = tokenizer_lib.load(directory)
  for text in TEXTS:
    assert rebuilt.encode(text).ids == original.encode(text).ids


def train_llama3_tokenizer() -> tk.Tokenizer:
  """A Llama-3-style byte-level BPE: its post-processor prepends
  <|begin_of_text|> (id 0), which is not its end-of-text token (id 1)."""
  tokenizer = tk.Tokenizer(tk.models.BPE(ignore_merges=True))
  tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
      tk.pre_tokenizers.Split(tk.Regex(tokenizer_lib.LLAMA3_SPLIT),
                              behavior="isolated"),
      tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(
      vocab_size=TOKENIZER_SIZE,
      special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
      initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tokenizer.train_from_iterator(
      ["the quick brown fox jumps over the lazy dog 12345 hello world"] * 40,
      trainer)
  tokenizer.post_processor = tk.processors.Sequence([
      tk.processors.ByteLevel(trim_offsets=False),
      tk.processors.TemplateProcessing(
          single="<|begin_of_text|> $A",
          pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
          special_tokens=[("<|begin_of_text|>", 0)])])
  return tokenizer


def test_bare_llama3_tokenizer_keeps_its_bos(tmp_path):
  """A tokenizer.json with no config beside it: BOS is the token its
  post-processor prepends, not EOS, so add_bos puts the same id first."""
  import gguf  # pylint: disable=g-import-not-at-top
  tokenizer = train_llama3_tokenizer()
  tokenizer_path = str(tmp_path / "tokenizer.json")
  tokenizer.save(tokenizer_path)
  source = hf_llama.load_tokenizer_source(tokenizer_path)
  assert (source.bos_id, source.eos_id, source.add_bos) == (0, 1, True)
  fields = dict(BASE, num_layers=1)
  params = random_params(fields, seed=13)
  path = str(tmp_path / "student.gguf")
  summary = gguf_llama.export_gguf(path, params, fields,
                                   tokenizer_path=tokenizer_path)
  assert summary["tokenizer_pre"] == "llama-bpe"
  assert summary["tokenizer_round_trips"]
  assert tokenizer_lib.gguf_value(gguf.GGUFReader(path),
                                  "tokenizer.ggml.bos_token_id") == 0
  directory = str(tmp_path / "hf")
  hf_llama.export_hf(directory, params, fields, tokenizer_path=tokenizer_path)
  with open(os.path.join(directory, "config.json")) as f:
    assert json.load(f)["bos_token_id"] == 0
  for back in (tokenizer_lib.load(path), tokenizer_lib.load(directory)):
    for text in TEXTS:
      assert back.encode(text).ids == tokenizer.encode(text).ids
      assert back.encode(text).ids[0] == 0


@smollm2
def test_smollm2_tokenizer_through_gguf_and_hf(tmp_path):
  """SmolLM2's own tokenizer (pre 'smollm', 17 control tokens, chat
  template) survives both exports, on a 1-layer model of its vocabulary."""
  source = llama_import.smollm2_gguf_path()
  fields = dict(BASE, vocab_size=49152, num_layers=1)
  params = random_params(fields, seed=12)
  path = str(tmp_path / "smol.gguf")
  summary = gguf_llama.export_gguf(path, params, fields,
                                   tokenizer_path=source, file_type="f16")
  assert summary["tokenizer_pre"] == "smollm"
  assert summary["tokenizer_round_trips"]
  import gguf  # pylint: disable=g-import-not-at-top
  reader, original = gguf.GGUFReader(path), gguf.GGUFReader(source)
  for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
              "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
    assert (tokenizer_lib.gguf_value(reader, key)
            == tokenizer_lib.gguf_value(original, key)), key
  directory = str(tmp_path / "hf")
  hf_llama.export_hf(directory, params, fields, tokenizer_path=source)
  with open(os.path.join(directory, "tokenizer_config.json")) as f:
    config = json.load(f)
  assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>")
  assert "<|im_start|>" in config["chat_template"]
  want = tokenizer_lib.from_gguf(original)
  for back in (tokenizer_lib.from_gguf(reader),
               tokenizer_lib.load(directory)):
    for text in TEXTS + ["Digits 2024 and 3.14159, code: x_1+=2"]:
      assert back.encode(text).ids == want.encode(text).ids


# --- Refusals and the manifest. ---------------------------------------------


def test_exports_refuse_what_cannot_be_written(tokenizers, tmp_path):
  params = random_params(BASE)
  small = dict(BASE, vocab_size=200)
  with pytest.raises(hf_llama.ExportError, match="300 tokens but the model's "
                     "vocab_size is 200"):
    hf_llama.export_hf(str(tmp_path / "a"), random_params(small), small,
                       tokenizer_path=tokenizers["base"])
  broken = jax.tree.map(np.copy, params)
  broken["layers_1"]["mlp"]["down"]["kernel"][0, 0] = np.nan
  with pytest.raises(hf_llama.ExportError,
                     match="model.layers.1.mlp.down_proj.weight holds NaN"):
    gguf_llama.export_gguf(str(tmp_path / "b.gguf"), broken, BASE,
                           tokenizer_path=tokenizers["base"])
  big = jax.tree.map(np.copy, params)
  big["embed"]["embedding"][0, 0] = 1e6
  with pytest.raises(hf_llama.ExportError, match="beyond float16"):
    hf_llama.export_hf(str(tmp_path / "c"), big, BASE,
                       tokenizer_path=tokenizers["base"], dtype="float16")
  with pytest.raises(hf_llama.ExportError, match="file_type='q4_0'"):
    gguf_llama.export_gguf(str(tmp_path / "d.gguf"), params, BASE,
                           tokenizer_path=tokenizers["base"],
                           file_type="q4_0")
  with pytest.raises(hf_llama.ExportError, match=r"\['bogus'\]"):
    hf_llama.export_hf(str(tmp_path / "e"), params, dict(BASE, bogus=1),
                       tokenizer_path=tokenizers["base"])
  # A tokenizer that is no byte-level BPE kdjax or llama.cpp can rebuild.
  wordpiece = tk.Tokenizer(tk.models.WordLevel({"a": 0, "[UNK]": 1},
                                               unk_token="[UNK]"))
  wordpiece.save(str(tmp_path / "wordlevel.json"))
  with pytest.raises(hf_llama.ExportError, match="not a BPE"):
    gguf_llama.export_gguf(str(tmp_path / "f.gguf"), params, BASE,
                           tokenizer_path=str(tmp_path / "wordlevel.json"))


def test_manifest_is_plain_json():
  built = manifest("hf:bfloat16")
  assert built["format_version"] == 1 and built["producer"] == "kdjax"
  assert built["objective"] == {"name": "kl", "temperature": 2.0}
  assert isinstance(built["step"], int)
  assert json.loads(manifest_lib.to_json(built)) == built
  with pytest.raises(manifest_lib.ManifestError, match="teacher"):
    manifest_lib.build_manifest(source_run="r", step=1, teacher=object(),
                                objective="kl", eval_metrics={}, fmt="hf")
  with pytest.raises(manifest_lib.ManifestError, match="fmt"):
    manifest_lib.build_manifest(source_run="r", step=1, teacher="t",
                                objective="kl", eval_metrics={}, fmt="")
