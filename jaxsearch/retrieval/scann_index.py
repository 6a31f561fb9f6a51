"""ScaNN dense retrieval on the host: tree + asymmetric hashing + exact reordering.

ScaNN (Guo et al., ICML 2020) answers a maximum-inner-product query in three stages:

  1. tree: k-means partitions the corpus into `num_leaves` leaves; a query scores the leaf
     centroids and searches only the best `leaves_to_search` leaves;
  2. asymmetric hashing (AH): documents in those leaves are scored approximately with
     product-quantized codes (`dims_per_block` dimensions per 16-centroid block, trained
     with the anisotropic loss at threshold 0.2, which weighs errors parallel to the
     datapoint more: the ones that change the inner product);
  3. reordering: the best `reorder` candidates are rescored exactly (float32) and the top
     k returned.

`ScannConfig` leaves the size-dependent parameters unset; `derive_params(n, config)` fills
them in: `num_leaves = round(sqrt(n))`, `leaves_to_search = max(ceil(num_leaves / 10),
min(num_leaves, 16))`, `reorder = 100` (at least 2k at search time), AH training on
`min(n, 100_000)` samples. Corpora below `brute_force_below` documents get an exact
brute-force searcher instead (a tree over a few hundred points only loses recall).

Recall depends on the data having cluster structure, as real embeddings do: on 100k
clustered 384-d unit vectors the derived parameters give recall@10 = 0.986 against exact
search; on isotropic Gaussian vectors (no structure) any partitioning index searching 10% of
the leaves finds ~0.27 (faiss IVF too). Raise `leaves_to_search` there
(`benchmarks/ann.py`).

Documents are added, updated and deleted in place through ScaNN 1.4.2's native dynamic
searcher API (`ScannNumpy.upsert` / `delete`): a new vector is assigned to its nearest leaf
and encoded with the trained codebooks; nothing is retrained (call `rebalance()` to
retrain the partitioning after heavy churn). ScaNN deletes by moving its last datapoint
into the freed slot; the index keeps the internal-slot -> document-id map in sync.

ScaNN 1.4.2 fails to import next to TensorFlow 2.21 (an undefined symbol in its TF ops);
`import_scann()` is the one place that imports it, with TensorFlow hidden.

Example:
  >>> rng = np.random.default_rng(0)
  >>> docs = rng.standard_normal((5000, 64)).astype(np.float32)
  >>> index = ScannIndex.build(docs)
  >>> ids, scores = index.search(docs[:3], k=10)         # [3, 10] rows, best first
  >>> index.delete([0])                                   # document 0 is never returned
  >>> index.add(docs[:1], ids=[5000])                     # ... but its copy, id 5000, is
  array([5000])
  >>> int(index.search(docs[:1], k=1)[0][0, 0])
  5000
  >>> index.save("/tmp/scann"); index = ScannIndex.load("/tmp/scann")  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import threading
from typing import Any, NamedTuple, Sequence

import numpy as np

from jaxsearch.retrieval.corpus import Corpus
from jaxsearch.retrieval.results import check_k, pad_results
from jaxsearch.retrieval.text_encoder import TextEncoder, as_query_vectors, corpus_embeddings

_IMPORT_LOCK = threading.Lock()
_META_FILE = "jaxsearch_scann.json"
_IDS_FILE = "jaxsearch_ids.npy"
_FORMAT_VERSION = 1


@functools.cache
def import_scann() -> Any:
  """Imports ScaNN's pybind wrapper (`scann.scann_ops_pybind`) with TensorFlow hidden.

  `sys.modules['tensorflow'] = None` makes scann's optional TensorFlow import fail cleanly
  (it only loads its TF ops when TensorFlow imports); the entry is restored afterwards, so
  TensorFlow stays importable (or imported) for everyone else.
  """
  with _IMPORT_LOCK:
    missing = object()
    previous = sys.modules.get("tensorflow", missing)
    sys.modules["tensorflow"] = None  # type: ignore[assignment]
    try:
      from scann.scann_ops.py import scann_ops_pybind  # noqa: PLC0415
    finally:
      if previous is missing:
        sys.modules.pop("tensorflow", None)
      else:
        sys.modules["tensorflow"] = previous
  return scann_ops_pybind


def _check_int(name: str, value: object, minimum: int, optional: bool = False) -> None:
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be {'None or ' if optional else ''}an int >= {minimum}, "
                     f"got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScannConfig:
  """ScaNN parameters; None means "derive from the corpus size" (see `derive_params`).

  Attributes:
    num_leaves: Tree leaves (k-means centres); None: round(sqrt(n)).
    leaves_to_search: Leaves searched per query; None: max(ceil(num_leaves / 10),
      min(num_leaves, 16)).
    reorder: Candidates rescored exactly; None: 100. At search time at least 2k are.
    dims_per_block: Dimensions per AH block (2 is ScaNN's recommendation).
    anisotropic_quantization_threshold: AH's anisotropic-loss threshold (0.2 for unit-norm
      embeddings; NaN: plain reconstruction loss).
    training_sample_size: Points used to train the tree and AH; None: min(n, 100_000).
    brute_force_below: Corpora with fewer documents get an exact brute-force searcher.
    training_threads: Threads for training (0: all cores).
    search_threads: Threads for batched search (0: ScaNN's default).
  """

  num_leaves: int | None = None
  leaves_to_search: int | None = None
  reorder: int | None = None
  dims_per_block: int = 2
  anisotropic_quantization_threshold: float = 0.2
  training_sample_size: int | None = None
  brute_force_below: int = 2048
  training_threads: int = 0
  search_threads: int = 0

  def __post_init__(self):
    _check_int("num_leaves", self.num_leaves, 1, optional=True)
    _check_int("leaves_to_search", self.leaves_to_search, 1, optional=True)
    _check_int("reorder", self.reorder, 1, optional=True)
    _check_int("dims_per_block", self.dims_per_block, 1)
    _check_int("training_sample_size", self.training_sample_size, 1, optional=True)
    _check_int("brute_force_below", self.brute_force_below, 0)
    _check_int("training_threads", self.training_threads, 0)
    _check_int("search_threads", self.search_threads, 0)
    t = self.anisotropic_quantization_threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or (t == t and t < 0):
      raise ValueError("anisotropic_quantization_threshold must be a float >= 0 or NaN, got "
                       f"{t!r}")
    if (self.num_leaves is not None and self.leaves_to_search is not None
        and self.leaves_to_search > self.num_leaves):
      raise ValueError(f"leaves_to_search must be <= num_leaves={self.num_leaves}, got "
                       f"{self.leaves_to_search}")


class ScannParams(NamedTuple):
  """The parameters a ScaNN searcher is built with (from `derive_params`)."""

  tree: bool              # False: exact brute force (no tree, no AH, no reordering)
  num_leaves: int
  leaves_to_search: int
  reorder: int
  training_sample_size: int


def derive_params(n: int, config: ScannConfig = ScannConfig()) -> ScannParams:
  """Fills the size-dependent parameters of `config` for a corpus of `n` documents.

  Example:
    >>> derive_params(1_000_000)
    ScannParams(tree=True, num_leaves=1000, leaves_to_search=100, reorder=100, training_sample_size=100000)
    >>> derive_params(5000).leaves_to_search    # 71 leaves: 16 searched
    16
  """
  _check_int("n", n, 1)
  sample = min(n, config.training_sample_size or 100_000)
  reorder = config.reorder or 100
  if n < config.brute_force_below:
    return ScannParams(tree=False, num_leaves=0, leaves_to_search=0, reorder=reorder,
                       training_sample_size=sample)
  leaves = config.num_leaves or max(1, round(math.sqrt(n)))
  leaves = min(leaves, n)
  search = config.leaves_to_search or max(math.ceil(leaves / 10), min(leaves, 16))
  return ScannParams(tree=True, num_leaves=leaves, leaves_to_search=min(search, leaves),
                     reorder=reorder, training_sample_size=sample)


class ScannIndex:
  """A mutable ScaNN MIPS index over document vectors, behind `Retriever.search`.

  Document ids are non-negative ints (corpus rows by default): `search` returns them,
  `add` / `delete` take them.

  Attributes:
    config: The `ScannConfig`.
    params: The derived `ScannParams` the searcher was built with.
    dim: Vector dimension D.
    query_encoder: texts -> [Q, D], used when `search` gets texts.
  """

  def __init__(self, searcher: Any, ids: np.ndarray, *, config: ScannConfig,
               params: ScannParams, dim: int, query_encoder: TextEncoder | None = None):
    """Wraps a built `scann_pybind.ScannNumpy` (use `build` / `load` instead)."""
    self._searcher = searcher
    self.config = config
    self.params = params
    self.dim = int(dim)
    self.query_encoder = query_encoder
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 1 or ids.shape[0] != searcher.size():
      raise ValueError(f"ids must be [{searcher.size()}] (one per datapoint), got {ids.shape}")
    if len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
      raise ValueError(f"ids must be in [0, 2**31), got {ids.min()}..{ids.max()}")
    if len(np.unique(ids)) != len(ids):
      raise ValueError("ids must be unique")
    self._ext = ids.copy()                          # internal slot -> document id
    self._slot = np.full(int(ids.max(initial=-1)) + 1, -1, np.int64)  # id -> slot, -1: none
    self._slot[ids] = np.arange(len(ids))
    if config.search_threads:
      searcher.set_num_threads(config.search_threads)

  # --------------------------------------------------------------------------------------
  # Building, saving, loading
  # --------------------------------------------------------------------------------------

  @classmethod
  def build(cls, embeddings: np.ndarray, config: ScannConfig = ScannConfig(), *,
            ids: Sequence[int] | np.ndarray | None = None,
            query_encoder: TextEncoder | None = None) -> ScannIndex:
    """Trains and builds a searcher over `embeddings` [N, D] (ids default to 0..N-1).

    Example:
      >>> index = ScannIndex.build(np.random.rand(3000, 32).astype(np.float32))
      >>> index.params.tree, index.params.num_leaves
      (True, 55)
    """
    if not isinstance(config, ScannConfig):
      raise ValueError(f"config must be a ScannConfig, got {type(config).__name__}")
    db = np.ascontiguousarray(embeddings, dtype=np.float32)
    if db.ndim != 2 or db.shape[0] < 1 or db.shape[1] < 1:
      raise ValueError(f"embeddings must be [N >= 1, D >= 1], got shape {db.shape}")
    if not np.isfinite(db).all():
      raise ValueError("embeddings contain NaN or inf")
    n, dim = db.shape
    ids = np.arange(n) if ids is None else np.asarray(ids, np.int64)
    if ids.shape != (n,):
      raise ValueError(f"ids must be [N={n}], got shape {ids.shape}")
    params = derive_params(n, config)
    scann = import_scann()
    builder = scann.builder(db, 10, "dot_product")
    if config.training_threads:
      builder = builder.set_n_training_threads(config.training_threads)
    if params.tree:
      builder = builder.tree(num_leaves=params.num_leaves,
                             num_leaves_to_search=params.leaves_to_search,
                             training_sample_size=params.training_sample_size)
      builder = builder.score_ah(
          config.dims_per_block,
          anisotropic_quantization_threshold=config.anisotropic_quantization_threshold,
          training_sample_size=params.training_sample_size)
      builder = builder.reorder(params.reorder)
    else:
      builder = builder.score_brute_force()
    searcher = builder.build().searcher             # the raw scann_pybind.ScannNumpy
    return cls(searcher, ids, config=config, params=params, dim=dim,
               query_encoder=query_encoder)

  @classmethod
  def from_corpus(cls, corpus: Corpus, *, encoder: TextEncoder | None = None,
                  embeddings: np.ndarray | None = None,
                  query_encoder: TextEncoder | None = None,
                  config: ScannConfig = ScannConfig()) -> ScannIndex:
    """Indexes `corpus` (ids = rows): embeds `corpus.contents` with `encoder`, or takes
    `embeddings` [len(corpus), D]; queries use `query_encoder` (default: `encoder`)."""
    embeddings = corpus_embeddings(corpus, encoder, embeddings)
    return cls.build(embeddings, config, query_encoder=query_encoder or encoder)

  def save(self, directory: str | os.PathLike) -> None:
    """Writes the searcher (ScaNN's own files, relative paths) plus the id map and config.

    The directory is created if needed; the index can be moved and then `load`ed.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    self._searcher.serialize(directory, True)
    np.save(os.path.join(directory, _IDS_FILE), self._ext)
    meta = {"format_version": _FORMAT_VERSION, "dim": self.dim,
            "config": dataclasses.asdict(self.config), "params": self.params._asdict()}
    with open(os.path.join(directory, _META_FILE), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2)

  @classmethod
  def load(cls, directory: str | os.PathLike, *,
           query_encoder: TextEncoder | None = None) -> ScannIndex:
    """Reads an index written by `save` (adds and deletes made before saving included)."""
    directory = os.fspath(directory)
    meta_path = os.path.join(directory, _META_FILE)
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f"{directory} holds no ScannIndex (no {_META_FILE})")
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("format_version") != _FORMAT_VERSION:
      raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, "
                       f"expected {_FORMAT_VERSION}")
    searcher = import_scann().load_searcher(directory).searcher
    return cls(searcher, np.load(os.path.join(directory, _IDS_FILE)),
               config=ScannConfig(**meta["config"]), params=ScannParams(**meta["params"]),
               dim=meta["dim"], query_encoder=query_encoder)

  # --------------------------------------------------------------------------------------
  # Search
  # --------------------------------------------------------------------------------------

  @property
  def num_docs(self) -> int:
    """Live documents."""
    return len(self._ext)

  @property
  def ids(self) -> np.ndarray:
    """[num_docs] int64 ids of the live documents (in ScaNN's slot order)."""
    return self._ext.copy()

  def __contains__(self, doc_id: object) -> bool:
    return (isinstance(doc_id, (int, np.integer)) and 0 <= doc_id < len(self._slot)
            and self._slot[doc_id] >= 0)

  def search(self, queries: Any, k: int, *, leaves_to_search: int | None = None,
             reorder: int | None = None, batch_size: int = 256
             ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k document ids for [Q, D] vectors (or texts, with a query encoder).

    Args:
      queries: [Q, D] vectors or Q texts.
      k: Results per query; rows past the live document count are id -1, score -inf.
      leaves_to_search: Override the built value (more: higher recall, slower).
      reorder: Override the number of exactly rescored candidates (default
        max(params.reorder, 2k)).
      batch_size: Queries per ScaNN call; batches run on ScaNN's thread pool.

    Returns:
      (ids [Q, k] int32, scores [Q, k] float32 inner products), best first.
    """
    k = check_k(k)
    _check_int("leaves_to_search", leaves_to_search, 1, optional=True)
    _check_int("reorder", reorder, 1, optional=True)
    _check_int("batch_size", batch_size, 1)
    vectors = np.ascontiguousarray(as_query_vectors(queries, self.query_encoder, self.dim))
    kk = min(k, self.num_docs)
    if kk == 0 or vectors.shape[0] == 0:
      return pad_results(np.zeros((vectors.shape[0], 0)), np.zeros((vectors.shape[0], 0)), k)
    pre = -1
    leaves = -1
    if self.params.tree:
      pre = max(reorder or self.params.reorder, 2 * kk)
      leaves = leaves_to_search or -1
    parallel = vectors.shape[0] > batch_size
    slots, scores = self._searcher.search_batched(vectors, kk, pre, leaves, parallel,
                                                  batch_size if parallel else 0)
    slots = np.asarray(slots, np.int64)
    scores = np.asarray(scores, np.float32)
    valid = ~np.isnan(scores)                      # ScaNN pads short rows with NaN
    ids = np.where(valid, self._ext[np.where(valid, slots, 0)], -1)
    return pad_results(ids, np.where(valid, scores, -np.inf), k)

  # --------------------------------------------------------------------------------------
  # Mutation
  # --------------------------------------------------------------------------------------

  def add(self, embeddings: np.ndarray, ids: Sequence[int] | np.ndarray | None = None
          ) -> np.ndarray:
    """Adds documents, or replaces the vectors of ids already present (an upsert).

    Args:
      embeddings: [n, D] vectors.
      ids: [n] document ids; default: the next n ids after the largest id ever used.

    Returns:
      [n] int64 ids of the added documents.

    Example:
      >>> new_ids = index.add(new_vectors)                        # doctest: +SKIP
    """
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if vectors.ndim == 1:
      vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[1] != self.dim:
      raise ValueError(f"embeddings must be [n, D={self.dim}], got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
      raise ValueError("embeddings contain NaN or inf")
    n = vectors.shape[0]
    if ids is None:
      ids = np.arange(len(self._slot), len(self._slot) + n)
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.shape != (n,):
      raise ValueError(f"ids must be [n={n}], got shape {ids.shape}")
    if n == 0:
      return ids
    if ids.min() < 0 or ids.max() > np.iinfo(np.int32).max:
      raise ValueError(f"ids must be in [0, 2**31), got {ids.min()}..{ids.max()}")
    if len(np.unique(ids)) != n:
      raise ValueError("ids must be unique within one add")
    if ids.max() >= len(self._slot):
      grown = np.full(max(int(ids.max()) + 1, 2 * len(self._slot)), -1, np.int64)
      grown[:len(self._slot)] = self._slot
      self._slot = grown
    slots = [int(s) if s >= 0 else None for s in self._slot[ids]]
    result = self._searcher.upsert(slots, vectors, min(n, 256))
    new_slots = np.asarray(result, np.int64)
    if new_slots.shape != (n,):
      raise RuntimeError(f"ScaNN upsert returned {new_slots.shape} slots for {n} points")
    size = self._searcher.size()
    ext = np.full(size, -1, np.int64)
    ext[:len(self._ext)] = self._ext
    ext[new_slots] = ids
    if (ext < 0).any():
      raise RuntimeError("ScaNN upsert left unmapped slots")
    self._ext = ext
    self._slot[ids] = new_slots
    return ids

  def delete(self, ids: Sequence[int] | np.ndarray) -> None:
    """Removes documents by id; they are never returned again. Unknown ids raise KeyError."""
    ids = [int(i) for i in np.asarray(ids, np.int64).reshape(-1)]
    if len(set(ids)) != len(ids):
      raise ValueError("ids to delete must be unique")
    unknown = [i for i in ids if i not in self]
    if unknown:
      raise KeyError(f"unknown document ids {unknown[:5]} (not in the index)")
    slots = []
    ext = self._ext.copy()
    size = len(ext)
    for doc_id in ids:                     # ScaNN moves its last point into the freed slot
      slot = int(self._slot[doc_id])
      slots.append(slot)
      size -= 1
      if slot != size:
        ext[slot] = ext[size]
        self._slot[ext[slot]] = slot
      self._slot[doc_id] = -1
    if slots:
      self._searcher.delete(slots)
    self._ext = ext[:size].copy()
    if self._searcher.size() != len(self._ext):
      raise RuntimeError(f"ScaNN holds {self._searcher.size()} points after delete, the id "
                         f"map {len(self._ext)}")

  def rebalance(self) -> None:
    """Retrains the partitioning on the current documents (after many adds/deletes)."""
    self._searcher.rebalance("")

  def health(self) -> dict[str, float]:
    """ScaNN's health statistics (quantization error, partition imbalance)."""
    return dict(self._searcher.get_health_stats())
