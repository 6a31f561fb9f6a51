"""Tests for jaxsearch.models.transformer: cache parity, causality, a NumPy reference, axes."""
from __future__ import annotations

import functools
import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.models.transformer import KVCache
from jaxsearch.models.transformer import Transformer
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.models.transformer import count_params
from jaxsearch.models.transformer import init_cache
from jaxsearch.models.transformer import kv_cache_bytes

_AXES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"}


def _config(**kw) -> TransformerConfig:
  base = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
              mlp_dim=64, max_len=32)
  base.update(kw)
  return TransformerConfig(**base)


def _init_params(cfg: TransformerConfig, seed: int = 0):
  """Seeded NumPy params on the model's own tree (jit-compiling `model.init` takes ~3 s).

  Kernels ~ N(0, 1/fan_in), unit-scale embedding, norm scales near 1, non-zero biases.
  """
  model = Transformer(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nn.unbox(abstract)["params"])
  for path, leaf in flat.items():
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if path[-1] == "scale":
      value = 1.0 + 0.2 * noise
    elif path[-1] == "bias":
      value = 0.3 * noise
    elif path[-1] == "embedding":
      value = noise
    else:  # kernel: o_proj [H, hd, D] has two input axes, the others one
      fan_in = math.prod(leaf.shape[:2]) if path[-2] == "o_proj" else leaf.shape[0]
      value = noise / math.sqrt(fan_in)
    flat[path] = jnp.asarray(value, leaf.dtype)
  return model, traverse_util.unflatten_dict(flat)


def _tokens(cfg, batch, length, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length)),
                     jnp.int32)


