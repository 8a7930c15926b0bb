"""Pretrained Llama weights read straight into their shards, and RoPE scaling.

A tiny synthetic Llama checkpoint (HF safetensors directory, or GGUF with a
Q8_0 tensor) is imported with a NamedSharding per parameter on the 8
simulated CPU devices: the result must equal the unsharded import bit for
bit, sit in the requested shardings, and be read shard by shard (the
file reads are recorded: no read may be a whole tensor that the mesh
splits). Then Llama 3.x's RoPE scaling (rope_type 'llama3') through
config.json and through llama.cpp's rope_freqs.weight.
"""

import json
import math
import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from kdjax.core import config as config_lib
from kdjax.core import defaults
from kdjax.distill import mesh as mesh_lib
from kdjax.models import llama as llama_model
from kdjax.models import stacking
from kdjax.weights import params as params_lib
from kdjax.weights import pretrained
from kdjax.weights import specs
from kdjax.weights import teachers
from kdjax.weights.importers import llama as llama_import

# Divisible by every mesh below; Q8_0 rows need inputs in multiples of 32.
FIELDS = dict(vocab_size=64, width=32, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=0, mlp_dim=64, rope_theta=500.0,
              norm_eps=1e-5, tie_embeddings=False, max_length=16)
DATA = defaults.lm_data(seq_length=8)


def random_hf_state(fields, seed=0):
  """Random LlamaForCausalLM tensors (HF names, [out, in])."""
  rng = np.random.default_rng(seed)
  v, d, f = fields["vocab_size"], fields["width"], fields["mlp_dim"]
  h, kv = fields["num_heads"], fields["num_kv_heads"]
  dh = fields["head_dim"] or d // h

  def w(*shape):
    return rng.normal(0.0, 1.0, shape).astype(np.float32)

  sd = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": w(d)}
  if not fields["tie_embeddings"]:
    sd["lm_head.weight"] = w(v, d)
  for i in range(fields["num_layers"]):
    p = f"model.layers.{i}."
    sd.update({p + "input_layernorm.weight": w(d),
               p + "self_attn.q_proj.weight": w(h * dh, d),
               p + "self_attn.k_proj.weight": w(kv * dh, d),
               p + "self_attn.v_proj.weight": w(kv * dh, d),
               p + "self_attn.o_proj.weight": w(d, h * dh),
               p + "post_attention_layernorm.weight": w(d),
               p + "mlp.gate_proj.weight": w(f, d),
               p + "mlp.up_proj.weight": w(f, d),
               p + "mlp.down_proj.weight": w(d, f)})
  return sd


def hf_config(fields, rope_scaling=None):
  return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
          "vocab_size": fields["vocab_size"], "hidden_size": fields["width"],
          "num_hidden_layers": fields["num_layers"],
          "num_attention_heads": fields["num_heads"],
          "num_key_value_heads": fields["num_kv_heads"],
          "intermediate_size": fields["mlp_dim"],
          "rope_theta": fields["rope_theta"],
          "rms_norm_eps": fields["norm_eps"],
          "tie_word_embeddings": fields["tie_embeddings"],
          "max_position_embeddings": fields["max_length"],
          "hidden_act": "silu", "rope_scaling": rope_scaling}


