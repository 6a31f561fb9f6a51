"""A `scan_layers` policy decodes with its layers unrolled (`RolloutConfig.unroll_layers`):
the same episodes as the scanned decode, with and without LoRA adapters."""
import dataclasses

import jax
import numpy as np
from absl.testing import absltest, parameterized

from jaxsearch.data.world import WorldConfig
from jaxsearch.models.lora import LoraConfig
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.programs.search_agent.experiment import RunConfig, setup
from jaxsearch.rollout.search_env import RolloutConfig


class UnrolledDecodeTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_scanned_policy_writes_the_same_episodes_unrolled(self, lora):
    config = RunConfig(
        world=WorldConfig(num_people=30, num_distractors=5, train_size=20, validation_size=5,
                          test_size=8),
        tokenizer_vocab_size=512,
        model=TransformerConfig(vocab_size=512, d_model=64, num_layers=3, num_heads=4,
                                num_kv_heads=2, mlp_dim=128, scan_layers=True),
        lora=LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj")) if lora else None,
        rollout=RolloutConfig(max_len=96, max_searches=2, temperature=1.0))
    unrolled = setup(config)
    scanned = setup(dataclasses.replace(
        config, rollout=dataclasses.replace(config.rollout, unroll_layers=False)))
    params, _ = unrolled.init_params(jax.random.key(0))
    self.assertIn("layers", params)                      # stacked: a scanned policy
    # Every leaf moved off its init (LoRA's B starts at zero), so each layer's slice matters.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                for x, k in zip(leaves, keys)])
    prompts, lens = unrolled.encode_prompts(unrolled.world.splits["test"])
    rng = jax.random.key(2)
    a = jax.device_get(unrolled.train_rollout_fn(params, unrolled.tool, prompts, lens, rng))
    b = jax.device_get(scanned.train_rollout_fn(params, scanned.tool, prompts, lens, rng))
    # Sampled at temperature 1 with the same key: the same tokens need the same logits.
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.policy_mask, b.policy_mask)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    self.assertGreater(int(a.policy_mask.sum()), 8 * 4)   # the policy wrote tokens
    np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
