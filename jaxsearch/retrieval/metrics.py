"""Ranking metrics over runs and qrels, with trec_eval's conventions (checked against
`pytrec_eval`).

A run is `{qid: {docid: score}}`, qrels are `{qid: {docid: grade}}`. As trec_eval:

- a query's ranking sorts its documents by score, descending; equal scores are ordered by
  document id, descending (string comparison);
- a document is relevant when its grade >= `relevance_level` (default 1); `num_rel` counts
  the relevant documents in the qrels, retrieved or not;
- queries are evaluated when they are in both the run and the qrels (a query in the run
  with no documents scores 0; pass `missing_as_zero=True` to also score qrels queries the
  run lacks, as `trec_eval -c`); a judged query without relevant documents scores 0.

Measures (`k` is a cutoff; "mrr" / "ndcg" / "map" without one use the whole ranking):

  recall@k     |relevant in top k| / num_rel                          (trec_eval recall_k)
  precision@k  |relevant in top k| / k                                      (trec_eval P_k)
  mrr@k        1 / rank of the first relevant document in the top k, else 0 (recip_rank)
  ndcg@k       DCG@k / IDCG@k, DCG = sum_i gain(d_i) / log2(i + 1) over ranks i = 1..k,
               gain = grade if grade > 0 else 0 (graded, independent of relevance_level);
               IDCG sorts the qrels' positive grades          (trec_eval ndcg_cut_k / ndcg)
  map@k        sum over relevant d in the top k of precision@rank(d), / num_rel (map_cut_k)

Example:
  >>> qrels = {"q1": {"d1": 1, "d3": 2}}
  >>> run = {"q1": {"d1": 0.2, "d2": 0.9, "d3": 0.1}}
  >>> per_query = evaluate(run, qrels, ["recall@2", "mrr@10", "ndcg@3"])
  >>> per_query["q1"]["recall@2"], per_query["q1"]["mrr@10"]
  (0.5, 0.5)
  >>> round(per_query["q1"]["ndcg@3"], 4)   # (1/log2(3) + 2/2) / (2 + 1/log2(3))
  0.6199
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

MEASURES = ("recall", "precision", "mrr", "ndcg", "map")
_MEASURE_RE = re.compile(r"^(recall|precision|mrr|ndcg|map)(?:@(\d+))?$")


class Measure(NamedTuple):
  """A parsed measure name such as "ndcg@10"."""

  name: str        # one of MEASURES
  k: int | None    # cutoff; None = whole ranking


def parse_measure(measure: str) -> Measure:
  """Parses "recall@10", "mrr", ... into a `Measure`; recall and precision need a cutoff.

  Example:
    >>> parse_measure("ndcg@10")
    Measure(name='ndcg', k=10)
  """
  match = _MEASURE_RE.match(measure) if isinstance(measure, str) else None
  if match is None:
    raise ValueError(f"unknown measure {measure!r}; expected NAME or NAME@K with NAME in "
                     f"{MEASURES}, e.g. 'recall@10'")
  name, k = match.group(1), match.group(2)
  k = None if k is None else int(k)
  if k is not None and k < 1:
    raise ValueError(f"measure {measure!r}: the cutoff must be >= 1")
  if k is None and name in ("recall", "precision"):
    raise ValueError(f"measure {measure!r} needs a cutoff, e.g. '{name}@10'")
  return Measure(name, k)


def rank(scores: Mapping[str, float]) -> list[str]:
  """Document ids in trec_eval order: score descending, then document id descending.

  Example:
    >>> rank({"a": 1.0, "b": 2.0, "c": 1.0})
    ['b', 'c', 'a']
  """
  by_id_desc = sorted(scores, reverse=True)
  return sorted(by_id_desc, key=lambda d: -float(scores[d]))   # stable: ties keep id order


def _query_measures(ranking: Sequence[str], judged: Mapping[str, int],
                    measures: Sequence[Measure], relevance_level: int) -> list[float]:
  rel = np.array([judged.get(d, 0) >= relevance_level for d in ranking], bool)
  gains = np.array([max(judged.get(d, 0), 0) for d in ranking], np.float64)
  num_rel = sum(1 for g in judged.values() if g >= relevance_level)
  ideal = np.sort(np.array([g for g in judged.values() if g > 0], np.float64))[::-1]
  out = []
  for m in measures:
    depth = len(ranking) if m.k is None else min(m.k, len(ranking))
    r = rel[:depth]
    if m.name == "recall":
      out.append(r.sum() / num_rel if num_rel else 0.0)
    elif m.name == "precision":
      out.append(r.sum() / m.k)
    elif m.name == "mrr":
      hits = np.flatnonzero(r)
      out.append(1.0 / (hits[0] + 1) if len(hits) else 0.0)
    elif m.name == "map":
      if not num_rel:
        out.append(0.0)
        continue
      hits = np.flatnonzero(r)
      out.append(float(np.sum(np.arange(1, len(hits) + 1) / (hits + 1))) / num_rel)
    else:  # ndcg
      discounts = 1.0 / np.log2(np.arange(2, depth + 2))
      dcg = float(np.sum(gains[:depth] * discounts))
      cut = len(ideal) if m.k is None else min(m.k, len(ideal))
      idcg = float(np.sum(ideal[:cut] / np.log2(np.arange(2, cut + 2))))
      out.append(dcg / idcg if idcg > 0 else 0.0)
  return [float(v) for v in out]


def evaluate(run: Run, qrels: Qrels, measures: Iterable[str] = ("recall@10", "mrr@10",
                                                                 "ndcg@10"), *,
             relevance_level: int = 1, missing_as_zero: bool = False
             ) -> dict[str, dict[str, float]]:
  """Per-query values of `measures` (see the module docstring for definitions).

  Args:
    run: {qid: {docid: score}}.
    qrels: {qid: {docid: integer grade}}.
    measures: Names such as "recall@10", "precision@5", "mrr@10", "mrr", "ndcg@10",
      "ndcg", "map", "map@100".
    relevance_level: Smallest grade that counts as relevant (not used by nDCG's gains).
    missing_as_zero: Also score qrels queries missing from the run (all measures 0).

  Returns:
    {qid: {measure: value}} for the evaluated queries, in qrels order.
  """
  names = list(dict.fromkeys(measures))
  parsed = [parse_measure(m) for m in names]
  if isinstance(relevance_level, bool) or not isinstance(relevance_level, int):
    raise ValueError(f"relevance_level must be an int, got {relevance_level!r}")
  out: dict[str, dict[str, float]] = {}
  for qid, judged in qrels.items():
    if qid not in run and not missing_as_zero:
      continue
    ranking = rank(run.get(qid, {}))
    out[qid] = dict(zip(names, _query_measures(ranking, judged, parsed, relevance_level)))
  return out


def mean_measures(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  """Means over queries of `evaluate`'s output (trec_eval's "all" line); {} if empty.

  Example:
    >>> mean_measures({"q1": {"mrr@10": 1.0}, "q2": {"mrr@10": 0.5}})
    {'mrr@10': 0.75}
  """
  if not per_query:
    return {}
  names = list(next(iter(per_query.values())))
  return {m: float(np.mean([v[m] for v in per_query.values()])) for m in names}


def run_from_arrays(query_ids: Sequence[str], ids: np.ndarray, scores: np.ndarray,
                    doc_ids: Sequence[str]) -> dict[str, dict[str, float]]:
  """Turns `Retriever.search` output into a run; padding (id -1) is dropped.

  Args:
    query_ids: Q query ids, in the order of the searched queries.
    ids: [Q, k] int rows, -1 for padding.
    scores: [Q, k] float scores.
    doc_ids: Row -> document id (e.g. `corpus.ids`).

  Example:
    >>> run_from_arrays(["q1"], np.array([[1, -1]]), np.array([[0.5, -np.inf]]), ["a", "b"])
    {'q1': {'b': 0.5}}
  """
  ids = np.asarray(ids)
  scores = np.asarray(scores)
  if ids.ndim != 2 or ids.shape != scores.shape or ids.shape[0] != len(query_ids):
    raise ValueError(f"ids and scores must both be [Q={len(query_ids)}, k], got {ids.shape} "
                     f"and {scores.shape}")
  run: dict[str, dict[str, float]] = {}
  for qid, row_ids, row_scores in zip(query_ids, ids, scores):
    run[qid] = {doc_ids[int(i)]: float(s) for i, s in zip(row_ids, row_scores) if i >= 0}
  return run


def retrieval_recall(ids: np.ndarray, exact_ids: np.ndarray) -> float:
  """ANN recall against exact search: mean over queries of |ids ∩ exact| / k.

  Example:
    >>> retrieval_recall(np.array([[1, 2, 3]]), np.array([[3, 2, 9]]))
    0.6666666666666666
  """
  ids = np.asarray(ids)
  exact_ids = np.asarray(exact_ids)
  if ids.shape != exact_ids.shape or ids.ndim != 2:
    raise ValueError(f"ids and exact_ids must both be [Q, k], got {ids.shape} and "
                     f"{exact_ids.shape}")
  k = ids.shape[1]
  hits = [len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) for a, e in zip(ids, exact_ids)]
  return float(np.mean(hits) / k) if len(hits) else math.nan
