r"""Masked-diffusion docID decoding (DiffuGR-style) on the embedded world: recall and latency
against the number of denoising steps T.

Corpus: the documents of `build_world(WorldConfig(seed))` (448 passages by default).
Heads (`--heads DOCIDS:WEIGHTING,...`, weighting "mean" or "elbo", see
`jaxsearch.generative.diffusion`); DocIDs from GR-core's builders:
  naive     `naive_docids(N)`: the row's 3 decimal digits (K = 10, L = 4 slots);
  semantic  `semantic_docids(emb, k=10, c=10)`: DSI hierarchical k-means of all-MiniLM-L6-v2
            embeddings of the document texts (K = 10, docIDs of 3-4 codes, L = 5 slots);
            `--embeddings tfidf` uses L2-normalised tf-idf vectors of the tokenizer's pieces
            instead (no model needed).
Tokenizer: sentencepiece BPE trained on the world texts and questions (as
`jaxsearch.programs.search_agent.experiment.setup`).
Training examples: every document text -> its docID (indexing) and every train-split question
-> each of its supporting documents (retrieval; a 2-hop question gives two examples). The
head (`jaxsearch.generative.diffusion`) is trained for `--steps` AdamW steps (stopping early
after `--train_seconds` if set).
Evaluation: seen = `--max_seen` train-split questions (drawn with `--seed`), unseen = the
test-split questions (about held-out subjects; their documents were only indexed). Relevance
labels are the supporting documents; recall@k / mrr@k / hit@1 (= mrr@1, top-1 is some
supporting document) by `jaxsearch.retrieval.metrics.evaluate`. 2-hop questions have two
supporting documents, so their recall@1 is at most 1/2.
For every T in 1..L two decodes run: greedy (S = 1 sample per query) and sampled
(S = `--samples`: sample 0 greedy, the rest Gumbel-max at `--temperature`, deduped, ranked by
summed log-prob). ms/query is the wall time of `diffusion_retrieve` (device decode + host
trie check) over all queries of the split in one batch, after a warm-up call, divided by the
number of queries. BM25 (`build_retriever("bm25")`) on the same questions is the reference.

Rows (printed as JSON lines, written as a list to `--json`):
  {"docids", "head", "split", "T", "samples", "recall@1", "recall@10", "mrr@10", "hit@1",
   "valid_fraction", "ms_per_query", "n_queries"}  plus one "train" row per docID kind
  (steps, seconds, final loss / masked-slot accuracy) and "bm25" rows.
`--doc` writes a markdown report with the tables.

Example:
  python -m experiments.generative_retrieval_diffusion \
      --heads naive:mean,semantic:mean,naive:elbo --json docs/generative/diffusion.json \
      --doc docs/generative/diffusion.md             # the report: ~4 min of CPU on 2 cores
  python -m experiments.generative_retrieval_diffusion --heads naive:elbo --json /tmp/e.json
  python -m experiments.generative_retrieval_diffusion --heads naive --steps 50 \
      --max_seen 20 --json /tmp/d.json                                     # smoke run
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from jaxsearch.data.tokenizer import SentencePieceTokenizer
from jaxsearch.data.world import World, WorldConfig, build_world
from jaxsearch.generative import diffusion as diff
from jaxsearch.generative.docids import DocIds, naive_docids, semantic_docids
from jaxsearch.generative.trie import build_trie
from jaxsearch.retrieval import metrics as metrics_lib

MEASURES = ("recall@1", "recall@10", "mrr@10", "mrr@1")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--heads", default="naive:mean,semantic:mean",
                 help="comma list of DOCIDS:WEIGHTING heads to train, DOCIDS in naive, "
                      "semantic, WEIGHTING in mean, elbo")
  p.add_argument("--embeddings", default="minilm", choices=("minilm", "tfidf"))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--vocab_size", type=int, default=1024)
  p.add_argument("--max_query_len", type=int, default=20)
  p.add_argument("--hidden_size", type=int, default=64)
  p.add_argument("--num_layers", type=int, default=2)
  p.add_argument("--num_heads", type=int, default=4)
  p.add_argument("--intermediate_size", type=int, default=256)
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--learning_rate", type=float, default=3e-3)
  p.add_argument("--train_seconds", type=float, default=0.0,
                 help="stop each head's training after this many seconds (0: run all steps; "
                      "a limit makes the result depend on the machine's load)")
  p.add_argument("--samples", type=int, default=16)
  p.add_argument("--decoding", default="free,constrained",
                 help="comma list: free (unconstrained, as DiffuGR) and/or constrained "
                      "(every commit keeps the slots a prefix-consistent docID)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--max_seen", type=int, default=200)
  p.add_argument("--json", default="")
  p.add_argument("--doc", default="")
  return p.parse_args(argv)


DECODINGS = ("free", "constrained")


def parse_decodings(decodings: str) -> list[str]:
  out = [d for d in decodings.split(",") if d]
  bad = [d for d in out if d not in DECODINGS]
  if not out or bad:
    raise ValueError(f"--decoding must be a comma list of {DECODINGS}, got {decodings!r}")
  return out


def parse_heads(heads: str) -> list[str]:
  out = []
  for head in (h.strip() for h in heads.split(",") if h.strip()):
    kind, _, weighting = head.partition(":")
    weighting = weighting or "mean"
    if kind not in ("naive", "semantic") or weighting not in diff.WEIGHTINGS:
      raise ValueError(f"--heads entries must be naive|semantic[:mean|elbo], got {head!r}")
    out.append(f"{kind}:{weighting}")
  return out


def make_docids(kind: str, world: World, tokenizer, embeddings: str, seed: int) -> DocIds:
  n = len(world.documents)
  if kind == "naive":
    return naive_docids(n)
  if kind != "semantic":
    raise ValueError(f"--docids kind must be naive or semantic, got {kind!r}")
  texts = [d.text for d in world.documents]
  if embeddings == "minilm":
    from jaxsearch.retrieval.text_encoder import minilm_text_encoder  # noqa: PLC0415
    emb = np.asarray(minilm_text_encoder()(texts), np.float64)
  else:
    counts = np.zeros((n, tokenizer.vocab_size))
    for i, t in enumerate(texts):
      np.add.at(counts[i], tokenizer.encode(t), 1.0)
    idf = np.log((1 + n) / (1 + (counts > 0).sum(0))) + 1
    emb = counts * idf
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  return semantic_docids(emb, k=10, c=10, seed=seed)


def qrels_of(questions) -> dict[str, dict[str, int]]:
  return {q.qid: {d: 1 for d in q.supporting_doc_ids} for q in questions}


def run_of(questions, docs: np.ndarray, scores: np.ndarray, doc_ids: Sequence[str]):
  return metrics_lib.run_from_arrays([q.qid for q in questions], docs, scores, doc_ids)


def measure(run, qrels) -> dict[str, float]:
  per_query = metrics_lib.evaluate(run, qrels, MEASURES, missing_as_zero=True)
  out = metrics_lib.mean_measures(per_query)
  out["hit@1"] = out.pop("mrr@1")
  return {k: round(v, 4) for k, v in out.items()}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
  t_start = time.perf_counter()
  world = build_world(WorldConfig(seed=args.seed))
  doc_ids = [d.doc_id for d in world.documents]
  texts = [*world.texts(), *(q.question for qs in world.splits.values() for q in qs)]
  tok = SentencePieceTokenizer.train(texts, vocab_size=args.vocab_size, seed=args.seed)
  train_qs = world.splits["train"]
  pick = np.random.default_rng(args.seed).permutation(len(train_qs))[:args.max_seen]
  splits = {"seen": [train_qs[i] for i in sorted(pick)], "unseen": list(world.splits["test"])}
  rows: list[dict[str, Any]] = []

  def emit(row):
    rows.append(row)
    print(json.dumps(row), flush=True)

  # Reference: BM25 over the document texts.
  from jaxsearch.retrieval.corpus import Corpus  # noqa: PLC0415
  from jaxsearch.retrieval.retriever import build_retriever  # noqa: PLC0415
  bm25 = build_retriever("bm25", Corpus(tuple(doc_ids), tuple(d.title for d in world.documents),
                                        tuple(d.text for d in world.documents)))
  for split, qs in splits.items():
    ids, scores = bm25.search([q.question for q in qs], 10)
    emit({"docids": "bm25", "split": split, **measure(run_of(qs, ids, scores, doc_ids),
                                                      qrels_of(qs)), "n_queries": len(qs)})

  # Training examples: documents (indexing) and train questions (retrieval).
  inputs = [tok.encode(d.text) for d in world.documents]
  rows_of = list(range(len(world.documents)))
  for q in train_qs:
    for d in q.supporting_doc_ids:
      inputs.append(tok.encode(q.question))
      rows_of.append(world.doc_index(d))
  q_train, m_train = diff.pad_queries(inputs, args.max_query_len)
  eval_tokens = {s: diff.pad_queries([tok.encode(q.question) for q in qs], args.max_query_len)
                 for s, qs in splits.items()}

  docid_cache: dict[str, DocIds] = {}
  for head in parse_heads(args.heads):
    kind, weighting = head.split(":")
    if kind not in docid_cache:
      docid_cache[kind] = make_docids(kind, world, tok, args.embeddings, args.seed)
    docids = docid_cache[kind]
    trie = build_trie(docids)
    config = diff.DiffusionConfig(
        text_vocab_size=tok.vocab_size, num_codes=docids.num_codes,
        num_slots=diff.slot_count(docids), max_query_len=args.max_query_len,
        hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
        intermediate_size=args.intermediate_size, weighting=weighting)
    t0 = time.perf_counter()
    params, history = diff.train_diffusion_head(
        config, q_train, m_train, np.asarray(rows_of), docids, steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.learning_rate,
        warmup_steps=min(100, args.steps // 10), seed=args.seed,
        log_every=max(1, args.steps // 10), time_budget_s=args.train_seconds or None)
    lengths = np.asarray(docids.lengths)
    emit({"docids": kind, "head": head, "split": "train", "steps": history[-1]["step"] + 1,
          "planned_steps": args.steps, "seconds": round(time.perf_counter() - t0, 1),
          "loss": round(history[-1]["loss"], 4),
          "masked_accuracy": round(history[-1]["accuracy"], 4),
          "num_codes": docids.num_codes, "num_slots": config.num_slots,
          "docid_length_mean": round(float(lengths.mean()), 2),
          "n_examples": len(rows_of), "weighting": weighting,
          "curve": [(h["step"], round(h["loss"], 3)) for h in history]})
    for split, qs in splits.items():
      q, m = eval_tokens[split]
      qrels = qrels_of(qs)
      for decoding, samples in itertools.product(parse_decodings(args.decoding),
                                                 (1, args.samples)):
        kw = dict(config=config, num_samples=samples, k=10, rng=jax.random.key(args.seed + 1),
                  temperature=args.temperature,
                  docid_targets=diff.slot_targets(docids) if decoding == "constrained"
                  else None)
        diff.diffusion_retrieve(params, q, m, trie, num_steps=1, **kw)      # compile
        for t in range(1, config.num_slots + 1):
          start = time.perf_counter()
          r = diff.diffusion_retrieve(params, q, m, trie, num_steps=t, **kw)
          ms = 1000 * (time.perf_counter() - start) / len(qs)
          emit({"docids": kind, "head": head, "split": split, "decoding": decoding, "T": t,
                "samples": samples, **measure(run_of(qs, r.docs, r.scores, doc_ids), qrels),
                "valid_fraction": round(r.valid_fraction, 4), "ms_per_query": round(ms, 3),
                "n_queries": len(qs)})
  emit({"docids": "total", "split": "wall", "seconds": round(time.perf_counter() - t_start, 1),
        "process_cpu_seconds": round(time.process_time(), 1),
        "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2)})
  return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
  out = ["# Masked-diffusion docID decoding (DiffuGR-style) on the world corpus", "",
         "Generated by `python -m experiments.generative_retrieval_diffusion "
         f"--heads {args.heads} --steps {args.steps} --train_seconds {args.train_seconds:g} "
         f"--samples {args.samples} --decoding {args.decoding}` "
         f"({platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, "
         f"jax {jax.__version__}).", "",
         "Model: `jaxsearch.generative.diffusion` head (bidirectional BERT encoder over "
         f"[question tokens] [L docID slots], d={args.hidden_size}, {args.num_layers} layers, "
         f"{args.num_heads} heads, F={args.intermediate_size}, P={args.max_query_len} query "
         f"tokens), MDLM-style masked training (AdamW lr {args.learning_rate:g}, batch "
         f"{args.batch_size}), "
         "parallel decoding, confident slots first, *free* (unconstrained, as DiffuGR) or "
         "*constrained* (a step's slots committed one at a time among the classes that keep "
         "some docID consistent; same number of forward passes); a decode counts when its "
         "codes up to END form a docID of the trie. Relevance = the world's supporting "
         "documents (2-hop questions have two, so their recall@1 <= 0.5); hit@1 = the top "
         "document is supporting. Seen = train-split questions (trained on), unseen = "
         "test-split questions (subjects never asked about in training; their documents "
         "were indexed). S = decodes per query (S = 1 greedy; S > 1: greedy + Gumbel "
         f"samples at temperature {args.temperature:g}, deduped, ranked by summed log-prob).",
         ""]
  bm = [r for r in rows if r["docids"] == "bm25"]
  if bm:
    out += ["Reference, BM25 over the document texts:", "",
            "| split | recall@1 | recall@10 | mrr@10 | hit@1 |", "|---|---|---|---|---|"]
    out += [f"| {r['split']} | {r['recall@1']} | {r['recall@10']} | {r['mrr@10']} | "
            f"{r['hit@1']} |" for r in bm]
    out.append("")
  for tr in [r for r in rows if r.get("split") == "train"]:
    head = tr["head"]
    kind, weighting = head.split(":")
    out += [f"## {kind} docIDs, {weighting} weighting", "",
            f"K = {tr['num_codes']} codes, L = {tr['num_slots']} slots (mean docID length "
            f"{tr['docid_length_mean']} + END); {tr['n_examples']} training examples; "
            f"{tr['steps']} of {tr['planned_steps']} planned steps in {tr['seconds']} s; "
            f"final batch loss {tr['loss']}, masked-slot accuracy {tr['masked_accuracy']}.", "",
            "| split | decoding | T | S | recall@1 | recall@10 | mrr@10 | hit@1 | valid | "
            "ms/query |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
      if r.get("head") == head and "T" in r:
        out.append(f"| {r['split']} | {r.get('decoding', 'free')} | {r['T']} | "
                   f"{r['samples']} | {r['recall@1']} | "
                   f"{r['recall@10']} | {r['mrr@10']} | {r['hit@1']} | "
                   f"{r['valid_fraction']} | {r['ms_per_query']} |")
    out.append("")
  tot = [r for r in rows if r["docids"] == "total"]
  if tot:
    out += [f"Total wall time {tot[0]['seconds']} s ({tot[0]['process_cpu_seconds']} s of CPU "
            f"time) on {tot[0]['device']} "
            f"(1-minute load average at the end: {tot[0]['load_avg_1m']} on "
            f"{tot[0]['cpus']} cores; timings are inflated by other jobs).", ""]
  return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  rows = run(args)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  if args.doc:
    os.makedirs(os.path.dirname(os.path.abspath(args.doc)), exist_ok=True)
    with open(args.doc, "w") as f:
      f.write(markdown(rows, args))


if __name__ == "__main__":
  main(sys.argv[1:])
