"""Corpus embedding in fixed-size batches, and an on-disk cache of the result.

`embed_corpus` runs a pure embedding function

  embed_fn(params, input_ids [N, T], attention_mask [N, T]) -> [N, D]

(e.g. `jaxsearch.train.dual_encoder.make_embed_fn(BertEncoder(cfg))`) over M tokenized documents in
batches of exactly `batch_size` rows: the last batch is padded (with one-token rows, so mean
pooling stays finite) and its padding dropped, so the jitted function sees one shape and
compiles once per (batch_size, T), however many batches there are. The rows come back as a
host float32 array [M, D] in input order; a tqdm progress bar goes to stderr.

`cached_corpus_embeddings(cache_dir, key_parts, compute)` returns `compute()` or its cached
copy. The cache file is named by the SHA-256 of `key_parts` (a JSON-able dict: a fingerprint
of the corpus and its tokens, the encoder config, a fingerprint of the parameters, the
maximum length, ...; `array_fingerprint` / `text_fingerprint` make fingerprints):

  {cache_dir}/{key}.npy    the [M, D] float32 array
  {cache_dir}/{key}.json   sidecar: key_parts, shape, dtype, CRC-32 of the array's bytes

Both are written to a temporary file and renamed (the array first, the sidecar last), so a
run killed while writing leaves no entry that loads. On a hit the sidecar's key_parts, shape,
dtype and checksum are checked; an entry that fails any check (truncated, corrupt, written for
other key parts) is logged and recomputed.

Example:
  >>> from jaxsearch.models.encoder import BertEncoder, EncoderConfig, init_encoder_params
  >>> from jaxsearch.train.dual_encoder import make_embed_fn
  >>> cfg = EncoderConfig(vocab_size=100, hidden_size=32, num_heads=4, max_position=16)
  >>> embed_fn, params = make_embed_fn(BertEncoder(cfg)), init_encoder_params(cfg, key)
  >>> ids = np.random.randint(1, 100, (300, 16)); mask = np.ones_like(ids)
  >>> emb = cached_corpus_embeddings(
  ...     "/tmp/cache", {"corpus": array_fingerprint((ids, mask)),
  ...                    "params": array_fingerprint(params)},
  ...     lambda: embed_corpus(embed_fn, params, ids, mask, batch_size=128))
  >>> emb.shape                            # three batches, one compilation
  (300, 32)
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging

EmbedFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

_CHUNK = 1 << 24   # bytes per checksum / hash update


def embed_corpus(embed_fn: EmbedFn, params: Any, input_ids: np.ndarray,
                 attention_mask: np.ndarray, *, batch_size: int, progress: bool = True,
                 desc: str = "embed") -> np.ndarray:
  """Embeds M tokenized rows in fixed-size jitted batches.

  Args:
    embed_fn: `embed_fn(params, ids [N, T], mask [N, T]) -> [N, D]`, pure (it is jitted;
      the same function object shares its compilations across calls).
    params: the encoder's parameters.
    input_ids: [M, T] int token ids (host or device).
    attention_mask: [M, T] int / bool, 1 on real tokens.
    batch_size: rows per call; every call sees exactly [batch_size, T] (the last batch is
      padded), so one compilation serves any M.
    progress: show a tqdm bar on stderr.
    desc: the bar's label.

  Returns:
    [M, D] float32 numpy array, row i = embedding of input row i.

  Example:
    >>> emb = embed_corpus(embed_fn, params, ids, mask, batch_size=64, progress=False)
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or \
      batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  input_ids = np.asarray(input_ids)
  attention_mask = np.asarray(attention_mask)
  if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
    raise ValueError(f"input_ids and attention_mask must both be [M, T], got {input_ids.shape} "
                     f"and {attention_mask.shape}")
  m, t = input_ids.shape
  embed = jax.jit(embed_fn)
  batch_size = int(batch_size)
  out: np.ndarray | None = None
  starts = range(0, m, batch_size)
  if progress:
    from tqdm.auto import tqdm  # noqa: PLC0415
    starts = tqdm(starts, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True)
  for start in starts:
    n = min(batch_size, m - start)
    ids = np.zeros((batch_size, t), input_ids.dtype)
    mask = np.zeros((batch_size, t), attention_mask.dtype)
    ids[:n] = input_ids[start:start + n]
    mask[:n] = attention_mask[start:start + n]
    mask[n:, 0] = 1                 # padding rows: one token, so pooling stays finite
    emb = np.asarray(embed(params, ids, mask), np.float32)[:n]
    if out is None:
      out = np.empty((m, emb.shape[1]), np.float32)
    out[start:start + n] = emb
  if out is None:    # M == 0: the width comes from an abstract evaluation (no compilation)
    shape = jax.eval_shape(embed_fn, params, np.zeros((1, t), input_ids.dtype),
                           np.ones((1, t), attention_mask.dtype)).shape
    out = np.zeros((0, shape[-1]), np.float32)
  return out


