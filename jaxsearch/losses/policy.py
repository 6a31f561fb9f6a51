"""Token-level policy losses: PPO clip (dual clip, GSPO sequence ratio), GRPO (+ KL), SFT.

Pure functions on arrays; the caller computes log-probs with its own model, jits and
differentiates. Shapes: N rows, T tokens, V vocabulary. `mask [N, T] bool` marks the tokens
the policy produced (the ones trained); everything else (prompt, inserted
`<information>` tokens, padding) contributes nothing to the loss, its gradient or the
metrics, whatever values those positions hold.

Aggregation modes (`agg`), as named by verl's `loss_agg_mode` (`aggregate`):
  - "token-mean": mean over every masked token of the batch (DAPO; long rows weigh more);
  - "seq-mean-token-mean": mean over each row's masked tokens, then over the rows that have
    at least one (original GRPO; every row weighs the same);
  - "seq-mean-token-sum": sum over each row's masked tokens, then mean over the rows that
    have at least one;
  - "seq-mean-token-sum-norm": sum over all masked tokens divided by a constant
    `norm_length` (default T, the padded width; pass the generation budget so the divisor
    never changes). This is Dr. GRPO's length-unbiased form, as verl computes it: the sum
    is not divided by the number of rows.
Rows with an empty mask are skipped (verl divides by all rows in the two seq-mean modes), so
padding rows or columns never change a loss; with "seq-mean-token-sum-norm" that holds when
`norm_length` is given explicitly.

Registered in `POLICY_LOSSES` (all `(logp, old_logp, advantages, mask, **kw) -> (loss,
metrics)`): "ppo" (`ppo_policy_loss`) and "gspo" (`gspo_policy_loss`).

Example:
  >>> lp, mask = jnp.log(jnp.full([2, 3], .5)), jnp.ones([2, 3], bool)
  >>> loss, metrics = grpo_loss(lp, lp, lp, jnp.array([1., 3.]), mask)   # -mean(A) = -2
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from jaxsearch.registry import Registry

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm")
KL_KINDS = ("kl", "abs", "mse", "low_var_kl")
RATIO_LEVELS = ("token", "sequence")
_KL_ALIASES = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}

PolicyLossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")

# verl clamps the log-ratio before exp (numerical safety) and k3 after it.
_LOG_RATIO_CLAMP = 20.0
_K3_CLAMP = 10.0


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Log-probability of each target token under `logits`, computed in float32.

  Args:
    logits: [N, T, V] unnormalised scores (any float dtype), position t predicting targets[t].
    targets: [N, T] int token ids in [0, V).

  Returns:
    [N, T] float32, `log_softmax(logits)[n, t, targets[n, t]]`.

  Example:
    >>> lp = token_logprobs(jnp.zeros([1, 2, 4]), jnp.array([[0, 3]]))   # [[-log 4, -log 4]]
  """
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
  """Entropy of the softmax distribution at every position, computed stably in float32.

  `H = -sum_v p_v log p_v` with `log p = log_softmax(logits)`; entries with p = 0 (logits
  of -inf, e.g. a vocabulary mask) contribute exactly 0, with a finite gradient.

  Args:
    logits: [N, T, V] (or any [..., V]) unnormalised scores, any float dtype.

  Returns:
    [N, T] float32 entropies in nats, in [0, log V]. Reduce with `aggregate(h, mask)`.

  Example:
    >>> h = entropy_from_logits(jnp.zeros([1, 2, 4]))   # [[log 4, log 4]]
  """
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  p = jnp.exp(logp)
  safe = jnp.where(p > 0, logp, 0.0)
  return -jnp.sum(p * safe, axis=-1)


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Sum of `x` where `mask` is True (masked values, even NaN, are ignored).

  Args:
    x: [...] values.
    mask: bool, broadcastable to x.
    axis: Axis or axes to reduce; None reduces all.

  Returns:
    The sum, 0 where the mask is empty.

  Example:
    >>> s = masked_sum(jnp.array([1., 2., jnp.nan]), jnp.array([True, True, False]))  # 3.
  """
  return jnp.sum(jnp.where(mask, x, 0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Mean of `x` over positions where `mask` is True; 0 (not NaN) where none is.

  Args:
    x: [...] values.
    mask: bool, broadcastable to x.
    axis: Axis or axes to reduce; None reduces all.

  Returns:
    masked_sum(x) / max(count, 1).

  Example:
    >>> m = masked_mean(jnp.array([1., 3., 100.]), jnp.array([True, True, False]))  # 2.
  """
  mask = jnp.broadcast_to(mask, jnp.shape(x))
  count = jnp.sum(mask, axis=axis)
  return masked_sum(x, mask, axis) / jnp.maximum(count, 1)


