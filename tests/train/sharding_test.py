"""Meshes, the logical rules table, sharded init / updates / restore, AOT reports and MFU."""
import glob
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsearch.checkpoint import Checkpointer
from jaxsearch.models.transformer import Transformer, TransformerConfig, count_params
from jaxsearch.train import sharding
from jaxsearch.train.optim import OptimizerConfig, make_optimizer
from jaxsearch.train.state import TrainState
from jaxsearch.train.steps import make_sft_update_fn
from jaxsearch.types import SequenceBatch
from tests import compiled

CFG = TransformerConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=8, num_kv_heads=4,
                        mlp_dim=64)
MODEL = Transformer(CFG)


def apply_fn(variables, tokens):
  return compiled.apply(MODEL, variables, tokens)


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

  def test_sharded_update_matches_single_device(self):
    self._check_sharded_update_matches_single_device(2, 2, 2)

  # Also covered, for GRPO and PPO, by tests/train/sharded_updates_test.py.
  @parameterized.parameters((8, 1, 1), (2, 4, 1), (1, 2, 4))
  @pytest.mark.slow
  def test_sharded_update_matches_single_device_slow_meshes(self, data, fsdp, tensor):
    self._check_sharded_update_matches_single_device(data, fsdp, tensor)

  def _check_sharded_update_matches_single_device(self, data, fsdp, tensor):
    tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, 64)
    mask = jax.random.bernoulli(jax.random.key(2), 0.7, (8, 12))
    boxed = compiled.init(MODEL, jax.random.key(0), tokens)["params"]
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


TX = make_optimizer(OptimizerConfig(learning_rate=1e-2, weight_decay=0.1))   # clip + AdamW


def init_fn(rng):
  """A TrainState from boxed parameters; the init batch of 8 rows splits over any mesh."""
  params = compiled.init(MODEL, rng, jnp.zeros((8, 12), jnp.int32))["params"]
  return TrainState.create(apply_fn=apply_fn, params=params, tx=TX)


def _mesh(data, fsdp, tensor, devices=None):
  return sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices)


class ShardedInitTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.mesh = _mesh(2, 2, 2)
    cls.state, cls.shardings = sharding.sharded_init(init_fn, jax.random.key(0), cls.mesh)

  def test_values_equal_unsharded_init(self):
    boxed = compiled.init(MODEL, jax.random.key(0), jnp.zeros((8, 12), jnp.int32))["params"]
    reference = nn.meta.unbox(boxed)
    for path, a in jax.tree_util.tree_leaves_with_path(reference):
      b = dict(jax.tree_util.tree_leaves_with_path(self.state.params))[path]
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8, err_msg=str(path))
    self.assertEqual(int(self.state.step), 0)

  def test_born_sharded_per_rules(self):
    emb = self.state.params["embed"]["embedding"]                  # [V, D] = (vocab, embed)
    self.assertTrue(emb.sharding.is_equivalent_to(NamedSharding(self.mesh, P("tensor", "fsdp")), 2))
    # Each device holds a quarter of it (tensor x fsdp = 4), replicated over data.
    self.assertEqual({s.data.shape for s in emb.addressable_shards}, {(32, 16)})
    q = self.state.params["layers_0"]["attn"]["q_proj"]["kernel"]  # [D, H, hd]
    self.assertEqual(q.sharding.spec, P("fsdp", "tensor", None))
    self.assertEqual(self.shardings.params["embed"]["embedding"], emb.sharding)

  def test_optimizer_state_follows_params(self):
    adam = self.state.opt_state[1][0]                              # chain(clip, adamw)
    for moments in (adam.mu, adam.nu):
      for p, m in zip(jax.tree.leaves(self.state.params), jax.tree.leaves(moments)):
        self.assertEqual(p.shape, m.shape)
        self.assertTrue(m.sharding.is_equivalent_to(p.sharding, p.ndim), (m.sharding, p.sharding))
    self.assertTrue(adam.count.sharding.is_fully_replicated)

  def test_sharded_train_state_matches(self):
    boxed = compiled.init(MODEL, jax.random.key(0), jnp.zeros((8, 12), jnp.int32))["params"]
    state, shardings = sharding.sharded_train_state(
        nn.meta.unbox(boxed), nn.get_partition_spec(boxed), apply_fn=apply_fn, tx=TX,
        mesh=self.mesh)
    for a, b in zip(jax.tree.leaves(shardings), jax.tree.leaves(self.shardings)):
      self.assertEqual(a, b)
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(self.state.opt_state)):
      self.assertTrue(a.sharding.is_equivalent_to(b.sharding, a.ndim))

  def test_assert_sharded(self):
    sharding.assert_sharded(self.state.params, min_size=100)
    replicated = jax.device_put(self.state.params, sharding.replicated(self.mesh))
    with self.assertRaisesRegex(ValueError, r"embed/embedding \(64, 32\).*layers_0/attn/q_proj"):
      sharding.assert_sharded(replicated, min_size=100)
    # Only parameters above min_size count (the biggest, the embedding, has 2048 elements).
    sharding.assert_sharded(replicated, min_size=2048)
    # Abstract parameters with a sharding tree: one replicated leaf is named.
    abstract = sharding.abstract_like(self.state.params)
    shardings = dict(self.shardings.params, embed={"embedding": sharding.replicated(self.mesh)})
    with self.assertRaisesRegex(ValueError, r"^(?!.*q_proj).*embed/embedding"):
      sharding.assert_sharded(abstract, shardings, min_size=100)
    # A pure data-parallel mesh replicates parameters by design.
    dp = jax.device_put(self.state.params, sharding.replicated(_mesh(8, 1, 1)))
    sharding.assert_sharded(dp, min_size=100)
    # A parameter left on one device is unsharded.
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with self.assertRaisesRegex(ValueError, "embed/embedding"):
      sharding.assert_sharded(abstract, jax.tree.map(lambda _: single, abstract), min_size=100,
                              mesh=self.mesh)

  def test_restore_on_a_four_device_mesh(self):
    # Not just init values: every leaf (moments and step included) made distinct.
    state = jax.tree.map(lambda x: x * 2 + 1, self.state)
    directory = tempfile.mkdtemp()
    ckpt = Checkpointer(directory)
    ckpt.save(3, {"params": state.params, "opt_state": state.opt_state, "step": state.step},
              {"phase": "rl"})
    ckpt.close()
    mesh4 = _mesh(1, 2, 2, devices=jax.devices()[:4])
    target, target_sh = sharding.sharded_abstract(init_fn, jax.random.key(0), mesh4)
    ckpt = Checkpointer(directory)
    tree, meta = ckpt.restore(3, {"params": target.params, "opt_state": target.opt_state,
                                  "step": target.step})
    ckpt.close()
    self.assertEqual(meta, {"phase": "rl"})
    self.assertEqual(int(tree["step"]), 1)
    saved = {"params": state.params, "opt_state": state.opt_state, "step": state.step}
    self.assertEqual(jax.tree.structure(saved), jax.tree.structure(tree))
    expected_sh = {"params": target_sh.params, "opt_state": target_sh.opt_state,
                   "step": target_sh.step}
    for a, b, s in zip(jax.tree.leaves(saved), jax.tree.leaves(tree), jax.tree.leaves(expected_sh)):
      np.testing.assert_array_equal(a, b)
      self.assertEqual(b.sharding, s)
      self.assertEqual(b.sharding.device_set, set(jax.devices()[:4]))
    emb = tree["params"]["embed"]["embedding"]
    self.assertEqual(emb.sharding.spec, P("tensor", "fsdp"))
    self.assertEqual({s.data.shape for s in emb.addressable_shards}, {(32, 16)})


class CompileReportTest(absltest.TestCase):

  def test_matmul_hand_computed(self):
    mesh = _mesh(8, 1, 1)
    rows = NamedSharding(mesh, P("data"))
    fn = sharding.jit_sharded(lambda a, b: a @ b, (rows, sharding.replicated(mesh)), rows)
    report = sharding.compile_report(fn, jax.ShapeDtypeStruct((64, 32), jnp.float32,
                                                              sharding=rows),
                                     jax.ShapeDtypeStruct((32, 16), jnp.float32,
                                                          sharding=sharding.replicated(mesh)))
    self.assertEqual(report["flops_per_device"], 2 * 8 * 32 * 16)     # 8 of the 64 rows
    self.assertEqual(report["argument_bytes"], 4 * (8 * 32 + 32 * 16))
    self.assertEqual(report["output_bytes"], 4 * 8 * 16)
    self.assertEqual(report["alias_bytes"], 0)
    self.assertEqual(report["num_devices"], 8)
    for key in ("temp_bytes", "generated_code_bytes", "total_bytes", "compile_seconds",
                "bytes_accessed_per_device"):
      self.assertGreaterEqual(report[key], 0, key)

  def test_donation_aliases(self):
    mesh = _mesh(2, 2, 2)
    w = NamedSharding(mesh, P("tensor", "fsdp"))
    fn = sharding.jit_sharded(lambda p: jax.tree.map(lambda x: x + 1.0, p), ({"w": w},),
                              {"w": w}, donate_argnums=0)
    report = sharding.compile_report(
        fn, {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=w)})
    shard_bytes = 4 * 32 * 16                                   # a [32, 16] quarter per device
    self.assertEqual(report["argument_bytes"], shard_bytes)
    self.assertEqual(report["output_bytes"], shard_bytes)
    self.assertEqual(report["alias_bytes"], shard_bytes)       # written in place
    self.assertEqual(report["flops_per_device"], 32 * 16)


