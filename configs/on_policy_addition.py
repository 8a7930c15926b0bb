"""On-policy distillation on multi-digit addition: prompt '347+58=' -> '405'.

A task a teacher learns from scratch on CPU, so every way of training the
student can be compared on exact-match accuracy of its greedy answers
(kdjax/data/prompts.py: problems drawn per split, splits disjoint by a hash
of the problem; a character tokenizer written once under data_dir).

Teacher: a 4-layer Llama of width 128 (1.05M parameters), trained with CE
on the completions (mode=teacher). Student: 3 layers of width 64 (0.20M,
1/5 of the teacher's), trained for the same number of steps by
one of (config.distill.on_policy; TRL GKDTrainer names):
  lmbda=0                 token-level KD on the data's completions
  lmbda=0.5, 1.0          on-policy JSD(beta=0.5) (GKD)
  seq_kd, lmbda=0         the teacher's online rollouts (sequence-level KD)
  loss=sampled_reverse_kl per-token reverse KL on the student's samples
  (and mode=scratch: CE on the data). benchmarks/on_policy_addition.py runs
the comparison across seeds.

    python -m kdjax.main --config=configs/on_policy_addition.py \
        --config.mode=teacher --workdir=/tmp/kd_add/teacher

Presets (`--config=configs/on_policy_addition.py:<preset>`):
  default  as above.
  smoke    tiny models and a few steps (tests/e2e/test_on_policy_train.py,
           tests/distill/test_on_policy.py).
"""

import ml_collections

from kdjax.core import defaults

VOCAB = 16  # <pad>, <eos>, <unk>, 0-9, '+', '=' (15) rounded up.
TEACHER = dict(name="llama", vocab_size=VOCAB, width=128, num_layers=4,
               num_heads=4, num_kv_heads=4, head_dim=0, mlp_dim=512,
               rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True,
               max_length=16)
STUDENT = dict(TEACHER, width=64, num_layers=3, mlp_dim=256)


def get_config(preset: str = ""):
  config = defaults.get_config()
  config.data = defaults.prompt_data(
      name="addition", max_prompt_length=8, max_completion_length=5,
      seq_length=12,
      num_examples=ml_collections.ConfigDict(
          dict(train=20000, validation=256, test=1000)),
      task_options=ml_collections.ConfigDict(dict(min_digits=1,
                                                  max_digits=3)),
      eval_batch_size=64)
  config.teacher.model = ml_collections.ConfigDict(TEACHER)
  config.teacher.train = defaults.train(
      batch_size=64, num_steps=8000, learning_rate=3e-3, warmup_steps=100,
      weight_decay=0.01, grad_clip_norm=1.0)
  config.student.model = ml_collections.ConfigDict(STUDENT)
  config.student.train = defaults.train(
      batch_size=64, num_steps=2000, learning_rate=3e-3, warmup_steps=50,
      weight_decay=0.01, grad_clip_norm=1.0)
  config.distill.temperature = 1.0  # GKD's divergences at T = 1.
  config.distill.on_policy.update(lmbda=0.5, loss="jsd", beta=0.5,
                                  temperature=1.0, max_new_tokens=5,
                                  log_rollouts_every=200)
  config.checkpoint.every_steps = 1000
  config.log_every_steps = 100
  config.eval_every_steps = 1000

  if preset == "smoke":
    config.data.num_examples = ml_collections.ConfigDict(
        dict(train=256, validation=32, test=32))
    config.data.eval_batch_size = 16
    config.teacher.model.update(width=32, num_layers=1, mlp_dim=64)
    config.student.model.update(width=16, num_layers=1, mlp_dim=32)
    for role in ("teacher", "student"):
      config[role].train.update(batch_size=16, num_steps=4, warmup_steps=1)
    config.distill.on_policy.log_rollouts_every = 2
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = False
    config.log_every_steps = 2
    config.eval_every_steps = 4
  elif preset:
    raise ValueError(f"Unknown preset {preset!r}; allowed: 'smoke'.")
  return config
