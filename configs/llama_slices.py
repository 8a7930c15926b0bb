"""Which Cloud TPU slice does my teacher -> student pair need? Llama 3.x presets.

The public Llama 3.x architectures (no weights needed to check them): each
preset is a distillation run whose step `--config.mode=aot_check` compiles
for a named topology here, on a CPU, printing per-chip memory (teacher,
student params, optimizer state, temporaries) against HBM and the analytic
FLOPs per step (README, Cloud TPU: which slice does my pair need?):

    python -m kdjax.main --config=configs/llama_slices.py:8b_1b_v5e16 \
        --config.mode=aot_check

Presets (`--config=configs/llama_slices.py:<preset>`), all at sequence 2048:
  8b_1b_v5e16  (default) Llama-3.1-8B (bfloat16 params) -> Llama-3.2-1B,
               batch 16, v5e:4x4 (v5litepod-16), FSDP over the 16 chips.
  8b_1b_v5e8   the same pair on v5e:2x4 (v5litepod-8) at batch 8 (one
               sequence per chip): the smallest v5e slice it fits without
               rematerialisation, with no headroom (batch 16 as 2
               micro-batches does not fit).
  8b_1b_v5e4   the smallest v5e slice with rematerialisation: v5e:2x2
               (v5litepod-4), batch 4, the student's layers recomputed in
               the backward pass (student.train.remat='full').
  8b_1b_replicated  the same pair on v5e:4x4 under the replicated layout
               (parallel.mesh data=16): refused, with its numbers.
  70b_8b_v5p   Llama-3.1-70B (bfloat16 params) -> Llama-3.1-8B, batch 16,
               v5p:2x2x2 (v5p-16, 8 chips), FSDP over the 8 chips.

Shapes are the public Hugging Face config.json files of meta-llama/
Llama-3.1-8B, Llama-3.2-1B and Llama-3.1-70B (field: config.json key):
vocab_size: vocab_size, width: hidden_size, num_layers: num_hidden_layers,
num_heads: num_attention_heads, num_kv_heads: num_key_value_heads, mlp_dim:
intermediate_size, rope_theta, rope_*: rope_scaling (rope_type 'llama3'),
norm_eps: rms_norm_eps, tie_embeddings: tie_word_embeddings.

To train one, point the teacher (and the tokenizer) at the HF directory of
its weights and the data at your text:
    --config.teacher.init_from=llama:/path/to/Llama-3.1-8B
    --config.data.tokenizer_path=/path/to/Llama-3.1-8B
    --config.data.source_dir=/path/to/your/text
The check reads none of them (teacher weights are shapes there).
"""

import ml_collections

from kdjax.core import defaults

SEQ_LENGTH = 2048
# Llama 3.x's vocabulary (128,000 BPE tokens + 256 special) and RoPE base;
# max_position_embeddings is 131,072, but max_length here only sizes the
# decoding cache (generation), so it is the training length.
_LLAMA3 = dict(name="llama", vocab_size=128256, rope_theta=500000.0,
               rope_type="llama3", rope_low_freq_factor=1.0,
               rope_high_freq_factor=4.0, rope_original_max_length=8192,
               norm_eps=1e-5, head_dim=0, max_length=SEQ_LENGTH)
# meta-llama/Llama-3.1-8B: 8.03B params, 32 layers, width 4096, 32 heads /
# 8 KV heads of 128, SwiGLU 14336, untied head, rope_scaling factor 8.0.
LLAMA_3_1_8B = dict(_LLAMA3, width=4096, num_layers=32, num_heads=32,
                    num_kv_heads=8, mlp_dim=14336, rope_factor=8.0,
                    tie_embeddings=False)
# meta-llama/Llama-3.2-1B: 1.24B params, 16 layers, width 2048, 32 heads /
# 8 KV heads of 64, SwiGLU 8192, tied embeddings, rope_scaling factor 32.0.
LLAMA_3_2_1B = dict(_LLAMA3, width=2048, num_layers=16, num_heads=32,
                    num_kv_heads=8, mlp_dim=8192, rope_factor=32.0,
                    tie_embeddings=True)
# meta-llama/Llama-3.1-70B: 70.6B params, 80 layers, width 8192, 64 heads /
# 8 KV heads of 128, SwiGLU 28672, untied head, rope_scaling factor 8.0.
LLAMA_3_1_70B = dict(_LLAMA3, width=8192, num_layers=80, num_heads=64,
                     num_kv_heads=8, mlp_dim=28672, rope_factor=8.0,
                     tie_embeddings=False)
# Where the weights would be (HF directories); nothing reads them in the check.
WEIGHTS = {"8b": "/models/Llama-3.1-8B", "70b": "/models/Llama-3.1-70B"}


