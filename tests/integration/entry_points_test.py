"""The launcher picks the one entry point a gin file binds, and refuses none or two."""
from __future__ import annotations

from absl.testing import absltest
import gin

from experiments import run as launcher


class EntryPointTest(absltest.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def test_quickstart_is_the_search_agent_loop(self):
    launcher.parse_gin(["gin/experiments/quickstart.gin"], [])
    self.assertEqual(launcher.entry_point().__module__, "jaxsearch.programs.search_agent.loop")

  def test_reward_model_experiment(self):
    launcher.parse_gin(["gin/experiments/reward_model.gin"], [])
    self.assertEqual(launcher.entry_point().__module__, "jaxsearch.programs.reward_model")

  def test_wordnet_agent_binds_the_documented_run(self):
    launcher.parse_gin(["gin/experiments/wordnet_agent.gin"], [])
    self.assertEqual(launcher.entry_point().__module__, "jaxsearch.programs.search_agent.loop")
    config = launcher.bound_config("jaxsearch.programs.search_agent.loop.run")
    self.assertEqual(config.pretrained, "smollm2-135m-instruct")
    self.assertEqual(config.resolved_protocol, "text")
    self.assertIsNotNone(config.lora)
    self.assertEqual(set(config.data.wordnet_kinds), {
        "wordnet_located_in", "wordnet_located_in_2hop", "wordnet_category",
        "wordnet_birth_year"})
    self.assertEqual(config.baselines, ("direct", "rag", "zero_shot"))
    self.assertEqual(config.data.max_eval_questions, 100)
    self.assertEqual((config.rollout.max_len, config.rollout.top_k, config.rollout.max_searches),
                     (416, 2, 2))
    self.assertEqual(config.model.logits_chunk, 128)

  def test_no_entry_point_is_an_error_naming_the_choices(self):
    launcher.parse_gin(["gin/models/tiny.gin"], [])
    with self.assertRaisesRegex(ValueError, "exactly one entry point.*jaxsearch.programs.search_agent.loop.run"):
      launcher.entry_point()


if __name__ == "__main__":
  absltest.main()
