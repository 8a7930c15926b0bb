"""Evaluation metrics against hand-written numpy references, values not ranges.

`metrics.classification_metrics` (after `metrics.predict_logits`, which pads
the last batch) and `lm_metrics.token_metrics` (padded rows, masked tokens) on
hand-built logits: the models here are identities that return their inputs as
logits. The references are written out below in float64 numpy; sklearn, which
the report itself uses, is deliberately not one of them.
"""

import math

import jax
import numpy as np
import pytest

from kdjax import models
from kdjax.distill import parallel
from kdjax.distill.objectives import ModelOutputs
from kdjax.run import lm_metrics, metrics


def _identity_apply(params, inputs, train, dropout_rng, capture_features=False):
  """A 'model' whose logits are its inputs (params unused)."""
  del params, train, dropout_rng, capture_features
  return ModelOutputs(inputs)


def _student_apply(params, inputs, train, dropout_rng, capture_features=False):
  """inputs [..., 2, V]: the student's logits are [..., 0, :]."""
  del params, train, dropout_rng, capture_features
  return ModelOutputs(inputs[..., 0, :])


def _teacher_apply(params, inputs, train, dropout_rng, capture_features=False):
  """inputs [..., 2, V]: the teacher's logits are [..., 1, :]."""
  del params, train, dropout_rng, capture_features
  return ModelOutputs(inputs[..., 1, :])


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for index in np.ndindex(x.shape[:-1]):  # Row by row, the textbook way.
    row = x[index]
    m = max(row)
    out[index] = [v - m - math.log(sum(math.exp(u - m) for u in row))
                  for v in row]
  return out


def _reference_classification(logits, labels, teacher_logits):
  """Accuracy, macro P/R/F1 over the classes seen in labels or predictions
  (0 where a ratio is 0/0), agreement and mean KL(teacher || student)."""
  predictions = [int(np.argmax(row)) for row in logits]
  labels = [int(x) for x in labels]
  n = len(labels)
  classes = sorted(set(labels) | set(predictions))
  precision, recall, f1 = [], [], []
  for c in classes:
    tp = sum(p == c and y == c for p, y in zip(predictions, labels))
    fp = sum(p == c and y != c for p, y in zip(predictions, labels))
    fn = sum(p != c and y == c for p, y in zip(predictions, labels))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    precision.append(p)
    recall.append(r)
    f1.append(2 * p * r / (p + r) if p + r else 0.0)
  teacher_predictions = [int(np.argmax(row)) for row in teacher_logits]
  log_p, log_q = _log_softmax(teacher_logits), _log_softmax(logits)
  kl = [sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
        for lp, lq in zip(log_p, log_q)]
  return {
      "accuracy": sum(p == y for p, y in zip(predictions, labels)) / n,
      "precision_macro": sum(precision) / len(classes),
      "recall_macro": sum(recall) / len(classes),
      "f1_macro": sum(f1) / len(classes),
      "agreement_with_teacher": sum(
          p == t for p, t in zip(predictions, teacher_predictions)) / n,
      "kl_to_teacher": sum(kl) / n,
  }


