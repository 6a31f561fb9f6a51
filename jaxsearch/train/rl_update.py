"""One pure RL update: `(rl_state, batch) -> (rl_state, metrics)`, jitted once.

Everything one RL step does after the rollout is one function, so it compiles to one XLA
program with explicit in / out shardings (`jit_rl_update`):

  1. batch telemetry (`steps.batch_statistics`);
  2. advantages: an outcome estimator of `losses.ADVANTAGES` ([N]), or PPO's GAE from the
     critic ([N, T]), which is then updated `updates_per_batch` times (a `lax.scan`);
  3. reference log-probs (the frozen warm start, when `kl_coef > 0`) and behaviour log-probs
     (the policy before this step's updates, when `updates_per_batch > 1`);
  4. `updates_per_batch` policy updates (a `lax.scan`), each over micro-batches with gradient
     accumulation when `micro_batch_size` is set (`steps.accumulate_gradients`).

The state holds the policy's train state, the optional critic's, and the reference
parameters; PPO's critic warm-up (`train_policy=False`) is a static argument, so the same
jitted function serves both kinds of step. Metrics: the telemetry, the first critic update's
(measured on the values the advantages came from), `critic_warmup`, and the last policy
update's.

Example:
  >>> update = jit_rl_update(make_rl_update_fn(apply_fn, PolicyGradientConfig()), mesh,
  ...                        state_shardings)
  >>> rl_state, metrics = update(rl_state, batch)
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxsearch import losses
from jaxsearch.train import sharding
from jaxsearch.train.state import TrainState
from jaxsearch.train.steps import (CriticBatch, CriticConfig, Metrics, PolicyGradientBatch,
                                   PolicyGradientConfig, ScoreFn, Trainable, batch_statistics,
                                   make_critic_update_fn, make_gae_fn, make_policy_update_fn,
                                   outcome_advantages, sequence_logprobs)
from jaxsearch.types import PyTree


class RLBatch(NamedTuple):
  """What one RL update needs of a scored rollout (host or device arrays)."""

  tokens: jax.Array        # [N, T] int32, whole episodes
  policy_mask: jax.Array   # [N, T] bool, the policy's tokens
  rewards: jax.Array       # [N] float32 episode rewards
  group_ids: jax.Array     # [N] int32, rows of one question share an id
  num_searches: jax.Array  # [N] int32 search calls per episode (strata of "stratified")


class RLState(struct.PyTreeNode):
  """Everything an RL update reads and writes."""

  policy: TrainState              # the policy being trained
  critic: TrainState | None       # PPO's critic (None for outcome estimators)
  ref_params: PyTree | None       # frozen KL reference (None when kl_coef == 0)


def make_rl_update_fn(apply_fn: Callable, config: PolicyGradientConfig, *,
                      critic: CriticConfig | None = None,
                      value_apply_fn: Callable | None = None,
                      norm_length: int | float | None = None,
                      reference_params: Callable[[PyTree, PyTree], PyTree] | None = None,
                      score_fn: ScoreFn | None = None,
                      trainable: Trainable | None = None,
                      ) -> Callable[..., tuple[RLState, Metrics]]:
  """The RL step of `config` as one pure function.

  Args:
    apply_fn: the policy, `apply_fn({"params": p}, tokens [N, T]) -> logits [N, T, V]`.
    config: the algorithm.
    critic: PPO's critic config (needed with `advantage="gae"`).
    value_apply_fn: the critic, `(variables, tokens) -> values [N, T]`.
    norm_length: divisor of agg="seq-mean-token-sum-norm" (`config.norm_length` wins).
    reference_params: `(policy params, rl_state.ref_params) -> the KL reference's parameters`;
      None: `rl_state.ref_params` is the whole frozen reference. LoRA keeps only the
      reference's adapters in the state and joins them with the policy's frozen base (one copy
      of the base weights).
    score_fn: how the policy scores tokens (`steps.ScoreFn`, e.g. `Experiment.score_fn`
      with chunked logits); None: from `apply_fn`'s logits. The behaviour and reference
      log-prob passes run `config.micro_batch_size` rows at a time, as the updates.
    trainable: the policy's trained leaves (`steps.accumulate_gradients`; LoRA:
      `lora.is_adapter_path`, so no gradient of the frozen base is computed); None: all.

  Returns:
    `update_fn(rl_state, batch: RLBatch, train_policy: bool = True) -> (rl_state, metrics)`;
    `train_policy=False` (PPO's critic warm-up) leaves the policy untouched.
  """
  if config.uses_critic and (critic is None or value_apply_fn is None):
    raise ValueError("PolicyGradientConfig.advantage='gae' (PPO) needs a critic config and a "
                     "value apply function")
  policy_update = make_policy_update_fn(apply_fn, config, norm_length=norm_length,
                                       score_fn=score_fn, trainable=trainable)
  logprobs = functools.partial(sequence_logprobs, apply_fn, score_fn=score_fn,
                               micro_batch_size=config.micro_batch_size)
  if config.uses_critic:
    gae_fn = make_gae_fn(value_apply_fn, critic)
    critic_update = make_critic_update_fn(value_apply_fn, critic,
                                          micro_batch_size=config.micro_batch_size)

  def repeat(update, state, batch):
    """`updates_per_batch` updates on one batch: (state, stacked metrics [U, ...])."""
    return jax.lax.scan(lambda s, _: update(s, batch), state, None,
                        length=config.updates_per_batch)

  def update_fn(rl_state: RLState, batch: RLBatch, train_policy: bool = True):
    metrics = dict(batch_statistics(batch.rewards, batch.group_ids, batch.policy_mask))
    critic_state = rl_state.critic
    if config.uses_critic:
      adv, returns, values = gae_fn(critic_state.params, batch.tokens, batch.policy_mask,
                                    batch.rewards)
      critic_state, cm = repeat(critic_update, critic_state,
                                CriticBatch(batch.tokens, batch.policy_mask, values, returns))
      metrics.update(jax.tree.map(lambda x: x[0], cm))   # on the rollout-time values
    else:
      adv = outcome_advantages(config, batch.rewards, batch.group_ids, batch.num_searches)
    metrics["critic_warmup"] = jnp.asarray(0.0 if train_policy else 1.0)
    policy = rl_state.policy
    if train_policy:
      ref = rl_state.ref_params
      if reference_params is not None and ref is not None:
        ref = reference_params(policy.params, ref)
      ref_logp = logprobs(ref, batch.tokens) if config.kl_coef else None
      old_logp = logprobs(policy.params, batch.tokens) if config.needs_old_logp else None
      before = old_logp
      if config.track_likelihood and before is None:
        before = logprobs(policy.params, batch.tokens)
      pg_batch = PolicyGradientBatch(batch.tokens, batch.policy_mask, adv, old_logp, ref_logp)
      policy, pm = repeat(policy_update, policy, pg_batch)
      metrics.update(jax.tree.map(lambda x: x[-1], pm))   # after the last update
      if config.track_likelihood:
        metrics.update(likelihood_change(before, logprobs(policy.params, batch.tokens),
                                         batch.policy_mask, adv))
    return rl_state.replace(policy=policy, critic=critic_state), metrics

  return update_fn


def likelihood_change(before: jax.Array, after: jax.Array, mask: jax.Array,
                      advantages: jax.Array) -> Metrics:
  """How an update moved the log-likelihood of the batch's own (sampled) tokens.

  Args:
    before, after: [N, T] log-probs of the tokens under the policy before / after the step.
    mask: [N, T] bool, the policy's tokens.
    advantages: [N] (per episode) or [N, T] (per token; an episode's sign is its mean's).

  Returns:
    "logp_change" (mean over policy tokens of after - before), "logp_change_pos" /
    "logp_change_neg" (the same over episodes with advantage > 0 / < 0; 0 where none), and
    "logp_before" (mean log-likelihood per policy token before the step). A step that lowers
    the likelihood of the episodes it rewards (logp_change_pos < 0) displaces probability
    mass to tokens the batch never wrote: the likelihood displacement that precedes
    collapse in GRPO-style training.
  """
  mask = jnp.asarray(mask, bool)
  delta = after - before
  adv = jnp.asarray(advantages, jnp.float32)
  if adv.ndim == 2:
    adv = losses.masked_mean(adv, mask, axis=1)
  pos, neg = mask & (adv > 0)[:, None], mask & (adv < 0)[:, None]
  return {"logp_change": losses.masked_mean(delta, mask),
          "logp_change_pos": losses.masked_mean(delta, pos),
          "logp_change_neg": losses.masked_mean(delta, neg),
          "logp_before": losses.masked_mean(before, mask)}


def jit_rl_update(update_fn: Callable, mesh, state_shardings: RLState | None = None):
  """Jits `update_fn` once: the state keeps its shardings and is donated, the batch is split
  over the batch axes, metrics are replicated; `train_policy` is static. Without a mesh
  (single-device tests) the layout is left to XLA."""
  if mesh is None or state_shardings is None:
    return jax.jit(update_fn, donate_argnums=0, static_argnums=2)
  return jax.jit(update_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.state_and_metrics_shardings(state_shardings, mesh),
                 donate_argnums=0, static_argnums=2)


def rl_flops_per_token(config: PolicyGradientConfig, model_config: Any, width: int, *,
                       train_policy: bool = True) -> float:
  """Model FLOPs per episode token of one RL update plus the rollout that produced it.

  Forward passes: the rollout's decode, the reference and behaviour log-probs when the
  loss needs them, the log-probs after the step (`track_likelihood`), PPO's value pass; forward + backward: each policy (and critic) update.
  The critic is counted as the policy's size (same trunk). `width` is the padded length
  the attention term uses.
  """
  fwd = sharding.transformer_flops_per_token(model_config, width, backward=False)
  train = sharding.transformer_flops_per_token(model_config, width)
  forwards = 1 + (train_policy and bool(config.kl_coef)) + (train_policy and config.needs_old_logp)
  if train_policy and config.track_likelihood:   # the log-probs after the step (and before)
    forwards += 1 + (not config.needs_old_logp)
  updates = config.updates_per_batch if train_policy else 0
  if config.uses_critic:
    forwards += 1
    updates += config.updates_per_batch
  return forwards * fwd + updates * train
