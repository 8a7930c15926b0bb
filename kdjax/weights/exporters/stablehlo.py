"""Any kdjax student -> one self-contained StableHLO inference function.

A distilled student of any kind (mlp, cnn, lstm, transformer, bert, gpt,
llama) leaves kdjax as a directory that runs with jax alone, without Flax or
kdjax's training code (kdjax/serve.py loads it):

  model.jax_exported   jax.export's serialized Exported: the forward pass
                       with the weights inside as constants, the batch
                       symbolic ('batch', any size >= 1), lowered for every
                       platform in `platforms`
  signature.json       what the function takes and returns (names, dtypes,
                       shapes with 'batch'), what the outputs mean, the
                       label names, and how raw inputs become model inputs
                       (input_scale for images; tokenizer, length, pad id,
                       special tokens and truncation side for text)
  tokenizer.json       text students: the run's tokenizer (a .gguf's rebuilt)
  kdjax_manifest.json  where the weights came from (manifest.py)

The function takes what the model took in training, so it gives the logits
kdjax computed:
  images       float32 [batch, H, W, C], raw values / input_scale;
  text         int32 token ids [batch, L], padded with pad_id (the models
               build their padding mask from it, as in training);
  language     int32 token ids [batch, L] -> float32 next-token logits at
  models       every position [batch, L, V] (position i scores token i + 1;
               the models are causal, so right padding changes no earlier
               position: serve reads the last real token's row).

'cuda' and 'rocm' are best effort: a platform this jax cannot lower the
model for is dropped with the reason logged and kept in signature.json;
the others must lower or the export fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping, Sequence

from absl import logging
import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from kdjax.core import errors
from kdjax.data import pipeline
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.models import partitioning
from kdjax.weights.exporters import manifest as manifest_lib

FORMAT_VERSION = 1
FUNCTION_FILE = "model.jax_exported"
SIGNATURE_FILE = "signature.json"
TOKENIZER_FILE = "tokenizer.json"
BATCH = "batch"  # The symbolic batch dimension's name in shapes.
PLATFORMS = ("cpu", "tpu", "cuda", "rocm")
BEST_EFFORT = ("cuda", "rocm")
DEFAULT_PLATFORMS = ("cpu", "tpu", "cuda")
TASKS = ("image_classification", "classification", "text_classification",
         "language_modelling")
# jax.export serializes to a flatbuffer, which holds at most 2 GiB.
MAX_PARAM_BYTES = 2**31 - 2**26


class ExportError(errors.KdjaxError, ValueError):
  """A model, input spec or target that cannot be exported as asked."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """One example of the model's input, and how raw data becomes it.

  kind: 'images' (float [H, W, C]), 'features' (any other float or int
  array) or 'token_ids' (int32 [L]); input_scale: images and features are
  raw values divided by it; pad_id: the padding id of token ids.
  """
  kind: str
  shape: tuple[int, ...]
  dtype: str
  input_scale: float = 1.0
  pad_id: int = 0


def input_spec(data_config, model: Any = None) -> InputSpec:
  """The InputSpec of a data config (as kdjax.data.pipeline feeds the
  model); token ids pad with the model's pad_id (0 if it has none)."""
  shape, dtype = pipeline.input_spec(data_config)
  shape = tuple(int(d) for d in shape)
  dtype = np.dtype(dtype).name
  if pipeline.is_language_modelling(data_config) or pipeline.is_text(
      data_config):
    return InputSpec("token_ids", shape, "int32",
                     pad_id=int(getattr(model, "pad_id", 0)))
  kind = "images" if len(shape) == 3 and dtype == "float32" else "features"
  return InputSpec(kind, shape, dtype,
                   input_scale=float(data_config.get("input_scale", 1.0)))


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  """Known, distinct platform names, at least one."""
  platforms = tuple(str(p) for p in platforms)
  unknown = [p for p in platforms if p not in PLATFORMS]
  if not platforms or unknown or len(set(platforms)) != len(platforms):
    raise ExportError(f"platforms={platforms!r}: give distinct names from "
                      f"{PLATFORMS}, at least one (e.g. {DEFAULT_PLATFORMS}).")
  return platforms


def host_constants(params: Any) -> Any:
  """Params (a {'params': ...} dict or the params, boxed or not) as host
  numpy arrays: the constants the exported function closes over."""
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  return jax.tree.map(np.asarray, jax.device_get(partitioning.unbox(params)))


def forward_fn(model: Any, params: Any):
  """inputs -> float32 outputs of the model in inference mode, with `params`
  (host numpy) closed over, so they are lowered as constants."""
  variables = {"params": params}

  def forward(inputs):
    return jnp.asarray(model.apply(variables, inputs, train=False),
                       jnp.float32)
  return forward


