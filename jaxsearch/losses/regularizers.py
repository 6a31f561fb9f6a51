"""Stability tools for policy-gradient training: the LLDS regulariser and truncated IS weights.

- `llds_penalty`: "lazy likelihood displacement" (LLD) is the GRPO collapse mode documented
  for Search-R1-style agents: the likelihood of correct *and* incorrect responses drifts
  down, low-confidence responses inflate gradients, and training spirals into collapse.
  LLDS is a likelihood-preserving regulariser that activates only for trajectories whose
  likelihood fell versus the behaviour (old) policy, and penalises only the tokens whose
  log-probability fell. Add `coef * penalty` to the policy loss.
- `truncated_is_weights`: the sampler (an inference engine, a quantised or bf16 copy)
  and the trainer compute slightly different log-probs for the same tokens, so "on-policy"
  data is off-policy. Truncated importance sampling (TIS, Yao et al. 2025; verl's
  `tis_imp_ratio_cap`) multiplies each token's loss by
  `min(exp(trainer_old_logp - sampler_logp), C)`; pass the weights as
  `ppo_policy_loss(..., token_weights=w)`.

Registered in `REGULARIZERS`: "llds" (`(logp, old_logp, mask, **kw) -> (penalty, metrics)`).

Example:
  >>> logp, old_logp = jnp.log(jnp.array([[.2, .6]])), jnp.log(jnp.array([[.4, .5]]))
  >>> sampler_logp, adv, mask = jnp.log(jnp.array([[.5, .5]])), jnp.ones(1), jnp.ones([1, 2], bool)
  >>> from jaxsearch.losses.policy import ppo_policy_loss
  >>> pen, m = llds_penalty(logp, old_logp, mask)
  >>> w = truncated_is_weights(old_logp, sampler_logp, mask, cap=2.0)
  >>> loss, aux = ppo_policy_loss(logp, old_logp, adv, mask, token_weights=w)
  >>> loss = loss + 0.1 * pen
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxsearch.losses.policy import aggregate, masked_mean, masked_sum
from jaxsearch.registry import Registry

REGULARIZERS: Registry[Callable[..., tuple[jax.Array, dict[str, jax.Array]]]] = Registry(
    "policy regularizer")

_LOG_RATIO_CLAMP = 20.0


def _check(logp, other, mask, name):
  if logp.ndim != 2 or other.shape != logp.shape or mask.shape != logp.shape:
    raise ValueError(f"expected logp, {name} and mask all [N, T], got shapes {logp.shape}, "
                     f"{other.shape} and {mask.shape}")


@REGULARIZERS.register("llds")
def llds_penalty(logp: jax.Array, old_logp: jax.Array, mask: jax.Array, *,
                 rows: Optional[jax.Array] = None, agg: str = "token-mean",
                 norm_length: Optional[float] = None,
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LLDS: penalise the fall of token log-probs in trajectories whose likelihood fell.

  Per row i, `delta_i = sum_t mask * (logp - old_logp)` is the change of the trajectory's
  log-likelihood. Rows with delta_i < 0 (and in `rows`, if given) are active; on their
  masked tokens the penalty is `max(0, old_logp - logp)`, which is positive only on the
  tokens whose log-prob fell (the tokens responsible). Reduced with
  `aggregate(penalty, mask, agg)` over all policy tokens (inactive rows contribute 0).
  The gate is a constant (no gradient flows through delta); the gradient is
  `-1 / count` on each responsible token's logp under token-mean, pushing it back up.

  Args:
    logp: [N, T] float log-probs under the policy being trained.
    old_logp: [N, T] float log-probs under the behaviour policy (constants).
    mask: [N, T] bool, the policy's tokens.
    rows: Optional [N] bool, rows eligible for the penalty (e.g. only correct answers).
    agg: One of `policy.AGG_MODES`.
    norm_length: Divisor for agg="seq-mean-token-sum-norm".

  Returns:
    (penalty [] float32 >= 0, metrics) with "llds_active_frac" (fraction of rows with >= 1
    policy token that are active), "llds_token_frac" (fraction of policy tokens penalised)
    and "llds_delta_mean" (mean delta_i over those rows).

  Example:
    >>> old = jnp.log(jnp.array([[.5, .5]]))
    >>> new = jnp.log(jnp.array([[.25, .6]]))      # delta = log(.5) + log(1.2) < 0
    >>> pen, m = llds_penalty(new, old, jnp.ones([1, 2], bool))   # log(2) / 2 = .3466
  """
  logp = jnp.asarray(logp, jnp.float32)
  old_logp = jnp.asarray(old_logp, jnp.float32)
  mask = jnp.asarray(mask, bool)
  _check(logp, old_logp, mask, "old_logp")
  diff = jnp.where(mask, logp - old_logp, 0.0)                               # [N, T]
  delta = jax.lax.stop_gradient(diff.sum(axis=1))                            # [N]
  active = delta < 0
  if rows is not None:
    active = active & jnp.asarray(rows, bool)
  fell = jnp.where(diff < 0, -diff, 0.0)        # [N, T]; no gradient at an exact tie
  penalty_tok = jnp.where(active[:, None], fell, 0.0)
  penalty = aggregate(penalty_tok, mask, agg, norm_length=norm_length)
  has_tokens = jnp.any(mask, axis=1)
  metrics = {
      "llds_active_frac": masked_mean(active.astype(jnp.float32), has_tokens),
      "llds_token_frac": masked_mean((penalty_tok > 0).astype(jnp.float32), mask),
      "llds_delta_mean": masked_mean(delta, has_tokens),
  }
  return penalty, jax.lax.stop_gradient(metrics)


