"""Llama-architecture decoder (RMSNorm, rotary positions, GQA, SwiGLU).

Any Llama-family size comes from the fields; the defaults are SmolLM2-135M.
The parameter tree mirrors Hugging Face `LlamaForCausalLM` one to one (see
kdjax/weights/importers/llama.py), with attention projections as DenseGeneral
kernels so heads stay a named axis instead of a reshape:

  embed/embedding                          [V, D]
  layers_{i}/attention_norm/scale          [D]
  layers_{i}/attention/query/kernel        [D, H, Dh]
  layers_{i}/attention/{key,value}/kernel  [D, KV, Dh]
  layers_{i}/attention/out/kernel          [H, Dh, D]
  layers_{i}/mlp_norm/scale                [D]
  layers_{i}/mlp/{gate,up}/kernel          [D, F]
  layers_{i}/mlp/down/kernel               [F, D]
  final_norm/scale                         [D]
  lm_head/kernel                           [D, V]  (untied only)

Numerics follow transformers' Llama: RoPE in the "rotate_half" layout (the
first half of each head's dims pairs with the second half), RMSNorm in float32
with the weight multiplying (no +1), softmax in float32. `dtype` is the
compute dtype of activations (the residual stream included) and matmul
inputs; params stay float32 and logits come out float32.

Decoding keeps a KV cache in the Flax "cache" collection (as flax's lm1b
example does): `init_cache(model, batch)` gives an empty one, then
`model.apply({"params": p, "cache": c}, tokens, decode=True,
mutable=["cache"])` appends `tokens` (a prompt chunk or one token) at the
cache index and attends to everything cached so far. The cache holds
`max_length` positions; writing past it is not checked inside jit (the write
is clamped), so callers must keep prompt + new tokens <= max_length.
Left-padded prompts of different lengths decode together given
`attention_mask` and per-row `positions` (see generate.generate_padded).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models import partitioning as part
from kdjax.models import precision

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}
# HF's initializer_range for Llama: small enough that a tied head starts with
# near-uniform predictions.
_INIT = nn.initializers.normal(stddev=0.02)
_MASKED = -1e30  # Finite, so a fully masked row would not produce NaN.


class RMSNorm(nn.Module):
  """x / rms(x) * scale, statistics in float32 (Llama style, no +1)."""
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", part.param(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                              + self.eps)
    return (x32 * scale).astype(self.dtype)


ROPE_TYPES = ("default", "llama3")
# What a rematerialised layer keeps for the backward pass (jax's names):
# 'full' keeps nothing (recomputes the whole layer: least memory), 'dots'
# keeps matmul outputs, 'dots_no_batch' those without a batch dimension
# (weights-like: MaxText's 'minimal').
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rope_frequencies(head_dim: int, theta: float, rope_type: str = "default",
                     factor: float = 8.0, low_freq_factor: float = 1.0,
                     high_freq_factor: float = 4.0,
                     original_max_length: int = 8192) -> np.ndarray:
  """Inverse frequencies theta^(-2i/Dh), i < Dh/2, as transformers computes them.

  rope_type 'llama3' (Llama 3.1 and later): wavelengths longer than
  original_max_length / low_freq_factor are slowed by `factor`, shorter than
  original_max_length / high_freq_factor kept, and those between blended
  linearly in original_max_length / wavelength (transformers' llama3 rule).
  """
  inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32)
                               / np.float32(head_dim)))).astype(np.float32)
  if rope_type == "default":
    return inv_freq
  wavelength = 2 * np.pi / inv_freq
  smooth = ((original_max_length / wavelength - low_freq_factor)
            / (high_freq_factor - low_freq_factor))
  blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  scaled = np.where(wavelength > original_max_length / low_freq_factor,
                    inv_freq / factor, inv_freq)
  medium = ((wavelength >= original_max_length / high_freq_factor)
            & (wavelength <= original_max_length / low_freq_factor))
  return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, rope: tuple) -> jax.Array:
  """Rotates [B, L, N, Dh] by position in the rotate_half layout.

  Pair (j, j + Dh/2) rotates by angle positions * inv_freq[j]; angles and the
  rotation are computed in float32, the result cast back to x's dtype.
  `rope`: rope_frequencies' arguments after head_dim (theta, type, ...).
  """
  inv_freq = jnp.asarray(rope_frequencies(x.shape[-1], *rope))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class Projection(nn.Module):
  """A bias-free projection whose kernel keeps the heads as their own axis.

  What nn.DenseGeneral computes, with the kernel created in its own shape:
  DenseGeneral initialises a flattened 2-D kernel, which breaks logical
  partitioning of a 3-D one when rules are in scope.
  """
  shape: tuple[int, ...]
  names: tuple[str, ...]
  equation: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", part.param(_INIT, self.names), self.shape,
                        jnp.float32)
    return jnp.einsum(self.equation, x.astype(self.dtype),
                      kernel.astype(self.dtype))


class Attention(nn.Module):
  """Causal grouped-query self-attention with RoPE and an optional KV cache.

  Query head h reads KV head h // (H / KV), as transformers' repeat_kv does;
  the group is an einsum axis, so KV heads are never copied.

  `attention_mask` [B, L] (True = real token) hides padded keys, e.g. a
  left-padded batch of prompts; in decode mode the cache remembers it per
  slot (`cached_padding`, zeros = no padding), so later steps keep ignoring
  those slots. None (the default) leaves the non-decode forward as it was,
  op for op; in decode an all-zero `cached_padding` hides nothing.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope: tuple  # rope_frequencies' arguments after head_dim.
  max_length: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, *, decode: bool, attention_mask=None):
    batch, length, width = x.shape
    h, kv, dh = self.num_heads, self.num_kv_heads, self.head_dim
    def dense(heads, heads_axis, name):
      return Projection((width, heads, dh), ("embed", heads_axis, "head_dim"),
                         "bld,dhk->blhk", self.dtype, name=name)
    q = part.constrain(dense(h, "heads", "query")(x),
                       ("batch", "act_length", "act_heads", None))
    k = part.constrain(dense(kv, "kv_heads", "key")(x),
                       ("batch", "act_length", "act_kv_heads", None))
    v = part.constrain(dense(kv, "kv_heads", "value")(x),
                       ("batch", "act_length", "act_kv_heads", None))

    if decode:
      cached_key = self.variable("cache", "cached_key", jnp.zeros,
                                 (batch, self.max_length, kv, dh), self.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros,
                                   (batch, self.max_length, kv, dh),
                                   self.dtype)
      cache_index = self.variable("cache", "cache_index",
                                  lambda: jnp.array(0, jnp.int32))
      # True where a slot holds padding: zeros (an empty cache) mean none, so
      # a cache filled without masks attends as it always did.
      cached_padding = self.variable("cache", "cached_padding", jnp.zeros,
                                     (batch, self.max_length), jnp.bool_)
      start = cache_index.value
      query_index = start + jnp.arange(length)
    else:
      query_index = jnp.arange(length)
    if positions is None:
      positions = jnp.broadcast_to(query_index, (batch, length))
    q = apply_rope(q, positions, self.rope)
    k = apply_rope(k, positions, self.rope)

    if decode:
      k = jax.lax.dynamic_update_slice(
          cached_key.value, k.astype(self.dtype), (0, start, 0, 0))
      v = jax.lax.dynamic_update_slice(
          cached_value.value, v.astype(self.dtype), (0, start, 0, 0))
      cached_key.value, cached_value.value = k, v
      cache_index.value = start + length
      key_index = jnp.arange(self.max_length)
      if attention_mask is not None:
        cached_padding.value = jax.lax.dynamic_update_slice(
            cached_padding.value, ~attention_mask.astype(bool), (0, start))
      padding = cached_padding.value
    else:
      key_index = jnp.arange(length)
      padding = (None if attention_mask is None
                 else ~attention_mask.astype(bool))
    # Causal by sequence slot: slot s is visible from query slot t iff s <= t
    # (empty cache slots lie in the future of every query).
    causal = key_index[None, :] <= query_index[:, None]
    if padding is None:
      bias = jnp.where(causal, 0.0, _MASKED).astype(jnp.float32)
    else:
      # Padded keys are hidden; a pad query still sees itself, so no row is
      # empty (its output is ignored anyway).
      diagonal = key_index[None, :] == query_index[:, None]
      visible = causal[None] & (~padding[:, None, :] | diagonal[None])
      bias = jnp.where(visible, 0.0, _MASKED).astype(jnp.float32)
      bias = bias[:, None, None]  # [B, 1, 1, L, S] against the scores.

    q = q.reshape(batch, length, kv, h // kv, dh)
    scores = precision.einsum_f32("blkgd,bskd->bkgls", q, k)
    scores = scores * (dh ** -0.5) + bias
    # Normalise after probabilities x values: one division on [.., L, Dh]
    # instead of on [.., L, S].
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    denom = jnp.sum(probs, axis=-1)  # [B, KV, G, L]
    out = precision.einsum_f32("bkgls,bskd->blkgd", probs.astype(self.dtype),
                               v)
    out = out / jnp.transpose(denom, (0, 3, 1, 2))[..., None]
    out = out.reshape(batch, length, h, dh).astype(self.dtype)
    return Projection((h, dh, width), ("heads", "head_dim", "embed"),
                       "blhk,hkd->bld", self.dtype, name="out")(out)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    def dense(features, names, name):
      return nn.Dense(features, use_bias=False, dtype=self.dtype,
                      param_dtype=jnp.float32, name=name,
                      kernel_init=part.param(_INIT, names))
    gate = dense(self.mlp_dim, ("embed", "mlp"), "gate")(x)
    up = dense(self.mlp_dim, ("embed", "mlp"), "up")(x)
    hidden = part.constrain(nn.silu(gate) * up,
                            ("batch", "act_length", "act_mlp"))
    return dense(x.shape[-1], ("mlp", "embed"), "down")(hidden)


class DecoderLayer(nn.Module):
  """Pre-norm attention and MLP, both residual; sows its output."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope: tuple
  norm_eps: float
  max_length: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, decode: bool = False, attention_mask=None):
    # decode positional: nn.remat marks it static by position.
    h = RMSNorm(self.norm_eps, self.dtype, name="attention_norm")(x)
    x = x + Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                      self.rope, self.max_length, self.dtype,
                      name="attention")(h, positions, decode=decode,
                                        attention_mask=attention_mask)
    h = RMSNorm(self.norm_eps, self.dtype, name="mlp_norm")(x)
    x = x + MLP(self.mlp_dim, self.dtype, name="mlp")(h)
    x = part.constrain(x, part.RESIDUAL)
    self.sow("intermediates", "output", x)
    return x


class _ScannedLayer(DecoderLayer):
  """A DecoderLayer as nn.scan's body: (carry, output) = (x, None)."""

  def __call__(self, x, positions, decode: bool = False, attention_mask=None):
    return super().__call__(x, positions, decode, attention_mask), None


def project(hidden: jax.Array, kernel: jax.Array) -> jax.Array:
  """hidden [..., D] @ kernel [D, V] in hidden's dtype, float32 logits."""
  return precision.einsum_f32("...d,dv->...v", hidden,
                              kernel.astype(hidden.dtype))


class _Head(nn.Module):
  """The untied LM head: a bare [D, V] kernel (no bias)."""
  vocab_size: int

  @nn.compact
  def __call__(self, hidden):
    kernel = self.param("kernel", part.param(_INIT, ("embed", "vocab")),
                        (hidden.shape[-1], self.vocab_size), jnp.float32)
    return project(hidden, kernel)


class Llama(nn.Module):
  """Token ids [B, L] -> next-token logits [B, L, V] (float32).

  Each layer's residual output is sown at `layers_{i}/output` in
  "intermediates" for feature distillation. `hidden_states` stops before the
  head; `lm_head_kernel`/`logits_from_hidden` apply it from a params tree, so
  a loss can project the hidden states chunk by chunk.
  """
  vocab_size: int = 49152
  width: int = 576
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 0  # 0: width // num_heads.
  mlp_dim: int = 1536
  rope_theta: float = 100000.0
  # 'llama3': Llama 3.1+'s long-context frequency scaling, with the four
  # fields below (their defaults are Llama 3.1's rope_scaling).
  rope_type: str = "default"
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_length: int = 8192
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  max_length: int = 2048  # KV-cache capacity and longest input.
  # Recompute each layer's activations in the backward pass instead of
  # keeping them (a run setting: config.<role>.train.remat): '' = keep all,
  # or a REMAT_POLICIES name.
  remat: str = ""
  # One scanned layer (nn.scan) instead of num_layers unrolled ones: compile
  # time flat in depth; params stacked under layers/ with a leading
  # [num_layers] axis (logical name 'layers'). stack_layers/unstack_layers
  # convert to and from the layers_{i} layout (checkpoints, importers).
  scan_layers: bool = False
  dtype: str = "float32"  # Compute dtype; params stay float32.

  def _check(self):
    problems = []
    for field in ("vocab_size", "width", "num_layers", "num_heads",
                  "num_kv_heads", "mlp_dim", "max_length"):
      if getattr(self, field) < 1:
        problems.append(f"{field}={getattr(self, field)} (must be >= 1)")
    if self.head_dim < 0:
      problems.append(f"head_dim={self.head_dim} (0 = width // num_heads, "
                      "or a positive size)")
    elif (self.head_dim == 0 and self.num_heads >= 1
          and self.width % self.num_heads):
      problems.append(f"width={self.width} not divisible by num_heads="
                      f"{self.num_heads} (or set head_dim)")
    if self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads:
      problems.append(f"num_heads={self.num_heads} not a multiple of "
                      f"num_kv_heads={self.num_kv_heads}")
    if self.rope_type not in ROPE_TYPES:
      problems.append(f"rope_type={self.rope_type!r} (allowed {ROPE_TYPES})")
    elif self.rope_type == "llama3" and not (
        self.rope_high_freq_factor > self.rope_low_freq_factor > 0):
      problems.append("rope_high_freq_factor must exceed "
                      "rope_low_freq_factor > 0 for rope_type='llama3'")
    if self.remat and self.remat not in REMAT_POLICIES:
      problems.append(f"remat={self.remat!r} (allowed '' or "
                      f"{sorted(REMAT_POLICIES)})")
    if self.dtype not in DTYPES:
      problems.append(f"dtype={self.dtype!r} (allowed {sorted(DTYPES)})")
    if problems:
      raise ValueError("Llama: " + "; ".join(problems) + ".")

  @property
  def rope(self) -> tuple:
    return (self.rope_theta, self.rope_type, self.rope_factor,
            self.rope_low_freq_factor, self.rope_high_freq_factor,
            self.rope_original_max_length)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.width // self.num_heads

  def setup(self):
    self._check()
    dtype = DTYPES[self.dtype]
    self.embed = nn.Embed(self.vocab_size, self.width, dtype=dtype,
                          param_dtype=jnp.float32,
                          embedding_init=part.param(_INIT, ("vocab", "embed")))
    layer = _ScannedLayer if self.scan_layers else DecoderLayer
    if self.remat:
      # (self, x, positions, decode, attention_mask): decode is static.
      layer = nn.remat(layer, policy=REMAT_POLICIES[self.remat],
                       static_argnums=(3,))
    fields = (self.num_heads, self.num_kv_heads, self.resolved_head_dim,
              self.mlp_dim, self.rope, self.norm_eps, self.max_length, dtype)
    if self.scan_layers:
      self.layers = nn.scan(
          layer, length=self.num_layers,
          variable_axes={"params": 0, "cache": 0, "intermediates": 0},
          # Dropout: none of Llama's own; LoRA adapters' (models/lora.py)
          # get a different mask in every layer.
          split_rngs={"params": True, "dropout": True},
          # (positions, decode, attention_mask): the same for every layer.
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
          metadata_params={nn.PARTITION_NAME: "layers"})(*fields)
    else:
      self.layers = [layer(*fields) for _ in range(self.num_layers)]
      # Named layers_0, layers_1, ...
    self.final_norm = RMSNorm(self.norm_eps, dtype)
    if not self.tie_embeddings:
      self.lm_head = _Head(self.vocab_size)

  def hidden_states(self, tokens: jax.Array, train: bool = False, *,
                    positions: jax.Array | None = None,
                    decode: bool = False,
                    attention_mask: jax.Array | None = None) -> jax.Array:
    """[B, L] ids -> [B, L, D] after the final norm, in the compute dtype.

    attention_mask [B, L] (True = real token) hides padded keys, e.g. of
    left-padded prompts, whose `positions` should then start at 0 on each
    row's first real token; outputs at padded slots are meaningless.
    """
    del train  # No dropout in Llama.
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape "
                       f"{tokens.shape}.")
    if tokens.shape[1] > self.max_length:
      raise ValueError(f"Sequence length {tokens.shape[1]} exceeds the "
                       f"model's max_length={self.max_length}.")
    if positions is not None:
      positions = jnp.broadcast_to(positions, tokens.shape)
    if attention_mask is not None:
      attention_mask = jnp.broadcast_to(attention_mask, tokens.shape)
    x = part.constrain(self.embed(tokens), part.RESIDUAL)
    if self.scan_layers:
      x, _ = self.layers(x, positions, decode, attention_mask)
    else:
      for layer in self.layers:
        x = layer(x, positions, decode, attention_mask)
    return self.final_norm(x)

  def __call__(self, tokens: jax.Array, train: bool = False, *,
               positions: jax.Array | None = None,
               decode: bool = False,
               attention_mask: jax.Array | None = None) -> jax.Array:
    hidden = self.hidden_states(tokens, train, positions=positions,
                                decode=decode, attention_mask=attention_mask)
    if self.tie_embeddings:
      return project(hidden, self.embed.embedding.T)
    return self.lm_head(hidden)


def lm_head_kernel(params: Mapping[str, Any]) -> jax.Array:
  """The [D, V] output projection of a Llama params tree (tied or not)."""
  if "lm_head" in params:
    return params["lm_head"]["kernel"]
  return params["embed"]["embedding"].T


def logits_from_hidden(params: Mapping[str, Any],
                       hidden: jax.Array) -> jax.Array:
  """`Llama.hidden_states` output [..., D] -> float32 logits [..., V]."""
  return project(hidden, lm_head_kernel(params))


def init_cache(model: Llama, batch_size: int) -> dict[str, Any]:
  """An empty KV cache (zeros, index 0) for `batch_size` sequences."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0),
                         jnp.zeros((batch_size, 1), jnp.int32),
                         decode=True))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
