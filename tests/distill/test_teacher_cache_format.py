"""The teacher cache's record format: dtypes, encode/decode, bytes per token
(building caches and distilling from them: tests/e2e/test_teacher_cache.py)."""

import os

import numpy as np

from kdjax.distill import teacher_cache
from kdjax.run import cache_builder


def test_encoding_round_trip_and_bytes_per_token(tmp_path):
  """k = 64 at vocabulary 49,152, bfloat16 + uint16: 260 bytes a token, and
  at most 300 in a written shard (incompressible random entries)."""
  dtype = teacher_cache.record_dtype(128, 64, "bfloat16",
                                     teacher_cache.index_dtype(49152).str)
  assert dtype.itemsize == 8 + 128 * 260
  assert teacher_cache.index_dtype(65536) == np.uint16
  assert teacher_cache.index_dtype(65537) == np.int32
  rng = np.random.default_rng(0)
  log_probs = -rng.random((3, 128, 64)).astype(np.float32) * 10
  indices = rng.integers(0, 49152, (3, 128, 64)).astype(np.uint16)
  tail = np.log(rng.random((3, 128))).astype(np.float32)
  raw = teacher_cache.encode(np.array([5, 9, 2]), log_probs, indices, tail,
                             dtype)
  assert [len(r) for r in raw] == [dtype.itemsize] * 3
  back = teacher_cache.decode(raw, dtype)
  np.testing.assert_array_equal(back["record"], [5, 9, 2])
  np.testing.assert_array_equal(back["indices"], indices)
  np.testing.assert_array_equal(back["log_tail"], tail)
  np.testing.assert_allclose(back["log_probs"].astype(np.float32), log_probs,
                             rtol=2 ** -8)
  path = str(tmp_path / cache_builder.shard_name(0, 1))
  n = 64  # A shard costs a fixed ~64-128 KiB of array_record framing.
  raw = teacher_cache.encode(
      np.arange(n), -10 * rng.random((n, 128, 64)),
      rng.integers(0, 49152, (n, 128, 64)), np.log(rng.random((n, 128))),
      dtype)
  cache_builder._write_shard(path, raw)  # pylint: disable=protected-access
  assert os.path.getsize(path) / (n * 128) <= 300
