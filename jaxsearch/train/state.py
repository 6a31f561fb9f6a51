"""The training state: one pytree node with the optimizer and apply function as static fields."""
from __future__ import annotations

from typing import Callable

import jax
import optax
from flax import struct

from jaxsearch.types import PyTree


class TrainState(struct.PyTreeNode):
  step: jax.Array                     # [] int32, optimizer steps taken (SFT and RL together)
  params: PyTree                      # policy parameters (plain dict, unboxed)
  opt_state: optax.OptState
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def apply_gradients(self, grads: PyTree) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, opt_state=opt_state,
                        params=optax.apply_updates(self.params, updates))

  @classmethod
  def create(cls, *, apply_fn: Callable, params: PyTree, tx: optax.GradientTransformation
             ) -> "TrainState":
    import jax.numpy as jnp  # noqa: PLC0415
    return cls(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
               apply_fn=apply_fn, tx=tx)
