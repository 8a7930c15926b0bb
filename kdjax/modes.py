"""Mode dispatch: teacher, scratch, distill, evaluate, cache_teacher,
generate_text, aot_check, export, or the whole pipeline.

The pipeline lays its runs out under one workdir, which is also what the
report reads:
    WORKDIR/teacher/
    WORKDIR/full_data/{scratch,distill}/seed_<s>/
    WORKDIR/data_<p>pct/{scratch,distill}/seed_<s>/     (small-data runs)
    WORKDIR/report.{json,md,png}
WORKDIR may be a local path or gs://BUCKET/PATH (kdjax.runtime.storage).
"""

from __future__ import annotations

import jax
import ml_collections
from absl import logging

from kdjax import aot, validation
from kdjax.core import config as config_lib
from kdjax.data import pipeline
from kdjax.run import cache_builder, export, lm_report, report, seqkd, train
from kdjax.runtime import storage
from kdjax.weights import resolve, specs


def _run_config(config: ml_collections.ConfigDict, mode: str, **changes
                ) -> ml_collections.ConfigDict:
  run = ml_collections.ConfigDict(config.to_dict())
  run.mode = mode
  return config_lib.set_fields(run, changes)


def _train_unless_done(config, workdir: str) -> dict:
  """Trains a run; a run that already finished (run.json present) is kept."""
  if storage.exists(storage.join(workdir, train.RUN_FILE)):
    logging.info("%s already finished in %s; skipping.", config.mode, workdir)
    return {}
  return train.train(config, workdir)


def _with_workdir(value, workdir: str):
  """Substitutes '{workdir}' in strings (nested in tuples/dicts) of a variant."""
  if isinstance(value, str):
    return value.replace("{workdir}", workdir)
  if isinstance(value, (tuple, list)):
    return type(value)(_with_workdir(v, workdir) for v in value)
  if isinstance(value, dict):
    return {k: _with_workdir(v, workdir) for k, v in value.items()}
  return value


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Teacher(s) -> (scratch, distill, variants) x seeds x data sizes -> report.

  `config.pipeline.variants` adds distillation runs that differ from the
  default distill config by a few overrides (another objective, features,
  several teachers, another student model: 'student.model',
  'student.init_from', 'student.train.trainable'); a variant with
  mode='scratch' trains without the teacher (run dir scratch_<name>).
  `config.pipeline.extra_teachers` trains more teachers
  first (into WORKDIR/teacher_<name>, which variants name as
  '{workdir}/teacher_<name>').
  """
  teacher_dir = specs.teacher_dir(config, workdir)
  if not (config.teacher.checkpoint_dir
          or specs.pretrained_teacher(config)):
    _train_unless_done(_run_config(config, "teacher"), teacher_dir)
  for extra in config.pipeline.get("extra_teachers", ()):
    _train_unless_done(
        _run_config(config, "teacher", seed=int(extra["seed"])),
        storage.join(workdir, f"teacher_{extra['name']}"))
  config = _run_config(config, config.mode, **{
      "teacher.checkpoint_dir": teacher_dir})

  if config.pipeline.get("generate_text", False):  # For seqkd variants.
    seqkd.generate_text(config, workdir)

  runs = [("scratch", "scratch", {}), ("distill", "distill", {})]
  for variant in config.pipeline.get("variants", ()):
    overrides = _with_workdir(dict(variant["overrides"]), workdir)
    mode = variant.get("mode", "distill")
    runs.append((f"{mode}_{variant['name']}", mode,
                 {"variant": variant["name"], **overrides}))
  fractions = [(1.0, "full_data", config.student.train.num_epochs)]
  small = float(config.pipeline.small_data_fraction)
  if small > 0:
    fractions.append((small, f"data_{small * 100:g}pct",
                      config.pipeline.small_data_num_epochs))
  for fraction, tag, epochs in fractions:
    for seed in config.pipeline.seeds:
      for name, mode, overrides in runs:
        run = _run_config(config, mode, seed=int(seed),
                          **{"data.train_fraction": fraction,
                             "student.train.num_epochs": epochs, **overrides})
        validation.validate(run, workdir)
        _train_unless_done(run, storage.join(workdir, tag, name,
                                             f"seed_{seed}"))
  return write_report(config, workdir)


def write_report(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The classification or language-model report of every run in workdir."""
  if pipeline.is_language_modelling(config.data):
    return lm_report.write_lm_report(config, workdir)
  return report.write_report(config, workdir)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates the config, then runs config.mode in workdir."""
  if workdir:  # Local: absolute; gs://b/x stays a URL (not ./gs:/b/x).
    workdir = storage.absolute(workdir)
  resolve.resolve_config(config)  # 'hf_bert:', 'llama:', instruction text.
  validation.validate(config, workdir)
  if config.mode == "aot_check":
    return {"aot": [vars(r) for r in aot.check(config, workdir)]}
  logging.info("kdjax %s in %s on %d %s device(s), %d process(es)",
               config.mode, workdir, jax.device_count(),
               jax.devices()[0].platform, jax.process_count())
  if config.mode == "pipeline":
    return run_pipeline(config, workdir)
  if config.mode == "evaluate":
    return write_report(config, workdir)
  if config.mode == "generate_text":
    return seqkd.generate_text(config, workdir)
  if config.mode == "cache_teacher":
    return cache_builder.build(config, workdir)
  if config.mode == "export":
    return export.export(config, workdir)
  return train.train(config, workdir)