def truncated_is_weights(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, *,
                         cap: float = 2.0, level: str = "token") -> jax.Array:
  """Truncated importance-sampling weights between the trainer and the sampler.

  level="token": `w_t = min(exp(old_logp_t - sampler_logp_t), cap)` (TIS as in verl);
  level="sequence": one weight per row, `min(exp(sum_t mask * (old - sampler)), cap)`,
  broadcast over its tokens. `old_logp` is the trainer's log-prob of the sampled tokens
  before the update (the PPO `old_logp`), `sampler_logp` the log-prob the sampler reported
  when it drew them. Weights are constants (stop_gradient) and 0 at masked positions. The
  log-ratio is clamped to [-20, 20] before exp.

  Args:
    old_logp: [N, T] float trainer log-probs.
    sampler_logp: [N, T] float sampler log-probs (e.g. `Rollout.logp`).
    mask: [N, T] bool, the policy's tokens.
    cap: Truncation C > 0.
    level: "token" or "sequence" (static).

  Returns:
    [N, T] float32 weights in [0, cap].

  Example:
    >>> w = truncated_is_weights(jnp.log(jnp.array([[.6, .2]])),
    ...                          jnp.log(jnp.array([[.2, .4]])), jnp.ones([1, 2], bool))
    >>> # [[min(3, 2), .5]] = [[2, .5]]
  """
  if level not in ("token", "sequence"):
    raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
  if not cap > 0:
    raise ValueError(f"cap must be > 0, got {cap!r}")
  old_logp = jnp.asarray(old_logp, jnp.float32)
  sampler_logp = jnp.asarray(sampler_logp, jnp.float32)
  mask = jnp.asarray(mask, bool)
  _check(old_logp, sampler_logp, mask, "sampler_logp")
  log_ratio = jnp.where(mask, old_logp - sampler_logp, 0.0)
  if level == "sequence":
    log_ratio = jnp.broadcast_to(masked_sum(log_ratio, mask, axis=1)[:, None], mask.shape)
  log_ratio = jnp.clip(log_ratio, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
  w = jnp.minimum(jnp.exp(log_ratio), cap)
  return jax.lax.stop_gradient(jnp.where(mask, w, 0.0))
