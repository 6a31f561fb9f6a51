"""BM25 over token ids as pure JAX: a sparse (posting-list) index, or a dense matrix.

The in-graph search tool needs a retriever that lives inside the compiled rollout, so a
whole multi-turn episode (generate -> `<search>` -> retrieve -> insert passages -> ...) is
one XLA program. This module scores documents with BM25 where the *terms are token ids of
the policy's tokenizer*, not words: documents and queries are int32 token-id sequences, and
some ids (pad, bos/eos, tags such as `<search>`) are ignored.

Two indexes, the same scores. The formulas are those of `bm25s` (default method "lucene"),
so scores match `bm25s.BM25(...).get_scores` to float32 rounding (`tests/retrieval/
bm25_test.py`).

- Sparse (`build_sparse_bm25_index`, `sparse_bm25_search`; what the search agent uses): the
  index holds each term's posting list (the documents containing it and the term's BM25
  weight there) in CSR order, `8 * nnz` bytes for nnz (term, document) pairs, as bm25s's own
  index. Each query lays the posting lists of its tokens end to end and reads them
  `posting_block` entries at a time (gather, then scatter-add into its `[M]` scores) in a
  `lax.fori_loop`, queries one after the other (`lax.map`): the work is the query terms'
  document frequencies, not V x M. The few terms found in a large share of the documents
  (`BM25Config.dense_min_df`; with a subword tokenizer: "the", ",", "of", ...) carry most of
  a query's postings; they are kept as dense `[H, M]` rows instead, added for a whole batch of
  queries by one `[Q, H] @ [H, M]` product (a dense row costs `4 M` bytes, the postings it
  replaces at least `8 * dense_min_df * M`: at the default 0.25 at most twice). Built on the
  host with numpy.
- Dense (`build_bm25_index`, `bm25_search`): a `[V, M]` matrix holding the BM25 contribution
  of term `v` to document `m`; a query is a `[V]` bag of term counts; scores are
  `bags @ weights`. `4 * V * M` bytes (SmolLM2's 49k ids over 24k passages: 4.7 GB), so only
  for small vocabularies; jittable end to end, including the build.

Example:
  >>> corpus = tokenize_corpus([[5, 6, 7], [5, 8], [9]], pad_id=0)
  >>> index = build_bm25_index(corpus, vocab_size=16, ignore_ids=(0,))
  >>> q = jnp.array([[5, 8, 0]], jnp.int32)
  >>> bags = query_bag(q, q != 0, vocab_size=16, ignore_ids=(0,))
  >>> ids, scores = jax.jit(bm25_search, static_argnames="k")(index, bags, k=2)
  >>> ids
  Array([[1, 0]], dtype=int32)
  >>> sparse = build_sparse_bm25_index(corpus, vocab_size=16, ignore_ids=(0,))
  >>> ids, scores = sparse_bm25_search(sparse, q, q != 0, k=2, ignore_ids=(0,))   # the same
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.registry import Registry

_INT32_MAX = np.iinfo(np.int32).max


class TokenizedCorpus(NamedTuple):
  """A corpus of token-id documents, right-padded to a common length."""

  tokens: jax.Array   # [M, L] int32, each document's token ids, right-padded with pad_id
  lengths: jax.Array  # [M] int32, number of valid (non-pad) positions per document


class SparseBM25Index(NamedTuple):
  """BM25 posting lists in CSR order (term-major, documents ascending within a term).

  `weights` hold each (term, document) pair's BM25 contribution minus the term's `absent`
  contribution; `absent[v]` is what term v gives a document that lacks it (0 except for
  "bm25l" / "bm25+", bm25s's non-occurrence score), so a document's score is
  `sum_q absent[q] + sum_{q in doc} weights`. One padding entry (document 0, weight 0) ends
  the lists so that an empty corpus still gathers in bounds. The H terms with a dense row
  (`BM25Config.dense_min_df`) have empty posting lists.
  """

  starts: jax.Array    # [V + 1] int32, term v's postings are entries starts[v]:starts[v + 1]
  docs: jax.Array      # [nnz + 1] int32, document of each posting
  weights: jax.Array   # [nnz + 1] float32, BM25 weight of each posting (minus `absent`)
  absent: jax.Array    # [V] float32, contribution of term v to a document without it
  doc_len: jax.Array   # [M] float32, counted tokens per document (its shape gives M)
  dense_row: jax.Array      # [V] int32, term v's row of `dense_weights`, or -1 (postings)
  dense_weights: jax.Array  # [H, M] float32, the frequent terms' weights (minus `absent`)


class BM25Index(NamedTuple):
  """Dense BM25 term-document weights.

  For methods "lucene", "robertson" and "atire" the entry is 0 wherever the term does not
  occur in the document. For "bm25l" and "bm25+" a corpus term also contributes a constant
  `idf(v) * tfc(tf=0)` to documents that lack it (bm25s's "non-occurrence" score), so the
  matrix is dense over the corpus's terms. Ids that occur in no document have a zero row.
  """

  weights: jax.Array  # [V, M] float32, BM25 contribution of term v to document m


# ----------------------------------------------------------------------------------------
# Variants. Each is (idf_fn(df, n), tfc_fn(tf, rel_len, k1, b, delta)), written after
# bm25s.scoring (Kamphuis et al., ECIR 2020). `rel_len` is doc_len / avg_doc_len.
# ----------------------------------------------------------------------------------------


class BM25Method(NamedTuple):
  """One BM25 variant: an idf and a term-frequency component, elementwise in jnp."""

  idf_fn: Callable[[jax.Array, float], jax.Array]  # (df [V] float32, n docs) -> [V]
  tfc_fn: Callable[..., jax.Array]  # (tf, rel_len, k1, b, delta) -> tf-shaped


BM25_METHODS: Registry[BM25Method] = Registry("bm25 method")


def _tfc_robertson(tf, rel_len, k1, b, delta):
  del delta
  return tf / (k1 * ((1.0 - b) + b * rel_len) + tf)


def _tfc_atire(tf, rel_len, k1, b, delta):
  del delta
  return tf * (k1 + 1.0) / (tf + k1 * (1.0 - b + b * rel_len))


def _tfc_bm25l(tf, rel_len, k1, b, delta):
  c = tf / (1.0 - b + b * rel_len)
  return (k1 + 1.0) * (c + delta) / (k1 + c + delta)


def _tfc_bm25plus(tf, rel_len, k1, b, delta):
  return (k1 + 1.0) * tf / (k1 * (1.0 - b + b * rel_len) + tf) + delta


BM25_METHODS.register("lucene")(BM25Method(
    # Lucene's idf is never negative; its tf part is Robertson's without the (k1 + 1).
    idf_fn=lambda df, n: jnp.log1p((n - df + 0.5) / (df + 0.5)),
    tfc_fn=_tfc_robertson))
BM25_METHODS.register("robertson")(BM25Method(
    # bm25s clamps the ratio at 1 (allow_negative=False), so idf >= 0.
    idf_fn=lambda df, n: jnp.log(jnp.maximum((n - df + 0.5) / (df + 0.5), 1.0)),
    tfc_fn=_tfc_robertson))
BM25_METHODS.register("atire")(BM25Method(
    idf_fn=lambda df, n: jnp.log(n / df), tfc_fn=_tfc_atire))
BM25_METHODS.register("bm25l")(BM25Method(
    idf_fn=lambda df, n: jnp.log((n + 1.0) / (df + 0.5)), tfc_fn=_tfc_bm25l))
BM25_METHODS.register("bm25+")(BM25Method(
    idf_fn=lambda df, n: jnp.log((n + 1.0) / df), tfc_fn=_tfc_bm25plus))


def _check_real(name: str, value: object, lo: float, hi: float = math.inf) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name} must be a real number, got {value!r}")
  if not (math.isfinite(value) and lo <= value <= hi):
    raise ValueError(f"{name} must be finite and in [{lo}, {hi}], got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BM25Config:
  """BM25 hyperparameters; the defaults are bm25s's.

  Attributes:
    k1: Term-frequency saturation, >= 0.
    b: Length normalisation strength, in [0, 1].
    delta: Lower bound added to the tf part by "bm25l" and "bm25+"; ignored by the others.
    method: A `BM25_METHODS` name: "lucene" (default, as bm25s), "robertson", "atire",
      "bm25l" or "bm25+". idf and tf variants always come from the same method.
    posting_block: postings the sparse search reads per loop step of one query (a speed
      knob: fewer, larger steps against the padding of a query's last one).
    dense_min_df: the sparse index keeps the terms found in at least this fraction of the
      documents as dense rows rather than posting lists (> 0; above 1: none). The scores do
      not change (float32 rounding); a dense row takes at most `1 / (2 * dense_min_df)` times
      the bytes of the postings it replaces.
  """

  k1: float = 1.5
  b: float = 0.75
  delta: float = 0.5
  method: str = "lucene"
  posting_block: int = 4096
  dense_min_df: float = 0.25

  def __post_init__(self):
    _check_real("k1", self.k1, 0.0)
    _check_real("b", self.b, 0.0, 1.0)
    _check_real("delta", self.delta, 0.0)
    if self.method not in BM25_METHODS:
      raise ValueError(
          f"unknown bm25 method {self.method!r}; expected one of {BM25_METHODS.names()}")
    _check_block(self.posting_block)
    _check_real("dense_min_df", self.dense_min_df, 0.0)
    if self.dense_min_df <= 0:
      raise ValueError(f"dense_min_df must be > 0 (a fraction of the documents; above 1: no "
                       f"dense rows), got {self.dense_min_df!r}")


def _check_block(block: object) -> int:
  if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
    raise ValueError(f"posting_block must be an int >= 1, got {block!r}")
  return int(block)


def _check_vocab_size(vocab_size: object) -> int:
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
    raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
  if not 1 <= vocab_size <= _INT32_MAX:
    raise ValueError(f"vocab_size must be in [1, {_INT32_MAX}], got {vocab_size}")
  return int(vocab_size)


def _check_ignore_ids(ignore_ids: Sequence[int]) -> tuple[int, ...]:
  out = []
  for i in ignore_ids:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
      raise ValueError(f"ignore_ids must be ints, got {i!r} in {ignore_ids!r}")
    out.append(int(i))
  return tuple(sorted(set(out)))


def _check_build_args(corpus: TokenizedCorpus, vocab_size: object, config: object,
                      ignore_ids: Sequence[int], xp) -> tuple[int, tuple[int, ...], Any, Any]:
  """The index builders' checked arguments: (vocab_size, ignore_ids, tokens [M, L], lengths
  [M]) with the corpus as `xp` (jnp or np) arrays."""
  vocab_size = _check_vocab_size(vocab_size)
  ignore_ids = _check_ignore_ids(ignore_ids)
  if not isinstance(config, BM25Config):
    raise ValueError(f"config must be a BM25Config, got {type(config).__name__}")
  tokens = xp.asarray(corpus.tokens)
  lengths = xp.asarray(corpus.lengths)
  if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
    raise ValueError(
        f"corpus must have tokens [M, L] and lengths [M], got {tokens.shape} and "
        f"{lengths.shape}")
  return vocab_size, ignore_ids, tokens, lengths


def _valid_terms(tokens: jax.Array, keep: jax.Array, vocab_size: int,
                 ignore_ids: tuple[int, ...]) -> jax.Array:
  """[..., L] bool: kept, in [0, vocab_size), and not an ignored id."""
  valid = keep & (tokens >= 0) & (tokens < vocab_size)
  if ignore_ids:
    valid &= ~jnp.isin(tokens, jnp.asarray(ignore_ids, tokens.dtype))
  return valid


def tokenize_corpus(docs: Sequence[Sequence[int]], *, pad_id: int = 0,
                    max_len: int | None = None) -> TokenizedCorpus:
  """Packs token-id documents into a right-padded `TokenizedCorpus` (host-side, numpy).

  Args:
    docs: M documents, each a sequence (or 1-D integer array) of token ids.
    pad_id: Id written after each document's last token. Padding is never scored (the
      index uses `lengths`), so `pad_id` may also occur inside a document; add it to
      `ignore_ids` if such occurrences should be ignored too.
    max_len: If given, documents are truncated to their first `max_len` tokens and
      L = max_len. Otherwise L is the longest document's length (at least 1).

  Returns:
    `TokenizedCorpus(tokens [M, L] int32, lengths [M] int32)` as jnp arrays; `lengths`
    counts kept positions, including any ids that the index will later ignore.

  Example:
    >>> tokenize_corpus([[3, 4, 5], [6]], pad_id=0).tokens
    Array([[3, 4, 5],
           [6, 0, 0]], dtype=int32)
  """
  if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
    raise ValueError(f"pad_id must be an int, got {pad_id!r}")
  if not -_INT32_MAX <= pad_id <= _INT32_MAX:
    raise ValueError(f"pad_id must fit in int32, got {pad_id}")
  if max_len is not None and (isinstance(max_len, bool)
                              or not isinstance(max_len, (int, np.integer)) or max_len < 1):
    raise ValueError(f"max_len must be None or an int >= 1, got {max_len!r}")
  arrays = []
  for i, doc in enumerate(docs):
    a = np.asarray(doc)
    if a.size == 0:
      a = a.reshape(0).astype(np.int64)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
      raise ValueError(
          f"docs[{i}] must be a 1-D sequence of ints, got shape {a.shape} dtype {a.dtype}")
    if a.size and (a.min() < -_INT32_MAX or a.max() > _INT32_MAX):
      raise ValueError(f"docs[{i}] has token ids outside int32")
    arrays.append(a[:max_len] if max_len is not None else a)
  if not arrays:
    raise ValueError("docs must hold at least one document, got none")
  lengths = np.array([len(a) for a in arrays], np.int32)
  width = int(max_len) if max_len is not None else max(1, int(lengths.max()))
  tokens = np.full((len(arrays), width), pad_id, np.int32)
  for i, a in enumerate(arrays):
    tokens[i, :len(a)] = a
  return TokenizedCorpus(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths))


def build_bm25_index(corpus: TokenizedCorpus, vocab_size: int,
                     config: BM25Config = BM25Config(), *,
                     ignore_ids: Sequence[int] = ()) -> BM25Index:
  """Builds the dense `[V, M]` BM25 weight matrix of a corpus (jittable).

  Statistics follow bm25s: N = M documents (empty ones included), df(v) = number of
  documents containing v, doc length = number of counted tokens, avg length over all M.
  A token is counted if it lies within `corpus.lengths`, is in [0, vocab_size), and is not
  in `ignore_ids`; other tokens are neither matched nor counted in document lengths.

  Args:
    corpus: `TokenizedCorpus` with tokens [M, L] int32 and lengths [M] int32.
    vocab_size: V, number of token ids (static under jit).
    config: `BM25Config` (static under jit).
    ignore_ids: Token ids to skip (pad, bos/eos, tag tokens); static under jit.

  Returns:
    `BM25Index(weights [V, M] float32)`.

  Example:
    >>> build = jax.jit(build_bm25_index, static_argnums=(1, 2), static_argnames="ignore_ids")
    >>> index = build(corpus, 4096, BM25Config(), ignore_ids=(0, 1, 2))
  """
  vocab_size, ignore_ids, tokens, lengths = _check_build_args(corpus, vocab_size, config,
                                                              ignore_ids, jnp)
  num_docs, max_len = tokens.shape
  method = BM25_METHODS.get(config.method)

  in_doc = jnp.arange(max_len)[None, :] < lengths[:, None]                 # [M, L]
  valid = _valid_terms(tokens, in_doc, vocab_size, ignore_ids)             # [M, L]
  doc_len = valid.sum(axis=1).astype(jnp.float32)                          # [M]
  doc_ids = jnp.broadcast_to(jnp.arange(num_docs)[:, None], tokens.shape)  # [M, L]
  tf = jnp.zeros((vocab_size, num_docs), jnp.float32).at[
      jnp.where(valid, tokens, 0), doc_ids].add(valid.astype(jnp.float32))  # [V, M]

  df = (tf > 0).sum(axis=1).astype(jnp.float32)                            # [V]
  n = float(num_docs)
  idf = jnp.where(df > 0, method.idf_fn(jnp.maximum(df, 1.0), n), 0.0)     # [V]
  avg_len = doc_len.mean()
  # All documents empty: every tf is 0 and every df is 0, so any finite rel_len works.
  rel_len = jnp.where(avg_len > 0, doc_len / jnp.maximum(avg_len, 1e-30), 1.0)  # [M]
  hp = (config.k1, config.b, config.delta)
  present = method.tfc_fn(tf, rel_len[None, :], *hp)                       # [V, M]
  # bm25s adds the tf=0 score (length-independent for every variant) for absent terms;
  # it is 0 except for bm25l / bm25+.
  absent = method.tfc_fn(0.0, 1.0, *hp)
  weights = idf[:, None] * jnp.where(tf > 0, present, absent)
  return BM25Index(weights=weights.astype(jnp.float32))


def query_bag(query_tokens: jax.Array, query_mask: jax.Array, vocab_size: int, *,
              ignore_ids: Sequence[int] = ()) -> jax.Array:
  """Turns token-id queries into bags of term counts (jittable).

  A repeated query token counts once per occurrence, as in bm25s (its `get_scores` sums
  the term's document scores once for every occurrence), so a term appearing twice in
  the query contributes twice its weight.

  Args:
    query_tokens: [Q, L] int32 token ids.
    query_mask: [Q, L] bool, True on the query's tokens (False on padding / context).
    vocab_size: V (static under jit).
    ignore_ids: Ids never counted (pad, bos/eos, `<search>` tags); static under jit. Ids
      outside [0, V) are dropped as well.

  Returns:
    [Q, V] float32 counts. A row is all zero if the query is empty or only has ignored
    ids; `bm25_search` then returns documents 0..k-1 with score 0.
  """
  vocab_size = _check_vocab_size(vocab_size)
  ignore_ids = _check_ignore_ids(ignore_ids)
  query_tokens = jnp.asarray(query_tokens)
  query_mask = jnp.asarray(query_mask, bool)
  if query_tokens.ndim != 2 or query_mask.shape != query_tokens.shape:
    raise ValueError(
        f"query_tokens and query_mask must both be [Q, L], got {query_tokens.shape} and "
        f"{query_mask.shape}")
  num_queries = query_tokens.shape[0]
  valid = _valid_terms(query_tokens, query_mask, vocab_size, ignore_ids)   # [Q, L]
  rows = jnp.broadcast_to(jnp.arange(num_queries)[:, None], query_tokens.shape)
  return jnp.zeros((num_queries, vocab_size), jnp.float32).at[
      rows, jnp.where(valid, query_tokens, 0)].add(valid.astype(jnp.float32))


def bm25_scores(index: BM25Index, bags: jax.Array, *,
                precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST) -> jax.Array:
  """BM25 scores of every document for every query: `bags @ index.weights`.

  Args:
    index: `BM25Index` with weights [V, M].
    bags: [Q, V] float32 term counts from `query_bag`.
    precision: Matmul precision. HIGHEST (default) keeps full float32 on GPU/TPU, where
      the default would round the weights to TF32/bf16 (~1e-3 relative error).

  Returns:
    [Q, M] float32 scores.
  """
  weights = index.weights
  if bags.ndim != 2 or bags.shape[1] != weights.shape[0]:
    raise ValueError(f"bags must be [Q, V={weights.shape[0]}], got {bags.shape}")
  return jnp.matmul(bags.astype(jnp.float32), weights, precision=precision)


def bm25_search(index: BM25Index, bags: jax.Array, k: int, *,
                precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
                ) -> tuple[jax.Array, jax.Array]:
  """Top-k documents per query by BM25 score (jittable with `k` static).

  Ordering is by descending score; equal scores are broken toward the lower document
  index (`jax.lax.top_k` is stable). Consequently an all-zero bag (empty query, or only
  ignored ids) returns ids 0..k-1 with scores 0, and a query matching fewer than k
  documents is padded with the lowest-index non-matching documents at score 0 (for
  "lucene"/"robertson"/"atire"). Callers should treat score == 0 as "no match".

  Args:
    index: `BM25Index` with weights [V, M].
    bags: [Q, V] float32 term counts from `query_bag`.
    k: Number of documents to return, 1 <= k <= M (static).
    precision: Matmul precision, see `bm25_scores`.

  Returns:
    `(ids [Q, k] int32, scores [Q, k] float32)`, best first.
  """
  num_docs = index.weights.shape[1]
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_docs:
    raise ValueError(f"k must be an int in [1, M={num_docs}], got {k!r}")
  scores, ids = jax.lax.top_k(bm25_scores(index, bags, precision=precision), int(k))
  return ids.astype(jnp.int32), scores


def build_sparse_bm25_index(corpus: TokenizedCorpus, vocab_size: int,
                            config: BM25Config = BM25Config(), *,
                            ignore_ids: Sequence[int] = ()) -> SparseBM25Index:
  """Builds the BM25 posting lists of a corpus on the host (numpy; the weights in jnp float32
  with the dense index's formulas, so both give the same scores).

  Statistics and counted tokens as `build_bm25_index`. Memory: `8 * nnz` bytes for the
  postings (nnz: distinct (term, document) pairs of the terms without a dense row), `4 * H *
  M` for the H dense rows (terms in at least `config.dense_min_df * M` documents), plus
  `12 * V + 4 * M`.

  Args:
    corpus: `TokenizedCorpus` with tokens [M, L] int32 and lengths [M] int32.
    vocab_size: V, number of token ids.
    config: `BM25Config`.
    ignore_ids: Token ids to skip (pad, bos/eos, tag tokens).

  Returns:
    `SparseBM25Index`.

  Example:
    >>> index = build_sparse_bm25_index(corpus, 49152, BM25Config(), ignore_ids=(0, 1, 2))
  """
  vocab_size, ignore_ids, tokens, lengths = _check_build_args(corpus, vocab_size, config,
                                                              ignore_ids, np)
  num_docs, max_len = tokens.shape
  method = BM25_METHODS.get(config.method)
  valid = ((np.arange(max_len)[None, :] < lengths[:, None]) & (tokens >= 0)
           & (tokens < vocab_size))
  if ignore_ids:
    valid &= ~np.isin(tokens, ignore_ids)
  doc_len = valid.sum(axis=1).astype(np.float32)                           # [M]
  doc, pos = np.nonzero(valid)
  pairs, tf = np.unique(tokens[doc, pos].astype(np.int64) * num_docs + doc, return_counts=True)
  term, doc = pairs // num_docs, (pairs % num_docs).astype(np.int32)       # term-major order
  df = np.bincount(term, minlength=vocab_size)                             # [V]
  n = float(num_docs)
  df_j = jnp.asarray(df, jnp.float32)
  idf = jnp.where(df_j > 0, method.idf_fn(jnp.maximum(df_j, 1.0), n), 0.0)   # [V]
  avg_len = float(doc_len.mean()) if num_docs else 0.0
  rel_len = (jnp.asarray(doc_len) / jnp.float32(avg_len) if avg_len > 0
             else jnp.ones((num_docs,), jnp.float32))                      # [M]
  hp = (config.k1, config.b, config.delta)
  absent = idf * method.tfc_fn(0.0, 1.0, *hp)                              # [V]
  present = method.tfc_fn(jnp.asarray(tf, jnp.float32), rel_len[doc], *hp)
  weights = np.asarray(idf[term] * present - absent[term], np.float32)
  # The frequent terms: dense rows (ascending term id), out of the posting lists.
  dense_terms = np.flatnonzero((df > 0) & (df >= config.dense_min_df * num_docs))
  dense_row = np.full((vocab_size,), -1, np.int32)
  dense_row[dense_terms] = np.arange(len(dense_terms), dtype=np.int32)
  dense_weights = np.zeros((len(dense_terms), num_docs), np.float32)
  in_dense = dense_row[term] >= 0
  dense_weights[dense_row[term[in_dense]], doc[in_dense]] = weights[in_dense]
  term, doc, weights = term[~in_dense], doc[~in_dense], weights[~in_dense]
  df = np.where(dense_row >= 0, 0, df)
  starts = np.concatenate([[0], np.cumsum(df)]).astype(np.int32)
  return SparseBM25Index(
      starts=jnp.asarray(starts), docs=jnp.asarray(np.append(doc, 0).astype(np.int32)),
      weights=jnp.asarray(np.append(weights, np.float32(0))),
      absent=jnp.asarray(absent, jnp.float32), doc_len=jnp.asarray(doc_len),
      dense_row=jnp.asarray(dense_row), dense_weights=jnp.asarray(dense_weights))


def sparse_bm25_scores(index: SparseBM25Index, query_tokens: jax.Array, query_mask: jax.Array,
                       *, ignore_ids: Sequence[int] = (), block: int = 4096) -> jax.Array:
  """BM25 scores of every document for token-id queries, from the posting lists (jittable).

  Every counted query token (as `query_bag`: in the mask, in [0, V), not ignored; a repeated
  token counts each time) adds its posting list to its query's row. Queries are scored one
  after the other (`lax.map`), each in its own `[M]` row (small enough to stay in cache, as
  bm25s's loop): its tokens' posting lists are laid end to end and read `block` postings at a
  time by a `lax.fori_loop` of the query's own length (`searchsorted` on the cumulative list
  lengths gives each posting's token), gathered and scatter-added into the row. The work is
  the query terms' document frequencies, not V x M, and no query waits for another. The terms
  with a dense row (`BM25Config.dense_min_df`) are added first, for all queries at once, as
  a `[Q, H]` count matrix times the `[H, M]` rows.

  Args:
    index: `SparseBM25Index`.
    query_tokens: [Q, L] int32 token ids.
    query_mask: [Q, L] bool, True on the query's tokens.
    ignore_ids: Ids never counted (static under jit).
    block: postings read per loop step (static).

  Returns:
    [Q, M] float32 scores, equal to `bm25_scores` of the dense index (float32 rounding).
  """
  return _sparse_rows(index, query_tokens, query_mask, ignore_ids, block, lambda row: row)


def _sparse_rows(index: SparseBM25Index, query_tokens: jax.Array, query_mask: jax.Array,
                 ignore_ids: Sequence[int], block: int, finish: Callable[[jax.Array], Any]):
  """`finish(scores [M])` of each query, stacked (`lax.map`): `sparse_bm25_scores`' loop, with
  what is kept of a query's row applied while the row is still in cache."""
  ignore_ids = _check_ignore_ids(ignore_ids)
  block = _check_block(block)
  query_tokens = jnp.asarray(query_tokens)
  query_mask = jnp.asarray(query_mask, bool)
  if query_tokens.ndim != 2 or query_mask.shape != query_tokens.shape:
    raise ValueError(
        f"query_tokens and query_mask must both be [Q, L], got {query_tokens.shape} and "
        f"{query_mask.shape}")
  vocab_size = index.absent.shape[0]
  valid = _valid_terms(query_tokens, query_mask, vocab_size, ignore_ids)   # [Q, L]
  term = jnp.where(valid, query_tokens, 0)
  lo = jnp.where(valid, index.starts[term], 0)                              # [Q, L]
  size = jnp.where(valid, index.starts[term + 1] - lo, 0)
  base = jnp.sum(jnp.where(valid, index.absent[term], 0.0), axis=1)        # [Q]
  last = index.docs.shape[0] - 1
  num_dense = index.dense_weights.shape[0]
  row = jnp.where(valid, index.dense_row[term], -1)                         # [Q, L]
  counts = jnp.sum(row[..., None] == jnp.arange(num_dense), axis=1)         # [Q, H]
  frequent = jnp.matmul(counts.astype(jnp.float32), index.dense_weights,
                        precision=jax.lax.Precision.HIGHEST)                # [Q, M]
  start_rows = base[:, None] + frequent                                     # [Q, M]

  def one_query(args):
    lo, size, start_row = args                                              # [L], [L], [M]
    ends = jnp.cumsum(size)
    total = ends[-1]

    def step(i, scores):
      pos = i * block + jnp.arange(block)                                   # [P]
      tok = jnp.minimum(jnp.searchsorted(ends, pos, side="right"), ends.shape[0] - 1)
      at = jnp.clip(lo[tok] + pos - (ends[tok] - size[tok]), 0, last)
      return scores.at[index.docs[at]].add(jnp.where(pos < total, index.weights[at], 0.0))

    return finish(jax.lax.fori_loop(0, (total + block - 1) // block, step, start_row))

  return jax.lax.map(one_query, (lo, size, start_rows))


def sparse_bm25_search(index: SparseBM25Index, query_tokens: jax.Array, query_mask: jax.Array,
                       k: int, *, ignore_ids: Sequence[int] = (), block: int = 4096,
                       ) -> tuple[jax.Array, jax.Array]:
  """Top-k documents per token-id query (jittable with `k`, `ignore_ids`, `block` static);
  order and ties as `bm25_search` (an empty query returns documents 0..k-1 at score 0).

  Returns:
    `(ids [Q, k] int32, scores [Q, k] float32)`, best first.
  """
  num_docs = index.doc_len.shape[0]
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_docs:
    raise ValueError(f"k must be an int in [1, M={num_docs}], got {k!r}")
  scores, ids = _sparse_rows(index, query_tokens, query_mask, ignore_ids, block,
                             lambda row: jax.lax.top_k(row, int(k)))
  return ids.astype(jnp.int32), scores
