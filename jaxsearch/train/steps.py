"""Pure update steps: supervised warm start, policy-gradient RL (GRPO family and PPO), critic.

Every RL algorithm is one objective over the policy's tokens (`mask`), selected by
`PolicyGradientConfig` (it configures every algorithm; `GRPOConfig` is its old,
deprecated name):

  loss = policy_loss(logp, old_logp, A, mask)           clipped surrogate (clip low / high,
                                                        dual clip, token or sequence ratio)
       + kl_coef      * agg(KL(pi || pi_ref))           k1 / abs / k2 / k3 to the warm start
       - entropy_coef * agg(H(pi))                      entropy bonus
       + llds_coef    * LLDS(logp, old_logp)            likelihood-preserving regulariser

The advantages `A` come from
  - an outcome estimator of `losses.ADVANTAGES` ([N], one per episode, `outcome_advantages`):
    "grpo" (scale group / batch / none), "drgrpo", "rloo", "reinforce_pp" (batch-whitened,
    optional group baseline), "stratified" (Stratified GRPO, strata = the episode's number of
    search calls, blended with GRPO's global normalisation);
  - "gae" (PPO, [N, T], `make_gae_fn`): a critic (`models.heads.ValueModel`, its own trunk)
    gives the value V_t of the state before every token; the outcome reward sits on the
    episode's last policy token; GAE runs over policy tokens only (inserted `<information>`
    tokens are skipped); advantages are whitened over the policy tokens of the batch, and the
    critic regresses the lambda-returns with the clipped value loss (`make_critic_update_fn`).

Alignment: `tokens [N, T]` hold whole episodes; column t of `sequence_logprobs` and
`token_values` is about token t given tokens < t (column 0, a prompt token, is 0).

LLDS compares the trainer's log-probs with the behaviour policy's (`old_logp`, the
pre-update log-probs of the rollout's tokens). On-policy with one update per batch the two are
equal, so the penalty and its gradient are 0: it needs `updates_per_batch >= 2`.

Example:
  >>> config = PolicyGradientConfig(advantage="rloo", kl_coef=0.0, entropy_coef=1e-3)
  >>> adv = outcome_advantages(config, rewards, group_ids, num_searches)        # [N]
  >>> update = jax.jit(make_policy_update_fn(apply_fn, config), donate_argnums=0)
  >>> state, metrics = update(state, PolicyGradientBatch(tokens, mask, adv, None, None))
  >>> # PPO: the critic gives per-token advantages and regression targets.
  >>> adv, returns, values = make_gae_fn(value_apply_fn, CriticConfig())(
  ...     critic_params, tokens, mask, rewards)
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import core as flax_core
from flax import linen as nn
from flax import traverse_util

from jaxsearch import losses
from jaxsearch.losses.policy import AGG_MODES, KL_KINDS, RATIO_LEVELS
from jaxsearch.models.heads import ValueHead, ValueHeadConfig, ValueModel, load_trunk
from jaxsearch.models.transformer import TokenScores, TransformerConfig
from jaxsearch.train.optim import OptimizerConfig
from jaxsearch.train.state import TrainState
from jaxsearch.types import PyTree, SequenceBatch

Metrics = dict[str, jax.Array]
# `score_fn(variables, tokens [N, T], targets [N, T]) -> TokenScores` ([N, T] log-probs,
# entropies, argmax hits): what the training steps read of the policy. `logits_score_fn`
# builds one from a logits `apply_fn`; a `Transformer`'s `token_scores` method (with
# `TransformerConfig.logits_chunk`) is one that never holds `[N, T, V]` logits.
ScoreFn = Callable[[PyTree, jax.Array, jax.Array], TokenScores]

GAE = "gae"   # the critic-based (PPO) advantage; every other name is in `losses.ADVANTAGES`
LLDS_PRESERVE = ("all", "nonnegative")


def advantage_names() -> tuple[str, ...]:
  """Every accepted `PolicyGradientConfig.advantage`: the outcome estimators and "gae"."""
  return (*losses.ADVANTAGES.names(), GAE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyGradientConfig:
  """The policy-gradient update of every RL algorithm (GRPO, Dr. GRPO, RLOO, REINFORCE++,
  Stratified GRPO, PPO with `advantage="gae"`, GSPO, + LLDS).

  Attributes:
    prompts_per_step: B, questions per update.
    num_generations: G, episodes sampled per question (N = B * G rows).
    advantage: the advantage estimator: a name of `losses.ADVANTAGES` ("grpo", "drgrpo",
      "rloo", "reinforce_pp", "stratified") or "gae" (PPO; needs `RLConfig.critic`).
    advantage_options: keyword options of that estimator, checked against its signature,
      e.g. {"scale": "none"} for "grpo" (Dr. GRPO's unscaled advantages), {"baseline":
      "group"} for "reinforce_pp", {"blend": 0.5, "global_scale": "group"} for "stratified"
      (strata are the episodes' numbers of search calls). {} keeps the estimator's defaults.
    clip_eps: lower clip range, the ratio is kept >= 1 - clip_eps.
    clip_eps_high: upper clip range (ratio <= 1 + clip_eps_high); None means clip_eps
      (DAPO's clip-higher sets it larger).
    dual_clip: None, or the dual-clip constant c > 1 bounding the loss of tokens with A < 0.
    ratio_level: "token" (PPO) or "sequence" (GSPO: the geometric mean of a row's token
      ratios, clipped per row; use tiny clip ranges such as 3e-4 / 4e-4).
    agg: loss aggregation, one of `losses.policy.AGG_MODES` (policy, KL, entropy, LLDS).
    norm_length: divisor of agg="seq-mean-token-sum-norm" (Dr. GRPO); 0 means the rollout's
      `max_len` (a constant, so the bucketed batch width never changes the loss).
    kl_coef: weight of KL(policy || reference); the reference is the warm start.
    kl_kind: one of `losses.policy.KL_KINDS`.
    entropy_coef: weight of the entropy bonus (0: entropy is only measured).
    llds_coef: weight of the LLDS regulariser (0: off); needs updates_per_batch >= 2.
    llds_preserve: the episodes LLDS protects: "all", or "nonnegative" (those whose advantage,
      the mean over its policy tokens for GAE, is >= 0: the LLDS authors' preserving set).
    updates_per_batch: optimizer steps on each rollout batch (1 is exactly on-policy).
    policy_loss: the clipped surrogate, a name of `losses.POLICY_LOSSES` ("ppo"; "gspo" is
      "ppo" with ratio_level="sequence" and its own defaults).
    micro_batch_size: rows per micro-batch of the update (0: the whole batch at once); the
      gradients of the micro-batches are accumulated into exactly the full-batch gradient
      (`accumulate_gradients`), so only the memory changes.
    track_likelihood: measure how the step moved the log-likelihood of the batch's own
      tokens (`rl_update.make_rl_update_fn`'s `logp_change*` metrics, one more forward pass):
      the likelihood displacement that precedes collapse (`jaxsearch.train.health`).
  """

  prompts_per_step: int = 8
  num_generations: int = 8
  advantage: str = "grpo"
  advantage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  dual_clip: float | None = None
  ratio_level: str = "token"
  agg: str = "token-mean"
  norm_length: int = 0
  kl_coef: float = 0.04
  kl_kind: str = "low_var_kl"
  entropy_coef: float = 0.0
  llds_coef: float = 0.0
  llds_preserve: str = "all"
  updates_per_batch: int = 1
  policy_loss: str = "ppo"
  micro_batch_size: int = 0
  track_likelihood: bool = True

  def __post_init__(self):
    if self.num_generations < 2:
      raise ValueError(f"PolicyGradientConfig.num_generations must be >= 2, got {self.num_generations}")
    for name in ("prompts_per_step", "updates_per_batch"):
      if getattr(self, name) < 1:
        raise ValueError(f"PolicyGradientConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.advantage not in advantage_names():
      raise ValueError(f"PolicyGradientConfig.advantage must be one of {advantage_names()}, got "
                       f"{self.advantage!r}")
    if self.kl_kind not in KL_KINDS:
      raise ValueError(f"PolicyGradientConfig.kl_kind must be one of {KL_KINDS}, got {self.kl_kind!r}")
    if self.agg not in AGG_MODES:
      raise ValueError(f"PolicyGradientConfig.agg must be one of {AGG_MODES}, got {self.agg!r}")
    if self.ratio_level not in RATIO_LEVELS:
      raise ValueError(f"PolicyGradientConfig.ratio_level must be one of {RATIO_LEVELS}, got "
                       f"{self.ratio_level!r}")
    if self.advantage != GAE:
      check_options(losses.ADVANTAGES, self.advantage, self.advantage_options,
                    "PolicyGradientConfig.advantage_options")
    elif self.advantage_options:
      raise ValueError("PolicyGradientConfig.advantage_options must be {} with advantage='gae' "
                       f"(the critic's options are CriticConfig's), got {self.advantage_options!r}")
    losses.POLICY_LOSSES.get(self.policy_loss)   # LookupError naming the known losses
    if self.micro_batch_size < 0:
      raise ValueError(f"PolicyGradientConfig.micro_batch_size must be >= 0, got "
                       f"{self.micro_batch_size}")
    if self.micro_batch_size and self.rows % self.micro_batch_size:
      raise ValueError(f"PolicyGradientConfig.micro_batch_size ({self.micro_batch_size}) must "
                       f"divide the batch's rows prompts_per_step * num_generations = {self.rows}")
    if not self.clip_eps > 0:
      raise ValueError(f"PolicyGradientConfig.clip_eps must be > 0, got {self.clip_eps!r}")
    if self.clip_eps_high is not None and not self.clip_eps_high > 0:
      raise ValueError(f"PolicyGradientConfig.clip_eps_high must be None or > 0, got "
                       f"{self.clip_eps_high!r}")
    if self.dual_clip is not None and not self.dual_clip > 1:
      raise ValueError(f"PolicyGradientConfig.dual_clip must be None or > 1, got {self.dual_clip!r}")
    if self.norm_length < 0:
      raise ValueError(f"PolicyGradientConfig.norm_length must be >= 0, got {self.norm_length}")
    for name in ("kl_coef", "entropy_coef", "llds_coef"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"PolicyGradientConfig.{name} must be >= 0, got {getattr(self, name)!r}")
    if self.llds_preserve not in LLDS_PRESERVE:
      raise ValueError(f"PolicyGradientConfig.llds_preserve must be one of {LLDS_PRESERVE}, got "
                       f"{self.llds_preserve!r}")
    if self.llds_coef > 0 and self.updates_per_batch < 2:
      raise ValueError(
          f"PolicyGradientConfig.llds_coef={self.llds_coef} needs updates_per_batch >= 2, got "
          f"{self.updates_per_batch}: with one on-policy update the policy equals the behaviour "
          "policy and the LLDS penalty is identically 0")

  @staticmethod
  def upgrade_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config (`run_config.json`) from before the rename, in today's fields."""
    data = dict(data)
    legacy = {k: data.pop(k) for k in LEGACY_ADVANTAGE_FIELDS if k in data}
    if legacy:
      data["advantage_options"] = {**legacy_advantage_options(data.get("advantage", "grpo"),
                                                              **legacy),
                                   **data.get("advantage_options", {})}
    return data

  @property
  def rows(self) -> int:
    return self.prompts_per_step * self.num_generations

  @property
  def uses_critic(self) -> bool:
    return self.advantage == GAE

  @property
  def needs_old_logp(self) -> bool:
    """Whether behaviour log-probs must be computed (more than one update per batch)."""
    return self.updates_per_batch > 1


def check_options(registry, name: str, options: Mapping[str, Any], what: str) -> None:
  """Raises ValueError unless every key of `options` is a keyword-only parameter of the
  registry entry `name` (a LookupError names the known entries)."""
  fn = registry.get(name)
  accepted = [p.name for p in inspect.signature(fn).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(f"{what}: {registry.kind} {name!r} has no options {unknown}; it accepts "
                     f"{accepted}")
  # The values too: the estimator checks them while tracing a two-row batch abstractly
  # (no computation, so no backend is initialised: configs are built at import time).
  specs = {"rewards": jax.ShapeDtypeStruct((2,), jnp.float32),
           "group_ids": jax.ShapeDtypeStruct((2,), jnp.int32),
           "strata": jax.ShapeDtypeStruct((2,), jnp.int32)}
  try:
    jax.eval_shape(lambda inputs: call_with_inputs(fn, inputs, options), specs)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{what}={dict(options)!r} is not valid for {registry.kind} {name!r}: "
                     f"{e}") from e


def call_with_inputs(fn: Callable, inputs: Mapping[str, Any], options: Mapping[str, Any]):
  """Calls a registry entry with the named inputs its positional parameters ask for."""
  params = inspect.signature(fn).parameters.values()
  args = [inputs[p.name] for p in params
          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name in inputs]
  return fn(*args, **options)


# Fields of the old `GRPOConfig` that are estimator options today.
LEGACY_ADVANTAGE_FIELDS = ("advantage_scale", "stratified_blend", "reinforce_pp_baseline")
_LEGACY_OPTION_NAMES = {"advantage_scale": ("scale", "global_scale"),
                        "stratified_blend": ("blend",), "reinforce_pp_baseline": ("baseline",)}


def legacy_advantage_options(advantage: str, **legacy: Any) -> dict[str, Any]:
  """The `advantage_options` the old flat fields meant for estimator `advantage`: each field
  goes to the option of that name the estimator has (fields it has none for were ignored)."""
  if advantage == GAE:
    return {}
  accepted = inspect.signature(losses.ADVANTAGES.get(advantage)).parameters
  return {option: value for field, value in legacy.items()
          for option in _LEGACY_OPTION_NAMES[field] if option in accepted}


def GRPOConfig(**kwargs: Any) -> PolicyGradientConfig:  # noqa: N802  (the old class name)
  """Deprecated: the old name of `PolicyGradientConfig` (also accepts its old fields
  `advantage_scale`, `stratified_blend`, `reinforce_pp_baseline`)."""
  warnings.warn("steps.GRPOConfig is deprecated: use steps.PolicyGradientConfig (and "
                "advantage_options={...} instead of advantage_scale / stratified_blend / "
                "reinforce_pp_baseline)", DeprecationWarning, stacklevel=2)
  return PolicyGradientConfig(**PolicyGradientConfig.upgrade_dict(kwargs))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CriticConfig:
  """PPO's critic: a `ValueModel` (own trunk, initialised from the warm-started policy's
  transformer, plus a fresh value head) trained on the lambda-returns. Used only with
  `PolicyGradientConfig.advantage == "gae"`.

  Attributes:
    gamma: discount per policy token.
    lam: GAE lambda.
    value_clip: clip range of the value loss around the rollout-time values (None: plain
      squared error).
    whiten_advantages: whiten the GAE advantages over the batch's policy tokens.
    warmup_steps: the first K RL steps update only the critic (the policy is unchanged).
    head: the value head (scalar: `num_bins` must be 0).
    optimizer: the critic's own optimizer and learning rate.
  """

  gamma: float = 1.0
  lam: float = 0.95
  value_clip: float | None = 0.5
  whiten_advantages: bool = True
  warmup_steps: int = 0
  head: ValueHeadConfig = ValueHeadConfig()
  optimizer: OptimizerConfig = OptimizerConfig(learning_rate=5e-4, warmup_steps=5)

  def __post_init__(self):
    for name in ("gamma", "lam"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"CriticConfig.{name} must be in [0, 1], got {value!r}")
    if self.value_clip is not None and not self.value_clip > 0:
      raise ValueError(f"CriticConfig.value_clip must be None or > 0, got {self.value_clip!r}")
    if self.warmup_steps < 0:
      raise ValueError(f"CriticConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
    if self.head.categorical:
      raise ValueError(f"CriticConfig.head must be a scalar head (num_bins=0), got num_bins="
                       f"{self.head.num_bins}")


class PolicyGradientBatch(NamedTuple):
  """One policy update's inputs."""

  tokens: jax.Array        # [N, T] int32, whole episodes
  policy_mask: jax.Array   # [N, T] bool, tokens the policy sampled (trained)
  advantages: jax.Array    # [N] (per episode) or [N, T] (per token, GAE) float32
  old_logp: jax.Array | None  # [N, T] float32 behaviour log-probs; None: on-policy (ratio 1)
  ref_logp: jax.Array | None  # [N, T] float32 reference log-probs; None when kl_coef == 0


class CriticBatch(NamedTuple):
  """One critic update's inputs (rollout-time values and their lambda-return targets)."""

  tokens: jax.Array        # [N, T] int32, whole episodes
  mask: jax.Array          # [N, T] bool, the policy's tokens (whose values are trained)
  old_values: jax.Array    # [N, T] float32 values at rollout time
  returns: jax.Array       # [N, T] float32 lambda-returns (GAE targets)


def logits_score_fn(apply_fn: Callable) -> ScoreFn:
  """The `ScoreFn` of a logits `apply_fn(variables, tokens [N, T]) -> [N, T, V]`: the whole
  batch's logits at once, read by `losses.token_logprobs` and `losses.entropy_from_logits`."""

  def score_fn(variables, tokens, targets):
    logits = apply_fn(variables, tokens)
    return TokenScores(losses.token_logprobs(logits, targets),
                       losses.entropy_from_logits(logits),
                       jnp.argmax(logits, axis=-1) == targets)

  return score_fn


def map_micro_batches(fn: Callable[[PyTree], PyTree], batch: PyTree, micro_batch_size: int
                      ) -> PyTree:
  """`fn(batch)` computed `micro_batch_size` rows at a time (one `lax.map` over the strided
  `micro_batches`), rows back in their order; `fn` must treat rows independently (a forward
  pass). 0 (or >= N): one call."""
  n = _rows(batch)
  if not micro_batch_size or micro_batch_size >= n:
    return fn(batch)
  if n % micro_batch_size:
    raise ValueError(f"micro_batch_size ({micro_batch_size}) must divide the batch's {n} rows")
  out = jax.lax.map(fn, micro_batches(batch, n // micro_batch_size))   # [M, N / M, ...]
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(n, *x.shape[2:]), out)


def sequence_logprobs(apply_fn: Callable, params: PyTree, tokens: jax.Array, *,
                      score_fn: ScoreFn | None = None, micro_batch_size: int = 0
                      ) -> jax.Array:
  """Log-probability of each token given the ones before it.

  Args:
    apply_fn: `apply_fn({"params": params}, tokens [N, T]) -> logits [N, T, V]`.
    params: model parameters.
    tokens: [N, T] int32.
    score_fn: how to score the tokens (`ScoreFn`); None: `logits_score_fn(apply_fn)`.
    micro_batch_size: rows per forward pass (`map_micro_batches`); 0: all at once.

  Returns:
    [N, T] float32; column 0 (nothing predicts it) is 0.

  Example:
    >>> logp = sequence_logprobs(apply_fn, params, tokens)   # [N, T]
  """
  score_fn = score_fn or logits_score_fn(apply_fn)
  logp = map_micro_batches(
      lambda t: score_fn({"params": params}, t[:, :-1], t[:, 1:]).logp, tokens,
      micro_batch_size)
  return jnp.pad(logp, ((0, 0), (1, 0)))


def token_values(value_apply_fn: Callable, params: PyTree, tokens: jax.Array) -> jax.Array:
  """Critic value of the state before each token (aligned with `sequence_logprobs`).

  Args:
    value_apply_fn: `value_apply_fn({"params": params}, tokens [N, T]) -> values [N, T]`,
      value t read after token t (e.g. `ValueModel.apply`).
    params: critic parameters.
    tokens: [N, T] int32.

  Returns:
    [N, T] float32: column t is the value after reading tokens < t; column 0 is 0.

  Example:
    >>> v = token_values(critic.apply, critic_params, tokens)   # [N, T]
  """
  values = value_apply_fn({"params": params}, tokens[:, :-1])
  return jnp.pad(jnp.asarray(values, jnp.float32), ((0, 0), (1, 0)))


def outcome_token_rewards(rewards: jax.Array, mask: jax.Array) -> jax.Array:
  """Places each episode's outcome reward on its last policy token.

  Args:
    rewards: [N] float episode rewards.
    mask: [N, T] bool, the policy's tokens.

  Returns:
    [N, T] float32, `rewards[i]` at the last True of row i, 0 elsewhere (all 0 for a row
    without policy tokens).

  Example:
    >>> r = outcome_token_rewards(jnp.array([2.]), jnp.array([[0, 1, 1, 0]], bool))
    >>> # [[0, 0, 2, 0]]
  """
  mask = jnp.asarray(mask, bool)
  t = mask.shape[1]
  last = jnp.max(jnp.where(mask, jnp.arange(t), -1), axis=1)                 # [N], -1: none
  onehot = jnp.arange(t)[None, :] == last[:, None]
  return jnp.where(onehot, jnp.asarray(rewards, jnp.float32)[:, None], 0.0)


def outcome_advantages(config: PolicyGradientConfig, rewards: jax.Array, group_ids: jax.Array,
                       num_searches: jax.Array) -> jax.Array:
  """Per-episode advantages of `config.advantage` (any name but "gae").

  Args:
    config: selects the estimator and its options.
    rewards: [N] float episode rewards.
    group_ids: [N] int, rows answering the same question share an id.
    num_searches: [N] int search calls per episode (the strata of "stratified").

  Returns:
    [N] float32 advantages.

  Example:
    >>> adv = outcome_advantages(PolicyGradientConfig(advantage="rloo"), jnp.array([1., 0.]),
    ...                          jnp.array([0, 0]), jnp.array([1, 2]))   # [1, -1]
  """
  if config.advantage == GAE:
    raise ValueError("advantage='gae' needs a critic: use make_gae_fn")
  inputs = {"rewards": rewards, "group_ids": group_ids, "strata": num_searches}
  return call_with_inputs(losses.ADVANTAGES.get(config.advantage), inputs,
                          config.advantage_options)


def batch_statistics(rewards: jax.Array, group_ids: jax.Array, mask: jax.Array) -> Metrics:
  """Telemetry of a rollout batch that no update changes.

  Args:
    rewards: [N] float, group_ids: [N] int, mask: [N, T] bool policy tokens.

  Returns:
    {"zero_var_frac": fraction of groups whose rewards are all equal,
     "response_length": mean policy tokens per episode, "reward_std": std of the rewards}.

  Example:
    >>> s = batch_statistics(jnp.array([1., 1., 0., 1.]), jnp.array([0, 0, 1, 1]),
    ...                      jnp.ones([4, 3], bool))   # zero_var_frac .5, response_length 3
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  return {
      "zero_var_frac": losses.zero_variance_fraction(rewards, group_ids),
      "response_length": jnp.mean(jnp.sum(jnp.asarray(mask, jnp.float32), axis=1)),
      "reward_std": jnp.std(rewards),
  }


def micro_batches(tree: PyTree, num: int) -> PyTree:
  """Splits every leaf `[N, ...]` into `[num, N // num, ...]`, micro-batch k holding rows
  k, k + num, k + 2 num, ... (strided: with rows sharded over the batch axes, every
  micro-batch keeps rows on every shard, so no data moves between devices)."""
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"{x.shape[0]} rows cannot be split into {num} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, tree)


def _rows(tree: PyTree) -> int:
  return jax.tree.leaves(tree)[0].shape[0]


Trainable = Callable[[tuple[str, ...]], bool]


def partition_trainable(params: PyTree, trainable: Trainable
                        ) -> tuple[dict, Callable[..., PyTree]]:
  """Splits a parameter tree into its trained leaves and a function that puts it back.

  Args:
    params: nested dicts of arrays (a `FrozenDict` too).
    trainable: `(path of keys) -> bool`.

  Returns:
    `(trained, rebuild)`: `trained` maps each trained leaf's path (a tuple of keys) to the
    leaf; `rebuild(trained_like, frozen=None)` is the tree of `params` with those leaves
    replaced by `trained_like`'s and the frozen ones by `frozen(leaf)` (None: the leaf).

  Raises:
    ValueError: no leaf is trainable.

  Example:
    >>> trained, rebuild = partition_trainable(params, lora.is_adapter_path)
    >>> zero_base_grads = rebuild(adapter_grads, frozen=jnp.zeros_like)
  """
  flat = traverse_util.flatten_dict(params)
  trained = {k: v for k, v in flat.items() if trainable(k)}
  if not trained:
    raise ValueError("no parameter is trainable: the `trainable` predicate accepted none of "
                     f"the {len(flat)} leaves (e.g. {next(iter(flat), None)})")

  def rebuild(trained_like: dict, frozen: Callable[[jax.Array], jax.Array] | None = None):
    tree = traverse_util.unflatten_dict(
        {k: trained_like[k] if k in trained else (v if frozen is None else frozen(v))
         for k, v in flat.items()})
    return flax_core.freeze(tree) if isinstance(params, flax_core.FrozenDict) else tree

  return trained, rebuild


def accumulate_gradients(loss_fn: Callable, params: PyTree, batch: PyTree, *,
                         micro_batch_size: int, weights_fn: Callable[[PyTree], jax.Array],
                         trainable: Trainable | None = None):
  """`jax.value_and_grad(loss_fn, has_aux=True)(params, batch)`, computed over micro-batches.

  The micro-batches go through one `lax.scan` (one forward + backward live at a time); their
  losses and gradients are summed with `weights_fn(micro)` (`micro`: the batch split by
  `micro_batches`, leaves `[M, N / M, ...]` -> `[M]` weights), which must make the weighted
  sum equal the full-batch loss: each micro-batch's share of the loss's normaliser (its
  counted tokens or rows over the whole batch's; 1 for a sum over a constant). The gradient
  is then exactly the full-batch gradient (up to float reassociation). Aux metrics are
  averaged with the normalised weights, except keys ending in "_min" / "_max" (min / max
  over the micro-batches with weight > 0).

  Args:
    loss_fn: `(params, batch) -> (loss [], aux dict)`.
    params: the parameters differentiated.
    batch: a pytree of arrays with rows first, `N` rows.
    micro_batch_size: rows per micro-batch; 0 (or >= N) is one pass over the whole batch.
    weights_fn: see above.
    trainable: `(path of keys) -> bool`, the leaves that are trained (LoRA:
      `lora.is_adapter_path`, as the optimizer's `optim.train_only`); None: all. Only those
      are differentiated and accumulated: a frozen leaf gets a zero gradient that is never
      computed, so neither its gradient nor a float32 accumulator of its size is held.

  Returns:
    `((loss, aux), grads)`, as `jax.value_and_grad(..., has_aux=True)` (frozen leaves: 0).

  Example:
    >>> (loss, aux), grads = accumulate_gradients(
    ...     loss_fn, params, batch, micro_batch_size=8,
    ...     weights_fn=lambda mb: token_shares(mb.loss_mask))
  """
  if trainable is not None:
    trained, rebuild = partition_trainable(params, trainable)
    (loss, aux), grads = accumulate_gradients(
        lambda t, b: loss_fn(rebuild(t), b), trained, batch,
        micro_batch_size=micro_batch_size, weights_fn=weights_fn)
    return (loss, aux), rebuild(grads, frozen=jnp.zeros_like)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  n = _rows(batch)
  if not micro_batch_size or micro_batch_size >= n:
    return grad_fn(params, batch)
  if n % micro_batch_size:
    raise ValueError(f"micro_batch_size ({micro_batch_size}) must divide the batch's {n} rows")
  micro = micro_batches(batch, n // micro_batch_size)
  weights = jnp.asarray(weights_fn(micro), jnp.float32)                    # [M]
  metric_w = weights / jnp.maximum(jnp.sum(weights), 1e-30)
  (_, aux_shape), _ = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))

  def init(key, leaf):
    fill = jnp.inf if key.endswith("_min") else -jnp.inf if key.endswith("_max") else 0.0
    return jnp.full(leaf.shape, fill, leaf.dtype)

  def body(carry, xs):
    loss_acc, aux_acc, grad_acc = carry
    mb, w, mw = xs
    (loss, aux), grads = grad_fn(params, mb)
    grad_acc = jax.tree.map(lambda a, g: a + w * g.astype(a.dtype), grad_acc, grads)
    live = w > 0
    aux_acc = {k: (jnp.where(live, jnp.minimum(v, aux[k]), v) if k.endswith("_min") else
                   jnp.where(live, jnp.maximum(v, aux[k]), v) if k.endswith("_max") else
                   v + mw * aux[k]) for k, v in aux_acc.items()}
    return (loss_acc + w * loss, aux_acc, grad_acc), None

  # The sum is kept in float32 whatever the parameters' dtype (bfloat16 gradients summed in
  # bfloat16 lose the small micro-batches' share), and handed back in the dtype a one-pass
  # gradient has: the parameters'.
  carry = (jnp.zeros([], jnp.float32), {k: init(k, v) for k, v in aux_shape.items()},
           jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                        params))
  (loss, aux, grads), _ = jax.lax.scan(body, carry, (micro, weights, metric_w))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  aux = {k: (jnp.where(jnp.isfinite(v), v, 0.0) if k.endswith(("_min", "_max")) else v)
         for k, v in aux.items()}
  return (loss, aux), grads


def token_shares(mask: jax.Array) -> jax.Array:
  """`[M, n, T]` mask -> `[M]`: each micro-batch's share of the counted tokens (the weights
  of a token-mean loss)."""
  counts = jnp.sum(jnp.asarray(mask, jnp.float32), axis=(1, 2))
  return counts / jnp.maximum(jnp.sum(counts), 1.0)


def agg_shares(mask: jax.Array, agg: str) -> jax.Array:
  """The micro-batch weights of `losses.aggregate(x, mask, agg)` (`[M, n, T]` mask -> `[M]`):
  token shares for "token-mean", shares of the rows with a counted token for the
  "seq-mean-*" means, 1 each for "seq-mean-token-sum-norm" (a sum over a constant)."""
  if agg == "token-mean":
    return token_shares(mask)
  if agg == "seq-mean-token-sum-norm":
    return jnp.ones(mask.shape[:1], jnp.float32)
  rows = jnp.sum(jnp.any(mask, axis=-1).astype(jnp.float32), axis=1)
  return rows / jnp.maximum(jnp.sum(rows), 1.0)


def make_sft_update_fn(apply_fn: Callable, *, micro_batch_size: int = 0,
                       score_fn: ScoreFn | None = None, trainable: Trainable | None = None,
                       ) -> Callable[[TrainState, SequenceBatch], tuple[TrainState, Metrics]]:
  """Teacher-forced cross-entropy on the tokens of `batch.loss_mask`.

  The loss and metrics of `losses.cross_entropy_loss` ("nll", "token_accuracy"), read from
  the policy's `TokenScores`.

  Args:
    apply_fn: `apply_fn({"params": params}, tokens) -> logits [N, T, V]`.
    micro_batch_size: rows per micro-batch (gradient accumulation, `accumulate_gradients`);
      0: the whole batch at once.
    score_fn: how to score the tokens (`ScoreFn`); None: `logits_score_fn(apply_fn)`.
    trainable: the trained leaves (`accumulate_gradients`; LoRA: `lora.is_adapter_path`);
      None: all.

  Returns:
    `update_fn(state, batch: SequenceBatch) -> (state, metrics)`, pure.
  """
  score_fn = score_fn or logits_score_fn(apply_fn)

  def loss_fn(params, batch: SequenceBatch):
    scores = score_fn({"params": params}, batch.tokens[:, :-1], batch.tokens[:, 1:])
    mask = jnp.asarray(batch.loss_mask[:, 1:]).astype(bool)
    loss = losses.masked_mean(-scores.logp, mask)
    return loss, {"nll": jax.lax.stop_gradient(loss),
                  "token_accuracy": losses.masked_mean(scores.top1.astype(jnp.float32), mask)}

  def update_fn(state: TrainState, batch: SequenceBatch):
    (loss, aux), grads = accumulate_gradients(
        loss_fn, state.params, batch, micro_batch_size=micro_batch_size,
        weights_fn=lambda mb: token_shares(mb.loss_mask[:, :, 1:]), trainable=trainable)
    return state.apply_gradients(grads), {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

  return update_fn


def make_policy_loss_fn(apply_fn: Callable, config: PolicyGradientConfig, *,
                        norm_length: int | float | None = None,
                        score_fn: ScoreFn | None = None):
  """The policy objective (module docstring) as a function of the parameters.

  One forward pass gives the sampled tokens' log-probs and the entropy (the telemetry, and
  the bonus when `entropy_coef > 0`), as the policy's `TokenScores`.

  Args:
    apply_fn: `apply_fn({"params": params}, tokens) -> logits [N, T, V]`.
    config: the algorithm.
    norm_length: divisor of agg="seq-mean-token-sum-norm" (None: the batch width T;
      `config.norm_length` wins when > 0).
    score_fn: how to score the tokens (`ScoreFn`); None: `logits_score_fn(apply_fn)`.

  Returns:
    `loss_fn(params, batch: PolicyGradientBatch) -> (loss [], metrics)`, pure. Metrics:
    `losses.grpo_loss`'s (pg_loss, kl, clip_frac, ratio_min / max / mean, approx_kl,
    dual_clip_frac), "entropy" (mean over policy tokens), "adv_mean" / "adv_std" (over
    policy tokens) and, with LLDS, "llds" and its `llds_*` diagnostics.
  """
  norm = config.norm_length or norm_length
  score_fn = score_fn or logits_score_fn(apply_fn)

  def loss_fn(params, batch: PolicyGradientBatch):
    mask = jnp.asarray(batch.policy_mask, bool)
    scores = score_fn({"params": params}, batch.tokens[:, :-1], batch.tokens[:, 1:])
    logp = jnp.pad(scores.logp, ((0, 0), (1, 0)))                           # [N, T]
    loss, metrics = losses.grpo_loss(
        logp, batch.old_logp, batch.ref_logp, batch.advantages, mask,
        clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high, kl_coef=config.kl_coef,
        kl_kind=config.kl_kind, agg=config.agg, dual_clip=config.dual_clip,
        ratio_level=config.ratio_level, norm_length=norm, policy_loss=config.policy_loss)
    # Entropy of the distribution each policy token was drawn from (column t: given < t).
    entropy = scores.entropy if config.entropy_coef else jax.lax.stop_gradient(scores.entropy)
    entropy = jnp.pad(entropy, ((0, 0), (1, 0)))                              # [N, T]
    if config.entropy_coef:
      loss = loss - config.entropy_coef * losses.aggregate(entropy, mask, config.agg,
                                                           norm_length=norm)
    adv = jnp.broadcast_to(jnp.asarray(batch.advantages, jnp.float32).reshape(
        mask.shape[0], -1), mask.shape)                                        # [N, T]
    if config.llds_coef:
      old = jax.lax.stop_gradient(logp) if batch.old_logp is None else batch.old_logp
      rows = None
      if config.llds_preserve == "nonnegative":
        rows = losses.masked_mean(adv, mask, axis=1) >= 0                     # [N]
      penalty, llds_metrics = losses.REGULARIZERS.get("llds")(
          logp, old, mask, rows=rows, agg=config.agg, norm_length=norm)
      loss = loss + config.llds_coef * penalty
      metrics.update(llds_metrics, llds=jax.lax.stop_gradient(penalty))
    adv_mean = losses.masked_mean(adv, mask)
    metrics.update(
        entropy=jax.lax.stop_gradient(losses.masked_mean(entropy, mask)),
        adv_mean=adv_mean,
        adv_std=jnp.sqrt(losses.masked_mean(jnp.square(adv - adv_mean), mask)))
    return loss, metrics

  return loss_fn


def make_policy_update_fn(apply_fn: Callable, config: PolicyGradientConfig, *,
                          norm_length: int | float | None = None,
                          score_fn: ScoreFn | None = None,
                          trainable: Trainable | None = None,
                          ) -> Callable[[TrainState, PolicyGradientBatch],
                                        tuple[TrainState, Metrics]]:
  """One optimizer step on the policy objective (`make_policy_loss_fn`, same arguments;
  `trainable`: the trained leaves, `accumulate_gradients`; None: all).

  Returns:
    `update_fn(state, batch: PolicyGradientBatch) -> (state, metrics)`, pure; metrics add
    "loss" and "grad_norm" to the loss's.

  Example:
    >>> update = jax.jit(make_policy_update_fn(apply_fn, PolicyGradientConfig()), donate_argnums=0)
  """
  loss_fn = make_policy_loss_fn(apply_fn, config, norm_length=norm_length, score_fn=score_fn)

  def update_fn(state: TrainState, batch: PolicyGradientBatch):
    (loss, aux), grads = accumulate_gradients(
        loss_fn, state.params, batch, micro_batch_size=config.micro_batch_size,
        weights_fn=lambda mb: agg_shares(mb.policy_mask, config.agg), trainable=trainable)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    return state.apply_gradients(grads), metrics

  return update_fn


# The names the GRPO-only version of this module had.
make_grpo_loss_fn = make_policy_loss_fn
make_grpo_update_fn = make_policy_update_fn


def make_critic(model_config: TransformerConfig, head: ValueHeadConfig = ValueHeadConfig(),
                ) -> tuple[ValueModel, Callable]:
  """The PPO critic model and its apply function (`(variables, tokens) -> values [N, T]`)."""
  critic = ValueModel(model_config, head)

  def value_apply_fn(variables, tokens):
    return critic.apply(variables, tokens)

  return critic, value_apply_fn


def init_critic_params(critic: ValueModel, policy_params: PyTree, rng: jax.Array, *,
                       init_rows: int = 1) -> tuple[PyTree, PyTree]:
  """The critic's parameters: the policy's transformer as trunk, a freshly initialised head.

  Args:
    critic: a `ValueModel` whose trunk config matches the policy's.
    policy_params: the (warm-started) policy's `Transformer` parameters; copied, so the
      critic's buffers can be donated without touching them.
    rng: initialises the value head.
    init_rows: rows of the shape-only init batch (make it divisible by the mesh's batch
      shards when called under a mesh).

  Returns:
    `(params, logical_specs)`: {"trunk": ..., "value_head": {"kernel", "bias"}} and their
    logical axis names.

  Example:
    >>> critic, value_apply_fn = make_critic(model_config)
    >>> params, specs = init_critic_params(critic, sft_params, jax.random.key(0))
  """
  abstract = jax.eval_shape(critic.init, rng, jnp.zeros((init_rows, 8), jnp.int32))["params"]
  specs = nn.get_partition_spec(abstract)
  params = load_trunk(_unbox(abstract), policy_params)
  head = ValueHead(critic.head, param_dtype=critic.config.params_dtype).init(
      rng, jnp.zeros((1, critic.config.d_model), jnp.float32))["params"]
  params["value_head"] = _unbox(head)
  return jax.tree.map(jnp.copy, params), specs


def _unbox(tree: PyTree) -> PyTree:
  """Strips logical-axis boxes without a sharding constraint (abstract leaves under a mesh)."""
  return jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x, tree,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def make_gae_fn(value_apply_fn: Callable, config: CriticConfig):
  """PPO advantages: critic values, the outcome reward on the last policy token, GAE, whitening.

  Returns:
    `gae_fn(critic_params, tokens [N, T], mask [N, T], rewards [N]) -> (advantages [N, T],
    returns [N, T], values [N, T])`, pure: `values` are the rollout-time values (the value
    loss clips around them), `returns` the lambda-returns the critic regresses, advantages
    whitened over the policy tokens when `config.whiten_advantages`. All are 0 off the mask.

  Example:
    >>> adv, ret, v = jax.jit(make_gae_fn(value_apply_fn, CriticConfig()))(
    ...     critic_params, tokens, mask, rewards)
  """

  def gae_fn(critic_params, tokens, mask, rewards):
    mask = jnp.asarray(mask, bool)
    values = token_values(value_apply_fn, critic_params, tokens)
    adv, returns = losses.gae(outcome_token_rewards(rewards, mask), values, mask,
                              gamma=config.gamma, lam=config.lam)
    if config.whiten_advantages:
      adv = losses.masked_whiten(adv, mask)
    return adv, returns, jnp.where(mask, values, 0.0)

  return gae_fn


def make_critic_update_fn(value_apply_fn: Callable, config: CriticConfig, *,
                          micro_batch_size: int = 0,
                          ) -> Callable[[TrainState, CriticBatch], tuple[TrainState, Metrics]]:
  """One optimizer step on the clipped value loss over the policy tokens.

  Args:
    value_apply_fn / config: the critic.
    micro_batch_size: rows per micro-batch (`accumulate_gradients`; 0: the whole batch).

  Returns:
    `update_fn(state, batch: CriticBatch) -> (state, metrics)`, pure; metrics
    "value_loss", "value_grad_norm", "vf_clipfrac", "vpred_mean" and "explained_variance"
    (of the values before this step).

  Example:
    >>> update = jax.jit(make_critic_update_fn(value_apply_fn, CriticConfig()))
  """

  def loss_fn(params, batch: CriticBatch):
    values = token_values(value_apply_fn, params, batch.tokens)
    return losses.value_loss(values, batch.old_values, batch.returns, batch.mask,
                             clip=config.value_clip)

  def update_fn(state: TrainState, batch: CriticBatch):
    (loss, aux), grads = accumulate_gradients(
        loss_fn, state.params, batch, micro_batch_size=micro_batch_size,
        weights_fn=lambda mb: token_shares(mb.mask))
    return state.apply_gradients(grads), {"value_loss": loss,
                                          "value_grad_norm": optax.tree.norm(grads), **aux}

  return update_fn

