"""Tests for jaxsearch.models.lora: qwix LoRA on the linen Transformer, merging, sharding, HF."""
from __future__ import annotations

import dataclasses
import functools
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsearch.models import hf
from jaxsearch.models import lora as lora_lib
from jaxsearch.models.transformer import Transformer
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.models.transformer import count_params
from jaxsearch.models.transformer import init_cache
from jaxsearch.models.transformer import make_decode_fn
from jaxsearch.train import sharding

RANK, ALPHA = 4, 8.0
# Keys drawn by the LoRA model (A's init, dropout masks): "unsafe_rbg" compiles in about half
# the time of threefry on CPU, which keeps this file well under a minute.
_KEY = functools.partial(jax.random.key, impl="unsafe_rbg")
LORA = lora_lib.LoraConfig(rank=RANK, alpha=ALPHA)


def _config(**kw) -> TransformerConfig:
  return TransformerConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           mlp_dim=64, **kw)


def _tokens(batch: int = 2, length: int = 8, seed: int = 1) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (batch, length)), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens):
  return model.apply({"params": params}, tokens)


def _numpy_like(abstract, seed: int, zero_b: bool = False):
  """Seeded NumPy values on an abstract tree (jit-compiling `init` takes seconds per config).

  Kernels and adapter A ~ N(0, 1/fan_in) (fan_in: every axis but the last; o_proj kernel and A
  have two input axes), embedding N(0, 0.1^2) (logits of order 1), norm scales near 1; B zero
  with `zero_b`.
  """
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(abstract)
  for path, leaf in flat.items():
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if path[-1] == "scale":
      value = 1.0 + 0.2 * noise
    elif path[-1] == "embedding":
      value = 0.1 * noise
    elif zero_b and path[-1] == "kernel_lora_b":
      value = np.zeros_like(noise)
    else:
      stacked = 1 if path[0] == "layers" else 0                  # scan: leading layers axis
      two_in = path[-2] == "o_proj" and path[-1] != "kernel_lora_b"
      value = noise / np.sqrt(np.prod(leaf.shape[stacked:stacked + 1 + two_in]))
    flat[path] = jnp.asarray(value, leaf.dtype)
  return traverse_util.unflatten_dict(flat)


# The two LoRA setups: the default targets on a per-layer tied model; every target, lm_head
# included, on a scanned untied model.
_SETUPS = {
    "per_layer": (dict(), LORA),
    "scan_untied": (dict(scan_layers=True, tie_embeddings=False),
                    lora_lib.LoraConfig(rank=RANK, alpha=ALPHA, targets=lora_lib.TARGETS)),
}


@functools.cache
def _setup(name: str = "per_layer"):
  """(model, lora model, base params, zero-B adapters, LoraConfig) of a tiny config.

  "per_layer" adapters come from `init_adapters` itself; "scan_untied" ones are NumPy values
  on `init_adapters`' abstract output (B zero).
  """
  model_kw, lora_cfg = _SETUPS[name]
  model = Transformer(_config(**model_kw))
  abstract = jax.eval_shape(model.init, jax.random.key(0), _tokens())["params"]
  base = _numpy_like(nn.meta.unbox(abstract), seed=0)
  lora = lora_lib.lora_model(model, lora_cfg)
  if name == "per_layer":
    adapters = jax.jit(lora_lib.init_adapters, static_argnums=0)(lora, base, _KEY(1))
  else:
    adapters = _numpy_like(jax.eval_shape(
        lambda b, key: lora_lib.init_adapters(lora, b, key), base, jax.random.key(1)), seed=1,
        zero_b=True)
  return model, lora, base, adapters, lora_cfg


