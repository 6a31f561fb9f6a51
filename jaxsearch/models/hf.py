"""Hugging Face checkpoints (Llama / Qwen2 / Qwen3 family) to and from `Transformer` parameters.

A Hugging Face causal-LM directory holds `config.json` and either one `model.safetensors` or
several shards listed in `model.safetensors.index.json` (`{"weight_map": {name: file}}`).
This module maps the config onto `TransformerConfig` and every tensor onto the parameter tree
documented in `jaxsearch.models.transformer`; saving does the inverse, so that
transformers' `AutoModelForCausalLM.from_pretrained` (or vLLM) serves a trained policy.

Tensor layouts (torch `nn.Linear.weight` is `[out, in]`; D model width, H query heads, Hkv
key/value heads, hd head dim, F MLP width, V vocabulary):

  HF name (prefix model.layers.{i}.)    HF shape    jaxsearch path                    shape
  model.embed_tokens.weight             [V, D]      embed/embedding                   [V, D]
  input_layernorm.weight                [D]         layers_{i}/attn_norm/scale        [D]
  self_attn.{q,k,v}_proj.weight         [n*hd, D]   layers_{i}/attn/{q,k,v}_proj/kernel
                                                      = weight.T.reshape(D, n, hd)    [D, n, hd]
  self_attn.{q,k,v}_proj.bias           [n*hd]      .../bias = bias.reshape(n, hd)    [n, hd]
  self_attn.o_proj.weight               [D, H*hd]   layers_{i}/attn/o_proj/kernel
                                                      = weight.T.reshape(H, hd, D)    [H, hd, D]
  post_attention_layernorm.weight       [D]         layers_{i}/mlp_norm/scale         [D]
  mlp.{gate,up}_proj.weight             [F, D]      layers_{i}/mlp/{gate,up}_proj/kernel [D, F]
  mlp.down_proj.weight                  [D, F]      layers_{i}/mlp/down_proj/kernel   [F, D]
  self_attn.{q,k}_norm.weight           [hd]        layers_{i}/attn/{q,k}_norm/scale  [hd]
                                                      (Qwen3 only)
  model.norm.weight                     [D]         final_norm/scale                  [D]
  lm_head.weight                        [V, D]      lm_head/kernel (untied only)      [D, V]

(n = H for q, Hkv for k and v.) Every conversion is a transpose and/or reshape, so
`load(save(params)) == params` bit for bit in any dtype.

Config mapping: `hidden_size` → d_model, `num_hidden_layers` → num_layers,
`num_attention_heads` → num_heads, `num_key_value_heads` (default: num_heads) → num_kv_heads,
`head_dim` (default `hidden_size // num_attention_heads`; stored as None when equal to it),
`intermediate_size` → mlp_dim, `rms_norm_eps` → norm_eps, `tie_word_embeddings`
(default False) → tie_embeddings, `vocab_size`, `max_position_embeddings` → max_len, Qwen2 →
qkv_bias=True, Qwen3 → qk_norm=True (no biases) and head_dim default 128 (transformers' `Qwen3Config` default, not D / H). The embedding may have more rows
than the tokenizer has tokens (Qwen pads its table to a multiple of 128): `vocab_size` is the
table's size, and ids past the tokenizer's are never produced by it. RoPE is read from transformers 5's `rope_parameters` (`rope_type` "default" |
"linear" | "llama3", `rope_theta`, `factor`, `low_freq_factor`, `high_freq_factor`,
`original_max_position_embeddings`) or from the older top-level `rope_theta` + `rope_scaling`
(where `rope_scaling` wins, as in transformers). What the transformer cannot compute is
rejected with a `ValueError` naming the key: Llama's and Qwen3's `attention_bias=True` (it
biases o_proj too) and `mlp_bias=True`, `hidden_act` other than silu, other RoPE types (dynamic, yarn,
longrope, ...), `partial_rotary_factor != 1`, Qwen2 / Qwen3 sliding-window attention, and
mixture-of-experts configs (`num_experts`, `num_local_experts`, ...).

Example:
  >>> model, params = load_hf_checkpoint("/path/to/SmolLM2-135M")   # config.json + safetensors
  >>> logits = model.apply({"params": params}, tokens)               # [B, T, V] float32
  >>> save_hf_checkpoint(model, params, "/tmp/exported", dtype="bfloat16",
  ...                    max_shard_bytes=2**30)                      # transformers can load it
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from flax import traverse_util
from flax.linen import meta
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.models.transformer import Transformer
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.models.transformer import stack_layer_params
from jaxsearch.models.transformer import unstack_layer_params

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                           "Qwen3ForCausalLM": "qwen3"}
_ARCHITECTURE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
# transformers' class defaults for keys that a config.json may leave out.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768}
_DEFAULT_HEAD_DIM = {"qwen3": 128}
# Keys of mixture-of-experts configs (Mixtral, Qwen2-MoE, Qwen3-MoE, Llama 4, ...).
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
             "moe_intermediate_size")
_DEFAULT_ROPE_THETA = 10_000.0

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

_DTYPE_NAMES = ("float32", "bfloat16", "float16")
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _supported() -> str:
  return (f"supported model_type: {list(SUPPORTED_MODEL_TYPES)}, architectures: "
          f"{list(SUPPORTED_ARCHITECTURES)}")


def _model_type(hf_config: Mapping[str, Any]) -> str:
  """The checked family ("llama" | "qwen2" | "qwen3") from `model_type` and `architectures`."""
  model_type = hf_config.get("model_type")
  architectures = hf_config.get("architectures") or []
  if isinstance(architectures, str):
    architectures = [architectures]
  if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"unsupported model_type {model_type!r} (architectures {architectures}); "
                     + _supported())
  for arch in architectures:
    if arch not in SUPPORTED_ARCHITECTURES:
      raise ValueError(f"unsupported architecture {arch!r} (model_type {model_type!r}); "
                       + _supported())
  families = {SUPPORTED_ARCHITECTURES[a] for a in architectures}
  if model_type is None:
    if len(families) != 1:
      raise ValueError(f"config has no model_type and architectures {architectures} do not name "
                       "one family; " + _supported())
    return families.pop()
  if families and families != {model_type}:
    raise ValueError(f"model_type {model_type!r} does not match architectures {architectures}")
  return model_type


def _require(hf_config: Mapping[str, Any], key: str) -> Any:
  if hf_config.get(key) is None:
    raise ValueError(f"HF config lacks {key!r}")
  return hf_config[key]


def _rope_fields(hf_config: Mapping[str, Any], max_positions: int) -> dict[str, Any]:
  """TransformerConfig RoPE fields from `rope_parameters` or `rope_theta` + `rope_scaling`."""
  # transformers 5: `rope_parameters = rope_scaling or rope_parameters`; theta from the dict,
  # else the top-level `rope_theta`, else 10000.
  params = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
  if not isinstance(params, Mapping):
    raise ValueError(f"rope_parameters must be a dict, got {params!r}")
  layer_types = hf_config.get("layer_types") or ()
  if params and all(k in layer_types for k in params):      # nested per layer type
    nested = list(params.values())
    if any(p != nested[0] for p in nested):
      raise ValueError(f"per-layer-type rope_parameters that differ are not supported: {params}")
    params = nested[0] or {}
  rope_type = params.get("rope_type", params.get("type", "default"))
  theta = params.get("rope_theta", hf_config.get("rope_theta", _DEFAULT_ROPE_THETA))
  partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
  if partial is not None and float(partial) != 1.0:
    raise ValueError(f"partial_rotary_factor={partial!r} is not supported (only 1.0)")
  fields: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}

  def need(key):
    if params.get(key) is None:
      raise ValueError(f"rope_type {rope_type!r} needs rope_parameters[{key!r}], got {params}")
    return params[key]

  if rope_type == "default":
    pass
  elif rope_type == "linear":
    fields["rope_factor"] = float(need("factor"))
  elif rope_type == "llama3":
    fields["rope_factor"] = float(need("factor"))
    fields["rope_low_freq_factor"] = float(need("low_freq_factor"))
    fields["rope_high_freq_factor"] = float(need("high_freq_factor"))
    # As transformers: a top-level original_max_position_embeddings wins, then the dict's,
    # then max_position_embeddings.
    original = hf_config.get("original_max_position_embeddings",
                             params.get("original_max_position_embeddings", max_positions))
    fields["rope_original_max_len"] = int(original)
  else:
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: "
                     "['default', 'linear', 'llama3']")
  return fields


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
  """`TransformerConfig` of a Llama / Qwen2 `config.json` dict.

  Args:
    hf_config: the parsed `config.json` (transformers 4 or 5 style).
    **overrides: `TransformerConfig` fields set after the mapping (e.g. `max_len=2048`,
      `dtype="bfloat16"`, `param_dtype="bfloat16"`).

  Returns:
    The config; `head_dim` is None when it equals `hidden_size // num_attention_heads`, and
    the RoPE fields a `rope_type` does not use keep their defaults.

  Raises:
    ValueError naming the key and value for an unsupported family, architecture, activation,
    bias, RoPE setting or sliding window, or a missing size.

  Example:
    >>> cfg = config_from_hf(json.load(open("ckpt/config.json")), max_len=1024)
  """
  model_type = _model_type(hf_config)
  act = hf_config.get("hidden_act", "silu")
  if act not in ("silu", "swish"):                  # transformers maps both to SiLU
    raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
  if model_type in ("llama", "qwen3"):
    if hf_config.get("attention_bias", False):
      raise ValueError(f"attention_bias=True is not supported: {model_type}'s attention_bias "
                       "adds a bias to o_proj as well as q/k/v, and the transformer has no "
                       "o_proj bias")
  if model_type == "llama":
    if hf_config.get("mlp_bias", False):
      raise ValueError("mlp_bias=True is not supported: the SwiGLU MLP has no biases")
    qkv_bias = False
  else:
    if hf_config.get("use_sliding_window", False):
      raise ValueError("use_sliding_window=True is not supported (full attention only)")
    sliding = [t for t in hf_config.get("layer_types") or () if t != "full_attention"]
    if sliding:
      raise ValueError(f"layer_types {sliding[:1]} is not supported (full attention only)")
    qkv_bias = model_type == "qwen2"
  moe = [k for k in _MOE_KEYS if hf_config.get(k)]
  if moe:
    raise ValueError(f"{moe[0]}={hf_config[moe[0]]!r}: mixture-of-experts models are not "
                     "supported (dense MLP only)")

  d = int(_require(hf_config, "hidden_size"))
  heads = int(_require(hf_config, "num_attention_heads"))
  kv_heads = hf_config.get("num_key_value_heads")
  head_dim = hf_config.get("head_dim", _DEFAULT_HEAD_DIM.get(model_type))
  if head_dim is None and d % heads:
    raise ValueError(f"hidden_size={d} is not divisible by num_attention_heads={heads} and "
                     "head_dim is not given")
  if head_dim is not None and d % heads == 0 and int(head_dim) == d // heads:
    head_dim = None
  max_positions = int(hf_config.get("max_position_embeddings",
                                    _DEFAULT_MAX_POSITIONS[model_type]))
  fields = dict(
      vocab_size=int(_require(hf_config, "vocab_size")),
      d_model=d,
      num_layers=int(_require(hf_config, "num_hidden_layers")),
      num_heads=heads,
      num_kv_heads=heads if kv_heads is None else int(kv_heads),
      head_dim=None if head_dim is None else int(head_dim),
      mlp_dim=int(_require(hf_config, "intermediate_size")),
      norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
      qkv_bias=qkv_bias,
      qk_norm=model_type == "qwen3",
      max_len=max_positions,
      **_rope_fields(hf_config, max_positions),
  )
  fields.update(overrides)
  return TransformerConfig(**fields)


def _rope_parameters(config: TransformerConfig) -> dict[str, Any]:
  params: dict[str, Any] = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
  if config.rope_type in ("linear", "llama3"):
    params["factor"] = config.rope_factor
  if config.rope_type == "llama3":
    params["low_freq_factor"] = config.rope_low_freq_factor
    params["high_freq_factor"] = config.rope_high_freq_factor
    params["original_max_position_embeddings"] = config.rope_original_max_len
  return params


def _check_model_type(config: TransformerConfig, model_type: str | None) -> str:
  if model_type is None:
    model_type = "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama"
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"unsupported model_type {model_type!r}; " + _supported())
  if config.qk_norm != (model_type == "qwen3"):
    raise ValueError(f"model_type={model_type!r} cannot hold qk_norm={config.qk_norm} (only "
                     "Qwen3 normalises queries and keys); save it as model_type="
                     f"{'qwen3' if config.qk_norm else 'llama or qwen2'!r}")
  if model_type == "qwen3":
    if config.qkv_bias:
      raise ValueError("model_type='qwen3' cannot hold qkv_bias=True (Qwen3's attention_bias "
                       "also biases o_proj)")
    return model_type
  if model_type == "llama" and config.qkv_bias:
    raise ValueError("model_type='llama' cannot hold qkv_bias=True (Llama's attention_bias also "
                     "biases o_proj); save it as model_type='qwen2'")
  if model_type == "qwen2" and not config.qkv_bias:
    raise ValueError("model_type='qwen2' always has q/k/v biases but the config has "
                     "qkv_bias=False; save it as model_type='llama'")
  return model_type


def config_to_hf(config: TransformerConfig, model_type: str | None = None) -> dict[str, Any]:
  """The `config.json` dict (transformers 5 style) of a config; inverse of `config_from_hf`.

  Besides `rope_parameters` it writes the legacy top-level `rope_theta` and `rope_scaling`
  (null for "default") so that transformers 4 and vLLM read the same RoPE. `dtype` is the
  config's `param_dtype`; `save_hf_checkpoint` sets it to the dtype it writes.

  Args:
    config: the model config.
    model_type: "llama", "qwen2" or "qwen3"; None picks "qwen3" when `config.qk_norm`, else
      "qwen2" when `config.qkv_bias`, else "llama".

  Raises:
    ValueError: an unsupported model_type, Llama with qkv_bias or Qwen2 without, qk_norm
      outside Qwen3.

  Example:
    >>> config_to_hf(TransformerConfig(vocab_size=64, d_model=32))["num_key_value_heads"]
    2
  """
  model_type = _check_model_type(config, model_type)
  rope = _rope_parameters(config)
  out: dict[str, Any] = {
      "architectures": [_ARCHITECTURE[model_type]],
      "model_type": model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.d_model,
      "intermediate_size": config.mlp_dim,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.hd,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_len,
      "rms_norm_eps": config.norm_eps,
      "tie_word_embeddings": config.tie_embeddings,
      "rope_parameters": rope,
      "rope_theta": config.rope_theta,
      "rope_scaling": (None if config.rope_type == "default"
                       else {k: v for k, v in rope.items() if k != "rope_theta"}),
      "attention_dropout": 0.0,
      "use_cache": True,
      "dtype": config.param_dtype,
  }
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  elif model_type == "qwen3":
    out.update(attention_bias=False, use_sliding_window=False, sliding_window=None,
               max_window_layers=config.num_layers,
               layer_types=["full_attention"] * config.num_layers)
  else:
    out.update(use_sliding_window=False, sliding_window=None,
               max_window_layers=config.num_layers,
               layer_types=["full_attention"] * config.num_layers)
  return out


class _Entry(NamedTuple):
  """One HF tensor and its place in the parameter tree."""

  hf_name: str
  path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]       # jaxsearch shape
  kind: str                    # "copy" | "dense" | "heads_in" | "heads_out" | "bias"


def _entries(config: TransformerConfig) -> list[_Entry]:
  """Every tensor of the config's checkpoint, in HF order."""
  d, h, hkv, hd = config.d_model, config.num_heads, config.num_kv_heads, config.hd
  f, v = config.mlp_dim, config.vocab_size
  out = [_Entry("model.embed_tokens.weight", ("embed", "embedding"), (v, d), (v, d), "copy")]
  for i in range(config.num_layers):
    pre, lay = f"model.layers.{i}.", f"layers_{i}"
    out.append(_Entry(pre + "input_layernorm.weight", (lay, "attn_norm", "scale"), (d,), (d,),
                      "copy"))
    for name, n in (("q_proj", h), ("k_proj", hkv), ("v_proj", hkv)):
      out.append(_Entry(f"{pre}self_attn.{name}.weight", (lay, "attn", name, "kernel"),
                        (n * hd, d), (d, n, hd), "heads_in"))
      if config.qkv_bias:
        out.append(_Entry(f"{pre}self_attn.{name}.bias", (lay, "attn", name, "bias"),
                          (n * hd,), (n, hd), "bias"))
    out.append(_Entry(pre + "self_attn.o_proj.weight", (lay, "attn", "o_proj", "kernel"),
                      (d, h * hd), (h, hd, d), "heads_out"))
    if config.qk_norm:
      for name in ("q_norm", "k_norm"):
        out.append(_Entry(f"{pre}self_attn.{name}.weight", (lay, "attn", name, "scale"),
                          (hd,), (hd,), "copy"))
    out.append(_Entry(pre + "post_attention_layernorm.weight", (lay, "mlp_norm", "scale"), (d,),
                      (d,), "copy"))
    for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
      out.append(_Entry(f"{pre}mlp.{name}.weight", (lay, "mlp", name, "kernel"), shape,
                        shape[::-1], "dense"))
  out.append(_Entry("model.norm.weight", ("final_norm", "scale"), (d,), (d,), "copy"))
  if not config.tie_embeddings:
    out.append(_Entry("lm_head.weight", ("lm_head", "kernel"), (v, d), (d, v), "dense"))
  return out


