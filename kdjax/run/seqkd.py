"""Sequence-level distillation data: the teacher's continuations of real prompts.

Kim & Rush (2016): instead of (or besides) matching the teacher's per-token
distributions, train the student with plain CE on text the teacher wrote.
`mode='generate_text'` takes the first `config.seqkd.num_sequences` training
windows, keeps their first `prompt_length` tokens as prompts and lets the
teacher continue each to seq_length + 1 tokens through its KV cache
(kdjax.models.generate, `config.seqkd` sampling settings). The windows are written to

    WORKDIR/teacher_text/windows.npy     int32 [N, seq_length + 1]
    WORKDIR/teacher_text/samples.txt     the first few, decoded, to read
    WORKDIR/teacher_text/meta.json       teacher, sampling, counts

and a student trains on them with `config.data.train_windows_file` pointing
at windows.npy (the pipeline's seqkd variant does this). Generation goes
batch by batch into parts/ and a restarted run keeps the finished parts.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from kdjax.core import config as config_lib
from kdjax.data import packing
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.models import generate
from kdjax.run import layout
from kdjax.run import lm_report
from kdjax.runtime import storage
from kdjax.weights import specs

SUBDIR = "teacher_text"
WINDOWS = "windows.npy"


def windows_path(workdir: str) -> str:
  return os.path.join(workdir, SUBDIR, WINDOWS)


def validate(seqkd_config, data_config, workdir: str) -> None:
  """config.seqkd (mode=generate_text, or a pipeline that generates text)."""
  if storage.is_remote(workdir):
    raise config_lib.ConfigError(
        f"mode='generate_text' writes local files; --workdir={workdir!r} is "
        "remote. Generate into a local workdir and copy teacher_text/ over.")
  prompt_length = int(seqkd_config.prompt_length)
  seq_length = int(data_config.seq_length)
  if not 1 <= prompt_length <= seq_length:
    config_lib.fail("seqkd.prompt_length", prompt_length,
                    f"must be in [1, config.data.seq_length={seq_length}]")


def generate_text(config, workdir: str) -> dict:
  """Writes the teacher-generated training windows; returns meta.json's dict."""
  validate(config.seqkd, config.data, workdir)
  seqkd = config.seqkd
  out_dir = os.path.join(workdir, SUBDIR)
  if os.path.exists(windows_path(workdir)):
    logging.info("Teacher text already in %s; keeping it.", out_dir)
    return storage.read_json(os.path.join(out_dir, "meta.json"), default={})
  seq_length = int(config.data.seq_length)
  prompt_length = int(seqkd.prompt_length)
  source = packing.packed_split(
      dict_without_windows_file(config.data), config.data.train_split)
  num = min(int(seqkd.num_sequences), source.num_sequences)
  prompts = source.windows[:num, :prompt_length]
  new_tokens = seq_length + 1 - prompt_length
  sampling = generate.Sampling(float(seqkd.temperature), int(seqkd.top_k),
                               float(seqkd.top_p))
  mesh = layout.make_mesh(config)
  model, params = lm_report.load_teacher(config, workdir, mesh)
  if not layout.is_sharded(mesh):  # Small enough for one device.
    params = jax.device_put(params, jax.local_devices()[0])
  parts_dir = os.path.join(out_dir, "parts")
  os.makedirs(parts_dir, exist_ok=True)
  batch = int(seqkd.batch_size)
  start_time = time.time()
  parts = []
  for start in range(0, num, batch):
    stop = min(start + batch, num)
    # Named by its rows: a restart with another batch size or count
    # generates its own parts instead of reusing ones that overlap.
    part = os.path.join(parts_dir, f"{start:08d}-{stop:08d}.npy")
    if not os.path.exists(part):
      rng = jax.random.fold_in(jax.random.key(int(config.seed)), start)
      new = generate.generate(model, params, prompts[start:stop],
                              max_new_tokens=new_tokens, sampling=sampling,
                              rng=rng)
      windows = np.concatenate([prompts[start:stop], new], axis=1)
      with storage.atomic_path(part) as tmp, open(tmp, "wb") as f:
        np.save(f, windows.astype(np.int32))
      elapsed = time.time() - start_time
      logging.info("generate_text: %d/%d sequences, %.1f new tokens/s", stop,
                   num, (stop - start) * new_tokens / max(elapsed, 1e-9)
                   if start == 0 else stop * new_tokens / max(elapsed, 1e-9))
    parts.append(np.load(part))
    if len(parts[-1]) != stop - start:
      raise ValueError(f"{part} holds {len(parts[-1])} windows, not "
                       f"{stop - start}: delete {parts_dir} and run again.")
  windows = np.concatenate(parts)
  tokenizer = tokenizer_lib.load(config.data.tokenizer_path)
  samples = "\n\n----\n\n".join(
      tokenizer.decode(w[:prompt_length].tolist()) + " >>> "
      + tokenizer.decode(w[prompt_length:].tolist()) for w in windows[:5])
  meta = {"teacher": (config.teacher.init_from
                      if specs.pretrained_teacher(config)
                      else specs.teacher_dir(config, workdir)),
          "num_sequences": int(num), "prompt_length": prompt_length,
          "new_tokens": new_tokens, "seq_length": seq_length,
          "sampling": vars(sampling), "seconds": time.time() - start_time}
  if jax.process_index() == 0:
    storage.write_text(os.path.join(out_dir, "samples.txt"), samples + "\n")
    storage.write_json(os.path.join(out_dir, "meta.json"), meta)
    with storage.atomic_path(windows_path(workdir)) as tmp, open(tmp,
                                                                  "wb") as f:
      np.save(f, windows)
  logging.info("Teacher text: %d windows in %s", num, out_dir)
  return meta


def dict_without_windows_file(data_config):
  """The data config reading the real training text (not generated windows)."""
  plain = ml_collections.ConfigDict(data_config.to_dict())
  plain.train_windows_file = ""
  return plain
