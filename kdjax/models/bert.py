"""BERT-architecture encoder (post-LayerNorm, learned absolute positions).

The parameter layout follows the Hugging Face `BertModel` names one to one
(see kdjax/weights/importers/hf_bert.py), so pretrained checkpoints such as
all-MiniLM-L6-v2 load without reshaping anything but the Dense kernels.

Soft prompts: `BertEncoder(..., prefix_embeds=[P, H] or [B, P, H])` prepends P
vectors, given in word-embedding space, to the embedded input. They pass
through the same token-type embedding, LayerNorm and dropout as a word, but
get NO position embedding, and the real tokens keep their position ids
0..L-1: the frozen backbone sees its input where it was trained to see it
(a constant added to a trainable vector before the LayerNorm would only shift
its initialisation), and P + L may exceed max_position_embeddings. Every
token attends to the prompt; outputs have length P + L, prompt first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import partitioning
from kdjax.models import prompt as prompt_lib

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # HF "gelu" is the erf form.
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}
POOLINGS = ("mean", "cls", "pooler")


@flax.struct.dataclass
class BertOutput:
  """What the encoder returns; prompt positions (if any) come first."""
  hidden_states: jax.Array  # [B, P + L, H], the last layer.
  mask: jax.Array  # [B, P + L] bool: prompt positions True, padding False.
  pooled: jax.Array | None  # [B, H], tanh(dense(hidden at [CLS])), or None.
  num_prompts: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def token_states(self) -> jax.Array:
    """Hidden states of the real tokens only, [B, L, H]."""
    return self.hidden_states[:, self.num_prompts:]

  @property
  def token_mask(self) -> jax.Array:
    return self.mask[:, self.num_prompts:]


def mean_pool(hidden_states: jax.Array, mask: jax.Array) -> jax.Array:
  """Average over valid positions (sentence-transformers' mean pooling), in
  float32 whatever the compute dtype (a long sum)."""
  weights = mask[..., None].astype(jnp.float32)
  hidden_states = hidden_states.astype(jnp.float32)
  return jnp.sum(hidden_states * weights, axis=-2) / jnp.maximum(
      jnp.sum(weights, axis=-2), 1e-9)


def _layer_norm(eps: float, name: str, dtype: str) -> nn.LayerNorm:
  # The two-pass variance matches PyTorch; Flax's fast E[x^2]-E[x]^2 does not.
  return nn.LayerNorm(
      epsilon=eps, use_fast_variance=False, dtype=dtype,
      scale_init=partitioning.param(nn.initializers.ones, ("norm",)),
      bias_init=partitioning.param(nn.initializers.zeros, ("norm",)),
      name=name)


def _dense(features: int, names: tuple[str | None, str | None],
           name: str, dtype: str) -> nn.Dense:
  """nn.Dense with its default initializers, kernel axes `names`, computing
  in `dtype` (float32 parameters)."""
  return nn.Dense(
      features, dtype=dtype,
      kernel_init=partitioning.param(nn.initializers.lecun_normal(), names),
      bias_init=partitioning.param(nn.initializers.zeros_init(), names[1:]),
      name=name)


class BertFields(nn.Module):
  """Architecture fields shared by the encoder and the classifier.

  Defaults are all-MiniLM-L6-v2's; `hf_bert.load_config` reads a checkpoint's.
  """
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  pad_id: int = 0
  add_pooler: bool = True
  sow_attention: bool = False
  # One scanned layer (nn.scan) instead of num_layers unrolled ones: compile
  # time flat in depth; params stacked under encoder/layer with a leading
  # [num_layers] axis (logical name 'layers'). kdjax.models.stacking converts
  # to and from the layer_{i} layout that hf_bert imports.
  scan_layers: bool = False
  # Compute dtype: matmul inputs and activations ('bfloat16' for mixed
  # precision); parameters stay float32, softmax, LayerNorm statistics and
  # pooling run in float32, a classifier's logits come out float32.
  dtype: str = "float32"

  def encoder_fields(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name)
            for f in dataclasses.fields(BertFields)
            if f.name not in ("parent", "name")}


class BertSelfAttention(nn.Module):
  """Multi-head attention, head-major, with an additive padding bias."""
  hidden_size: int
  num_heads: int
  dropout_rate: float
  sow_attention: bool = False
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    batch, length, _ = x.shape
    head_dim = self.hidden_size // self.num_heads

    def heads(name):
      # [hidden, heads * head_dim]: the flattened output axis is "heads".
      y = _dense(self.hidden_size, ("embed", "heads"), name, self.dtype)(x)
      return y.reshape(batch, length, self.num_heads, head_dim).transpose(
          0, 2, 1, 3)

    q, k, v = heads("query"), heads("key"), heads("value")
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(
        jnp.asarray(head_dim, q.dtype))
    # Softmax in float32. finfo.min (not -inf), as in HF: a fully padded
    # row stays finite.
    bias = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32) + bias,
                             axis=-1).astype(q.dtype)
    if self.sow_attention:
      self.sow("intermediates", "attention_weights", weights)
    weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
    y = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
    y = y.transpose(0, 2, 1, 3).reshape(batch, length, self.hidden_size)
    return _dense(self.hidden_size, ("heads", "embed"), "output",
                  self.dtype)(y)


class BertLayer(nn.Module):
  """Self-attention and feed-forward, each residual then LayerNorm (post-LN)."""
  hidden_size: int
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  dropout_rate: float
  attention_dropout_rate: float
  sow_attention: bool = False
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    x = partitioning.constrain(x, partitioning.RESIDUAL)
    h = BertSelfAttention(self.hidden_size, self.num_heads,
                          self.attention_dropout_rate, self.sow_attention,
                          self.dtype, name="attention")(x, mask, train=train)
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    x = _layer_norm(self.layer_norm_eps, "attention_norm", self.dtype)(x + h)
    h = _dense(self.intermediate_size, ("embed", "mlp"), "intermediate",
               self.dtype)(x)
    h = _dense(self.hidden_size, ("mlp", "embed"), "output", self.dtype)(
        ACTIVATIONS[self.hidden_act](h))
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    x = _layer_norm(self.layer_norm_eps, "output_norm", self.dtype)(x + h)
    x = partitioning.constrain(x, partitioning.RESIDUAL)
    self.sow("intermediates", "hidden", x)
    return x


class _ScannedLayer(BertLayer):
  """A BertLayer as nn.scan's body: (x, mask) -> (x, None).

  `train` is an attribute, not an argument, so it stays a static Python
  bool inside the scan body (it switches dropout on).
  """
  train: bool = False

  def __call__(self, x, mask):
    return super().__call__(x, mask, train=self.train), None


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout; prompt first."""
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  dropout_rate: float
  dtype: str = "float32"

  @nn.compact
  def __call__(self, input_ids, token_type_ids, prefix_embeds, *, train: bool):
    embed = lambda n, row_axis, name: nn.Embed(
        n, self.hidden_size, dtype=self.dtype,
        embedding_init=partitioning.param(nn.initializers.normal(0.02),
                                          (row_axis, "embed")),
        name=name)
    token_type = embed(self.type_vocab_size, None, "token_type_embeddings")
    positions = jnp.arange(input_ids.shape[1])
    x = (embed(self.vocab_size, "vocab", "word_embeddings")(input_ids)
         + embed(self.max_position_embeddings, "length",
                 "position_embeddings")(positions)[None]
         + token_type(token_type_ids))
    if prefix_embeds is not None:
      if prefix_embeds.ndim == 2:
        prefix_embeds = jnp.broadcast_to(
            prefix_embeds[None], (x.shape[0],) + prefix_embeds.shape)
      prefix = prefix_embeds.astype(x.dtype) + token_type(
          jnp.zeros(prefix_embeds.shape[:2], jnp.int32))
      x = jnp.concatenate([prefix, x], axis=1)
    x = _layer_norm(self.layer_norm_eps, "layer_norm", self.dtype)(x)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class BertEncoder(BertFields):
  """Token ids [B, L] -> BertOutput (last hidden states, mask, pooler output).

  `attention_mask` defaults to `input_ids != pad_id`. Each layer's output is
  sown at `layer_{i}/hidden` (not 'output': that is the layer's Dense, as HF
  names it); with sow_attention, its attention maps too, at
  `layer_{i}/attention/attention_weights` ([B, heads, P+L, P+L]). With
  scan_layers both are at `layer/...`, stacked with a leading [num_layers].
  """

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *,
               prefix_embeds: jax.Array | None = None,
               train: bool = False) -> BertOutput:
    if input_ids.shape[1] > self.max_position_embeddings:
      raise ValueError(f"Sequence length {input_ids.shape[1]} exceeds "
                       f"max_position_embeddings={self.max_position_embeddings}.")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; "
                       f"allowed: {sorted(ACTIVATIONS)}.")
    mask = (input_ids != self.pad_id if attention_mask is None
            else attention_mask.astype(bool))
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    num_prompts = 0 if prefix_embeds is None else prefix_embeds.shape[-2]
    x = BertEmbeddings(self.vocab_size, self.hidden_size,
                       self.max_position_embeddings, self.type_vocab_size,
                       self.layer_norm_eps, self.dropout_rate, self.dtype,
                       name="embeddings")(input_ids, token_type_ids,
                                          prefix_embeds, train=train)
    x = partitioning.constrain(x, partitioning.RESIDUAL)
    if num_prompts:
      mask = jnp.concatenate(
          [jnp.ones((mask.shape[0], num_prompts), bool), mask], axis=1)
    fields = (self.hidden_size, self.num_heads, self.intermediate_size,
              self.hidden_act, self.layer_norm_eps, self.dropout_rate,
              self.attention_dropout_rate, self.sow_attention, self.dtype)
    if self.scan_layers:
      x, _ = nn.scan(
          _ScannedLayer, length=self.num_layers,
          variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast,),
          metadata_params={nn.PARTITION_NAME: "layers"})(
              *fields, train=train, name="layer")(x, mask)
    else:
      for i in range(self.num_layers):
        x = BertLayer(*fields, name=f"layer_{i}")(x, mask, train=train)
    pooled = None
    if self.add_pooler:  # [CLS] is the first real token, after the prompt.
      # Small and replicated: its axes are deliberately unnamed.
      pooled = jnp.tanh(_dense(self.hidden_size, ("embed", None), "pooler",
                               self.dtype)(x[:, num_prompts]))
    return BertOutput(x, mask, pooled, num_prompts)