def _np_forward(params, cfg: TransformerConfig, tokens) -> np.ndarray:
  """Straightforward float64 NumPy forward pass written from the HF Llama/Qwen2 formulas."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  tokens = np.asarray(tokens)
  h_, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.hd
  _, t = tokens.shape

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * w

  def rotate_half(x):
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([-x2, x1], axis=-1)

  inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
  freqs = np.arange(t)[:, None] * inv_freq[None, :]
  emb = np.concatenate([freqs, freqs], axis=-1)
  cos, sin = np.cos(emb), np.sin(emb)                                   # [T, hd]

  x = p["embed"]["embedding"][tokens]                                   # [B, T, D]
  for i in range(cfg.num_layers):
    lp = p[f"layers_{i}"]
    a = lp["attn"]
    h = rms(x, lp["attn_norm"]["scale"])
    q = np.einsum("btd,dhk->bhtk", h, a["q_proj"]["kernel"])
    k = np.einsum("btd,dhk->bhtk", h, a["k_proj"]["kernel"])
    v = np.einsum("btd,dhk->bhtk", h, a["v_proj"]["kernel"])
    if cfg.qkv_bias:
      q = q + a["q_proj"]["bias"][None, :, None, :]
      k = k + a["k_proj"]["bias"][None, :, None, :]
      v = v + a["v_proj"]["bias"][None, :, None, :]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    heads = []
    for head in range(h_):
      kv = head // (h_ // hkv)
      s = q[:, head] @ k[:, kv].transpose(0, 2, 1) / math.sqrt(hd)       # [B, T, T]
      s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
      s = np.exp(s - s.max(-1, keepdims=True))
      heads.append((s / s.sum(-1, keepdims=True)) @ v[:, kv])           # [B, T, hd]
    o = np.concatenate(heads, axis=-1)                                  # [B, T, H*hd]
    x = x + o @ a["o_proj"]["kernel"].reshape(h_ * hd, cfg.d_model)
    m = lp["mlp"]
    h = rms(x, lp["mlp_norm"]["scale"])
    g = h @ m["gate_proj"]["kernel"]
    x = x + ((g / (1 + np.exp(-g))) * (h @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
  x = rms(x, p["final_norm"]["scale"])
  if cfg.tie_embeddings:
    return x @ p["embed"]["embedding"].T
  return x @ p["lm_head"]["kernel"]


def _decode_fn(model):
  return jax.jit(lambda p, t, c, i: model.apply({"params": p}, t, c, i,
                                                method=Transformer.decode))


def _forward_fn(model):
  return jax.jit(lambda p, t: model.apply({"params": p}, t))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("method", "return_hidden"))
def _apply(model, params, *args, **kwargs):
  """`model.apply({"params": params}, ...)` as one compiled program (op by op, each operation
  of the model would be its own compile: most of this file's time)."""
  return model.apply({"params": params}, *args, **kwargs)


class TransformerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    # Tiny models: XLA optimisation passes dominate compile time (~30% of this file).
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    self.addCleanup(jax.config.update, "jax_disable_most_optimizations", previous)

  # Pairwise cover of heads x tie x qkv_bias (every pair of values appears; 6 of 12 cases).
  @parameterized.named_parameters(
      ("mha_tied", (4, 4), True, False),
      ("mha_untied_bias", (4, 4), False, True),
      ("gqa_tied_bias", (4, 2), True, True),
      ("gqa_untied", (4, 2), False, False),
      ("mqa_tied", (4, 1), True, False),
      ("mqa_untied_bias", (4, 1), False, True),
  )
  def test_cached_decode_matches_full_forward(self, heads, tie, qkv_bias):
    cfg = _config(num_heads=heads[0], num_kv_heads=heads[1], tie_embeddings=tie,
                  qkv_bias=qkv_bias)
    model, params = _init_params(cfg)
    batch, length, cache_len = 2, 12, 16
    tokens = _tokens(cfg, batch, length)
    full = _forward_fn(model)(params, tokens)
    chex.assert_shape(full, (batch, length, cfg.vocab_size))
    self.assertEqual(full.dtype, jnp.float32)
    decode = _decode_fn(model)

    # Token by token from an empty cache.
    cache = init_cache(cfg, batch, cache_len)
    steps = []
    for i in range(length):
      logits, cache = decode(params, tokens[:, i:i + 1], cache, jnp.int32(i))
      steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)
    chex.assert_shape(cache.k, (cfg.num_layers, batch, heads[1], cache_len, cfg.hd))
    # Written positions hold keys; the rest of the cache is untouched.
    self.assertTrue(np.all(np.abs(np.asarray(cache.k[:, :, :, :length])).sum(-1) > 0))
    np.testing.assert_array_equal(cache.k[:, :, :, length:], 0.0)
    np.testing.assert_array_equal(cache.v[:, :, :, length:], 0.0)

    # Chunked prefill of 5, then single steps, on a cache full of stale values (masked out).
    rng = np.random.default_rng(7)
    stale = KVCache(*(jnp.asarray(rng.standard_normal(cache.k.shape), jnp.float32)
                      for _ in range(2)))
    prefill, cache = decode(params, tokens[:, :5], stale, jnp.int32(0))
    steps = [prefill]
    for i in range(5, length):
      logits, cache = decode(params, tokens[:, i:i + 1], cache, jnp.int32(i))
      steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)

  def test_chunk_at_offset_matches_full_forward(self):
    # Two chunks (4 then 8 tokens): positions and masks of a chunk that starts mid-cache.
    cfg = _config()
    model, params = _init_params(cfg)
    tokens = _tokens(cfg, 3, 12)
    full = _forward_fn(model)(params, tokens)
    decode = _decode_fn(model)
    first, cache = decode(params, tokens[:, :4], init_cache(cfg, 3, 12), jnp.int32(0))
    second, _ = decode(params, tokens[:, 4:], cache, jnp.int32(4))
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, atol=1e-5, rtol=1e-5)

  def test_causality(self):
    cfg = _config()
    model, params = _init_params(cfg)
    forward = _forward_fn(model)
    tokens = _tokens(cfg, 2, 10)
    base = np.asarray(forward(params, tokens))
    for t in (0, 4, 9):
      changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
      out = np.asarray(forward(params, changed))
      np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
      per_position = np.abs(out - base).max(axis=(0, 2))                 # [T]
      self.assertTrue(np.all(per_position[t:] > 1e-3), per_position)

  @parameterized.named_parameters(
      ("gqa_tied", dict(num_kv_heads=2, tie_embeddings=True, qkv_bias=False)),
      ("mqa_untied_bias", dict(num_kv_heads=1, tie_embeddings=False, qkv_bias=True)),
      ("mha_head_dim_eps", dict(num_kv_heads=4, head_dim=6, rope_theta=500.0, norm_eps=0.5)),
  )
  def test_matches_numpy_reference(self, overrides):
    cfg = _config(vocab_size=24, d_model=16, mlp_dim=40, **overrides)
    model, params = _init_params(cfg, seed=3)
    tokens = _tokens(cfg, 2, 7, seed=4)
    logits = _forward_fn(model)(params, tokens)
    np.testing.assert_allclose(logits, _np_forward(params, cfg, tokens), atol=2e-4, rtol=2e-4)

  def test_rope_is_hf_rotate_half(self):
    # Position 1, hd=4, theta=1: inv_freq = [1, 1]; pair (x0, x2) rotates by 1 rad, (x1, x3)
    # by 1 rad: q' = q*cos + concat([-q2, -q3, q0, q1])*sin.
    from jaxsearch.models import transformer as tr  # pylint: disable=import-outside-toplevel
    cos, sin = tr._rope(jnp.array([0, 1]), jnp.ones([2]))
    np.testing.assert_allclose(cos[1], [math.cos(1)] * 4, rtol=1e-6)
    x = jnp.arange(1.0, 5.0)[None, None, None, :]                        # [1, 1, 1, 4]
    out = tr._apply_rope(x, cos[1:], sin[1:])
    c, s = math.cos(1), math.sin(1)
    np.testing.assert_allclose(out[0, 0, 0], [1 * c - 3 * s, 2 * c - 4 * s,
                                              3 * c + 1 * s, 4 * c + 2 * s], rtol=1e-6)

  @parameterized.named_parameters(("tied", True, False), ("untied_bias", False, True))
  def test_params_have_logical_axes_and_shapes(self, tie, qkv_bias):
    cfg = _config(num_kv_heads=1, tie_embeddings=tie, qkv_bias=qkv_bias, head_dim=6)
    variables = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                               jnp.zeros((1, 3), jnp.int32))
    boxed = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    self.assertTrue(boxed)
    for leaf in boxed:
      self.assertIsInstance(leaf, nn.LogicallyPartitioned)
      self.assertLen(leaf.names, leaf.value.ndim)
      self.assertContainsSubset(set(leaf.names), _AXES)
    specs = traverse_util.flatten_dict(nn.get_partition_spec(variables)["params"])
    shapes = traverse_util.flatten_dict(
        jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(variables)["params"]))
    d, h, hkv, hd, f, v = 32, 4, 1, 6, 64, 64
    expected = {
        ("embed", "embedding"): ((v, d), ("vocab", "embed")),
        ("final_norm", "scale"): ((d,), ("norm",)),
    }
    for i in range(cfg.num_layers):
      lay = f"layers_{i}"
      expected.update({
          (lay, "attn_norm", "scale"): ((d,), ("norm",)),
          (lay, "mlp_norm", "scale"): ((d,), ("norm",)),
          (lay, "attn", "q_proj", "kernel"): ((d, h, hd), ("embed", "heads", "head_dim")),
          (lay, "attn", "k_proj", "kernel"): ((d, hkv, hd), ("embed", "kv_heads", "head_dim")),
          (lay, "attn", "v_proj", "kernel"): ((d, hkv, hd), ("embed", "kv_heads", "head_dim")),
          (lay, "attn", "o_proj", "kernel"): ((h, hd, d), ("heads", "head_dim", "embed")),
          (lay, "mlp", "gate_proj", "kernel"): ((d, f), ("embed", "mlp")),
          (lay, "mlp", "up_proj", "kernel"): ((d, f), ("embed", "mlp")),
          (lay, "mlp", "down_proj", "kernel"): ((f, d), ("mlp", "embed")),
      })
      if qkv_bias:
        expected.update({
            (lay, "attn", "q_proj", "bias"): ((h, hd), ("heads", "head_dim")),
            (lay, "attn", "k_proj", "bias"): ((hkv, hd), ("kv_heads", "head_dim")),
            (lay, "attn", "v_proj", "bias"): ((hkv, hd), ("kv_heads", "head_dim")),
        })
    if not tie:
      expected[("lm_head", "kernel")] = ((d, v), ("embed", "vocab"))
    self.assertEqual(set(shapes), set(expected))
    for path, (shape, names) in expected.items():
      self.assertEqual(shapes[path], shape, path)
      self.assertEqual(tuple(specs[path]), names, path)
    per_layer = d * h * hd + 2 * d * hkv * hd + h * hd * d + 3 * d * f + 2 * d
    per_layer += (h + 2 * hkv) * hd if qkv_bias else 0
    total = v * d + cfg.num_layers * per_layer + d + (0 if tie else d * v)
    self.assertEqual(count_params(variables), total)
    self.assertEqual(count_params(nn.unbox(variables)), total)

  def test_sharded_forward_matches_unsharded(self):
    cfg = _config()
    model, params = _init_params(cfg)
    tokens = _tokens(cfg, 4, 6)
    expected = _forward_fn(model)(params, tokens)
    mesh = jax.make_mesh((4, 2), ("data", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor"),
             ("mlp", "tensor"), ("vocab", "tensor"))
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    params = jax.device_put(params, shardings["params"])
    self.assertEqual(params["layers_0"]["attn"]["k_proj"]["kernel"].sharding.spec,
                     jax.sharding.PartitionSpec(None, "tensor", None))
    with jax.sharding.set_mesh(mesh), nn.logical_axis_rules(rules):
      logits = _forward_fn(model)(params, tokens)
      cache = init_cache(cfg, 4, 8)
      step, _ = _decode_fn(model)(params, tokens, cache, jnp.int32(0))
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(step, expected, atol=1e-5, rtol=1e-5)

  @parameterized.named_parameters(
      ("kv_heads_divides", dict(num_heads=4, num_kv_heads=3), "num_kv_heads=3"),
      ("d_model_divides", dict(d_model=30, num_heads=4), "d_model=30"),
      ("negative_layers", dict(num_layers=0), "num_layers"),
      ("vocab", dict(vocab_size=-1), "vocab_size"),
      ("head_dim", dict(head_dim=0), "head_dim"),
      ("odd_head_dim", dict(head_dim=7), "head_dim"),
      ("dtype", dict(dtype="float64"), "float64"),
      ("param_dtype", dict(param_dtype="fp32"), "fp32"),
      ("rope_theta", dict(rope_theta=0.0), "rope_theta"),
  )
  def test_config_validation(self, overrides, message):
    with self.assertRaisesRegex(ValueError, message):
      _config(**overrides)

  def test_config_properties(self):
    cfg = _config(dtype="bfloat16")
    self.assertEqual(cfg.hd, 8)
    self.assertEqual(_config(head_dim=12).hd, 12)
    self.assertEqual(cfg.compute_dtype, jnp.bfloat16)
    self.assertEqual(cfg.params_dtype, jnp.float32)
    cache = init_cache(cfg, batch_size=3)
    chex.assert_shape(cache.k, (2, 3, 2, 32, 8))
    self.assertEqual(cache.v.dtype, jnp.bfloat16)
    self.assertEqual(init_cache(cfg, 3, 5, jnp.float32).k.shape[3], 5)

  def test_decode_rejects_wrong_cache(self):
    cfg = _config()
    model, params = _init_params(cfg)
    with self.assertRaisesRegex(ValueError, "cache must have shape"):
      model.apply({"params": params}, _tokens(cfg, 2, 3), init_cache(cfg, 3, 8), 0,
                  method=Transformer.decode)

  def test_bfloat16_close_to_float32(self):
    cfg32 = _config()
    cfg16 = _config(dtype="bfloat16")
    model32, params = _init_params(cfg32)
    model16 = Transformer(cfg16)
    tokens = _tokens(cfg32, 2, 10)
    ref = _forward_fn(model32)(params, tokens)
    out = _forward_fn(model16)(params, tokens)
    self.assertEqual(out.dtype, jnp.float32)
    self.assertFalse(np.array_equal(out, ref))  # bf16 really was used
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(out, ref, atol=0.05 * scale, rtol=0)
    # bf16 cache decode follows the bf16 forward pass.
    cache = init_cache(cfg16, 2, 12)
    self.assertEqual(cache.k.dtype, jnp.bfloat16)
    step, cache = _decode_fn(model16)(params, tokens, cache, jnp.int32(0))
    self.assertEqual(cache.k.dtype, jnp.bfloat16)
    np.testing.assert_allclose(step, out, atol=0.05 * scale, rtol=0)
    # bf16 parameters.
    p16 = jax.eval_shape(Transformer(_config(dtype="bfloat16", param_dtype="bfloat16")).init,
                         jax.random.key(0), tokens)
    self.assertTrue(all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(p16)))


