"""scikit-learn digits (8x8, 1,797 images): the fast real-data config for CI and smoke runs.

    python -m kdjax.main --config=configs/digits.py --workdir=/tmp/kd_digits

The whole pipeline in about the time of a test. It reuses the Fashion-MNIST config's fields (the default config,
kdjax/core/defaults.py) and changes the data and sizes.
"""

from kdjax.core import defaults


def get_config(preset: str = ""):
  config = defaults.get_config()
  config.data.name = "sklearn_digits"
  config.data.source_dir = ""
  config.data.input_shape = (8, 8, 1)
  config.data.input_scale = 16.0
  config.data.augment_max_shift = 1
  config.data.augment_flip = False  # Digits are not flip-invariant.
  config.teacher.model.channels = (16, 32)
  config.teacher.model.dense_features = 128
  config.teacher.train.update(batch_size=64, num_epochs=15, warmup_steps=20)
  config.student.model.hidden = (16,)
  config.student.train.update(batch_size=64, num_epochs=30, warmup_steps=20,
                              learning_rate=1e-2)
  config.pipeline.seeds = (0, 1)
  config.pipeline.small_data_fraction = 0.1
  config.pipeline.small_data_num_epochs = 50
  config.checkpoint.every_steps = 50
  config.log_every_steps = 20
  if preset == "tiny":  # For tests: a handful of steps.
    config.teacher.train.num_steps = 6
    config.student.train.num_steps = 6
    config.pipeline.seeds = (0,)
    config.pipeline.small_data_fraction = 0.0
    config.checkpoint.every_steps = 2
    config.log_every_steps = 2
    config.eval_every_steps = 3
  elif preset:
    raise ValueError(f"Unknown preset {preset!r}; allowed: 'tiny'.")
  return config