def _randomize_b(adapters, seed: int = 0, scale: float = 0.3):
  """The adapters with every B replaced by N(0, scale^2) values (A kept)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(adapters)
  for path, x in flat.items():
    if path[-1].endswith("_lora_b"):
      flat[path] = jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)
  return traverse_util.unflatten_dict(flat)


def _loss(adapters, base, tokens, lora):
  """Next-token cross-entropy of the LoRA model."""
  logits = lora.apply({"params": lora_lib.join_params(base, adapters)}, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


TX = optax.sgd(0.1, momentum=0.9)      # state: one momentum trace per adapter leaf


@functools.cache
def _step(lora):
  """`step(adapters, opt_state, base, tokens) -> (adapters, opt_state, loss, grads)`.

  Only the adapters are differentiated, updated and held in the optimizer state.
  """

  def step(adapters, opt_state, base, tokens):
    loss, grads = jax.value_and_grad(_loss)(adapters, base, tokens, lora)
    updates, opt_state = TX.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss, grads

  return step


@functools.cache
def _jit_step(lora):
  """`jax.jit(_step(lora))`, compiled once for the single-device runs."""
  return jax.jit(_step(lora))


def _hand_count(cfg: TransformerConfig, rank: int) -> int:
  """sum over targets of rank * (in + out), per layer, times the layers."""
  d, h, hkv, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.hd, cfg.mlp_dim
  per_layer = {"q_proj": (d, h * hd), "k_proj": (d, hkv * hd), "v_proj": (d, hkv * hd),
               "o_proj": (h * hd, d), "gate_proj": (d, f), "up_proj": (d, f),
               "down_proj": (f, d)}
  return cfg.num_layers * sum(rank * (i + o) for i, o in per_layer.values())


class LoraForwardTest(parameterized.TestCase):

  def test_zero_adapter_gives_exactly_the_base_logits(self):
    model, lora, base, adapters, _ = _setup()
    flat = traverse_util.flatten_dict(adapters)
    # 7 targets x 2 layers, an A and a B each; A random, B zero.
    self.assertLen(flat, 28)
    for path, x in flat.items():
      if path[-1] == "kernel_lora_b":
        self.assertEqual(float(jnp.abs(x).max()), 0.0, path)
      else:
        self.assertGreater(float(jnp.abs(x).min() + jnp.abs(x).max()), 0.0, path)
    tokens = _tokens()
    np.testing.assert_array_equal(_forward(lora, lora_lib.join_params(base, adapters), tokens),
                                  _forward(model, base, tokens))

  @parameterized.named_parameters(("per_layer", "per_layer"), ("scan_untied", "scan_untied"))
  def test_random_b_changes_logits_and_merge_matches(self, name):
    model, lora, base, adapters, cfg = _setup(name)
    adapters = _randomize_b(adapters)
    if name == "scan_untied":
      self.assertEqual(adapters["layers"]["block"]["attn"]["o_proj"]["kernel_lora_a"].shape,
                       (2, 4, 8, RANK))                     # [L, H, hd, r]
      self.assertEqual(adapters["lm_head"]["kernel_lora_b"].shape, (RANK, 64))
    params = lora_lib.join_params(base, adapters)
    tokens = _tokens()
    base_logits = _forward(model, base, tokens)
    lora_logits = _forward(lora, params, tokens)
    self.assertGreater(float(jnp.abs(lora_logits - base_logits).max()), 0.05)

    merged = lora_lib.merge_lora(params, cfg)
    self.assertEqual(jax.tree.structure(merged), jax.tree.structure(base))
    np.testing.assert_allclose(_forward(model, merged, tokens), lora_logits, atol=1e-5, rtol=0)
    # A wrong scale (alpha / rank off by 2x) would not match.
    wrong = lora_lib.merge_lora(params, dataclasses.replace(cfg, alpha=2 * ALPHA))
    self.assertGreater(float(jnp.abs(_forward(model, wrong, tokens) - lora_logits).max()), 1e-3)

    # Every entry point sees the adapters, including `method=Transformer.decode`
    # (make_decode_fn), which bypasses a subclass's own `decode`.
    cache = init_cache(model.config, batch_size=2, max_len=8)
    decoded, _ = jax.jit(make_decode_fn(lora))(params, tokens, cache, jnp.int32(0))
    np.testing.assert_allclose(decoded, lora_logits, atol=1e-5, rtol=0)

  def test_dropout_applies_to_the_lora_branch_only(self):
    model, _, base, adapters, _ = _setup()
    tokens = _tokens()
    drop = lora_lib.lora_model(model, dataclasses.replace(LORA, dropout=0.5))
    apply = jax.jit(lambda p, key: drop.apply({"params": p}, tokens, rngs={"dropout": key}))
    # B = 0: the base branch never sees dropout.
    np.testing.assert_array_equal(apply(lora_lib.join_params(base, adapters), _KEY(0)),
                                  _forward(model, base, tokens))
    params = lora_lib.join_params(base, _randomize_b(adapters))
    a, b = apply(params, _KEY(0)), apply(params, _KEY(1))
    self.assertGreater(float(jnp.abs(a - b).max()), 1e-3)
    with self.assertRaisesRegex(Exception, "dropout"):
      drop.apply({"params": params}, tokens)               # no dropout rng given


class LoraTrainingTest(absltest.TestCase):

  def test_adapter_gradients_and_frozen_base(self):
    model, lora, base, adapters, _ = _setup()
    tokens = _tokens(8, 12)
    self.assertEqual(count_params(adapters), _hand_count(model.config, RANK))
    self.assertEqual(count_params(adapters), 4096)
    self.assertEqual(lora_lib.count_adapter_params(lora_lib.join_params(base, adapters)), 4096)

    opt_state = TX.init(adapters)
    state_arrays = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    self.assertEqual(sorted(x.shape for x in state_arrays),
                     sorted(x.shape for x in jax.tree.leaves(adapters)))   # momentum only
    self.assertEqual(sum(x.size for x in state_arrays), 4096)

    base_before = jax.tree.map(np.array, base)
    step = _jit_step(lora)
    new_adapters, _, loss, grads = step(adapters, opt_state, base, tokens)
    self.assertTrue(np.isfinite(loss))
    self.assertEqual(jax.tree.structure(grads), jax.tree.structure(adapters))
    # At init (B = 0) only B receives gradient: dL/dA = x^T g B^T = 0.
    for path, g in traverse_util.flatten_dict(grads).items():
      norm = float(jnp.abs(g).max())
      if path[-1] == "kernel_lora_b":
        self.assertGreater(norm, 0.0, path)
      else:
        self.assertEqual(norm, 0.0, path)
    _, _, _, grads = step(_randomize_b(adapters), opt_state, base, tokens)
    for path, g in traverse_util.flatten_dict(grads).items():
      self.assertGreater(float(jnp.abs(g).max()), 0.0, path)

    new_params = lora_lib.join_params(base, new_adapters)
    new_base, got_adapters = lora_lib.split_params(new_params)
    jax.tree.map(np.testing.assert_array_equal, new_base, base_before)
    self.assertEqual(jax.tree.structure(got_adapters), jax.tree.structure(adapters))
    b_change = jnp.abs(new_adapters["layers_0"]["mlp"]["up_proj"]["kernel_lora_b"]).max()
    self.assertGreater(float(b_change), 0.0)
    self.assertGreater(float(jnp.abs(_forward(lora, new_params, _tokens())
                                     - _forward(model, base, _tokens())).max()), 1e-6)

  def test_sharded_step_matches_single_device(self):
    _, lora, base, adapters, _ = _setup()
    adapters = _randomize_b(adapters)
    tokens = _tokens(8, 12)
    step = _step(lora)
    single, _, single_loss, _ = _jit_step(lora)(adapters, TX.init(adapters), base, tokens)

    base_specs, adapter_specs = lora_lib.lora_specs(lora)
    self.assertEqual(adapter_specs["layers_0"]["attn"]["q_proj"]["kernel_lora_b"],
                     P(None, "heads", "head_dim"))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      base_sh = jax.device_put(base, sharding.param_shardings(base_specs, mesh))
      adapter_sh = sharding.param_shardings(adapter_specs, mesh)
      sharded = jax.device_put(adapters, adapter_sh)
      out, _, loss, _ = jax.jit(step, out_shardings=(adapter_sh, None, None, None))(
          sharded, TX.init(sharded), base_sh, sharding.shard_batch(tokens, mesh))
    q = out["layers_0"]["attn"]["q_proj"]
    self.assertTrue(q["kernel_lora_a"].sharding.is_equivalent_to(
        NamedSharding(mesh, P("fsdp", None)), 2), q["kernel_lora_a"].sharding)
    self.assertTrue(q["kernel_lora_b"].sharding.is_equivalent_to(
        NamedSharding(mesh, P(None, "tensor", None)), 3), q["kernel_lora_b"].sharding)
    np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), single, adapters)
    self.assertGreater(min(jax.tree.leaves(moved)), 0.0)     # every adapter leaf was updated
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(out)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)

  def test_merged_checkpoint_loads_in_transformers(self):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    model, lora, base, adapters, _ = _setup()
    params = lora_lib.join_params(base, _randomize_b(adapters))
    tokens = _tokens()
    lora_logits = np.asarray(_forward(lora, params, tokens))
    out = tempfile.mkdtemp(prefix="lora_hf_")
    hf.save_hf_checkpoint(model, lora_lib.merge_lora(params, LORA), out, model_type="llama")
    torch_model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
      ref = torch_model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
    np.testing.assert_allclose(ref, lora_logits, atol=1e-4, rtol=0)
    self.assertGreater(float(np.abs(ref - np.asarray(_forward(model, base, tokens))).max()), 0.05)


class LoraErrorsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("rank_zero", dict(rank=0), r"rank must be an int >= 1, got 0"),
      ("rank_float", dict(rank=2.0), r"rank must be an int >= 1, got 2.0"),
      ("alpha_zero", dict(alpha=0.0), r"alpha must be a finite number > 0, got 0.0"),
      ("unknown_target", dict(targets=("q_proj", "qkv")),
       r"unknown module names \['qkv'\]; valid names: \['q_proj', 'k_proj', 'v_proj', "
       r"'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'lm_head'\]"),
      ("no_targets", dict(targets=()), r"at least one module"),
      ("target_string", dict(targets="q_proj"), r"must be a tuple of module names"),
      ("dropout_one", dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
  )
  def test_bad_config(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      lora_lib.LoraConfig(**kwargs)

  def test_list_targets_become_a_tuple(self):
    self.assertEqual(lora_lib.LoraConfig(targets=["q_proj"]).targets, ("q_proj",))

  def test_bad_uses(self):
    model, _, base, adapters, _ = _setup()
    with self.assertRaisesRegex(ValueError, "ties its embeddings"):
      lora_lib.lora_model(model, lora_lib.LoraConfig(targets=("lm_head",)))
    with self.assertRaisesRegex(TypeError, "needs a jaxsearch Transformer"):
      lora_lib.lora_model(nn.Dense(4), LORA)
    with self.assertRaisesRegex(ValueError, "plain Transformer"):
      lora_lib.init_adapters(model, base, jax.random.key(0))
    params = lora_lib.join_params(base, adapters)
    with self.assertRaisesRegex(ValueError, "has rank 4 but config.rank is 8"):
      lora_lib.merge_lora(params, lora_lib.LoraConfig(rank=8))
    with self.assertRaisesRegex(ValueError, "base holds adapter leaves"):
      lora_lib.join_params(params, adapters)
    with self.assertRaisesRegex(ValueError, "adapters hold non-adapter leaves"):
      lora_lib.join_params(base, base)
    broken = lora_lib.join_params(base, adapters)
    del broken["layers_1"]["mlp"]["down_proj"]["kernel_lora_b"]
    with self.assertRaisesRegex(ValueError, "layers_1/mlp/down_proj/kernel lacks its _lora_b"):
      lora_lib.merge_lora(broken, LORA)


if __name__ == "__main__":
  absltest.main()