def write_hf_dir(path, fields, sd, files=1, rope_scaling=None):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config(fields, rope_scaling), f)
  if files == 1:
    save_file(sd, os.path.join(path, "model.safetensors"))
    return path
  names, weight_map = sorted(sd), {}
  for s in range(files):
    file = f"model-{s + 1:05d}-of-{files:05d}.safetensors"
    part = {n: sd[n] for n in names[s::files]}
    save_file(part, os.path.join(path, file))
    weight_map.update({n: file for n in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return path


def llama_cpp_permute(weights, n_head):
  """convert_hf_to_gguf.py's LlamaModel.permute, transcribed."""
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2,
                          *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def llama_cpp_rope_factors(dim, base, factor, low, high, old_context_len):
  """convert_hf_to_gguf.py's Llama 3.1 rope_freqs.weight, transcribed."""
  freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  factors = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < old_context_len / high:
      factors.append(1)
    elif wavelen > old_context_len / low:
      factors.append(factor)
    else:
      smooth = (old_context_len / wavelen - low) / (high - low)
      factors.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(factors, np.float32)


def write_gguf(path, fields, sd, quantize=(), rope_factors=None):
  """A llama.cpp-style GGUF of HF tensors `sd` (Q/K permuted; F32, or Q8_0
  for the HF names in `quantize`); returns the tensors as stored
  (dequantised), in HF order."""
  import gguf  # pylint: disable=g-import-not-at-top
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_block_count(fields["num_layers"])
  writer.add_context_length(fields["max_length"])
  writer.add_embedding_length(fields["width"])
  writer.add_feed_forward_length(fields["mlp_dim"])
  writer.add_head_count(fields["num_heads"])
  writer.add_head_count_kv(fields["num_kv_heads"])
  writer.add_rope_freq_base(fields["rope_theta"])
  writer.add_layer_norm_rms_eps(fields["norm_eps"])
  writer.add_vocab_size(fields["vocab_size"])
  names = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
  layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output",
           "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  stored = {}
  for name, value in sd.items():
    if name in names:
      gguf_name = names[name]
    else:
      _, _, i, rest = name.split(".", 3)
      gguf_name = f"blk.{i}.{layer[rest.rpartition('.')[0]]}.weight"
    heads = {"q_proj": fields["num_heads"], "k_proj": fields["num_kv_heads"]}
    kind = name.split(".")[-2]
    file_value = (llama_cpp_permute(value, heads[kind]) if kind in heads
                  else value)
    if name in quantize:
      q8 = gguf.GGMLQuantizationType.Q8_0
      packed = gguf.quants.quantize(file_value, q8)
      writer.add_tensor(gguf_name, packed, raw_shape=packed.shape,
                        raw_dtype=q8)
      back = gguf.quants.dequantize(packed, q8)
      stored[name] = (llama_import.unpermute_qk(back, heads[kind])
                      if kind in heads else back)
    else:
      writer.add_tensor(gguf_name, file_value)
      stored[name] = value
  if rope_factors is not None:
    writer.add_tensor("rope_freqs.weight", rope_factors)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return stored


def make_mesh(data, fsdp, model):
  return Mesh(np.array(jax.devices()).reshape(data, fsdp, model),
              ("data", "fsdp", "model"))


def shapes_and_shardings(fields, mesh, dtype="float32"):
  model = llama_model.Llama(**fields)
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype),
                        params_lib.abstract(model, DATA))
  shardings = mesh_lib.param_shardings(params_lib.logical_specs(model, DATA),
                                       mesh, defaults.PARTITION_RULES)
  return shapes, shardings


def parts(sharding, ndim):
  """Into how many distinct pieces `sharding` cuts an array."""
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  count = 1
  for axes in spec:
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None:
        count *= sharding.mesh.shape[axis]
  return count


@pytest.fixture(name="checkpoints")
def checkpoints_fixture(tmp_path):
  """{kind: (init_from, HF tensors as the file stores them)}."""
  sd = random_hf_state(FIELDS, seed=3)
  quantized = ("model.layers.0.mlp.down_proj.weight",
               "model.layers.1.self_attn.q_proj.weight",
               "model.embed_tokens.weight")
  gguf_path = str(tmp_path / "tiny.gguf")
  stored = write_gguf(gguf_path, FIELDS, sd, quantize=quantized)
  assert not np.array_equal(stored[quantized[0]], sd[quantized[0]])
  return {"safetensors": ("llama:" + write_hf_dir(str(tmp_path / "hf"),
                                                  FIELDS, sd), sd),
          "safetensors_3_files": ("llama:" + write_hf_dir(
              str(tmp_path / "hf3"), FIELDS, sd, files=3), sd),
          "gguf_q8": ("llama:" + gguf_path, stored)}