class FlopsTest(parameterized.TestCase):

  def test_transformer_flops_hand_computed(self):
    # CFG: V=64, D=32, L=2, H=8, Hkv=4, hd=4, F=64. Per layer q 32*8*4 + k,v 2*32*4*4
    # + o 8*4*32 + mlp 3*32*64 = 9216; N = 2*9216 + head 32*64 = 20480.
    n = 20480
    self.assertEqual(sharding.transformer_flops_per_token(CFG, 16),
                     6 * n + 12 * 2 * 8 * 4 * 16)
    self.assertEqual(sharding.transformer_flops_per_token(CFG, 16, backward=False),
                     2 * n + 4 * 2 * 8 * 4 * 16)
    # N is the parameter count without the norm scales (tied head = the embedding).
    params = jax.eval_shape(MODEL.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    norms = 2 * 2 * 32 + 32
    self.assertEqual(count_params(params["params"]) - norms, n)

  def test_flops_close_to_xla_count(self):
    cfg = TransformerConfig(vocab_size=512, d_model=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, mlp_dim=512)
    model, t = Transformer(cfg), 64
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, t), jnp.int32))
    tokens = jax.ShapeDtypeStruct((4, t), jnp.int32)
    fwd = jax.jit(lambda p, x: compiled.apply(model, p, x))
    grad = jax.jit(jax.grad(lambda p, x: compiled.apply(model, p, x).sum()))
    for fn, backward in ((fwd, False), (grad, True)):
      xla = sharding.compile_report(fn, params, tokens)["flops_per_device"] / (4 * t)
      ours = sharding.transformer_flops_per_token(cfg, t, backward=backward)
      self.assertLess(abs(xla / ours - 1), 0.05, (backward, xla, ours))

  def test_peak_flops_and_mfu(self):
    self.assertEqual(sharding.peak_flops("TPU v4"), 275e12)
    self.assertEqual(sharding.peak_flops("TPU v5 lite"), 197e12)
    self.assertEqual(sharding.peak_flops("TPU v5"), 459e12)
    self.assertEqual(sharding.peak_flops("TPU v5p"), 459e12)
    self.assertEqual(sharding.peak_flops("NVIDIA A100-SXM4-80GB"), 312e12)
    self.assertEqual(sharding.peak_flops("NVIDIA H100 80GB HBM3"), 989e12)
    self.assertEqual(sharding.peak_flops("NVIDIA H100 PCIe"), 756e12)
    self.assertEqual(sharding.peak_flops("NVIDIA H200"), 989e12)
    self.assertEqual(sharding.peak_flops("cpu"), sharding.cpu_peak_flops())
    with self.assertRaisesRegex(ValueError, "'TPU v9'"):
      sharding.peak_flops("TPU v9")
    # 1e9 FLOPs/token x 1e5 tokens/s = 1e14 FLOP/s over 2 x 989e12.
    self.assertAlmostEqual(sharding.mfu(1e9, 1e5, "NVIDIA H100 80GB HBM3", 2),
                           1e14 / 1.978e15)
    self.assertAlmostEqual(sharding.mfu(2e6, 1e4, "cpu", 1, peak=1e11), 0.2)
    with self.assertRaisesRegex(ValueError, "num_devices"):
      sharding.mfu(1.0, 1.0, "cpu", 0)

  def test_cpu_probe(self):
    flops = sharding.measure_cpu_peak_flops(n=256, repeats=2)
    # A 2 n^3 matmul on any CPU of the last decade: between 0.1 GFLOP/s and 100 TFLOP/s.
    self.assertTrue(1e8 < flops < 1e14, flops)

  @parameterized.named_parameters(
      ("avx512", ["sse2", "avx", "avx2", "fma", "avx512f"], "x86_64", 64),   # 2 x 16 x 2
      ("avx2_fma", ["sse2", "avx", "avx2", "fma"], "x86_64", 32),             # 2 x 8 x 2
      ("avx2_without_fma", ["sse2", "avx", "avx2"], "x86_64", 16),            # add + mul
      ("sse", ["sse2"], "x86_64", 8),
      ("neon", ["fp", "asimd"], "aarch64", 16))                               # 2 x 4 x 2
  def test_cpu_flops_per_cycle(self, flags, machine, want):
    self.assertEqual(sharding.cpu_flops_per_cycle(flags, machine), want)

  def test_cpu_peak_is_this_hosts(self):
    # 2 cores x 32 FLOPs per cycle x 2.5 GHz.
    self.assertEqual(sharding.theoretical_cpu_peak_flops(cores=2, ghz=2.5, flops_per_cycle=32),
                     1.6e11)
    self.assertEqual(sharding.theoretical_cpu_peak_flops(cores=1, ghz=2.5, flops_per_cycle=32),
                     8e10)
    self.assertBetween(sharding.cpu_cores(), 1, os.cpu_count())
    peak = sharding.peak_flops("cpu")
    self.assertGreaterEqual(peak, sharding.theoretical_cpu_peak_flops())
    self.assertGreaterEqual(peak, sharding.measure_cpu_peak_flops(n=256, repeats=2))
    self.assertEqual(sharding.peak_flops("cpu"), peak)   # once per process

  def test_quickstart_sft_mfu_is_below_one(self):
    # gin/models/tiny.gin with the quickstart's tokenizer and SFT batch (32 rows).
    cfg = TransformerConfig(vocab_size=1024, d_model=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, mlp_dim=384, max_len=256)
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (32, 128), 3, cfg.vocab_size)
    params = compiled.init(model, jax.random.key(1), tokens[:, :-1])["params"]
    state = TrainState.create(apply_fn=model.apply, params=params,
                              tx=make_optimizer(OptimizerConfig(), 10))
    update = jax.jit(make_sft_update_fn(model.apply))
    batch = SequenceBatch(tokens, jnp.ones(tokens.shape, bool))
    state, m = update(state, batch)
    jax.block_until_ready(m)
    best = float("inf")
    for _ in range(3):
      t0 = time.perf_counter()
      state, m = update(state, batch)
      jax.block_until_ready(m)
      best = min(best, time.perf_counter() - t0)
    flops = tokens.size * sharding.transformer_flops_per_token(cfg, tokens.shape[1])
    mfu = flops / best / sharding.peak_flops("cpu")
    self.assertBetween(mfu, 1e-4, 1.0)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUIRED_MESH_FILES = ("cpu.gin", "cpu8_fake.gin", "gpu1.gin", "gpu8_node.gin", "tpu_v5e_8.gin",
                       "tpu_v5p_64.gin")
