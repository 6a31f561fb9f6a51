"""Outcome-reward advantage estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++, Stratified GRPO).

Every estimator in `ADVANTAGES` takes `rewards [N]` and `group_ids [N]` (rows with equal ids
answer the same prompt) and returns advantages `[N] float32`; keyword arguments configure it
(gin binds them). Groups are found with an `[N, N]` equality matrix, so ids need not be
sorted, contiguous or bounded, and nothing depends on a static group size. The cost is
O(N^2) memory, negligible for RL batches (N = 4096 -> 64 MiB).

Registered in `ADVANTAGES`:
  - "grpo":        `grpo_advantages`, (r - mean_group) / (std_group + eps); `scale` selects
                   the std (group / batch / none);
  - "drgrpo":      `grpo_advantages` with scale="none" (Dr. GRPO), r - mean_group;
  - "rloo":        `rloo_advantages`, r - mean of the *other* rows of the group;
  - "reinforce_pp": `reinforce_pp_advantages`, batch-normalised rewards (REINFORCE++), with
                   an optional group-mean baseline first (REINFORCE++-baseline);
  - "stratified":  `stratified_advantages`, Stratified GRPO: normalisation inside strata
                   (e.g. the number of search calls) blended with the global one. It needs a
                   third array, `strata [N]`.
Standard deviations use Bessel's correction (ddof=1), as TRL and verl do. A group (or
stratum) of one row has advantage 0: its baseline is its own reward. (verl instead keeps the
raw reward of a singleton group; a singleton carries no relative signal.)

Token-level estimators that return `[N, T]` (GAE, token-reward REINFORCE++, turn-level
credit) live in `value.py` / `credit.py` and are registered in `TOKEN_ADVANTAGES`.

Example:
  >>> r, g = jnp.array([0., 1., 0., 1.]), jnp.array([0, 0, 1, 1])
  >>> a = ADVANTAGES.get("grpo")(r, g)          # [-0.7071, 0.7071, -0.7071, 0.7071]
  >>> b = ADVANTAGES.get("rloo")(r, g)          # [-1, 1, -1, 1]
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxsearch.registry import Registry

AdvantageFn = Callable[..., jax.Array]

ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
# Estimators returning per-token advantages [N, T] (GAE, turn-level credit, ...).
TOKEN_ADVANTAGES: Registry[Callable[..., tuple[jax.Array, jax.Array]]] = Registry(
    "token advantage estimator")

SCALES = ("group", "batch", "none")


def _check_rows(rewards, group_ids, name="group_ids"):
  if rewards.ndim != 1 or group_ids.shape != rewards.shape:
    raise ValueError(f"expected rewards [N] and {name} [N], got shapes {rewards.shape} "
                     f"and {group_ids.shape}")


def group_moments(values: jax.Array, same: jax.Array, valid: Optional[jax.Array] = None,
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, variance (ddof=1) and count of the entries of each row's group.

  Row i's group is every row j with `same[i, j]`; the entries of a row are its K values
  where `valid`. Two passes (mean first, then squared deviations), so it is exact for
  large offsets where the sum-of-squares formula cancels.

  Args:
    values: [N] or [N, K] float.
    same: [N, N] bool, an equivalence relation (symmetric, reflexive).
    valid: [N] or [N, K] bool (same shape as values), entries that count; None: all.

  Returns:
    (mean [N], var [N], count [N]) float32; var uses ddof=1 and is 0 for a count <= 1;
    mean is 0 for an empty group.

  Example:
    >>> same = jnp.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    >>> m, v, c = group_moments(jnp.array([1., 3., 5.]), same)   # m=[2,2,5] v=[2,2,0]
  """
  values = jnp.asarray(values, jnp.float32)
  if values.ndim == 1:
    values = values[:, None]
    valid = None if valid is None else jnp.asarray(valid)[:, None]
  valid = jnp.ones(values.shape, bool) if valid is None else jnp.asarray(valid, bool)
  same = jnp.asarray(same, jnp.float32)
  x = jnp.where(valid, values, 0.0)
  count = same @ valid.sum(axis=1).astype(jnp.float32)                       # [N]
  mean = (same @ x.sum(axis=1)) / jnp.maximum(count, 1.0)                    # [N]
  # Row j's own group mean equals mean[i] for every i in j's group.
  sq = jnp.where(valid, jnp.square(values - mean[:, None]), 0.0).sum(axis=1)  # [N]
  var = (same @ sq) / jnp.maximum(count - 1.0, 1.0)
  return mean, var, count


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
  A group whose rewards are all equal has advantage 0 whatever the scale.

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
  _check_rows(rewards, group_ids)
  same = group_ids[:, None] == group_ids[None, :]                          # [N, N]
  mean, var, _ = group_moments(rewards, same)
  centered = rewards - mean                                                # [N]
  if scale == "none":
    return centered
  if scale == "group":
    std = jnp.sqrt(var)
  else:  # "batch"
    n = rewards.shape[0]
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


