"""The classification report (kdjax.run.report) on a hand-made pipeline workdir.

The workdir is laid out as kdjax.modes.run_pipeline leaves it (teacher/,
full_data/{scratch,distill,distill_<variant>}/seed_<s>/, data_<p>pct/...,
each run with its run.json). The models are tiny MLPs; only what reads disk
or the clock is replaced: the eval split, the teacher and student
checkpoints (their params are made here) and the throughput timer. Every
number is checked against a float64 numpy reference computed here from the
params (the forward pass and the metrics written out), never against the
report's own helpers.
"""

import json
import math
import os

import jax
import ml_collections
import numpy as np
import pytest

from kdjax.data import pipeline
from kdjax.models import mlp
from kdjax.run import metrics, report
from kdjax.runtime import checkpoint
from kdjax.weights import teachers as teachers_lib

NUM_CLASSES, WIDTH, N = 4, 6, 40
TEACHER_HIDDEN, STUDENT_HIDDEN, SMALL_HIDDEN = 12, 8, 5


def _mlp_params(hidden: int) -> int:  # Dense(WIDTH -> hidden) + head.
  return WIDTH * hidden + hidden + hidden * NUM_CLASSES + NUM_CLASSES


# Throughput the (replaced) timer reports, by parameter count.
SPEED = {_mlp_params(TEACHER_HIDDEN): 100.0, _mlp_params(STUDENT_HIDDEN): 400.0,
         _mlp_params(SMALL_HIDDEN): 900.0}

# run dir -> (role, seed, train_fraction, variant, hidden)
STUDENTS = {
    "full_data/scratch/seed_0": ("scratch", 0, 1.0, "", STUDENT_HIDDEN),
    "full_data/scratch/seed_1": ("scratch", 1, 1.0, "", STUDENT_HIDDEN),
    "full_data/distill/seed_0": ("distill", 0, 1.0, "", STUDENT_HIDDEN),
    "full_data/distill/seed_1": ("distill", 1, 1.0, "", STUDENT_HIDDEN),
    "full_data/distill/seed_2": ("distill", 2, 1.0, "", STUDENT_HIDDEN),
    "full_data/distill_small/seed_0": ("distill", 0, 1.0, "small",
                                       SMALL_HIDDEN),
    "data_10pct/distill/seed_0": ("distill", 0, 0.1, "", STUDENT_HIDDEN),
}


def _spec(hidden: int) -> dict:
  """A student's model as its run.json holds it (JSON: lists, not tuples)."""
  return {"name": "mlp", "hidden": [hidden], "dropout_rate": 0.0,
          "num_classes": NUM_CLASSES}


def _config(workdir: str) -> ml_collections.ConfigDict:
  """What the report reads of a classification config."""
  return ml_collections.ConfigDict(dict(
      data=dict(name="hand_made", input_shape=(WIDTH,),
                num_classes=NUM_CLASSES, eval_split="test"),
      teacher=dict(model=dict(name="mlp", hidden=(TEACHER_HIDDEN,),
                              dropout_rate=0.0),
                   checkpoint_dir=os.path.join(workdir, "teacher"),
                   init_from=""),
      student=dict(model=dict(name="mlp", hidden=(STUDENT_HIDDEN,),
                              dropout_rate=0.0)),
      distill=dict(extra_teachers=())))


def _init(hidden: int, seed: int, scale: float) -> dict:
  """Random MLP params (numpy; nothing compiled): random biases, so no row
  ties every class, and the head scaled so no argmax is a near-tie."""
  rng = np.random.default_rng(seed)

  def dense(fan_in, fan_out, std):
    return {"kernel": rng.normal(0, std / np.sqrt(fan_in), (fan_in, fan_out)
                                 ).astype(np.float32),
            "bias": rng.normal(0.5, 0.5, fan_out).astype(np.float32)}
  return {"dense_0": dense(WIDTH, hidden, 1.0),
          "head": dense(hidden, NUM_CLASSES, scale)}