class BertClassifier(BertFields):
  """Token ids [B, L] (pad_id = padding) -> class logits; optional soft prompt.

  Params: `encoder` (a BertEncoder: what hf_bert imports), `head`, and with
  num_prompts > 0 a `prompt` (prompt.SoftPrompt). Pooling: 'mean' over the
  real tokens (prompt positions excluded, as the sentence embedding of
  all-MiniLM-L6-v2 is computed), 'cls' (the [CLS] state) or 'pooler' (BERT's
  tanh pooler on [CLS]). Prompt tuning trains `prompt` (and `head`) only: see
  kdjax/distill/masks.py for the optimizer mask, kdjax/models/prompt.py and
  kdjax/weights/prompt.py for the initialisations and the
  prompt-only export. With `instruction_ids` the model reads every input
  with a fixed instruction after [CLS] (an instruction-prompted teacher on
  the same batches as its student); mean pooling then includes the
  instruction's tokens, as it would for the text "<instruction> <review>".
  """
  num_classes: int = 2
  pooling: str = "mean"
  num_prompts: int = 0
  prompt_init_std: float = 0.05  # About the spread of BERT word embeddings.
  # How the engine initialises the prompt once pretrained weights are in
  # (prompt.init_from_config): 'random' (normal, prompt_init_std), 'vocab'
  # (sampled word embeddings) or 'labels' (prompt_init_words first, then
  # sampled vocabulary). The module itself always inits randomly.
  prompt_init: str = "random"
  prompt_init_words: tuple[str, ...] = ()
  # Token ids inserted after [CLS] of every input: a fixed natural-language
  # task instruction ("[CLS] is this movie review fresh or rotten? <review>
  # [SEP]"), so the same batch feeds an instructed teacher and a student.
  instruction_ids: tuple[int, ...] = ()
  head_dropout_rate: float = 0.0

  def __post_init__(self):
    # Checked at construction, so config validation names the bad field.
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling={self.pooling!r}; allowed: {POOLINGS}.")
    if self.prompt_init not in prompt_lib.PROMPT_INITS:
      raise ValueError(f"prompt_init={self.prompt_init!r}; allowed: "
                       f"{prompt_lib.PROMPT_INITS}.")
    if self.prompt_init != "random" and not self.num_prompts:
      raise ValueError(f"prompt_init={self.prompt_init!r} needs num_prompts "
                       "> 0 (there is no prompt to initialise).")
    if self.prompt_init == "labels" and (
        not self.prompt_init_words
        or isinstance(self.prompt_init_words, str)
        or not all(isinstance(w, str) and w.strip()
                   for w in self.prompt_init_words)):
      raise ValueError(
          f"prompt_init='labels' needs prompt_init_words, a tuple of "
          f"non-empty class-label words such as ('rotten', 'fresh'); got "
          f"{self.prompt_init_words!r}.")
    if not all(isinstance(i, int) and 0 <= i < self.vocab_size
               for i in self.instruction_ids):
      raise ValueError(f"instruction_ids must be token ids in [0, "
                       f"{self.vocab_size}); got {self.instruction_ids!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False,
               attention_mask: jax.Array | None = None) -> jax.Array:
    if self.instruction_ids:
      tokens, attention_mask = insert_instruction(
          tokens, attention_mask, self.instruction_ids, self.pad_id)
    fields = self.encoder_fields()
    if self.pooling == "pooler":
      fields["add_pooler"] = True
    prefix = None
    if self.num_prompts:
      prefix = prompt_lib.SoftPrompt(self.num_prompts, self.hidden_size,
                                     self.prompt_init_std, name="prompt")()
    out = BertEncoder(**fields, name="encoder")(
        tokens, attention_mask, prefix_embeds=prefix, train=train)
    if self.pooling == "mean":
      pooled = mean_pool(out.token_states, out.token_mask)
    elif self.pooling == "cls":
      pooled = out.token_states[:, 0]
    else:
      pooled = out.pooled
    self.sow("intermediates", "pooled", pooled)
    pooled = nn.Dropout(self.head_dropout_rate, deterministic=not train)(pooled)
    logits = _dense(self.num_classes, ("embed", "classes"), "head",
                    self.dtype)(pooled)
    return logits.astype(jnp.float32)