@pytest.mark.parametrize("kind", ["safetensors", "safetensors_3_files",
                                  "gguf_q8"])
@pytest.mark.parametrize("mesh_shape,dtype", [((2, 2, 2), "float32"),
                                              ((1, 4, 2), "bfloat16"),
                                              ((1, 8, 1), "float32")])
def test_sharded_import_equals_unsharded(checkpoints, kind, mesh_shape, dtype):
  init_from, stored = checkpoints[kind]
  mesh = make_mesh(*mesh_shape)
  shapes, shardings = shapes_and_shardings(FIELDS, mesh, dtype)
  whole = pretrained.load_pretrained(shapes, init_from, model_fields=FIELDS,
                                     field="teacher")
  # The unsharded import: host numpy, nothing put on a device.
  assert all(type(x) is np.ndarray for x in jax.tree.leaves(whole))
  want = jax.tree.map(lambda x: np.asarray(x, dtype),
                      llama_import.convert_hf(stored, FIELDS))
  jax.tree.map(np.testing.assert_array_equal, whole, want)
  sharded = pretrained.load_pretrained(shapes, init_from, model_fields=FIELDS,
                                       field="teacher", shardings=shardings)

  def check(x, sharding, expected):
    assert isinstance(x, jax.Array) and x.sharding == sharding
    assert x.dtype == expected.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(x), expected)  # Bit for bit.
    pieces = {tuple((i.start, i.stop) for i in s.index)
              for s in x.addressable_shards}
    assert len(pieces) == parts(sharding, x.ndim)
  jax.tree.map(check, sharded, shardings, whole,
               is_leaf=lambda x: isinstance(x, NamedSharding))


@pytest.mark.parametrize("layers", [(), (1, 0)])
def test_scanned_sharded_import_is_the_unrolled_import_stacked(checkpoints,
                                                              layers):
  """scan_layers on a sharded mesh: the per-layer sharded import, stacked
  into the stack's own shardings (init_layers picks and reorders layers)."""
  init_from, _ = checkpoints["safetensors"]
  mesh = make_mesh(2, 2, 2)
  scanned = dict(FIELDS, scan_layers=True)
  shapes, shardings = shapes_and_shardings(scanned, mesh)
  assert shardings["layers"]["mlp"]["up"]["kernel"].spec[0] is None
  whole = pretrained.load_pretrained(
      shapes_and_shardings(FIELDS, mesh)[0], init_from, model_fields=FIELDS,
      layers=layers, field="teacher")
  sharded = pretrained.load_pretrained(shapes, init_from, model_fields=scanned,
                                       layers=layers, field="teacher",
                                       shardings=shardings)
  want = stacking.stack(whole, "layers")

  def check(x, sharding, expected):
    assert x.sharding == sharding
    np.testing.assert_array_equal(np.asarray(x), expected)
  jax.tree.map(check, sharded, shardings, want,
               is_leaf=lambda x: isinstance(x, NamedSharding))


class RecordingSafeOpen:
  """safetensors.safe_open that records the size of every read."""

  def __init__(self, real, reads):
    self._real, self._reads = real, reads

  def __call__(self, path, framework="np", **kwargs):
    handle = self._real(path, framework=framework, **kwargs)
    reads = self._reads

    class Slice:

      def __init__(self, name):
        self._slice, self._name = handle.get_slice(name), name

      def get_shape(self):
        return self._slice.get_shape()

      def __getitem__(self, index):
        out = self._slice[index]
        reads.append((self._name, out.size))
        return out

    class Handle:

      def keys(self):
        return handle.keys()

      def get_slice(self, name):
        return Slice(name)

      def get_tensor(self, name):
        out = handle.get_tensor(name)
        reads.append((name, out.size))
        return out
    return Handle()


