"""Pairwise preference loss for reward models: Bradley–Terry.

Under the Bradley–Terry model the probability that a response with reward r_c is preferred to
one with reward r_r is `sigmoid(r_c - r_r)`; a reward model is trained by maximising the
log-likelihood of the observed preferences (Ouyang et al. 2022, InstructGPT):

  loss = mean_n -log sigmoid(r_c[n] - r_r[n] - m[n]) = mean_n softplus(-(r_c[n] - r_r[n] - m[n]))

with an optional margin m (Touvron et al. 2023, Llama 2, use a larger margin for pairs whose
preference is clearer). Only reward differences matter, so adding a constant to every reward
changes nothing.

Example:
  >>> loss, m = bradley_terry_loss(jnp.array([2., 0.]), jnp.array([0., 0.]))
  >>> # loss = (softplus(-2) + log 2) / 2; m["accuracy"] = 0.75 (a tie counts one half)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def bradley_terry_loss(
    chosen: jax.Array,
    rejected: jax.Array,
    *,
    margin: float | jax.Array = 0.0,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Negative log-likelihood of "chosen beats rejected" under Bradley–Terry.

  Args:
    chosen: [N] rewards of the preferred responses.
    rejected: [N] rewards of the dispreferred responses (same order).
    margin: scalar or [N] margin m; the loss is `-log sigmoid(chosen - rejected - m)`.
    mask: optional [N] bool, False for padding pairs (they contribute nothing).

  Returns:
    `(loss [], metrics)` with the mean loss over valid pairs (0 when none) and metrics
    `accuracy` (fraction of valid pairs with chosen > rejected, a tie counting 1/2) and
    `margin` (mean `chosen - rejected`), both without gradient.

  Example:
    >>> loss, m = bradley_terry_loss(jnp.array([1.]), jnp.array([0.]), margin=1.)  # log 2
  """
  chosen = jnp.asarray(chosen, jnp.float32)
  rejected = jnp.asarray(rejected, jnp.float32)
  if chosen.ndim != 1 or chosen.shape != rejected.shape:
    raise ValueError(f"chosen and rejected must both be [N], got {chosen.shape} and "
                     f"{rejected.shape}")
  margin = jnp.asarray(margin, jnp.float32)
  if margin.ndim and margin.shape != chosen.shape:
    raise ValueError(f"margin must be a scalar or [N] = {chosen.shape}, got {margin.shape}")
  if mask is None:
    mask = jnp.ones(chosen.shape, bool)
  elif mask.shape != chosen.shape:
    raise ValueError(f"mask must be [N] = {chosen.shape}, got {mask.shape}")
  mask = mask.astype(bool)
  diff = chosen - rejected
  nll = -jax.nn.log_sigmoid(diff - margin)                       # [N], stable for any diff
  count = jnp.maximum(jnp.sum(mask), 1)
  loss = jnp.sum(jnp.where(mask, nll, 0.0)) / count
  d = jax.lax.stop_gradient(diff)
  wins = jnp.where(d > 0, 1.0, jnp.where(d == 0, 0.5, 0.0))
  metrics = {
      "accuracy": jnp.sum(jnp.where(mask, wins, 0.0)) / count,
      "margin": jnp.sum(jnp.where(mask, d, 0.0)) / count,
  }
  return loss, metrics
