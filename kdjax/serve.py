"""Runs an exported kdjax student (export.format='stablehlo') with jax alone.

    python -m kdjax.serve DIR --text "a gripping, funny film" --text "dull"
    python -m kdjax.serve DIR --npy images.npy

or from Python:

    from kdjax import serve
    predictor = serve.load(DIR)
    predictor.predict(["a gripping, funny film"])  # Or an array of inputs.

Standalone on purpose: it imports jax, numpy, the standard library and, for
raw text only, `tokenizers`; never another kdjax module, Flax or the
training stack, so an exported directory plus `pip install jax flatbuffers
tokenizers` is all a server needs (tests/weights/test_export_stablehlo.py
checks the imports). The directory's layout is written by
kdjax/weights/exporters/stablehlo.py; the file names below are its.

Inputs, by the signature's task:
  image students   arrays [n, H, W, C] (or one [H, W, C]); integer arrays
                   are raw values and are divided by input_scale, float
                   arrays are taken as already divided;
  text students    strings (tokenized as kdjax did in training, padded and
                   cut to the exported length), or token ids [n, <= L];
  language models  strings or token ids [n, <= L]; the prediction is the
                   next token after each text's last token.
Each prediction: logits, probabilities (softmax), classes (argmax) and,
where known, labels (class names) or tokens (the next token's text).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import jax
from jax import export as jax_export
import numpy as np

FORMAT_VERSION = 1
SIGNATURE_FILE = "signature.json"
LANGUAGE_MODELLING = "language_modelling"


class ServeError(ValueError):
  """An export or input this module cannot serve; the message says why."""


def _read_signature(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, SIGNATURE_FILE)
  if not os.path.isfile(path):
    raise ServeError(f"{directory!r} holds no {SIGNATURE_FILE}: export a run "
                     "with --config.mode=export --config.export.format="
                     "stablehlo and pass its directory.")
  with open(path) as f:
    signature = json.load(f)
  if signature.get("format_version") != FORMAT_VERSION:
    raise ServeError(f"{path} has format_version "
                     f"{signature.get('format_version')!r}; this kdjax.serve "
                     f"reads version {FORMAT_VERSION}.")
  return signature


def _softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - np.max(logits, axis=-1, keepdims=True)
  weights = np.exp(shifted.astype(np.float64))
  return (weights / np.sum(weights, axis=-1, keepdims=True)).astype(
      np.float32)


class Predictor:
  """An exported student: its function (`__call__`) and `predict`."""

  def __init__(self, directory: str, signature: dict[str, Any],
               exported: jax_export.Exported):
    self.directory = directory
    self.signature = signature
    self.exported = exported
    spec = signature["inputs"][0]
    self.input_name = spec["name"]
    self.input_shape = tuple(spec["shape"][1:])  # After the batch.
    self.input_dtype = np.dtype(spec["dtype"])
    self.task = signature["task"]
    self.label_names = signature.get("label_names")
    self._fn = jax.jit(exported.call)  # Compiled once per batch size.
    self._tokenizer = None

  @property
  def is_language_model(self) -> bool:
    return self.task == LANGUAGE_MODELLING

  @property
  def takes_tokens(self) -> bool:
    return self.input_name == "token_ids"

  def __call__(self, inputs: np.ndarray) -> np.ndarray:
    """The exported function: model inputs [n, ...] -> float32 logits."""
    inputs = np.asarray(inputs)
    if inputs.ndim != len(self.input_shape) + 1 or (
        inputs.shape[1:] != self.input_shape):
      raise ServeError(f"inputs of shape {inputs.shape}: this export takes "
                       f"[n, {', '.join(map(str, self.input_shape))}].")
    if not inputs.shape[0]:
      raise ServeError("no inputs: give at least one.")
    return np.asarray(self._fn(inputs.astype(self.input_dtype)))

  # --- Text. ----------------------------------------------------------------

  @property
  def tokenizer(self):
    """The exported tokenizer.json (tokenizers.Tokenizer), set up once the
    way kdjax's data pipeline tokenized for this model."""
    if self._tokenizer is None:
      entry = self.signature.get("tokenizer")
      if not entry:
        raise ServeError(f"{self.directory!r} has no tokenizer: give token "
                         f"ids [n, {self.input_shape[0]}], or export a run "
                         "whose data has a tokenizer.")
      import tokenizers  # pylint: disable=g-import-not-at-top
      tokenizer = tokenizers.Tokenizer.from_file(
          os.path.join(self.directory, entry["file"]))
      tokenizer.no_padding()
      tokenizer.no_truncation()
      if not self.is_language_model:  # As kdjax.data.text.tokenize.
        length, pad_id = int(entry["length"]), int(entry["pad_id"])
        tokenizer.enable_truncation(max_length=length)
        tokenizer.enable_padding(length=length, pad_id=pad_id,
                                 pad_token=tokenizer.id_to_token(pad_id)
                                 or "")
      self._tokenizer = tokenizer
    return self._tokenizer

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (token ids int32 [n, L], lengths [n]) as the model saw text
    in training: classifiers with special tokens, cut on the right; language
    models without, keeping each text's last L tokens."""
    entry = self.signature.get("tokenizer") or {}
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t)
             for t in texts]
    tokenizer = self.tokenizer
    length, pad_id = int(entry["length"]), int(entry["pad_id"])
    encodings = tokenizer.encode_batch(
        texts, add_special_tokens=bool(entry["add_special_tokens"]))
    ids = np.full((len(texts), length), pad_id, np.int32)
    lengths = np.zeros(len(texts), np.int32)
    for i, encoding in enumerate(encodings):
      if self.is_language_model:
        row = (encoding.ids[-length:] if entry["truncation"] == "left"
               else encoding.ids[:length])
        if not row:
          raise ServeError(f"text {i} ({texts[i]!r}) has no tokens: a "
                           "language model needs one to continue from.")
        ids[i, :len(row)] = row
        lengths[i] = len(row)
      else:  # Already cut and padded to L.
        ids[i] = encoding.ids
        lengths[i] = sum(encoding.attention_mask)
    return ids, lengths

  # --- Predictions. ---------------------------------------------------------

  def _model_inputs(self, inputs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Raw inputs -> (model inputs [n, ...], lengths [n] of token rows)."""
    if isinstance(inputs, (str, bytes)):
      inputs = [inputs]
    if isinstance(inputs, (list, tuple)) and not inputs:
      raise ServeError("no inputs: give at least one.")
    if isinstance(inputs, (list, tuple)) and inputs and all(
        isinstance(t, (str, bytes)) for t in inputs):
      if not self.takes_tokens:
        raise ServeError(f"text given to a model that takes "
                         f"{self.input_name} {list(self.input_shape)}.")
      return self.tokenize(inputs)
    array = np.asarray(inputs)
    if array.ndim == len(self.input_shape):  # One example.
      array = array[None]
    if not self.takes_tokens:
      if (np.issubdtype(self.input_dtype, np.floating)
          and not np.issubdtype(array.dtype, np.floating)):  # Raw values.
        scale = float(self.signature["preprocessing"]["input_scale"])
        array = array.astype(np.float32) / scale
      return array, np.zeros(len(array), np.int32)
    if not np.issubdtype(array.dtype, np.integer) or array.ndim != 2:
      raise ServeError(f"token ids must be integers [n, <= "
                       f"{self.input_shape[0]}], got {array.dtype} "
                       f"{array.shape}.")
    length = self.input_shape[0]
    if array.shape[1] > length:
      raise ServeError(f"token ids of length {array.shape[1]}: this export "
                       f"takes at most {length} per row.")
    pad_id = int(self.signature["preprocessing"]["pad_id"])
    ids = np.full((len(array), length), pad_id, np.int32)
    ids[:, :array.shape[1]] = array
    return ids, np.full(len(array), array.shape[1], np.int32)

  def predict(self, inputs: Any, *, batch_size: int = 0) -> dict[str, Any]:
    """Predictions for raw inputs (see the module docstring).

    Returns {'logits' [n, C] (language models: of the next token [n, V]),
    'probabilities', 'classes' [n], 'labels' (class names, or None),
    'tokens' (language models: the next tokens' text, or None)}.
    batch_size > 0 runs the inputs in chunks of that many. Each chunk is
    padded to a power of two rows (rows are independent at inference), so
    a server sees O(log n) compiles, not one per batch size.
    """
    model_inputs, lengths = self._model_inputs(inputs)
    step = batch_size if batch_size > 0 else max(len(model_inputs), 1)
    chunks = []
    for start in range(0, len(model_inputs), step):
      chunk = model_inputs[start:start + step]
      rows = 1 << (len(chunk) - 1).bit_length()
      padded = np.concatenate([chunk] + [chunk[-1:]] * (rows - len(chunk)))
      out = self(padded)[:len(chunk)]
      if self.is_language_model:  # The last real token's row.
        last = lengths[start:start + step] - 1
        out = out[np.arange(len(out)), last]
      chunks.append(out)
    if not chunks:
      raise ServeError("no inputs: give at least one.")
    logits = np.concatenate(chunks)
    classes = np.argmax(logits, axis=-1)
    result = {"logits": logits, "probabilities": _softmax(logits),
              "classes": classes, "labels": None, "tokens": None}
    if self.label_names:
      result["labels"] = [self.label_names[c] for c in classes]
    if self.is_language_model and self.signature.get("tokenizer"):
      result["tokens"] = [self.tokenizer.decode([int(c)],
                                                skip_special_tokens=False)
                          for c in classes]
    return result


def load(directory: str) -> Predictor:
  """The export in `directory` (signature.json + the serialized function)."""
  signature = _read_signature(directory)
  path = os.path.join(directory, signature["function_file"])
  with open(path, "rb") as f:
    exported = jax_export.deserialize(bytearray(f.read()))
  backend = jax.default_backend()
  if backend not in exported.platforms:
    raise ServeError(f"{path} was lowered for {list(exported.platforms)}; "
                     f"this jax runs on {backend!r}. Export again with "
                     f"--config.export.platforms including {backend!r}.")
  return Predictor(directory, signature, exported)


def _top(predictor: Predictor, probabilities: np.ndarray, k: int
         ) -> list[dict[str, Any]]:
  order = np.argsort(-probabilities)[:k]
  top = []
  for c in order:
    item = {"class": int(c), "probability": float(probabilities[c])}
    if predictor.label_names:
      item["label"] = predictor.label_names[c]
    if predictor.is_language_model and predictor.signature.get("tokenizer"):
      item["token"] = predictor.tokenizer.decode([int(c)],
                                                 skip_special_tokens=False)
    top.append(item)
  return top


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m kdjax.serve",
      description="Predictions of an exported kdjax student, one JSON line "
                  "per input.")
  parser.add_argument("directory", help="the export (signature.json, "
                      "model.jax_exported)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--text", action="append",
                      help="a text to classify or continue (repeatable)")
  source.add_argument("--npy", help=".npy of inputs: images [n, H, W, C] "
                      "(integers: raw values) or token ids [n, <= L]")
  parser.add_argument("--top_k", type=int, default=3,
                      help="classes (tokens) listed per input")
  parser.add_argument("--batch_size", type=int, default=64)
  args = parser.parse_args(argv)
  try:
    predictor = load(args.directory)
    inputs = args.text if args.text else np.load(args.npy)
    result = predictor.predict(inputs, batch_size=args.batch_size)
  except (ServeError, OSError) as e:
    print(f"kdjax.serve: error: {e}", file=sys.stderr)
    return 1
  for i, probabilities in enumerate(result["probabilities"]):
    line = {"input": args.text[i] if args.text else i,
            "class": int(result["classes"][i]),
            "probability": float(probabilities[result["classes"][i]])}
    for key, name in (("labels", "label"), ("tokens", "token")):
      if result[key] is not None:
        line[name] = result[key][i]
    line["top"] = _top(predictor, probabilities, args.top_k)
    print(json.dumps(line))
  return 0


if __name__ == "__main__":
  sys.exit(main())
