"""The search agent's parameters are born sharded and equal the op-by-op init bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import linen as nn

from jaxsearch.data.world import WorldConfig
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.programs.search_agent.experiment import RunConfig, setup
from jaxsearch.train import sharding
from jaxsearch.train.sharding import MeshConfig


class BornShardedInitTest(absltest.TestCase):

  def test_born_sharded_equals_op_by_op_and_is_sharded(self):
    config = RunConfig(
        world=WorldConfig(num_people=30, num_distractors=5, train_size=20, validation_size=5,
                          test_size=5),
        tokenizer_vocab_size=512,
        model=TransformerConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, mlp_dim=128),
        mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    exp = setup(config)
    rng = jax.random.fold_in(jax.random.key(3), 0)
    eager, specs = exp.init_params(rng)
    # `init_params` is jitted with `EXACT_INIT_OPTIONS`: the same bits as op-by-op execution.
    op_by_op = nn.meta.unbox(exp.model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"])
    jax.tree.map(np.testing.assert_array_equal, eager, op_by_op)
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      born, born_specs = exp.init_sharded_params(rng, mesh)
    self.assertEqual(born_specs, specs)
    # Bit for bit: a jitted init with XLA's algebraic simplifier on would move some leaves by
    # an ulp (and every figure of a run after it).
    jax.tree.map(np.testing.assert_array_equal, born, eager)
    expected = sharding.param_shardings(specs, mesh)
    for leaf, want in zip(jax.tree.leaves(born), jax.tree.leaves(expected)):
      self.assertEqual(leaf.sharding, want)
    # The embedding is split (fsdp / tensor), not replicated: no device holds all of it.
    emb = born["embed"]["embedding"]
    self.assertLess(max(s.data.size for s in emb.addressable_shards), emb.size)


if __name__ == "__main__":
  absltest.main()
