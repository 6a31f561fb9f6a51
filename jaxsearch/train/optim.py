"""Optimizers: AdamW with linear warm-up, cosine or constant decay, and global-norm clipping."""
from __future__ import annotations

import dataclasses

import optax


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  """AdamW settings.

  Attributes:
    learning_rate: peak learning rate.
    warmup_steps: linear warm-up from 0 to the peak.
    decay_steps: steps of cosine decay after warm-up (0: constant after warm-up).
    end_lr_fraction: the cosine schedule ends at `learning_rate * end_lr_fraction`.
    weight_decay: decoupled weight decay.
    b1, b2, eps: Adam moments.
    grad_clip: global-norm clipping threshold (0 disables).
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

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
    for name in ("warmup_steps", "decay_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"OptimizerConfig.{name} must be >= 0, got {getattr(self, name)}")
    if self.grad_clip < 0:
      raise ValueError(f"OptimizerConfig.grad_clip must be >= 0, got {self.grad_clip}")


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
  """Linear warm-up, then cosine decay over `decay_steps` (or constant)."""
  warmup = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
  if config.decay_steps:
    after = optax.cosine_decay_schedule(config.learning_rate, config.decay_steps,
                                        alpha=config.end_lr_fraction)
  else:
    after = optax.constant_schedule(config.learning_rate)
  if not config.warmup_steps:
    return after
  return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """AdamW with the schedule above, after global-norm clipping.

  Example:
    >>> tx = make_optimizer(OptimizerConfig(learning_rate=3e-4, warmup_steps=10))
  """
  parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
  parts.append(optax.adamw(make_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay))
  return optax.chain(*parts)
