"""Critic-side RL math: GAE, token-level REINFORCE++ returns, the PPO clipped value loss.

All functions take `[N, T]` arrays and a `mask [N, T] bool` of the policy's tokens (the
actions). In a multi-turn search episode the environment inserts `<information>` tokens
between the policy's turns; they are not actions, so every recursion here runs over policy
tokens only: masked tokens are skipped, not counted as steps, and the next *policy* token
after a gap of environment tokens is the next step (its value bootstraps across the gap,
with one factor of gamma, not one per skipped token). Rewards and values at masked
positions are ignored (put an outcome reward on the last policy token), and every output
is 0 there.

Recursions are `jax.lax.scan` over T in reverse, vectorised over N; everything jits and
`gamma` / `lam` may be traced scalars.

Registered in `advantages.TOKEN_ADVANTAGES`: "gae" (`gae`) and "reinforce_pp_token"
(`reinforce_pp_token_advantages`), both returning `(advantages, returns)`.

Example:
  >>> r = jnp.array([[0., 0., 0., 1.]]); v = jnp.array([[.5, 9., .5, .5]])
  >>> m = jnp.array([[True, False, True, True]])         # token 1 is an env token
  >>> adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
  >>> print(adv)                                          # token 1 is skipped: 0
  [[0.5 0.  0.5 0.5]]
  >>> loss, aux = value_loss(v, v, ret, m, clip=0.2)      # 0.5 * mean((.5 - 1)^2)
  >>> print(loss)
  0.125
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxsearch.losses.advantages import TOKEN_ADVANTAGES, masked_whiten
from jaxsearch.losses.policy import aggregate, masked_mean


def _check(name, x, shape):
  if x.shape != shape:
    raise ValueError(f"{name} must have shape {shape} (like mask), got {x.shape}")


def _prep(mask, **arrays):
  mask = jnp.asarray(mask, bool)
  if mask.ndim != 2:
    raise ValueError(f"mask must be [N, T], got shape {mask.shape}")
  out = []
  for name, x in arrays.items():
    x = jnp.asarray(x, jnp.float32)
    _check(name, x, mask.shape)
    out.append(jnp.where(mask, x, 0.0))   # garbage (even NaN) at masked positions is ignored
  return mask, out


@TOKEN_ADVANTAGES.register("gae")
def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float = 1.0,
        lam: float = 0.95, bootstrap_value: Optional[jax.Array] = None,
        ) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over the policy tokens of each row.

  For a policy token t whose next policy token in the row is t' (none: the episode ends):
    delta_t = r_t + gamma * V_t' - V_t            (V_t' = bootstrap_value, default 0, if none)
    A_t     = delta_t + gamma * lam * A_t'        (A_t' = 0 if none)
    R_t     = A_t + V_t                           (the value target, the lambda-return)
  Masked tokens are skipped (see the module docstring); A and R are 0 there. This equals
  rlax's `truncated_generalized_advantage_estimation` on the compacted policy tokens, and
  verl's `compute_gae_advantage_return` before its whitening (verl whitens advantages
  inside; here call `advantages.masked_whiten(adv, mask)` if wanted).

  Args:
    rewards: [N, T] float per-token rewards (outcome reward on the last policy token, KL
      shaping per token, ...).
    values: [N, T] float critic values V(s_t) of the state before each token.
    mask: [N, T] bool, the policy's tokens.
    gamma: Discount per policy token (1.0 for LLM RL), Python or traced scalar.
    lam: GAE lambda.
    bootstrap_value: Optional [N] value after the last policy token (truncated episodes).

  Returns:
    (advantages [N, T], returns [N, T]) float32, 0 at masked positions.

  Example:
    >>> r = jnp.array([[0., 0., 1.]]); v = jnp.array([[.2, .4, .6]])
    >>> adv, ret = gae(r, v, jnp.ones([1, 3], bool), gamma=1.0, lam=1.0)
    >>> import numpy as np
    >>> print(np.asarray(adv).round(4))     # lam = 1: adv = total future reward - V
    [[0.8 0.6 0.4]]
    >>> print(ret)
    [[1. 1. 1.]]
  """
  mask, (rewards, values) = _prep(mask, rewards=rewards, values=values)
  n = mask.shape[0]
  next_v0 = (jnp.zeros([n], jnp.float32) if bootstrap_value is None
             else jnp.asarray(bootstrap_value, jnp.float32).reshape(n))

  def step(carry, x):
    next_v, next_a = carry                       # [N]: value and advantage of the next step
    r, v, m = x
    a = r + gamma * next_v - v + gamma * lam * next_a
    a = jnp.where(m, a, 0.0)
    return (jnp.where(m, v, next_v), jnp.where(m, a, next_a)), a

  _, adv = jax.lax.scan(step, (next_v0, jnp.zeros([n], jnp.float32)),
                        (rewards.T, values.T, mask.T), reverse=True)
  adv = adv.T
  return adv, jnp.where(mask, adv + values, 0.0)


