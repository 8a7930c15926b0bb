"""Optimizers and learning-rate schedules from the config (optax factories)."""

from __future__ import annotations

import optax

from kdjax.core.config import fail

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "adamw", "sgd")


def learning_rate_schedule(train_config, total_steps: int) -> optax.Schedule:
  """Linear warmup then constant or cosine decay to zero."""
  lr = float(train_config.learning_rate)
  warmup = min(int(train_config.warmup_steps), max(total_steps - 1, 0))
  if train_config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
      [warmup]) if warmup else optax.constant_schedule(lr)


def make_optimizer(train_config, total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train_config, total_steps)
  name = train_config.optimizer
  if name == "adam":
    tx = optax.adam(schedule)
  elif name == "adamw":
    tx = optax.adamw(schedule, weight_decay=float(train_config.weight_decay))
  elif name == "sgd":
    tx = optax.sgd(schedule, momentum=0.9, nesterov=True)
  else:
    raise ValueError(f"Unknown optimizer {name!r}; allowed: {OPTIMIZERS}.")
  if train_config.get("grad_clip_norm", 0.0):
    tx = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), tx)
  return tx


def validate(train_config, field: str, devices: int,
             split_over: str = "device count") -> None:
  """config.<role>.train: batch splits over `devices` batch shards (all
  devices, or data x fsdp on a sharded mesh) x grad_accum_steps, known
  optimizer."""
  per_step = devices * train_config.grad_accum_steps
  if train_config.batch_size <= 0 or train_config.batch_size % per_step:
    fail(f"{field}.batch_size", train_config.batch_size,
         f"must be a positive multiple of {split_over} ({devices}) x "
         f"grad_accum_steps ({train_config.grad_accum_steps}) = {per_step}")
  if train_config.learning_rate <= 0:
    fail(f"{field}.learning_rate", train_config.learning_rate, "must be > 0")
  if train_config.num_epochs <= 0 and train_config.num_steps <= 0:
    fail(f"{field}.num_epochs", train_config.num_epochs,
         "must be > 0 (or set num_steps > 0)")
  if train_config.optimizer not in OPTIMIZERS:
    fail(f"{field}.optimizer", train_config.optimizer,
         f"allowed: {sorted(OPTIMIZERS)}")
  if train_config.schedule not in SCHEDULES:
    fail(f"{field}.schedule", train_config.schedule,
         f"allowed: {sorted(SCHEDULES)}")
