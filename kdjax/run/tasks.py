"""What the training loop needs from a task: its data and its held-out check.

The loop (kdjax.run.train) is the same for classification and language
modelling; these two classes hold what differs. A config is a language-model
config when config.data.seq_length > 0 (kdjax.data.lm's packed sequences).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from kdjax.data import lm as lm_data
from kdjax.data import pipeline, prompts
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.distill import step
from kdjax.models import generate
from kdjax.run import lm_metrics, metrics


class Classification:
  """Examples with one label each; accuracy on config.data.eval_split."""
  headline = "accuracy"
  higher_is_better = True

  def __init__(self, config):
    self.data_config = config.data
    self._source = pipeline.get_source(config.data, config.data.train_split)
    self._eval = None

  def num_train_records(self) -> int:
    return pipeline.train_num_records(self._source, self.data_config)

  def train_iterator(self, *, global_batch_size: int, seed: int,
                     augment: bool, teacher_cache=None
                     ) -> Iterator[dict[str, np.ndarray]]:
    return iter(pipeline.train_dataset(
        self._source, self.data_config, global_batch_size=global_batch_size,
        seed=seed, augment=augment, teacher_cache=teacher_cache))

  @staticmethod
  def make_apply_fn(model) -> step.ApplyFn:
    return step.make_apply_fn(model)

  @staticmethod
  def token_chunk_size(train_config) -> int | None:
    del train_config
    return None

  def evaluate(self, model, params, mesh) -> dict[str, float]:
    if self._eval is None:  # Loaded on first use, once.
      self._eval = pipeline.load_split(pipeline.get_source(
          self.data_config, self.data_config.eval_split), self.data_config)
    # One apply function per model: the compiled forward is cached on it.
    logits = metrics.predict_logits(metrics.cached_apply_fn(model), params,
                                    self._eval["inputs"], mesh)
    return metrics.classification_metrics(logits, self._eval["labels"],
                                          brief=True)


class LanguageModelling:
  """Packed token sequences; perplexity on config.data.eval_split.

  Training goes through kdjax.distill.token_loss: models hand over hidden states and
  LM heads, and `<role>.train.loss_chunk_size` > 0 applies the heads chunk
  by chunk (memory-safe at large vocabularies).
  """
  headline = "perplexity"
  higher_is_better = False

  def __init__(self, config):
    self.data_config = config.data
    self._eval = None

  def num_train_records(self) -> int:
    return lm_data.num_train_sequences(self.data_config)

  def train_iterator(self, *, global_batch_size: int, seed: int,
                     augment: bool, teacher_cache=None
                     ) -> Iterator[dict[str, np.ndarray]]:
    del augment  # No augmentation for text.
    return iter(lm_data.lm_train_dataset(
        self.data_config, global_batch_size=global_batch_size, seed=seed,
        teacher_cache=teacher_cache))

  @staticmethod
  def make_apply_fn(model) -> step.ApplyFn:
    return step.make_lm_apply_fn(model)

  @staticmethod
  def token_chunk_size(train_config) -> int | None:
    return int(train_config.get("loss_chunk_size", 0))

  def evaluate(self, model, params, mesh) -> dict[str, float]:
    if self._eval is None:
      self._eval = lm_data.lm_eval_arrays(self.data_config)
    result = lm_metrics.token_metrics(
        metrics.cached_apply_fn(model), params, self._eval, mesh,
        batch_size=int(self.data_config.get("eval_batch_size", 8)))
    return {k: result[k] for k in ("perplexity", "accuracy")}


class PromptCompletion(LanguageModelling):
  """Prompt -> completion pairs (kdjax.data.prompts); the loss covers the
  completion tokens only. Evaluation: the model's greedy answers to the
  eval prompts (exact match) and its perplexity on the reference
  completions. On-policy distillation trains on these prompts
  (kdjax.run.rollouts)."""
  headline = "exact_match"
  higher_is_better = True

  def __init__(self, config):
    super().__init__(config)
    self.tokenizer = tokenizer_lib.load(prompts.tokenizer_path(config.data))
    self.train_data = prompts.load_split(config.data, config.data.train_split,
                                         self.tokenizer)

  def num_train_records(self) -> int:
    return len(self.train_data)

  def train_iterator(self, *, global_batch_size: int, seed: int,
                     augment: bool, teacher_cache=None
                     ) -> Iterator[dict[str, np.ndarray]]:
    del augment, teacher_cache  # Validation refuses a cache for prompts.
    return iter(prompts.train_batches(
        self.train_data, global_batch_size=global_batch_size, seed=seed))

  def evaluate(self, model, params, mesh) -> dict[str, float]:
    if self._eval is None:
      self._eval = prompts.load_split(self.data_config,
                                      self.data_config.eval_split,
                                      self.tokenizer)
    data = self._eval
    arrays = {"inputs": data.inputs, "labels": data.labels,
              "mask": data.mask}
    result = lm_metrics.token_metrics(
        metrics.cached_apply_fn(model), params, arrays, mesh,
        batch_size=int(self.data_config.get("eval_batch_size", 8)))
    answers = generate.generate_padded(
        model, params, data.prompts,
        data.prompt_lengths,
        max_new_tokens=int(self.data_config.max_completion_length),
        eos_id=data.eos_id)
    correct = prompts.exact_match(self.tokenizer, answers, data.completions,
                                  data.eos_id)
    return {"exact_match": float(np.mean(correct)),
            "perplexity": result["perplexity"],
            "accuracy": result["accuracy"]}


def is_prompts(data_config) -> bool:
  return data_config.get("format", "") == "prompts"


def task_type(config) -> type:
  """The task class of a config (its static parts need no data)."""
  if is_prompts(config.data):
    return PromptCompletion
  if pipeline.is_language_modelling(config.data):
    return LanguageModelling
  return Classification


def for_config(config) -> Any:
  """The config's task, its training data opened."""
  return task_type(config)(config)
