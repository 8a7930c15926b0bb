"""The primitives every config check shares: the error type and its message.

Each feature validates its own config section with `fail` (or by raising
ConfigError); kdjax.validation only calls them in order.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from kdjax.core import errors


class ConfigError(errors.KdjaxError, ValueError):
  """A config field holds a value kdjax cannot run with."""


def fail(field: str, value: Any, allowed: str) -> None:
  """Raises ConfigError: 'config.<field>=<value> is invalid: <allowed>.'"""
  raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}.")


def set_fields(config: ml_collections.ConfigDict, changes: dict[str, Any]
               ) -> ml_collections.ConfigDict:
  """Sets dotted fields in place ({'distill.alpha': 0.3}); new fields allowed."""
  with config.unlocked():
    for dotted, value in changes.items():
      *parents, leaf = dotted.split(".")
      node = config
      for part in parents:
        node = node[part]
      node[leaf] = value
  return config
