"""Hard negatives mined with a retriever: each query's top rows once its relevant rows are removed.

Used by the dense retriever (`jaxsearch.programs.dense_retriever`, BM25 negatives for InfoNCE)
and DDRO (`jaxsearch.programs.generative_retrieval`, negatives for the pairwise loss).

Example:
  >>> bm25 = build_retriever("bm25", corpus)                                 # doctest: +SKIP
  >>> mine_hard_negatives(bm25, ["who is Mira?"], [{3}], depth=2)           # doctest: +SKIP
"""
from __future__ import annotations

from typing import Collection, Sequence

import numpy as np

from jaxsearch.retrieval.retriever import Retriever


def mine_hard_negatives(retriever: Retriever, queries: Sequence[str],
                        exclude: Sequence[Collection[int]], depth: int,
                        batch_size: int = 1024) -> np.ndarray:
  """The top `depth` rows of each query's ranking once its relevant rows are removed.

  Args:
    retriever: a text retriever (e.g. `build_retriever("bm25", corpus)`).
    queries: N query texts.
    exclude: N collections of rows never to return for that query (its positives).
    depth: negatives per query; `depth + len(exclude[i])` must not exceed the corpus size.
    batch_size: queries per `retriever.search` call.

  Returns:
    [N, depth] int32 corpus rows, in the retriever's order (best first).

  Example:
    >>> bm25 = build_retriever("bm25", corpus)
    >>> negatives = mine_hard_negatives(bm25, ["who is Mira?"], [{3}], depth=2)  # [1, 2]
  """
  n = len(queries)
  if len(exclude) != n:
    raise ValueError(f"exclude must hold one collection per query ({n}), got {len(exclude)}")
  if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
    raise ValueError(f"depth must be an int >= 1, got {depth!r}")
  most = max((len(e) for e in exclude), default=0)
  if depth + most > retriever.num_docs:
    raise ValueError(f"depth={depth} negatives + up to {most} excluded rows per query need at "
                     f"least {depth + most} documents; the corpus has {retriever.num_docs}")
  out = np.empty((n, depth), np.int32)
  for start in range(0, n, batch_size):
    chunk = list(queries[start:start + batch_size])
    ids, _ = retriever.search(chunk, k=depth + most)
    for i, row in enumerate(ids):
      skip = exclude[start + i]
      kept = [int(r) for r in row if r >= 0 and int(r) not in skip][:depth]
      if len(kept) < depth:
        raise ValueError(f"the retriever returned only {len(kept)} usable rows for query "
                         f"{chunk[i]!r} (depth={depth})")
      out[start + i] = kept
  return out
