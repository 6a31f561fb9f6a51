"""Group-relative advantage estimators (GRPO, Dr. GRPO), pure and jittable.

Every estimator takes `rewards [N]` and `group_ids [N]` (rows with equal ids answer the same
prompt) and returns advantages `[N] float32`. Groups are found with an `[N, N]` equality
matrix, so ids need not be sorted, contiguous or bounded, and nothing depends on a static
group size. The cost is O(N^2) memory, negligible for RL batches (N = 4096 -> 64 MiB).

Registered in `ADVANTAGES`: "grpo" (`grpo_advantages`, keyword arguments pass through) and
"drgrpo" (`grpo_advantages` with `scale="none"`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxsearch.registry import Registry

AdvantageFn = Callable[..., jax.Array]

ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")

SCALES = ("group", "batch", "none")


@ADVANTAGES.register("grpo")
def grpo_advantages(rewards: jax.Array, group_ids: jax.Array, *, scale: str = "group",
                    eps: float = 1e-6) -> jax.Array:
  """GRPO advantages: reward minus its group mean, optionally divided by a std.

  `A_i = (r_i - mean_{g(i)}) / (std + eps)` where std is
    - scale="group": the std of row i's group, with Bessel's correction (ddof=1), as TRL
      and verl compute it;
    - scale="batch": the std of all N rewards (ddof=1);
    - scale="none": no division (Dr. GRPO), `A_i = r_i - mean_{g(i)}`.
  A group of one row has advantage 0 (its mean is its reward). verl instead keeps the raw
  reward for singleton groups; a singleton carries no relative signal, so 0 is used here.

  Args:
    rewards: [N] float rewards.
    group_ids: [N] int group of each row; any values, any order.
    scale: "group", "batch" or "none" (a Python string; mark it static under jit).
    eps: Added to the std before dividing.

  Returns:
    [N] float32 advantages.

  Example:
    >>> adv = grpo_advantages(jnp.array([0., 1., 0., 1.]), jnp.array([0, 0, 1, 1]))
    >>> # adv == [-0.7071, 0.7071, -0.7071, 0.7071]
  """
  if scale not in SCALES:
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
  rewards = jnp.asarray(rewards, jnp.float32)
  group_ids = jnp.asarray(group_ids)
  if rewards.ndim != 1 or group_ids.shape != rewards.shape:
    raise ValueError(f"expected rewards [N] and group_ids [N], got shapes {rewards.shape} "
                     f"and {group_ids.shape}")
  n = rewards.shape[0]
  same = (group_ids[:, None] == group_ids[None, :]).astype(jnp.float32)   # [N, N]
  count = same.sum(axis=1)                                                 # [N] >= 1
  mean = same @ rewards / count                                            # [N]
  centered = rewards - mean                                                # [N]
  if scale == "none":
    return centered
  if scale == "group":
    # Squared deviations of every member j of row i's group from that group's mean.
    sq = same * jnp.square(rewards[None, :] - mean[:, None])              # [N, N]
    var = sq.sum(axis=1) / jnp.maximum(count - 1.0, 1.0)                   # [N]
    std = jnp.sqrt(var)
  else:  # "batch"
    std = jnp.std(rewards, ddof=1) if n > 1 else jnp.zeros([], jnp.float32)
  return centered / (std + eps)


@ADVANTAGES.register("drgrpo")
def drgrpo_advantages(rewards: jax.Array, group_ids: jax.Array) -> jax.Array:
  """Dr. GRPO advantages: reward minus group mean, no std division.

  Args:
    rewards: [N] float rewards.
    group_ids: [N] int group of each row.

  Returns:
    [N] float32, `grpo_advantages(rewards, group_ids, scale="none")`.

  Example:
    >>> adv = drgrpo_advantages(jnp.array([0., 1., 3.]), jnp.array([5, 5, 2]))  # [-.5, .5, 0]
  """
  return grpo_advantages(rewards, group_ids, scale="none")