@ADVANTAGES.register("rloo")
def rloo_advantages(rewards: jax.Array, group_ids: jax.Array) -> jax.Array:
  """RLOO advantages: reward minus the mean reward of the other rows of its group.

  `A_i = r_i - (sum_{j in g(i), j != i} r_j) / (n_g - 1) = n_g / (n_g - 1) * (r_i - mean_g)`
  (Ahmadian et al. 2024; verl's "rloo"). The leave-one-out baseline does not depend on r_i,
  so the estimator is unbiased. A singleton group has advantage 0 (verl keeps its raw
  reward).

  Args:
    rewards: [N] float rewards.
    group_ids: [N] int group of each row; any values, any order.

  Returns:
    [N] float32 advantages; each group's advantages sum to 0.

  Example:
    >>> adv = rloo_advantages(jnp.array([1., 0., 0., 2.]), jnp.array([0, 0, 0, 1]))
    >>> # row 0: 1 - (0 + 0) / 2 = 1; rows 1, 2: 0 - (1 + 0) / 2 = -0.5; singleton: 0
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  group_ids = jnp.asarray(group_ids)
  _check_rows(rewards, group_ids)
  same = (group_ids[:, None] == group_ids[None, :]).astype(jnp.float32)
  count = same.sum(axis=1)
  others = same @ rewards - rewards                                        # [N]
  baseline = others / jnp.maximum(count - 1.0, 1.0)
  return jnp.where(count > 1, rewards - baseline, 0.0)


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp_advantages(rewards: jax.Array, group_ids: Optional[jax.Array] = None, *,
                            baseline: str = "none", eps: float = 1e-6) -> jax.Array:
  """REINFORCE++ advantages for outcome rewards: batch-normalised (whitened) rewards.

  `A_i = (x_i - mean(x)) / (std(x) + eps)` over the whole batch (ddof=1), where
    - baseline="none":  x = r (REINFORCE++, Hu et al. 2025): no per-prompt baseline;
    - baseline="group": x = r - mean_{g(i)} (REINFORCE++-baseline: group mean first,
      then global whitening).
  Each row counts once here. verl/OpenRLHF whiten over *tokens* (a row weighs by its
  length); that token-weighted form, with per-token rewards, a discount and a KL-shaped
  return, is `value.reinforce_pp_token_advantages`.

  Args:
    rewards: [N] float rewards.
    group_ids: [N] int group of each row; only used (and then required) for
      baseline="group". Accepted always so the `ADVANTAGES` signature is uniform.
    baseline: "none" or "group" (static).
    eps: Added to the std.

  Returns:
    [N] float32 advantages with batch mean 0 and std ~1 (0 everywhere if all x are equal).

  Example:
    >>> adv = reinforce_pp_advantages(jnp.array([0., 0., 1., 3.]))
    >>> # mean 1, std(ddof=1) = sqrt(6 / 3) = 1.414: [-0.707, -0.707, 0, 1.414]
  """
  if baseline not in ("none", "group"):
    raise ValueError(f"baseline must be 'none' or 'group', got {baseline!r}")
  x = jnp.asarray(rewards, jnp.float32)
  if x.ndim != 1:
    raise ValueError(f"expected rewards [N], got shape {x.shape}")
  if baseline == "group":
    if group_ids is None:
      raise ValueError("baseline='group' needs group_ids, got None")
    x = grpo_advantages(x, group_ids, scale="none")
  n = x.shape[0]
  if n < 2:
    return jnp.zeros_like(x)
  return (x - x.mean()) / (jnp.std(x, ddof=1) + eps)


@ADVANTAGES.register("stratified")
def stratified_advantages(rewards: jax.Array, group_ids: jax.Array, strata: jax.Array, *,
                          blend: float = 0.5, global_scale: str = "group",
                          eps: float = 1e-6) -> jax.Array:
  """Stratified GRPO advantages (Stratified Advantage Normalization, SAN, blended).

  Search-agent trajectories of one prompt differ in structure (how many searches, where
  they sit); comparing a 0-search answer with a 3-search answer under one baseline mixes
  strata ("cross-stratum bias"). SAN partitions each group into strata and normalises
  inside each stratum; for finite-sample stability it is blended linearly with the global
  (ordinary GRPO) estimator:

    A_i = blend * (r_i - mu_s) / (sigma_s + eps) + (1 - blend) * A_global_i,

  where s = (group_i, stratum_i), mu_s / sigma_s are that stratum's mean and std (ddof=1),
  and A_global = grpo_advantages(rewards, group_ids, scale=global_scale). blend=1 is pure
  SAN, blend=0 is GRPO. A stratum of one row, or one whose rewards are all equal, has SAN
  term 0. (The paper's blend weight is not in our notes; 0.5 is a neutral default.)

  Args:
    rewards: [N] float rewards.
    group_ids: [N] int prompt group of each row.
    strata: [N] int stratum of each row, e.g. `min(num_searches, 3)`; strata are only
      compared inside a group, so ids may repeat across groups.
    blend: Weight of the stratified term, a Python float or traced scalar in [0, 1].
    global_scale: scale of the global term, one of `SCALES` (static).
    eps: Added to stds.

  Returns:
    [N] float32 advantages.

  Example:
    >>> r = jnp.array([1., 0., 1., 1.])            # one prompt; rows 0-1 searched once,
    >>> s = jnp.array([1, 1, 2, 2])                # rows 2-3 twice
    >>> a = stratified_advantages(r, jnp.zeros(4, int), s, blend=1.0)   # [.707, -.707, 0, 0]
  """
  if isinstance(blend, (int, float)) and not 0.0 <= blend <= 1.0:
    raise ValueError(f"blend must be in [0, 1], got {blend!r}")
  rewards = jnp.asarray(rewards, jnp.float32)
  group_ids, strata = jnp.asarray(group_ids), jnp.asarray(strata)
  _check_rows(rewards, group_ids)
  _check_rows(rewards, strata, "strata")
  same = ((group_ids[:, None] == group_ids[None, :]) & (strata[:, None] == strata[None, :]))
  mean, var, _ = group_moments(rewards, same)
  san = (rewards - mean) / (jnp.sqrt(var) + eps)
  glob = grpo_advantages(rewards, group_ids, scale=global_scale, eps=eps)
  return blend * san + (1.0 - blend) * glob


def zero_variance_fraction(rewards: jax.Array, group_ids: jax.Array, *,
                           atol: float = 0.0) -> jax.Array:
  """Fraction of groups whose rewards are all equal (no GRPO signal): a training metric.

  Each group counts once, whatever its size; a singleton group counts as zero-variance.

  Args:
    rewards: [N] float rewards.
    group_ids: [N] int group of each row.
    atol: A group counts when max - min of its rewards is <= atol.

  Returns:
    [] float32 in [0, 1].

  Example:
    >>> f = zero_variance_fraction(jnp.array([1., 1., 0., 1.]), jnp.array([0, 0, 1, 1]))  # .5
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  group_ids = jnp.asarray(group_ids)
  _check_rows(rewards, group_ids)
  same = group_ids[:, None] == group_ids[None, :]                          # [N, N]
  hi = jnp.max(jnp.where(same, rewards[None, :], -jnp.inf), axis=1)
  lo = jnp.min(jnp.where(same, rewards[None, :], jnp.inf), axis=1)
  weight = 1.0 / same.sum(axis=1)                       # a group's rows sum to 1
  return jnp.sum(jnp.where(hi - lo <= atol, weight, 0.0)) / jnp.sum(weight)


def masked_whiten(x: jax.Array, mask: jax.Array, *, eps: float = 1e-8) -> jax.Array:
  """Whitens `x` over the masked entries: `(x - mean) / sqrt(var + eps)`, 0 elsewhere.

  Mean and variance (ddof=1, as verl's `masked_whiten`) are over every entry where `mask`;
  unmasked entries are ignored (even NaN) and returned as 0.

  Args:
    x: [...] float values, e.g. [N, T] token returns.
    mask: bool, same shape as x.
    eps: Added to the variance.

  Returns:
    float32 array shaped like x.

  Example:
    >>> w = masked_whiten(jnp.array([1., 3., 99.]), jnp.array([True, True, False]))
    >>> # mean 2, var (ddof=1) 2: [-0.7071, 0.7071, 0]
  """
  x = jnp.asarray(x, jnp.float32)
  mask = jnp.asarray(mask, bool)
  n = mask.sum().astype(jnp.float32)
  xm = jnp.where(mask, x, 0.0)
  mean = xm.sum() / jnp.maximum(n, 1.0)
  var = jnp.where(mask, jnp.square(x - mean), 0.0).sum() / jnp.maximum(n - 1.0, 1.0)
  return jnp.where(mask, (xm - mean) * jax.lax.rsqrt(var + eps), 0.0)
