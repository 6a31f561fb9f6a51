"""Tests for jaxsearch.models.hf: parity with transformers on tiny random Llama / Qwen2 models.

The reference is transformers 5 + torch (CPU) itself: tiny models are built offline with
random unit-scale weights (`hf_fixtures`), saved with `save_pretrained` (some sharded, some in
bf16 / fp16) and compared with what jaxsearch loads.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st_numpy
import torch
import transformers
from transformers import modeling_rope_utils

from jaxsearch.models import hf
from jaxsearch.models.transformer import Transformer
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.models.transformer import init_cache
from jaxsearch.models.transformer import rope_inv_freq
from tests.models import hf_fixtures as fx

_ARCHS = tuple(fx.ARCHITECTURES)
_NAMED = tuple((n, n) for n in _ARCHS)
_SHARDED = ("llama_gqa_untied", "qwen2_bias_untied", "llama_rope_llama3")


@functools.cache
def _reference(name: str):
  """(torch model, checkpoint dir, tokens [2, 10], transformers logits) of one architecture."""
  model = fx.build(name)
  path = fx.save(model, max_shard_size="8KB" if name in _SHARDED else None)
  ids = fx.tokens(model.config.vocab_size)
  return model, path, ids, fx.torch_logits(model, ids)


@functools.cache
def _loaded(name: str):
  """(model, params, jitted full-forward logits) that jaxsearch loads from `_reference(name)`."""
  _, path, ids, _ = _reference(name)
  model, params = hf.load_hf_checkpoint(path)
  return model, params, np.asarray(_forward(model, params, ids))


def _forward(model, params, ids, **kw):
  return jax.jit(lambda p, t, kw: model.apply({"params": p}, t, **kw))(params, jnp.asarray(ids),
                                                                        kw)


def _head_dim(hc) -> int:
  """transformers' own rule (Qwen2Config has no head_dim attribute unless given one)."""
  return getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads


def _leaves(params) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(nn.unbox(params))
  return {"/".join(k): np.asarray(v) for k, v in flat.items()}


def _assert_trees_equal(test, got, want):
  got, want = _leaves(got), _leaves(want)
  test.assertEqual(set(got), set(want))
  for k in want:
    test.assertEqual(got[k].dtype, want[k].dtype, k)
    test.assertTrue(np.array_equal(got[k], want[k]), k)


def _rewrite(src: str, mutate) -> str:
  """Copy of a single-file fp32 checkpoint whose tensor dict went through `mutate`."""
  dst = tempfile.mkdtemp(prefix="hf_bad_")
  shutil.copy(os.path.join(src, "config.json"), dst)
  tensors = st_numpy.load_file(os.path.join(src, "model.safetensors"))
  mutate(tensors)
  st_numpy.save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  return dst