def aggregate(x: jax.Array, mask: jax.Array, agg: str = "token-mean", *,
              norm_length: Optional[Union[int, float, jax.Array]] = None) -> jax.Array:
  """Reduces a per-token loss [N, T] to a scalar with one of `AGG_MODES`.

  Args:
    x: [N, T] per-token values.
    mask: [N, T] bool, tokens that count.
    agg: One of `AGG_MODES` (see the module docstring); a Python string.
    norm_length: The constant divisor of "seq-mean-token-sum-norm" (e.g. the maximum
      response length); None means T = x.shape[-1]. Ignored by the other modes.

  Returns:
    [] float32; 0 when the mask is empty.

  Example:
    >>> x, m = jnp.array([[1., 1.], [4., 0.]]), jnp.array([[1, 1], [1, 0]], bool)
    >>> a = aggregate(x, m, "seq-mean-token-mean")       # (1 + 4) / 2 = 2.5
    >>> b = aggregate(x, m, "token-mean")                # (1 + 1 + 4) / 3 = 2
    >>> c = aggregate(x, m, "seq-mean-token-sum")        # (2 + 4) / 2 = 3
    >>> d = aggregate(x, m, "seq-mean-token-sum-norm", norm_length=4)   # 6 / 4 = 1.5
  """
  if agg == "token-mean":
    return masked_mean(x, mask)
  if agg == "seq-mean-token-mean":
    row_mean = masked_mean(x, mask, axis=-1)                # [N]
    return masked_mean(row_mean, jnp.any(mask, axis=-1))   # over rows with >= 1 token
  if agg == "seq-mean-token-sum":
    row_sum = masked_sum(x, mask, axis=-1)                  # [N]
    return masked_mean(row_sum, jnp.any(mask, axis=-1))
  if agg == "seq-mean-token-sum-norm":
    divisor = x.shape[-1] if norm_length is None else norm_length
    return masked_sum(x, mask) / jnp.asarray(divisor, jnp.float32)
  raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str = "low_var_kl") -> jax.Array:
  """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

  Kinds (names as in verl; k1/k2/k3 are accepted as aliases):
    - "kl" (k1): logp - ref_logp; unbiased, can be negative.
    - "abs": |logp - ref_logp|.
    - "mse" (k2): 0.5 * (logp - ref_logp)^2.
    - "low_var_kl" (k3): exp(ref - logp) - (ref - logp) - 1 >= 0, with ref - logp clamped
      to [-20, 20] and the result to [-10, 10] as verl does.

  Args:
    logp: [N, T] float log-probs under the policy.
    ref_logp: [N, T] float log-probs of the same tokens under the reference.
    kind: One of `KL_KINDS` (or an alias).

  Returns:
    [N, T] float32 per-token penalty (unmasked; reduce it with `aggregate`).

  Example:
    >>> k = kl_penalty(jnp.log(.5), jnp.log(.25))   # 0.5 + log 2 - 1 = 0.1931
  """
  kind = _KL_ALIASES.get(kind, kind)
  diff = jnp.asarray(logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)
  if kind == "kl":
    return diff
  if kind == "abs":
    return jnp.abs(diff)
  if kind == "mse":
    return 0.5 * jnp.square(diff)
  if kind == "low_var_kl":
    log_ratio = jnp.clip(-diff, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)   # ref - logp
    return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -_K3_CLAMP, _K3_CLAMP)
  raise ValueError(f"kl kind must be one of {KL_KINDS} (aliases {sorted(_KL_ALIASES)}), "
                   f"got {kind!r}")


def _check_shapes(logp, mask, advantages):
  if logp.ndim != 2 or mask.shape != logp.shape:
    raise ValueError(f"expected logp [N, T] and mask [N, T], got shapes {logp.shape} and "
                     f"{mask.shape}")
  if advantages.shape not in (logp.shape[:1], logp.shape):
    raise ValueError(f"advantages must be [N] or [N, T] = {logp.shape}, got "
                     f"{advantages.shape}")


