"""Sharded GRPO / PPO updates and sampling equal the single-device ones (issue 5, acceptance 1).

For each mesh (data, fsdp, tensor) of 8 fake CPU devices the policy is created with
`sharding.sharded_init` (optimizer state born sharded), the PPO critic with
`sharding.sharded_train_state`, and every step is compiled with `sharding.jit_sharded` (in/out
shardings, the state donated). The reference is the same step jitted on one device, from
the same initial values. Optimizer: SGD with momentum (linear in the gradient, so a 1e-5
parameter tolerance checks the gradient; Adam's first step is ~lr * sign(g) and would
amplify float noise in near-zero gradients).

(2, 2, 2) runs by default; the other meshes of the acceptance list are `slow`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized
from flax import linen as nn

from jaxsearch.models.transformer import Transformer, TransformerConfig, init_cache, make_decode_fn
from jaxsearch.rollout.sampler import SamplerConfig, left_pad, make_sampler
from jaxsearch.train import sharding
from jaxsearch.train.state import TrainState
from jaxsearch.train.steps import (CriticBatch, CriticConfig, PolicyGradientConfig, PolicyGradientBatch,
                                   init_critic_params, make_critic, make_critic_update_fn,
                                   make_gae_fn, make_policy_update_fn)

# One layer: sharding is the same in every layer, and each compile is about half as long.
CFG = TransformerConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=8, num_kv_heads=4,
                        mlp_dim=64, max_len=32)
MODEL = Transformer(CFG)
N, T = 8, 12                                      # rows (divisible by data x fsdp), width
GRPO = PolicyGradientConfig(prompts_per_step=2, num_generations=4, kl_coef=0.04, entropy_coef=0.01)
PPO = PolicyGradientConfig(prompts_per_step=2, num_generations=4, advantage="gae", kl_coef=0.0)
CRITIC = CriticConfig()
TX = optax.sgd(0.5, momentum=0.9)
SAMPLER = SamplerConfig(max_new_tokens=8, temperature=1.0, top_k=20, num_samples=2)

DEFAULT_MESH = (2, 2, 2)                          # every rule of the table is exercised
SLOW_MESHES = ((8, 1, 1), (2, 4, 1), (1, 2, 4))


def apply_fn(variables, tokens):
  return MODEL.apply(variables, tokens)


def init_fn(rng):
  """The policy's TrainState from BOXED parameters (what `sharded_init` expects)."""
  params = MODEL.init(rng, jnp.zeros((N, T), jnp.int32))["params"]
  return TrainState.create(apply_fn=apply_fn, params=params, tx=TX)


def _data():
  """Host (numpy) inputs: episodes, their policy masks, rewards, advantages, prompts."""
  rng = np.random.default_rng(7)
  tokens = rng.integers(1, CFG.vocab_size, (N, T)).astype(np.int32)
  policy_mask = (np.arange(T)[None, :] >= 4) & (rng.random((N, T)) < 0.9)
  rewards = rng.random(N).astype(np.float32)
  advantages = rng.normal(size=N).astype(np.float32)
  ref_logp = np.log(rng.uniform(0.05, 0.5, (N, T))).astype(np.float32)
  prompts, prompt_mask = left_pad(rng.integers(1, CFG.vocab_size, (N, 5)).astype(np.int32),
                                  np.array([5, 3, 1, 4, 2, 5, 3, 2]))
  return tokens, policy_mask, rewards, advantages, ref_logp, prompts, prompt_mask


def _ppo(policy_state, critic_state, tokens, mask, rewards, gae_fn, critic_update, policy_update):
  adv, returns, values = gae_fn(critic_state.params, tokens, mask, rewards)
  critic_state, cm = critic_update(critic_state, CriticBatch(tokens, mask, values, returns))
  policy_state, pm = policy_update(policy_state, PolicyGradientBatch(tokens, mask, adv, None,
                                                                     None))
  return (adv, returns, values), critic_state, policy_state, {**cm, **pm}


