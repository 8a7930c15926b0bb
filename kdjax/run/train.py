"""The training loop: data -> fused step -> metrics -> checkpoints -> evaluation.

`train(config, workdir)` trains what `config.mode` says ('teacher', 'scratch'
or 'distill') and resumes from WORKDIR/checkpoints if a run was interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from kdjax.core import config as config_lib
from kdjax.core import trees
from kdjax.core import errors
from kdjax.data import pipeline
from kdjax.distill import features, objectives, on_policy, optim, parallel
from kdjax.distill import step
from kdjax.distill import mesh as mesh_lib
from kdjax.distill import masks
from kdjax.distill import teacher_cache
from kdjax.models import lora
from kdjax.run import layout
from kdjax.run import rollouts
from kdjax.run import tasks
from kdjax.runtime import checkpoint
from kdjax.runtime import preemption
from kdjax.runtime import resume
from kdjax.runtime import storage
from kdjax.runtime.metrics_writer import ROLLOUTS_TAG, MetricsWriter
from kdjax.weights import params as params_lib
from kdjax.weights import pretrained
from kdjax.weights import prompt as prompt_weights
from kdjax.weights import specs
from kdjax.weights import teachers as teachers_lib

RUN_FILE = "run.json"


class NonFiniteLossError(errors.KdjaxError, FloatingPointError):
  """The training loss became NaN or Inf."""


def role_of(mode: str) -> str:
  return "teacher" if mode == "teacher" else "student"


def init_feature_projections(config, objective, model, teacher_applies,
                             teachers_params, seed: int):
  """Learned projections for feature terms whose widths differ (else {})."""
  if not objective.needs_features:
    return {}
  x = pipeline.dummy_inputs(config.data)
  student_apply = step.make_apply_fn(model)
  student_params = params_lib.abstract(model, config.data, seed)
  shapes = lambda apply, p: jax.eval_shape(
      lambda q: apply(q, x, False, None, True).intermediates, p)
  return features.init_projections(
      objective.feature_terms, shapes(student_apply, student_params),
      [shapes(a, p) for a, p in zip(teacher_applies, teachers_params)],
      jax.random.key(seed + 2))


def trainable_mask(params, trainable, field: str, adapters: bool = False):
  """Python-bool tree (True = trained) from `config.<role>.train.trainable`
  and, with `adapters` (a LoRA model), the adapters; None when everything
  trains."""
  if not trainable and not adapters:
    return None
  try:
    return masks.trainable_mask(params, tuple(trainable), adapters=adapters)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.{field}={tuple(trainable)!r}: {e}") from e



def open_teacher_cache(config, mode: str) -> teacher_cache.TeacherCache | None:
  """The checked cache a distill run reads instead of a teacher, else None."""
  if mode != "distill" or not teacher_cache.enabled(config.distill):
    return None
  vocab = teacher_cache.vocab_size(config.data, config.student.model)
  return teacher_cache.open_checked(
      config.distill.teacher_cache, config.data,
      temperature=float(config.distill.temperature), vocab=vocab,
      k=teacher_cache.effective_k(
          teacher_cache.settings(config.cache)["k"], vocab))


def _teacher_apply(task, teacher_model, student_model) -> step.ApplyFn:
  """The teacher's apply function; a language-model teacher whose vocabulary
  is the student's plus padding rows (same tokenizer: checked by
  validation) hands over only the student's ids."""
  teacher_vocab = getattr(teacher_model, "vocab_size", None)
  student_vocab = getattr(student_model, "vocab_size", None)
  if (issubclass(task, tasks.LanguageModelling) and teacher_vocab
      and student_vocab and teacher_vocab > student_vocab):
    return step.make_lm_apply_fn(teacher_model, vocab_size=student_vocab)
  return task.make_apply_fn(teacher_model)


