import dataclasses
import json

from absl.testing import absltest

from jaxsearch.data.demos import TeacherConfig
from jaxsearch.data.world import WorldConfig
from jaxsearch.programs.search_agent.experiment import RLConfig, RunConfig, SFTConfig
from jaxsearch.train.sharding import MeshConfig
from jaxsearch.train.steps import GRPOConfig
from jaxsearch.programs.search_agent.workdir import config_from_dict, config_to_json


class WorkdirConfigTest(absltest.TestCase):

  def test_json_round_trip_of_nested_non_default_config(self):
    config = RunConfig(
        seed=3, world=WorldConfig(num_people=77, split_fractions=(0.6, 0.2, 0.2)),
        sft=SFTConfig(steps=5, teacher=TeacherConfig(stop_early_prob=0.9)),
        rl=RLConfig(grpo=GRPOConfig(num_generations=4, kl_coef=0.0),
                    reward_weights={"f1": 1.0}),
        mesh=MeshConfig(data=2, tensor=4))
    again = config_from_dict(RunConfig, json.loads(config_to_json(config)))
    self.assertEqual(again, config)
    self.assertIsInstance(again.world.split_fractions, tuple)
    self.assertNotEqual(again, dataclasses.replace(config, seed=4))

  def test_unknown_fields_are_an_error(self):
    data = json.loads(config_to_json(RunConfig()))
    data["sft"]["stepz"] = 3
    with self.assertRaisesRegex(ValueError, "SFTConfig has no fields \\['stepz'\\]"):
      config_from_dict(RunConfig, data)


if __name__ == "__main__":
  absltest.main()
