"""Decoder-only transformer of the Llama / Qwen2 / Qwen3 family, in Flax linen.

The math follows Hugging Face's `LlamaForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM`
so that their
checkpoints can be converted into this module's parameter tree:

- RMSNorm in float32: `x * rsqrt(mean(x^2) + eps)`, cast back to the input dtype, times
  `scale`.
- Rotary embeddings, HF Llama convention: `inv_freq = 1 / theta^(arange(0, hd, 2) / hd)`,
  `emb = concat([freqs, freqs])`, `q * cos + rotate_half(q) * sin` with
  `rotate_half(x) = concat([-x2, x1])`.
- Grouped-query attention (query head `h` reads key/value head `h // (H // Hkv)`), scale
  `1 / sqrt(hd)`, softmax in float32; optional q/k/v bias (Qwen2); optional RMSNorm of each
  query / key head before RoPE (Qwen3's `q_norm` / `k_norm`).
- SwiGLU MLP `down(silu(gate(x)) * up(x))`.
- Output head tied to the embedding (`x @ embedding.T`) or a separate `lm_head`.

Parameter tree (HF name in brackets):

  embed/embedding                      [V, D]        (model.embed_tokens.weight)
  layers_{i}/attn_norm/scale           [D]           (layers.i.input_layernorm.weight)
  layers_{i}/attn/q_proj/kernel        [D, H, hd]    (self_attn.q_proj.weight, [H*hd, D])
  layers_{i}/attn/q_proj/bias          [H, hd]       (self_attn.q_proj.bias, qkv_bias only)
  layers_{i}/attn/k_proj/kernel        [D, Hkv, hd]  (self_attn.k_proj.weight)
  layers_{i}/attn/k_proj/bias          [Hkv, hd]
  layers_{i}/attn/v_proj/kernel        [D, Hkv, hd]  (self_attn.v_proj.weight)
  layers_{i}/attn/v_proj/bias          [Hkv, hd]
  layers_{i}/attn/o_proj/kernel        [H, hd, D]    (self_attn.o_proj.weight, [D, H*hd])
  layers_{i}/attn/{q,k}_norm/scale     [hd]          (self_attn.{q,k}_norm.weight, qk_norm only)
  layers_{i}/mlp_norm/scale            [D]           (layers.i.post_attention_layernorm.weight)
  layers_{i}/mlp/gate_proj/kernel      [D, F]        (mlp.gate_proj.weight, transposed)
  layers_{i}/mlp/up_proj/kernel        [D, F]        (mlp.up_proj.weight, transposed)
  layers_{i}/mlp/down_proj/kernel      [F, D]        (mlp.down_proj.weight, transposed)
  final_norm/scale                     [D]           (model.norm.weight)
  lm_head/kernel                       [D, V]        (lm_head.weight, untied only)

Every parameter carries logical axis names from the vocabulary `vocab`, `embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `norm`; activations are constrained with `batch`, `length`,
`embed`, `mlp`, `vocab` (no-ops without a mesh and rules).

Example:
  >>> cfg = TransformerConfig(vocab_size=64, d_model=32, num_layers=2)
  >>> model = Transformer(cfg)
  >>> tokens = jnp.zeros((2, 8), jnp.int32)
  >>> params = model.init(jax.random.key(0), tokens)["params"]
  >>> logits = model.apply({"params": params}, tokens)            # [2, 8, 64] float32
  >>> cache = init_cache(cfg, batch_size=2, max_len=16)
  >>> logits, cache = model.apply({"params": params}, tokens, cache, jnp.int32(0),
  ...                             method=Transformer.decode)       # prefill 8 positions
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

PyTree = Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

ROPE_TYPES = ("default", "linear", "llama3")
REMAT_MODES = ("none", "full", "dots")

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
_DTYPES = DTYPES


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
  """Sizes and numerics of a Llama / Qwen2-style decoder.

  Attributes:
    vocab_size: V, number of token ids.
    d_model: D, width of the residual stream.
    num_layers: number of decoder blocks.
    num_heads: H, query heads.
    num_kv_heads: Hkv, key/value heads; must divide `num_heads` (GQA; Hkv == H is MHA).
    head_dim: hd; None means `d_model // num_heads`.
    mlp_dim: F, hidden width of the SwiGLU MLP.
    rope_theta: RoPE base.
    rope_type: "default", "linear" (positions divided by `rope_factor`) or "llama3"
      (Llama 3.1's frequency-dependent scaling with `rope_factor`, `rope_low_freq_factor`,
      `rope_high_freq_factor`, `rope_original_max_len`), as transformers' `rope_parameters`.
    rope_factor: scaling factor of "linear" and "llama3".
    rope_low_freq_factor: "llama3" only.
    rope_high_freq_factor: "llama3" only.
    rope_original_max_len: "llama3" only, the pre-training context length.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: if True the output head is `x @ embedding.T` (no `lm_head`).
    qkv_bias: if True q/k/v projections have a bias (Qwen2).
    qk_norm: if True each query and key head is RMS-normalised over its `hd` features (own
      `scale` per norm, shared by the heads) after the projection and before RoPE (Qwen3).
    max_len: positions available to the KV cache when `init_cache` gets no `max_len`.
    remat: rematerialise each block in the backward pass: "none", "full" (save nothing) or
      "dots" (save matmul outputs without batch dimensions). Outputs are unchanged.
    scan_layers: run the blocks with `nn.scan` (one compiled block; parameters stacked under
      `layers/block/...` with a leading `layers` axis of size L; see `stack_layer_params`).
    dtype: compute dtype name ("float32" | "bfloat16" | "float16").
    param_dtype: parameter dtype name.
    logits_chunk: positions per output-head call in `token_scores` (the training steps'
      log-probs and entropies): the head runs on `[B, logits_chunk, V]` at a time inside a
      rematerialised scan, so neither the forward nor the backward pass holds `[B, T, V]`
      float32 logits (7 GB at 64 x 512 tokens and a 49k vocabulary). 0: the whole sequence
      at once. Results are the same either way.
  """

  vocab_size: int
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None
  mlp_dim: int = 512
  rope_theta: float = 10_000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  qkv_bias: bool = False
  qk_norm: bool = False
  max_len: int = 512
  remat: str = "none"
  scan_layers: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  logits_chunk: int = 0

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                 "mlp_dim", "max_len"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.head_dim is not None and (
        isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int)
        or self.head_dim <= 0):
      raise ValueError(f"head_dim must be a positive int or None, got {self.head_dim!r}")
    if self.head_dim is not None and self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads must be a multiple of num_kv_heads, got num_heads={self.num_heads}, "
          f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(
            f"d_model must be divisible by num_heads when head_dim is None, got "
            f"d_model={self.d_model}, num_heads={self.num_heads}")
      if (self.d_model // self.num_heads) % 2:
        raise ValueError(
            f"head_dim (d_model // num_heads = {self.d_model // self.num_heads}) must be even "
            "for rotary embeddings")
    if not self.rope_theta > 0:
      raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
    if not self.rope_factor > 0:
      raise ValueError(f"rope_factor must be > 0, got {self.rope_factor!r}")
    if self.rope_type == "llama3" and not (
        0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
      raise ValueError(
          "llama3 rope needs 0 < rope_low_freq_factor < rope_high_freq_factor, got "
          f"{self.rope_low_freq_factor!r}, {self.rope_high_freq_factor!r}")
    if not self.norm_eps > 0:
      raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
    if isinstance(self.logits_chunk, bool) or not isinstance(self.logits_chunk, int) or (
        self.logits_chunk < 0):
      raise ValueError(f"logits_chunk must be an int >= 0 (0: no chunking), got "
                       f"{self.logits_chunk!r}")
    if self.remat not in REMAT_MODES:
      raise ValueError(f"remat must be one of {REMAT_MODES}, got {self.remat!r}")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if value not in _DTYPES:
        raise ValueError(f"{name} must be one of {sorted(_DTYPES)}, got {value!r}")

  @property
  def hd(self) -> int:
    """Resolved head dimension."""
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def compute_dtype(self) -> Any:
    """`dtype` as a jnp dtype."""
    return _DTYPES[self.dtype]

  @property
  def params_dtype(self) -> Any:
    """`param_dtype` as a jnp dtype."""
    return _DTYPES[self.param_dtype]


class TokenScores(NamedTuple):
  """What training needs of the next-token distributions, per position (`token_scores`)."""

  logp: jax.Array      # [B, T] float32, log p(targets[b, t] | tokens[b, :t + 1])
  entropy: jax.Array   # [B, T] float32, entropy of that distribution (nats)
  top1: jax.Array      # [B, T] bool, targets[b, t] is its argmax


def scores_from_logits(logits: jax.Array, targets: jax.Array) -> TokenScores:
  """`TokenScores` of `logits [B, T, V]` (any float dtype, read in float32) for `targets`.

  The same arithmetic as `jaxsearch.losses.token_logprobs` and `entropy_from_logits`.
  """
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.int32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logp = picked - jax.nn.logsumexp(logits, axis=-1)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  probs = jnp.exp(log_probs)
  entropy = -jnp.sum(probs * jnp.where(probs > 0, log_probs, 0.0), axis=-1)
  return TokenScores(logp, entropy, jnp.argmax(logits, axis=-1) == targets)


def _chunk_scores(module: "Transformer", carry, chunk):
  """One `nn.scan` step of `Transformer.token_scores`: the head on one chunk of positions."""
  x, targets = chunk                                            # [B, C, D], [B, C]
  return carry, scores_from_logits(module._logits(x), targets)


class KVCache(NamedTuple):
  """Keys and values of every layer, head-major per layer (`[B, Hkv, S, hd]`)."""

  k: jax.Array  # [L, B, Hkv, S, hd]
  v: jax.Array  # [L, B, Hkv, S, hd]


def init_cache(config: TransformerConfig, batch_size: int, max_len: int | None = None,
               dtype=None) -> KVCache:
  """An all-zeros KV cache.

  Args:
    config: the model's config.
    batch_size: B.
    max_len: S, positions in the cache; defaults to `config.max_len`.
    dtype: cache dtype; defaults to the compute dtype.

  Returns:
    `KVCache` with `k`, `v` of shape [L, B, Hkv, S, hd].
  """
  max_len = config.max_len if max_len is None else max_len
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if max_len <= 0:
    raise ValueError(f"max_len must be positive, got {max_len}")
  dtype = config.compute_dtype if dtype is None else dtype
  shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.hd)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def kv_cache_bytes(config: TransformerConfig, batch_size: int, max_len: int | None = None,
                   dtype=None) -> int:
  """Bytes of the `init_cache(config, batch_size, max_len, dtype)` cache (keys and values)."""
  max_len = config.max_len if max_len is None else max_len
  dtype = config.compute_dtype if dtype is None else dtype
  return (2 * config.num_layers * batch_size * config.num_kv_heads * max_len * config.hd
          * jnp.dtype(dtype).itemsize)


def make_decode_fn(model: "Transformer"):
  """`decode_fn(params, tokens, cache, index, positions, kv_mask, logits_at) -> (logits,
  cache)`.

  The signature `jaxsearch.rollout.sampler.make_sampler` and the rollout engine expect, from
  `Transformer.decode`.
  """

  def decode_fn(params, tokens, cache, index, positions=None, kv_mask=None, logits_at=None):
    return model.apply({"params": params}, tokens, cache, index, positions=positions,
                       kv_mask=kv_mask, logits_at=logits_at, method=Transformer.decode)

  return decode_fn


def count_params(params) -> int:
  """Number of scalars in a parameter tree (boxed, unboxed or abstract leaves)."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def rope_inv_freq(config: TransformerConfig) -> jax.Array:
  """Inverse frequencies [hd/2] float32 of the config's RoPE variant (as transformers).

  "default": `1 / theta^(arange(0, hd, 2) / hd)`; "linear": divided by `rope_factor`;
  "llama3": wavelengths longer than `original_max / low_freq_factor` are divided by
  `rope_factor`, shorter than `original_max / high_freq_factor` kept, and those between
  interpolated smoothly.
  """
  hd = config.hd
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  if config.rope_type == "linear":
    return inv_freq / config.rope_factor
  if config.rope_type == "llama3":
    factor, low, high = (config.rope_factor, config.rope_low_freq_factor,
                         config.rope_high_freq_factor)
    old_len = config.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)
  return inv_freq


