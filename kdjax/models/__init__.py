"""Model registry: config names -> Flax Linen modules."""

from typing import Any

import flax.linen as nn

from kdjax.models.bert import BertClassifier
from kdjax.models.cnn import CNN
from kdjax.models.llama import Llama
from kdjax.models.lstm import LSTMClassifier
from kdjax.models.mlp import MLP
from kdjax.models.transformer import TransformerClassifier

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "lstm": LSTMClassifier,
    "transformer": TransformerClassifier,
    "bert": BertClassifier,  # Import weights with models/import_/hf_bert.py.
    "llama": Llama,  # Decoder LM; import weights with models/import_/llama.py.
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