@dataclasses.dataclass
class BuiltStep:
  """Everything `build_step` makes: the step function and what it needs.

  `state_shardings` is None on a 1-D data mesh (replicated layout: the
  per-device program of kdjax.distill.parallel.map_over_devices); on the
  ('data', 'fsdp', 'model') mesh it is the train state's shardings and the
  same function runs under jit with them (parallel.jit_sharded).
  """
  model: Any
  objective: objectives.Objective
  mask: Any  # Python-bool trainable mask, or None (everything trains).
  teacher_applies: tuple  # One apply function per live teacher (() cached).
  teachers_params: tuple  # Placed on the mesh (abstract: shapes).
  per_device: Callable  # step.train_step with everything but its inputs bound.
  init_state: Callable[[], step.TrainState]  # The initial state, on the host.
  cache: Any = None  # The teacher cache a distill run reads, or None.
  mesh: Any = None
  rules: tuple = ()
  state_shardings: Any = None  # Sharded layout only.
  teacher_shardings: tuple = ()  # Sharded layout only.
  # On-policy: the step for the student's own rollouts when it differs
  # (the objective has 'ce' terms, which such steps drop), else None.
  own_samples: Callable | None = None

  @property
  def sharded(self) -> bool:
    return self.state_shardings is not None

  def program(self, backend: str, per_device: Callable | None = None
              ) -> Callable:
    """(state, this host's batch, teachers_params) -> (state, metrics)."""
    per_device = per_device or self.per_device
    if not self.sharded:
      return parallel.map_over_devices(per_device, self.mesh, backend)
    return parallel.jit_sharded(
        per_device, self.mesh, self.rules,
        state_shardings=self.state_shardings,
        frozen_shardings=self.teacher_shardings)

  def place_state(self, state: step.TrainState) -> step.TrainState:
    if not self.sharded:
      return parallel.replicate(state, self.mesh)
    return parallel.place(state, self.state_shardings)

  def place_batch(self, local_batch, backend: str):
    """This host's batch placed for `program`, so it can be prefetched."""
    if not self.sharded:
      return parallel.put_batch(local_batch, self.mesh, backend)
    return parallel.place_batch(
        local_batch, mesh_lib.batch_sharding(self.mesh, self.rules))