def discounted_returns(rewards: jax.Array, mask: jax.Array, *, gamma: float = 1.0) -> jax.Array:
  """Discounted reward-to-go over the policy tokens: `G_t = r_t + gamma * G_t'`.

  t' is the next policy token of the row (masked tokens are skipped, not counted as steps,
  and their rewards are ignored). Equals `gae(rewards, 0, mask, gamma=gamma, lam=1)[1]`.

  Args:
    rewards: [N, T] float per-token rewards.
    mask: [N, T] bool, the policy's tokens.
    gamma: Discount per policy token.

  Returns:
    [N, T] float32 returns, 0 at masked positions.

  Example:
    >>> g = discounted_returns(jnp.array([[1., 5., 2.]]), jnp.array([[1, 0, 1]], bool),
    ...                        gamma=.5)
    >>> print(g)                           # [[1 + .5 * 2, 0, 2]]
    [[2. 0. 2.]]
  """
  mask, (rewards,) = _prep(mask, rewards=rewards)

  def step(next_g, x):
    r, m = x
    g = r + gamma * next_g
    return jnp.where(m, g, next_g), jnp.where(m, g, 0.0)

  _, ret = jax.lax.scan(step, jnp.zeros([mask.shape[0]], jnp.float32), (rewards.T, mask.T),
                        reverse=True)
  return ret.T


