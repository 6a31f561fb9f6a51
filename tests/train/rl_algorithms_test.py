"""RL algorithms end to end: every estimator's update, PPO's critic wiring and warm-up, gin
files, the shared warm start, a PPO loop that resumes, and the comparison table's logic."""
import dataclasses
import functools
import json
import os
from unittest import mock
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized
from flax import linen as nn

from experiments import compare_algorithms as compare
from jaxsearch.data.world import WorldConfig
from jaxsearch.models.heads import ValueHeadConfig
from jaxsearch.models.transformer import Transformer, TransformerConfig
from jaxsearch.rollout.search_env import RolloutConfig
from jaxsearch.programs.search_agent import loop
from jaxsearch.programs.search_agent.experiment import RLConfig, RunConfig, SFTConfig
from jaxsearch.train.optim import OptimizerConfig, make_optimizer
from jaxsearch.train.rl_update import (RLBatch, RLState, jit_rl_update, make_rl_update_fn)
from jaxsearch.train.state import TrainState
from jaxsearch.train import steps as steps_lib
from jaxsearch.train.steps import (CriticBatch, CriticConfig, PolicyGradientConfig, init_critic_params,
                                   make_critic, make_critic_update_fn, make_gae_fn,
                                   outcome_token_rewards)
from jaxsearch.programs.search_agent.workdir import config_to_json
from tests.xla_env import subprocess_env

V = 40
CFG = TransformerConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2,
                        mlp_dim=64, max_len=32)
MODEL = Transformer(CFG)


def apply_fn(variables, tokens):
  return MODEL.apply(variables, tokens)


@functools.lru_cache(maxsize=None)
def init_params(seed=0):
  """Cached: callers copy before donating."""
  return nn.meta.unbox(MODEL.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])