def _to_params_layout(x: np.ndarray, entry: _Entry) -> np.ndarray:
  if entry.kind in ("dense", "heads_in", "heads_out"):
    x = x.T
  return x.reshape(entry.shape)


def _to_hf_layout(x: np.ndarray, entry: _Entry) -> np.ndarray:
  if entry.kind == "heads_in":                   # [D, n, hd] -> [n*hd, D]
    x = x.reshape(entry.shape[0], -1).T
  elif entry.kind == "heads_out":                # [H, hd, D] -> [D, H*hd]
    x = x.reshape(-1, entry.shape[-1]).T
  elif entry.kind == "dense":
    x = x.T
  return np.ascontiguousarray(x.reshape(entry.hf_shape))


def _is_ignored(name: str) -> bool:
  """Non-weight buffers that old checkpoints carry (RoPE tables)."""
  return name.endswith(".inv_freq")


def _check_tensor_names(shapes: Mapping[str, tuple[int, ...]], config: TransformerConfig,
                        source: str) -> None:
  """Missing / unexpected / mis-shaped tensors, all reported in one ValueError."""
  entries = _entries(config)
  expected = {e.hf_name: e.hf_shape for e in entries}
  problems = []
  for name, shape in expected.items():
    if name not in shapes:
      problems.append(f"missing key {name!r} (expected shape {shape})")
    elif tuple(shapes[name]) != shape:
      problems.append(f"key {name!r} has shape {tuple(shapes[name])}, expected {shape}")
  for name, shape in shapes.items():
    if name in expected or _is_ignored(name):
      continue
    if name == "lm_head.weight" and config.tie_embeddings:
      continue                                   # checked equal to the embedding on reading
    hint = ""
    if name.endswith("o_proj.bias"):
      hint = " (an o_proj bias is not supported)"
    elif ".mlp." in name and name.endswith(".bias"):
      hint = " (MLP biases are not supported)"
    elif name.endswith((".q_proj.bias", ".k_proj.bias", ".v_proj.bias")):
      hint = " (the config has no q/k/v bias)"
    elif name.endswith((".q_norm.weight", ".k_norm.weight")):
      hint = " (q/k norms are Qwen3's: the config's model_type is not qwen3)"
    problems.append(f"unexpected key {name!r} with shape {tuple(shape)}{hint}")
  if problems:
    shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
    raise ValueError(f"{source} does not match the config (d_model={config.d_model}, "
                     f"num_layers={config.num_layers}, num_heads={config.num_heads}, "
                     f"num_kv_heads={config.num_kv_heads}, head_dim={config.hd}, "
                     f"tie_embeddings={config.tie_embeddings}, qkv_bias={config.qkv_bias}, "
                     f"qk_norm={config.qk_norm}):\n  "
                     + "\n  ".join(shown))