@TOKEN_ADVANTAGES.register("reinforce_pp_token")
def reinforce_pp_token_advantages(token_rewards: jax.Array, mask: jax.Array, *,
                                  gamma: float = 1.0, kl: Optional[jax.Array] = None,
                                  kl_coef: float = 0.0, eps: float = 1e-8,
                                  ) -> tuple[jax.Array, jax.Array]:
  """REINFORCE++ with token rewards: KL-shaped discounted returns, whitened over the batch.

  Per policy token, the shaped reward is `r_t - kl_coef * kl_t` (REINFORCE++ puts the KL to
  the reference into the reward instead of the loss; pass `kl = logp_old - logp_ref`, the k1
  estimate, for the paper's form); the return is its discounted reward-to-go over policy
  tokens (`discounted_returns`), and the advantage is the return whitened over every
  policy token of the batch (`masked_whiten`, ddof=1), as verl and OpenRLHF do. With an
  outcome reward on the last token, gamma = 1 and no KL, every token of row i has return
  r_i and the whitening is token-weighted (a long row counts once per token); the
  row-weighted outcome form is `advantages.reinforce_pp_advantages`.

  verl resets the running return at every masked token; here masked (environment) tokens
  are skipped, so a multi-turn episode's early turns see the final reward.

  Args:
    token_rewards: [N, T] float rewards (e.g. the outcome reward on each row's last policy
      token).
    mask: [N, T] bool, the policy's tokens.
    gamma: Discount per policy token.
    kl: Optional [N, T] per-token KL estimate used for shaping.
    kl_coef: Weight of the KL shaping.
    eps: Added to the variance when whitening.

  Returns:
    (advantages [N, T], returns [N, T]) float32, 0 at masked positions; returns include the
    KL shaping.

  Example:
    >>> r = jnp.array([[0., 1.], [0., 0.]]); m = jnp.ones([2, 2], bool)
    >>> adv, ret = reinforce_pp_token_advantages(r, m)
    >>> print(ret)
    [[1. 1.]
     [0. 0.]]
    >>> import numpy as np
    >>> print(np.asarray(adv).round(4))  # ret whitened over 4 tokens: mean .5, std .5774
    [[ 0.866  0.866]
     [-0.866 -0.866]]
  """
  rewards = jnp.asarray(token_rewards, jnp.float32)
  if kl is not None:
    rewards = rewards - kl_coef * jnp.asarray(kl, jnp.float32)
  returns = discounted_returns(rewards, mask, gamma=gamma)
  return masked_whiten(returns, jnp.asarray(mask, bool), eps=eps), returns


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               *, clip: Optional[float] = 0.5, agg: str = "token-mean",
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO clipped value loss: `0.5 * agg(max((V - R)^2, (V_clip - R)^2))`.

  `V_clip = old_values + clip(values - old_values, -clip, clip)`, so the critic cannot gain
  by moving further than `clip` from the values it had when the batch was collected (verl's
  `compute_value_loss` / TRL). `clip=None` is the plain squared error `0.5 * (V - R)^2`.

  Args:
    values: [N, T] float predictions of the critic being trained.
    old_values: [N, T] float predictions at rollout time (constants).
    returns: [N, T] float targets, e.g. `gae(...)[1]` (constants).
    mask: [N, T] bool, tokens whose value is trained (the policy's tokens).
    clip: Value clip range (verl's `cliprange_value`, default 0.5), or None.
    agg: One of `policy.AGG_MODES`.

  Returns:
    (loss [] float32, metrics) with "vf_clipfrac" (fraction of tokens where the clipped
    error is the larger), "vpred_mean" and "explained_variance"
    (1 - Var(R - V) / Var(R) over masked tokens; 0 when Var(R) = 0).

  Example:
    >>> v, old, ret = jnp.array([[1.0]]), jnp.array([[0.0]]), jnp.array([[2.0]])
    >>> loss, m = value_loss(v, old, ret, jnp.ones([1, 1], bool), clip=0.5)
    >>> print(loss, m["vf_clipfrac"])   # V_clip = 0.5: 0.5 * max((1 - 2)^2, (0.5 - 2)^2)
    1.125 1.0
  """
  mask, (values, old_values, returns) = _prep(
      mask, values=values, old_values=old_values, returns=returns)
  err = jnp.square(values - returns)
  if clip is None:
    loss_tok, clipped = err, jnp.zeros_like(mask)
  else:
    v_clip = old_values + jnp.clip(values - old_values, -clip, clip)
    err_clip = jnp.square(v_clip - returns)
    loss_tok, clipped = jnp.maximum(err, err_clip), err_clip > err
  loss = 0.5 * aggregate(loss_tok, mask, agg)
  ret_mean = masked_mean(returns, mask)
  var_ret = masked_mean(jnp.square(returns - ret_mean), mask)
  resid = returns - values
  var_res = masked_mean(jnp.square(resid - masked_mean(resid, mask)), mask)
  ev = jnp.where(var_ret > 0, 1.0 - var_res / jnp.where(var_ret > 0, var_ret, 1.0), 0.0)
  metrics = {
      "vf_clipfrac": masked_mean(clipped.astype(jnp.float32), mask),
      "vpred_mean": masked_mean(values, mask),
      "explained_variance": ev,
  }
  return loss, jax.lax.stop_gradient(metrics)