def stack_layer_params(params: PyTree, num_layers: int) -> PyTree:
  """`layers_{i}/...` parameters -> `layers/block/...` stacked on a leading axis (scan layout).

  Works on plain arrays and on abstract or boxed leaves alike (boxed `LogicallyPartitioned`
  leaves get the `layers` axis name prepended). Inverse of `unstack_layer_params`.
  """
  params = dict(params)
  layers = [params.pop(f"layers_{i}") for i in range(num_layers)]
  def stack(*xs):
    if isinstance(xs[0], nn.Partitioned):
      return xs[0].replace(value=jnp.stack([x.value for x in xs]),
                           names=("layers", *xs[0].names))
    return jnp.stack(xs)
  params["layers"] = {"block": jax.tree.map(
      stack, *layers, is_leaf=lambda x: isinstance(x, nn.Partitioned))}
  return params


def unstack_layer_params(params: PyTree) -> PyTree:
  """`layers/block/...` stacked parameters -> `layers_{i}/...` (inverse of `stack_layer_params`)."""
  params = dict(params)
  stacked = params.pop("layers")["block"]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
  return params


def _rope(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """HF Llama rotary tables: (cos, sin), each [..., hd] float32 for positions [...]."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq               # [..., hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)                            # [..., hd]
  return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, H, T, hd]; cos/sin broadcastable to it ([B, 1, T, hd] or [T, hd]), in x's dtype."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


class RMSNorm(nn.Module):
  """Root-mean-square norm, statistics in float32 (HF `LlamaRMSNorm`)."""

  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):  # [..., D] -> [..., D] in `dtype`
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


def _kernel_init(names: tuple[str, ...], in_axis=0, out_axis=-1):
  return nn.with_logical_partitioning(
      nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                       in_axis=in_axis, out_axis=out_axis), names)


def _attention_mask(q_slots, kv_slots, kv_mask):
  """[B or 1, T, S] bool: key slot <= query slot, and the key slot holds a real token.
  `q_slots` is [T] (every row's new tokens in the same slots) or [B, T] (per-row slots)."""
  if q_slots.ndim == 2:
    mask = kv_slots[None, None, :] <= q_slots[:, :, None]       # [B, T, S]
  else:
    mask = (kv_slots[None, :] <= q_slots[:, None])[None]        # [1, T, S]
  if kv_mask is not None:
    mask = mask & kv_mask[:, None, :].astype(bool)              # [B, T, S]
  return mask


class Attention(nn.Module):
  """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    d, h, hkv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.hd
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)

    def proj(heads, heads_name):
      return nn.Einsum(
          shape=(d, heads, hd), einsum_str="btd,dhk->bhtk", use_bias=cfg.qkv_bias,
          kernel_init=_kernel_init(("embed", heads_name, "head_dim"), 0, (1, 2)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                 (heads_name, "head_dim")),
          **common)

    self.q_proj = proj(h, "heads")
    self.k_proj = proj(hkv, "kv_heads")
    self.v_proj = proj(hkv, "kv_heads")
    self.o_proj = nn.Einsum(
        shape=(h, hd, d), einsum_str="bhtk,hkd->btd", use_bias=False,
        kernel_init=_kernel_init(("heads", "head_dim", "embed"), (0, 1), 2), **common)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype)
      self.k_norm = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype)

  def __call__(self, x, positions, q_slots, kv_mask=None, cache: KVCache | None = None,
               cache_index=None, layer: int | None = None):
    """Attention over the new tokens (no cache) or over the updated cache.

    Args:
      x: [B, T, D] normed inputs.
      positions: [B, T] int32 RoPE positions of the new tokens.
      q_slots: [T] int32 sequence slots of the new tokens (`cache_index + arange(T)` with a
        cache, `arange(T)` without), or [B, T] with per-row cache indices; a token attends to
        keys in slots `<=` its own.
      kv_mask: optional [B, S] bool (S = T without a cache): slots holding real tokens
        (False for padding); None means all.
      cache: optional `KVCache`, either the full cache ([L, B, Hkv, S, hd], `layer` an int)
        or this layer's ([B, Hkv, S, hd], `layer` None); the new keys/values are written at
        slots `[cache_index, cache_index + T)`.
      cache_index: [] int32, first slot written; or [B] int32, each row's own first slot (the
        writes are a scatter that drops slots `>= S`).
      layer: static index of this layer in a full cache.

    Returns:
      (out [B, T, D], cache or None).
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    b, t, _ = x.shape
    hkv, groups, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.hd

    q = self.q_proj(x)  # [B, H, T, hd]
    k = self.k_proj(x)  # [B, Hkv, T, hd]
    v = self.v_proj(x)  # [B, Hkv, T, hd]
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)                     # over hd, per head
    q = nn.with_logical_constraint(q, ("batch", "heads", "length", "head_dim"))
    k = nn.with_logical_constraint(k, ("batch", "kv_heads", "length", "head_dim"))
    v = nn.with_logical_constraint(v, ("batch", "kv_heads", "length", "head_dim"))
    cos, sin = _rope(positions, rope_inv_freq(cfg))              # [B, T, hd]
    cos, sin = cos[:, None].astype(q.dtype), sin[:, None].astype(q.dtype)
    q = _apply_rope(q, cos, sin)
    k = _apply_rope(k, cos, sin)

    if cache is None:
      keys, values = k, v                                        # [B, Hkv, T, hd]
    elif jnp.ndim(cache_index) == 1:        # per-row slots: q_slots [B, T]
      rows = jnp.arange(b)[:, None]                              # [B, 1]
      lead = () if layer is None else (layer,)

      def write(buf, new):  # new [B, Hkv, T, hd] -> buf[(layer,) b, :, q_slots[b, t]]
        return buf.at[(*lead, rows, slice(None), q_slots)].set(
            jnp.swapaxes(new, 1, 2).astype(buf.dtype), mode="drop")   # values [B, T, Hkv, hd]

      cache = KVCache(k=write(cache.k, k), v=write(cache.v, v))
      keys = (cache.k if layer is None else cache.k[layer]).astype(dtype)
      values = (cache.v if layer is None else cache.v[layer]).astype(dtype)
    else:
      if layer is None:
        start = (0, 0, cache_index, 0)
        new_k, new_v = k, v
      else:
        start = (layer, 0, 0, cache_index, 0)
        new_k, new_v = k[None], v[None]
      cache = KVCache(
          k=lax.dynamic_update_slice(cache.k, new_k.astype(cache.k.dtype), start),
          v=lax.dynamic_update_slice(cache.v, new_v.astype(cache.v.dtype), start))
      keys = (cache.k if layer is None else cache.k[layer]).astype(dtype)  # [B, Hkv, S, hd]
      values = (cache.v if layer is None else cache.v[layer]).astype(dtype)
    kv_slots = jnp.arange(keys.shape[2], dtype=jnp.int32)        # [S]

    q = q.reshape(b, hkv, groups, t, hd)                         # head h -> (h // G, h % G)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, keys,
                        preferred_element_type=jnp.float32) * (1.0 / math.sqrt(hd))
    mask = _attention_mask(q_slots, kv_slots, kv_mask)[:, None, None]   # [B|1, 1, 1, T, S]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, values).reshape(b, cfg.num_heads, t, hd)
    return self.o_proj(out), cache


