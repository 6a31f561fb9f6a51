"""A gin model file makes SmolLM2-135M-Instruct (GGUF) the search agent's policy."""
from __future__ import annotations

import dataclasses

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsearch.models import pretrained
from jaxsearch.models.transformer import Transformer, unstack_layer_params
from jaxsearch.programs.search_agent import experiment
from tests import compiled


class PretrainedSpecTest(absltest.TestCase):

  def test_unknown_spec_names_the_choices(self):
    with self.assertRaisesRegex(ValueError, "unknown pretrained model 'nope'.*smollm2"):
      pretrained.load_pretrained("nope")
    with self.assertRaisesRegex(ValueError, "non-empty"):
      pretrained.load_pretrained("")


@pytest.mark.slow
class SmolLM2PolicyTest(absltest.TestCase):

  def test_gin_model_file_builds_the_agent_on_smollm2(self):
    from experiments.run import parse_gin  # pylint: disable=import-outside-toplevel
    import gin  # pylint: disable=import-outside-toplevel
    gin.clear_config()
    try:
      parse_gin(["gin/experiments/quickstart.gin", "gin/models/smollm2_135m.gin"], [])
      config = gin.get_configurable(experiment.RunConfig)()
    finally:
      gin.clear_config()
    self.assertEqual(config.pretrained, "smollm2-135m-instruct")
    config = dataclasses.replace(
        config, world=dataclasses.replace(config.world, num_people=20, num_cities=6,
                                          num_countries=3, num_companies=4,
                                          num_distractors=5, train_size=20, validation_size=4,
                                          test_size=4))
    exp = experiment.setup(config)
    # "auto": text tags in SmolLM2's own vocabulary, prompts through its chat template.
    self.assertEqual(exp.env.protocol, "text")
    self.assertEqual(exp.model.config.vocab_size, 49152)
    self.assertEqual(exp.model.config.num_layers, 30)
    self.assertEqual(exp.env.eos_ids, (exp.tokenizer.eos_id,))
    prompt = exp.tokenizer.decode(exp.encode_prompts(exp.world.splits["test"][:1])[0][0],
                                  skip_special=False)
    self.assertIn("<|im_start|>user\nAnswer the question below.", prompt)
    self.assertTrue(prompt.rstrip("<|im_end|>").endswith("<|im_start|>assistant\n"), prompt)
    params, specs = exp.init_params(jax.random.key(0))
    _, ref_params, _ = pretrained.load_pretrained("smollm2-135m-instruct", add_tags=False)
    self.assertTrue(exp.model.config.scan_layers)              # the gin file's preset
    jax.tree.map(np.testing.assert_array_equal, unstack_layer_params(params), ref_params)
    self.assertEqual(jax.tree.structure(params), jax.tree.structure(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    ids = exp.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    logits = compiled.apply(exp.model, {"params": params}, jnp.asarray([ids]))
    ref = compiled.apply(Transformer(dataclasses.replace(exp.model.config, scan_layers=False,
                                                         remat="none", logits_chunk=0)),
                         {"params": ref_params}, jnp.asarray([ids]))
    np.testing.assert_allclose(logits, ref, atol=1e-5)
    # The special-id protocol grows the vocabulary by the 8 tags.
    special = experiment.setup(dataclasses.replace(config, protocol="special"))
    self.assertEqual(special.model.config.vocab_size, 49160)
    self.assertEqual(special.tokenizer.tag_id("<search>"), 49152)
    self.assertEqual(special.env.search_open, 49152)


if __name__ == "__main__":
  absltest.main()
