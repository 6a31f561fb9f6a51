"""A stale document index: the embeddings of the last refresh, searched exactly or by ScaNN.

REALM (`jaxsearch.programs.realm`) retrieves from document embeddings computed at the last
refresh with the live query embedding, then re-scores the retrieved documents with the live
encoders; `StaleIndex` is that index. Exact search runs `jaxsearch.retrieval.mips.exact_search`
on the device; "scann" keeps one host `ScannIndex` per segment and upserts every row at each
refresh (no retraining).

Example:
  >>> index = StaleIndex("exact", ScannConfig(), doc_emb, refreshed_at=0)   # doctest: +SKIP
  >>> ids, scores = index.search(query_emb, k=8)                            # doctest: +SKIP
  >>> index.refresh(new_doc_emb, step=100)                                  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.retrieval.mips import exact_search
from jaxsearch.retrieval.scann_index import ScannConfig, ScannIndex


class StaleIndex:
  """The document embeddings of the last refresh, searched exactly (on device) or by ScaNN.

  The rows may be split into `segments` (one per world): a search then looks at one segment
  only and returns rows of the whole array.

  Attributes:
    embeddings: [N, D] float32 numpy, the corpus as embedded at step `refreshed_at`.
    refreshed_at: the step of the last refresh.
    segments: ((start, end), ...) row ranges (default: one segment, every row).
  """

  def __init__(self, kind: str, scann_config: ScannConfig, embeddings: np.ndarray,
               refreshed_at: int, segments: Sequence[tuple[int, int]] | None = None):
    self.kind = kind
    self.scann_config = scann_config
    n = np.asarray(embeddings).shape[0]
    self.segments = tuple((int(a), int(b)) for a, b in (segments or [(0, n)]))
    if any(not 0 <= a < b <= n for a, b in self.segments):
      raise ValueError(f"StaleIndex segments {self.segments} must be non-empty ranges of the "
                       f"{n} rows")
    self._exact = jax.jit(exact_search, static_argnames="k")
    self._scann = None
    self.refresh(embeddings, refreshed_at)

  def refresh(self, embeddings: np.ndarray, step: int) -> None:
    """Replaces every document vector (ScaNN: an upsert of all ids, no retraining)."""
    self.embeddings = np.asarray(embeddings, np.float32)
    self.refreshed_at = int(step)
    parts = [self.embeddings[a:b] for a, b in self.segments]
    self._device = [jnp.asarray(x) for x in parts]
    if self.kind != "scann":
      return
    if self._scann is None:
      self._scann = [ScannIndex.build(x, self.scann_config) for x in parts]
    else:
      for index, x in zip(self._scann, parts):
        index.add(x, ids=np.arange(x.shape[0]))

  def search(self, queries: np.ndarray | jax.Array, k: int, segment: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """(ids [Q, k] int32 rows of `embeddings`, scores [Q, k] float32) of live query vectors
    [Q, D] among the rows of `segments[segment]`."""
    start = self.segments[segment][0]
    if self._scann is not None:
      ids, scores = self._scann[segment].search(np.asarray(queries, np.float32), k)
    else:
      ids, scores = self._exact(jnp.asarray(queries), self._device[segment], k=k)
    return np.asarray(ids) + start, np.asarray(scores)
