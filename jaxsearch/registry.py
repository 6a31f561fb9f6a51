"""Explicit, instance-based registries that fail loudly.

Every registry is an instance owned by the module that defines its entries; gin files and
configs refer to entries by name. Registering a name twice raises, and looking up an
unknown name raises a `LookupError` that lists the known names.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """A named collection of callables selectable by string.

  Example:
    >>> ADVANTAGES = Registry("advantage estimator")
    >>> @ADVANTAGES.register("grpo")
    ... def grpo(rewards, group_ids): ...
    >>> ADVANTAGES.get("grpo") is grpo
    True
  """

  def __init__(self, kind: str):
    self._kind = kind
    self._items: dict[str, T] = {}

  @property
  def kind(self) -> str:
    return self._kind

  def register(self, name: str) -> Callable[[T], T]:
    if not isinstance(name, str) or not name:
      raise ValueError(f"{self._kind} name must be a non-empty string, got {name!r}")

    def deco(obj: T) -> T:
      if name in self._items:
        raise KeyError(f"{self._kind} {name!r} is already registered")
      self._items[name] = obj
      return obj

    return deco

  def get(self, name: str) -> T:
    if name not in self._items:
      raise LookupError(f"unknown {self._kind} {name!r}; known: {sorted(self._items)}")
    return self._items[name]

  def names(self) -> list[str]:
    return sorted(self._items)

  def __contains__(self, name: object) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._items))
