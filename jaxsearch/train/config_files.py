"""Configs in workdirs: frozen config dataclasses written as JSON and read back.

Every program writes its resolved config (every field, nested dataclasses as dicts) into its
workdir, so a notebook or a later tool rebuilds exactly what was trained without gin.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any


def config_to_json(config: RunConfig) -> str:
  return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
  """Rebuilds a (nested) frozen config dataclass from `dataclasses.asdict` output."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name not in data:
      continue
    value, hint = data[field.name], hints[field.name]
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
      value = config_from_dict(hint, value)
    elif typing.get_origin(hint) is tuple and isinstance(value, list):
      value = tuple(value)
    kwargs[field.name] = value
  unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
  return cls(**kwargs)


def read_config(workdir: str, filename: str, cls: type, what: str) -> Any:
  """The `cls` config saved as `workdir/filename` (JSON of `dataclasses.asdict`); a missing file
  raises FileNotFoundError naming the path and `what` kind of workdir was expected."""
  path = os.path.join(workdir, filename)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} {what}?")
  with open(path) as f:
    return config_from_dict(cls, json.load(f))