class _TestCase(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    # Tiny models: XLA's optimisation passes would dominate the compile time.
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    self.addCleanup(jax.config.update, "jax_disable_most_optimizations", previous)


class HFParityTest(_TestCase):

  @parameterized.named_parameters(*_NAMED)
  def test_logits_match_transformers(self, name):
    torch_model, path, _, ref = _reference(name)
    model, params, logits = _loaded(name)
    hc = torch_model.config
    cfg = model.config
    self.assertEqual((cfg.num_heads, cfg.num_kv_heads, cfg.hd, cfg.tie_embeddings),
                     (hc.num_attention_heads, hc.num_key_value_heads, _head_dim(hc),
                      hc.tie_word_embeddings))
    self.assertEqual(cfg.qkv_bias, hc.model_type == "qwen2")
    self.assertEqual(cfg.qk_norm, hc.model_type == "qwen3")
    self.assertEqual(cfg.rope_type, hc.rope_parameters["rope_type"])
    self.assertEqual("lm_head" in params, not hc.tie_word_embeddings)
    if name in _SHARDED:
      self.assertTrue(os.path.exists(os.path.join(path, "model.safetensors.index.json")))
    self.assertTrue(all(x.dtype == jnp.float32 for x in jax.tree.leaves(params)))
    # transformers honours the RoPE variant, and jaxsearch has the same frequencies.
    hf_inv_freq = torch_model.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(rope_inv_freq(cfg), hf_inv_freq, rtol=1e-6)
    default = 1.0 / hc.rope_parameters["rope_theta"] ** (np.arange(0, cfg.hd, 2) / cfg.hd)
    self.assertEqual(np.allclose(hf_inv_freq, default, rtol=1e-5), cfg.rope_type == "default")

    self.assertEqual(logits.shape, ref.shape)
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)

  @parameterized.named_parameters(*_NAMED)
  def test_cached_decode_matches_full_forward(self, name):
    _, _, ids, ref = _reference(name)
    model, params, full = _loaded(name)
    decode = jax.jit(lambda p, t, c, i: model.apply({"params": p}, t, c, i,
                                                    method=Transformer.decode))
    cache = init_cache(model.config, ids.shape[0], max_len=ids.shape[1] + 2)
    prefill, cache = decode(params, jnp.asarray(ids[:, :4]), cache, jnp.int32(0))
    steps = [prefill]
    for i in range(4, ids.shape[1]):
      logits, cache = decode(params, jnp.asarray(ids[:, i:i + 1]), cache, jnp.int32(i))
      steps.append(logits)
    steps = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(steps, full, atol=2e-5, rtol=0)
    np.testing.assert_allclose(steps, ref, atol=1e-4, rtol=0)

  @parameterized.parameters("llama_gqa_untied", "qwen2_bias_tied")
  def test_left_padded_batch_matches_transformers(self, name):
    torch_model, _, ids, _ = _reference(name)
    model, params, _ = _loaded(name)
    mask = np.ones(ids.shape, bool)
    mask[0, :3] = False                                            # row 0 left-padded by 3
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    with torch.no_grad():
      ref = torch_model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                        attention_mask=torch.from_numpy(mask.astype(np.int64)),
                        position_ids=torch.from_numpy(positions.astype(np.int64))).logits.numpy()
    logits = _forward(model, params, ids, positions=jnp.asarray(positions),
                      attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(logits)[mask], ref[mask], atol=1e-4, rtol=0)


