"""Fashion-MNIST: one teacher, one student, every family of distillation objective.

Runs, for each seed, the MLP student from scratch, with plain KD (Hinton), and
with: reverse KL, generalised JSD(beta=0.5), feature matching (student hidden
layer <- teacher penultimate layer through a learned projection, plus KD), and
a two-teacher ensemble (a second CNN teacher trained with another seed, mixed
in probability space). One report compares them all.

    python -m kdjax.main --config=configs/fashion_mnist_objectives.py \\
        --workdir=runs/objectives \\
        --config.teacher.checkpoint_dir=runs/fashion_mnist/teacher

(Reusing the quick start's teacher; leave checkpoint_dir out to train one:
a second teacher, then 6 students per seed at 10 epochs; results in the
README's "Objective families" section.) Preset `smoke`: a few steps of each.
"""

from kdjax.core import defaults


def get_config(preset: str = ""):
  # configs/fashion_mnist.py's config and 'smoke' preset.
  config = defaults.get_config()
  if preset == "smoke":
    defaults.smoke(config)
  config.student.train.num_epochs = 10
  config.pipeline.seeds = (0, 1)
  config.pipeline.small_data_fraction = 0.0
  # A second teacher for the ensemble: same architecture, another seed.
  config.pipeline.extra_teachers = (dict(name="b", seed=1),)
  kd = dict(name="kl", weight=0.5)
  ce = dict(name="ce", weight=0.5)
  config.pipeline.variants = (
      dict(name="reverse_kl", overrides={
          "distill.terms": (dict(name="reverse_kl", weight=0.5), ce)}),
      dict(name="jsd", overrides={
          "distill.terms": (dict(name="jsd", weight=0.5, beta=0.5), ce)}),
      dict(name="features", overrides={
          "distill.terms": (kd, ce),
          "distill.features": (dict(student="hidden_0", teacher="penultimate",
                                    loss="cosine", weight=0.5),)}),
      dict(name="two_teachers", overrides={
          "distill.extra_teachers": (dict(
              checkpoint_dir="{workdir}/teacher_b",
              model=config.teacher.model.to_dict(), weight=1.0),),
          "distill.combine": "ensemble"}),
  )
  if preset not in ("", "smoke"):
    raise ValueError(f"Unknown preset {preset!r}; allowed: 'smoke'.")
  return config