def _critic(policy_params, init_rows):
  critic, value_apply_fn = make_critic(CFG)
  params, specs = init_critic_params(critic, policy_params, jax.random.key(4),
                                     init_rows=init_rows)
  return value_apply_fn, params, specs


def _assert_trees_close(test, expected, actual, atol=1e-5):
  e_leaves, e_def = jax.tree.flatten(expected)
  a_leaves, a_def = jax.tree.flatten(actual)
  test.assertEqual(e_def, a_def)
  for e, a in zip(e_leaves, a_leaves):
    np.testing.assert_allclose(np.asarray(e), np.asarray(a), atol=atol, rtol=0)


class ShardedUpdatesTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    """Single-device references: one GRPO update, one PPO update (GAE, critic, policy), samples."""
    super().setUpClass()
    cls.data = tokens, mask, rewards, adv, ref_logp, prompts, prompt_mask = _data()
    state0 = jax.jit(lambda rng: sharding.unbox(init_fn(rng)))(jax.random.key(0))
    cls.params0 = jax.device_get(state0.params)
    cls.grpo_batch = PolicyGradientBatch(tokens, mask, adv, None, ref_logp)
    grpo_state, cls.grpo_metrics = jax.jit(make_policy_update_fn(apply_fn, GRPO))(
        state0, cls.grpo_batch)
    cls.grpo_params = jax.device_get(grpo_state.params)

    value_apply_fn, critic_params, _ = _critic(state0.params, 1)
    critic0 = TrainState.create(apply_fn=value_apply_fn, params=critic_params, tx=TX)
    outs, critic1, policy1, cls.ppo_metrics = _ppo(
        state0, critic0, tokens, mask, rewards, jax.jit(make_gae_fn(value_apply_fn, CRITIC)),
        jax.jit(make_critic_update_fn(value_apply_fn, CRITIC)),
        jax.jit(make_policy_update_fn(apply_fn, PPO)))
    cls.ppo_outs = jax.device_get(outs)
    cls.ppo_critic = jax.device_get(critic1.params)
    cls.ppo_policy = jax.device_get(policy1.params)

    sample = jax.jit(make_sampler(make_decode_fn(MODEL), functools.partial(init_cache, CFG),
                                  SAMPLER))
    cls.samples = jax.device_get(sample(state0.params, prompts, prompt_mask, jax.random.key(3)))

  def _mesh(self, data, fsdp, tensor):
    return sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))

  def test_grpo_update_matches_single_device(self):
    self._check_grpo_update_matches_single_device(*DEFAULT_MESH)

  @parameterized.parameters(*SLOW_MESHES)
  @pytest.mark.slow
  def test_grpo_update_matches_single_device_slow_meshes(self, data, fsdp, tensor):
    self._check_grpo_update_matches_single_device(data, fsdp, tensor)

  def _check_grpo_update_matches_single_device(self, data, fsdp, tensor):
    mesh = self._mesh(data, fsdp, tensor)
    state, state_sh = sharding.sharded_init(init_fn, jax.random.key(0), mesh)
    _assert_trees_close(self, self.params0, state.params, atol=1e-6)
    if fsdp * tensor > 1:
      sharding.assert_sharded(state.params, min_size=1000)
    update = sharding.jit_sharded(make_policy_update_fn(apply_fn, GRPO),
                                  (state_sh, sharding.batch_sharding(mesh)),
                                  sharding.state_and_metrics_shardings(state_sh, mesh),
                                  donate_argnums=0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      new, metrics = update(state, sharding.shard_batch(self.grpo_batch, mesh))
    self.assertTrue(state.params["embed"]["embedding"].is_deleted())   # donated
    _assert_trees_close(self, self.grpo_params, new.params)
    for key in ("loss", "kl", "entropy", "grad_norm"):
      np.testing.assert_allclose(metrics[key], self.grpo_metrics[key], rtol=1e-5, atol=1e-6)
    # The update kept every parameter's sharding (out_shardings = the state's).
    for p, s in zip(jax.tree.leaves(new.params), jax.tree.leaves(state_sh.params)):
      self.assertTrue(p.sharding.is_equivalent_to(s, p.ndim), (p.sharding, s))

  def test_ppo_update_matches_single_device(self):
    self._check_ppo_update_matches_single_device(*DEFAULT_MESH)

  @parameterized.parameters(*SLOW_MESHES)
  @pytest.mark.slow
  def test_ppo_update_matches_single_device_slow_meshes(self, data, fsdp, tensor):
    self._check_ppo_update_matches_single_device(data, fsdp, tensor)

  def _check_ppo_update_matches_single_device(self, data, fsdp, tensor):
    mesh = self._mesh(data, fsdp, tensor)
    tokens, mask, rewards = self.data[:3]
    policy, policy_sh = sharding.sharded_init(init_fn, jax.random.key(0), mesh)
    value_apply_fn, critic_params, specs = _critic(self.params0, data * fsdp)
    critic, critic_sh = sharding.sharded_train_state(critic_params, specs,
                                                     apply_fn=value_apply_fn, tx=TX, mesh=mesh)
    bsh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    gae_fn = sharding.jit_sharded(make_gae_fn(value_apply_fn, CRITIC),
                                  (critic_sh.params, bsh, bsh, bsh), (bsh, bsh, bsh))
    critic_update = sharding.jit_sharded(make_critic_update_fn(value_apply_fn, CRITIC),
                                         (critic_sh, bsh), (critic_sh, rep), donate_argnums=0)
    policy_update = sharding.jit_sharded(make_policy_update_fn(apply_fn, PPO), (policy_sh, bsh),
                                         (policy_sh, rep), donate_argnums=0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      outs, critic, policy, metrics = _ppo(policy, critic, *sharding.shard_batch(
          (tokens, mask, rewards), mesh), gae_fn, critic_update, policy_update)
    _assert_trees_close(self, self.ppo_outs, outs)
    _assert_trees_close(self, self.ppo_critic, critic.params)
    _assert_trees_close(self, self.ppo_policy, policy.params)
    for key in ("value_loss", "explained_variance", "loss", "grad_norm"):
      np.testing.assert_allclose(metrics[key], self.ppo_metrics[key], rtol=1e-5, atol=1e-6)
    momentum = critic.opt_state[0].trace["trunk"]["embed"]["embedding"]
    self.assertTrue(momentum.sharding.is_equivalent_to(
        critic.params["trunk"]["embed"]["embedding"].sharding, 2))

  def test_sampler_tokens_identical(self):
    self._check_sampler_tokens_identical(*DEFAULT_MESH)

  @parameterized.parameters(*SLOW_MESHES)
  @pytest.mark.slow
  def test_sampler_tokens_identical_slow_meshes(self, data, fsdp, tensor):
    self._check_sampler_tokens_identical(data, fsdp, tensor)

  def _check_sampler_tokens_identical(self, data, fsdp, tensor):
    mesh = self._mesh(data, fsdp, tensor)
    prompts, prompt_mask = self.data[-2:]
    _, state_sh = sharding.sharded_abstract(init_fn, jax.random.key(0), mesh)
    params = jax.device_put(self.params0, state_sh.params)
    sample = jax.jit(make_sampler(make_decode_fn(MODEL), functools.partial(init_cache, CFG),
                                  SAMPLER))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      out = sample(params, *sharding.shard_batch((prompts, prompt_mask), mesh),
                   jax.random.key(3))
    np.testing.assert_array_equal(out.tokens, self.samples.tokens)
    np.testing.assert_array_equal(out.lengths, self.samples.lengths)
    np.testing.assert_allclose(out.logp, self.samples.logp, atol=1e-5)
    self.assertTrue(out.tokens.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
                    or data * fsdp == 1, out.tokens.sharding)


if __name__ == "__main__":
  absltest.main()
