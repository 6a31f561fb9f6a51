"""Benchmark: the in-graph sparse BM25 (`jaxsearch.retrieval.bm25`) against bm25s, one run.

Three retrievers score the same passages, as SmolLM2 token ids, for the same queries (k=3):

  (a) `jaxsearch_sparse`: `build_sparse_bm25_index` (host numpy; posting lists in CSR order,
      the terms in at least a quarter of the passages as dense rows: `BM25Config()`'s
      `dense_min_df` 0.25) and the jitted `sparse_bm25_search(index, query_tokens, query_mask, k=3, ignore_ids,
      block)` in batches of `--batch` queries, once per posting block size of `--blocks`.
  (b) `bm25s`: `bm25s.BM25()` (method "lucene", k1 1.5, b 0.75: the defaults of both) indexed
      on the same token ids written as strings "t<id>" (as `tests/retrieval/bm25_test.py`),
      `retrieve(queries, k=3, backend_selection="numpy", n_threads=0)`: one call for all the
      queries, single-threaded (bm25s's default).
  (c) `jaxsearch_dense`: the dense `[V, M]` index (`build_bm25_index`, jitted) and the jitted
      `query_bag` + `bm25_search`, only where `4 * V * M` bytes is at most `--dense_max_gb`
      (GB = 1e9 bytes); otherwise a row `{"skipped": why, "index_bytes_needed": 4 * V * M}`.

Data. Passages are built from the WordNet entities shipped with the package
(`jaxsearch/data/assets/wordnet_entities.jsonl.gz`, 7,730 rows, `load_wordnet_entities`):

  * passages 0 .. 7,729 are the entities' own documents `"<title>"\\n<gloss>` (about 25 tokens),
    in a permutation drawn with `numpy.random.default_rng(seed)`;
  * every further passage (for corpora over 7,730) joins the glosses of 2 to 5 distinct
    entities drawn with the same generator, titled by the first:
    `"<title of e1>"\\n<gloss e1> <gloss e2> ...` (about 80 tokens).

A corpus of M passages is the first M of that sequence (so the sizes are nested). Queries:
`--queries` of them per corpus, drawn with `default_rng([seed, M])`: a random passage p of
the corpus, then `"<opener> <title of p> <2 to 5 consecutive words of p's gloss>?"` with the
opener one of `OPENERS` ("what is", "where is", ...): question-like, with the stop-word
tokens a real question has (and whose long posting lists the sparse search must walk).

Tokens. SmolLM2-135M-Instruct's tokenizer, read from the GGUF metadata only
(`jaxsearch.models.gguf.load_gguf_tokenizer(smollm2_path())`, no weights), V = 49,152.
Passages are truncated to `--max_passage_tokens` tokens, queries to `--max_query_tokens`;
queries are right-padded with the pad id to [Q, L] with a mask. Ignored ids (never counted,
by (a), (b) or (c)): pad, bos, eos and every special added token (ids 0-16 for SmolLM2);
(b) gets each document / query without them.

Timing. Per corpus size: every index is built once cold (`index_build_first_s`: for (a) and
(c) this includes compiling their jnp operations for the new shapes) and then `--repeats`
times warm, interleaved (a, b, c, a, b, c, ...); `index_build_s` is the median of the warm
builds. Each search program of (a) / (c) is compiled ahead of time (`compile_s`: `lower` +
`compile`, excluded from q/s); then `--repeats` rounds, each timing one pass over all the
queries by every retriever (the order rotated each round); `search_s` is the median pass and
`qps = num_queries / search_s`. A pass of (a) / (c) dispatches every batch of pre-placed
device arrays (the last batch padded with empty queries) and brings the ids and scores to
the host (numpy). The build of (b) includes its string -> id vocabulary; the string lists
themselves, like (a)'s packed [M, L] token array, are made before timing. On CPU XLA uses
all cores for (a) / (c); bm25s uses one thread (`cpu_count`, `load_average_1m` are reported).

Index bytes: (a) the sum of `nbytes` of the `SparseBM25Index` arrays (starts, docs, weights,
absent, doc_len, dense_row, dense_weights: `8 * nnz + 12 * V + 4 * M + 4 * H * M` plus one
padding posting, nnz the postings of the terms without a dense row, H the dense rows); (b) the sum of
`nbytes` of the numpy arrays in `retriever.scores` (data, indices, indptr); (c) `4 * V * M`.

Agreement with bm25s (rows of (a) and (c)): `top3_set_equal_fraction`, the fraction of
queries whose set of top-3 ids equals bm25s's (ties, e.g. duplicated glosses, may order
differently: (a)/(c) break ties toward the lower id, bm25s's `argpartition` does not);
`max_rel_score_diff`, the largest `|s - s_bm25s| / max(|s_bm25s|, 1e-6)` over the queries'
three best scores (sorted, so ties do not matter); `scores_agree` when it is <= 1e-4.
Rows of (a) also report the work of its loops: `loop_steps_per_batch` (mean over batches of
the sum over the batch's queries of ceil(the query's postings / block): each query runs its
own `fori_loop`) and `live_posting_fraction` (postings read / `block * steps` gather slots;
only a query's last step is padded): a small block pays the loop's per-step cost more often,
a large one pads more of the queries made of rare tokens.

Output (stdout, and `--json OUT`): `{"device", "backend", "jax_version", "bm25s_version",
"tokenizer", "vocab_size", "ignore_ids", "k", "num_queries", "batch", "repeats", "blocks",
"sizes", "max_passage_tokens", "max_query_tokens", "dense_max_gb", "smoke", "seed",
"cpu_count", "load_average_1m", "tokenize_s", "wall_s", "rows", "ratios"}`. `rows`: one per
(size, system, block) with `num_docs`, `system`, `block` (None for (b) / (c)),
`mean_doc_tokens`, `mean_query_tokens`, `nnz`, `dense_rows` and `dense_postings` (a: the
(term, document) pairs its dense rows hold; with `nnz`, bm25s's non-zeros), `index_bytes`, `index_build_s`,
`index_build_first_s`, `compile_s`, `search_s`, `search_all_s`, `qps` and the agreement
fields. `ratios`: one per size, `sparse_best_block` (the block with the highest q/s),
`sparse_over_bm25s_qps` (that block's q/s over bm25s's), `sparse_over_bm25s_bytes`, and where
(c) ran `dense_over_bm25s_qps`.

Usage:
  python benchmarks/bm25_search.py [--sizes 1000,10000,100000] [--queries 256] [--batch 64]
      [--blocks 256,1024,4096] [--repeats 3] [--dense_max_gb 2] [--json OUT] [--smoke]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DISABLE_TQDM", "1")

import bm25s  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxsearch.data.wordnet import load_wordnet_entities  # noqa: E402
from jaxsearch.metrics import write_json  # noqa: E402
from jaxsearch.models.gguf import load_gguf_tokenizer, smollm2_path  # noqa: E402
from jaxsearch.retrieval import bm25  # noqa: E402

K = 3
OPENERS = ("what is", "where is", "who was", "tell me about", "which", "when was")
SCORE_RTOL = 1e-4
SMOKE = dict(sizes=(200, 1000), queries=32, repeats=1, blocks=(1024,), batch=16)


def _ints(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(x) for x in text.replace(" ", ",").split(",") if x)
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from e
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected ints >= 1, got {text!r}")
  return values


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def make_passages(num: int, seed: int) -> list[tuple[str, str]]:
  """`num` (title, gloss text) passages: the WordNet entities, then mixtures of 2-5 glosses."""
  entities = load_wordnet_entities()
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(entities))
  passages = [(entities[i].title, entities[i].text) for i in order[:num]]
  while len(passages) < num:
    picks = rng.choice(len(entities), size=int(rng.integers(2, 6)), replace=False)
    passages.append((entities[picks[0]].title, " ".join(entities[i].text for i in picks)))
  return passages


def passage_text(title: str, text: str) -> str:
  return f'"{title}"\n{text}'


def make_queries(passages: Sequence[tuple[str, str]], num: int, seed: int) -> list[str]:
  """Question-like queries: an opener, a random passage's title, a few of its gloss words."""
  rng = np.random.default_rng([seed, len(passages)])
  out = []
  for _ in range(num):
    title, text = passages[int(rng.integers(len(passages)))]
    words = text.split()
    n = int(rng.integers(2, 6))
    start = int(rng.integers(max(1, len(words) - n + 1)))
    opener = OPENERS[int(rng.integers(len(OPENERS)))]
    out.append(f"{opener} {title} {' '.join(words[start:start + n])}?")
  return out


