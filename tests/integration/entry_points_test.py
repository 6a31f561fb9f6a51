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

  def test_no_entry_point_is_an_error_naming_the_choices(self):
    launcher.parse_gin(["gin/models/tiny.gin"], [])
    with self.assertRaisesRegex(ValueError, "exactly one entry point.*jaxsearch.programs.search_agent.loop.run"):
      launcher.entry_point()


if __name__ == "__main__":
  absltest.main()