def test_each_shard_reads_only_its_piece(checkpoints, monkeypatch):
  """Every safetensors read is exactly one shard (never a whole tensor the
  mesh splits), and each distinct shard is read once: the data-axis copies
  are not read again."""
  import safetensors  # pylint: disable=g-import-not-at-top
  reads = []
  monkeypatch.setattr(safetensors, "safe_open",
                      RecordingSafeOpen(safetensors.safe_open, reads))
  mesh = make_mesh(2, 2, 2)
  shapes, shardings = shapes_and_shardings(FIELDS, mesh)
  init_from, _ = checkpoints["safetensors"]
  sharded = pretrained.load_pretrained(shapes, init_from, model_fields=FIELDS,
                                       field="teacher", shardings=shardings)
  entries = {e.path: e for e in llama_import.layout(FIELDS)}
  flat = jax.tree_util.tree_flatten_with_path(sharded)[0]
  flat_shardings = jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  by_name = {}
  for name, size in reads:
    by_name.setdefault(name, []).append(size)
  split = 0
  for (path, x), sharding in zip(flat, flat_shardings):
    entry = entries[tuple(k.key for k in path)]
    pieces = parts(sharding, x.ndim)
    assert by_name.pop(entry.name) == [x.size // pieces] * pieces, entry.name
    split += pieces > 1
  assert split == 16 and not by_name  # Only the norms are whole.


def test_gguf_dequantises_only_the_rows_of_a_shard(checkpoints, monkeypatch):
  """(Columns too, in whole quantisation blocks: here one block per row.)"""
  reads = []
  real = llama_import._dequantize  # pylint: disable=protected-access

  def recording(tensor, rows=slice(None), cols=None):
    out = real(tensor, rows, cols)
    reads.append((tensor.name, out.shape[0], int(tensor.shape[-1])))
    return out
  monkeypatch.setattr(llama_import, "_dequantize", recording)
  shapes, shardings = shapes_and_shardings(FIELDS, make_mesh(1, 4, 2))
  init_from, _ = checkpoints["gguf_q8"]
  pretrained.load_pretrained(shapes, init_from, model_fields=FIELDS,
                             field="teacher", shardings=shardings)
  seen = set()
  for name, rows, total in reads:
    if "norm" not in name:  # Every 2-D weight's rows are split 2 or 4 ways.
      assert rows <= total // 2, (name, rows, total)
      seen.add(name)
  assert {"blk.1.attn_q.weight", "blk.0.ffn_down.weight",
          "token_embd.weight", "output.weight"} <= seen


def test_teacher_loads_into_its_shards(checkpoints):
  """kdjax.weights.teachers.load with shardings_of (the sharded layout),
  in bfloat16: the same values as the unsharded (host) load."""
  init_from, _ = checkpoints["safetensors"]
  config = defaults.get_config()
  config.data = defaults.lm_data(seq_length=8)
  config.teacher.model = ml_collections.ConfigDict(dict(name="llama",
                                                        **FIELDS))
  config.teacher.pretrained = True
  config.teacher.init_from = init_from
  config.teacher.precision.params = "bfloat16"
  spec = specs.teacher_specs(config, "unused")[0]
  mesh = make_mesh(2, 2, 2)

  def shardings_of(model):
    return mesh_lib.param_shardings(params_lib.logical_specs(model, DATA),
                                    mesh, defaults.PARTITION_RULES)
  host = teachers.load(config, spec)
  sharded = teachers.load(config, spec, shardings_of=shardings_of)
  assert sharded.source == host.source
  assert all(jax.tree.leaves(jax.tree.map(
      lambda x, s: x.sharding == s, sharded.params,
      shardings_of(sharded.model))))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y),
               sharded.params, host.params)
  assert {str(x.dtype) for x in jax.tree.leaves(sharded.params)} == {
      "bfloat16"}