def encode_all(tokenizer, texts: Sequence[str], max_len: int) -> list[np.ndarray]:
  """Token ids of each text (`tokenizer.encode`, batched through its `tokenizers` backend)."""
  encodings = tokenizer.backend.encode_batch(list(texts), add_special_tokens=False)
  out = [np.asarray(e.ids[:max_len], np.int32) for e in encodings]
  for text, ids in zip(texts[:8], out):          # the batch path is `encode`'s
    assert ids.tolist() == tokenizer.encode(text)[:max_len]
  return out


def ignored_ids(tokenizer) -> tuple[int, ...]:
  """pad / bos / eos and every special added token of the tokenizer."""
  special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
  return tuple(sorted(special | {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}))


def pad_queries(queries: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  width = max(1, max(len(q) for q in queries))
  tokens = np.full((len(queries), width), pad_id, np.int32)
  mask = np.zeros((len(queries), width), bool)
  for i, q in enumerate(queries):
    tokens[i, :len(q)] = q
    mask[i, :len(q)] = True
  return tokens, mask


def as_strings(ids: np.ndarray, ignore: frozenset[int]) -> list[str]:
  return [f"t{t}" for t in ids.tolist() if t not in ignore]


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def agreement(ids: np.ndarray, scores: np.ndarray, ref_ids: np.ndarray,
              ref_scores: np.ndarray) -> dict[str, Any]:
  same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(ids, ref_ids)]
  s = np.sort(np.asarray(scores, np.float64), axis=1)
  r = np.sort(np.asarray(ref_scores, np.float64), axis=1)
  rel = float(np.max(np.abs(s - r) / np.maximum(np.abs(r), 1e-6)))
  return {"top3_set_equal_fraction": float(np.mean(same)), "max_rel_score_diff": rel,
          "scores_agree": bool(rel <= SCORE_RTOL)}


