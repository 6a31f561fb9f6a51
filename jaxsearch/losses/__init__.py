"""Pure, jittable RL and supervised losses: import these into any JAX project.

Example:
  >>> from jaxsearch import losses
  >>> adv = losses.grpo_advantages(rewards, group_ids)                 # [N]
  >>> loss, aux = losses.grpo_loss(logp, old_logp, ref_logp, adv, mask, kl_coef=0.04)
"""
from jaxsearch.losses.advantages import ADVANTAGES, drgrpo_advantages, grpo_advantages
from jaxsearch.losses.policy import (AGG_MODES, KL_KINDS, aggregate, cross_entropy_loss,
                                     grpo_loss, kl_penalty, masked_mean, masked_sum,
                                     ppo_policy_loss, token_logprobs)

__all__ = [
    "ADVANTAGES", "AGG_MODES", "KL_KINDS", "aggregate", "cross_entropy_loss", "drgrpo_advantages",
    "grpo_advantages", "grpo_loss", "kl_penalty", "masked_mean", "masked_sum", "ppo_policy_loss",
    "token_logprobs",
]
