"""Pure update steps: supervised warm start and GRPO. The caller jits and shards them."""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsearch import losses
from jaxsearch.losses.policy import AGG_MODES, KL_KINDS
from jaxsearch.train.state import TrainState
from jaxsearch.types import PyTree, SequenceBatch

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
  """GRPO hyperparameters.

  Attributes:
    prompts_per_step: B, questions per update.
    num_generations: G, episodes sampled per question (N = B * G rows).
    clip_eps: PPO ratio clipping range.
    kl_coef: weight of KL(policy || reference), k3 estimator by default.
    kl_kind: one of `losses.policy.KL_KINDS`.
    agg: loss aggregation, one of `losses.policy.AGG_MODES`.
    advantage_scale: "group" (GRPO), "batch", or "none" (Dr. GRPO).
    updates_per_batch: optimizer steps on each rollout batch (1 is exactly on-policy).
  """

  prompts_per_step: int = 8
  num_generations: int = 8
  clip_eps: float = 0.2
  kl_coef: float = 0.04
  kl_kind: str = "low_var_kl"
  agg: str = "token-mean"
  advantage_scale: str = "group"
  updates_per_batch: int = 1

  def __post_init__(self):
    if self.num_generations < 2:
      raise ValueError(f"GRPOConfig.num_generations must be >= 2, got {self.num_generations}")
    for name in ("prompts_per_step", "updates_per_batch"):
      if getattr(self, name) < 1:
        raise ValueError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.kl_kind not in KL_KINDS:
      raise ValueError(f"GRPOConfig.kl_kind must be one of {KL_KINDS}, got {self.kl_kind!r}")
    if self.agg not in AGG_MODES:
      raise ValueError(f"GRPOConfig.agg must be one of {AGG_MODES}, got {self.agg!r}")
    if self.advantage_scale not in ("group", "batch", "none"):
      raise ValueError("GRPOConfig.advantage_scale must be 'group', 'batch' or 'none', got "
                       f"{self.advantage_scale!r}")

  @property
  def rows(self) -> int:
    return self.prompts_per_step * self.num_generations


class PolicyGradientBatch(NamedTuple):
  """One GRPO update's inputs."""

  tokens: jax.Array        # [N, T] int32, whole episodes
  policy_mask: jax.Array   # [N, T] bool, tokens the policy sampled (trained)
  advantages: jax.Array    # [N] float32
  old_logp: jax.Array | None  # [N, T] float32 behaviour log-probs; None: on-policy (ratio 1)
  ref_logp: jax.Array | None  # [N, T] float32 reference log-probs; None when kl_coef == 0


def sequence_logprobs(apply_fn: Callable, params: PyTree, tokens: jax.Array) -> jax.Array:
  """Log-probability of each token given the ones before it.

  Args:
    apply_fn: `apply_fn({"params": params}, tokens [N, T]) -> logits [N, T, V]`.
    params: model parameters.
    tokens: [N, T] int32.

  Returns:
    [N, T] float32; column 0 (nothing predicts it) is 0.
  """
  logits = apply_fn({"params": params}, tokens[:, :-1])
  logp = losses.token_logprobs(logits, tokens[:, 1:])
  return jnp.pad(logp, ((0, 0), (1, 0)))


def make_sft_update_fn(apply_fn: Callable) -> Callable[[TrainState, SequenceBatch], tuple[TrainState, Metrics]]:
  """Teacher-forced cross-entropy on the tokens of `batch.loss_mask`.

  Returns:
    `update_fn(state, batch: SequenceBatch) -> (state, metrics)`, pure.
  """

  def loss_fn(params, batch: SequenceBatch):
    logits = apply_fn({"params": params}, batch.tokens[:, :-1])
    return losses.cross_entropy_loss(logits, batch.tokens[:, 1:], batch.loss_mask[:, 1:])

  def update_fn(state: TrainState, batch: SequenceBatch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    return state.apply_gradients(grads), {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}

  return update_fn


def make_grpo_loss_fn(apply_fn: Callable, config: GRPOConfig):
  """The GRPO objective as a function of the parameters.

  Returns:
    `loss_fn(params, batch: PolicyGradientBatch) -> (loss [], metrics)`, pure.
  """

  def loss_fn(params, batch: PolicyGradientBatch):
    logp = sequence_logprobs(apply_fn, params, batch.tokens)
    return losses.grpo_loss(
        logp, batch.old_logp, batch.ref_logp, batch.advantages, batch.policy_mask,
        clip_eps=config.clip_eps, kl_coef=config.kl_coef, kl_kind=config.kl_kind, agg=config.agg)

  return loss_fn


def make_grpo_update_fn(apply_fn: Callable, config: GRPOConfig
                        ) -> Callable[[TrainState, PolicyGradientBatch], tuple[TrainState, Metrics]]:
  """One clipped-surrogate GRPO step with a KL penalty to the reference policy.

  Returns:
    `update_fn(state, batch: PolicyGradientBatch) -> (state, metrics)`, pure.
  """
  loss_fn = make_grpo_loss_fn(apply_fn, config)

  def update_fn(state: TrainState, batch: PolicyGradientBatch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    return state.apply_gradients(grads), {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}

  return update_fn