def rl_batch(n=8, t=12, groups=4, seed=0):
  """Rows of 2 groups-of-2..., prompt tokens 0-2, env tokens 6-7 in the middle."""
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(3, V, (n, t)), jnp.int32)
  mask = np.zeros((n, t), bool)
  mask[:, 3:6] = True          # first policy turn
  mask[:, 8:] = True           # second policy turn after two environment tokens
  mask[0, 10:] = False         # shorter episode
  rewards = jnp.asarray(np.tile([1.0, 0.0], n // 2), jnp.float32)   # every group has variance
  group_ids = jnp.repeat(jnp.arange(groups, dtype=jnp.int32), n // groups)
  num_searches = jnp.asarray(rng.integers(0, 3, n), jnp.int32)
  return RLBatch(tokens, jnp.asarray(mask), rewards, group_ids, num_searches)


def make_update(config, critic=None, value_apply_fn=None, norm_length=None):
  """The one jitted RL update of `config` (`rl_update.make_rl_update_fn`)."""
  return jit_rl_update(make_rl_update_fn(apply_fn, config, critic=critic,
                                         value_apply_fn=value_apply_fn,
                                         norm_length=norm_length), None)


def run_update(update, state, critic_state, ref_params, batch, train_policy=True):
  """(policy state, critic state, metrics) after one update; the reference is copied (the
  state is donated)."""
  rl_state = RLState(policy=state, critic=critic_state,
                     ref_params=jax.tree.map(jnp.copy, ref_params))
  rl_state, m = update(rl_state, batch, train_policy)
  return rl_state.policy, rl_state.critic, m


def tree_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# KL only where it is the point (it costs a reference forward pass to compile).
ALGOS = {
    "grpo": PolicyGradientConfig(num_generations=2, advantage="grpo", kl_coef=0.04),
    "drgrpo": PolicyGradientConfig(num_generations=2, advantage="drgrpo", agg="seq-mean-token-sum-norm",
                         kl_coef=0.0),
    "rloo": PolicyGradientConfig(num_generations=2, advantage="rloo", kl_coef=0.0),
    "reinforce_pp": PolicyGradientConfig(num_generations=2, advantage="reinforce_pp", kl_coef=0.0),
    "stratified": PolicyGradientConfig(num_generations=2, advantage="stratified", kl_coef=0.0),
    "grpo_llds": PolicyGradientConfig(num_generations=2, llds_coef=0.5, llds_preserve="nonnegative",
                            updates_per_batch=2, kl_coef=0.0),
    "gspo_dual_clip": PolicyGradientConfig(num_generations=2, ratio_level="sequence", clip_eps=3e-4,
                                 clip_eps_high=4e-4, dual_clip=3.0, entropy_coef=0.01,
                                 kl_coef=0.0),
    "ppo": PolicyGradientConfig(num_generations=2, advantage="gae", kl_coef=0.01),
}
TELEMETRY = ("entropy", "kl", "clip_frac", "ratio_min", "ratio_max", "adv_mean", "adv_std",
             "zero_var_frac", "response_length", "loss", "grad_norm")


class AlgorithmUpdateTest(parameterized.TestCase):

  @parameterized.named_parameters(*ALGOS.items())
  def test_one_jitted_step_changes_the_policy(self, config):
    params = init_params()
    batch = rl_batch()
    state = TrainState.create(apply_fn=apply_fn, params=jax.tree.map(jnp.copy, params),
                              tx=make_optimizer(OptimizerConfig(learning_rate=1e-2)))
    critic_state, critic = None, None
    if config.uses_critic:
      model, value_apply_fn = make_critic(CFG)
      cparams, _ = init_critic_params(model, params, jax.random.key(1))
      critic_state = TrainState.create(apply_fn=value_apply_fn, params=cparams,
                                       tx=make_optimizer(OptimizerConfig(learning_rate=1e-2)))
      critic = CriticConfig()
    update = make_update(config, critic=critic,
                         value_apply_fn=critic_state.apply_fn if critic_state else None,
                         norm_length=16)
    before_critic = None if critic_state is None else jax.tree.map(np.array, critic_state.params)
    state, critic_state, m = run_update(update, state, critic_state, params, batch)
    self.assertFalse(tree_equal(params, state.params))
    self.assertEqual(int(state.step), config.updates_per_batch)
    for key in TELEMETRY:
      self.assertIn(key, m)
    m = {k: float(v) for k, v in m.items()}
    self.assertTrue(all(np.isfinite(v) for v in m.values()), m)
    self.assertEqual(m["zero_var_frac"], 0.0)
    np.testing.assert_allclose(m["response_length"], (7 * 7 + 5) / 8)
    self.assertGreater(m["entropy"], 0.0)
    self.assertLessEqual(m["entropy"], np.log(V) + 1e-5)
    if config.uses_critic:
      self.assertIn("value_loss", m)
      self.assertIn("explained_variance", m)
      self.assertFalse(tree_equal(before_critic, critic_state.params))
      # GAE advantages are whitened over the policy tokens.
      self.assertAlmostEqual(m["adv_mean"], 0.0, places=5)
      self.assertAlmostEqual(m["adv_std"], 1.0, delta=0.02)   # ddof=1 whitening, ddof=0 std
    if config.llds_coef:
      # The second update sees the first's drift: the regulariser is measured.
      self.assertIn("llds_active_frac", m)

  def test_outcome_estimators_reach_the_update_with_their_options(self):
    # rewards per group (1, 0): GRPO -> +-0.7071 (ddof=1), RLOO -> +-1, Dr. GRPO -> +-0.5.
    batch = rl_batch()
    for config, expected in ((ALGOS["grpo"], 1 / np.sqrt(2)), (ALGOS["rloo"], 1.0),
                             (ALGOS["drgrpo"], 0.5)):
      adv = np.asarray(jax.jit(functools.partial(steps_lib.outcome_advantages, config))(
          batch.rewards, batch.group_ids, batch.num_searches))
      np.testing.assert_allclose(adv, np.tile([expected, -expected], 4), rtol=1e-4)
    # Stratified with blend 1 and every row its own stratum: within-stratum advantages are 0.
    config = PolicyGradientConfig(num_generations=2, advantage="stratified",
                                  advantage_options={"blend": 1.0})
    adv = steps_lib.outcome_advantages(config, batch.rewards, batch.group_ids,
                                       jnp.arange(8, dtype=jnp.int32))
    np.testing.assert_allclose(adv, 0.0, atol=1e-6)

  def test_critic_warmup_leaves_the_policy_unchanged(self):
    params = init_params()
    model, value_apply_fn = make_critic(CFG)
    cparams, _ = init_critic_params(model, params, jax.random.key(1))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2))
    state = TrainState.create(apply_fn=apply_fn, params=jax.tree.map(jnp.copy, params), tx=tx)
    opt_before = jax.tree.map(np.array, state.opt_state)
    critic_state = TrainState.create(apply_fn=value_apply_fn, params=cparams, tx=tx)
    update = make_update(ALGOS["ppo"], critic=CriticConfig(), value_apply_fn=value_apply_fn)
    critic_before = jax.tree.map(np.array, critic_state.params)
    for k in range(3):
      state, critic_state, m = run_update(update, state, critic_state, params,
                                          rl_batch(seed=k), train_policy=False)
      self.assertEqual(float(m["critic_warmup"]), 1.0)
      self.assertNotIn("entropy", m)
    self.assertTrue(tree_equal(params, state.params))
    self.assertTrue(tree_equal(opt_before, state.opt_state))
    self.assertEqual(int(state.step), 0)
    self.assertEqual(int(critic_state.step), 3)
    self.assertFalse(tree_equal(critic_before, critic_state.params))

  def test_critic_starts_from_the_policy_trunk_with_a_zero_head(self):
    params = init_params(seed=3)
    model, value_apply_fn = make_critic(CFG)
    cparams, _ = init_critic_params(model, params, jax.random.key(0))
    for key in ("embed", "final_norm", "layers_0"):
      self.assertTrue(tree_equal(cparams["trunk"][key], params[key]))
    np.testing.assert_array_equal(cparams["value_head"]["kernel"], 0.0)
    values = jax.jit(value_apply_fn)({"params": cparams}, rl_batch().tokens)
    np.testing.assert_array_equal(values, 0.0)   # a fresh head predicts 0 everywhere
    # The critic's buffers are copies: donating them leaves the policy intact.
    self.assertIsNot(cparams["trunk"]["embed"]["embedding"], params["embed"]["embedding"])


def stub_value_apply(variables, tokens):
  """Value after reading token t = table[token t]: a critic whose values we choose."""
  return variables["params"]["table"][tokens]


class PPOWiringTest(absltest.TestCase):
  # One row: prompt (0), policy (1, 2), an environment token (3), policy (4); reward 1.
  TOKENS = jnp.array([[1, 2, 3, 4, 5]], jnp.int32)
  MASK = jnp.array([[False, True, True, False, True]])
  TABLE = jnp.array([0.0, 0.1, 0.3, 0.6, 0.2, 0.9], jnp.float32)

  def test_outcome_reward_sits_on_the_last_policy_token(self):
    r = outcome_token_rewards(jnp.array([2.0, 3.0]),
                              jnp.array([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]], bool))
    np.testing.assert_array_equal(r, [[0, 0, 0, 0, 2, 0], [0, 0, 0, 0, 0, 0]])

  def test_gae_on_a_hand_built_batch(self):
    gamma, lam = 0.9, 0.5
    fn = jax.jit(make_gae_fn(stub_value_apply, CriticConfig(gamma=gamma, lam=lam,
                                                            whiten_advantages=False)))
    adv, ret, values = fn({"table": self.TABLE}, self.TOKENS, self.MASK, jnp.array([1.0]))
    # V_t is the value after tokens < t, i.e. table[tokens[t - 1]].
    v1, v2, v4 = 0.1, 0.3, 0.2           # table[1], table[2], table[4] (read the env token)
    np.testing.assert_allclose(values, [[0, v1, v2, 0, v4]], atol=1e-7)
    # Policy steps 1 -> 2 -> 4 (the environment token is skipped, one factor of gamma).
    a4 = 1.0 - v4
    a2 = (gamma * v4 - v2) + gamma * lam * a4
    a1 = (gamma * v2 - v1) + gamma * lam * a2
    np.testing.assert_allclose(adv, [[0, a1, a2, 0, a4]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0, a1 + v1, a2 + v2, 0, a4 + v4]], atol=1e-6)

  def test_gae_advantages_are_whitened_over_policy_tokens(self):
    tokens = jnp.concatenate([self.TOKENS, self.TOKENS[:, ::-1]])
    mask = jnp.concatenate([self.MASK, self.MASK])
    raw, _, _ = make_gae_fn(stub_value_apply, CriticConfig(whiten_advantages=False))(
        {"table": self.TABLE}, tokens, mask, jnp.array([1.0, 0.0]))
    white, _, _ = jax.jit(make_gae_fn(stub_value_apply, CriticConfig()))(
        {"table": self.TABLE}, tokens, mask, jnp.array([1.0, 0.0]))
    x = np.asarray(raw)[np.asarray(mask)]
    expected = (x - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(np.asarray(white)[np.asarray(mask)], expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(white)[~np.asarray(mask)], 0.0)

  def test_clipped_value_loss_and_its_step(self):
    params = {"table": self.TABLE}
    returns = jnp.array([[0.0, 1.0, 0.0, 0.0, 1.0]])
    # Rollout-time values 0.4 below the current ones: a clip of 0.25 bounds the move.
    values = np.array([0, 0.1, 0.3, 0, 0.2])
    old = jnp.asarray([values - 0.4])
    batch = CriticBatch(self.TOKENS, self.MASK, old, returns)
    state = TrainState.create(apply_fn=stub_value_apply, params=params, tx=optax.sgd(1.0))
    update = jax.jit(make_critic_update_fn(stub_value_apply, CriticConfig(value_clip=0.25)))
    new_state, m = update(state, batch)
    policy = [1, 2, 4]
    v, o, r = values[policy], np.asarray(old)[0, policy], np.asarray(returns)[0, policy]
    v_clip = o + np.clip(v - o, -0.25, 0.25)
    expected = 0.5 * np.mean(np.maximum((v - r) ** 2, (v_clip - r) ** 2))
    np.testing.assert_allclose(m["value_loss"], expected, rtol=1e-6)
    clipped = (v_clip - r) ** 2 > (v - r) ** 2
    np.testing.assert_array_equal(clipped, [True, False, True])   # both branches are exercised
    np.testing.assert_allclose(m["vf_clipfrac"], 2 / 3, rtol=1e-6)
    # SGD on 0.5 * mean((V_clip - R)^2): V_clip does not move with V (outside the clip range),
    # so the gradient is that of the unclipped term only where it is the larger.
    unclipped = (v - r) ** 2 >= (v_clip - r) ** 2
    grad = np.where(unclipped, (v - r) / 3, 0.0)
    expected_table = np.asarray(self.TABLE).copy()
    for tok, g in zip([1, 2, 4], grad):     # V at positions 1, 2, 4 is read after tokens 1, 2, 4
      expected_table[tok] -= g
    np.testing.assert_allclose(new_state.params["table"], expected_table, atol=1e-6)


class ConfigAndGinTest(parameterized.TestCase):

  def test_bad_values_are_named(self):
    for kwargs, message in (
        (dict(advantage="ppo"), "advantage must be one of .* got 'ppo'"),
        (dict(llds_coef=0.1), "llds_coef=0.1 needs updates_per_batch >= 2"),
        (dict(ratio_level="row"), "ratio_level must be one of .* got 'row'"),
        (dict(dual_clip=1.0), "dual_clip must be None or > 1, got 1.0"),
        (dict(advantage="stratified", advantage_options={"blend": 2.0}),
         "blend must be in \\[0, 1\\], got 2.0"),
        (dict(advantage="rloo", advantage_options={"scale": "none"}),
         "'rloo' has no options \\['scale'\\]; it accepts \\[\\]"),
        (dict(micro_batch_size=3), "micro_batch_size \\(3\\) must divide"),
        (dict(llds_preserve="good"), "llds_preserve must be one of .* got 'good'"),
    ):
      with self.assertRaisesRegex(ValueError, message):
        PolicyGradientConfig(**kwargs)
    with self.assertRaisesRegex(ValueError, "lam must be in \\[0, 1\\], got 1.5"):
      CriticConfig(lam=1.5)
    with self.assertRaisesRegex(ValueError, "scalar head"):
      CriticConfig(head=ValueHeadConfig(num_bins=11))

  @parameterized.parameters(
      ("grpo", "grpo", 1, 0.0, False), ("drgrpo", "drgrpo", 1, 0.0, False),
      ("rloo", "rloo", 1, 0.0, False), ("reinforce_pp", "reinforce_pp", 1, 0.0, False),
      ("stratified_grpo", "stratified", 1, 0.0, False), ("grpo_llds", "grpo", 2, 0.1, False),
      ("ppo", "gae", 1, 0.0, True))
  def test_algo_gin_files_build_configs(self, name, advantage, updates, llds, critic):
    import gin  # noqa: PLC0415
    from experiments.run import parse_gin  # noqa: PLC0415
    for base, two_hop in (("gin/experiments/quickstart.gin", 0.5),
                          ("gin/experiments/compare.gin", 1.0)):
      gin.clear_config()
      try:
        parse_gin([base, f"gin/algos/{name}.gin"], ["SEED = 2"])
        config = gin.query_parameter("loop.run.config").scoped_configurable_fn()
      finally:
        gin.clear_config()
      self.assertIsInstance(config, RunConfig)
      self.assertEqual(config.rl.algorithm.advantage, advantage)
      self.assertEqual(config.rl.algorithm.updates_per_batch, updates)
      self.assertEqual(config.rl.algorithm.llds_coef, llds)
      self.assertEqual(config.rl.algorithm.rows, 64)
      self.assertEqual(config.world.two_hop_fraction, two_hop)
      self.assertEqual(config.seed, 2)
      if critic:
        self.assertEqual(config.rl.critic.warmup_steps, 5)
        self.assertEqual(config.rl.critic.optimizer.learning_rate, 5e-4)
        self.assertEqual(config.rl.optimizer.learning_rate, 2e-4)
      if name == "drgrpo":
        self.assertEqual(config.rl.algorithm.agg, "seq-mean-token-sum-norm")


TINY_WORLD = WorldConfig(num_people=60, num_distractors=20, train_size=100, validation_size=10,
                         test_size=16)


def tiny_run_config(**rl_kwargs):
  # A 3-step SFT policy earns no reward: a random value head (init_scale) gives non-zero
  # values, hence non-zero advantages and value errors, so both networks do train.
  rl = RLConfig(steps=3, algorithm=PolicyGradientConfig(prompts_per_step=4, num_generations=2,
                                         advantage="gae", kl_coef=0.01),
                critic=CriticConfig(warmup_steps=1, head=ValueHeadConfig(init_scale=0.5)),
                **rl_kwargs)
  return RunConfig(world=TINY_WORLD, model=dataclasses.replace(CFG, max_len=128),
                   rollout=RolloutConfig(max_len=128), eval_batch_size=16, checkpoint_every=2,
                   sft=SFTConfig(steps=3, batch_size=8, num_demos=64), rl=rl)


class SharedWarmStartTest(absltest.TestCase):

  def _source(self, config, sft_steps=()):
    source = tempfile.mkdtemp()
    with open(os.path.join(source, "run_config.json"), "w") as f:
      f.write(config_to_json(config))
    for s in sft_steps:
      os.makedirs(os.path.join(source, "checkpoints", "sft", str(s)))
    with open(os.path.join(source, "tokenizer.model"), "w") as f:
      f.write("tok")
    return source

  def test_different_settings_are_named(self):
    config = tiny_run_config()
    source = self._source(dataclasses.replace(config, model=dataclasses.replace(
        config.model, d_model=64)), sft_steps=(3,))
    target = dataclasses.replace(config, rl=dataclasses.replace(config.rl, init_from=source))
    with self.assertRaisesRegex(ValueError, "different \\['RunConfig.model'\\]"):
      loop.share_warm_start(target, tempfile.mkdtemp())

  def test_unfinished_sft_is_an_error_and_a_finished_one_is_copied(self):
    config = tiny_run_config()
    source = self._source(config, sft_steps=(2,))
    target = dataclasses.replace(config, rl=dataclasses.replace(config.rl, init_from=source))
    with self.assertRaisesRegex(ValueError, "no finished SFT checkpoint \\(step 3\\)"):
      loop.share_warm_start(target, tempfile.mkdtemp())
    os.makedirs(os.path.join(source, "checkpoints", "sft", "3"))
    with open(os.path.join(source, "eval_sft.json"), "w") as f:
      json.dump({"sft_em": 0.5}, f)
    workdir = tempfile.mkdtemp()
    self.assertTrue(loop.share_warm_start(target, workdir))
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints", "sft"))),
                     ["2", "3"])
    self.assertTrue(os.path.exists(os.path.join(workdir, "tokenizer.model")))
    self.assertTrue(os.path.exists(os.path.join(workdir, "eval_sft.json")))
    # A resumed run copies nothing.
    self.assertFalse(loop.share_warm_start(target, workdir))
    # Different evaluation settings: the warm start is shared, its evaluations are not.
    other = tempfile.mkdtemp()
    loop.share_warm_start(dataclasses.replace(target, eval_batch_size=8), other)
    self.assertFalse(os.path.exists(os.path.join(other, "eval_sft.json")))


