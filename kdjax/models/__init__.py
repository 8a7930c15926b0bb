"""Model registry: config names -> Flax Linen modules."""

from typing import Any

import flax.linen as nn

from kdjax.models import gpt, llama
from kdjax.models.bert import BertClassifier
from kdjax.models.cnn import CNN
from kdjax.models.gpt import GPT
from kdjax.models.llama import Llama
from kdjax.models.lstm import LSTMClassifier
from kdjax.models.mlp import MLP
from kdjax.models.transformer import TransformerClassifier

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "lstm": LSTMClassifier,
    "transformer": TransformerClassifier,
    "bert": BertClassifier,  # Import weights with weights/importers/hf_bert.py.
    "llama": Llama,  # Decoder LM; import weights with weights/importers/llama.py.
    "gpt": GPT,  # Causal LM: logits [batch, length, vocab]; no num_classes.
}


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds a registered model; unknown names and fields fail with the allowed ones."""
  if name not in MODELS:
    raise ValueError(f"Unknown model name {name!r}; allowed: {sorted(MODELS)}.")
  cls = MODELS[name]
  allowed = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = set(kwargs) - allowed
  if unknown:
    raise ValueError(f"Model {name!r} has no field(s) {sorted(unknown)}; "
                     f"allowed: {sorted(allowed)}.")
  return cls(**kwargs)


def is_language_model(name: str) -> bool:
  """Next-token models: [B, L] ids -> [B, L, V] logits, no num_classes."""
  return name in ("llama", "gpt")


def lm_head_kernel_fn(model: nn.Module):
  """params -> the [D, V] LM head of a language model (for kdjax.distill.token_loss)."""
  if isinstance(model, Llama):
    return llama.lm_head_kernel
  if isinstance(model, GPT):
    return gpt.lm_head_kernel
  raise ValueError(f"{type(model).__name__} has no hidden_states/LM head "
                   "split; only 'llama' and 'gpt' models train through the "
                   "token loss.")