class RoundTripTest(_TestCase):

  @parameterized.named_parameters(
      *[(f"{n}_{'sharded' if k % 2 == 0 else 'single'}", n, k % 2 == 0)
        for k, n in enumerate(_ARCHS)])
  def test_save_load_round_trip_and_transformers_load(self, name, sharded):
    torch_model, path, ids, ref = _reference(name)
    model, params = hf.load_hf_checkpoint(path)
    out = tempfile.mkdtemp(prefix="hf_out_")
    written = hf.save_hf_checkpoint(model, params, out, model_type=torch_model.config.model_type,
                                    max_shard_bytes=6000 if sharded else None)
    self.assertCountEqual(written, os.listdir(out))
    shards = [f for f in written if f.endswith(".safetensors")]
    if sharded:
      self.assertGreater(len(shards), 1)
      with open(os.path.join(out, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
      self.assertCountEqual(set(weight_map.values()), shards)
    else:
      self.assertEqual(shards, ["model.safetensors"])

    model2, params2 = hf.load_hf_checkpoint(out)
    self.assertEqual(model2.config, model.config)
    _assert_trees_equal(self, params2, params)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    self.assertIsInstance(reloaded, type(torch_model))
    for key in ("num_key_value_heads", "tie_word_embeddings", "rope_parameters",
                "rms_norm_eps", "vocab_size", "intermediate_size"):
      self.assertEqual(getattr(reloaded.config, key), getattr(torch_model.config, key), key)
    self.assertEqual(_head_dim(reloaded.config), _head_dim(torch_model.config))
    want = fx.state_dict_numpy(torch_model)
    got = fx.state_dict_numpy(reloaded)
    self.assertEqual(set(got), set(want))
    for k in want:
      self.assertTrue(np.array_equal(got[k], want[k]), k)
    np.testing.assert_allclose(fx.torch_logits(reloaded, ids), ref, atol=1e-6, rtol=0)

  @parameterized.named_parameters(
      ("qwen2_head_dim_llama3_sharded", "qwen2", False, dict(
          num_kv_heads=2, head_dim=12, qkv_bias=True, tie_embeddings=False, rope_type="llama3",
          rope_factor=4.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
          rope_original_max_len=24, rope_theta=1e4), 5000),
      ("llama_mqa_tied_linear_scan", "llama", True, dict(
          num_kv_heads=1, tie_embeddings=True, rope_type="linear", rope_factor=2.0,
          rope_theta=300.0), None),
  )
  def test_export_boxed_jaxsearch_params(self, model_type, scan, overrides, shard_bytes):
    cfg = TransformerConfig(vocab_size=80, d_model=32, num_layers=2, num_heads=4, mlp_dim=40,
                            norm_eps=1e-5, max_len=64, scan_layers=scan, **overrides)
    model = Transformer(cfg)
    ids = fx.tokens(cfg.vocab_size, seed=3)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(ids))["params"]
    rng = np.random.default_rng(0)

    def fill(box):                                   # unit-scale values in the boxes
      value = rng.standard_normal(box.value.shape) / np.sqrt(box.value.shape[-1])
      return box.replace_boxed(jnp.asarray(value, jnp.float32))

    boxed = jax.tree.map(fill, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    self.assertIsInstance(jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(
        x, nn.LogicallyPartitioned))[0], nn.LogicallyPartitioned)
    params = nn.unbox(boxed)
    self.assertEqual("layers" in params, scan)
    out = tempfile.mkdtemp(prefix="hf_export_")
    hf.save_hf_checkpoint(cfg, boxed, out, model_type=model_type, max_shard_bytes=shard_bytes)

    model2, params2 = hf.load_hf_checkpoint(out, scan_layers=scan)
    self.assertEqual(model2.config, cfg)
    _assert_trees_equal(self, params2, params)
    logits = np.asarray(_forward(model, params, ids))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    self.assertEqual(torch_model.config.model_type, model_type)
    np.testing.assert_allclose(fx.torch_logits(torch_model, ids), logits, atol=1e-4, rtol=0)

    # bf16 export: transformers loads bf16 weights; jaxsearch loads them back unchanged.
    out16 = tempfile.mkdtemp(prefix="hf_export16_")
    hf.save_hf_checkpoint(model, {"params": params}, out16, model_type=model_type,
                          dtype="bfloat16")
    with open(os.path.join(out16, "config.json")) as f:
      self.assertEqual(json.load(f)["dtype"], "bfloat16")
    torch16 = transformers.AutoModelForCausalLM.from_pretrained(out16)
    self.assertEqual(next(torch16.parameters()).dtype, torch.bfloat16)
    model16, params16 = hf.load_hf_checkpoint(out16, scan_layers=scan)
    self.assertEqual(model16.config.param_dtype, "bfloat16")
    _assert_trees_equal(self, params16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))

  @parameterized.parameters(("bfloat16", torch.bfloat16), ("float16", torch.float16))
  def test_low_precision_checkpoint(self, dtype, torch_dtype):
    name = "qwen2_bias_untied"
    torch_model = fx.build(name, seed=5).to(torch_dtype)
    path = fx.save(torch_model, max_shard_size="4KB")
    with open(os.path.join(path, "config.json")) as f:
      self.assertEqual(json.load(f)["dtype"], dtype)
    upcast = fx.state_dict_numpy(torch_model)                     # exact: bf16/fp16 -> fp32
    # fp32 reference with the rounded weights (`.float()` would keep RoPE's rounded inv_freq).
    ref_model = fx.build(name, seed=5)
    ref_model.load_state_dict({k: torch.from_numpy(v) for k, v in upcast.items()})

    model, params = hf.load_hf_checkpoint(path)                   # keeps the stored dtype
    self.assertEqual(model.config.param_dtype, dtype)
    self.assertTrue(all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(params)))
    model32, params32 = hf.load_hf_checkpoint(path, param_dtype="float32")
    self.assertEqual(model32.config.param_dtype, "float32")
    _assert_trees_equal(self, params32, jax.tree.map(lambda x: x.astype(jnp.float32), params))
    converted = hf.params_from_hf(upcast, model32.config)
    _assert_trees_equal(self, params32, converted)
    q = upcast["model.layers.1.self_attn.q_proj.weight"]                  # [H*hd, D]
    np.testing.assert_array_equal(params32["layers_1"]["attn"]["q_proj"]["kernel"],
                                  q.T.reshape(32, 4, 8))

    ids = fx.tokens(torch_model.config.vocab_size, seed=2)
    ref = fx.torch_logits(ref_model, ids)
    np.testing.assert_allclose(_forward(model32, params32, ids), ref, atol=1e-4, rtol=0)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("linear", {"rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}),
      ("llama3", {"rope_theta": 500000.0, "rope_scaling": {
          "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
      ("llama3_default_original", {"rope_theta": 10000.0, "rope_scaling": {
          "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
          "high_freq_factor": 8.0}}),
      ("top_level_theta_only", {"rope_theta": 1e6}),
      ("nothing", {}),
  )
  def test_legacy_rope_matches_transformers(self, rope):
    hf_dict = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=64,
                   hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=2, max_position_embeddings=4096, **rope)
    cfg = hf.config_from_hf(hf_dict)
    hc = transformers.LlamaConfig(**json.loads(json.dumps(hf_dict)))
    rope_type = hc.rope_parameters["rope_type"]
    self.assertEqual(cfg.rope_type, rope_type)
    self.assertEqual(cfg.rope_theta, hc.rope_parameters["rope_theta"])
    if rope_type == "default":
      inv_freq = 1.0 / hc.rope_parameters["rope_theta"] ** (np.arange(0, 32, 2) / 32)
    else:
      inv_freq, _ = modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type](hc)
      inv_freq = inv_freq.numpy()
    np.testing.assert_allclose(rope_inv_freq(cfg), inv_freq, rtol=1e-6)
    if rope_type == "llama3":
      self.assertEqual(cfg.rope_original_max_len,
                       hc.rope_parameters["original_max_position_embeddings"])

  @parameterized.named_parameters(
      ("llama_default", "llama", dict(num_kv_heads=2)),
      ("llama_llama3", "llama", dict(num_kv_heads=1, head_dim=6, rope_type="llama3",
                                     rope_factor=8.0, rope_low_freq_factor=2.0,
                                     rope_high_freq_factor=6.0, rope_original_max_len=100,
                                     rope_theta=5e5, norm_eps=1e-5, tie_embeddings=False)),
      ("qwen2_linear", "qwen2", dict(num_kv_heads=4, qkv_bias=True, rope_type="linear",
                                     rope_factor=3.0, rope_theta=1e6)),
      ("qwen3", "qwen3", dict(num_kv_heads=2, head_dim=16, qk_norm=True, rope_theta=1e6,
                              tie_embeddings=False)),
      ("qwen3_mqa", "qwen3", dict(num_kv_heads=1, head_dim=6, qk_norm=True)),
  )
  def test_config_round_trip_and_transformers_reads_it(self, model_type, overrides):
    cfg = TransformerConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=4, mlp_dim=72,
                            max_len=256, **overrides)
    hf_dict = json.loads(json.dumps(hf.config_to_hf(cfg, model_type)))
    self.assertEqual(hf.config_from_hf(hf_dict), cfg)
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config}
    hc = config_cls[model_type](**hf_dict)
    self.assertEqual((hc.hidden_size, hc.num_key_value_heads, hc.head_dim,
                      hc.max_position_embeddings, hc.tie_word_embeddings, hc.rms_norm_eps),
                     (cfg.d_model, cfg.num_kv_heads, cfg.hd, cfg.max_len, cfg.tie_embeddings,
                      cfg.norm_eps))
    self.assertEqual(hc.rope_parameters, hf_dict["rope_parameters"])
    if cfg.rope_type != "default":
      inv_freq, _ = modeling_rope_utils.ROPE_INIT_FUNCTIONS[cfg.rope_type](hc)
      np.testing.assert_allclose(rope_inv_freq(cfg), inv_freq.numpy(), rtol=1e-6)

  def test_config_defaults(self):
    base = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4)
    cfg = hf.config_from_hf(base, max_len=128)
    self.assertEqual((cfg.num_kv_heads, cfg.head_dim, cfg.hd, cfg.qkv_bias, cfg.tie_embeddings,
                      cfg.rope_theta, cfg.max_len), (4, None, 8, True, False, 10000.0, 128))
    self.assertEqual(hf.config_from_hf({**base, "head_dim": 8}), hf.config_from_hf(base))
    # Qwen3's head_dim defaults to 128 (transformers' Qwen3Config), not D / H.
    qwen3 = hf.config_from_hf({**base, "model_type": "qwen3"})
    self.assertEqual((qwen3.hd, qwen3.qk_norm, qwen3.qkv_bias, qwen3.max_len),
                     (128, True, False, 32768))
    self.assertEqual(transformers.Qwen3Config(**{**base, "model_type": "qwen3"}).head_dim, 128)
    arch_only = {k: v for k, v in base.items() if k != "model_type"}
    self.assertFalse(hf.config_from_hf({**arch_only, "architectures": ["LlamaForCausalLM"]})
                     .qkv_bias)

  @parameterized.named_parameters(
      ("model_type", dict(model_type="mistral"), "'mistral'.*llama.*qwen2"),
      ("architecture", dict(architectures=["LlamaForSequenceClassification"]),
       "LlamaForSequenceClassification.*LlamaForCausalLM"),
      ("mismatch", dict(architectures=["Qwen2ForCausalLM"]), "does not match"),
      ("o_proj_bias", dict(attention_bias=True), "attention_bias=True.*o_proj"),
      ("mlp_bias", dict(mlp_bias=True), "mlp_bias=True"),
      ("activation", dict(hidden_act="gelu"), "hidden_act='gelu'"),
      ("yarn", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "'yarn'"),
      ("dynamic", dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic'"),
      ("partial", dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
       "partial_rotary_factor=0.5"),
      ("llama3_no_factor", dict(rope_parameters={"rope_type": "llama3"}), "'factor'"),
      ("missing_size", dict(hidden_size=None), "'hidden_size'"),
      ("sliding", dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                       use_sliding_window=True), "use_sliding_window"),
      ("qwen3_sliding", dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                             layer_types=["sliding_attention", "full_attention"]),
       "sliding_attention"),
      ("moe", dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_experts=8),
       "num_experts=8.*mixture-of-experts"),
      ("mixtral", dict(num_local_experts=4), "num_local_experts=4.*mixture-of-experts"),
      ("qwen3_bias", dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                          attention_bias=True), "attention_bias=True.*qwen3.*o_proj"),
  )
  def test_unsupported_config_is_named(self, change, message):
    base = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=64,
                hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    with self.assertRaisesRegex(ValueError, message):
      hf.config_from_hf({**base, **change})

  def test_config_to_hf_rejects_bias_mismatch(self):
    cfg = TransformerConfig(vocab_size=64, d_model=32, num_layers=2, qkv_bias=True)
    self.assertEqual(hf.config_to_hf(cfg)["model_type"], "qwen2")
    with self.assertRaisesRegex(ValueError, "model_type='llama'.*qkv_bias"):
      hf.config_to_hf(cfg, "llama")
    with self.assertRaisesRegex(ValueError, "'qwen2'.*qkv_bias=False"):
      hf.config_to_hf(dataclasses.replace(cfg, qkv_bias=False), "qwen2")
    with self.assertRaisesRegex(ValueError, "'gemma'"):
      hf.config_to_hf(cfg, "gemma")
    qk = dataclasses.replace(cfg, qk_norm=True, qkv_bias=False)
    self.assertEqual(hf.config_to_hf(qk)["model_type"], "qwen3")
    with self.assertRaisesRegex(ValueError, "model_type='qwen2' cannot hold qk_norm=True"):
      hf.config_to_hf(qk, "qwen2")
    with self.assertRaisesRegex(ValueError, "model_type='qwen3' cannot hold qk_norm=False"):
      hf.config_to_hf(dataclasses.replace(cfg, qkv_bias=False), "qwen3")
    with self.assertRaisesRegex(ValueError, "'qwen3' cannot hold qkv_bias=True"):
      hf.config_to_hf(dataclasses.replace(qk, qkv_bias=True), "qwen3")