def build_step(config: ml_collections.ConfigDict, mode: str, workdir: str,
               mesh, *, total_steps: int, abstract: bool = False,
               backend: str | None = None) -> BuiltStep:
  """The training step of `mode` as train() runs it: model, optimizer,
  teachers (or the teacher cache), objective, frozen-parameter mask.

  The one place the step is put together: train() and the AOT check
  (kdjax.aot, abstract=True: teacher weights as shapes, no cache, no
  pretrained import, nothing read) both call it.
  """
  role = role_of(mode)
  train_cfg = config[role].train
  seed = int(config.seed)
  backend = backend or config.parallel.backend
  sharded = layout.is_sharded(mesh)
  rules = layout.rules(config, mesh)
  task = tasks.task_type(config)
  model = specs.build_model(config, role)
  tx = optim.make_optimizer(train_cfg, total_steps)
  # distill from config.distill.teacher_cache: checked against this config;
  # no teacher is loaded.
  cache = None if abstract else open_teacher_cache(config, mode)
  teacher_applies, teachers_params, teacher_shardings = (), (), ()
  if mode == "distill" and cache is None:
    # Frozen: placed once, never donated, never in the optimizer state or the
    # student's checkpoint (kdjax.weights.teachers loads them).
    shardings_of = None
    if sharded:
      shardings_of = functools.partial(
          layout.param_shardings, data_config=config.data, mesh=mesh,
          rule_pairs=rules, what="config.teacher.model")
    loaded = teachers_lib.load_all(config, workdir, abstract=abstract,
                                   shardings_of=shardings_of)
    teacher_applies = tuple(_teacher_apply(task, t.model, model)
                            for t in loaded)
    if sharded:  # Loaded straight into their shards.
      teacher_shardings = tuple(shardings_of(t.model) for t in loaded)
      teachers_params = tuple(t.params for t in loaded)
    else:
      teachers_params = tuple(
          parallel.abstract(t.params, parallel.replicated(mesh)) if abstract
          else parallel.replicate(t.params, mesh) for t in loaded)
  if cache is not None:
    objective = cache.objective(config.distill, total_steps)
  else:
    distill = config.distill
    if task is tasks.PromptCompletion and mode == "distill":
      distill = on_policy.objective_config(config)
    objective = objectives.from_config(distill, mode,
                                       total_steps=total_steps,
                                       num_teachers=len(teachers_params))

  def init_state(load: bool = not abstract) -> step.TrainState:
    params = params_lib.init(model, config.data, seed)
    if load:
      params = pretrained.load_pretrained(
          params, config[role].get("init_from", ""),
          model_fields=specs.model_kwargs(config, role),
          layers=tuple(config[role].get("init_layers", ())), field=role)
      params = prompt_weights.init_from_config(params, config, role, seed)
    aux_params = init_feature_projections(config, objective, model,
                                          teacher_applies, teachers_params,
                                          seed)
    return step.create_train_state(params, tx, jax.random.key(seed + 1),
                                   aux_params)

  shapes = params_lib.abstract(model, config.data, seed)
  # A LoRA model trains its adapters (and what train.trainable adds).
  mask = trainable_mask(shapes, train_cfg.get("trainable", ()),
                        f"{role}.train.trainable",
                        adapters=lora.is_adapted(model))
  if mask is not None:  # Frozen leaves: no optimizer state, never updated.
    aux_shapes = jax.eval_shape(lambda: init_feature_projections(
        config, objective, model, teacher_applies, teachers_params, seed))
    tx = masks.freeze(tx, (mask, jax.tree.map(lambda _: True, aux_shapes)))
  per_device = functools.partial(
      step.train_step, student_apply=task.make_apply_fn(model),
      teacher_applies=teacher_applies, objective=objective, tx=tx,
      axis=parallel.DataAxis(backend),
      grad_accum_steps=int(train_cfg.grad_accum_steps), trainable_mask=mask,
      token_chunk_size=task.token_chunk_size(train_cfg),
      teacher_outputs=cache.strategy() if cache is not None else None)
  # The student's own rollouts are graded without 'ce' (no self-imitation).
  own_samples = None
  if (task is tasks.PromptCompletion and mode == "distill"
      and any(t.name == objectives.TASK_TERM for t in objective.terms)):
    own_samples = functools.partial(
        per_device, objective=on_policy.without_self_imitation(objective))
  state_shardings = None
  if sharded:
    param_shardings = layout.param_shardings(model, config.data, mesh, rules,
                                             f"config.{role}.model")
    state_shardings = mesh_lib.state_shardings(
        jax.eval_shape(lambda: init_state(load=False)), param_shardings,
        shapes, mesh)
  return BuiltStep(model=model, objective=objective, mask=mask,
                   teacher_applies=teacher_applies,
                   teachers_params=teachers_params, per_device=per_device,
                   own_samples=own_samples,
                   init_state=init_state, cache=cache, mesh=mesh, rules=rules,
                   state_shardings=state_shardings,
                   teacher_shardings=teacher_shardings)


def task_is_on_policy(config: ml_collections.ConfigDict) -> bool:
  """A distill run on prompt/completion data: the rollout loop applies."""
  return (config.mode == "distill"
          and tasks.task_type(config) is tasks.PromptCompletion)


