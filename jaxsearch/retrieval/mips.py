"""Exact dense maximum-inner-product search on the accelerator, optionally sharded.

Scores are inner products `s(q, d) = q . d` (cosine when both sides are unit-norm, as
MiniLM's embeddings are). `exact_search` computes `Q @ D.T` and takes `jax.lax.top_k`
(ties toward the lower row); with `approx=True` it uses `jax.lax.approx_max_k`, which is
approximate (and fast) only on TPU: on CPU and GPU it is an exact top-k.

For corpora larger than one device, `sharded_exact_search` splits the corpus axis over
mesh axes (`jax.shard_map`): each shard scores its rows and keeps its own top-k, the
shards' candidates are all-gathered ([Q, S * k]) and merged by a second top-k. The merge
returns exactly the unsharded result: every true top-k row is in its shard's top-k, and the
gathered candidates are ordered by shard, i.e. by global row, so ties still break toward
the lower row. The corpus is zero-padded to a multiple of the shard count; padded rows
score -inf.

`ExactDenseRetriever` wraps both behind `Retriever.search(queries, k)`; queries are [Q, D]
vectors or texts embedded by any callable (`jaxsearch.retrieval.text_encoder.minilm_text_encoder()`
for all-MiniLM-L6-v2).

Example:
  >>> docs = jnp.eye(4)
  >>> ids, scores = exact_search(jnp.array([[0.1, 0.9, 0.5, 0.0]]), docs, k=2)
  >>> ids
  Array([[1, 2]], dtype=int32)
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsearch.retrieval.corpus import Corpus
from jaxsearch.retrieval.results import check_k, pad_results
from jaxsearch.retrieval.text_encoder import TextEncoder, as_query_vectors, corpus_embeddings


def _check_recall_target(recall_target: float) -> None:
  if not (isinstance(recall_target, (int, float)) and 0.0 < recall_target <= 1.0):
    raise ValueError(f"recall_target must be in (0, 1], got {recall_target!r}")


def _top_k(scores: jax.Array, k: int, approx: bool, recall_target: float,
           input_size: int = -1) -> tuple[jax.Array, jax.Array]:
  if approx:
    values, ids = jax.lax.approx_max_k(scores, k, recall_target=recall_target,
                                       reduction_input_size_override=input_size)
  else:
    values, ids = jax.lax.top_k(scores, k)
  return values, ids.astype(jnp.int32)


def exact_search(queries: jax.Array, docs: jax.Array, k: int, *, num_valid: int | None = None,
                 approx: bool = False, recall_target: float = 0.95,
                 precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
                 ) -> tuple[jax.Array, jax.Array]:
  """Top-k rows of `docs` by inner product with each query (jittable; k static).

  Args:
    queries: [Q, D] query vectors.
    docs: [N, D] document vectors (any float dtype; scores accumulate in float32).
    k: 1 <= k <= num_valid.
    num_valid: Only rows < num_valid can be returned (padding); default N.
    approx: Use `jax.lax.approx_max_k` (approximate on TPU only).
    recall_target: `approx_max_k`'s target recall.
    precision: Matmul precision; HIGHEST keeps float32 on GPU/TPU.

  Returns:
    (ids [Q, k] int32, scores [Q, k] float32), best first.

  Example:
    >>> search = jax.jit(exact_search, static_argnames="k")
    >>> ids, scores = search(jnp.ones((2, 8)), jnp.ones((100, 8)), k=10)
  """
  n = docs.shape[0]
  num_valid = n if num_valid is None else int(num_valid)
  k = check_k(k)
  if not 1 <= k <= num_valid <= n:
    raise ValueError(f"need 1 <= k <= num_valid <= N, got k={k}, num_valid={num_valid}, N={n}")
  _check_recall_target(recall_target)
  if queries.ndim != 2 or docs.ndim != 2 or queries.shape[1] != docs.shape[1]:
    raise ValueError(f"queries [Q, D] and docs [N, D] must share D, got {queries.shape} and "
                     f"{docs.shape}")
  scores = jnp.einsum("qd,nd->qn", queries, docs, precision=precision,
                      preferred_element_type=jnp.float32)
  if num_valid < n:
    scores = jnp.where(jnp.arange(n) < num_valid, scores, -jnp.inf)
  scores, ids = _top_k(scores, k, approx, recall_target)
  return ids, scores


def _axes_tuple(axes: str | Sequence[str]) -> tuple[str, ...]:
  return (axes,) if isinstance(axes, str) else tuple(axes)


def num_shards(mesh: Mesh, axes: str | Sequence[str]) -> int:
  """Number of corpus shards: the product of the sizes of `axes` in `mesh`."""
  axes = _axes_tuple(axes)
  unknown = [a for a in axes if a not in mesh.shape]
  if unknown:
    raise ValueError(f"corpus axes {unknown} are not mesh axes {tuple(mesh.shape)}")
  return math.prod(mesh.shape[a] for a in axes)


def shard_corpus(docs: np.ndarray | jax.Array, mesh: Mesh, axes: str | Sequence[str]
                 ) -> tuple[jax.Array, int]:
  """Zero-pads `docs` [N, D] to a multiple of the shard count and splits rows over `axes`.

  Returns:
    (docs [N', D] placed with `NamedSharding(mesh, P(axes, None))`, N).

  Example:
    >>> s = jax.device_count()          # with 8 devices: 10 rows padded to 16
    >>> mesh = jax.make_mesh((s,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> sharded, n = shard_corpus(np.ones((10, 4), np.float32), mesh, "data")
    >>> sharded.shape == (-(-10 // s) * s, 4), n
    (True, 10)
  """
  axes = _axes_tuple(axes)
  shards = num_shards(mesh, axes)
  docs = np.asarray(docs) if not isinstance(docs, jax.Array) else docs
  n = docs.shape[0]
  padded = -(-max(n, 1) // shards) * shards
  if padded != n:
    docs = jnp.concatenate([jnp.asarray(docs), jnp.zeros((padded - n, docs.shape[1]),
                                                         docs.dtype)])
  return jax.device_put(docs, NamedSharding(mesh, P(axes, None))), n


def sharded_exact_search(queries: jax.Array, docs: jax.Array, k: int, *, mesh: Mesh,
                         axes: str | Sequence[str], num_valid: int | None = None,
                         approx: bool = False, recall_target: float = 0.95,
                         precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
                         ) -> tuple[jax.Array, jax.Array]:
  """`exact_search` with the corpus rows split over mesh `axes` (jittable; k static).

  Each shard takes its local top-min(k, N/S), the [Q, S * k'] candidates are all-gathered
  and merged with a second top-k. Queries and results are replicated.

  Args:
    queries: [Q, D], replicated.
    docs: [N, D] with N a multiple of the shard count (see `shard_corpus`).
    k, num_valid, approx, recall_target, precision: as `exact_search`.
    mesh: The device mesh.
    axes: Mesh axis name(s) the corpus rows are split over.

  Returns:
    (ids [Q, k] int32 global rows, scores [Q, k] float32), equal to `exact_search`'s.

  Example:
    >>> search = jax.jit(functools.partial(sharded_exact_search, mesh=mesh, axes="data"),
    ...                  static_argnames=("k", "num_valid"))  # doctest: +SKIP
    >>> ids, scores = search(queries, shard_corpus(docs, mesh, "data")[0], k=10,
    ...                      num_valid=len(docs))  # doctest: +SKIP
  """
  axes = _axes_tuple(axes)
  shards = num_shards(mesh, axes)
  n = docs.shape[0]
  num_valid = n if num_valid is None else int(num_valid)
  k = check_k(k)
  if n % shards:
    raise ValueError(f"docs has {n} rows, not a multiple of the {shards} shards of mesh axes "
                     f"{axes}; pad it with shard_corpus")
  if not 1 <= k <= num_valid <= n:
    raise ValueError(f"need 1 <= k <= num_valid <= N, got k={k}, num_valid={num_valid}, N={n}")
  _check_recall_target(recall_target)
  local_n = n // shards
  local_k = min(k, local_n)

  def shard_fn(q, d):
    offset = jax.lax.axis_index(axes) * local_n
    rows = offset + jnp.arange(local_n)
    scores = jnp.einsum("qd,nd->qn", q, d, precision=precision,
                        preferred_element_type=jnp.float32)
    scores = jnp.where(rows < num_valid, scores, -jnp.inf)
    values, ids = _top_k(scores, local_k, approx, recall_target)
    all_values = jax.lax.all_gather(values, axes, axis=1, tiled=True)        # [Q, S * k']
    all_ids = jax.lax.all_gather(ids + offset.astype(jnp.int32), axes, axis=1, tiled=True)
    merged, pos = jax.lax.top_k(all_values, k)
    return jnp.take_along_axis(all_ids, pos, axis=1), merged

  fn = jax.shard_map(shard_fn, mesh=mesh, in_specs=(P(), P(axes, None)),
                     out_specs=(P(), P()), check_vma=False)
  return fn(queries, docs)


# ----------------------------------------------------------------------------------------
# Retriever
# ----------------------------------------------------------------------------------------


class ExactDenseRetriever:
  """Exact (or `approx_max_k`) MIPS over fixed document vectors, on the accelerator.

  Attributes:
    docs: [N', D] device array (N' = N padded to the shard count when sharded).
    query_encoder: texts -> [Q, D], used when `search` gets texts.

  Example:
    >>> r = ExactDenseRetriever(np.eye(3, dtype=np.float32))
    >>> r.search(np.array([[0.0, 2.0, 1.0]]), k=2)[0]
    array([[1, 2]], dtype=int32)
  """

  def __init__(self, embeddings: np.ndarray | jax.Array, *,
               query_encoder: TextEncoder | None = None, mesh: Mesh | None = None,
               corpus_axes: str | Sequence[str] | None = None, approx: bool = False,
               recall_target: float = 0.95,
               precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
               batch_size: int = 256, dtype: Any = None):
    """Places the document vectors on the device(s).

    Args:
      embeddings: [N, D] document vectors, row i = corpus row i.
      query_encoder: Optional texts -> [Q, D] callable.
      mesh: Shard the corpus rows over this mesh (None: one device).
      corpus_axes: Mesh axes the rows are split over (default: all of the mesh's axes).
      approx: Use `jax.lax.approx_max_k`.
      recall_target: Its recall target.
      precision: Matmul precision.
      batch_size: Queries per device call (bounds the [batch, N] score matrix).
      dtype: Store documents in this dtype (e.g. jnp.bfloat16); default: as given.
    """
    embeddings = jnp.asarray(embeddings) if dtype is None else jnp.asarray(embeddings, dtype)
    if embeddings.ndim != 2 or embeddings.shape[0] < 1:
      raise ValueError(f"embeddings must be [N >= 1, D], got shape {embeddings.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    _check_recall_target(recall_target)
    self.dim = int(embeddings.shape[1])
    self._num_docs = int(embeddings.shape[0])
    self.query_encoder = query_encoder
    self.batch_size = batch_size
    options = dict(approx=bool(approx), recall_target=float(recall_target), precision=precision)
    if mesh is None:
      self.docs = embeddings
      self._search = jax.jit(functools.partial(exact_search, num_valid=self._num_docs,
                                               **options), static_argnames="k")
    else:
      axes = tuple(mesh.axis_names) if corpus_axes is None else _axes_tuple(corpus_axes)
      self.docs, _ = shard_corpus(embeddings, mesh, axes)
      self._search = jax.jit(functools.partial(
          sharded_exact_search, mesh=mesh, axes=axes, num_valid=self._num_docs, **options),
          static_argnames="k")

  @classmethod
  def from_corpus(cls, corpus: Corpus, *, encoder: TextEncoder | None = None,
                  embeddings: np.ndarray | None = None,
                  query_encoder: TextEncoder | None = None, **kwargs: Any
                  ) -> ExactDenseRetriever:
    """Embeds `corpus.contents` with `encoder` (or takes `embeddings`, [len(corpus), D]);
    queries use `query_encoder` (default: `encoder`)."""
    embeddings = corpus_embeddings(corpus, encoder, embeddings)
    return cls(embeddings, query_encoder=query_encoder or encoder, **kwargs)

  @property
  def num_docs(self) -> int:
    return self._num_docs

  def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows for [Q, D] vectors (or texts, with a query encoder)."""
    k = check_k(k)
    vectors = as_query_vectors(queries, self.query_encoder, self.dim)
    kk = min(k, self._num_docs)
    num_queries = vectors.shape[0]
    batch = min(self.batch_size, max(1, num_queries))
    ids_out, scores_out = [], []
    for start in range(0, num_queries, batch):
      chunk = vectors[start:start + batch]
      padded = np.zeros((batch, self.dim), np.float32)
      padded[:len(chunk)] = chunk
      ids, scores = self._search(jnp.asarray(padded, self.docs.dtype), self.docs, k=kk)
      ids_out.append(np.asarray(ids)[:len(chunk)])
      scores_out.append(np.asarray(scores)[:len(chunk)])
    if not num_queries:
      return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    return pad_results(np.concatenate(ids_out), np.concatenate(scores_out), k)