class NoDuplicateEvaluationTest(absltest.TestCase):

  def test_untrained_phases_reuse_the_evaluation_of_the_same_parameters(self):
    from jaxsearch.programs.search_agent import evaluate as eval_lib  # noqa: PLC0415
    config = dataclasses.replace(
        tiny_run_config(), baselines=("zero_shot", "direct"),
        sft=dataclasses.replace(tiny_run_config().sft, steps=0),
        rl=dataclasses.replace(tiny_run_config().rl, steps=0),
        world=dataclasses.replace(TINY_WORLD, test_size=8))
    calls = []
    real = eval_lib.evaluate

    def counting(exp, params, questions, rng, **kwargs):
      calls.append(kwargs.get("method"))
      return real(exp, params, questions, rng, **kwargs)

    workdir = tempfile.mkdtemp()
    with mock.patch.object(eval_lib, "evaluate", counting):
      summary = loop.run(config, workdir)
    # Nothing trained: one agent and one direct evaluation serve all five names.
    self.assertEqual(sorted(calls), ["agent", "direct"])
    for name, source in (("sft", "zero_shot"), ("rl", "zero_shot"), ("closed_book", "direct")):
      for key in ("em", "f1", "searches", "support_recall", "format"):
        self.assertEqual(summary[f"{name}_{key}"], summary[f"{source}_{key}"], (name, key))
      with open(os.path.join(workdir, f"eval_{name}.json")) as f:
        self.assertEqual(json.load(f)[f"{name}_em"], summary[f"{source}_em"])


