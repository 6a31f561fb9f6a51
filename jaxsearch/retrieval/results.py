"""The result format every `Retriever` returns, and the helpers that build it.

`ids` [Q, k] int32 corpus rows and `scores` [Q, k] float32, best first; rows past the number
of (live) documents are padded with id -1 and score -inf (`pad_results`), so `k` may exceed
the corpus size. Shared by the backends (`retriever`, `mips`, `scann_index`), which import it
rather than one another.
"""
from __future__ import annotations

import numpy as np


def check_k(k: object) -> int:
  """Validates `k` (an int >= 1) and returns it as int."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be an int >= 1, got {k!r}")
  return int(k)


def pad_results(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads [Q, k'] results (k' <= k) to [Q, k] with id -1 and score -inf.

  Example:
    >>> pad_results(np.array([[3]]), np.array([[0.5]]), 2)[0]
    array([[ 3, -1]], dtype=int32)
  """
  ids = np.asarray(ids, np.int32)
  scores = np.asarray(scores, np.float32)
  if ids.ndim != 2 or ids.shape != scores.shape or ids.shape[1] > k:
    raise ValueError(f"ids and scores must both be [Q, <= {k}], got {ids.shape} and "
                     f"{scores.shape}")
  missing = k - ids.shape[1]
  if missing:
    ids = np.concatenate([ids, np.full((ids.shape[0], missing), -1, np.int32)], axis=1)
    scores = np.concatenate(
        [scores, np.full((scores.shape[0], missing), -np.inf, np.float32)], axis=1)
  return ids, scores


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Host top-k of each row of `scores` [Q, N], ties toward the lower column (as lax.top_k).

  Returns:
    (ids [Q, min(k, N)] int32, scores [Q, min(k, N)] float32), best first.

  Example:
    >>> top_k_rows(np.array([[1.0, 3.0, 3.0, 2.0]]), 2)[0]
    array([[1, 2]], dtype=int32)
  """
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"scores must be [Q, N], got shape {scores.shape}")
  num_queries, n = scores.shape
  kk = min(check_k(k), n)
  ids = np.empty((num_queries, kk), np.int32)
  for q in range(num_queries):
    row = scores[q]
    if kk < n:
      kth = row[np.argpartition(-row, kk - 1)[kk - 1]]
      cand = np.flatnonzero(row >= kth)          # every tie at the k-th value included
    else:
      cand = np.arange(n)
    ids[q] = cand[np.lexsort((cand, -row[cand]))[:kk]]
  return ids, np.take_along_axis(scores, ids, axis=1).astype(np.float32)
