"""Where exported weights came from: a small JSON manifest.

An exported student (kdjax.weights.exporters: hf_llama, gguf_llama,
stablehlo) carries one plain JSON object saying which run and step it is,
which teacher and objective trained it and how it scored, so a file found
later on a disk or a model hub can be traced back to its run. Nothing reads
it to load weights: transformers, llama.cpp and kdjax's importers ignore it.

  HF directory   kdjax_manifest.json next to config.json
  StableHLO dir  kdjax_manifest.json next to signature.json
  GGUF file      the string metadata key `kdjax.manifest` (the JSON text);
                 `gguf-dump` / llama.cpp's model info print it.

`read_manifest(path)` reads either back.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import os
from typing import Any, Mapping

from kdjax.core import errors
from kdjax.data import tokenizer as tokenizer_lib

FORMAT_VERSION = 1
MANIFEST_FILE = "kdjax_manifest.json"
GGUF_KEY = "kdjax.manifest"


class ManifestError(errors.KdjaxError, ValueError):
  """A manifest value that is not plain JSON data."""


def _jsonable(value: Any, where: str) -> Any:
  """`value` as plain JSON data: numpy scalars to Python numbers, tuples to
  lists, ConfigDicts to dicts; non-finite floats become None (JSON has
  no NaN)."""
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict.
    value = value.to_dict()
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    value = float(value)
    return value if math.isfinite(value) else None
  if hasattr(value, "item") and getattr(value, "shape", None) == ():
    return _jsonable(value.item(), where)  # 0-d numpy / jax arrays.
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
  raise ManifestError(f"manifest {where}={value!r} ({type(value).__name__}) "
                      "is not JSON data (str, number, bool, list, dict).")


def build_manifest(*, source_run: str, step: int, teacher: Any,
                   objective: Any, eval_metrics: Mapping[str, Any],
                   fmt: str) -> dict[str, Any]:
  """A JSON-able manifest of exported weights.

  source_run: the run's workdir (or any id of it); step: the training step of
  the weights; teacher: the teacher's description (e.g. its init_from or
  checkpoint dir, or a dict); objective: the distillation objective (a name
  or a dict of its settings); eval_metrics: {name: value} of the exported
  weights; fmt: what was written ('hf', 'hf:bfloat16', 'gguf:q8_0', ...).
  """
  if not isinstance(fmt, str) or not fmt:
    raise ManifestError(f"manifest fmt={fmt!r}: give the export format, e.g. "
                        "'hf' or 'gguf:q8_0'.")
  if not isinstance(eval_metrics, Mapping):
    raise ManifestError(f"manifest eval_metrics={eval_metrics!r}: give a "
                        "{name: value} mapping.")
  return {
      "format_version": FORMAT_VERSION,
      "producer": "kdjax",
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "format": fmt,
      "source_run": _jsonable(source_run, "source_run"),
      "step": _jsonable(step, "step"),
      "teacher": _jsonable(teacher, "teacher"),
      "objective": _jsonable(objective, "objective"),
      "eval_metrics": _jsonable(dict(eval_metrics), "eval_metrics"),
  }


def to_json(manifest: Mapping[str, Any]) -> str:
  """The manifest's JSON text (checked to be plain JSON data)."""
  if "format_version" not in manifest:
    raise ManifestError("manifest lacks format_version: build it with "
                        "build_manifest().")
  return json.dumps(_jsonable(dict(manifest), "manifest"), indent=2,
                    sort_keys=True, allow_nan=False)


def write_manifest(directory: str, manifest: Mapping[str, Any]) -> str:
  """Writes `directory`/kdjax_manifest.json; returns its path."""
  path = os.path.join(directory, MANIFEST_FILE)
  with open(path, "w") as f:
    f.write(to_json(manifest) + "\n")
  return path


def read_manifest(path: str) -> dict[str, Any] | None:
  """The manifest of an exported HF directory or GGUF file (None: none)."""
  if path.endswith(".gguf"):
    reader = tokenizer_lib.gguf_module().GGUFReader(path)
    text = tokenizer_lib.gguf_value(reader, GGUF_KEY, None)
  else:
    file = os.path.join(path, MANIFEST_FILE)
    if not os.path.exists(file):
      return None
    with open(file) as f:
      text = f.read()
  return None if text is None else json.loads(text)
