"""The reward-model adapter: exact re-encoding of episodes, batching invariance, signatures.

That a *trained* reward model ranks held-out chosen episodes above rejected ones through this
adapter (token and text paths) is checked in tests/train/reward_model_test.py, which trains one.
"""
from __future__ import annotations

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.data import demos
from jaxsearch.data.world import WorldConfig
from jaxsearch.models.heads import RewardModel, ValueHeadConfig
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.rewards.model_reward import ModelReward, encode_episode, reward_model_reward
from jaxsearch.programs.search_agent.experiment import RunConfig, setup

WORLD = WorldConfig(num_people=40, num_cities=12, num_countries=5, num_companies=8,
                    num_distractors=10, train_size=40, validation_size=8, test_size=24)


class ModelRewardTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.exp = setup(RunConfig(world=WORLD, tokenizer_vocab_size=512))
    cls.tok = cls.exp.tokenizer
    cls.questions = cls.exp.world.splits["test"]
    teacher = demos.TeacherConfig(no_search_prob=0.3, stop_early_prob=0.5, seed=1)
    cls.demo, _ = demos.build_demonstrations(cls.exp.world, cls.questions, cls.tok,
                                             cls.exp.respond, teacher, max_len=192)
    cls.lengths = np.sum(cls.demo.tokens != cls.tok.pad_id, axis=1).astype(np.int32)
    cfg = TransformerConfig(vocab_size=512, d_model=32, num_layers=1, num_heads=2,
                            num_kv_heads=2, mlp_dim=64)
    cls.model = RewardModel(cfg, ValueHeadConfig(init_scale=1.0))
    # Jitted: one compile instead of one per operation (the suite's time is compiling).
    cls.params = nn.meta.unbox(jax.jit(cls.model.init)(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.ones([1], jnp.int32))["params"])

  def _texts(self):
    """(prompt texts, completion texts) of the demonstrations, decoded as the loop does."""
    prompts, completions = [], []
    for i, q in enumerate(self.questions):
      p = len(demos.prompt_ids(self.tok, q))
      prompts.append(self.tok.decode(self.demo.tokens[i, :p].tolist()))
      completions.append(self.tok.decode(self.demo.tokens[i, p: self.lengths[i]].tolist()))
    return prompts, completions

  def test_encode_episode_reproduces_rollout_ids(self):
    prompts, completions = self._texts()
    searched = 0
    for i, (p, c) in enumerate(zip(prompts, completions)):
      want = self.demo.tokens[i, : self.lengths[i]].tolist()
      self.assertEqual(encode_episode(self.tok, p + c), want, p + c)
      searched += "<information>" in c
    self.assertGreater(searched, 5)   # the check covered episodes with passages
    self.assertEqual(encode_episode(self.tok, "<answer> Paris</answer>", bos=False),
                     [self.tok.tag_id("<answer>"), *self.tok.encode("Paris"),
                      self.tok.tag_id("</answer>")])

  def test_scores_do_not_depend_on_batching_or_padding(self):
    reward = reward_model_reward(self.model.apply, self.params, self.tok, batch_size=8,
                                 width_multiple=16)
    scores = reward.score_tokens(self.demo.tokens, self.lengths)
    self.assertEqual(scores.shape, (len(self.questions),))
    self.assertEqual(scores.dtype, np.float32)
    # Each row alone, at exactly its length, through the model itself.
    apply = jax.jit(self.model.apply)
    for i in (0, 5, len(self.questions) - 1):
      row = jnp.asarray(self.demo.tokens[i: i + 1, : self.lengths[i]])
      alone = apply({"params": self.params}, row, jnp.asarray(self.lengths[i: i + 1]))
      self.assertAlmostEqual(float(scores[i]), float(alone[0]), places=4)
    # Another batch size, garbage after each length, a reversed order: the same scores.
    noisy = np.where(np.arange(self.demo.tokens.shape[1])[None] < self.lengths[:, None],
                     self.demo.tokens, 7)
    other = reward_model_reward(self.model.apply, self.params, self.tok, batch_size=5)
    np.testing.assert_allclose(other.score_tokens(noisy[::-1], self.lengths[::-1])[::-1],
                               scores, atol=1e-5)

  def test_text_signature_matches_the_token_path(self):
    reward = reward_model_reward(self.model.apply, self.params, self.tok)
    self.assertIsInstance(reward, ModelReward)
    prompts, completions = self._texts()
    golds = [q.answers for q in self.questions]
    expected = reward.score_tokens(self.demo.tokens, self.lengths)
    np.testing.assert_allclose(reward(completions, golds, prompts=prompts), expected, atol=1e-5)
    full = [p + c for p, c in zip(prompts, completions)]
    np.testing.assert_allclose(reward(full, golds), expected, atol=1e-5)
    self.assertEqual(reward([], []).shape, (0,))

  def test_errors(self):
    reward = reward_model_reward(self.model.apply, self.params, self.tok)
    with self.assertRaisesRegex(ValueError, "got 2 completions but 1 gold lists"):
      reward(["a", "b"], [["a"]])
    with self.assertRaisesRegex(ValueError, "got 1 completions but 2 prompts"):
      reward(["a"], None, prompts=["p", "q"])
    with self.assertRaisesRegex(ValueError, r"lengths must be in \[1, T=3\]"):
      reward.score_tokens(np.zeros((1, 3), np.int32), np.array([4]))
    with self.assertRaisesRegex(ValueError, "batch_size must be >= 1, got 0"):
      reward_model_reward(self.model.apply, self.params, self.tok, batch_size=0)


if __name__ == "__main__":
  absltest.main()