def _task(spec: InputSpec, out_shape: tuple[int, ...]) -> str:
  if len(out_shape) == 3 and spec.kind == "token_ids":
    return "language_modelling"
  if len(out_shape) != 2:
    raise ExportError(f"The model returns shape {out_shape} for a batch of "
                      "2: expected class logits [batch, classes] or, for a "
                      "language model, [batch, length, vocab].")
  return {"images": "image_classification",
          "token_ids": "text_classification"}.get(spec.kind, "classification")


def _lower(forward, arg: jax.ShapeDtypeStruct, platforms: tuple[str, ...]
           ) -> tuple[Any, dict[str, str]]:
  """(Exported for the platforms that lower, {dropped platform: why}).

  One lowering when every platform lowers; otherwise each best-effort one is
  tried alone to find which to drop.
  """
  fn = jax.jit(forward)
  try:
    return jax_export.export(fn, platforms=platforms)(arg), {}
  except Exception as e:  # pylint: disable=broad-except
    first = e
  skipped = {}
  for platform in (p for p in platforms if p in BEST_EFFORT):
    try:
      jax_export.export(fn, platforms=(platform,))(arg)
    except Exception as e:  # pylint: disable=broad-except
      skipped[platform] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
      logging.warning("StableHLO export: skipping platform %s, jax %s cannot "
                      "lower this model for it (%s).", platform,
                      jax.__version__, skipped[platform])
  kept = tuple(p for p in platforms if p not in skipped)
  if not skipped or not kept:
    raise ExportError(
        f"jax {jax.__version__} cannot export this model for {platforms} "
        f"with a symbolic batch: {type(first).__name__}: {first}") from first
  try:
    return jax_export.export(fn, platforms=kept)(arg), skipped
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(
        f"jax {jax.__version__} cannot export this model for {kept} with a "
        f"symbolic batch: {type(e).__name__}: {e}") from e


def _shape(dims) -> list[Any]:
  """A shape for JSON: the symbolic batch as 'batch', the rest ints."""
  return [BATCH if jax_export.is_symbolic_dim(d) else int(d) for d in dims]


def _tokenizer_entry(spec: InputSpec, task: str) -> dict[str, Any]:
  """How serve turns raw text into this input: as kdjax's data did."""
  if task == "language_modelling":  # kdjax.data.lm / prompts: no specials.
    return {"file": TOKENIZER_FILE, "length": spec.shape[0],
            "pad_id": spec.pad_id, "add_special_tokens": False,
            "truncation": "left", "padding": "right"}
  # kdjax.data.text.tokenize: [CLS] ... [SEP], cut keeping the final [SEP].
  return {"file": TOKENIZER_FILE, "length": spec.shape[0],
          "pad_id": spec.pad_id, "add_special_tokens": True,
          "truncation": "right", "padding": "right"}


def _outputs(task: str, out_shape: list[Any]) -> list[dict[str, Any]]:
  meaning = ("next-token logits at every position: row i scores the token "
             "after token i (softmax: probabilities over the vocabulary)"
             if task == "language_modelling" else
             "class logits (softmax: class probabilities)")
  return [{"name": "logits", "dtype": "float32", "shape": out_shape,
           "meaning": meaning}]


def build_signature(spec: InputSpec, exported, *, task: str,
                    label_names: Sequence[str], has_tokenizer: bool,
                    skipped: Mapping[str, str],
                    model_spec: Mapping[str, Any] | None) -> dict[str, Any]:
  """signature.json: everything serve needs besides the function."""
  name = "token_ids" if spec.kind == "token_ids" else spec.kind
  out_shape = _shape(exported.out_avals[0].shape)
  signature = {
      "format_version": FORMAT_VERSION,
      "producer": "kdjax",
      "task": task,
      "function_file": FUNCTION_FILE,
      "inputs": [{"name": name, "dtype": spec.dtype,
                  "shape": _shape(exported.in_avals[0].shape)}],
      "outputs": _outputs(task, out_shape),
      "batch": f"'{BATCH}' is symbolic: any size >= 1",
      "label_names": list(label_names) or None,
      "preprocessing": None,
      "tokenizer": None,
      "platforms": list(exported.platforms),
      "skipped_platforms": dict(skipped),
      "model": dict(model_spec) if model_spec else None,
      "jax_version": jax.__version__,
      "calling_convention_version": int(exported.calling_convention_version),
  }
  if task == "language_modelling":
    signature["vocab_size"] = int(out_shape[-1])
  else:
    signature["num_classes"] = int(out_shape[-1])
  if spec.kind == "token_ids":
    signature["preprocessing"] = {"pad_id": spec.pad_id}
    if has_tokenizer:
      signature["tokenizer"] = _tokenizer_entry(spec, task)
  else:
    signature["preprocessing"] = {
        "input_scale": spec.input_scale,
        "note": "integer (raw) inputs are divided by input_scale; float "
                "inputs are taken as already divided"}
  return signature