EXPECTED_SHAPES = {"cpu.gin": (1, 1, 1), "cpu8_fake.gin": (8, 1, 1), "gpu1.gin": (1, 1, 1),
                   "gpu8_node.gin": (1, 8, 1), "tpu_v5e_8.gin": (1, 8, 1),
                   "tpu_v5p_64.gin": (2, 16, 1), "cpu8_2x2x2.gin": (2, 2, 2)}


class GinMeshTest(absltest.TestCase):

  def test_every_mesh_file_parses_and_fits_its_devices(self):
    import gin  # noqa: PLC0415
    from experiments.run import parse_gin  # noqa: PLC0415
    from jaxsearch.programs.search_agent.experiment import RunConfig  # noqa: PLC0415
    files = sorted(glob.glob(os.path.join(REPO, "gin", "mesh", "*.gin")))
    names = {os.path.basename(f) for f in files}
    self.assertContainsSubset(REQUIRED_MESH_FILES, names)
    for path in files:
      name = os.path.basename(path)
      with open(path) as f:
        text = f.read()
      self.assertTrue(text.startswith("#"), f"{name} needs a header comment")
      stated = re.search(r"^# Devices: (\d+|any)", text, re.M)
      self.assertIsNotNone(stated, f"{name} must state '# Devices: N' in its header")
      gin.clear_config()
      try:
        parse_gin(["gin/experiments/quickstart.gin", os.path.relpath(path, REPO)], [])
        config = gin.query_parameter("loop.run.config").scoped_configurable_fn()
      finally:
        gin.clear_config()
      self.assertIsInstance(config, RunConfig)
      mesh = config.mesh
      counts = (1, 8, 32) if stated.group(1) == "any" else (int(stated.group(1)),)
      for n in counts:
        shape = mesh.shape(n)                    # raises when the mesh does not fit n devices
        self.assertEqual(int(np.prod(shape)), n, name)
      if name in EXPECTED_SHAPES:
        self.assertEqual(mesh.shape(counts[0]), EXPECTED_SHAPES[name], name)


if __name__ == "__main__":
  absltest.main()
