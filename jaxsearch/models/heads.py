"""Value and reward models: a `Transformer` trunk with a small head on its final hidden states.

A head reads the trunk's final-norm activations `h [B, T, D]` (`Transformer.hidden_states`)
and computes, in float32, `h @ kernel + bias` with `kernel [D, K]`, `bias [K]`:

- scalar head (`ValueHeadConfig.num_bins == 0`, K = 1): the value of each position,
  `v[b, t] = h[b, t] . kernel[:, 0] + bias[0]`;
- categorical head (`num_bins = K >= 2`): logits over K bins whose centers are
  `support = linspace(v_min, v_max, K)`, and the value is their expectation
  `v = sum_k softmax(logits)_k * support_k` (as `jaxsearch.losses.categorical_value`; train
  it with `jaxsearch.losses.categorical_value_loss`, two-hot or HL-Gauss targets).

The kernel starts at zero (`init_scale=0`, the default) or small (`init_scale > 0`: normal with
standard deviation `init_scale / sqrt(D)`), so a fresh head predicts 0 (or the support's mean)
everywhere and does not disturb a pretrained trunk. Head parameters carry the logical axes
`("embed", None)` / `(None,)` (the bins are never sharded).

Models (parameter trees in brackets):

- `ValueModel` [trunk/..., value_head/{kernel, bias}]: its own trunk; per-token values [B, T].
- `PolicyWithValue` [policy/..., value_head/...]: one trunk pass gives the policy's logits
  [B, T, V] and values [B, T]. `params["policy"]` is exactly a `Transformer`'s tree, so a
  policy checkpoint initialises it (`load_trunk`) and the sampler runs on it unchanged.
- `RewardModel` [trunk/..., reward_head/...]: one scalar per sequence [B], read at the last
  non-padding token of each row (from per-row `lengths`, or the last True of a `mask`).

A trunk never calls its output head here, so an untied trunk has no `lm_head` parameters
(`load_trunk` ignores the policy's).

Example:
  >>> cfg = TransformerConfig(vocab_size=64, d_model=32, num_layers=2)
  >>> rm = RewardModel(cfg)
  >>> tokens, lengths = jnp.zeros((2, 8), jnp.int32), jnp.array([5, 8])
  >>> params = nn.meta.unbox(rm.init(jax.random.key(0), tokens, lengths)["params"])
  >>> rewards = rm.apply({"params": params}, tokens, lengths)           # [2] float32
  >>> pv = PolicyWithValue(cfg, ValueHeadConfig(num_bins=51, v_min=-1., v_max=1.))
  >>> pv_params = nn.meta.unbox(pv.init(jax.random.key(0), tokens)["params"])
  >>> logits, values = pv.apply({"params": pv_params}, tokens)         # [2, 8, 64], [2, 8]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxsearch.models.transformer import Transformer, TransformerConfig
from jaxsearch.types import PyTree


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValueHeadConfig:
  """A scalar or categorical value head.

  Attributes:
    num_bins: 0 for a scalar head; K >= 2 for a categorical head over K bins.
    v_min: the lowest bin center (categorical only).
    v_max: the highest bin center (categorical only).
    init_scale: 0 initialises the kernel to zeros; > 0 draws it from a normal with standard
      deviation `init_scale / sqrt(D)`. The bias always starts at 0.
  """

  num_bins: int = 0
  v_min: float = -1.0
  v_max: float = 1.0
  init_scale: float = 0.0

  def __post_init__(self):
    if isinstance(self.num_bins, bool) or not isinstance(self.num_bins, int) or (
        self.num_bins < 0 or self.num_bins == 1):
      raise ValueError(f"ValueHeadConfig.num_bins must be 0 (scalar head) or an int >= 2 "
                       f"(categorical head), got {self.num_bins!r}")
    if self.num_bins and not (math.isfinite(self.v_min) and math.isfinite(self.v_max)
                              and self.v_min < self.v_max):
      raise ValueError(f"ValueHeadConfig needs finite v_min < v_max, got v_min={self.v_min!r}, "
                       f"v_max={self.v_max!r}")
    if not (math.isfinite(self.init_scale) and self.init_scale >= 0):
      raise ValueError(f"ValueHeadConfig.init_scale must be a finite number >= 0, got "
                       f"{self.init_scale!r}")

  @property
  def categorical(self) -> bool:
    return self.num_bins > 0

  @property
  def num_outputs(self) -> int:
    """K: 1 for a scalar head, `num_bins` for a categorical one."""
    return self.num_bins or 1

  def support(self) -> jax.Array:
    """[K] float32 bin centers `linspace(v_min, v_max, K)` (categorical heads only)."""
    if not self.categorical:
      raise ValueError("a scalar value head (num_bins=0) has no support")
    return jnp.linspace(self.v_min, self.v_max, self.num_bins, dtype=jnp.float32)


class ValueHead(nn.Module):
  """`h @ kernel + bias` in float32: [..., D] -> [..., K] (K = 1 for a scalar head)."""

  config: ValueHeadConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    cfg = self.config
    d = hidden.shape[-1]
    if cfg.init_scale > 0:
      init = nn.initializers.normal(stddev=cfg.init_scale / math.sqrt(d))
    else:
      init = nn.initializers.zeros
    kernel = self.param("kernel", nn.with_logical_partitioning(init, ("embed", None)),
                        (d, cfg.num_outputs), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                      (cfg.num_outputs,), self.param_dtype)
    out = jnp.einsum("...d,dk->...k", hidden.astype(jnp.float32), kernel.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out + bias.astype(jnp.float32)

  def values(self, out: jax.Array) -> jax.Array:
    """The head's output [..., K] -> values [...] (the squeeze, or the bins' expectation)."""
    if not self.config.categorical:
      return out[..., 0]
    probs = jax.nn.softmax(out, axis=-1)
    return jnp.sum(probs * self.config.support(), axis=-1)


def _head(config: ValueHeadConfig, trunk: TransformerConfig, name: str) -> ValueHead:
  return ValueHead(config, param_dtype=trunk.params_dtype, name=name)


class ValueModel(nn.Module):
  """A separate critic: its own `Transformer` trunk and a value head, per-token values.

  Attributes:
    config: the trunk.
    head: the value head (scalar by default).
  """

  config: TransformerConfig
  head: ValueHeadConfig = ValueHeadConfig()

  def setup(self):
    self.trunk = Transformer(self.config)
    self.value_head = _head(self.head, self.config, "value_head")

  def __call__(self, tokens, *, positions=None, attention_mask=None, return_logits=False):
    """Values of every position.

    Args:
      tokens: [B, T] int32.
      positions, attention_mask: passed to `Transformer.hidden_states` (left padding).
      return_logits: also return the categorical head's bin logits.

    Returns:
      values [B, T] float32, or `(values, bin_logits [B, T, K])` with `return_logits`.
    """
    hidden = self.trunk.hidden_states(tokens, positions=positions,
                                      attention_mask=attention_mask)
    out = self.value_head(hidden)
    values = self.value_head.values(out)
    return (values, out) if return_logits else values


class PolicyWithValue(nn.Module):
  """Policy and value from one trunk pass; the policy's parameters live under `policy`.

  Attributes:
    config: the policy.
    head: the value head (scalar by default).
  """

  config: TransformerConfig
  head: ValueHeadConfig = ValueHeadConfig()

  def setup(self):
    self.policy = Transformer(self.config)
    self.value_head = _head(self.head, self.config, "value_head")

  def __call__(self, tokens, *, positions=None, attention_mask=None, return_logits=False):
    """Logits and values of every position.

    Args:
      tokens: [B, T] int32.
      positions, attention_mask: passed to the policy `Transformer`.
      return_logits: also return the categorical head's bin logits.

    Returns:
      `(logits [B, T, V] float32, values [B, T] float32)`, plus `bin_logits [B, T, K]` with
      `return_logits`. The logits equal `Transformer(config)` applied with `params["policy"]`.
    """
    logits, hidden = self.policy(tokens, positions=positions, attention_mask=attention_mask,
                                 return_hidden=True)
    out = self.value_head(hidden)
    values = self.value_head.values(out)
    return (logits, values, out) if return_logits else (logits, values)

  def decode(self, tokens, cache, cache_index, **kwargs):
    """The policy's `Transformer.decode` (sampling needs no value)."""
    return self.policy.decode(tokens, cache, cache_index, **kwargs)


