"""The language-model report (kdjax.run.lm_report) on tiny random Llamas.

A pipeline workdir of run.json files (teacher/, full_data/{scratch,distill,
distill_wide}/seed_<s>/), hand-made held-out token arrays (masked tokens,
rows that do not fill the last batch), and only disk and clock replaced: the
test split, the checkpoints (params made here) and the generation timer.
Every number is checked against float64 numpy computed here from the models'
logits: perplexity = exp(summed NLL / masked token count), accuracy,
agreement, KL(teacher || student), and the means over seeds.
"""

import json
import math
import os

import jax
import ml_collections
import numpy as np
import pytest

# (import removed)
from kdjax.data import lm as lm_data
from kdjax.models import llama
from kdjax.run import lm_metrics, lm_report
from kdjax.runtime import checkpoint, metrics_writer
from kdjax.weights import teachers as teachers_lib
from kdjax.models.partitioning import unbox

VOCAB, LENGTH, ROWS = 11, 6, 11
TEACHER = dict(vocab_size=VOCAB, width=16, num_layers=2, num_heads=2,
               num_kv_heads=1, head_dim=0, mlp_dim=24, rope_theta=10000.0,
               norm_eps=1e-5, tie_embeddings=True, max_length=16,
               dtype="float32")
STUDENT = dict(TEACHER, width=8, num_layers=1, mlp_dim=16)
WIDE = dict(STUDENT, width=12)
SPEED = {16: 10.0, 8: 50.0, 12: 30.0}  # Generation tokens/s by width.

# run dir -> (role, seed, variant, model fields)
STUDENTS = {
    "full_data/scratch/seed_0": ("scratch", 0, "", STUDENT),
    "full_data/scratch/seed_1": ("scratch", 1, "", STUDENT),
    "full_data/distill/seed_0": ("distill", 0, "", STUDENT),
    "full_data/distill/seed_1": ("distill", 1, "", STUDENT),
    "full_data/distill/seed_2": ("distill", 2, "", STUDENT),
    "full_data/distill_wide/seed_0": ("distill", 0, "wide", WIDE),
}
OBJECTIVE = {"scratch": "ce", "distill": "0.5 kl + 0.5 ce"}


def _non_embedding(fields) -> int:
  """Norms, attention and SwiGLU of each layer, and the final norm."""
  d, f = fields["width"], fields["mlp_dim"]
  h, kv = fields["num_heads"], fields["num_kv_heads"]
  dh = d // h
  layer = 2 * d + d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f
  return fields["num_layers"] * layer + d


def _config(workdir: str) -> ml_collections.ConfigDict:
  """What the report reads of a language-model config."""
  return ml_collections.ConfigDict(dict(
      data=dict(name="hand_made_text", seq_length=LENGTH, train_split="train",
                eval_split="validation", test_split="test",
                eval_batch_size=8, num_classes=0),
      teacher=dict(model=dict(name="llama", **TEACHER),
                   checkpoint_dir=os.path.join(workdir, "teacher"),
                   init_from="", pretrained=False),
      student=dict(model=dict(name="llama", **STUDENT)),
      distill=dict(extra_teachers=()),
      report=dict(generation_batch=2, generation_prompt=3,
                  generation_tokens=2)))