def _params_from_reader(read, shapes: Mapping[str, tuple[int, ...]], config: TransformerConfig,
                        source: str) -> dict[str, Any]:
  """Checks names and shapes, then converts tensor by tensor (`read(name) -> np.ndarray`)."""
  _check_tensor_names(shapes, config, source)
  dtype = config.params_dtype
  flat = {}
  for entry in _entries(config):
    flat[entry.path] = jnp.asarray(_to_params_layout(read(entry.hf_name), entry), dtype)
  if config.tie_embeddings and "lm_head.weight" in shapes:
    head = read("lm_head.weight")
    embed = read("model.embed_tokens.weight")
    if tuple(head.shape) != tuple(embed.shape) or not np.array_equal(head, embed):
      raise ValueError(f"{source}: tie_word_embeddings is true but 'lm_head.weight' (shape "
                       f"{tuple(head.shape)}) differs from 'model.embed_tokens.weight'")
  params = traverse_util.unflatten_dict(flat)
  return stack_layer_params(params, config.num_layers) if config.scan_layers else params


def params_from_hf(tensors: Mapping[str, Any], config: TransformerConfig) -> dict[str, Any]:
  """Parameter tree (in `config.param_dtype`) of HF-named tensors.

  Args:
    tensors: HF name -> array ([out, in] Linear weights, see the module docstring); numpy,
      jax or anything `np.asarray` takes. `*.inv_freq` buffers and, when tied, an
      `lm_head.weight` equal to the embedding are ignored.
    config: the model config (e.g. `config_from_hf(...)`).

  Returns:
    Nested dict of jax arrays, the layout of `Transformer(config).init(...)["params"]`,
    unboxed: `layers_{i}/...` per layer, or `layers/block/...` stacked when
    `config.scan_layers`.

  Raises:
    ValueError listing every missing, unexpected or mis-shaped key with expected and found
    shapes.

  Example:
    >>> params = params_from_hf({name: w.numpy() for name, w in state_dict.items()}, cfg)
  """
  shapes = {name: tuple(np.shape(x)) for name, x in tensors.items()}
  return _params_from_reader(lambda name: np.asarray(tensors[name]), shapes, config,
                             "tensors")


