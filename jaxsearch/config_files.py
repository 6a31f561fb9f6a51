"""Configs in workdirs: frozen config dataclasses written as JSON and read back.

Every program writes its resolved config (every field, nested dataclasses as dicts) into its
workdir, so a notebook or a later tool rebuilds exactly what was trained without gin. The
library's workdir readers (`jaxsearch.retrieval.trained_encoder`,
`jaxsearch.generative.workdir`) use these helpers too, so they live here rather than in
`jaxsearch.train` (which re-exports them as `jaxsearch.train.config_files`).

A workdir travels: `config_to_json` writes path fields as absolute paths (`absolute_paths`),
so the config reads back the same from any current directory. A config field is a path when
its dataclass field says so in its metadata:

  corpus: str = dataclasses.field(default="", metadata={"path": True})

  - `{"path": True}`: the value is a path; a relative one is made absolute against the
    current directory. "" (unset), names listed in `metadata["names"]` (e.g. "world") and
    specs of another kind ("tfds:NAME:SPLIT", "http://...", "gs://...") stay as they are.
  - `{"path": "spec"}`: the value is a name (e.g. a registry name such as
    "smollm2-135m-instruct", which stays) or "SCHEME:PATH" for a local scheme
    (`LOCAL_SCHEMES`, e.g. "gguf:models/m.gguf" -> "gguf:/abs/models/m.gguf").
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from typing import Any


# "SCHEME:PATH" specs whose PATH is a local file or directory.
LOCAL_SCHEMES = ("gguf", "hf", "file")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(.*)$", re.S)   # 2+ letters: not "C:"


def _absolute(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))


def _looks_local(path: str) -> bool:
  """For "hf:X": X is local (not a hub id like "org/name") when it exists or is spelt as a
  path."""
  return (os.path.exists(os.path.expanduser(path))
          or path.startswith(("/", "./", "../", "~")) or path in (".", ".."))


def absolute_path_value(value: Any, kind: Any = True, names: tuple = ()) -> Any:
  """One path field's value with its local path made absolute (see the module docstring).

  Example:
    >>> absolute_path_value("data/train.jsonl") == os.path.abspath("data/train.jsonl")
    True
    >>> absolute_path_value("tfds:natural_questions_open:train")
    'tfds:natural_questions_open:train'
    >>> absolute_path_value("smollm2-135m-instruct", "spec")
    'smollm2-135m-instruct'
  """
  if not isinstance(value, str) or not value or value in names:
    return value
  m = _SCHEME.match(value)
  if m:
    scheme, rest = m.groups()
    if rest.startswith("//") or scheme.lower() not in LOCAL_SCHEMES or not rest:
      return value                      # tfds:, http://, gs://, ... are not local paths
    if scheme.lower() == "hf" and not _looks_local(rest):
      return value                      # a hub id
    return f"{scheme}:{_absolute(rest)}"
  return value if kind == "spec" else _absolute(value)


def absolute_paths(config: Any) -> Any:
  """`config` with every path field (field metadata "path", at any depth of nested
  dataclasses) made absolute against the current directory; see the module docstring.

  Returns the same object when nothing changes; otherwise a copy built with
  `dataclasses.replace` (so the config's own validation runs again).

  Example:
    >>> @dataclasses.dataclass(frozen=True)
    ... class C:
    ...   corpus: str = dataclasses.field(default="", metadata={"path": True})
    ...   name: str = "x"
    >>> absolute_paths(C(corpus="wiki.jsonl")).corpus == os.path.abspath("wiki.jsonl")
    True
  """
  if not dataclasses.is_dataclass(config) or isinstance(config, type):
    return config
  changes = {}
  for field in dataclasses.fields(config):
    if not field.init:
      continue
    value = getattr(config, field.name)
    kind = field.metadata.get("path")
    if kind:
      new = absolute_path_value(value, kind, tuple(field.metadata.get("names", ())))
    else:
      new = absolute_paths(value)
    if new is not value and new != value:
      changes[field.name] = new
  return dataclasses.replace(config, **changes) if changes else config


def config_to_json(config: Any) -> str:
  """The config as JSON (`dataclasses.asdict`, keys sorted), path fields made absolute."""
  return json.dumps(dataclasses.asdict(absolute_paths(config)), indent=2, sort_keys=True)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
  """Rebuilds a (nested) frozen config dataclass from `dataclasses.asdict` output.

  A class whose fields changed since a workdir was written may define a static
  `upgrade_dict(data) -> data` that turns the old fields into today's; it is applied first.
  """
  upgrade = getattr(cls, "upgrade_dict", None)
  if upgrade is not None:
    data = upgrade(data)
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name not in data:
      continue
    value, hint = data[field.name], hints[field.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and isinstance(value, dict):
      # `Config | None` (e.g. RunConfig.lora): the one dataclass member of the union.
      members = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
      hint = members[0] if len(members) == 1 else hint
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
      value = config_from_dict(hint, value)
    elif typing.get_origin(hint) is tuple and isinstance(value, list):
      value = tuple(value)
    kwargs[field.name] = value
  unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
  return cls(**kwargs)


def read_config_dict(workdir: str, filename: str, what: str) -> dict[str, Any]:
  """The JSON object saved as `workdir/filename`; a missing file raises FileNotFoundError
  naming the path and `what` kind of workdir was expected."""
  path = os.path.join(workdir, filename)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} {what}?")
  with open(path) as f:
    return json.load(f)


def read_config(workdir: str, filename: str, cls: type, what: str) -> Any:
  """The `cls` config saved as `workdir/filename` (JSON of `dataclasses.asdict`); a missing file
  raises FileNotFoundError naming the path and `what` kind of workdir was expected."""
  return config_from_dict(cls, read_config_dict(workdir, filename, what))