def _restore(workdir, phase, target):
  from jaxsearch.checkpoint import Checkpointer  # noqa: PLC0415
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", phase))
  tree, _ = ckpt.restore(ckpt.latest_step(), jax.eval_shape(lambda: target))
  step = ckpt.latest_step()
  ckpt.close()
  return step, tree


@pytest.mark.slow
class PPOLoopTest(absltest.TestCase):

  def test_ppo_run_resumes_exactly_from_a_shared_warm_start(self):
    config = tiny_run_config()
    straight = tempfile.mkdtemp()
    summary = loop.run(config, straight)
    self.assertIn("rl_em", summary)
    rows = [r for r in _metrics(straight) if "rl/em" in r]
    self.assertEqual([r["rl/critic_warmup"] for r in rows], [1.0, 0.0, 0.0])
    self.assertNotIn("rl/entropy", rows[0])
    for key in ("rl/entropy", "rl/kl", "rl/clip_frac", "rl/ratio_min", "rl/ratio_max",
                "rl/adv_mean", "rl/adv_std", "rl/zero_var_frac", "rl/response_length",
                "rl/searches", "rl/em", "rl/value_loss", "rl/explained_variance"):
      self.assertIn(key, rows[-1])
      self.assertTrue(np.isfinite(rows[-1][key]), key)
    self.assertEqual(sorted(os.listdir(os.path.join(straight, "checkpoints", "critic"))),
                     ["2", "3"])
    # Same settings, SFT taken from `straight`, interrupted after 2 RL steps, then resumed.
    shared = dataclasses.replace(config.rl, init_from=straight)
    resumed = tempfile.mkdtemp()
    loop.run(dataclasses.replace(config, rl=dataclasses.replace(shared, steps=2)), resumed)
    loop.run(dataclasses.replace(config, rl=shared), resumed)
    rows = [r for r in _metrics(resumed) if "rl/em" in r]
    self.assertEqual([r["step"] for r in rows], [1, 2, 3])   # nothing trained twice
    self.assertFalse(any("sft/loss" in r for r in _metrics(resumed)))   # SFT was not rerun
    exp = loop.setup(config, tokenizer=loop.load_tokenizer(os.path.join(straight,
                                                                        "tokenizer.model")))
    params, _ = exp.init_params(jax.random.key(0))
    tx = make_optimizer(config.rl.optimizer)
    policy = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros([], jnp.int32)}
    model, _ = make_critic(exp.model.config)
    cparams, _ = init_critic_params(model, params, jax.random.key(0))
    ctx = make_optimizer(config.rl.critic.optimizer)
    critic = {"params": cparams, "opt_state": ctx.init(cparams),
              "step": jnp.zeros([], jnp.int32)}
    restored = {}
    for phase, target in (("sft", policy), ("rl", policy), ("critic", critic)):
      a, b = _restore(straight, phase, target), _restore(resumed, phase, target)
      self.assertEqual(a[0], b[0])
      for x, y in zip(jax.tree.leaves(a[1]["params"]), jax.tree.leaves(b[1]["params"])):
        np.testing.assert_allclose(x, y, atol=1e-6, err_msg=phase)
      restored[phase] = a[1]["params"]
    # Both networks moved away from the warm start (the comparison above is not vacuous).
    self.assertFalse(tree_equal(restored["sft"], restored["rl"]))
    self.assertFalse(tree_equal(restored["sft"]["embed"], restored["critic"]["trunk"]["embed"]))


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def write_run(out_dir, key, seed, em, entropy=None, final_em=0.5, nan_at=None):
  workdir = compare.run_dir(out_dir, key, seed)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump({"rl_em": final_em, "sft_em": 0.1}, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 0, "sft/loss": 1.0}) + "\n")
    for i, e in enumerate(em):
      row = {"step": i + 1, "rl/em": e, "rl/loss": float("nan") if i == nan_at else 0.1}
      if entropy is not None:
        row["rl/entropy"] = entropy[i]
      f.write(json.dumps(row) + "\n")