def last_token_index(tokens_shape: tuple[int, int], lengths: jax.Array | None = None,
                     mask: jax.Array | None = None) -> jax.Array:
  """Index [B] int32 of each row's last real token.

  From `lengths` [B] (right padding): `lengths - 1`, clipped to [0, T-1]. From `mask` [B, T]
  bool: the position of the last True (0 for a row without one). Exactly one must be given.

  Example:
    >>> last_token_index((2, 4), mask=jnp.array([[1, 1, 0, 0], [0, 1, 1, 1]], bool))   # [1, 3]
  """
  b, t = tokens_shape
  if (lengths is None) == (mask is None):
    raise ValueError("pass exactly one of lengths [B] or mask [B, T]")
  if lengths is not None:
    lengths = jnp.asarray(lengths)
    if lengths.shape != (b,):
      raise ValueError(f"lengths must be [B] = ({b},), got {lengths.shape}")
    return jnp.clip(lengths.astype(jnp.int32) - 1, 0, t - 1)
  if mask.shape != (b, t):
    raise ValueError(f"mask must be [B, T] = {(b, t)}, got {mask.shape}")
  return jnp.max(jnp.where(mask.astype(bool), jnp.arange(t, dtype=jnp.int32), 0), axis=1)


class RewardModel(nn.Module):
  """A sequence reward: trunk, then a scalar head read at each row's last real token.

  Attributes:
    config: the trunk.
    head: a scalar head config (`num_bins` must be 0); `init_scale` sets its initialisation.
  """

  config: TransformerConfig
  head: ValueHeadConfig = ValueHeadConfig()

  def setup(self):
    if self.head.categorical:
      raise ValueError(f"RewardModel needs a scalar head (num_bins=0), got num_bins="
                       f"{self.head.num_bins}")
    self.trunk = Transformer(self.config)
    self.reward_head = _head(self.head, self.config, "reward_head")

  def __call__(self, tokens, lengths=None, *, mask=None, positions=None, attention_mask=None,
               return_lm_logits=False):
    """Reward of each sequence.

    Args:
      tokens: [B, T] int32.
      lengths: [B] int32 valid tokens per right-padded row; or
      mask: [B, T] bool, True on real tokens (the reward is read at the last True).
      positions, attention_mask: passed to the trunk (needed for left padding only: with right
        padding, causal attention already keeps padding out of the real tokens).
      return_lm_logits: also return the trunk's next-token logits (for an auxiliary language
        modelling loss). An untied trunk creates its `lm_head` only if `init` is called with
        this flag.

    Returns:
      rewards [B] float32, or `(rewards, logits [B, T, V] float32)` with `return_lm_logits`.
    """
    idx = last_token_index(tokens.shape, lengths, mask)                 # [B]
    kw = dict(positions=positions, attention_mask=attention_mask)
    if return_lm_logits:
      logits, hidden = self.trunk(tokens, return_hidden=True, **kw)     # [B, T, V], [B, T, D]
    else:
      hidden = self.trunk.hidden_states(tokens, **kw)                   # [B, T, D]
    last = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]   # [B, D]
    rewards = self.reward_head(last)[:, 0]
    return (rewards, logits) if return_lm_logits else rewards


