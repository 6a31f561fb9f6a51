"""One retrieval interface, `Retriever.search(queries, k) -> (ids [Q, k], scores [Q, k])`,
a registry of its backends by name, and the two BM25 backends.

Every backend returns host numpy arrays: `ids` int32 rows of the corpus the index was built
from (`corpus.ids[row]` names the document) and `scores` float32, best first. Rows past the
number of (live) documents are padded with id -1 and score -inf, so `k` may exceed the
corpus size. What a query is depends on the backend:

  "bm25"       `BM25Retriever`: texts, scored by `bm25s` on the host.
  "bm25_jax"   `JaxBM25Retriever`: texts or token-id lists, scored by the pure JAX BM25 of
               `jaxsearch.retrieval.bm25` (the same function the in-graph search tool calls);
               built from a `BM25Retriever` it uses bm25s's tokenization and gives the same
               scores (float32 rounding apart).
  "exact"      `jaxsearch.retrieval.mips.ExactDenseRetriever`: [Q, D] vectors, or texts
               with a query encoder; `q @ D.T` + top-k on the accelerator, optionally
               sharded over a mesh.
  "scann"      `jaxsearch.retrieval.scann_index.ScannIndex`: like "exact", on the host.

Ties are broken toward the lower row (as `jax.lax.top_k`) by the BM25 and exact backends.

Example:
  >>> corpus = Corpus(ids=("a", "b", "c"), titles=("", "", ""),
  ...                 texts=("the cat sat", "a dog barked", "cats and dogs"))
  >>> retriever = build_retriever("bm25", corpus)
  >>> ids, scores = retriever.search(["dog"], k=2)
  >>> [corpus.ids[i] for i in ids[0]]
  ['b', 'a']
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import jax
import numpy as np

from jaxsearch.registry import Registry
from jaxsearch.retrieval import bm25 as bm25_lib
from jaxsearch.retrieval.corpus import Corpus
from jaxsearch.retrieval.results import check_k, pad_results, top_k_rows  # noqa: F401  (re-exported)


@runtime_checkable
class Retriever(Protocol):
  """Anything that returns the top-k corpus rows for a batch of queries."""

  @property
  def num_docs(self) -> int:
    """Number of documents that can be returned (live documents for mutable indexes)."""

  def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows per query: (ids [Q, k] int32, scores [Q, k] float32), best first."""


RetrieverFactory = Callable[..., Retriever]
RETRIEVERS: Registry[RetrieverFactory] = Registry("retriever")


def build_retriever(name: str, corpus: Corpus, **kwargs: Any) -> Retriever:
  """Builds the retriever registered as `name` over `corpus`.

  Args:
    name: "bm25", "bm25_jax", "exact" or "scann" (see `RETRIEVERS.names()`).
    corpus: The documents; the retriever's row `i` is `corpus.ids[i]`.
    **kwargs: Backend options, e.g. `encoder=` (texts -> [n, D]) for the dense backends.

  Example:
    >>> r = build_retriever("exact", corpus, encoder=minilm_text_encoder())  # doctest: +SKIP
  """
  if not isinstance(corpus, Corpus):
    raise ValueError(f"corpus must be a Corpus, got {type(corpus).__name__}")
  return RETRIEVERS.get(name)(corpus, **kwargs)


def _check_texts(queries: Any) -> list[str]:
  if isinstance(queries, str):
    raise ValueError("queries must be a sequence of strings, got one string")
  queries = list(queries)
  bad = next((q for q in queries if not isinstance(q, str)), None)
  if bad is not None:
    raise ValueError(f"queries must be strings, got {type(bad).__name__} {bad!r}")
  return queries


# ----------------------------------------------------------------------------------------
# BM25 on the host (bm25s)
# ----------------------------------------------------------------------------------------