def _init(fields, seed: int):
  """A model and random params (numpy; shapes traced, nothing compiled):
  norm scales near 1, unit-variance embedding, so the logits are peaked."""
  model = llama.Llama(**fields)
  shapes = unbox(jax.eval_shape(model.init, jax.random.key(0),
                                np.zeros((1, LENGTH), np.int32))["params"])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return (1.0 + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
    std = 1.0 if name == "embedding" else 0.5 / np.sqrt(leaf.shape[0])
    return (std * rng.normal(size=leaf.shape)).astype(np.float32)
  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def _write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _arrays():
  """11 sequences (the eval batch of 8 leaves 5 padded rows), a masked row,
  masked tokens here and there."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (ROWS, LENGTH + 1)).astype(np.int32)
  mask = (rng.random((ROWS, LENGTH)) < 0.75).astype(np.float32)
  mask[4] = 0.0
  return {"inputs": tokens[:, :-1], "labels": tokens[:, 1:], "mask": mask}


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference(params, model, arrays, teacher_logits=None):
  """Token metrics in float64 over the tokens with mask 1."""
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  logits = np.asarray(forward(params, arrays["inputs"]), np.float64)
  log_q = _log_softmax(logits)
  keep = arrays["mask"] > 0
  labels = arrays["labels"][keep]
  log_q_kept = log_q[keep]
  count = int(keep.sum())
  nll = -np.sum(log_q_kept[np.arange(count), labels])
  pred = log_q_kept.argmax(-1)
  out = {"perplexity": math.exp(nll / count), "nll": nll / count,
         "accuracy": np.sum(pred == labels) / count, "tokens": count}
  if teacher_logits is not None:
    log_p = _log_softmax(teacher_logits)[keep]
    out["agreement_with_teacher"] = np.sum(pred == log_p.argmax(-1)) / count
    out["kl_to_teacher"] = np.sum(np.exp(log_p) * (log_p - log_q_kept)) / count
  top2 = np.sort(log_q_kept, -1)[:, -2:]
  assert np.min(top2[:, 1] - top2[:, 0]) > 1e-4  # No near-tie argmax.
  return out, logits


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """write_lm_report run once for the module's tests."""
  with pytest.MonkeyPatch.context() as monkeypatch:
    return _evaluate(str(tmp_path_factory.mktemp("lm")), monkeypatch)


def _evaluate(workdir, monkeypatch):
  config = _config(workdir)
  arrays = _arrays()
  _write_json(os.path.join(workdir, "teacher", "run.json"), {
      "role": "teacher", "seed": 0, "train_fraction": 1.0, "objective": "ce",
      "model": dict(name="llama", **TEACHER)})
  params, models = {}, {}
  for i, (run_dir, (role, seed, variant, fields)) in enumerate(
      sorted(STUDENTS.items())):
    path = os.path.join(workdir, run_dir)
    _write_json(os.path.join(path, "run.json"), {
        "role": role, "seed": seed, "train_fraction": 1.0,
        "objective": OBJECTIVE[role], "variant": variant,
        "model": dict(name="llama", **fields), "init_from": ""})
    models[run_dir], params[path] = _init(fields, 10 + i)
  # One run's training curves, for the figure.
  with open(os.path.join(workdir, "full_data/distill/seed_0",
                         metrics_writer.METRICS_FILE), "w") as f:
    for step in (1, 2):
      f.write(json.dumps({"split": "train", "step": step, "ce": 3.0 / step})
              + "\n")
    f.write(json.dumps({"split": "eval", "step": 2, "perplexity": 9.0}) + "\n")
  teacher_model, teacher_params = _init(TEACHER, 1)

  def eval_arrays(data_config, split):
    assert split == "test" and data_config.seq_length == LENGTH
    return arrays

  def load_teacher(config_, spec):
    del config_
    assert spec.path == os.path.join(workdir, "teacher")
    return teachers_lib.Teacher(teacher_model, teacher_params, {})

  def restore_params(run_dir, abstract, step=None, base=None):
    # The newest step of a checkpoint that holds every leaf.
    assert step is None and base is None
    assert jax.tree.map(np.shape, abstract) == jax.tree.map(
        np.shape, params[run_dir])
    return params[run_dir]

  timed = []

  def generation_speed(model, params_, arrays_, *, batch, prompt_length,
                       new_tokens):
    del params_
    assert arrays_ is arrays
    assert (batch, prompt_length, new_tokens) == (2, 3, 2)  # config.report
    timed.append(model.width)
    return SPEED[model.width]

  monkeypatch.setattr(lm_data, "lm_eval_arrays", eval_arrays)
  monkeypatch.setattr(teachers_lib, "load", load_teacher)
  monkeypatch.setattr(checkpoint, "restore_params", restore_params)
  monkeypatch.setattr(lm_metrics, "generation_speed", generation_speed)
  result = lm_report.write_lm_report(config, workdir)
  return dict(workdir=workdir, report=result, arrays=arrays, params=params,
              models=models, teacher=(teacher_model, teacher_params),
              timed=timed)


@pytest.fixture(scope="module")
def expected(evaluated):
  """The float64 reference of every model: {'teacher' or run dir: metrics}."""
  arrays, workdir = evaluated["arrays"], evaluated["workdir"]
  model, params = evaluated["teacher"]
  out = {}
  out["teacher"], teacher_logits = _reference(params, model, arrays)
  for run_dir in STUDENTS:
    out[run_dir], _ = _reference(
        evaluated["params"][os.path.join(workdir, run_dir)],
        evaluated["models"][run_dir], arrays, teacher_logits)
  return out


def test_every_model_matches_the_float64_reference(evaluated, expected):
  arrays, result = evaluated["arrays"], evaluated["report"]
  teacher_expected = expected["teacher"]
  t = result["teacher"]
  for key, value in teacher_expected.items():
    assert t[key] == pytest.approx(value, rel=1e-5), key
  assert t["tokens"] == int(arrays["mask"].sum()) == result["num_eval_tokens"]
  assert t["num_non_embedding_params"] == _non_embedding(TEACHER)
  assert t["num_params"] == _non_embedding(TEACHER) + VOCAB * 16
  assert t["generation_tokens_per_second"] == SPEED[16]
  assert t["source"] == "teacher"

  students = result["students"]
  assert [s["run_dir"] for s in students] == sorted(STUDENTS)
  for s in students:
    role, seed, variant, fields = STUDENTS[s["run_dir"]]
    want = expected[s["run_dir"]]
    assert set(s) >= set(want)
    for key, value in want.items():
      assert s[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (
          s["run_dir"], key)
    assert (s["method"], s["seed"], s["variant"]) == (role, seed, variant)
    assert s["objective"] == OBJECTIVE[role]
    assert s["num_non_embedding_params"] == _non_embedding(fields)
    assert s["num_params"] == (_non_embedding(fields)
                               + VOCAB * fields["width"])
    assert s["generation_tokens_per_second"] == SPEED[fields["width"]]
  # Timed once for the teacher and once per student architecture.
  assert sorted(evaluated["timed"]) == sorted(SPEED)
  # The seeds differ, so a mean that drops one would show.
  assert len({round(s["perplexity"], 3) for s in students}) == len(students)


def test_groups_are_means_over_seeds(evaluated, expected):
  result = evaluated["report"]
  members = {}
  for run_dir in sorted(STUDENTS):
    role, seed, variant, _ = STUDENTS[run_dir]
    group = role + (f"[{variant}]" if variant else "") + " (full data)"
    members.setdefault(group, []).append((seed, expected[run_dir]))
  assert list(result["groups"]) == list(members) == [
      "distill (full data)", "distill[wide] (full data)",
      "scratch (full data)"]
  for name, runs in members.items():
    g = result["groups"][name]
    assert g["seeds"] == [seed for seed, _ in runs]
    assert g["objective"] == OBJECTIVE[name.split()[0].split("[")[0]]
    assert g["perplexity_per_seed"] == pytest.approx(
        [m["perplexity"] for _, m in runs], rel=1e-5)
    for key in ("perplexity", "accuracy", "agreement_with_teacher",
                "kl_to_teacher"):
      want = sum(m[key] for _, m in runs) / len(runs)
      assert g[f"{key}_mean"] == pytest.approx(want, rel=1e-5), (name, key)


def test_report_files(evaluated):
  workdir, result = evaluated["workdir"], evaluated["report"]
  assert result["task"] == "language_modelling"
  assert (result["eval_split"], result["train_eval_split"]) == (
      "test", "validation")
  assert result["student_model"]["width"] == 8
  with open(os.path.join(workdir, lm_report.REPORT_JSON)) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  with open(os.path.join(workdir, lm_report.REPORT_MD)) as f:
    assert f.read() == lm_report.render_markdown(result)
  with open(os.path.join(workdir, lm_report.REPORT_PNG), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_render_markdown():
  def student(group, seed, params, speed):
    return {"group": group, "seed": seed, "num_params": params,
            "num_non_embedding_params": params - 1000,
            "generation_tokens_per_second": speed}
  report = {
      "dataset": "shakespeare", "eval_split": "test",
      "num_eval_tokens": 123456,
      "teacher": {"source": "llama:/models/smollm2/model-q4.gguf",
                  "perplexity": 89.126, "accuracy": 0.312345,
                  "num_params": 134515008,
                  "num_non_embedding_params": 106203456,
                  "generation_tokens_per_second": 41.26},
      "students": [student("distill (full data)", 0, 2345678, 512.34),
                   student("distill (full data)", 1, 2345678, 512.34),
                   student("scratch[seqkd] (full data)", 0, 1234567, 99.95)],
      "groups": {
          "distill (full data)": {
              "objective": "0.5 kl + 0.5 ce", "seeds": [0, 1],
              "perplexity_mean": 301.456, "accuracy_mean": 0.21234,
              "agreement_with_teacher_mean": 0.41236,
              "kl_to_teacher_mean": 1.23456},
          "scratch[seqkd] (full data)": {
              "objective": "ce", "seeds": [0], "perplexity_mean": 12.3449,
              "accuracy_mean": 0.1, "agreement_with_teacher_mean": 0.05,
              "kl_to_teacher_mean": 2.0}},
  }
  lines = lm_report.render_markdown(report).splitlines()
  assert lines[0] == ("# kdjax report: shakespeare language modelling "
                      "(test, 123,456 tokens)")
  rows = [line for line in lines if line.startswith("| ")]
  assert len(rows) == 1 + 1 + 2  # Header, teacher, one row per group.
  assert rows[1] == ("| teacher (model-q4.gguf) | - | - | 89.13 | 0.3123 | - "
                     "| - | 134,515,008 | 106,203,456 | 41.3 |")
  assert rows[2] == ("| distill (full data) | 0.5 kl + 0.5 ce | 2 | 301.46 | "
                     "0.2123 | 0.4124 | 1.2346 | 2,345,678 | 2,344,678 | "
                     "512.3 |")
  assert rows[3] == ("| scratch[seqkd] (full data) | ce | 1 | 12.34 | 0.1000 "
                     "| 0.0500 | 2.0000 | 1,234,567 | 1,233,567 | 100.0 |")
  assert lines[-1] == "Per-seed rows: report.json. Training curves: report.png."