def _write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _make_workdir(path) -> str:
  """A pipeline workdir: run.json files where the pipeline writes them, plus
  files the report must not take for runs."""
  root = str(path / "work")
  _write_json(os.path.join(root, "teacher", "run.json"), {
      "role": "teacher", "seed": 0, "train_fraction": 1.0, "objective": "ce",
      "model": {"name": "mlp", "hidden": [TEACHER_HIDDEN]},
      "num_trainable_params": 130})
  for i, (run_dir, (role, seed, fraction, variant, hidden)) in enumerate(
      sorted(STUDENTS.items())):
    _write_json(os.path.join(root, run_dir, "run.json"), {
        "role": role, "seed": seed, "train_fraction": fraction,
        "objective": "ce" if role == "scratch" else "0.5 kl + 0.5 ce",
        "variant": variant, "model": _spec(hidden),
        "num_trainable_params": 50 + i})
  # Not runs: a checkpoint's and tensorboard's folders are never walked.
  for skipped in ("full_data/distill/seed_1/checkpoints",
                  "full_data/scratch/seed_0/tensorboard"):
    _write_json(os.path.join(root, skipped, "run.json"), {
        "role": "distill", "seed": 99, "train_fraction": 1.0,
        "objective": "x", "model": _spec(STUDENT_HIDDEN)})
  # A second teacher's run is found but is no student.
  _write_json(os.path.join(root, "teacher_extra", "run.json"), {
      "role": "teacher", "seed": 5, "train_fraction": 1.0, "objective": "ce",
      "model": {"name": "mlp"}})
  return root


@pytest.fixture
def workdir(tmp_path):
  return _make_workdir(tmp_path)


def test_find_runs_walks_the_pipeline_layout(workdir):
  runs = report.find_runs(workdir)
  found = [os.path.relpath(path, workdir) for path, _ in runs]
  assert found == sorted(["teacher", "teacher_extra", *STUDENTS])
  by_dir = dict(zip(found, (run for _, run in runs)))
  assert by_dir["full_data/distill/seed_2"]["seed"] == 2
  assert by_dir["full_data/distill_small/seed_0"]["variant"] == "small"
  assert all(run["seed"] != 99 for _, run in runs)  # No checkpoints/.
  assert report.find_runs(os.path.join(workdir, "nothing_here")) == []


@pytest.mark.parametrize("run,key", [
    (dict(role="distill", train_fraction=1.0), "distill (full data)"),
    (dict(role="scratch", train_fraction=1.0, variant=""),
     "scratch (full data)"),
    (dict(role="distill", train_fraction=0.03, variant="jsd"),
     "distill[jsd] (3% of data)"),
    (dict(role="scratch", train_fraction=0.1, variant="prompt"),
     "scratch[prompt] (10% of data)"),
    (dict(role="distill", train_fraction=0.25), "distill (25% of data)"),
    # As the pipeline names the run dir (data_0.5pct): two small fractions
    # must not share a group.
    (dict(role="distill", train_fraction=0.005), "distill (0.5% of data)"),
    (dict(role="distill", train_fraction=0.125), "distill (12.5% of data)"),
])
def test_group_key(run, key):
  assert report.group_key(run) == key


