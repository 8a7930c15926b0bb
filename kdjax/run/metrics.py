"""In-loop classification metrics: logits over the mesh, accuracy, F1, speed.

The training loop (kdjax.run.tasks) evaluates with `predict_logits` and
`classification_metrics`; the report (kdjax.run.report) uses the same
functions for its numbers, and `inference_examples_per_second` for speed.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from sklearn import metrics as skmetrics

from kdjax.distill import parallel, step


def predict_logits(apply_fn, params, inputs: np.ndarray, mesh, *,
                   batch_size: int = 1024) -> np.ndarray:
  """Logits for all `inputs`, data-parallel over the mesh, gathered to host."""
  num_devices = mesh.devices.size
  n = len(inputs)
  # No bigger than needed: a small eval set is not padded to 1024 examples.
  batch_size = min(batch_size, -(-n // num_devices) * num_devices)
  batch_size = max(num_devices, batch_size // num_devices * num_devices)
  forward = _jitted_forward(apply_fn)
  params = parallel.on_mesh(params, mesh)
  outputs = []
  for start in range(0, n, batch_size):
    chunk = inputs[start:start + batch_size]
    pad = (-len(chunk)) % batch_size if len(chunk) < batch_size else 0
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:],
                                              chunk.dtype)])
    per_process = len(chunk) // jax.process_count()
    local = chunk[jax.process_index() * per_process:
                  (jax.process_index() + 1) * per_process]
    logits = forward(params, parallel.shard_batch(local, mesh))
    logits = multihost_utils.process_allgather(logits, tiled=True)
    outputs.append(np.asarray(logits)[:len(chunk) - pad])
  return np.concatenate(outputs)


@functools.lru_cache(maxsize=16)
def _jitted_forward(apply_fn):
  """One compiled forward per model (apply_fn), reused across calls."""
  return jax.jit(lambda params, x: step.predict(apply_fn, params, x))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           teacher_logits: np.ndarray | None = None, *,
                           brief: bool = False) -> dict[str, float]:
  """Accuracy, macro precision/recall/F1, and agreement/KL with the teacher."""
  predictions = np.argmax(logits, -1)
  result = {"accuracy": float(np.mean(predictions == labels))}
  if brief:
    return result
  precision, recall, f1, _ = skmetrics.precision_recall_fscore_support(
      labels, predictions, average="macro", zero_division=0)
  result.update(precision_macro=float(precision), recall_macro=float(recall),
                f1_macro=float(f1))
  if teacher_logits is not None:
    result["agreement_with_teacher"] = float(
        np.mean(predictions == np.argmax(teacher_logits, -1)))
    log_p, log_q = _log_softmax(teacher_logits), _log_softmax(logits)
    result["kl_to_teacher"] = float(
        np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1)))
  return result


def inference_examples_per_second(apply_fn, params, inputs: np.ndarray, *,
                                  batch_size: int = 256, repeats: int = 5
                                  ) -> float:
  """Median throughput of the jitted forward pass on one device of this machine."""
  forward = jax.jit(lambda p, x: step.predict(apply_fn, p, x))
  device = jax.local_devices()[0]
  params = jax.device_put(params, device)
  x = jax.device_put(jnp.asarray(inputs[:batch_size]), device)
  forward(params, x).block_until_ready()  # Compile.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    forward(params, x).block_until_ready()
    times.append(time.perf_counter() - start)
  return float(x.shape[0] / np.median(times))  # Fewer when inputs are.


@functools.lru_cache(maxsize=16)
def cached_apply_fn(model):
  """One apply function per model, so _jitted_forward's cache hits."""
  return step.make_apply_fn(model)