class CheckpointErrorTest(_TestCase):

  def setUp(self):
    super().setUp()
    _, self.path, self.ids, self.ref = _reference("llama_mqa")

  def test_missing_key(self):
    bad = _rewrite(self.path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with self.assertRaisesRegex(ValueError,
                                r"missing key 'model\.layers\.1\.mlp\.up_proj\.weight' "
                                r"\(expected shape \(48, 32\)\)"):
      hf.load_hf_checkpoint(bad)

  def test_wrong_shape(self):
    def mutate(t):
      t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 32), np.float32)
    with self.assertRaisesRegex(ValueError, r"'model\.layers\.0\.self_attn\.k_proj\.weight' has "
                                r"shape \(16, 32\), expected \(8, 32\)"):
      hf.load_hf_checkpoint(_rewrite(self.path, mutate))

  def test_unexpected_o_proj_bias(self):
    def mutate(t):
      t["model.layers.0.self_attn.o_proj.bias"] = np.zeros((32,), np.float32)
    with self.assertRaisesRegex(ValueError, r"unexpected key 'model\.layers\.0\.self_attn\."
                                r"o_proj\.bias' with shape \(32,\) \(an o_proj bias"):
      hf.load_hf_checkpoint(_rewrite(self.path, mutate))

  def test_attention_bias_checkpoint_from_transformers(self):
    path = fx.save(fx.build("llama_mqa", attention_bias=True))
    with self.assertRaisesRegex(ValueError, "attention_bias=True"):
      hf.load_hf_checkpoint(path)

  def test_ignored_buffers_and_tied_head(self):
    _, tied_path, ids, ref = _reference("llama_mha_tied")

    def add_copies(t):
      t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((4,), np.float32)
      t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    model, params = hf.load_hf_checkpoint(_rewrite(tied_path, add_copies))
    self.assertNotIn("lm_head", params)
    np.testing.assert_allclose(_forward(model, params, ids), ref, atol=1e-4, rtol=0)

    def different_head(t):
      t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1.0
    with self.assertRaisesRegex(ValueError, "'lm_head.weight'.*differs"):
      hf.load_hf_checkpoint(_rewrite(tied_path, different_head))

  def test_missing_shard_and_files(self):
    _, sharded, _, _ = _reference("llama_gqa_untied")
    copy = tempfile.mkdtemp(prefix="hf_shards_")
    shutil.copytree(sharded, copy, dirs_exist_ok=True)
    os.remove(os.path.join(copy, "model-00002-of-00012.safetensors"))
    with self.assertRaisesRegex(FileNotFoundError, "model-00002-of-00012.safetensors"):
      hf.load_hf_checkpoint(copy)
    with self.assertRaisesRegex(FileNotFoundError, "config.json"):
      hf.load_hf_checkpoint(tempfile.mkdtemp())

  def test_save_rejects_wrong_params(self):
    model, params = hf.load_hf_checkpoint(self.path)
    out = tempfile.mkdtemp()
    broken = jax.tree.map(lambda x: x, params)
    del broken["layers_1"]["mlp"]["down_proj"]
    with self.assertRaisesRegex(ValueError, "missing parameter 'layers_1/mlp/down_proj/kernel' "
                                r"\(expected shape \(48, 32\)\)"):
      hf.save_hf_checkpoint(model, broken, out)
    broken = jax.tree.map(lambda x: x, params)
    broken["final_norm"]["scale"] = jnp.ones((31,))
    with self.assertRaisesRegex(ValueError, r"'final_norm/scale' has shape \(31,\), expected"):
      hf.save_hf_checkpoint(model, broken, out)
    with self.assertRaisesRegex(ValueError, "qkv_bias=False"):
      hf.save_hf_checkpoint(model, params, out, model_type="qwen2")
    self.assertEqual(os.listdir(out), [])

  def test_resave_replaces_stale_shards_and_extra_config(self):
    model, params = hf.load_hf_checkpoint(self.path)
    out = tempfile.mkdtemp()
    hf.save_hf_checkpoint(model, params, out, max_shard_bytes=4000)
    self.assertIn("model.safetensors.index.json", os.listdir(out))
    hf.save_hf_checkpoint(model, params, out, extra_config={"bos_token_id": 7,
                                                            "eos_token_id": [8, 9]})
    self.assertCountEqual(os.listdir(out), ["config.json", "model.safetensors"])
    _assert_trees_equal(self, hf.load_hf_checkpoint(out)[1], params)
    hc = transformers.AutoConfig.from_pretrained(out)
    self.assertEqual((hc.bos_token_id, hc.eos_token_id), (7, [8, 9]))
    with self.assertRaisesRegex(ValueError, r"extra_config\['hidden_size'\]=64 contradicts"):
      hf.save_hf_checkpoint(model, params, out, extra_config={"hidden_size": 64})


if __name__ == "__main__":
  absltest.main()