def load_trunk(params: PyTree, trunk_params: PyTree, subtree: str = "trunk") -> PyTree:
  """Returns `params` with `params[subtree]` replaced by the matching leaves of `trunk_params`.

  Every leaf of `params[subtree]` must exist in `trunk_params` with the same shape; leaves
  only `trunk_params` has (e.g. a policy's `lm_head`, unused by value and reward heads) are
  ignored. Use `subtree="policy"` for `PolicyWithValue`.

  Args:
    params: a head model's parameters (plain, unboxed).
    trunk_params: a `Transformer`'s parameters (e.g. a policy checkpoint's).
    subtree: the trunk's key in `params`.

  Returns:
    A new parameter tree (the heads are kept).

  Raises:
    ValueError: naming the first missing key or mismatched shape.

  Example:
    >>> rm_params = load_trunk(rm_params, policy_params)
  """
  if subtree not in params:
    raise ValueError(f"params has no subtree {subtree!r}; its keys are {sorted(params)}")
  source = traverse_util.flatten_dict(dict(trunk_params), sep="/")
  target = traverse_util.flatten_dict(dict(params[subtree]), sep="/")
  out = {}
  for key, leaf in target.items():
    if key not in source:
      raise ValueError(f"trunk parameter {key!r} is missing from the given trunk params")
    if tuple(source[key].shape) != tuple(leaf.shape):
      raise ValueError(f"trunk parameter {key!r} has shape {tuple(source[key].shape)}, "
                       f"expected {tuple(leaf.shape)}")
    out[key] = jnp.asarray(source[key], leaf.dtype)
  new = dict(params)
  new[subtree] = traverse_util.unflatten_dict(out, sep="/")
  return new