def _flat_params(params: Any) -> dict[tuple[str, ...], Any]:
  params = meta.unbox(params)
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  if not isinstance(params, Mapping):
    raise TypeError(f"params must be a nested dict of arrays, got {type(params).__name__}")
  params = dict(params)
  if isinstance(params.get("layers"), Mapping) and "block" in params["layers"]:
    params = unstack_layer_params(params)        # scan_layers layout
  return traverse_util.flatten_dict(params)


def params_to_hf(params: Any, config: TransformerConfig,
                 dtype: str | None = None) -> dict[str, np.ndarray]:
  """HF-named numpy tensors of a parameter tree; inverse of `params_from_hf`.

  Args:
    params: the `Transformer(config)` parameter tree, plain or boxed
      (`nn.LogicallyPartitioned`), per layer or stacked (`scan_layers`), optionally wrapped as
      `{"params": ...}`.
    config: its config.
    dtype: "float32" | "bfloat16" | "float16" to cast to; None keeps each leaf's dtype.

  Returns:
    Dict HF name -> C-contiguous np.ndarray in HF order (no `lm_head.weight` when tied).

  Raises:
    ValueError naming every missing, unexpected or mis-shaped parameter path.

  Example:
    >>> tensors = params_to_hf(params, model.config, dtype="bfloat16")
  """
  if dtype is not None and dtype not in _DTYPE_NAMES:
    raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)} or None, got {dtype!r}")
  flat = _flat_params(params)
  entries = _entries(config)
  expected = {e.path: e for e in entries}
  problems = []
  for path, entry in expected.items():
    if path not in flat:
      problems.append(f"missing parameter {'/'.join(path)!r} (expected shape {entry.shape})")
    elif tuple(np.shape(flat[path])) != entry.shape:
      problems.append(f"parameter {'/'.join(path)!r} has shape {tuple(np.shape(flat[path]))}, "
                      f"expected {entry.shape}")
  for path in flat:
    if path not in expected:
      problems.append(f"unexpected parameter {'/'.join(map(str, path))!r} with shape "
                      f"{tuple(np.shape(flat[path]))}")
  if problems:
    raise ValueError("params do not match the config:\n  " + "\n  ".join(problems[:12]))
  out = {}
  for entry in entries:
    x = np.asarray(jax.device_get(flat[entry.path]))
    if dtype is not None:
      x = x.astype(jnp.dtype(dtype))
    out[entry.hf_name] = _to_hf_layout(x, entry)
  return out