def get_config(preset: str = "8b_1b_v5e16"):
  config = defaults.get_config()

  config.data = defaults.lm_data(
      name="text_directory",  # Your .txt/.md files in data.source_dir.
      tokenizer_path=WEIGHTS["8b"],  # The teacher's tokenizer.json (HF dir).
      seq_length=SEQ_LENGTH,
      eos_id=-1,  # The tokenizer's own (<|end_of_text|>).
      max_eval_sequences=64)

  _pair(config, LLAMA_3_1_8B, WEIGHTS["8b"], LLAMA_3_2_1B)
  config.student.train = defaults.train(
      batch_size=16, num_steps=1000, learning_rate=1e-4, warmup_steps=100,
      weight_decay=0.01, grad_clip_norm=1.0,
      # Positions per chunk of the vocabulary projection and loss: the
      # [batch, 2048, 128256] logits (16 GiB per model in float32 at batch
      # 16) are never materialised.
      loss_chunk_size=256)

  config.distill.alpha = 0.5
  config.distill.temperature = 2.0
  config.distill.hard_labels = "dataset"

  config.pipeline.seeds = (0,)
  config.pipeline.small_data_fraction = 0.0

  # The sharded layout (kdjax/distill/mesh.py): parameters, gradients and
  # Adam's moments split over every chip (ZeRO-3 / FSDP), the batch over
  # data x fsdp. -1 = all the topology's chips, so the same mesh fits any
  # slice; e.g. --config.parallel.mesh.fsdp=4 --config.parallel.mesh.model=4
  # also splits heads, MLP and vocabulary (Llama 3's 8 KV heads allow up to
  # model=8).
  config.parallel.mesh = ml_collections.ConfigDict(
      dict(data=1, fsdp=-1, model=1))

  config.aot.topology = "v5e:4x4"  # v5litepod-16: 16 chips x 16 GiB.
  config.aot.steps = "distill"  # The teacher is imported, never trained.

  config.checkpoint.every_steps = 500
  config.log_every_steps = 10
  config.eval_every_steps = 250

  _apply_preset(config, preset)
  return config


def _pair(config, teacher, teacher_dir, student) -> None:
  config.teacher.model = ml_collections.ConfigDict(teacher)
  config.teacher.init_from = "llama:" + teacher_dir
  config.teacher.pretrained = True  # Imported as is; never trained here.
  # Frozen: bfloat16 weights (half the memory, never a float32 copy) and
  # bfloat16 matmuls; the student keeps float32 params for AdamW and
  # computes in bfloat16.
  config.teacher.precision = defaults.precision("bfloat16", "bfloat16")
  config.student.model = ml_collections.ConfigDict(student)
  config.student.init_from = ""  # Random init (or the 1B's own weights).
  config.student.precision = defaults.precision("float32", "bfloat16")


def _apply_preset(config, preset: str) -> None:
  if preset == "8b_1b_v5e16":
    return
  if preset == "8b_1b_v5e8":
    config.aot.topology = "v5e:2x4"  # v5litepod-8: 8 chips x 16 GiB.
    # One sequence per chip: the student's saved attention probabilities
    # (16 layers x 32 heads x 2048^2, no rematerialisation) are most of the
    # ~12 GiB of temporaries per sequence.
    config.student.train.batch_size = 8
    return
  if preset == "8b_1b_v5e4":
    config.aot.topology = "v5e:2x2"  # v5litepod-4: 4 chips x 16 GiB.
    config.student.train.batch_size = 4
    # Keep nothing of a student layer for the backward pass: ~6 GiB of
    # temporaries instead of ~12 at one sequence per chip (the step then
    # computes the student's forward twice).
    config.student.train.remat = "full"
    return
  if preset == "8b_1b_replicated":
    # Every chip holds both models whole: the replicated layout (the default
    # for models that fit one chip). The bfloat16 8B teacher alone is 15 GiB.
    config.parallel.mesh = ml_collections.ConfigDict(
        dict(data=-1, fsdp=1, model=1))
    return
  if preset == "70b_8b_v5p":
    _pair(config, LLAMA_3_1_70B, WEIGHTS["70b"], LLAMA_3_1_8B)
    config.data.tokenizer_path = WEIGHTS["70b"]
    config.aot.topology = "v5p:2x2x2"  # v5p-16: 8 chips x 95 GiB.
    return
  raise ValueError(f"Unknown preset {preset!r}; allowed: '8b_1b_v5e16', "
                   "'8b_1b_v5e8', '8b_1b_v5e4', '8b_1b_replicated', "
                   "'70b_8b_v5p'.")