# ----------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------


def array_fingerprint(tree: Any) -> str:
  """SHA-256 (hex) of a pytree of arrays: its structure, and each leaf's dtype, shape, bytes.

  Example:
    >>> array_fingerprint({"w": np.ones(2)}) == array_fingerprint({"w": np.ones(2)})
    True
    >>> array_fingerprint({"w": np.ones(2)}) == array_fingerprint({"w": np.zeros(2)})
    False
  """
  h = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  h.update(str(treedef).encode())
  for path, leaf in leaves:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    view = memoryview(a.reshape(-1).view(np.uint8))
    for i in range(0, len(view), _CHUNK):
      h.update(view[i:i + _CHUNK])
  return h.hexdigest()


def text_fingerprint(texts: Sequence[str]) -> str:
  """SHA-256 (hex) of a sequence of strings (length-prefixed, so boundaries count).

  Example:
    >>> text_fingerprint(["ab", "c"]) == text_fingerprint(["a", "bc"])
    False
  """
  h = hashlib.sha256()
  for t in texts:
    b = t.encode("utf-8")
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)
  return h.hexdigest()


def cache_key(key_parts: Mapping[str, Any]) -> str:
  """The cache file stem: SHA-256 of `key_parts` as canonical JSON (sorted keys)."""
  try:
    text = json.dumps(key_parts, sort_keys=True, separators=(",", ":"))
  except TypeError as e:
    raise ValueError(f"key_parts must be JSON-serialisable (strings, numbers, lists, dicts), "
                     f"got {key_parts!r}: {e}") from None
  return hashlib.sha256(text.encode()).hexdigest()


def _crc32(a: np.ndarray) -> int:
  view = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
  crc = 0
  for i in range(0, len(view), _CHUNK):
    crc = zlib.crc32(view[i:i + _CHUNK], crc)
  return crc


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
  directory = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _normalise(key_parts: Mapping[str, Any]) -> Any:
  return json.loads(json.dumps(key_parts, sort_keys=True))


def _load(array_path: str, meta_path: str, key_parts: Mapping[str, Any]) -> np.ndarray | None:
  """The cached array, or None (logged) when the entry is missing, mismatched or corrupt."""
  if not os.path.exists(array_path) and not os.path.exists(meta_path):
    return None
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("key_parts") != _normalise(key_parts):
      logging.warning("embedding cache %s was written for other key parts (%s); recomputing",
                      array_path, meta.get("key_parts"))
      return None
    array = np.load(array_path, allow_pickle=False)
    if list(array.shape) != meta["shape"] or array.dtype.str != meta["dtype"]:
      raise ValueError(f"holds {array.dtype.str}{list(array.shape)}, the sidecar says "
                       f"{meta['dtype']}{meta['shape']}")
    if _crc32(array) != meta["crc32"]:
      raise ValueError("checksum mismatch")
  except (OSError, ValueError, KeyError, EOFError, TypeError, json.JSONDecodeError) as e:
    logging.warning("embedding cache %s is unreadable or corrupt (%s: %s); recomputing",
                    array_path, type(e).__name__, e)
    return None
  return array


def cached_corpus_embeddings(cache_dir: str | os.PathLike, key_parts: Mapping[str, Any],
                             compute: Callable[[], np.ndarray]) -> np.ndarray:
  """`compute()` cached on disk under a hash of `key_parts` (see the module docstring).

  Args:
    cache_dir: directory of the cache (created if missing).
    key_parts: JSON-able dict naming everything the embeddings depend on; a different dict
      is a different entry.
    compute: `() -> [M, D]` array, called only on a miss (or a corrupt entry).

  Returns:
    [M, D] float32 numpy array.

  Example:
    >>> emb = cached_corpus_embeddings("runs/x/embeddings", {"params": fp, "corpus": cfp},
    ...                                lambda: embed_corpus(...))   # doctest: +SKIP
  """
  cache_dir = os.fspath(cache_dir)
  key = cache_key(key_parts)
  array_path = os.path.join(cache_dir, f"{key}.npy")
  meta_path = os.path.join(cache_dir, f"{key}.json")
  cached = _load(array_path, meta_path, key_parts)
  if cached is not None:
    logging.info("embedding cache hit: %s %s", array_path, cached.shape)
    return cached
  array = np.ascontiguousarray(np.asarray(compute(), np.float32))
  if array.ndim != 2:
    raise ValueError(f"compute() must return [M, D] embeddings, got shape {array.shape}")
  if jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    _atomic_write(array_path, lambda f: np.save(f, array, allow_pickle=False))
    meta = {"key_parts": _normalise(key_parts), "shape": list(array.shape),
            "dtype": array.dtype.str, "crc32": _crc32(array), "key": key}
    _atomic_write(meta_path, lambda f: f.write(
        (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()))
    logging.info("embedding cache written: %s %s", array_path, array.shape)
  return array