class CompareTableTest(absltest.TestCase):

  def test_smooth_and_first_step(self):
    self.assertEqual(compare.smooth([0, 2, 4, 6], 2), [0, 1, 3, 5])
    self.assertEqual(compare.smooth([3, 0, 0], 5), [3, 1.5, 1])
    self.assertEqual(compare.first_step_reaching([1, 2, 3], [0.1, 0.5, 0.9], 0.5), 2)
    self.assertIsNone(compare.first_step_reaching([1, 2], [0.1, 0.2], 0.5))

  def test_table_from_synthetic_workdirs(self):
    out = tempfile.mkdtemp()
    # window 2. grpo seed 0: smoothed [0, .2, .6, .8, .8]; best over all runs is 1.0 (ppo).
    write_run(out, "grpo", 0, [0.0, 0.4, 0.8, 0.8, 0.8], final_em=0.6)
    # grpo seed 1: rises then collapses: smoothed [.2, .6, .9, .5, .1] -> final < 50% of .9.
    write_run(out, "grpo", 1, [0.2, 1.0, 0.8, 0.2, 0.0], final_em=0.2)
    # ppo seed 0: smoothed [.6, .8, 1., 1., 1.]; entropy stays.
    write_run(out, "ppo", 0, [0.6, 1.0, 1.0, 1.0, 1.0], entropy=[1.0, 0.9, 0.8, 0.8, 0.7],
              final_em=0.9)
    # ppo seed 1: never reaches 0.8, entropy falls from mean(1, 1) to mean(.05, .05) < 10%.
    write_run(out, "ppo", 1, [0.1, 0.1, 0.1, 0.1, 0.1], entropy=[1.0, 1.0, 0.5, 0.05, 0.05],
              final_em=0.3)
    # drgrpo seed 0: a NaN loss.
    write_run(out, "drgrpo", 0, [0.5, 0.5, 0.5], nan_at=2, final_em=0.4)
    algos = ["grpo", "drgrpo", "ppo"]
    results = compare.collect(out, algos, [0, 1], window=2)
    by = {(r.key, r.seed): r for r in results}
    self.assertLen(results, 5)
    # Target 0.8 x 1.0 = 0.8.
    self.assertEqual(by["grpo", 0].steps_to_target, 4)
    self.assertEqual(by["grpo", 1].steps_to_target, 3)
    self.assertEqual(by["ppo", 0].steps_to_target, 2)
    self.assertIsNone(by["ppo", 1].steps_to_target)
    self.assertIsNone(by["drgrpo", 0].steps_to_target)
    self.assertEqual([by[k].collapsed for k in (("grpo", 0), ("grpo", 1), ("ppo", 0),
                                                ("ppo", 1), ("drgrpo", 0))],
                     [False, True, False, True, True])
    self.assertIn("entropy", by["ppo", 1].reasons[0])
    self.assertIn("non-finite", by["drgrpo", 0].reasons[0])
    rows = {r["key"]: r for r in compare.summarize(results, algos)}
    self.assertAlmostEqual(rows["grpo"]["final_em_mean"], 0.4)
    self.assertAlmostEqual(rows["grpo"]["final_em_std"], np.std([0.6, 0.2], ddof=1))
    self.assertEqual(rows["grpo"]["steps_to_target_mean"], 3.5)
    self.assertEqual((rows["grpo"]["reached"], rows["grpo"]["collapsed"]), (2, 1))
    self.assertEqual((rows["ppo"]["steps_to_target_mean"], rows["ppo"]["reached"]), (2.0, 1))
    self.assertEqual(rows["drgrpo"]["final_em_std"], 0.0)   # one seed
    table = compare.markdown_table(compare.summarize(results, algos), best=1.0, window=2)
    lines = table.splitlines()
    self.assertEqual(lines[2], "| GRPO | 0.400 ± 0.283 | 0.100 | 3.5 (2/2) | yes (1/2) | "
                               "0.450 | n/a |")
    self.assertTrue(lines[3].startswith("| Dr. GRPO | 0.400 ± 0.000 | 0.100 | never | yes (1/1)"))
    table = compare.report(out, algos, [0, 1], window=2)
    self.assertIn("| PPO | 0.600 ± 0.424 | 0.100 | 2.0 (1/2) | yes (1/2) |", table)
    for name in ("table.md", "results.json", "em_curves.png"):
      self.assertTrue(os.path.exists(os.path.join(out, name)), name)

  def test_launch_commands_share_the_first_runs_warm_start(self):
    cmd = compare.launch_command("/tmp/o", "ppo", 1, init_from="/tmp/o/runs/grpo/seed1",
                                 bindings=["RL_STEPS = 5"])
    self.assertIn("--gin_file=gin/algos/ppo.gin", cmd)
    self.assertIn("--gin_bindings=SEED = 1", cmd)
    self.assertIn("--gin_bindings=steps.PolicyGradientConfig.updates_per_batch = 2", cmd)
    self.assertIn('--gin_bindings=experiment.RLConfig.init_from = "/tmp/o/runs/grpo/seed1"', cmd)
    self.assertLess(cmd.index("--gin_bindings=RL_STEPS = 5"), cmd.index("--gin_bindings=SEED = 1"))


