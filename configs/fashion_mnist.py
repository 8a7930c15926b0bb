"""Fashion-MNIST: CNN teacher (1.63M params) -> MLP student (0.10M), KD vs scratch.

Default (the README's quick start): the whole pipeline on the full dataset:
train the teacher, then for 3 seeds train the student from scratch and
distilled, on all of the training set and on 3% of it (Hinton et al. 2015,
section 6), then write WORKDIR/report.{json,md,png}.

    python -m kdjax.main --config=configs/fashion_mnist.py --workdir=/tmp/kd_fmnist

Runtime and results: the README's quick start (most of the time is the
teacher's forward passes in the distill steps). Presets
(`--config=configs/fashion_mnist.py:<preset>`):
  smoke   a few hundred steps of everything, 1 seed.
  teacher only the teacher (mode=teacher).
Any field can be overridden, e.g. --config.distill.temperature=4.
"""

import ml_collections

from kdjax.core import defaults


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  # The default config is this experiment (kdjax/core/defaults.py, where
  # every field is documented).
  config = defaults.get_config()
  if preset:
    _apply_preset(config, preset)
  return config


def _apply_preset(config: ml_collections.ConfigDict, preset: str) -> None:
  if preset == "smoke":
    defaults.smoke(config)
  elif preset == "teacher":
    config.mode = "teacher"
  else:
    raise ValueError(f"Unknown preset {preset!r}; allowed: 'smoke', 'teacher'.")