class RaggedDecodeTest(parameterized.TestCase):
  """Per-row cache indices: each row feeds its own number of tokens per call (a ragged chunked
  prefill interleaved with one-token steps), and gets the logits a full forward gives it."""

  @parameterized.named_parameters(("unrolled", False), ("scanned", True))
  def test_ragged_chunks_equal_the_full_forward_of_each_row(self, scan):
    cfg = _config(scan_layers=scan, qkv_bias=True)
    model, params = _init_params(cfg)
    s, width = 16, 4
    seqs = np.asarray(_tokens(cfg, 3, s, seed=11))
    full = np.asarray(_forward_fn(model)(params, jnp.asarray(seqs)))          # [3, S, V]
    # Tokens each row keeps per call (0: the row waits); in the last call row 0 starts at slot
    # 14, so its chunk's junk runs past the cache (slots >= S are dropped).
    plan = np.asarray([[4, 1, 3], [1, 4, 1], [2, 0, 4], [3, 1, 1], [4, 4, 2], [2, 2, 4]])
    step = jax.jit(lambda p, t, c, i, last: model.apply(
        {"params": p}, t, c, i, logits_at=last, method=Transformer.decode))
    cache = init_cache(cfg, 3, s)
    pos = np.zeros(3, np.int32)
    for keep in plan:
      chunk = np.zeros((3, width), np.int32)
      for b in range(3):
        got = seqs[b, pos[b]:pos[b] + width]
        chunk[b, :len(got)] = got                 # the rest: junk the row does not keep
      logits, cache = step(params, jnp.asarray(chunk), cache, jnp.asarray(pos),
                           jnp.asarray(np.maximum(keep - 1, 0), np.int32))
      for b in range(3):
        end = pos[b] + keep[b]
        if keep[b] and end <= s:
          np.testing.assert_allclose(logits[b], full[b, end - 1], atol=2e-5, rtol=2e-5,
                                     err_msg=f"row {b} at length {end}")
      pos = np.minimum(pos + keep, s)
    self.assertEqual(pos.tolist(), [s, 12, 15])

  def test_kv_cache_bytes_is_the_caches_size(self):
    cfg = _config()                                  # L 2, Hkv 2, hd 8
    for dtype, size in ((None, 4), (jnp.bfloat16, 2)):
      cache = init_cache(cfg, 3, 10, dtype=dtype)
      self.assertEqual(kv_cache_bytes(cfg, 3, 10, dtype), cache.k.nbytes + cache.v.nbytes)
      self.assertEqual(kv_cache_bytes(cfg, 3, 10, dtype), 2 * 2 * 3 * 2 * 10 * 8 * size)

  def test_cache_index_shape_is_checked(self):
    cfg = _config()
    model, params = _init_params(cfg)
    with self.assertRaisesRegex(ValueError, r"cache_index must be a scalar or \[B\] = \[2\]"):
      model.apply({"params": params}, jnp.zeros((2, 1), jnp.int32), init_cache(cfg, 2, 8),
                  jnp.zeros((3,), jnp.int32), method=Transformer.decode)