@pytest.mark.slow
class CompareSmokeTest(absltest.TestCase):

  def test_smoke_mode_runs_two_algorithms_from_one_sft(self):
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    out = tempfile.mkdtemp()
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.compare_algorithms", f"--out_dir={out}", "--smoke",
         "--algos=grpo,ppo"], cwd=compare.REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=900, stdin=subprocess.DEVNULL)
    self.assertEqual(proc.returncode, 0, proc.stdout[-3000:] + proc.stderr[-3000:])
    table = open(os.path.join(out, "table.md")).read()
    self.assertIn("| GRPO | ", table)
    self.assertIn("| PPO | ", table)
    self.assertTrue(os.path.exists(os.path.join(out, "em_curves.png")))
    grpo, ppo = (compare.run_dir(out, k, 0) for k in ("grpo", "ppo"))
    # PPO took GRPO's SFT: it never trained one, and the checkpoints are the same files.
    self.assertTrue(any("sft/loss" in r for r in _metrics(grpo)))
    self.assertFalse(any("sft/loss" in r for r in _metrics(ppo)))
    self.assertEqual(json.load(open(os.path.join(grpo, "summary.json")))["sft_em"],
                     json.load(open(os.path.join(ppo, "summary.json")))["sft_em"])
    self.assertEqual(sorted(os.listdir(os.path.join(ppo, "checkpoints", "critic"))), ["2", "4"])
    results = json.load(open(os.path.join(out, "results.json")))
    self.assertEqual([len(r["em"]) for r in results["runs"]], [4, 4])


if __name__ == "__main__":
  absltest.main()