def test_sharded_import_refuses_mismatches(checkpoints):
  shapes, shardings = shapes_and_shardings(FIELDS, make_mesh(2, 2, 2))
  init_from, _ = checkpoints["safetensors"]
  with pytest.raises(config_lib.ConfigError, match="mlp_dim=48"):
    pretrained.load_pretrained(shapes, init_from,
                               model_fields=dict(FIELDS, mlp_dim=48),
                               shardings=shardings)
  # Layer selection: model layer k from checkpoint layer (1, 0)[k].
  swapped = pretrained.load_pretrained(
      shapes, init_from, model_fields=FIELDS, layers=(1, 0),
      shardings=shardings)
  whole = pretrained.load_pretrained(shapes, init_from, model_fields=FIELDS)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y),
               swapped["layers_0"], whole["layers_1"])
  with pytest.raises(config_lib.ConfigError, match="outside"):
    pretrained.load_pretrained(shapes, init_from, model_fields=FIELDS,
                               layers=(0, 2), shardings=shardings)


# --- RoPE scaling (Llama 3.x's rope_type 'llama3'). ------------------------


def meta_llama3_inv_freq(dim, base, factor, low, high, old_context_len):
  """Meta's Llama 3.1 `apply_scaling` (what transformers' llama3 computes)."""
  freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < old_context_len / high:
      out.append(freq)
    elif wavelen > old_context_len / low:
      out.append(freq / factor)
    else:
      smooth = (old_context_len / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.asarray(out)


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# head_dim 8 at theta 500000: wavelengths 6, 167, 4443, 118000; the window
# of Llama 3.1's blend (2048..8192 here) holds one of them.
ROPE_FIELDS = dict(FIELDS, rope_theta=500000.0)


def test_hf_llama3_rope_scaling(tmp_path):
  sd = random_hf_state(ROPE_FIELDS, seed=1)
  path = write_hf_dir(str(tmp_path / "llama31"), ROPE_FIELDS, sd,
                      rope_scaling=LLAMA31)
  fields, _ = llama_import.load_hf(path)
  assert fields == dict(ROPE_FIELDS, rope_type="llama3", rope_factor=8.0,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_length=8192)
  model = llama_model.Llama(**fields)
  np.testing.assert_allclose(
      llama_model.rope_frequencies(8, *model.rope),
      meta_llama3_inv_freq(8, 500000.0, 8.0, 1.0, 4.0, 8192), rtol=1e-6)
  assert not np.allclose(llama_model.rope_frequencies(8, 500000.0),
                         llama_model.rope_frequencies(8, *model.rope))
  # The architecture check includes the RoPE fields (sharded or not).
  shapes, shardings = shapes_and_shardings(fields, make_mesh(2, 2, 2))
  for sharded in (None, shardings):

    def load(model_fields, sharded=sharded):
      return pretrained.load_pretrained(
          shapes, "llama:" + path, model_fields=model_fields,
          field="teacher", shardings=sharded)
    with pytest.raises(config_lib.ConfigError,
                       match="rope_type='default' does not match .*"
                             "rope_type='llama3'; rope_factor=8.0"):
      load(ROPE_FIELDS)
    with pytest.raises(config_lib.ConfigError,
                       match=r"rope_factor=4\.0 does not match .*"
                             r"rope_factor=8\.0.*frequencies differ"):
      load(dict(fields, rope_factor=4.0))
    load(fields)


@pytest.mark.parametrize("scaling,match", [
    ({"rope_type": "yarn", "factor": 4.0}, "rope_type='yarn'"),
    ({"type": "linear", "factor": 2.0}, "rope_type='linear'"),
    ({"rope_type": "llama3", "factor": 8.0}, "needs .*low_freq_factor"),
    (dict(LLAMA31, low_freq_factor=4.0), "high_freq_factor > low_freq_factor")])
def test_hf_other_rope_scaling_refused(scaling, match):
  with pytest.raises(llama_import.CheckpointError, match=match):
    llama_import.fields_from_hf_config(hf_config(FIELDS, scaling))
  assert llama_import.fields_from_hf_config(hf_config(
      FIELDS, {"rope_type": "default"}))["rope_theta"] == 500.0


@pytest.mark.parametrize("dim,theta,scaling", [
    (128, 500000.0, (8.0, 1.0, 4.0, 8192)),   # Llama 3.1 8B.
    (64, 500000.0, (32.0, 1.0, 4.0, 8192)),   # Llama 3.2 1B.
    (64, 500000.0, (4.0, 2.0, 32.0, 8192)),   # Fitted to the blend.
    (128, 10000.0, (2.0, 1.5, 6.0, 4096))])   # Fitted; another length.
def test_rope_fields_from_llama_cpp_factors(dim, theta, scaling):
  factors = llama_cpp_rope_factors(dim, theta, *scaling)
  rope = llama_import.rope_fields_from_factors(factors, dim, theta)
  got = llama_model.rope_frequencies(
      dim, theta, *(rope[n] for n in llama_import.ROPE_FIELDS))
  np.testing.assert_allclose(got, meta_llama3_inv_freq(dim, theta, *scaling),
                             rtol=1e-5)
  if scaling[3] == 8192:
    assert (rope["rope_factor"], rope["rope_low_freq_factor"],
            rope["rope_high_freq_factor"]) == scaling[:3]
  assert llama_import.rope_fields_from_factors(
      np.ones(dim // 2), dim, theta) == {}
  with pytest.raises(llama_import.CheckpointError, match="no 'llama3'"):
    llama_import.rope_fields_from_factors(factors[::-1], dim, theta)


@pytest.mark.parametrize("dim,theta,scaling", [
    (16, 500000.0, (8.0, 1.0, 4.0, 4096)),    # None blended.
    (16, 500000.0, (8.0, 1.0, 4.0, 1000)),    # One blended.
    (16, 10000.0, (4.0, 1.0, 4.0, 16)),       # None short.
    (16, 500000.0, (2.0, 1.0, 4.0, 4)),       # All long.
    (16, 10000.0, (0.5, 1.0, 4.0, 64))])      # A speed-up.
def test_rope_fields_from_underdetermined_factors(dim, theta, scaling):
  """Under two blended divisors leave the line free: some setting that
  gives kdjax's frequencies is found, not necessarily the written one."""
  factors = llama_cpp_rope_factors(dim, theta, *scaling)
  rope = llama_import.rope_fields_from_factors(factors, dim, theta)
  np.testing.assert_allclose(
      llama_model.rope_frequencies(
          dim, theta, *(rope[n] for n in llama_import.ROPE_FIELDS)),
      llama_model.rope_frequencies(dim, theta, "llama3", *scaling),
      rtol=1e-5)


def test_gguf_rope_freqs(tmp_path):
  sd = random_hf_state(ROPE_FIELDS, seed=2)
  path = str(tmp_path / "llama31.gguf")
  write_gguf(path, ROPE_FIELDS, sd,
             rope_factors=llama_cpp_rope_factors(8, 500000.0, 8.0, 1.0, 4.0,
                                                 8192))
  fields, params = llama_import.load_gguf(path)
  assert fields == dict(ROPE_FIELDS, rope_type="llama3", rope_factor=8.0,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_length=8192)
  jax.tree.map(np.testing.assert_array_equal, params,
               llama_import.convert_hf(sd, ROPE_FIELDS))
  # An HF config with equivalent scaling (the same frequencies) passes the
  # architecture check; the sharded import reads past rope_freqs.weight.
  shapes, shardings = shapes_and_shardings(fields, make_mesh(1, 8, 1))
  equivalent = dict(fields, rope_low_freq_factor=0.5,
                    rope_high_freq_factor=2.0, rope_original_max_length=4096)
  sharded = pretrained.load_pretrained(shapes, "llama:" + path,
                                       model_fields=equivalent,
                                       shardings=shardings)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y),
               sharded, params)
  with pytest.raises(config_lib.ConfigError, match="rope_type"):
    pretrained.load_pretrained(shapes, "llama:" + path,
                               model_fields=ROPE_FIELDS, shardings=shardings)
