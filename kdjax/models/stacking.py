"""The scanned-layers layout, and finding one layer in it.

Unrolled models name their layers X_0, X_1, ... (Llama `layers_<i>`, GPT
`block_<i>`, BERT `encoder/layer_<i>`). With `scan_layers=True` the same
weights (and sown intermediates, and KV caches) are one array per weight with
a leading [num_layers] axis under X: layer i of `X_<i>` is `X[i]`.

Everything a user writes about single layers keeps the unrolled names
(`train.trainable` patterns, feature names, `init_layers`, checkpoint files
of importers and exporters); `locate` translates a name onto either layout,
and `stack`/`unstack` convert whole trees.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np

_INDEXED = re.compile(r"^(.+)_(\d+)$")


def split_index(part: str) -> tuple[str, int] | None:
  """'layers_5' -> ('layers', 5); None for a name without an index."""
  match = _INDEXED.match(part)
  return (match.group(1), int(match.group(2))) if match else None


def _num_layers(stacked: Any) -> int:
  return int(np.shape(jax.tree.leaves(stacked)[0])[0])


def num_layers(tree: Mapping[str, Any], path: str) -> int:
  """How many layers the stack at `path` holds."""
  return _num_layers(_get(tree, tuple(path.split("/"))))


def locate(tree: Mapping[str, Any], path: str
           ) -> tuple[tuple[str, ...], tuple[int, int] | None]:
  """A '/'-separated path in `tree`, on the unrolled or the stacked layout.

  Returns (the path's parts in `tree`, None) when it exists as written, or
  (parts with `X_<i>` replaced by `X`, (position of X in parts, i)) when
  layer i lives in a stack X. Only the first indexed part may be stacked
  (one scan per model). Raises KeyError naming what is there instead.
  """
  node: Any = tree
  parts: list[str] = []
  layer = None
  for part in path.split("/"):
    if isinstance(node, Mapping) and part in node:
      parts.append(part)
      node = node[part]
      continue
    indexed = split_index(part)
    if (layer is None and indexed and isinstance(node, Mapping)
        and indexed[0] in node):
      name, i = indexed
      size = _num_layers(node[name])
      if i >= size:
        raise KeyError(f"{path!r}: {name} stacks {size} layers "
                       f"({name}_0 .. {name}_{size - 1}), no {part}")
      layer = (len(parts), i)
      parts.append(name)
      node = node[name]
      continue
    here = sorted(node) if isinstance(node, Mapping) else []
    raise KeyError(f"{path!r}: no {part!r} under "
                   f"{'/'.join(parts) or 'the top'}; there: {here}")
  return tuple(parts), layer


def _get(tree: Mapping[str, Any], parts: tuple[str, ...]) -> Any:
  for part in parts:
    tree = tree[part]
  return tree


def _with(tree: Mapping[str, Any], parts: tuple[str, ...], value) -> dict:
  out = dict(tree)
  if len(parts) == 1:
    out[parts[0]] = value
  else:
    out[parts[0]] = _with(tree[parts[0]], parts[1:], value)
  return out


def stack(tree: Mapping[str, Any], path: str) -> dict:
  """`path`_0, `path`_1, ... -> `path` with a leading [num_layers] axis.

  `path` is '/'-separated ('layers', 'block', 'encoder/layer'); the rest of
  the tree is kept as it is. numpy in, numpy out (jax arrays in: jax out).
  """
  *outer, name = path.split("/")
  parent = _get(tree, tuple(outer))
  count = sum(1 for k in parent if split_index(k) and
              split_index(k)[0] == name)
  if not count:
    raise KeyError(f"no {name}_<i> under {'/'.join(outer) or 'the top'}")
  layers = [parent[f"{name}_{i}"] for i in range(count)]
  stacked = jax.tree.map(
      lambda *xs: (np.stack(xs) if isinstance(xs[0], np.ndarray)
                   else jax.numpy.stack(xs)), *layers)
  new_parent = {k: v for k, v in parent.items()
                if not (split_index(k) and split_index(k)[0] == name)}
  new_parent[name] = stacked
  return _with(tree, tuple(outer), new_parent) if outer else new_parent


def unstack(tree: Mapping[str, Any], path: str,
            take: Callable[[Any, int], Any] = lambda x, i: x[i],
            num_layers: int | None = None) -> dict:
  """The inverse of `stack`. `take(leaf, i)` is layer i of a stacked leaf,
  for leaves that do not index (ShapeDtypeStructs; shardings, which also
  need `num_layers`)."""
  *outer, name = path.split("/")
  parent = _get(tree, tuple(outer))
  stacked = parent[name]
  count = num_layers if num_layers is not None else _num_layers(stacked)
  new_parent = {k: v for k, v in parent.items() if k != name}
  for i in range(count):
    new_parent[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: take(x, i),
                                             stacked)
  return _with(tree, tuple(outer), new_parent) if outer else new_parent


@dataclasses.dataclass(frozen=True)
class Layers:
  """A trainable-mask leaf for a stacked weight: selected[i] = layer i trains.

  Hashable (masks are bound statically under jit); truthy when any layer
  trains, so code that only asks "does this leaf get an optimizer?" works
  unchanged.
  """
  selected: tuple[bool, ...]

  def __bool__(self) -> bool:
    return any(self.selected)

  def fraction(self) -> float:
    return sum(self.selected) / len(self.selected)

  def where(self, yes: jax.Array, no: jax.Array) -> jax.Array:
    """`yes` on the selected layers (axis 0), `no` on the others."""
    shape = (len(self.selected),) + (1,) * (np.ndim(yes) - 1)
    keep = np.asarray(self.selected).reshape(shape)
    return jax.numpy.where(keep, yes, no)