@POLICY_LOSSES.register("ppo")
def ppo_policy_loss(logp: jax.Array, old_logp: Optional[jax.Array], advantages: jax.Array,
                    mask: jax.Array, *, clip_low: float = 0.2, clip_high: float = 0.2,
                    dual_clip: Optional[float] = None, agg: str = "token-mean",
                    ratio_level: str = "token", token_weights: Optional[jax.Array] = None,
                    norm_length: Optional[Union[int, float]] = None,
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO clipped surrogate loss over the masked tokens (+ dual clip, GSPO, IS weights).

  Per token: ratio = exp(logp - old_logp) and
    `pg = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))`;
  with `dual_clip = c > 1` (Ye et al. 2020, verl's `clip_ratio_c`), tokens with A < 0 use
    `pg = min(pg, -A * c)`, which bounds the loss when a bad token's ratio explodes;
  with `token_weights` w (e.g. `regularizers.truncated_is_weights`), `pg = w * pg` (w is
  treated as a constant). The loss is `aggregate(pg, mask, agg, norm_length=norm_length)`.

  `ratio_level="sequence"` is GSPO (Zheng et al. 2025): the ratio of row i is the geometric
  mean of its token ratios, `s_i = exp(mean_t(logp - old_logp))` over its masked tokens,
  and it is clipped at sequence level. It is implemented as GSPO-token, per token
  `s_it = sg(s_i) * exp(logp_t - sg(logp_t))` (value s_i, gradient s_i * d logp_t); with
  [N] advantages and agg="seq-mean-token-mean" this equals GSPO's sequence objective
  exactly (`gspo_policy_loss` has those defaults).

  The log-ratio is clamped to [-20, 20] before exp (as verl does) and set to 0 at masked
  positions, so arbitrary values there give neither inf nor NaN gradients.

  Args:
    logp: [N, T] float32 log-probs of the sampled tokens under the policy being trained.
    old_logp: [N, T] log-probs under the behaviour policy; None means on-policy
      (`stop_gradient(logp)`, ratio 1).
    advantages: [N] (broadcast over tokens) or [N, T] float, used as given (stop their
      gradient if they depend on the parameters being differentiated).
    mask: [N, T] bool, the policy's tokens.
    clip_low: Lower clip range (ratio >= 1 - clip_low).
    clip_high: Upper clip range (ratio <= 1 + clip_high; DAPO's clip-higher sets it larger).
    dual_clip: None, or the dual-clip constant c > 1 (verl's default is 3).
    agg: One of `AGG_MODES`.
    ratio_level: "token" (PPO) or "sequence" (GSPO).
    token_weights: Optional [N, T] non-negative per-token weights multiplying the loss.
    norm_length: Divisor of agg="seq-mean-token-sum-norm" (see `aggregate`).

  Returns:
    (loss [] float32, metrics) with metrics, each a masked token mean unless stated:
      "clip_frac": fraction of tokens where the clipped term is the active one;
      "dual_clip_frac": fraction of tokens (A < 0) where the dual clip is active (0 if off);
      "approx_kl": k3 estimate of KL(old || new) from token ratios, `r - 1 - log r`;
      "ratio_mean"; "ratio_min" / "ratio_max": min / max over masked tokens (0 if none),
      of the ratio that is clipped (the sequence ratio under GSPO).

  Example:
    >>> lp, mask = jnp.log(jnp.full([2, 3], .5)), jnp.ones([2, 3], bool)
    >>> loss, m = ppo_policy_loss(lp, lp, jnp.array([1., -1.]), mask)   # ratio 1: loss 0
  """
  if ratio_level not in RATIO_LEVELS:
    raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
  if dual_clip is not None and not dual_clip > 1.0:
    raise ValueError(f"dual_clip must be None or > 1, got {dual_clip!r}")
  logp = jnp.asarray(logp, jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  advantages = jnp.asarray(advantages, jnp.float32)
  _check_shapes(logp, mask, advantages)
  if old_logp is None:
    old_logp = jax.lax.stop_gradient(logp)
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  advantages = jnp.where(mask, advantages, 0.0)                            # [N, T]
  tok_log_ratio = jnp.where(mask, logp - jnp.asarray(old_logp, jnp.float32), 0.0)
  tok_log_ratio = jnp.clip(tok_log_ratio, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
  if ratio_level == "token":
    log_ratio = tok_log_ratio
  else:
    seq_log_ratio = masked_mean(tok_log_ratio, mask, axis=-1)             # [N]
    live = jnp.where(mask, logp - jax.lax.stop_gradient(logp), 0.0)
    log_ratio = jax.lax.stop_gradient(seq_log_ratio)[:, None] + live
    log_ratio = jnp.clip(log_ratio, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
  ratio = jnp.exp(log_ratio)                                               # [N, T]
  pg_unclipped = -advantages * ratio
  pg_clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  pg = jnp.maximum(pg_unclipped, pg_clipped)                               # [N, T]
  if dual_clip is not None:
    pg_dual = -advantages * dual_clip
    dual_active = (advantages < 0) & (pg > pg_dual)
    pg = jnp.where(advantages < 0, jnp.minimum(pg, pg_dual), pg)
  else:
    dual_active = jnp.zeros_like(mask)
  if token_weights is not None:
    weights = jax.lax.stop_gradient(jnp.asarray(token_weights, jnp.float32))
    if weights.shape != logp.shape:
      raise ValueError(f"token_weights must be [N, T] = {logp.shape}, got {weights.shape}")
    pg = jnp.where(mask, weights, 0.0) * pg
  loss = aggregate(pg, mask, agg, norm_length=norm_length)
  tok_ratio = jnp.exp(tok_log_ratio)
  any_tok = jnp.any(mask)
  metrics = {
      "clip_frac": masked_mean((pg_clipped > pg_unclipped).astype(jnp.float32), mask),
      "dual_clip_frac": masked_mean(dual_active.astype(jnp.float32), mask),
      "approx_kl": masked_mean(tok_ratio - 1.0 - tok_log_ratio, mask),
      "ratio_mean": masked_mean(ratio, mask),
      "ratio_min": jnp.where(any_tok, jnp.min(jnp.where(mask, ratio, jnp.inf)), 0.0),
      "ratio_max": jnp.max(jnp.where(mask, ratio, 0.0)),
  }
  return loss, jax.lax.stop_gradient(metrics)


@POLICY_LOSSES.register("gspo")
def gspo_policy_loss(logp: jax.Array, old_logp: Optional[jax.Array], advantages: jax.Array,
                     mask: jax.Array, *, clip_low: float = 3e-4, clip_high: float = 4e-4,
                     agg: str = "seq-mean-token-mean", **kwargs,
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GSPO: `ppo_policy_loss` with the sequence-level (geometric-mean) ratio.

  Per row, `s_i = (pi(y_i) / pi_old(y_i))^(1 / |y_i|)` and
  `loss_i = max(-A_i s_i, -A_i clip(s_i, 1 - clip_low, 1 + clip_high))`, averaged over
  rows (agg="seq-mean-token-mean"). The defaults are the GSPO paper's clip ranges, which
  are tiny because a sequence ratio moves far less than a token ratio.

  Args:
    logp, old_logp, advantages, mask: as `ppo_policy_loss` (advantages normally [N]).
    clip_low, clip_high: Sequence-ratio clip ranges.
    agg: Aggregation; keep "seq-mean-token-mean" for the paper's objective.
    **kwargs: Passed on to `ppo_policy_loss` (dual_clip, token_weights, norm_length).

  Returns:
    (loss [], metrics) as `ppo_policy_loss`.

  Example:
    >>> lp, mask = jnp.log(jnp.full([2, 3], .5)), jnp.ones([2, 3], bool)
    >>> loss, m = gspo_policy_loss(lp, lp, jnp.array([1., 3.]), mask)   # -2
  """
  kwargs.pop("ratio_level", None)   # always "sequence" (grpo_loss passes its own)
  return ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=clip_low,
                         clip_high=clip_high, agg=agg, ratio_level="sequence", **kwargs)


def grpo_loss(logp: jax.Array, old_logp: Optional[jax.Array], ref_logp: Optional[jax.Array],
              advantages: jax.Array, mask: jax.Array, *, clip_eps: float = 0.2,
              clip_eps_high: Optional[float] = None, kl_coef: float = 0.04,
              kl_kind: str = "low_var_kl", agg: str = "token-mean",
              dual_clip: Optional[float] = None, ratio_level: str = "token",
              token_weights: Optional[jax.Array] = None,
              norm_length: Optional[Union[int, float]] = None, policy_loss: str = "ppo",
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GRPO loss: PPO clipped surrogate plus `kl_coef` times the aggregated KL to a reference.

  `loss = ppo_policy_loss(...) + kl_coef * aggregate(kl_penalty(logp, ref_logp, kl_kind),
  mask, agg)`. With a Python `kl_coef == 0` the reference is never touched (`ref_logp` may
  be None) and the loss equals `ppo_policy_loss` exactly.

  Args:
    logp: [N, T] float32 policy log-probs of the sampled tokens.
    old_logp: [N, T] behaviour log-probs, or None for on-policy (ratio 1).
    ref_logp: [N, T] reference-policy log-probs; may be None when kl_coef == 0.
    advantages: [N] or [N, T] float.
    mask: [N, T] bool, the policy's tokens.
    clip_eps: Clip range; the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high].
    clip_eps_high: Upper clip range; None means clip_eps.
    kl_coef: KL weight (a Python float or a traced scalar).
    kl_kind: One of `KL_KINDS`, see `kl_penalty`.
    agg: One of `AGG_MODES`, used for both the policy and the KL term.
    dual_clip, ratio_level, token_weights, norm_length: see `ppo_policy_loss`
      (token_weights weigh the policy term only).
    policy_loss: the surrogate, a name of `POLICY_LOSSES` ("ppo", or "gspo": the sequence
      ratio, which then ignores `ratio_level`).

  Returns:
    (loss [] float32, metrics): the `ppo_policy_loss` metrics plus "pg_loss" and "kl"
    (the aggregated KL, 0 when skipped).

  Example:
    >>> lp, mask = jnp.log(jnp.full([2, 3], .5)), jnp.ones([2, 3], bool)
    >>> loss, m = grpo_loss(lp, None, None, jnp.array([1., 3.]), mask, kl_coef=0.0)  # -2
  """
  pg_loss, metrics = POLICY_LOSSES.get(policy_loss)(
      logp, old_logp, advantages, mask, clip_low=clip_eps,
      clip_high=clip_eps if clip_eps_high is None else clip_eps_high, agg=agg,
      dual_clip=dual_clip, ratio_level=ratio_level, token_weights=token_weights,
      norm_length=norm_length)
  skip_kl = isinstance(kl_coef, (int, float)) and kl_coef == 0
  if skip_kl:
    kl = jnp.zeros([], jnp.float32)
    loss = pg_loss
  else:
    if ref_logp is None:
      raise ValueError(f"ref_logp is None but kl_coef={kl_coef!r}; pass reference log-probs "
                       "or set kl_coef=0")
    mask = jnp.asarray(mask).astype(bool)
    logp = jnp.asarray(logp, jnp.float32)
    # Masked positions become 0 on both sides (zero penalty and gradient, even for NaN).
    lp = jnp.where(mask, logp, 0.0)
    ref = jnp.where(mask, jnp.asarray(ref_logp, jnp.float32), 0.0)
    kl = aggregate(kl_penalty(lp, ref, kl_kind), mask, agg, norm_length=norm_length)
    loss = pg_loss + kl_coef * kl
  metrics = dict(metrics, pg_loss=jax.lax.stop_gradient(pg_loss),
                 kl=jax.lax.stop_gradient(kl))
  return loss, metrics


def cross_entropy_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked token-mean negative log-likelihood (SFT / teacher forcing).

  Args:
    logits: [N, T, V] scores, position t predicting targets[:, t].
    targets: [N, T] int token ids.
    mask: [N, T] bool, tokens whose prediction is trained.

  Returns:
    (loss [] float32, metrics) with "nll" (= loss) and "token_accuracy" (fraction of masked
    tokens where argmax(logits) == target). Both are 0 when the mask is empty.

  Example:
    >>> loss, m = cross_entropy_loss(jnp.zeros([1, 3, 8]), jnp.zeros([1, 3], int),
    ...                              jnp.ones([1, 3], bool))   # loss = log 8
  """
  mask = jnp.asarray(mask).astype(bool)
  nll = -token_logprobs(logits, targets)                                    # [N, T]
  loss = masked_mean(nll, mask)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {"nll": jax.lax.stop_gradient(loss), "token_accuracy": masked_mean(correct, mask)}
  return loss, metrics
