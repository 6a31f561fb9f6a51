"""Every config names the bad value and what it expected."""
import subprocess
import sys

from absl.testing import absltest, parameterized

from jaxsearch.rollout.search_env import RolloutConfig
from jaxsearch.programs.search_agent.experiment import RLConfig, RunConfig, SFTConfig
from jaxsearch.train.steps import PolicyGradientConfig


class ConfigErrorsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("generations", PolicyGradientConfig, dict(num_generations=1), "num_generations must be >= 2, got 1"),
      ("kl_kind", PolicyGradientConfig, dict(kl_kind="k9"), "kl_kind must be one of .* got 'k9'"),
      ("agg", PolicyGradientConfig, dict(agg="sum"), "agg must be one of .* got 'sum'"),
      ("scale", PolicyGradientConfig, dict(advantage_options={"scale": "std"}), "'group', 'batch', 'none'\\), got 'std'"),
      ("max_len", RolloutConfig, dict(max_len=0), "max_len must be >= 1, got 0"),
      ("top_p", RolloutConfig, dict(top_p=1.5), "top_p must be in \\(0, 1\\], got 1.5"),
      ("temperature", RolloutConfig, dict(temperature=-1.0), "temperature must be >= 0, got -1.0"),
      ("sft_steps", SFTConfig, dict(steps=-1), "steps must be >= 0, got -1"),
      ("sft_batch", SFTConfig, dict(batch_size=0), "batch_size must be >= 1, got 0"),
      ("rl_steps", RLConfig, dict(steps=-5), "steps must be >= 0, got -5"),
      ("split", RunConfig, dict(eval_split="dev"), "eval_split must be train/validation/test, got 'dev'"),
      ("eval_batch", RunConfig, dict(eval_batch_size=0), "eval_batch_size must be >= 1, got 0"),
  )
  def test_bad_value_is_named(self, cls, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      cls(**kwargs)


class ImportTimeTest(absltest.TestCase):

  def test_importing_the_programs_initialises_no_backend(self):
    # Multi-host runs call jax.distributed.initialize() after importing the programs (whose
    # default configs are built, and validated, at import time): nothing may touch a device.
    code = ("import jaxsearch.programs.search_agent.loop, jaxsearch.programs.reward_model, "
            "jaxsearch.programs.dense_retriever, jaxsearch.programs.realm, "
            "jaxsearch.programs.generative_retrieval\n"
            "from jaxsearch.train.steps import PolicyGradientConfig\n"
            "PolicyGradientConfig(advantage='stratified', advantage_options={'blend': 0.3})\n"
            "from jax._src import xla_bridge\n"
            "print(xla_bridge.backends_are_initialized())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    self.assertEqual(out.stdout.strip().splitlines()[-1], "False", out.stderr[-2000:])


if __name__ == "__main__":
  absltest.main()