class PaddingRematScanTest(parameterized.TestCase):
  """Left padding, rematerialisation, scan over layers and the hidden-state path."""

  def _left_padded(self, cfg, lengths, width, seed=5):
    rows = [np.asarray(_tokens(cfg, 1, n, seed=seed + i))[0] for i, n in enumerate(lengths)]
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
      tokens[i, width - len(r):] = r
      mask[i, width - len(r):] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return rows, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions, jnp.int32)

  @parameterized.named_parameters(("gqa", 2, True), ("mha_untied", 4, False))
  def test_left_padded_forward_equals_each_row_alone(self, kv_heads, tie):
    cfg = _config(num_kv_heads=kv_heads, tie_embeddings=tie, qkv_bias=not tie)
    model, params = _init_params(cfg)
    rows, tokens, mask, positions = self._left_padded(cfg, [3, 7, 5], 8)
    out = jax.jit(lambda p, t, m, q: model.apply({"params": p}, t, positions=q,
                                                   attention_mask=m))(params, tokens, mask,
                                                                      positions)
    for i, r in enumerate(rows):
      alone = _apply(model, params, jnp.asarray(r)[None])[0]
      np.testing.assert_allclose(out[i, 8 - len(r):], alone, atol=1e-5, rtol=1e-5)

  def test_left_padded_cached_decode_equals_each_row_alone(self):
    cfg = _config()
    model, params = _init_params(cfg)
    rows, prompt, mask, positions = self._left_padded(cfg, [2, 6, 4], 6)
    new = _tokens(cfg, 3, 4, seed=9)                                  # 4 decode steps
    s = 12
    kv_mask = jnp.concatenate([mask, jnp.ones((3, s - 6), bool)], axis=1)
    decode = jax.jit(lambda p, t, c, i, q: model.apply(
        {"params": p}, t, c, i, positions=q, kv_mask=kv_mask, method=Transformer.decode))
    logits, cache = decode(params, prompt, init_cache(cfg, 3, s), jnp.int32(0), positions)
    steps = [logits[:, -1]]
    next_pos = positions[:, -1] + 1
    for j in range(3):
      step, cache = decode(params, new[:, j:j + 1], cache, jnp.int32(6 + j),
                           (next_pos + j)[:, None])
      steps.append(step[:, 0])
    for i, r in enumerate(rows):
      full = np.concatenate([r, np.asarray(new[i, :3])])
      alone = _apply(model, params, jnp.asarray(full)[None])[0]
      got = np.stack([st[i] for st in steps])                         # positions len(r)-1 ...
      np.testing.assert_allclose(got, alone[len(r) - 1:], atol=1e-5, rtol=1e-5)

  def test_kv_mask_shape_is_checked(self):
    cfg = _config()
    model, params = _init_params(cfg)
    with self.assertRaisesRegex(ValueError, "kv_mask must be"):
      model.apply({"params": params}, _tokens(cfg, 2, 3), init_cache(cfg, 2, 8), 0,
                  kv_mask=jnp.ones((2, 3), bool), method=Transformer.decode)

  def test_hidden_states_feed_the_head(self):
    cfg = _config()
    model, params = _init_params(cfg)
    tokens = _tokens(cfg, 2, 6)
    logits, hidden = _apply(model, params, tokens, return_hidden=True)
    np.testing.assert_allclose(hidden @ params["embed"]["embedding"].T, logits, atol=1e-5)
    only = _apply(model, params, tokens, method=Transformer.hidden_states)
    np.testing.assert_array_equal(only, hidden)

  @parameterized.parameters("full", "dots")
  def test_remat_keeps_outputs_and_gradients(self, mode):
    cfg = _config()
    model, params = _init_params(cfg)
    remat = Transformer(_config(remat=mode))
    tokens = _tokens(cfg, 2, 6)

    def loss(m):
      return lambda p: jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, tokens))[..., 0])

    g_ref = jax.jit(jax.grad(loss(model)))(params)
    g = jax.jit(jax.grad(loss(remat)))(params)
    chex.assert_trees_all_close(g, g_ref, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(_apply(remat, params, tokens), _apply(model, params, tokens),
                               atol=1e-6)

  @parameterized.named_parameters(("plain", "none"), ("remat", "full"))
  def test_scan_layers_equals_unrolled(self, remat):
    from jaxsearch.models import transformer as tr  # pylint: disable=import-outside-toplevel
    cfg = _config(num_layers=3)
    model, params = _init_params(cfg)
    scan_cfg = _config(num_layers=3, scan_layers=True, remat=remat)
    scanned = Transformer(scan_cfg)
    stacked = tr.stack_layer_params(params, 3)
    abstract = jax.eval_shape(scanned.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    chex.assert_trees_all_equal_shapes(nn.unbox(abstract)["params"], stacked)
    names = nn.get_partition_spec(abstract)["params"]["layers"]["block"]["attn"]["q_proj"]
    self.assertEqual(tuple(names["kernel"]), ("layers", "embed", "heads", "head_dim"))
    chex.assert_trees_all_equal(tr.unstack_layer_params(stacked), params)
    tokens = _tokens(cfg, 2, 7)
    ref = _apply(model, params, tokens)
    np.testing.assert_allclose(_apply(scanned, stacked, tokens), ref, atol=1e-5)
    cache = init_cache(scan_cfg, 2, 9)
    pre, cache = _apply(scanned, stacked, tokens[:, :5], cache, 0, method=Transformer.decode)
    step, cache = _apply(scanned, stacked, tokens[:, 5:6], cache, 5, method=Transformer.decode)
    np.testing.assert_allclose(pre, ref[:, :5], atol=1e-5)
    np.testing.assert_allclose(step[:, 0], ref[:, 5], atol=1e-5)
    boxed = tr.stack_layer_params(
        jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens)["params"], 3)
    self.assertEqual(boxed["layers"]["block"]["mlp"]["up_proj"]["kernel"].names,
                     ("layers", "embed", "mlp"))

  def test_rope_variants_match_formulas(self):
    from jaxsearch.models import transformer as tr  # pylint: disable=import-outside-toplevel
    hd, theta = 8, 100.0
    base = 1.0 / theta ** (np.arange(0, hd, 2) / hd)                 # [1, .316, .1, .0316]
    lin = tr.rope_inv_freq(_config(head_dim=hd, rope_theta=theta, rope_type="linear",
                                   rope_factor=4.0))
    np.testing.assert_allclose(lin, base / 4, rtol=1e-6)
    # llama3 with original length 100, low 1, high 4: wavelengths 2*pi/f =
    # [6.28, 19.9, 62.8, 198.7]; > 100 -> divided by factor; < 25 -> kept; in [25, 100]
    # -> interpolated with smooth = (100 / wavelen - 1) / 3.
    l3 = tr.rope_inv_freq(_config(head_dim=hd, rope_theta=theta, rope_type="llama3",
                                  rope_factor=8.0, rope_original_max_len=100))
    wl = 2 * np.pi / base
    smooth = (100 / wl[2] - 1) / 3
    expected = [base[0], base[1], (1 - smooth) * base[2] / 8 + smooth * base[2], base[3] / 8]
    np.testing.assert_allclose(l3, expected, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