def _forward(params, x):
  """The MLP in float64: Dense -> ReLU -> Dense."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.maximum(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"], 0.0)
  return h @ p["head"]["kernel"] + p["head"]["bias"]


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference_metrics(logits, labels, teacher_logits=None):
  """Accuracy; macro P/R/F1 over the classes that are a label or a
  prediction (0/0 = 0); agreement with and KL(teacher || student)."""
  pred = logits.argmax(-1)
  classes = sorted(set(labels.tolist()) | set(pred.tolist()))
  prf = []
  for c in classes:
    tp = np.sum((pred == c) & (labels == c))
    fp = np.sum((pred == c) & (labels != c))
    fn = np.sum((pred != c) & (labels == c))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    prf.append((p, r, 2 * p * r / (p + r) if p + r else 0.0))
  prf = np.asarray(prf)
  out = {"accuracy": np.mean(pred == labels),
         "precision_macro": prf[:, 0].mean(), "recall_macro": prf[:, 1].mean(),
         "f1_macro": prf[:, 2].mean()}
  if teacher_logits is not None:
    log_p, log_q = _log_softmax(teacher_logits), _log_softmax(logits)
    out["agreement_with_teacher"] = np.mean(pred == teacher_logits.argmax(-1))
    out["kl_to_teacher"] = np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1))
  return out


def _assert_no_near_ties(logits):
  top2 = np.sort(logits, -1)[:, -2:]
  assert np.min(top2[:, 1] - top2[:, 0]) > 1e-3


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """write_report on a workdir, once for the module: (workdir, config,
  report, inputs, labels, teacher params, params by run dir, timer calls)."""
  workdir = _make_workdir(tmp_path_factory.mktemp("evaluated"))
  with pytest.MonkeyPatch.context() as monkeypatch:
    return (workdir,) + _evaluate(workdir, monkeypatch)


def _evaluate(workdir, monkeypatch):
  config = _config(workdir)
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(N, WIDTH)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, N)
  teacher_params = _init(TEACHER_HIDDEN, 100, 6.0)
  # Labels mostly the teacher's predictions, so the teacher is accurate.
  flip = rng.random(N) < 0.2
  labels = np.where(flip, labels, _forward(teacher_params, inputs).argmax(-1))
  params = {os.path.join(workdir, run_dir): _init(hidden, i, 4.0)
            for i, (run_dir, (*_, hidden)) in enumerate(sorted(STUDENTS.items()))}

  def get_source(data_config, split):
    assert split == "test" and data_config.num_classes == NUM_CLASSES
    return "the test split"

  def load_split(source, data_config):
    del data_config
    assert source == "the test split"
    return {"inputs": inputs, "labels": labels}

  def load_teacher(config_, spec):
    assert spec.path == os.path.join(workdir, "teacher")
    return teachers_lib.Teacher(
        mlp.MLP(num_classes=NUM_CLASSES, hidden=(TEACHER_HIDDEN,)),
        teacher_params, {})

  def restore_params(run_dir, abstract, step=None, base=None):
    # The newest step of a checkpoint that holds every leaf.
    assert step is None and base is None
    # The model built from the run's own run.json has these shapes.
    assert jax.tree.map(np.shape, abstract) == jax.tree.map(
        np.shape, params[run_dir])
    return params[run_dir]

  timed = []

  def examples_per_second(apply_fn, params_, inputs_):
    del apply_fn, inputs_
    count = sum(np.size(p) for p in jax.tree.leaves(params_))
    timed.append(count)
    return SPEED[count]

  monkeypatch.setattr(pipeline, "get_source", get_source)
  monkeypatch.setattr(pipeline, "load_split", load_split)
  monkeypatch.setattr(teachers_lib, "load", load_teacher)
  monkeypatch.setattr(checkpoint, "restore_params", restore_params)
  monkeypatch.setattr(checkpoint, "params_bytes",
                      lambda run_dir: 1000 + len(run_dir))
  monkeypatch.setattr(metrics, "inference_examples_per_second",
                      examples_per_second)
  result = report.write_report(config, workdir)
  return config, result, inputs, labels, teacher_params, params, timed


def test_write_report_every_student_matches_reference(evaluated):
  workdir, _, result, inputs, labels, teacher_params, params, timed = evaluated
  teacher_logits = _forward(teacher_params, inputs)
  _assert_no_near_ties(teacher_logits)

  t = result["teacher"]
  expected = _reference_metrics(teacher_logits, labels)
  for key, value in expected.items():
    assert t[key] == pytest.approx(value, rel=1e-9), key
  assert t["num_params"] == _mlp_params(TEACHER_HIDDEN)
  assert t["num_trainable_params"] == 130  # From teacher/run.json.
  assert t["run_dir"] == "teacher"
  assert t["inference_examples_per_second"] == 100.0
  assert t["checkpoint_bytes"] == 1000 + len(os.path.join(workdir, "teacher"))
  assert 0.7 < t["accuracy"] < 1.0

  students = result["students"]
  assert [s["run_dir"] for s in students] == sorted(STUDENTS)
  for i, s in enumerate(students):
    role, seed, fraction, variant, hidden = STUDENTS[s["run_dir"]]
    logits = _forward(params[os.path.join(workdir, s["run_dir"])], inputs)
    _assert_no_near_ties(logits)
    expected = _reference_metrics(logits, labels, teacher_logits)
    assert set(expected) <= set(s)
    for key, value in expected.items():
      assert s[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (s["run_dir"],
                                                                  key)
    assert (s["method"], s["seed"], s["train_fraction"], s["variant"]) == (
        role, seed, fraction, variant)
    assert s["model"] == "mlp"
    assert s["num_params"] == _mlp_params(hidden)
    assert s["num_trainable_params"] == 50 + i
    assert s["inference_examples_per_second"] == SPEED[_mlp_params(hidden)]
    assert "arch" not in s
  # The timer ran once for the teacher and once per student architecture.
  assert sorted(timed) == sorted(SPEED)
  # Seeds differ, so a mean that drops or repeats one would show.
  accuracies = [s["accuracy"] for s in students]
  assert len(set(accuracies)) >= 4


def test_write_report_groups_mean_and_std_over_seeds(evaluated):
  workdir, _, result, inputs, labels, teacher_params, params, _ = evaluated
  teacher_logits = _forward(teacher_params, inputs)
  by_group = {}
  for run_dir in sorted(STUDENTS):
    role, seed, fraction, variant, _ = STUDENTS[run_dir]
    name = role + (f"[{variant}]" if variant else "") + (
        " (full data)" if fraction == 1.0 else f" ({fraction * 100:g}% of data)")
    by_group.setdefault(name, []).append((seed, _reference_metrics(
        _forward(params[os.path.join(workdir, run_dir)], inputs), labels,
        teacher_logits)))
  assert list(result["groups"]) == list(by_group)
  assert set(by_group) == {"distill (10% of data)", "distill (full data)",
                           "distill[small] (full data)", "scratch (full data)"}
  for name, members in by_group.items():
    g = result["groups"][name]
    acc = [m["accuracy"] for _, m in members]
    n = len(acc)
    mean = sum(acc) / n
    std = math.sqrt(sum((a - mean) ** 2 for a in acc) / (n - 1)) if n > 1 else 0
    assert g["seeds"] == [seed for seed, _ in members], name
    assert g["accuracy_per_seed"] == pytest.approx(acc, rel=1e-9), name
    assert g["accuracy_mean"] == pytest.approx(mean, rel=1e-9), name
    assert g["accuracy_std"] == pytest.approx(std, rel=1e-9, abs=1e-12), name
    for key in ("f1_macro", "agreement_with_teacher", "kl_to_teacher"):
      want = sum(m[key] for _, m in members) / n
      assert g[f"{key}_mean"] == pytest.approx(want, rel=1e-5), (name, key)
  distill = result["groups"]["distill (full data)"]
  assert distill["method"] == "distill" and distill["train_fraction"] == 1.0
  assert distill["objective"] == "0.5 kl + 0.5 ce"
  assert distill["accuracy_std"] > 0  # Three different seeds.
  assert result["groups"]["distill (10% of data)"]["train_fraction"] == 0.1


def test_write_report_ratios_and_files(evaluated):
  workdir, config, result, _, labels, _, _, _ = evaluated
  # Compression and speed-up against config.student.model's architecture
  # (hidden 8), not the [small] variant's.
  assert result["compression_ratio"] == pytest.approx(
      _mlp_params(TEACHER_HIDDEN) / _mlp_params(STUDENT_HIDDEN), rel=1e-12)
  assert result["speedup"] == pytest.approx(400.0 / 100.0, rel=1e-12)
  assert result["num_eval_examples"] == len(labels) == N
  assert (result["dataset"], result["eval_split"]) == ("hand_made", "test")
  assert result["student_model"]["hidden"] == (STUDENT_HIDDEN,)
  assert config.student.model.hidden == (STUDENT_HIDDEN,)
  with open(os.path.join(workdir, report.REPORT_JSON)) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  with open(os.path.join(workdir, report.REPORT_MD)) as f:
    assert f.read() == report.render_markdown(result)
  with open(os.path.join(workdir, report.REPORT_PNG), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _hand_made_report():
  teacher = {"accuracy": 0.987654, "precision_macro": 0.91236,
             "recall_macro": 0.81234, "f1_macro": 0.85557,
             "num_params": 1234567, "num_trainable_params": 7654,
             "checkpoint_bytes": 4938271, "inference_examples_per_second":
                 12345.6, "run_dir": "teacher"}

  def student(group, seed, accuracy, run_dir):
    return {"group": group, "method": group.split()[0], "variant": "",
            "seed": seed, "train_fraction": 1.0, "objective": "kl",
            "accuracy": accuracy, "precision_macro": 0.71234,
            "recall_macro": 0.61234, "f1_macro": 0.65432,
            "agreement_with_teacher": 0.93216, "kl_to_teacher": 0.123456,
            "model": "mlp", "num_params": 101770,
            "num_trainable_params": 101770, "checkpoint_bytes": 407080,
            "inference_examples_per_second": 98765.4, "run_dir": run_dir}
  students = [student("distill (full data)", 0, 0.81, "full_data/distill/seed_0"),
              student("distill (full data)", 1, 0.83, "full_data/distill/seed_1"),
              student("scratch (full data)", 0, 0.77, "full_data/scratch/seed_0")]
  groups = {
      "distill (full data)": {
          "objective": "0.5 kl + 0.5 ce", "seeds": [0, 1],
          "accuracy_per_seed": [0.81, 0.83], "accuracy_mean": 0.82,
          "accuracy_std": 0.0141421, "f1_macro_mean": 0.654321,
          "agreement_with_teacher_mean": 0.93216,
          "kl_to_teacher_mean": 0.123456},
      "scratch (full data)": {
          "objective": "ce", "seeds": [0], "accuracy_per_seed": [0.77],
          "accuracy_mean": 0.77, "accuracy_std": 0.0, "f1_macro_mean": 0.6,
          "agreement_with_teacher_mean": 0.9, "kl_to_teacher_mean": 0.25}}
  return {"dataset": "digits", "eval_split": "test", "num_eval_examples": 360,
          "teacher_model": {"name": "cnn"}, "student_model": {"name": "mlp"},
          "teacher": teacher, "students": students, "groups": groups,
          "compression_ratio": 12.1307, "speedup": 8.0004, "device": "cpu"}


def test_render_markdown_rounds_and_has_a_row_per_group_and_run():
  text = report.render_markdown(_hand_made_report())
  lines = text.splitlines()
  assert lines[0] == "# kdjax report: digits (test, 360 examples)"
  assert ("Teacher `cnn`: 1,234,567 params; student `mlp`: 101,770 params; "
          "compression 12.1x, inference speed-up 8.0x on cpu.") in lines
  summary = lines.index("## Summary (mean over seeds)")
  every = lines.index("## Every run")
  summary_rows = [l for l in lines[summary:every] if l.startswith("| ")]
  every_rows = [l for l in lines[every:] if l.startswith("| ")]
  # Header, teacher, one row per group; header, teacher, one per run.
  assert len(summary_rows) == 2 + 2 and len(every_rows) == 2 + 3
  assert summary_rows[1] == "| teacher | CE(labels) | - | 0.9877 | 0.8556 | - | - |"
  assert summary_rows[2] == ("| distill (full data) | 0.5 kl + 0.5 ce | 2 | "
                             "0.8200 ± 0.0141 | 0.6543 | 0.9322 | 0.1235 |")
  assert summary_rows[3] == ("| scratch (full data) | ce | 1 | 0.7700 ± 0.0000 "
                             "| 0.6000 | 0.9000 | 0.2500 |")
  assert every_rows[1] == (
      "| teacher | - | 0.9877 | 0.9124 | 0.8123 | 0.8556 | - | - | cnn | "
      "1,234,567 | 7,654 | 4,938,271 | 12,346 |")
  assert every_rows[3] == (
      "| full_data/distill/seed_1 | 1 | 0.8300 | 0.7123 | 0.6123 | 0.6543 | "
      "0.9322 | 0.1235 | mlp | 101,770 | 101,770 | 407,080 | 98,765 |")
  assert [row.split(" | ")[0] for row in every_rows[2:]] == [
      "| full_data/distill/seed_0", "| full_data/distill/seed_1",
      "| full_data/scratch/seed_0"]


def test_render_markdown_without_students():
  empty = dict(_hand_made_report(), students=[], groups={},
               compression_ratio=None, speedup=None)
  text = report.render_markdown(empty)
  assert "no student runs found." in text
  assert len([l for l in text.splitlines() if l.startswith("| ")]) == 4


def test_render_markdown_with_students_of_other_architectures_only():
  """E.g. mode=evaluate after config.student.model changed: no ratio to
  print, the runs still listed."""
  others = dict(_hand_made_report(), compression_ratio=None, speedup=None)
  text = report.render_markdown(others)
  assert "no run of this architecture" in text
  assert "| full_data/scratch/seed_0 |" in text
