r"""Retrieval quality on WordNet: BM25 and MiniLM (all-MiniLM-L6-v2) over the entity glosses.

Corpus: the 7,730 WordNet entity documents shipped with jaxsearch
(`jaxsearch.retrieval.corpus.load_wordnet_corpus`).
Query sets (`jaxsearch.data.wordnet.wordnet_questions`, all splits; at most `--max_queries`
of each, drawn with `--seed`):

  name         an entity's unambiguous name -> its document
  description  its gloss definition with its names removed -> its document (147 queries
               share their description with another entity and judge both relevant, so their
               recall@1 is at most 1/2)

Retrievers: "bm25" (`build_retriever("bm25")`, bm25s on the host) and "minilm"
(`minilm_text_encoder` embeddings of `corpus.contents` and of the queries, exact inner
product search with `ExactDenseRetriever`). Metrics: recall@1, recall@10 and mrr@10
(`jaxsearch.retrieval.metrics.evaluate`, trec_eval conventions), one JSON row per
(retriever, query set):

  {"retriever", "queries", "n_docs", "n_queries", "recall@1", "recall@10", "mrr@10"}

printed one per line and written as a list to `--json`.

`--embeddings_out PATH.npz` caches the MiniLM embeddings and serves the ANN benchmark:
  docs        [M, 384] float32 unit-norm document embeddings (row i = doc_ids[i])
  queries     [Q, 384] float32 unit-norm query embeddings (name queries, then description)
  exact_ids   [Q, 100] int32 rows of the exact top-100 documents per query, best first
  exact_scores [Q, 100] float32 their inner products
  doc_ids [M], query_ids [Q], query_texts [Q], query_kinds [Q]   strings
A later run reuses the cached document (and query) embeddings when the ids match.

Example:
  python -m experiments.wordnet_retrieval --json runs/wordnet_retrieval.json \
      --max_queries 2000 --embeddings_out runs/wordnet_minilm.npz
  python -m experiments.wordnet_retrieval --json /tmp/wn.json --max_queries 100 \
      --retrievers bm25                                                   # seconds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from jaxsearch.data import wordnet
from jaxsearch.data.world import SPLITS
from jaxsearch.retrieval import metrics as metrics_lib
from jaxsearch.retrieval.corpus import Corpus, load_wordnet_corpus
from jaxsearch.retrieval.retriever import build_retriever

MEASURES = ("recall@1", "recall@10", "mrr@10")
EXACT_K = 100
RETRIEVERS = ("bm25", "minilm")


def sample_queries(kind: str, questions: wordnet.WordNetQuestions, max_queries: int | None,
                   seed: int) -> wordnet.RetrievalQueries:
  """All splits' queries of `kind`; at most `max_queries` of them, a seeded sample in id
  order."""
  merged = wordnet.merge_queries(questions.retrieval[kind][s] for s in SPLITS)
  qids = sorted(merged.queries)
  if max_queries is not None and len(qids) > max_queries:
    keep = np.random.default_rng(seed).choice(len(qids), size=max_queries, replace=False)
    qids = [qids[i] for i in sorted(keep)]
  return wordnet.RetrievalQueries({q: merged.queries[q] for q in qids},
                                  {q: merged.qrels[q] for q in qids})


def score(ids: np.ndarray, scores: np.ndarray, queries: wordnet.RetrievalQueries,
          corpus: Corpus) -> dict[str, float]:
  """Mean recall@1, recall@10, mrr@10 of search results ids / scores [Q, k]."""
  run = metrics_lib.run_from_arrays(list(queries.queries), ids, scores, corpus.ids)
  return metrics_lib.mean_measures(metrics_lib.evaluate(run, queries.qrels, MEASURES))


def _load_cache(path: str | None) -> dict[str, np.ndarray]:
  if not path or not os.path.isfile(path):
    return {}
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def minilm_embeddings(corpus: Corpus, query_ids: list[str], query_texts: list[str],
                      cache_path: str | None, batch_size: int
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
  """Document [M, 384] and query [Q, 384] embeddings, from the cache where its ids match."""
  cache = _load_cache(cache_path)
  timing: dict[str, float] = {}
  encoder = None

  def get_encoder():
    nonlocal encoder
    if encoder is None:
      from jaxsearch.retrieval.text_encoder import minilm_text_encoder  # noqa: PLC0415
      encoder = minilm_text_encoder(batch_size=batch_size, show_progress=True)
    return encoder

  if "docs" in cache and cache["doc_ids"].tolist() == list(corpus.ids):
    docs = cache["docs"]
    timing["embed_docs_s"] = 0.0
  else:
    start = time.perf_counter()
    docs = get_encoder()(list(corpus.contents))
    timing["embed_docs_s"] = time.perf_counter() - start
  cached = ({q: i for i, q in enumerate(cache["query_ids"].tolist())}
            if "queries" in cache else {})
  queries = np.zeros((len(query_ids), docs.shape[1]), np.float32)
  todo = [i for i, q in enumerate(query_ids) if q not in cached]
  for i, q in enumerate(query_ids):
    if q in cached:
      queries[i] = cache["queries"][cached[q]]
  start = time.perf_counter()
  if todo:
    queries[todo] = get_encoder()([query_texts[i] for i in todo])
  timing["embed_queries_s"] = time.perf_counter() - start
  return np.asarray(docs, np.float32), queries, timing


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", required=True, help="write the rows here (a JSON list)")
  parser.add_argument("--max_queries", type=int, default=2000,
                      help="at most this many queries per query set (0: all)")
  parser.add_argument("--embeddings_out", default=None,
                      help=".npz cache of the MiniLM embeddings and exact top-100 ids")
  parser.add_argument("--retrievers", default=",".join(RETRIEVERS),
                      help=f"comma-separated subset of {RETRIEVERS}")
  parser.add_argument("--seed", type=int, default=0, help="query sample and split seed")
  parser.add_argument("--batch_size", type=int, default=64, help="MiniLM texts per call")
  parser.add_argument("--corpus", default=None, help="entity JSONL (default: shipped asset)")
  args = parser.parse_args(argv)
  retrievers = [r for r in args.retrievers.split(",") if r]
  unknown = [r for r in retrievers if r not in RETRIEVERS]
  if unknown or not retrievers:
    parser.error(f"--retrievers must name some of {RETRIEVERS}, got {args.retrievers!r}")
  if args.max_queries < 0:
    parser.error(f"--max_queries must be >= 0, got {args.max_queries}")
  max_queries = args.max_queries or None

  t0 = time.perf_counter()
  corpus = load_wordnet_corpus(args.corpus)
  questions = wordnet.wordnet_questions(wordnet.load_wordnet_entities(args.corpus),
                                        seed=args.seed)
  query_sets = {kind: sample_queries(kind, questions, max_queries, args.seed)
                for kind in wordnet.RETRIEVAL_KINDS}
  rows: list[dict[str, Any]] = []
  timing: dict[str, float] = {}

  def add(name: str, kind: str, ids: np.ndarray, scores: np.ndarray) -> None:
    q = query_sets[kind]
    row = {"retriever": name, "queries": kind, "n_docs": len(corpus),
           "n_queries": len(q.queries), **score(ids, scores, q, corpus)}
    rows.append(row)
    print(json.dumps(row), flush=True)

  if "bm25" in retrievers:
    start = time.perf_counter()
    bm25 = build_retriever("bm25", corpus)
    for kind, q in query_sets.items():
      ids, scores = bm25.search(list(q.queries.values()), k=10)
      add("bm25", kind, ids, scores)
    timing["bm25_s"] = time.perf_counter() - start

  if "minilm" in retrievers:
    from jaxsearch.retrieval.mips import ExactDenseRetriever  # noqa: PLC0415
    query_ids = [qid for q in query_sets.values() for qid in q.queries]
    query_texts = [t for q in query_sets.values() for t in q.queries.values()]
    query_kinds = [kind for kind, q in query_sets.items() for _ in q.queries]
    docs, queries, embed_timing = minilm_embeddings(
        corpus, query_ids, query_texts, args.embeddings_out, args.batch_size)
    timing.update(embed_timing)
    start = time.perf_counter()
    exact_ids, exact_scores = ExactDenseRetriever(docs).search(queries, k=EXACT_K)
    timing["minilm_search_s"] = time.perf_counter() - start
    offset = 0
    for kind, q in query_sets.items():
      rows_of_kind = slice(offset, offset + len(q.queries))
      add("minilm", kind, exact_ids[rows_of_kind, :10], exact_scores[rows_of_kind, :10])
      offset += len(q.queries)
    if args.embeddings_out:
      os.makedirs(os.path.dirname(os.path.abspath(args.embeddings_out)), exist_ok=True)
      np.savez(args.embeddings_out, docs=docs, queries=queries,
               exact_ids=exact_ids.astype(np.int32), exact_scores=exact_scores.astype(np.float32),
               doc_ids=np.array(corpus.ids), query_ids=np.array(query_ids),
               query_texts=np.array(query_texts), query_kinds=np.array(query_kinds))

  timing["wall_s"] = time.perf_counter() - t0
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  print(json.dumps({k: round(v, 1) for k, v in timing.items()}), file=sys.stderr)
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
