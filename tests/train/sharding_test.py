"""Meshes, the logical rules table, and sharded updates equal to single-device ones."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from jaxsearch.models.transformer import Transformer, TransformerConfig
from jaxsearch.train import sharding
from jaxsearch.train.state import TrainState
from jaxsearch.train.steps import make_sft_update_fn
from jaxsearch.types import SequenceBatch

CFG = TransformerConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=8, num_kv_heads=4,
                        mlp_dim=64)
MODEL = Transformer(CFG)


def apply_fn(variables, tokens):
  return MODEL.apply(variables, tokens)


class MeshTest(parameterized.TestCase):

  @parameterized.parameters(((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)),
                            ((1, 2, 4), (1, 2, 4)), ((2, 4, -1), (2, 4, 1)))
  def test_shapes(self, sizes, expected):
    cfg = sharding.MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2])
    self.assertEqual(cfg.shape(8), expected)
    self.assertEqual(tuple(sharding.make_mesh(cfg).shape.values()), expected)

  def test_bad_meshes_name_the_problem(self):
    with self.assertRaisesRegex(ValueError, "does not divide 8"):
      sharding.MeshConfig(data=-1, fsdp=3).shape(8)
    with self.assertRaisesRegex(ValueError, "has 4 devices but 8"):
      sharding.MeshConfig(data=2, fsdp=2).shape(8)
    with self.assertRaisesRegex(ValueError, "at most one -1"):
      sharding.MeshConfig(data=-1, fsdp=-1)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2))
    with self.assertRaisesRegex(ValueError, "batch_size has 12 rows.*multiple of 8"):
      sharding.check_batch(12, mesh, "batch_size")

  @parameterized.parameters((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4))
  def test_sharded_update_matches_single_device(self, data, fsdp, tensor):
    tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, 64)
    mask = jax.random.bernoulli(jax.random.key(2), 0.7, (8, 12))
    boxed = MODEL.init(jax.random.key(0), tokens)["params"]
    params, specs = nn.meta.unbox(boxed), nn.get_partition_spec(boxed)
    update = make_sft_update_fn(apply_fn)
    tx = optax.sgd(0.5)
    single, m_single = jax.jit(update)(TrainState.create(apply_fn=apply_fn, params=params, tx=tx),
                                       SequenceBatch(tokens, mask))

    mesh = sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      sharded_params = jax.device_put(params, sharding.param_shardings(specs, mesh))
      state = TrainState.create(apply_fn=apply_fn, params=sharded_params, tx=tx)
      batch = sharding.shard_batch(SequenceBatch(tokens, mask), mesh)
      out, m_sharded = jax.jit(update)(state, batch)
    embedding = out.params["embed"]["embedding"]
    expected = jax.sharding.NamedSharding(
        mesh, P("tensor" if tensor > 1 else None, "fsdp" if fsdp > 1 else None))
    self.assertTrue(embedding.sharding.is_equivalent_to(expected, 2), embedding.sharding)
    self.assertTrue(out.opt_state is not None)
    np.testing.assert_allclose(m_sharded["loss"], m_single["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(out.params)):
      np.testing.assert_allclose(a, b, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