class BM25Tokenizer:
  """bm25s's word tokenizer with a vocabulary frozen on the corpus.

  Lowercases, splits on `\\b\\w\\w+\\b` and drops stopwords (`bm25s.tokenization.Tokenizer`).
  Query words outside the corpus vocabulary are dropped. Unlike bm25s's default, an empty
  text gets no token (bm25s would give it a shared "" token that matches all empty
  documents).

  Example:
    >>> tok = BM25Tokenizer()
    >>> tok.fit(["the cat sat", "a dog"])
    [[0, 1], [2]]
    >>> tok.encode(["dog cat bird"]), tok.vocab_size
    ([[2, 0]], 3)
  """

  def __init__(self, *, lower: bool = True, stopwords: str | Sequence[str] | None = "en",
               stemmer: Callable[[str], str] | None = None):
    import bm25s.tokenization  # noqa: PLC0415  (host-only dependency)
    self._tok = bm25s.tokenization.Tokenizer(lower=lower, stopwords=stopwords or [],
                                             stemmer=stemmer)
    self._fitted = False

  def fit(self, texts: Sequence[str]) -> list[list[int]]:
    """Builds the vocabulary from `texts` and returns their token ids (once only)."""
    if self._fitted:
      raise ValueError("BM25Tokenizer.fit was already called; build a new tokenizer")
    self._fitted = True
    return self._tok.tokenize(_check_texts(texts), update_vocab=True, return_as="ids",
                              show_progress=False, allow_empty=False)

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of `texts` in the fitted vocabulary (unknown words dropped)."""
    if not self._fitted:
      raise ValueError("BM25Tokenizer.encode needs fit() first")
    return self._tok.tokenize(_check_texts(texts), update_vocab="never", return_as="ids",
                              show_progress=False, allow_empty=False)

  @property
  def vocab(self) -> dict[str, int]:
    return self._tok.get_vocab_dict()

  @property
  def vocab_size(self) -> int:
    return max(1, len(self.vocab))


class BM25Retriever:
  """BM25 over texts on the host, scored by `bm25s` (default: Lucene's variant).

  Attributes:
    tokenizer: The fitted `BM25Tokenizer`.
    doc_tokens: The corpus as token-id lists (what the index holds).
    config: `jaxsearch.retrieval.bm25.BM25Config` (k1, b, delta, method).

  Example:
    >>> r = BM25Retriever(["the cat sat", "a dog barked"])
    >>> ids, scores = r.search(["dog"], k=1)   # idf ln(1 + 1.5/1.5), tf part 1/(1.5 + 1)
    >>> ids, scores.round(4)
    (array([[1]], dtype=int32), array([[0.2773]], dtype=float32))
  """

  def __init__(self, texts: Sequence[str], config: bm25_lib.BM25Config = bm25_lib.BM25Config(),
               *, tokenizer: BM25Tokenizer | None = None):
    import bm25s  # noqa: PLC0415
    if not isinstance(config, bm25_lib.BM25Config):
      raise ValueError(f"config must be a BM25Config, got {type(config).__name__}")
    texts = _check_texts(texts)
    if not texts:
      raise ValueError("texts must hold at least one document, got none")
    self.config = config
    self.tokenizer = tokenizer if tokenizer is not None else BM25Tokenizer()
    self.doc_tokens = self.tokenizer.fit(texts)
    vocab = {i: i for i in range(self.tokenizer.vocab_size)}
    self._bm25 = bm25s.BM25(k1=config.k1, b=config.b, delta=config.delta,
                            method=config.method)
    self._bm25.index((self.doc_tokens, vocab), create_empty_token=False, show_progress=False)

  @property
  def num_docs(self) -> int:
    return len(self.doc_tokens)

  def scores(self, queries: Sequence[str]) -> np.ndarray:
    """[Q, N] float32 BM25 scores of every document (bm25s `get_scores_from_ids`)."""
    tokens = self.tokenizer.encode(queries)
    out = np.empty((len(tokens), self.num_docs), np.float32)
    for i, ids in enumerate(tokens):
      out[i] = self._bm25.get_scores_from_ids(ids)
    return out

  def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows per query text. A query with no corpus word scores 0 everywhere (rows
    0..k-1, as `bm25_search`); treat score 0 as no match."""
    k = check_k(k)
    queries = _check_texts(queries)
    if not queries:
      return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    return pad_results(*top_k_rows(self.scores(queries), k), k)


# ----------------------------------------------------------------------------------------
# BM25 as pure JAX (in-graph)
# ----------------------------------------------------------------------------------------


class JaxBM25Retriever:
  """The pure JAX BM25 (`bm25.build_bm25_index` + `bm25_search`) behind `Retriever`.

  Queries are token-id lists (or texts, when built with a `tokenize` function). The index
  is a dense [V, M] matrix (see `jaxsearch.retrieval.bm25`): meant for corpora small
  enough to live inside a compiled rollout.

  Example:
    >>> host = BM25Retriever(["the cat sat", "a dog barked"])
    >>> r = JaxBM25Retriever.from_bm25(host)
    >>> r.search(["dog"], k=1)[0]
    array([[1]], dtype=int32)
  """

  def __init__(self, index: bm25_lib.BM25Index, *, vocab_size: int,
               ignore_ids: Sequence[int] = (),
               tokenize: Callable[[Sequence[str]], list[list[int]]] | None = None,
               batch_size: int = 256):
    if index.weights.ndim != 2 or index.weights.shape[0] != vocab_size:
      raise ValueError(f"index weights must be [V={vocab_size}, M], got "
                       f"{index.weights.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    self.index = index
    self.vocab_size = int(vocab_size)
    self.ignore_ids = tuple(int(i) for i in ignore_ids)
    self.tokenize = tokenize
    self.batch_size = batch_size

  @classmethod
  def from_token_ids(cls, docs: Sequence[Sequence[int]], *, vocab_size: int,
                     config: bm25_lib.BM25Config = bm25_lib.BM25Config(),
                     ignore_ids: Sequence[int] = (), **kwargs: Any) -> JaxBM25Retriever:
    """Indexes token-id documents (ids in [0, vocab_size); `ignore_ids` never count)."""
    corpus = bm25_lib.tokenize_corpus(docs, pad_id=0)
    build = jax.jit(bm25_lib.build_bm25_index, static_argnums=(1, 2),
                    static_argnames="ignore_ids")
    index = build(corpus, int(vocab_size), config, ignore_ids=tuple(ignore_ids))
    return cls(index, vocab_size=vocab_size, ignore_ids=ignore_ids, **kwargs)

  @classmethod
  def from_bm25(cls, host: BM25Retriever, **kwargs: Any) -> JaxBM25Retriever:
    """The in-graph twin of a `BM25Retriever`: same tokenization, config and scores."""
    return cls.from_token_ids(host.doc_tokens, vocab_size=host.tokenizer.vocab_size,
                              config=host.config, tokenize=host.tokenizer.encode, **kwargs)

  @property
  def num_docs(self) -> int:
    return int(self.index.weights.shape[1])

  def search(self, queries: Sequence[str] | Sequence[Sequence[int]], k: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows per query (texts need `tokenize`; else token-id lists)."""
    k = check_k(k)
    queries = list(queries)
    if queries and isinstance(queries[0], str):
      if self.tokenize is None:
        raise ValueError("text queries need a tokenize function; pass token-id lists or "
                         "build with tokenize=")
      queries = self.tokenize(_check_texts(queries))
    kk = min(k, self.num_docs)
    ids_out, scores_out = [], []
    for start in range(0, len(queries), self.batch_size):
      chunk = queries[start:start + self.batch_size]
      width = max(1, max(len(q) for q in chunk))
      width = 1 << (width - 1).bit_length()           # bucket lengths: fewer compilations
      tokens = np.zeros((self.batch_size, width), np.int32)
      mask = np.zeros((self.batch_size, width), bool)
      for i, q in enumerate(chunk):
        tokens[i, :len(q)] = q
        mask[i, :len(q)] = True
      ids, scores = _jax_bm25_search(self.index, tokens, mask, self.vocab_size,
                                     self.ignore_ids, kk)
      ids_out.append(np.asarray(ids)[:len(chunk)])
      scores_out.append(np.asarray(scores)[:len(chunk)])
    if not queries:
      return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    return pad_results(np.concatenate(ids_out), np.concatenate(scores_out), k)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _jax_bm25_search(index, tokens, mask, vocab_size, ignore_ids, k):
  bags = bm25_lib.query_bag(tokens, mask, vocab_size, ignore_ids=ignore_ids)
  return bm25_lib.bm25_search(index, bags, k)


# ----------------------------------------------------------------------------------------
# Registry entries (dense backends are imported lazily: no ScaNN or encoder import up front)
# ----------------------------------------------------------------------------------------


@RETRIEVERS.register("bm25")
def _build_bm25(corpus: Corpus, *, config: bm25_lib.BM25Config = bm25_lib.BM25Config(),
                tokenizer: BM25Tokenizer | None = None) -> BM25Retriever:
  return BM25Retriever(corpus.contents, config, tokenizer=tokenizer)


@RETRIEVERS.register("bm25_jax")
def _build_bm25_jax(corpus: Corpus, *, config: bm25_lib.BM25Config = bm25_lib.BM25Config(),
                    tokenizer: BM25Tokenizer | None = None, **kwargs: Any
                    ) -> JaxBM25Retriever:
  return JaxBM25Retriever.from_bm25(BM25Retriever(corpus.contents, config, tokenizer=tokenizer),
                                    **kwargs)


@RETRIEVERS.register("exact")
def _build_exact(corpus: Corpus, **kwargs: Any) -> Retriever:
  from jaxsearch.retrieval.mips import ExactDenseRetriever  # noqa: PLC0415
  return ExactDenseRetriever.from_corpus(corpus, **kwargs)


@RETRIEVERS.register("scann")
def _build_scann(corpus: Corpus, **kwargs: Any) -> Retriever:
  from jaxsearch.retrieval.scann_index import ScannIndex  # noqa: PLC0415
  return ScannIndex.from_corpus(corpus, **kwargs)