def _safetensors_files(path: str) -> dict[str, set[str]]:
  """file -> tensor names it should hold, from the index json or the single file."""
  index_file = os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
  if os.path.exists(index_file):
    with open(index_file) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
      raise ValueError(f"{index_file} has no 'weight_map'")
    files: dict[str, set[str]] = {}
    for name, file in weight_map.items():
      files.setdefault(file, set()).add(name)
    for file in files:
      if not os.path.exists(os.path.join(path, file)):
        raise FileNotFoundError(f"{index_file} lists {file!r}, which is not in {path}")
    return files
  single = os.path.join(path, SAFE_WEIGHTS_NAME)
  if not os.path.exists(single):
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
    if len(found) != 1:
      torch_files = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
      raise FileNotFoundError(
          f"{path} has neither {SAFE_WEIGHTS_INDEX_NAME} nor {SAFE_WEIGHTS_NAME}"
          + (f" (found {found})" if found else " nor any *.safetensors file")
          + ("; torch .bin/.pt weights are not read: convert them to safetensors"
             if torch_files else ""))
    single = os.path.join(path, found[0])
  return {os.path.basename(single): set()}   # names: whatever the file holds


def load_hf_checkpoint(path: str | os.PathLike, *, dtype: str = "float32",
                       param_dtype: str | None = None,
                       **overrides: Any) -> tuple[Transformer, dict[str, Any]]:
  """Loads a local Llama / Qwen2 Hugging Face checkpoint directory.

  Reads `config.json` and `model.safetensors` (or the shards in
  `model.safetensors.index.json`), in float32, bfloat16 or float16.

  Args:
    path: the directory.
    dtype: compute dtype of the returned model ("float32" | "bfloat16" | "float16").
    param_dtype: dtype of the returned params; None keeps the checkpoint's (its tensors'
      common dtype; float32 if they differ or are float64).
    **overrides: other `TransformerConfig` fields, e.g. `max_len` (default KV-cache length;
      else `max_position_embeddings`), `remat`, `scan_layers` (params then come stacked).

  Returns:
    (model, params): `model.apply({"params": params}, tokens [B, T])` gives logits
    [B, T, V] float32; params is a plain nested dict of jax arrays.

  Raises:
    ValueError for an unsupported config (see `config_from_hf`) or tensors that do not match
    it (each missing / unexpected / mis-shaped key named with expected and found shapes);
    FileNotFoundError when files are missing.

  Example:
    >>> model, params = load_hf_checkpoint("ckpt/", dtype="bfloat16", max_len=2048,
    ...                                    scan_layers=True)
    >>> logits = model.apply({"params": params}, jnp.array([[1, 2, 3]]))   # [1, 3, V]
  """
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  path = os.fspath(path)
  config_file = os.path.join(path, CONFIG_NAME)
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"{path} has no {CONFIG_NAME}")
  with open(config_file) as f:
    hf_config = json.load(f)
  config = config_from_hf(hf_config, dtype=dtype, **overrides)

  files = _safetensors_files(path)
  with contextlib.ExitStack() as stack:
    handles, where, shapes, dtypes = {}, {}, {}, {}
    for file, listed in files.items():
      handle = stack.enter_context(safe_open(os.path.join(path, file), framework="flax"))
      handles[file] = handle
      keys = set(handle.keys())
      for name in listed:
        if name not in keys:
          raise ValueError(f"{SAFE_WEIGHTS_INDEX_NAME} maps {name!r} to {file!r}, which does "
                           "not hold it")
      for name in keys:
        if listed and name not in listed:
          continue                               # the index maps it to another shard
        where[name] = file
        tensor = handle.get_slice(name)
        shapes[name] = tuple(tensor.get_shape())
        dtypes[name] = tensor.get_dtype()
    if param_dtype is None:
      names = {e.hf_name for e in _entries(config)} & set(dtypes)
      found = {_SAFETENSORS_DTYPES.get(dtypes[n], dtypes[n]) for n in names}
      param_dtype = found.pop() if len(found) == 1 and found <= set(_DTYPE_NAMES) else "float32"
    config = dataclasses.replace(config, param_dtype=param_dtype)

    def read(name):
      return np.asarray(handles[where[name]].get_tensor(name))

    params = _params_from_reader(read, shapes, config, f"checkpoint {path}")
  return Transformer(config), params