def test_classification_metrics_by_hand():
  """Six examples, three classes (+ a class never seen), worked out on paper.

  predictions 0 0 1 2 2 2, labels 0 1 1 1 2 0:
    class 0: tp 1, fp 1, fn 1 -> P 1/2, R 1/2, F1 1/2
    class 1: tp 1, fp 0, fn 2 -> P 1,   R 1/3, F1 1/2
    class 2: tp 1, fp 2, fn 0 -> P 1/3, R 1,   F1 1/2
  class 3 is neither a label nor a prediction, so it does not count.
  """
  logits = np.full((6, 4), -2.0, np.float32)
  for i, c in enumerate([0, 0, 1, 2, 2, 2]):
    logits[i, c] = 1.0
  labels = np.array([0, 1, 1, 1, 2, 0])
  # The teacher agrees on rows 0, 2, 4 and puts row i's logits elsewhere.
  teacher = np.roll(logits, 1, axis=-1)
  teacher[[0, 2, 4]] = logits[[0, 2, 4]]
  result = metrics.classification_metrics(logits, labels, teacher)
  # Each disagreeing row: p = softmax(teacher) puts e/(e + 3e^-2) on c+1,
  # q on c; KL = sum p (log p - log q) = (a - b)(p_hi - p_lo) with a - b = 3.
  e_hi, e_lo = math.exp(1.0), math.exp(-2.0)
  p_hi, p_lo = e_hi / (e_hi + 3 * e_lo), e_lo / (e_hi + 3 * e_lo)
  expected = {"accuracy": 3 / 6,
              "precision_macro": (1 / 2 + 1 + 1 / 3) / 3,
              "recall_macro": (1 / 2 + 1 / 3 + 1) / 3,
              "f1_macro": 1 / 2,
              "agreement_with_teacher": 3 / 6,
              "kl_to_teacher": 3 / 6 * 3 * (p_hi - p_lo)}
  assert result.keys() == expected.keys()
  for key, value in expected.items():
    assert result[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
  assert metrics.classification_metrics(logits, labels, brief=True) == {
      "accuracy": 0.5}
  # A class that is a label but never predicted: precision 0 (not 0/0).
  result = metrics.classification_metrics(logits[:2], np.array([1, 1]))
  assert result["precision_macro"] == 0.0 and result["recall_macro"] == 0.0


def test_ties_and_classes_never_predicted_or_never_labelled():
  """Ties go to the lowest class; every class that is a label or a
  prediction counts in the macro means, a 0/0 ratio as 0.

  Rows (5 classes; the tied maxima in brackets):
    r0 [0 1] -> 0   r1 [1 2 3] -> 1   r2 [0 1 2 3] -> 0   r3 [2 3] -> 2
    r4 -> 0         r5 -> 3           r6 [0 1 2 3] -> 0
  predictions 0 1 0 2 0 3 0, labels 1 1 0 2 0 2 4:
    class 0: tp 2, fp 2, fn 0 -> P 1/2, R 1,   F1 2/3
    class 1: tp 1, fp 0, fn 1 -> P 1,   R 1/2, F1 2/3
    class 2: tp 1, fp 0, fn 1 -> P 1,   R 1/2, F1 2/3
    class 3: predicted, never a label: tp 0, fp 1 -> P 0, R 0/0 = 0, F1 0
    class 4: a label, never predicted: tp 0, fn 1 -> P 0/0 = 0, R 0, F1 0
  macro P = 2.5 / 5, macro R = 2 / 5, macro F1 = 2 / 5; accuracy 4 / 7.
  """
  logits = np.array([[2, 2, 0, 0, -1],
                     [0, 1, 1, 1, -1],
                     [0, 0, 0, 0, -1],
                     [0, 0, 5, 5, -1],
                     [1, 0, 0, 0, -1],
                     [0, 0, 0, 3, -1],
                     [0, 0, 0, 0, -1]], np.float32)
  labels = np.array([1, 1, 0, 2, 0, 2, 4])
  # The teacher breaks rows 0 and 1's ties the other way: argmax 1, then 0.
  teacher = logits.copy()
  teacher[0] = [0, 2, 2, 0, -1]
  teacher[1] = [1, 1, 1, 1, -1]
  result = metrics.classification_metrics(logits, labels, teacher)
  log_p, log_q = _log_softmax(teacher), _log_softmax(logits)
  kl = [sum(math.exp(a) * (a - b) for a, b in zip(log_p[i], log_q[i]))
        for i in (0, 1)]  # The other rows are equal: KL 0.
  expected = {"accuracy": 4 / 7, "precision_macro": 2.5 / 5,
              "recall_macro": 2 / 5, "f1_macro": 2 / 5,
              "agreement_with_teacher": 5 / 7, "kl_to_teacher": sum(kl) / 7}
  assert result.keys() == expected.keys()
  for key, value in expected.items():
    assert result[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
  assert sum(kl) > 0.5  # The two rows differ by far more than rounding.


@pytest.mark.parametrize("n,batch_size", [(13, 1024), (13, 8), (16, 8)])
def test_predict_logits_then_metrics_match_reference(n, batch_size):
  """Data-parallel prediction over 8 devices (last batch padded with zero
  rows, which must not reach the metrics), then every metric's value."""
  rng = np.random.default_rng(n + batch_size)
  num_classes = 5
  inputs = rng.normal(size=(n, num_classes)).astype(np.float32) * 2.0
  labels = np.argmax(inputs + rng.normal(size=inputs.shape) * 2.0, -1)
  teacher_logits = (inputs + rng.normal(size=inputs.shape) * 1.5).astype(
      np.float32)
  mesh = parallel.make_mesh()
  logits = metrics.predict_logits(_identity_apply, {}, inputs, mesh,
                                  batch_size=batch_size)
  np.testing.assert_array_equal(logits, inputs)
  result = metrics.classification_metrics(logits, labels, teacher_logits)
  expected = _reference_classification(inputs, labels, teacher_logits)
  assert result.keys() == expected.keys()
  for key, value in expected.items():
    assert result[key] == pytest.approx(value, rel=1e-6), key
  assert 0 < expected["kl_to_teacher"]
  assert 0 < expected["f1_macro"] < 1 and 0 < expected["accuracy"] < 1


def test_token_metrics_match_reference():
  """11 sequences (batches of 8 on 8 devices: the second padded with 5 zero
  rows), masked tokens whose labels would change every metric."""
  rng = np.random.default_rng(0)
  rows, length, vocab = 11, 6, 7
  student = rng.normal(size=(rows, length, vocab)) * 2.0
  teacher = student + rng.normal(size=student.shape) * 1.5
  labels = rng.integers(0, vocab, (rows, length)).astype(np.int32)
  mask = (rng.random((rows, length)) < 0.7).astype(np.float32)
  mask[3] = 0.0  # A whole row masked.
  # On masked tokens: labels the student finds very unlikely, and the
  # teacher far from the student; counted, they would move every metric.
  for r, t in zip(*np.nonzero(mask == 0)):
    labels[r, t] = np.argmin(student[r, t])
    teacher[r, t] = -teacher[r, t] * 5.0
  arrays = {"inputs": np.stack([student, teacher], axis=-2).astype(np.float32),
            "labels": labels, "mask": mask}
  mesh = parallel.make_mesh()
  result = lm_metrics.token_metrics(_student_apply, {}, arrays, mesh,
                                    teacher_apply=_teacher_apply,
                                    teacher_params={}, batch_size=8)

  s = arrays["inputs"][..., 0, :].astype(np.float64)
  t = arrays["inputs"][..., 1, :].astype(np.float64)
  log_q, log_p = _log_softmax(s), _log_softmax(t)
  nll, correct, agree, kl, count = 0.0, 0, 0, 0.0, 0
  for r in range(rows):
    for i in range(length):
      if not mask[r, i]:
        continue
      count += 1
      nll -= log_q[r, i, labels[r, i]]
      correct += int(np.argmax(s[r, i]) == labels[r, i])
      agree += int(np.argmax(s[r, i]) == np.argmax(t[r, i]))
      kl += float(np.sum(np.exp(log_p[r, i]) * (log_p[r, i] - log_q[r, i])))
  expected = {"perplexity": math.exp(nll / count), "nll": nll / count,
              "accuracy": correct / count, "tokens": count,
              "kl_to_teacher": kl / count,
              "agreement_with_teacher": agree / count}
  assert result.keys() == expected.keys()
  assert result["tokens"] == count == int(mask.sum())
  for key, value in expected.items():
    assert result[key] == pytest.approx(value, rel=2e-6), key
  assert 0 < expected["accuracy"] < 1 and 0 < expected["agreement_with_teacher"] < 1

  # Without a teacher: the student's own metrics only, the same values.
  alone = lm_metrics.token_metrics(_student_apply, {}, arrays, mesh,
                                   batch_size=8)
  assert alone.keys() == {"perplexity", "nll", "accuracy", "tokens"}
  for key in alone:
    assert alone[key] == pytest.approx(expected[key], rel=2e-6), key


def test_a_padded_teacher_vocabulary_is_cut_to_the_students_ids():
  """A teacher with 3 padding ids past the student's 5 (the same tokenizer):
  KL and agreement over the student's ids, as training sees them; the
  padding ids' logits (large here) would otherwise win every argmax."""
  rng = np.random.default_rng(1)
  student = rng.normal(size=(2, 3, 5)) * 2.0
  teacher = np.concatenate([student + rng.normal(size=student.shape),
                            np.full((2, 3, 3), 9.0)], -1)
  labels = rng.integers(0, 5, (2, 3)).astype(np.int32)
  mask = np.ones((2, 3), np.float32)
  sums = lm_metrics._batch_sums(  # pylint: disable=protected-access
      student.astype(np.float32), teacher.astype(np.float32), labels, mask)
  log_q, log_p = _log_softmax(student), _log_softmax(teacher[..., :5])
  kl = np.sum(np.exp(log_p) * (log_p - log_q), -1).sum()
  agree = np.sum(student.argmax(-1) == teacher[..., :5].argmax(-1))
  assert float(sums["kl"]) == pytest.approx(kl, rel=1e-5)
  assert int(sums["agreement"]) == agree > 0


def test_generation_speed_is_nan_for_models_without_a_kv_cache():
  """Only Llama generates through a KV cache (kdjax.models.generate)."""
  gpt = models.get_model("gpt", vocab_size=11, width=8, num_layers=1,
                         num_heads=2, max_length=16)
  arrays = {"inputs": np.zeros((4, 8), np.int32)}
  assert math.isnan(lm_metrics.generation_speed(
      gpt, {}, arrays, batch=2, prompt_length=4, new_tokens=2))


def test_throughput_counts_the_examples_actually_timed(monkeypatch):
  """10 inputs, batch 256: each timed call runs 10 examples. A clock that
  advances 1 s per reading makes every call last 1 s."""
  clock = iter(range(1000))
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  model = models.get_model("mlp", num_classes=3, hidden=(4,))
  inputs = np.zeros((10, 6), np.float32)
  params = model.init(jax.random.key(0), inputs[:1])["params"]
  rate = metrics.inference_examples_per_second(
      metrics.cached_apply_fn(model), params, inputs, batch_size=256)
  assert rate == 10.0