def build_rollouts(config, built: BuiltStep, task) -> rollouts.Rollouts:
  """The rollout programs for `built`'s models, on its mesh and layout."""
  teacher_model = specs.build_model(config, "teacher")
  return rollouts.build(
      config, student_model=built.model, teacher_model=teacher_model,
      teacher_params=built.teachers_params[0], mesh=built.mesh,
      rules=built.rules,
      student_shardings=(built.state_shardings.params if built.sharded
                         else None),
      teacher_shardings=(built.teacher_shardings[0] if built.sharded
                         else None),
      eos_id=task.train_data.eos_id, backend=config.parallel.backend)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the teacher or a student as config.mode says; returns a summary."""
  mode = config.mode
  role = role_of(mode)
  train_cfg = config[role].train
  seed = int(config.seed)
  mesh = layout.make_mesh(config)

  task = tasks.for_config(config)
  num_records = task.num_train_records()
  steps_per_epoch = num_records // train_cfg.batch_size
  if steps_per_epoch == 0:
    raise config_lib.ConfigError(
        f"config.{role}.train.batch_size={train_cfg.batch_size} is larger than "
        f"the {num_records} training examples.")
  total_steps = int(train_cfg.num_steps or
                    train_cfg.num_epochs * steps_per_epoch)

  built = build_step(config, mode, workdir, mesh, total_steps=total_steps)
  model, objective, mask, cache = (built.model, built.objective, built.mask,
                                   built.cache)
  state = built.place_state(built.init_state())
  params = state.params
  data_iter = task.train_iterator(global_batch_size=train_cfg.batch_size,
                                  seed=seed, augment=bool(train_cfg.augment),
                                  teacher_cache=cache)

  meta = {"model": specs.model_spec(config, role), "role": mode,
          "objective": objectives.describe(objective), "seed": seed,
          "train_fraction": float(config.data.train_fraction),
          "num_classes": int(config.data.num_classes),
          "variant": config.get("variant", ""),
          "init_from": config[role].get("init_from", ""),
          "num_trainable_params": params_lib.count(params, mask),
          "optimizer": train_cfg.optimizer,
          "config": resume.describe_run(config)}
  if config[role].get("init_layers", ()):  # For rebuilding its base.
    meta["init_layers"] = [int(i) for i in config[role].init_layers]
  trained_only = mask is not None and config.checkpoint.trainable_only
  if trained_only and all(getattr(x, "is_fully_addressable", True)
                          for x in jax.tree.leaves(params)):
    # The base a resume, report or export rebuilds must be this one.
    meta[checkpoint.FROZEN_SHA256] = prompt_weights.fingerprint(
        trees.split(params, mask)[1])
  ckpt = checkpoint.Checkpointer(
      workdir, save_every_steps=config.checkpoint.every_steps,
      keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
      trained_mask=mask if trained_only else None)
  try:
    restored, restored_step = ckpt.restore_latest(
        state, data_iter, run_meta=meta,
        check_meta=lambda found: resume.check_same_run(found, meta, workdir),
        restart_if_unreadable=config.checkpoint.restart_if_unreadable)
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    state = restored
    logging.info("Resumed %s from step %d in %s.", mode, restored_step, workdir)

  run_step = built.program(config.parallel.backend)
  teachers_params = built.teachers_params
  rollout = None
  if task_is_on_policy(config):
    rollout = build_rollouts(config, built, task)
    run_own_samples = (built.program(config.parallel.backend,
                                     built.own_samples)
                       if built.own_samples is not None else run_step)

  eval_every = int(config.eval_every_steps or steps_per_epoch)
  log_every = int(config.log_every_steps)
  logging.info("%s: %s, %d params, %d steps (%d per epoch), objective %s",
               mode, config[role].model.name, params_lib.count(params), total_steps,
               steps_per_epoch, objectives.describe(objective))

  pending: list[dict] = []  # Device metrics since the last host check.
  evaluated: dict[int, dict] = {}  # Step -> eval metrics (the last is final).
  last_good_step = int(restored_step or 0)
  start_step = int(jax.device_get(state.step))
  writer = MetricsWriter(workdir, total_steps=total_steps,
                         start_step=start_step, name=f"[{mode}]")

  def check_pending(current_step: int, consume: bool = True
                    ) -> dict[str, float]:
    """Sums pending metrics on the host and stops the run on NaN/Inf.

    consume=False (a save between log lines) keeps them, as host values,
    for the next log line, which then covers every step since the last.
    """
    nonlocal pending
    if not pending:
      return {}
    host = jax.device_get(pending)
    pending = [] if consume else list(host)
    totals = {k: float(np.sum([m[k] for m in host])) for k in host[0]}
    if not np.isfinite(totals["loss"]) or not np.isfinite(totals["grad_norm"]):
      raise NonFiniteLossError(
          f"{mode}: the training loss became NaN/Inf at or before step "
          f"{current_step} (loss sum {totals['loss']}, grad norm sum "
          f"{totals['grad_norm']}). The last good checkpoint (step "
          f"{last_good_step}) in {ckpt.directory} is kept. Lower "
          f"config.{role}.train.learning_rate or check the inputs.")
    count = max(totals.pop("count"), 1.0)
    steps = len(host)
    grad_norm = totals.pop("grad_norm") / steps
    means = {k: v / count for k, v in totals.items()}
    means["accuracy"] = means.pop("correct")
    means["grad_norm"] = grad_norm
    return means

  stop = preemption.Watcher()  # SIGTERM -> save at an agreed step, exit 0.
  placed = functools.partial(built.place_batch,
                             backend=config.parallel.backend)
  # On-policy: prompt batches stay on the host until the step's writer
  # (data, student or teacher) has turned them into training batches.
  place = (lambda host_batch: host_batch) if rollout else placed
  batch = None  # The next step's batch, placed while the step before runs.
  try:
    for current in range(start_step, total_steps):
      if batch is None:
        batch = place(next(data_iter))
      program = run_step
      if rollout is not None:
        source, batch = rollout.batch(current, batch, state.params)
        batch = placed(batch)
        if source == on_policy.STUDENT:
          program = run_own_samples
        started = time.perf_counter()
      state, metrics = program(state, batch, teachers_params)
      if rollout is not None:
        jax.block_until_ready(metrics)
        rollout.seconds["training"] += time.perf_counter() - started
      batch = None
      pending.append(metrics)
      done = current + 1
      preempted = stop.reached(done)
      saving = ckpt.should_save(done) or done == total_steps or preempted
      if not saving:  # Prefetch, unless the data position is about to be saved.
        batch = place(next(data_iter))
      if done % log_every == 0 or done == total_steps:
        scalars = check_pending(done)
        if rollout is not None:
          scalars.update(rollout.time_split())
        writer.progress(done, scalars)
      if rollout is not None and rollout.due(done):
        writer.text(done, ROLLOUTS_TAG, rollout.texts(task.tokenizer))
      if done % eval_every == 0 or done == total_steps:
        evaluated[done] = task.evaluate(model, state.params, mesh)
        writer.write(done, "eval", evaluated[done])
      if saving:
        check_pending(done, consume=False)  # Nothing non-finite is saved.
        ckpt.save(done, state, data_iter, meta)
        last_good_step = done
      if preempted and done < total_steps:
        ckpt.wait()
        raise preemption.Preempted(done, ckpt.directory)
    ckpt.wait()
  finally:
    stop.close()
    ckpt.close()
    writer.close()

  final = evaluated.get(total_steps) or task.evaluate(model, state.params,
                                                      mesh)
  if mask is not None:  # Trained leaves alone (kilobytes) + backbone note.
    prompt_weights.export_trainable(workdir, state.params, mask, meta,
                            config[role].get("init_from", ""))
  summary = {**meta, "steps": total_steps, "num_params": params_lib.count(params),
             "resumed_from_step": restored_step,
             "eval": final, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
  if rollout is not None:  # This process's time, since it (re)started.
    summary["on_policy"] = rollout.time_split()
  if jax.process_index() == 0:  # A local or gs:// workdir (kdjax.runtime.storage).
    storage.write_json(os.path.join(workdir, RUN_FILE), summary)
  logging.info("%s finished: eval %s %.4f", mode, task.headline,
               final[task.headline])
  return summary
