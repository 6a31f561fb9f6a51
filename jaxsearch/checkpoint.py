"""Orbax checkpoints: a pytree of arrays plus a JSON dict of metadata per step.

Saves are atomic (orbax writes to a temporary directory and renames), so a run killed mid-save
keeps every checkpoint it finished; restoring takes an abstract target so arrays come back with
the caller's shardings.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxsearch.types import PyTree


class Checkpointer:
  """A `CheckpointManager` over items `state` (pytree) and `meta` (JSON).

  Example:
    >>> ckpt = Checkpointer("/tmp/run/checkpoints/rl", max_to_keep=2)
    >>> ckpt.save(10, {"params": params}, {"phase": "rl"})
    >>> tree, meta = ckpt.restore(ckpt.latest_step(), jax.eval_shape(lambda: {"params": params}))
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"),
    )

  def save(self, step: int, state: PyTree, meta: dict[str, Any], *, wait: bool = True) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    if wait:
      self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int, target: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores `step` into the structure, shapes and shardings of `target` (abstract is fine)."""
    target = jax.tree.map(_as_abstract, target)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _as_abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x