def _shards(tensors: Mapping[str, np.ndarray],
            max_shard_bytes: int | None) -> list[dict[str, np.ndarray]]:
  """Greedy split in order: a shard closes before a tensor that would overflow it."""
  if max_shard_bytes is None:
    return [dict(tensors)]
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, x in tensors.items():
    if shards[-1] and size + x.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = x
    size += x.nbytes
  return shards


def save_hf_checkpoint(model_or_config: Transformer | TransformerConfig, params: Any,
                       path: str | os.PathLike, *, model_type: str | None = None,
                       dtype: str | None = None, max_shard_bytes: int | None = None,
                       extra_config: Mapping[str, Any] | None = None) -> list[str]:
  """Writes a Hugging Face checkpoint directory that transformers and vLLM load.

  Writes `config.json` (`config_to_hf`, with `dtype` set to the dtype written) and
  `model.safetensors`, or, when the tensors exceed `max_shard_bytes`,
  `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`. Earlier
  `model*.safetensors` files and index in `path` that this save does not write are removed,
  so the directory holds exactly one checkpoint. A tied model writes no `lm_head.weight`.

  Args:
    model_or_config: the `Transformer` or its `TransformerConfig`.
    params: its parameter tree, plain or boxed, per layer or stacked (`scan_layers`),
      optionally wrapped as `{"params": ...}`.
    path: output directory (created if needed).
    model_type: "llama" or "qwen2"; None picks "qwen2" when the config has qkv_bias.
    dtype: "float32" | "bfloat16" | "float16" to cast to; None keeps the params' dtype.
    max_shard_bytes: largest shard in bytes (a bigger single tensor gets its own shard);
      None writes one file.
    extra_config: more `config.json` keys (e.g. `bos_token_id`, `eos_token_id`); may not
      change a key the model's config sets.

  Returns:
    The file names written.

  Example:
    >>> save_hf_checkpoint(model, params, "out/", model_type="qwen2", dtype="bfloat16")
    >>> # transformers.AutoModelForCausalLM.from_pretrained("out/") gives the same logits.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  config = model_or_config.config if isinstance(model_or_config, Transformer) else model_or_config
  if not isinstance(config, TransformerConfig):
    raise TypeError("model_or_config must be a Transformer or a TransformerConfig, got "
                    f"{type(model_or_config).__name__}")
  if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool)
                                      or not isinstance(max_shard_bytes, int)
                                      or max_shard_bytes <= 0):
    raise ValueError(f"max_shard_bytes must be a positive int or None, got {max_shard_bytes!r}")
  hf_config = config_to_hf(config, model_type)
  tensors = params_to_hf(params, config, dtype)
  written_dtypes = sorted({x.dtype.name for x in tensors.values()})
  hf_config["dtype"] = written_dtypes[0] if len(written_dtypes) == 1 else "float32"
  for key, value in (extra_config or {}).items():
    if key in hf_config and key != "dtype" and hf_config[key] != value:
      raise ValueError(f"extra_config[{key!r}]={value!r} contradicts the model's "
                       f"{key}={hf_config[key]!r}")
    hf_config[key] = value

  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  shards = _shards(tensors, max_shard_bytes)
  metadata = {"format": "pt"}                    # transformers refuses files without it
  if len(shards) == 1:
    names = [SAFE_WEIGHTS_NAME]
  else:
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  for name, shard in zip(names, shards):
    save_file(shard, os.path.join(path, name), metadata=metadata)
  written = list(names)
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values()),
                          "total_parameters": sum(math.prod(x.shape) for x in tensors.values())},
             "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
    with open(os.path.join(path, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
      f.write("\n")
    written.append(SAFE_WEIGHTS_INDEX_NAME)
  with open(os.path.join(path, CONFIG_NAME), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
    f.write("\n")
  written.append(CONFIG_NAME)
  for old in os.listdir(path):                   # stale files of an earlier save
    if old not in written and (old in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
                               or _SHARD_RE.match(old)):
      os.remove(os.path.join(path, old))
  return written
