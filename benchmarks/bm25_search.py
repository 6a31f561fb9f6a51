"""Benchmark: jitted in-graph BM25 (`jaxsearch.retrieval.bm25`) against bm25s `retrieve`.

Synthetic corpora of M in {1_000, 10_000} documents of ~40 Zipf-distributed token ids over
V=4096, 256 queries of ~8 ids (half drawn from a random document, half from the Zipf
prior), k=3. For each M it reports queries/s for

  * jax_search: jitted `bm25_search(index, bags, k)` on precomputed bags;
  * jax_tokens_to_topk: jitted `query_bag` + `bm25_search` from padded query tokens;
  * bm25s_retrieve[_<backend>]: `bm25s.BM25().retrieve(queries, k=3)` on the same ids,
    fed as strings "t<id>" (single thread, with bm25s's numpy and jax top-k selection).

JAX timings are medians of several runs after a warm-up compile; bm25s timings are medians
of a few full passes. It also checks that both return the same top-k scores.

Usage:
  python benchmarks/bm25_search.py [--json OUT] [--sizes 1000 10000] [--repeats 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DISABLE_TQDM", "1")

import bm25s  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxsearch.metrics import write_json  # noqa: E402
from jaxsearch.retrieval import bm25  # noqa: E402

PAD = 0
IGNORE = (0, 1, 2)


def make_data(rng: np.random.Generator, num_docs: int, vocab: int, num_queries: int,
              doc_len: int, query_len: int):
  """Zipf-ish token ids in [3, vocab); returns docs (list of lists) and padded queries."""
  ids = np.arange(3, vocab)
  p = 1.0 / (np.arange(len(ids)) + 10.0)
  p /= p.sum()
  lengths = np.clip(rng.poisson(doc_len, size=num_docs), 5, 2 * doc_len)
  docs = [rng.choice(ids, size=int(n), p=p).tolist() for n in lengths]
  queries = []
  for _ in range(num_queries):
    src = docs[int(rng.integers(num_docs))]
    q = rng.choice(src, size=query_len // 2).tolist() + rng.choice(
        ids, size=query_len - query_len // 2, p=p).tolist()
    queries.append(q)
  q_tokens = np.full((num_queries, query_len), PAD, np.int32)
  for i, q in enumerate(queries):
    q_tokens[i, :len(q)] = q
  return docs, queries, q_tokens, q_tokens != PAD


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_size(num_docs: int, args) -> dict:
  rng = np.random.default_rng(args.seed)
  docs, queries, q_tokens, q_mask = make_data(
      rng, num_docs, args.vocab, args.queries, args.doc_len, args.query_len)
  k, vocab = args.k, args.vocab
  out = {"num_docs": num_docs, "vocab": vocab, "num_queries": args.queries, "k": k,
         "mean_doc_len": float(np.mean([len(d) for d in docs]))}

  # ---- JAX ----
  corpus = bm25.tokenize_corpus(docs, pad_id=PAD)
  build = jax.jit(bm25.build_bm25_index, static_argnums=(1, 2), static_argnames="ignore_ids")
  config = bm25.BM25Config()
  jax.block_until_ready(build(corpus, vocab, config, ignore_ids=IGNORE))
  t0 = time.perf_counter()
  index = jax.block_until_ready(build(corpus, vocab, config, ignore_ids=IGNORE))
  out["jax_build_s"] = time.perf_counter() - t0

  search = jax.jit(bm25.bm25_search, static_argnames="k")

  def tokens_to_topk(index, tokens, mask):
    return bm25.bm25_search(index, bm25.query_bag(tokens, mask, vocab, ignore_ids=IGNORE), k)

  tokens_to_topk = jax.jit(tokens_to_topk)
  q_tokens_d, q_mask_d = jnp.asarray(q_tokens), jnp.asarray(q_mask)
  bags = jax.block_until_ready(
      jax.jit(bm25.query_bag, static_argnums=2, static_argnames="ignore_ids")(
          q_tokens_d, q_mask_d, vocab, ignore_ids=IGNORE))
  jax.block_until_ready(search(index, bags, k=k))          # warm-up compile
  jax.block_until_ready(tokens_to_topk(index, q_tokens_d, q_mask_d))
  t = _median_time(lambda: jax.block_until_ready(search(index, bags, k=k)), args.repeats)
  out["jax_search_s"] = t
  out["jax_search_qps"] = args.queries / t
  t = _median_time(lambda: jax.block_until_ready(tokens_to_topk(index, q_tokens_d, q_mask_d)),
                   args.repeats)
  out["jax_tokens_to_topk_s"] = t
  out["jax_tokens_to_topk_qps"] = args.queries / t
  _, jax_scores = search(index, bags, k=k)

  # ---- bm25s ----
  str_docs = [[f"t{t}" for t in d] for d in docs]
  str_queries = [[f"t{t}" for t in q] for q in queries]
  ref = bm25s.BM25()
  t0 = time.perf_counter()
  ref.index(str_docs, show_progress=False)
  out["bm25s_index_s"] = time.perf_counter() - t0
  for backend in ("numpy", "jax"):
    def run():
      return ref.retrieve(str_queries, k=k, show_progress=False, n_threads=0,
                          backend_selection=backend)
    _, ref_scores = run()                                    # warm-up
    t = _median_time(run, args.bm25s_repeats)
    out[f"bm25s_retrieve_{backend}_s"] = t
    out[f"bm25s_retrieve_{backend}_qps"] = args.queries / t
  out["max_abs_score_diff_vs_bm25s"] = float(np.max(np.abs(np.asarray(jax_scores) - ref_scores)))
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None, help="also write the result dict here")
  parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000])
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument("--queries", type=int, default=256)
  parser.add_argument("--doc_len", type=int, default=40)
  parser.add_argument("--query_len", type=int, default=8)
  parser.add_argument("--k", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--bm25s_repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  result = {
      "device": str(jax.devices()[0]),
      "backend": jax.default_backend(),
      "jax_version": jax.__version__,
      "bm25s_version": bm25s.__version__,
      "results": [bench_size(m, args) for m in args.sizes],
  }
  print(json.dumps(result, indent=2, sort_keys=True))
  if args.json:
    write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
