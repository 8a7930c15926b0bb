"""The package's layers (docs/ARCHITECTURE.md): imports flow one way, no loops.

Walks every import of every kdjax module (including those inside functions)
and fails on an import cycle, on an import from a lower layer into a higher
one, and on an import between two packages of the same layer.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "kdjax"
# Lowest first. A module may import its own package and any lower layer.
LAYERS = (
    ("kdjax.core",),  # The error type, config primitives, the chip table.
    ("kdjax.runtime",),  # Storage, checkpoints, metrics, hosts, preemption.
    ("kdjax.data", "kdjax.models"),  # Input pipelines; Flax models.
    ("kdjax.weights", "kdjax.distill"),  # Weights in; the fused step.
    ("kdjax.run",),  # The train loop, tasks, reports, cache builder.
    ("kdjax",),  # Entry points: main, modes, validation, aot.
)


def module_names(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
  out = {}
  for path in (root / PACKAGE).rglob("*.py"):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _resolve(name: str, modules) -> str | None:
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
  """Module -> the kdjax modules it imports (anywhere in its source)."""
  modules = module_names(root)
  graph = {m: set() for m in modules}
  for name, path in modules.items():
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = name.split(".") if is_package else name.split(".")[:-1]
          anchor = anchor[:len(anchor) - (node.level - 1)]
          base = ".".join(anchor + ([base] if base else []))
        targets = [f"{base}.{a.name}" for a in node.names]
      else:
        continue
      for target in targets:
        found = _resolve(target, modules)
        if found and found != name and found.startswith(PACKAGE):
          graph[name].add(found)
  return graph


def imports_inside_functions(root: pathlib.Path = ROOT) -> list[str]:
  """'module:line' of every kdjax import inside a function (a hidden loop)."""
  found = []
  for name, path in sorted(module_names(root).items()):
    tree = ast.parse(path.read_text())
    for function in ast.walk(tree):
      if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(function):
        if isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
          names = [node.module or ""] if not node.level else [PACKAGE]
        else:
          continue
        if any(n == PACKAGE or n.startswith(PACKAGE + ".") for n in names):
          found.append(f"{name}:{node.lineno}")
  return found


def layer_of(module: str) -> tuple[int, str]:
  """(layer index, the package that owns the module)."""
  for index, packages in enumerate(LAYERS):
    for package in packages:
      if package != PACKAGE and (module == package
                                 or module.startswith(package + ".")):
        return index, package
  if module.count(".") == 1:  # A top-level module: an entry point.
    return len(LAYERS) - 1, PACKAGE
  raise AssertionError(f"{module} is in no layer; add its folder to LAYERS.")


def layer_violations(graph) -> list[str]:
  bad = []
  for module, imports in sorted(graph.items()):
    if module == PACKAGE:
      continue
    level, owner = layer_of(module)
    for target in sorted(imports):
      if target == PACKAGE:
        continue
      target_level, target_owner = layer_of(target)
      if target_owner == owner or target_level < level:
        continue
      why = ("a higher layer" if target_level > level
             else "another package of the same layer")
      bad.append(f"{module} imports {target} ({why})")
  return bad


def cycles(graph) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_import_cycles():
  assert cycles(import_graph()) == []


def test_imports_flow_down_the_layers():
  assert layer_violations(import_graph()) == []


def test_no_kdjax_import_inside_a_function():
  assert imports_inside_functions() == []


def test_every_module_is_in_a_layer():
  for module in module_names():
    if module != PACKAGE:
      layer_of(module)


def _write_package(tmp_path, files: dict[str, str]) -> pathlib.Path:
  for name, text in files.items():
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return tmp_path


@pytest.mark.parametrize("files, expected", [
    ({"kdjax/__init__.py": "", "kdjax/core/__init__.py": "",
      "kdjax/core/a.py": "def f():\n  from kdjax.run import b\n",
      "kdjax/run/__init__.py": "", "kdjax/run/b.py": ""},
     ["kdjax.core.a imports kdjax.run.b (a higher layer)"]),
    ({"kdjax/__init__.py": "", "kdjax/data/__init__.py": "",
      "kdjax/data/a.py": "from kdjax.models import b\n",
      "kdjax/models/__init__.py": "", "kdjax/models/b.py": ""},
     ["kdjax.data.a imports kdjax.models.b (another package of the same "
      "layer)"]),
    ({"kdjax/__init__.py": "", "kdjax/run/__init__.py": "",
      "kdjax/run/a.py": "from kdjax.core import b\nfrom . import c\n",
      "kdjax/run/c.py": "", "kdjax/core/__init__.py": "",
      "kdjax/core/b.py": ""}, []),
])
def test_the_check_sees_what_it_must(tmp_path, files, expected):
  """The checker itself: a hidden upward import inside a function is caught."""
  graph = import_graph(_write_package(tmp_path, files))
  assert layer_violations(graph) == expected


def test_the_check_sees_an_import_inside_a_function(tmp_path):
  root = _write_package(tmp_path, {
      "kdjax/__init__.py": "", "kdjax/run/__init__.py": "",
      "kdjax/run/a.py": "import os\ndef f():\n  import json\n"
                        "  from kdjax.run import b\n",
      "kdjax/run/b.py": ""})
  assert imports_inside_functions(root) == ["kdjax.run.a:4"]


def test_the_check_sees_a_cycle(tmp_path):
  graph = import_graph(_write_package(tmp_path, {
      "kdjax/__init__.py": "", "kdjax/run/__init__.py": "",
      "kdjax/run/a.py": "from kdjax.run import b\n",
      "kdjax/run/b.py": "def f():\n  import kdjax.run.a\n"}))
  assert cycles(graph) == [["kdjax.run.a", "kdjax.run.b"]]