def loop_work(starts: np.ndarray, batches: Sequence[tuple[np.ndarray, np.ndarray]],
              vocab: int, ignore: tuple[int, ...], block: int) -> dict[str, float]:
  """The sparse search's `fori_loop` trip counts and the live share of its gather slots."""
  steps, live, slots = [], 0, 0
  for tokens, mask in batches:
    valid = mask & (tokens >= 0) & (tokens < vocab) & ~np.isin(tokens, ignore)
    term = np.where(valid, tokens, 0)
    df = np.where(valid, starts[term + 1] - starts[term], 0)
    trip = int(((df.sum(axis=1) + block - 1) // block).sum())   # each query its own loop
    steps.append(trip)
    live += int(df.sum())
    slots += trip * block
  return {"loop_steps_per_batch": float(np.mean(steps)),
          "live_posting_fraction": live / slots if slots else 0.0}


def bench_size(num_docs: int, passages: Sequence[tuple[str, str]],
               passage_ids: Sequence[np.ndarray], tokenizer, args) -> list[dict[str, Any]]:
  vocab, pad = tokenizer.vocab_size, tokenizer.pad_id
  ignore = ignored_ids(tokenizer)
  ignore_set = frozenset(ignore)
  docs = passage_ids[:num_docs]
  queries = encode_all(tokenizer, make_queries(passages[:num_docs], args.queries, args.seed),
                       args.max_query_tokens)
  q_tokens, q_mask = pad_queries(queries, pad)
  num_q = len(queries)
  batch = min(args.batch, num_q)
  num_batches = -(-num_q // batch)
  padded = num_batches * batch
  q_tokens_p = np.concatenate([q_tokens, np.full((padded - num_q, q_tokens.shape[1]), pad,
                                                 np.int32)])
  q_mask_p = np.concatenate([q_mask, np.zeros((padded - num_q, q_mask.shape[1]), bool)])
  host_batches = [(q_tokens_p[i:i + batch], q_mask_p[i:i + batch])
                  for i in range(0, padded, batch)]
  dev_batches = [(jnp.asarray(t), jnp.asarray(m)) for t, m in host_batches]

  counted = [sum(t not in ignore_set for t in d.tolist()) for d in docs]
  common = {"num_docs": num_docs, "num_queries": num_q, "batch": batch,
            "mean_doc_tokens": float(np.mean(counted)),
            "mean_query_tokens": float(np.mean([sum(t not in ignore_set for t in q.tolist())
                                                for q in queries]))}
  corpus = bm25.tokenize_corpus(docs, pad_id=pad, max_len=args.max_passage_tokens)
  str_docs = [as_strings(d, ignore_set) for d in docs]
  str_queries = [as_strings(q, ignore_set) for q in queries]
  dense_bytes = 4 * vocab * num_docs
  run_dense = dense_bytes <= args.dense_max_gb * 1e9

  # ---- builds: one cold, then `repeats` warm, interleaved ----
  def build_sparse():
    return jax.block_until_ready(
        bm25.build_sparse_bm25_index(corpus, vocab, ignore_ids=ignore))

  def build_bm25s():
    retriever = bm25s.BM25()
    retriever.index(str_docs, show_progress=False)
    return retriever

  dense_build = jax.jit(bm25.build_bm25_index, static_argnums=(1,),
                        static_argnames="ignore_ids")

  def build_dense():
    return jax.block_until_ready(dense_build(corpus, vocab, ignore_ids=ignore))

  builders = {"jaxsearch_sparse": build_sparse, "bm25s": build_bm25s}
  if run_dense:
    builders["jaxsearch_dense"] = build_dense
  built, first_s, warm_s = {}, {}, {name: [] for name in builders}
  for name, fn in builders.items():
    built[name], first_s[name] = _timed(fn)
  for _ in range(args.repeats):
    for name, fn in builders.items():
      built.pop(name)
      gc.collect()
      built[name], t = _timed(fn)
      warm_s[name].append(t)
  sparse, retriever = built["jaxsearch_sparse"], built["bm25s"]
  dense = built.get("jaxsearch_dense")
  sparse_bytes = int(sum(np.asarray(a).nbytes for a in sparse))
  bm25s_bytes = int(sum(v.nbytes for v in retriever.scores.values()
                        if isinstance(v, np.ndarray)))
  nnz = int(np.asarray(sparse.starts)[-1])
  dense_rows = int(sparse.dense_weights.shape[0])
  # (term, document) pairs held by the dense rows (lucene weights are > 0 where a term occurs)
  dense_postings = int(np.count_nonzero(np.asarray(sparse.dense_weights)))

  # ---- search programs, compiled ahead of time ----
  sparse_jit = jax.jit(bm25.sparse_bm25_search, static_argnames=("k", "ignore_ids", "block"))
  compiled, compile_s = {}, {}
  for block in args.blocks:
    name = f"sparse_{block}"
    compiled[name], compile_s[name] = _timed(lambda b=block: sparse_jit.lower(
        sparse, *dev_batches[0], k=K, ignore_ids=ignore, block=b).compile())
  if run_dense:
    def dense_search(index, tokens, mask):
      bags = bm25.query_bag(tokens, mask, vocab, ignore_ids=ignore)
      return bm25.bm25_search(index, bags, K)
    compiled["dense"], compile_s["dense"] = _timed(
        lambda: jax.jit(dense_search).lower(dense, *dev_batches[0]).compile())

  def device_pass(fn, index):
    outs = [fn(index, t, m) for t, m in dev_batches]
    ids = np.concatenate([np.asarray(i) for i, _ in outs])[:num_q]
    scores = np.concatenate([np.asarray(s) for _, s in outs])[:num_q]
    return ids, scores

  passes = {f"sparse_{b}": (lambda b=b: device_pass(compiled[f"sparse_{b}"], sparse))
            for b in args.blocks}
  passes["bm25s"] = lambda: retriever.retrieve(
      str_queries, k=K, show_progress=False, n_threads=0, backend_selection="numpy")
  if run_dense:
    passes["dense"] = lambda: device_pass(compiled["dense"], dense)
  names = list(passes)
  results, times = {}, {name: [] for name in names}
  for r in range(args.repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      results[name], t = _timed(passes[name])
      times[name].append(t)
  ref_ids, ref_scores = (np.asarray(a) for a in results["bm25s"])

  def speed(name):
    s = statistics.median(times[name])
    return {"search_s": s, "search_all_s": times[name], "qps": num_q / s}

  rows = []
  starts = np.asarray(sparse.starts)
  for block in args.blocks:
    name = f"sparse_{block}"
    rows.append({
        **common, "system": "jaxsearch_sparse", "block": block, "nnz": nnz, "dense_rows": dense_rows,
        "dense_postings": dense_postings,
        "index_bytes": sparse_bytes, "index_build_s": statistics.median(warm_s[
            "jaxsearch_sparse"]), "index_build_first_s": first_s["jaxsearch_sparse"],
        "compile_s": compile_s[name], **speed(name),
        **agreement(*results[name], ref_ids, ref_scores),
        **loop_work(starts, host_batches, vocab, ignore, block)})
  rows.append({
      **common, "system": "bm25s", "block": None, "nnz": int(retriever.scores["data"].size),
      "index_bytes": bm25s_bytes, "index_build_s": statistics.median(warm_s["bm25s"]),
      "index_build_first_s": first_s["bm25s"], **speed("bm25s")})
  if run_dense:
    rows.append({
        **common, "system": "jaxsearch_dense", "block": None, "index_bytes": dense_bytes,
        "index_build_s": statistics.median(warm_s["jaxsearch_dense"]),
        "index_build_first_s": first_s["jaxsearch_dense"], "compile_s": compile_s["dense"],
        **speed("dense"), **agreement(*results["dense"], ref_ids, ref_scores)})
  else:
    rows.append({
        **common, "system": "jaxsearch_dense", "block": None,
        "skipped": (f"a dense [V={vocab}, M={num_docs}] float32 index needs {dense_bytes} "
                    f"bytes, over --dense_max_gb {args.dense_max_gb} GB"),
        "index_bytes_needed": dense_bytes})
  return rows


def ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  out = []
  for size in dict.fromkeys(r["num_docs"] for r in rows):
    at = [r for r in rows if r["num_docs"] == size]
    best = max((r for r in at if r["system"] == "jaxsearch_sparse"), key=lambda r: r["qps"])
    ref = next(r for r in at if r["system"] == "bm25s")
    entry = {"num_docs": size, "sparse_best_block": best["block"],
             "sparse_over_bm25s_qps": best["qps"] / ref["qps"],
             "sparse_over_bm25s_bytes": best["index_bytes"] / ref["index_bytes"],
             "sparse_over_bm25s_build_s": best["index_build_s"] / ref["index_build_s"]}
    dense = next(r for r in at if r["system"] == "jaxsearch_dense")
    if "qps" in dense:
      entry["dense_over_bm25s_qps"] = dense["qps"] / ref["qps"]
    out.append(entry)
  return out


def run_benchmark(args) -> dict[str, Any]:
  t_start = time.perf_counter()
  load_before = os.getloadavg()[0]
  tokenizer = load_gguf_tokenizer(smollm2_path())
  passages = make_passages(max(args.sizes), args.seed)
  passage_ids, tokenize_s = _timed(lambda: encode_all(
      tokenizer, [passage_text(*p) for p in passages], args.max_passage_tokens))
  rows = []
  for size in args.sizes:
    rows.extend(bench_size(size, passages, passage_ids, tokenizer, args))
  return {
      "device": str(jax.devices()[0]), "backend": jax.default_backend(),
      "jax_version": jax.__version__, "bm25s_version": bm25s.__version__,
      "tokenizer": "SmolLM2-135M-Instruct (GGUF metadata)",
      "vocab_size": tokenizer.vocab_size, "ignore_ids": list(ignored_ids(tokenizer)), "k": K,
      "num_queries": args.queries, "batch": args.batch, "repeats": args.repeats,
      "blocks": list(args.blocks), "sizes": list(args.sizes),
      "max_passage_tokens": args.max_passage_tokens,
      "max_query_tokens": args.max_query_tokens, "dense_max_gb": args.dense_max_gb,
      "smoke": bool(args.smoke), "seed": args.seed, "cpu_count": os.cpu_count(),
      "load_average_1m": [load_before, os.getloadavg()[0]], "tokenize_s": tokenize_s,
      "wall_s": time.perf_counter() - t_start, "rows": rows, "ratios": ratios(rows)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None, help="also write the result here")
  parser.add_argument("--sizes", type=_ints, default=(1_000, 10_000, 100_000),
                      help="corpus sizes M, comma-separated")
  parser.add_argument("--queries", type=int, default=256)
  parser.add_argument("--batch", type=int, default=64, help="queries per jitted call")
  parser.add_argument("--blocks", type=_ints, default=(256, 1024, 4096),
                      help="posting block sizes of the sparse search, comma-separated")
  parser.add_argument("--repeats", type=int, default=3, help="warm repeats (median)")
  parser.add_argument("--max_passage_tokens", type=int, default=128)
  parser.add_argument("--max_query_tokens", type=int, default=32)
  parser.add_argument("--dense_max_gb", type=float, default=2.0,
                      help="run the dense index only where 4*V*M bytes is at most this")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true",
                      help="sizes 200,1000, 32 queries in batches of 16, 1 repeat, block 256")
  args = parser.parse_args(argv)
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value)
  for key in ("queries", "batch", "repeats", "max_passage_tokens", "max_query_tokens"):
    if getattr(args, key) < 1:
      parser.error(f"--{key} must be >= 1")
  if min(args.sizes) < K:
    parser.error(f"--sizes must be >= k={K}")
  result = run_benchmark(args)
  print(json.dumps(result, indent=2, sort_keys=True))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
