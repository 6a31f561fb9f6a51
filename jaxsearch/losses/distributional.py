"""Categorical value targets and losses: two-hot and HL-Gauss ("Stop Regressing", 2024).

Farebrother et al., "Stop Regressing: Training Value Functions via Classification for Scalable
Deep RL" (2024) train a value head with a softmax over K bins by cross-entropy to a target
*distribution* built from the scalar target, and read the value out as the expectation of the
bin centers. Everything here works on a `support`: the K bin centers, sorted, e.g.
`make_support(v_min, v_max, K) = linspace(v_min, v_max, K)`.

- two-hot: a target x (clipped to [s_0, s_{K-1}]) between centers s_i <= x <= s_{i+1} puts
  mass `(s_{i+1} - x) / (s_{i+1} - s_i)` on bin i and the rest on bin i+1; its expectation
  over the centers is x exactly.
- HL-Gauss (histogram loss with a Gaussian): the mass of bin i is the probability that
  N(x, sigma^2) falls between the bin's edges, renormalised over [e_0, e_K]:
  `p_i = (Phi((e_{i+1} - x) / sigma) - Phi((e_i - x) / sigma)) / (Phi((e_K - x) / sigma)
  - Phi((e_0 - x) / sigma))`. Edges are the midpoints between centers, plus half a bin beyond
  each end (`e_0 = s_0 - w/2`, `e_K = s_{K-1} + w/2`). The paper recommends
  `sigma = 0.75 * w` (w the bin width), the default here; x is clipped to [s_0, s_{K-1}].
- read-out: `categorical_value(logits, support) = sum_i softmax(logits)_i * s_i`.
- loss: `-sum_i p_i(target) * log_softmax(logits)_i`, averaged over the masked elements;
  the target distribution is a constant (no gradient flows into the targets).

Example:
  >>> support = make_support(-1.0, 1.0, 5)                 # [-1, -.5, 0, .5, 1]
  >>> two_hot(jnp.array(0.2), support)                     # [0, 0, .6, .4, 0]
  >>> p = hl_gauss(jnp.array(0.2), support)                # sums to 1, mean ~0.2
  >>> loss, metrics = categorical_value_loss(logits, targets, support, mask)   # [N, T, 5]
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

TARGET_KINDS = ("hl_gauss", "two_hot")
HL_GAUSS_SIGMA_RATIO = 0.75   # sigma / bin width recommended by Farebrother et al. (2024)


def make_support(v_min: float, v_max: float, num_bins: int) -> jax.Array:
  """K evenly spaced bin centers from `v_min` to `v_max` inclusive.

  Args:
    v_min: the smallest center (values below it are clipped to it).
    v_max: the largest center.
    num_bins: K >= 2.

  Returns:
    [K] float32, `linspace(v_min, v_max, K)`.

  Example:
    >>> make_support(0.0, 1.0, 3)   # [0, .5, 1]
  """
  if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
    raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
  if not (math.isfinite(v_min) and math.isfinite(v_max) and v_min < v_max):
    raise ValueError(f"need finite v_min < v_max, got v_min={v_min!r}, v_max={v_max!r}")
  return jnp.linspace(v_min, v_max, num_bins, dtype=jnp.float32)


def _check_support(support: jax.Array) -> jax.Array:
  support = jnp.asarray(support, jnp.float32)
  if support.ndim != 1 or support.shape[0] < 2:
    raise ValueError(f"support must be a 1-D array of K >= 2 sorted bin centers, got shape "
                     f"{support.shape}")
  return support


def two_hot(x: jax.Array, support: jax.Array) -> jax.Array:
  """Two-hot encoding of scalars on the support (sorted bin centers).

  Args:
    x: [...] float targets; clipped to [support[0], support[-1]].
    support: [K] sorted bin centers (need not be evenly spaced).

  Returns:
    [..., K] float32 with at most two non-zero neighbouring entries, summing to 1, and
    `sum(two_hot(x) * support) == clip(x)` (up to float rounding).

  Example:
    >>> two_hot(jnp.array([0.25, 5.0]), jnp.array([0., 1., 2.]))   # [[.75, .25, 0], [0, 0, 1]]
  """
  support = _check_support(support)
  k = support.shape[0]
  x = jnp.clip(jnp.asarray(x, jnp.float32), support[0], support[-1])
  lower = jnp.clip(jnp.searchsorted(support, x, side="right") - 1, 0, k - 2)   # [...]
  lo, hi = support[lower], support[lower + 1]
  w_hi = jnp.clip((x - lo) / (hi - lo), 0.0, 1.0)
  return (jax.nn.one_hot(lower, k, dtype=jnp.float32) * (1.0 - w_hi)[..., None]
          + jax.nn.one_hot(lower + 1, k, dtype=jnp.float32) * w_hi[..., None])


def bin_edges(support: jax.Array) -> jax.Array:
  """K + 1 edges around K sorted centers: midpoints, plus half a bin beyond each end.

  Example:
    >>> bin_edges(jnp.array([0., 1., 2.]))   # [-.5, .5, 1.5, 2.5]
  """
  support = _check_support(support)
  mids = 0.5 * (support[1:] + support[:-1])
  first = support[0] - 0.5 * (support[1] - support[0])
  last = support[-1] + 0.5 * (support[-1] - support[-2])
  return jnp.concatenate([first[None], mids, last[None]])


def hl_gauss(x: jax.Array, support: jax.Array, sigma: float | None = None) -> jax.Array:
  """HL-Gauss target distribution: N(x, sigma^2) integrated over each bin, renormalised.

  Args:
    x: [...] float targets; clipped to [support[0], support[-1]].
    support: [K] sorted bin centers; edges are `bin_edges(support)`.
    sigma: standard deviation of the Gaussian; default `0.75 * (support[-1] - support[0])
      / (K - 1)` (0.75 bin widths, as the paper recommends).

  Returns:
    [..., K] float32 probabilities summing to 1.

  Example:
    >>> p = hl_gauss(jnp.array(0.0), make_support(-1., 1., 5))  # symmetric around bin 2
  """
  support = _check_support(support)
  k = support.shape[0]
  if sigma is None:
    sigma = HL_GAUSS_SIGMA_RATIO * (support[-1] - support[0]) / (k - 1)
  elif not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma!r}")
  x = jnp.clip(jnp.asarray(x, jnp.float32), support[0], support[-1])
  edges = bin_edges(support)                                             # [K + 1]
  cdf = jax.scipy.special.erf((edges - x[..., None]) / (jnp.sqrt(2.0) * sigma))  # [..., K+1]
  z = cdf[..., -1] - cdf[..., 0]
  return (cdf[..., 1:] - cdf[..., :-1]) / z[..., None]


def categorical_value(logits: jax.Array, support: jax.Array) -> jax.Array:
  """Expected value of the softmax over bins: `sum_k softmax(logits)_k * support_k`.

  Args:
    logits: [..., K] any float dtype.
    support: [K] bin centers.

  Returns:
    [...] float32.

  Example:
    >>> categorical_value(jnp.zeros([2, 3]), jnp.array([0., 1., 5.]))   # [2, 2]
  """
  support = _check_support(support)
  if logits.shape[-1] != support.shape[0]:
    raise ValueError(f"logits have {logits.shape[-1]} bins but the support has "
                     f"{support.shape[0]}")
  return jnp.sum(jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * support, axis=-1)


def categorical_value_loss(
    logits: jax.Array,
    targets: jax.Array,
    support: jax.Array,
    mask: jax.Array | None = None,
    *,
    target_kind: str = "hl_gauss",
    sigma: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of the value head's bins to the targets' two-hot or HL-Gauss distribution.

  Args:
    logits: [..., K] value-head logits (e.g. [N, T, K]).
    targets: [...] float scalar targets (returns), e.g. [N, T]; no gradient flows into them.
    support: [K] bin centers.
    mask: optional [...] bool; False elements contribute nothing (even NaN targets there).
    target_kind: "hl_gauss" or "two_hot".
    sigma: HL-Gauss standard deviation (default 0.75 bin widths); ignored for two-hot.

  Returns:
    `(loss [], metrics)`: the mean cross-entropy over masked elements (0 when none), and
    metrics `value_loss` (the same), `value_abs_error` (mean |read-out - clipped target|)
    and `value_mean` (mean read-out).

  Example:
    >>> loss, m = categorical_value_loss(jnp.zeros([2, 4, 5]), jnp.ones([2, 4]),
    ...                                  make_support(-1., 1., 5))
  """
  if target_kind not in TARGET_KINDS:
    raise ValueError(f"target_kind must be one of {TARGET_KINDS}, got {target_kind!r}")
  support = _check_support(support)
  if logits.shape[:-1] != targets.shape or logits.shape[-1] != support.shape[0]:
    raise ValueError(f"logits must be targets.shape + (K,) = {targets.shape + support.shape}, "
                     f"got {logits.shape}")
  if mask is None:
    mask = jnp.ones(targets.shape, bool)
  elif mask.shape != targets.shape:
    raise ValueError(f"mask must have the targets' shape {targets.shape}, got {mask.shape}")
  mask = mask.astype(bool)
  targets = jnp.where(mask, jnp.asarray(targets, jnp.float32), 0.0)   # NaN-safe where masked
  if target_kind == "hl_gauss":
    probs = hl_gauss(targets, support, sigma)
  else:
    probs = two_hot(targets, support)
  probs = jax.lax.stop_gradient(probs)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.sum(probs * logp, axis=-1)                                   # [...]
  count = jnp.maximum(jnp.sum(mask), 1)
  loss = jnp.sum(jnp.where(mask, ce, 0.0)) / count
  value = jax.lax.stop_gradient(jnp.sum(jnp.exp(logp) * support, axis=-1))
  clipped = jnp.clip(targets, support[0], support[-1])
  metrics = {
      "value_loss": jax.lax.stop_gradient(loss),
      "value_abs_error": jnp.sum(jnp.where(mask, jnp.abs(value - clipped), 0.0)) / count,
      "value_mean": jnp.sum(jnp.where(mask, value, 0.0)) / count,
  }
  return loss, metrics