class MLP(nn.Module):
  """SwiGLU: `down(silu(gate(x)) * up(x))`."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    common = dict(use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    self.gate_proj = nn.Dense(cfg.mlp_dim, kernel_init=_kernel_init(("embed", "mlp")), **common)
    self.up_proj = nn.Dense(cfg.mlp_dim, kernel_init=_kernel_init(("embed", "mlp")), **common)
    self.down_proj = nn.Dense(cfg.d_model, kernel_init=_kernel_init(("mlp", "embed")), **common)

  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    h = nn.silu(self.gate_proj(x)) * self.up_proj(x)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return self.down_proj(h)


class Block(nn.Module):
  """Pre-norm decoder block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    norm = dict(eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    self.attn_norm = RMSNorm(**norm)
    self.attn = Attention(cfg)
    self.mlp_norm = RMSNorm(**norm)
    self.mlp = MLP(cfg)

  def __call__(self, x, positions, q_slots, kv_mask=None, cache=None, cache_index=None,
               layer: int | None = None):
    """x [B, T, D] -> (x [B, T, D], cache); see `Attention.__call__`."""
    h, cache = self.attn(self.attn_norm(x), positions, q_slots, kv_mask, cache, cache_index,
                         layer)
    x = nn.with_logical_constraint(x + h, ("batch", "length", "embed"))
    x = x + self.mlp(self.mlp_norm(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, cache


class _ScanBlock(nn.Module):
  """`Block` in `nn.scan`'s (carry, x) -> (carry, y) form; the cache is scanned per layer."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x, layer_cache, positions, q_slots, kv_mask, cache_index):
    block = _block_class(self.config)(self.config, name="block")
    x, layer_cache = block(x, positions, q_slots, kv_mask, layer_cache, cache_index, None)
    return x, layer_cache


_REMAT_POLICIES = {
    "full": None,                                                 # save nothing
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_class(config: TransformerConfig):
  if config.remat == "none":
    return Block
  # Argument 7 (counting self) is the static layer index.
  return nn.remat(Block, policy=_REMAT_POLICIES[config.remat], prevent_cse=not config.scan_layers,
                  static_argnums=(7,))


class Transformer(nn.Module):
  """Llama / Qwen2-style causal language model.

  `__call__` runs a full causal forward pass; `decode` runs T new tokens against a `KVCache`
  (a chunked prefill when T > 1, one sampling step when T == 1); `hidden_states` returns the
  final-norm activations (no output head) for value and reward heads. All share the same
  parameters and are jittable.

  Positions and padding: by default token t of every row has RoPE position t (or
  `cache_index + t`) and attends to every earlier slot. Left-padded batches pass
  `attention_mask` / `kv_mask` (False on padding) and per-row `positions` (for example
  `cumsum(mask) - 1`), which gives every row exactly the logits it would get alone.

  Example:
    >>> model = Transformer(TransformerConfig(vocab_size=64, d_model=32, num_layers=2))
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  """

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                    ("vocab", "embed")))
    if cfg.scan_layers:
      self.layers = nn.scan(
          _ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    else:
      block = _block_class(cfg)
      self.layers = [block(cfg) for _ in range(cfg.num_layers)]  # layers_0, layers_1, ...
    self.final_norm = RMSNorm(eps=cfg.norm_eps, dtype=cfg.compute_dtype,
                              param_dtype=cfg.params_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
          kernel_init=_kernel_init(("embed", "vocab")))

  def _hidden(self, tokens, positions, q_slots, kv_mask, cache=None, cache_index=None):
    x = self.embed(tokens.astype(jnp.int32))                     # [B, T, D]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if self.config.scan_layers:
      layer_cache = None if cache is None else (cache.k, cache.v)
      x, layer_cache = self.layers(x, None if cache is None else KVCache(*layer_cache),
                                   positions, q_slots, kv_mask, cache_index)
      cache = None if cache is None else KVCache(*layer_cache)
    else:
      for i, layer in enumerate(self.layers):
        x, cache = layer(x, positions, q_slots, kv_mask, cache, cache_index, i)
    return self.final_norm(x), cache

  def _logits(self, x):
    if self.config.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def _full_inputs(self, tokens, positions, attention_mask):
    b, t = tokens.shape
    if positions is None:
      positions = jnp.arange(t, dtype=jnp.int32)
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, t))
    if attention_mask is not None and attention_mask.shape != (b, t):
      raise ValueError(f"attention_mask must be [B, T] = {(b, t)}, got {attention_mask.shape}")
    return positions, jnp.arange(t, dtype=jnp.int32), attention_mask

  def __call__(self, tokens, *, positions=None, attention_mask=None, return_hidden=False):
    """Causal forward pass.

    Args:
      tokens: [B, T] int32.
      positions: optional [B, T] or [T] int32 RoPE positions; default 0..T-1.
      attention_mask: optional [B, T] bool, False on padding (keys there are ignored).
      return_hidden: also return the final-norm hidden states.

    Returns:
      logits [B, T, V] float32, or `(logits, hidden [B, T, D])` with `return_hidden`.
    """
    x, _ = self._hidden(tokens, *self._full_inputs(tokens, positions, attention_mask))
    logits = self._logits(x)
    return (logits, x) if return_hidden else logits

  def token_scores(self, tokens, targets, *, positions=None, attention_mask=None
                   ) -> TokenScores:
    """Log-prob, entropy and argmax hit of `targets` under the next-token distributions.

    `scores_from_logits(self(tokens), targets)`, computed `config.logits_chunk` positions at
    a time when that is > 0: the output head and the softmax statistics run in an `nn.scan`
    over chunks whose steps are rematerialised, so the backward pass recomputes each chunk's
    `[B, C, V]` logits instead of keeping `[B, T, V]`. The last chunk is padded (and the
    padding dropped).

    Args:
      tokens: [B, T] int32 inputs.
      targets: [B, T] int token ids, `targets[:, t]` scored by position t (usually
        `tokens` shifted by one).
      positions, attention_mask: as in `__call__`.

    Returns:
      `TokenScores`, [B, T] each.
    """
    if targets.shape != tokens.shape:
      raise ValueError(f"targets must have the shape of tokens {tokens.shape}, got "
                       f"{targets.shape}")
    x, _ = self._hidden(tokens, *self._full_inputs(tokens, positions, attention_mask))
    b, t = tokens.shape
    c = self.config.logits_chunk
    if not c or c >= t:
      return scores_from_logits(self._logits(x), targets)
    k = -(-t // c)
    x = jnp.pad(x, ((0, 0), (0, k * c - t), (0, 0))).reshape(b, k, c, -1).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, k * c - t))).reshape(b, k, c).swapaxes(0, 1)
    scan = nn.scan(nn.remat(_chunk_scores, prevent_cse=False), variable_broadcast="params",
                   split_rngs={"params": False}, in_axes=0, out_axes=0, length=k)
    _, scores = scan(self, None, (x, targets))                    # [K, B, C] each
    return TokenScores(*(v.swapaxes(0, 1).reshape(b, k * c)[:, :t] for v in scores))

  def hidden_states(self, tokens, *, positions=None, attention_mask=None):
    """Final-norm activations [B, T, D] in the compute dtype (no output head); see __call__."""
    x, _ = self._hidden(tokens, *self._full_inputs(tokens, positions, attention_mask))
    return x

  def decode(self, tokens, cache: KVCache, cache_index, *, positions=None, kv_mask=None,
             logits_at=None):
    """Runs T new tokens against the cache.

    The keys/values of the new tokens are written at slots `[cache_index, cache_index + T)`;
    token t (slot `cache_index + t`) attends to the slots `<= cache_index + t` that `kv_mask`
    marks as real. With a scalar `cache_index` the caller keeps `cache_index + T <= S`
    (`lax.dynamic_update_slice` would clamp the write otherwise). With a [B] `cache_index`
    every row writes at its own slots (a ragged batch: each row's cache stays compact, with
    no holes); slots `>= S` are dropped, and a row's tokens past the ones it means to keep
    may be written and are simply overwritten by its next call.

    Args:
      tokens: [B, T] int32.
      cache: `KVCache`, [L, B, Hkv, S, hd] each.
      cache_index: [] int32, same for every row, or [B] int32, per row; may be traced.
      positions: optional [B, T] int32 RoPE positions; default `cache_index + arange(T)`
        (per row).
      kv_mask: optional [B, S] bool, False for slots holding padding.
      logits_at: optional [B] int32: return only the logits of token `logits_at[b]` of each
        row, [B, V] (the output head runs on B vectors, not B * T: a chunked prefill needs
        only its last token's).

    Returns:
      (logits [B, T, V] float32 (or [B, V] with `logits_at`), updated `KVCache`).
    """
    cfg = self.config
    b, t = tokens.shape
    expected = (cfg.num_layers, b, cfg.num_kv_heads, cfg.hd)
    got = cache.k.shape[:3] + cache.k.shape[4:]
    if cache.k.ndim != 5 or got != expected or cache.v.shape != cache.k.shape:
      raise ValueError(
          f"cache must have shape [L, B, Hkv, S, hd] = [{expected[0]}, {expected[1]}, "
          f"{expected[2]}, S, {expected[3]}], got k {cache.k.shape}, v {cache.v.shape}")
    if t > cache.k.shape[3]:
      raise ValueError(f"{t} new tokens do not fit a cache of {cache.k.shape[3]} positions")
    if kv_mask is not None and kv_mask.shape != (b, cache.k.shape[3]):
      raise ValueError(f"kv_mask must be [B, S] = {(b, cache.k.shape[3])}, got {kv_mask.shape}")
    cache_index = jnp.asarray(cache_index, jnp.int32)
    if cache_index.ndim not in (0, 1) or (cache_index.ndim == 1 and cache_index.shape != (b,)):
      raise ValueError(f"cache_index must be a scalar or [B] = [{b}], got {cache_index.shape}")
    q_slots = (cache_index[..., None] if cache_index.ndim else cache_index) + jnp.arange(
        t, dtype=jnp.int32)                                      # [T] or [B, T]
    if positions is None:
      positions = q_slots
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, t))
    x, cache = self._hidden(tokens, positions, q_slots, kv_mask, cache, cache_index)
    if logits_at is not None:
      x = jnp.take_along_axis(x, jnp.asarray(logits_at, jnp.int32)[:, None, None], axis=1)
      return self._logits(x)[:, 0], cache
    return self._logits(x), cache