def insert_instruction(tokens: jax.Array, attention_mask: jax.Array | None,
                       instruction_ids, pad_id: int = 0
                       ) -> tuple[jax.Array, jax.Array]:
  """Inserts fixed token ids after the first token ([CLS]) of every row.

  Returns (tokens [B, L + K], attention mask [B, L + K], the instruction
  always attended). Equals tokenising "<instruction> <text>" whenever the
  text was not truncated (tests/weights/test_prompt.py).
  """
  batch = tokens.shape[0]
  mask = (tokens != pad_id if attention_mask is None
          else attention_mask.astype(bool))
  ids = jnp.broadcast_to(jnp.asarray(instruction_ids, tokens.dtype),
                         (batch, len(instruction_ids)))
  tokens = jnp.concatenate([tokens[:, :1], ids, tokens[:, 1:]], axis=1)
  mask = jnp.concatenate(
      [mask[:, :1], jnp.ones(ids.shape, bool), mask[:, 1:]], axis=1)
  return tokens, mask


def with_encoder(params: dict[str, Any], encoder_params: dict[str, Any]
                 ) -> dict[str, Any]:
  """Classifier params with `encoder` replaced by imported ones, shapes checked.

  Either tree may hold logical-axis boxes (a raw model.init): shapes are
  compared unboxed and the result is plain arrays, never a mix.
  """
  expected = jax.tree.map(jnp.shape, partitioning.unbox(params["encoder"]))
  got = jax.tree.map(jnp.shape, partitioning.unbox(encoder_params))
  if expected != got:
    raise ValueError("Encoder params do not fit the classifier's encoder "
                     "(different architecture fields?): expected "
                     f"{expected}, got {got}.")
  return partitioning.unbox({**params, "encoder": encoder_params})
