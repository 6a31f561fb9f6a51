"""Optimizers: AdamW with linear warm-up, cosine or constant decay, and global-norm clipping."""
from __future__ import annotations

from typing import Callable

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  """AdamW settings.

  Attributes:
    learning_rate: peak learning rate.
    warmup_steps: linear warm-up from 0 to the peak.
    decay_steps: steps of cosine decay after warm-up (0: constant after warm-up; -1: until the
      end of the phase, which `make_optimizer` must then be told).
    end_lr_fraction: the cosine schedule ends at `learning_rate * end_lr_fraction`.
    weight_decay: decoupled weight decay.
    b1, b2, eps: Adam moments.
    grad_clip: global-norm clipping threshold (0 disables).
    state_dtype: "" keeps the optimizer's state (Adam's moments) in each parameter's dtype;
      "float32" keeps it, and computes the update, in float32 for bfloat16 / float16
      parameters (the update is cast back to the parameter's dtype).
  """

  learning_rate: float = 1e-3
  warmup_steps: int = 0
  decay_steps: int = 0
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  grad_clip: float = 1.0
  state_dtype: str = ""

  def __post_init__(self):
    if self.state_dtype not in ("", "float32"):
      raise ValueError(f"OptimizerConfig.state_dtype must be '' (the parameters' dtype) or "
                       f"'float32', got {self.state_dtype!r}")
    if not self.learning_rate > 0:
      raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
    if self.warmup_steps < 0:
      raise ValueError(f"OptimizerConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
    if self.decay_steps < -1:
      raise ValueError(f"OptimizerConfig.decay_steps must be >= -1, got {self.decay_steps}")
    if self.grad_clip < 0:
      raise ValueError(f"OptimizerConfig.grad_clip must be >= 0, got {self.grad_clip}")


def make_schedule(config: OptimizerConfig, total_steps: int | None = None) -> optax.Schedule:
  """Linear warm-up, then cosine decay over `decay_steps` (or constant)."""
  warmup = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
  decay_steps = config.decay_steps
  if decay_steps == -1:
    if total_steps is None:
      raise ValueError("OptimizerConfig.decay_steps=-1 decays until the end of the phase: pass "
                       "total_steps to make_optimizer")
    decay_steps = max(total_steps - config.warmup_steps, 1)
  if decay_steps:
    after = optax.cosine_decay_schedule(config.learning_rate, decay_steps,
                                        alpha=config.end_lr_fraction)
  else:
    after = optax.constant_schedule(config.learning_rate)
  if not config.warmup_steps:
    return after
  return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: OptimizerConfig, total_steps: int | None = None
                   ) -> optax.GradientTransformation:
  """AdamW with the schedule above, after global-norm clipping.

  Args:
    config: the settings.
    total_steps: the phase's length, needed when `config.decay_steps == -1`.

  Example:
    >>> tx = make_optimizer(OptimizerConfig(learning_rate=3e-4, warmup_steps=10))
  """
  parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
  parts.append(optax.adamw(make_schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay))
  tx = optax.chain(*parts)
  return in_float32(tx) if config.state_dtype == "float32" else tx


def in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` run on float32 copies of the gradients and parameters: its state is float32
  whatever the parameters' dtype, and each update is cast back to its parameter's dtype.

  Example:
    >>> tx = in_float32(optax.adam(1e-3))
    >>> state = tx.init({"w": jnp.ones(3, jnp.bfloat16)})   # moments in float32
  """
  def f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)

  def init(params):
    return tx.init(f32(params))

  def update(updates, state, params=None):
    new, state = tx.update(f32(updates), state, None if params is None else f32(params))
    return jax.tree.map(lambda u, g: u.astype(g.dtype), new, updates), state

  return optax.GradientTransformation(init, update)


def train_only(tx: optax.GradientTransformation, trainable: Callable[[tuple[str, ...]], bool]
               ) -> optax.GradientTransformation:
  """`tx` on the parameters whose path `trainable` accepts; the rest are frozen: zero updates
  and no optimizer state (LoRA: only the adapters are trained and held in Adam's moments).

  Args:
    tx: the optimizer of the trained leaves (clipping included: the global norm is the
      trained leaves' norm).
    trainable: `(path of keys) -> bool`, e.g. `jaxsearch.models.lora.is_adapter_path`.

  Example:
    >>> tx = train_only(make_optimizer(OptimizerConfig()), lora.is_adapter_path)
  """
  def labels(params):
    return traverse_util.path_aware_map(
        lambda path, _: "train" if trainable(tuple(path)) else "frozen", params)

  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