def _prepare(directory: str, overwrite: bool) -> None:
  """Creates `directory`; an earlier export there fails, or with `overwrite`
  is removed first."""
  os.makedirs(directory, exist_ok=True)
  ours = (FUNCTION_FILE, SIGNATURE_FILE, TOKENIZER_FILE,
          manifest_lib.MANIFEST_FILE)
  old = sorted(n for n in os.listdir(directory) if n in ours)
  if {FUNCTION_FILE, SIGNATURE_FILE} & set(old) and not overwrite:
    raise ExportError(f"{directory} already holds {old}: export into a new "
                      "directory or pass overwrite=True.")
  for name in old:
    os.remove(os.path.join(directory, name))


def _write_tokenizer(path: str, target: str) -> None:
  """Copies a tokenizer.json (or a HF dir's); rebuilds a .gguf's."""
  source = tokenizer_lib.tokenizer_file(path)
  if source.endswith(".gguf"):
    with open(target, "w") as f:
      f.write(tokenizer_lib.load(source).to_str())
  else:
    shutil.copyfile(source, target)


def export_stablehlo(directory: str, model: Any, params: Any,
                     inputs: Any, *, tokenizer_path: str = "",
                     label_names: Sequence[str] = (),
                     manifest: Mapping[str, Any] | None = None,
                     model_spec: Mapping[str, Any] | None = None,
                     platforms: Sequence[str] = DEFAULT_PLATFORMS,
                     overwrite: bool = False) -> dict[str, Any]:
  """Writes `model` with `params` as a serialized jax.export function.

  Args:
    directory: where the files go (created).
    model: the Linen module (kdjax.weights.specs.build_model).
    params: its params (host or device, boxed or not).
    inputs: the run's data config (config.data) or an InputSpec.
    tokenizer_path: text students: tokenizer.json, a HF dir or a .gguf
      ('' = none; serve then takes token ids only).
    label_names: class names in label order (() = unknown).
    manifest: manifest.build_manifest's dict, written beside the function.
    model_spec: the model's name and fields, recorded in signature.json.
    platforms: lowered for each (see BEST_EFFORT).
    overwrite: replace an earlier export in `directory`.

  Returns:
    {'directory', 'files', 'platforms', 'skipped_platforms', 'bytes',
    'signature'}.
  """
  platforms = check_platforms(platforms)
  spec = inputs if isinstance(inputs, InputSpec) else input_spec(inputs,
                                                                 model)
  if manifest is not None:
    manifest_lib.to_json(manifest)  # Checked before anything is written.
  constants = host_constants(params)
  nbytes = sum(int(v.nbytes) for v in jax.tree.leaves(constants))
  if nbytes > MAX_PARAM_BYTES:
    raise ExportError(
        f"The params take {nbytes / 2**30:.2f} GiB; a serialized jax.export "
        "function (a flatbuffer) holds at most 2 GiB with its weights "
        "inside. Export a Llama this big with export.format='hf' or 'gguf'.")
  forward = forward_fn(model, constants)
  try:
    probe = jax.eval_shape(forward, jax.ShapeDtypeStruct((2,) + spec.shape,
                                                         spec.dtype))
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f"The model does not run on inputs {spec}: "
                      f"{type(e).__name__}: {e}") from e
  task = _task(spec, tuple(probe.shape))
  if label_names and (task == "language_modelling"
                      or len(label_names) != probe.shape[-1]):
    raise ExportError(f"label_names has {len(label_names)} names for a "
                      f"model with outputs {tuple(probe.shape)}: give one "
                      "name per class, or none.")
  if tokenizer_path and spec.kind != "token_ids":
    raise ExportError(f"tokenizer_path={tokenizer_path!r} for a model that "
                      f"takes {spec.kind}, not token ids.")
  batch, = jax_export.symbolic_shape(BATCH)
  arg = jax.ShapeDtypeStruct((batch,) + spec.shape, spec.dtype)
  exported, skipped = _lower(forward, arg, platforms)
  signature = build_signature(
      spec, exported, task=task, label_names=label_names,
      has_tokenizer=bool(tokenizer_path), skipped=skipped,
      model_spec=model_spec)
  data = exported.serialize()
  _prepare(directory, overwrite)
  with open(os.path.join(directory, FUNCTION_FILE), "wb") as f:
    f.write(data)
  files = [FUNCTION_FILE, SIGNATURE_FILE]
  if tokenizer_path:
    _write_tokenizer(tokenizer_path, os.path.join(directory, TOKENIZER_FILE))
    files.append(TOKENIZER_FILE)
  with open(os.path.join(directory, SIGNATURE_FILE), "w") as f:
    json.dump(signature, f, indent=2)
    f.write("\n")
  if manifest is not None:
    manifest_lib.write_manifest(directory, manifest)
    files.append(manifest_lib.MANIFEST_FILE)
  return {"directory": directory, "files": files,
          "platforms": tuple(exported.platforms),
          "skipped_platforms": dict(skipped), "bytes": len(data),
          "signature": signature}
