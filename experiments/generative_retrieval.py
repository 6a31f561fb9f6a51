r"""The generative-retrieval table: DSI with each docID kind on the world and on WordNet, next
to BM25 and MiniLM on the same queries.

Each row is one launcher run (`python -m experiments.run` with `gin/experiments/dsi_world.gin`
or `dsi_wordnet.gin` and a few bindings, into `--runs_dir/<row>`); this script runs the rows
whose workdir has no `summary.json` yet (with `--run`; a row killed by `--timeout_s` resumes
from its checkpoints next time) or only reads the finished ones, prints one JSON row per
system, and writes a markdown table (`--markdown`) with the command of every row.

Rows (`ROWS`): world x {atomic, naive, semantic, rq, hypernym}, world atomic with template /
generated pseudo-queries and with a DDRO stage, WordNet (1,000 entities) x {atomic, naive,
semantic, rq, hypernym}, WordNet atomic with template / generated pseudo-queries. Each row
averages the runs of its seeds (`Row.seeds`: 3 for the world's docID rows, 2 for WordNet's,
1 for the others; `--seeds` overrides; seed n > 0 runs into `<row>_seed<n>` with `SEED = n`,
which reseeds the world / WordNet subset as well as training). Columns:
recall@1 / recall@10 / mrr@10 of trie-constrained beam search with the largest beam (20) on
seen and unseen queries, unseen recall@1 of free (unconstrained)
decoding and how often its top output is not a docID, and single-query latency per beam size.
The BM25 and MiniLM rows of a corpus come from its first finished run (they do not depend on
the DSI settings).

Example:
  python -m experiments.generative_retrieval --run --rows world_atomic,world_semantic \
      --timeout_s 330                                      # runs them, then writes the table
  python -m experiments.generative_retrieval               # reads every finished row
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, NamedTuple, Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RUNS_DIR = "runs/generative_retrieval"
DEFAULT_MARKDOWN = "docs/generative/table.md"
MEASURES = ("recall@1", "recall@10", "mrr@10")


class Row(NamedTuple):
  name: str                       # workdir name under --runs_dir
  corpus: str                     # "world" | "wordnet"
  docid: str
  bindings: tuple[str, ...] = ()  # extra gin bindings
  note: str = ""
  seeds: tuple[int, ...] = (0,)   # SEED values averaged in the table (unless --seeds)


WORLD_SEEDS = (0, 1, 2)   # the docID comparison rows; unseen R@1 varies by ~0.02-0.13 over seeds
WORDNET_SEEDS = (0, 1)


DOCID_KINDS = ("atomic", "naive", "semantic", "rq", "hypernym")


def docid_rows(corpus: str, seeds: tuple[int, ...], hypernym_note: str) -> tuple[Row, ...]:
  """One row per docID kind on `corpus`, plain DSI (no pseudo-queries, no DDRO)."""
  return tuple(Row(f"{corpus}_{kind}", corpus, kind, seeds=seeds,
                   note=hypernym_note if kind == "hypernym" else "") for kind in DOCID_KINDS)


ROWS = (
    *docid_rows("world", WORLD_SEEDS, "document type, then index"),
    Row("world_atomic_templates", "world", "atomic", ('PSEUDO_QUERIES = "templates"',),
        note="oracle pseudo-queries: test wording"),
    Row("world_atomic_generated", "world", "atomic", ('PSEUDO_QUERIES = "generated"',),
        note="doc2query pseudo-queries"),
    Row("world_atomic_ddro", "world", "atomic", ("DDRO_STEPS = 100",), note="+ DDRO"),
    *docid_rows("wordnet", WORDNET_SEEDS, "WordNet hypernym path"),
    Row("wordnet_atomic_templates", "wordnet", "atomic", ('PSEUDO_QUERIES = "templates"',),
        note="oracle pseudo-queries: the entities' own queries"),
    Row("wordnet_atomic_generated", "wordnet", "atomic", ('PSEUDO_QUERIES = "generated"',),
        note="doc2query pseudo-queries"),
)
GIN_FILES = {"world": "gin/experiments/dsi_world.gin",
             "wordnet": "gin/experiments/dsi_wordnet.gin"}


def workdir_name(row: Row, seed: int) -> str:
  """`<row>` for seed 0 (the first runs had no seed suffix), `<row>_seed<n>` otherwise."""
  return row.name if seed == 0 else f"{row.name}_seed{seed}"


def command(row: Row, runs_dir: str, seed: int = 0) -> list[str]:
  """The launcher command of a row (MiniLM embeddings shared under `runs_dir/embeddings`).

  SEED seeds everything: the world (or the WordNet subset and split), initialisation, batch
  order and the docID k-means, so seeds differ in data as well as in training noise.
  """
  bindings = [f'DOCID = "{row.docid}"', *row.bindings,
              f'EMBEDDING_CACHE = "{os.path.join(runs_dir, "embeddings")}"']
  if seed:
    bindings.append(f"SEED = {seed}")
  return [sys.executable, "-m", "experiments.run", f"--gin_file={GIN_FILES[row.corpus]}",
          *(f"--gin_bindings={b}" for b in bindings),
          f"--workdir={os.path.join(runs_dir, workdir_name(row, seed))}"]


def shell_command(row: Row, runs_dir: str, seed: int = 0) -> str:
  cmd = command(row, runs_dir, seed)
  return " ".join(["python", *(shlex.quote(c) for c in cmd[1:])])


def read_summary(row: Row, runs_dir: str, seed: int = 0) -> dict[str, Any] | None:
  path = os.path.join(runs_dir, workdir_name(row, seed), "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_row(row: Row, runs_dir: str, timeout_s: float | None, seed: int = 0) -> float:
  """Runs a row's command from the repository root; returns its wall time in seconds."""
  start = time.time()
  try:
    subprocess.run(command(row, runs_dir, seed), cwd=REPO_ROOT, check=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    print(f"[{workdir_name(row, seed)}] stopped after {timeout_s:.0f}s; run again to resume",
          flush=True)
  return time.time() - start


def json_rows(row: Row, s: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
  """One JSON row for the DSI system of a run (largest beam, constrained)."""
  top = max(s["beam_sizes"])
  final = s["final_system"]
  out = {"row": row.name, "seed": seed, "corpus": row.corpus, "system": f"dsi-{row.docid}",
         "note": row.note, "docid_length": s["docid_length"], "num_codes": s["num_codes"],
         "num_docs": s["num_docs"], "num_params": s["num_params"], "steps": s["steps"],
         "ddro_steps": s["ddro_steps"], "pseudo_queries": s["pseudo_queries"],
         "train_seconds": round(s["train_seconds"] + s.get("qgen_train_seconds", 0.0)
                                + s.get("ddro_seconds", 0.0), 1),
         "dsi_seconds": round(s["train_seconds"], 1),
         "wall_seconds": round(s["wall_seconds"], 1), "beam": top}
  for split in ("seen", "unseen"):
    for m in MEASURES:
      out[f"{split}_{m}"] = s[f"{split}_gr_{m}"]
  out["unseen_free_recall@1"] = s[f"unseen_{final}_free_beam{top}_recall@1"]
  out["unseen_free_invalid"] = s[f"unseen_{final}_free_beam{top}_invalid"]
  out["pseudo_unseen_coverage"] = s.get("pseudo_unseen_coverage", 0.0)
  for beam in s["beam_sizes"]:
    key = f"latency_ms_{final}_beam{beam}"
    if key in s:
      out[f"latency_ms_beam{beam}"] = s[key]
  if final == "ddro":
    for m in MEASURES:
      out[f"unseen_before_ddro_{m}"] = s[f"unseen_dsi_beam{top}_{m}"]
  return [out]


def baseline_rows(corpus: str, s: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
  rows = []
  for system in ("bm25", "minilm"):
    if f"unseen_{system}_recall@1" not in s:
      continue
    row = {"row": f"{corpus}_{system}", "seed": seed, "corpus": corpus, "system": system,
           "num_docs": s["num_docs"]}
    for split in ("seen", "unseen"):
      for m in MEASURES:
        row[f"{split}_{m}"] = s[f"{split}_{system}_{m}"]
    if f"latency_ms_{system}" in s:
      row["latency_ms"] = s[f"latency_ms_{system}"]
    rows.append(row)
  return rows


def _f(x: Any, digits: int = 3) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def mean_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The seeds' rows of one system as one row: numbers averaged (`<key>_std`: their sample
  standard deviation when there are two or more), other fields from the first, `seeds`: how
  many."""
  out: dict[str, Any] = dict(rows[0])
  for key, value in rows[0].items():
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "seed":
      values = [r[key] for r in rows if r.get(key) is not None]
      out[key] = float(np.mean(values))
      if len(values) > 1:
        out[f"{key}_std"] = float(np.std(values, ddof=1))
  out["seeds"] = len(rows)
  return out


def _pm(j: dict[str, Any], key: str) -> str:
  """mean, with ± the seeds' standard deviation when there are several."""
  std = j.get(f"{key}_std")
  return _f(j[key]) + ("" if std is None else f" ± {std:.3f}")


def markdown(results: Sequence[tuple[Row, dict[int, dict[str, Any]]]],
             baselines: dict[str, list[dict]], runs_dir: str,
             missing: Sequence[tuple[Row, int]]) -> str:
  """The table, its notes and the command of every row."""
  lines = [
      "# Generative retrieval: DSI docIDs vs BM25 and MiniLM",
      "",
      "Written by `python -m experiments.generative_retrieval` from the `summary.json` of each "
      "row's workdir (commands below). Beam search is trie-constrained with the largest beam "
      "(20); *free* is unconstrained decoding (its *invalid* column: the fraction of queries "
      "whose top output is not a docID). *train s*: training wall time (doc2query, DSI and "
      "DDRO stages); *wall s*: the whole run (data, docIDs, training, evaluation, baselines). "
      "*seen* queries were trained on; *unseen* queries "
      "(world: test-split questions; WordNet: test entities' name / description queries) "
      "never were, but their documents are indexed. Latency: median of single-query jitted "
      "calls after compiling (ms, constrained), on the machine that ran the row (2 shared "
      "CPU cores for the measured rows). BM25 / MiniLM latency: one query through "
      "`bm25.search` / MiniLM embedding + exact search. *seeds*: runs averaged (SEED = 0, 1, "
      "...; a seed changes the world or the WordNet subset and split as well as the "
      "initialisation and batch order); with several, unseen R@1 is mean ± the seeds' "
      "standard deviation and the other columns are means.",
      "",
      "| corpus | system | seeds | docID len | K | seen R@1 | seen R@10 | seen MRR@10 | "
      "unseen R@1 | unseen R@10 | unseen MRR@10 | free R@1 (invalid) | "
      "latency ms b1 / b10 / b20 | train s | wall s | note |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for corpus in ("world", "wordnet"):
    for b in baselines.get(corpus, []):
      lines.append(
          f"| {corpus} | {b['system']} | {b['seeds']} | – | – | {_f(b['seen_recall@1'])} | "
          f"{_f(b['seen_recall@10'])} | {_f(b['seen_mrr@10'])} | {_pm(b, 'unseen_recall@1')} | "
          f"{_f(b['unseen_recall@10'])} | {_f(b['unseen_mrr@10'])} | – | "
          f"{_f(b.get('latency_ms'), 2)} | – | – | |")
    for row, by_seed in results:
      if row.corpus != corpus:
        continue
      j = mean_rows([json_rows(row, s, seed)[0] for seed, s in sorted(by_seed.items())])
      lat = " / ".join(_f(j.get(f"latency_ms_beam{b}"), 2) for b in (1, 10, 20))
      note = row.note
      if j["pseudo_queries"] != "none":
        note += f"; unseen queries among pseudo-queries: {j['pseudo_unseen_coverage']:.2f}"
      if j["ddro_steps"]:
        note += (f"; unseen R@1 before DDRO {j['unseen_before_ddro_recall@1']:.3f}")
      lines.append(
          f"| {corpus} | DSI {row.docid} | {j['seeds']} | {j['docid_length']:.0f} | "
          f"{j['num_codes']:.0f} | "
          f"{_f(j['seen_recall@1'])} | {_f(j['seen_recall@10'])} | {_f(j['seen_mrr@10'])} | "
          f"{_pm(j, 'unseen_recall@1')} | {_f(j['unseen_recall@10'])} | "
          f"{_f(j['unseen_mrr@10'])} | {_f(j['unseen_free_recall@1'])} "
          f"({_f(j['unseen_free_invalid'], 2)}) | {lat} | {j['train_seconds']:.0f} | "
          f"{j['wall_seconds']:.0f} | {note.strip('; ')} |")
  lines += [
      "",
      "Notes:",
      "",
      "- Every world question names its subject, and the relevant passage is the short "
      "passage about that subject, which starts with the name: lexical and dense retrievers "
      "are near perfect there (BM25 / MiniLM rows). The world measures whether a DSI model "
      "maps a query to the docID it indexed for a passage, not retrieval difficulty.",
      "- Seen queries are training examples: their recall measures memorisation.",
      "- *templates* pseudo-queries write every question a passage answers with the world's "
      "own question templates, which for test-split entities are the unseen queries "
      "themselves (an oracle query generator); *generated* ones come from a small doc2query "
      "model trained on the train split only (`jaxsearch/generative/doc2query.py`).",
      "- DDRO: the pairwise loss of `jaxsearch.losses.preference.dpo_loss` on the seen "
      "queries' relevant docID vs a BM25 hard negative, with the DSI model as the frozen "
      "reference.",
  ]
  lines += ["", "Commands (from the repository root; seed n > 0 adds `--gin_bindings=SEED = n` "
            "and the workdir suffix `_seed<n>`, or run "
            "`python -m experiments.generative_retrieval --run --seeds 0,1,2`):", ""]
  for row, _ in results:
    lines.append(f"- `{row.name}`: `{shell_command(row, runs_dir)}`")
  if missing:
    lines += ["", "Not run yet: " + ", ".join(
        f"`{workdir_name(r, seed)}` (`{shell_command(r, runs_dir, seed)}`)"
        for r, seed in missing)]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs_dir", default=DEFAULT_RUNS_DIR)
  parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
  parser.add_argument("--run", action="store_true", help="run rows without a summary.json")
  parser.add_argument("--timeout_s", type=float, default=None, help="stop a row after this")
  parser.add_argument("--seeds", default="",
                      help="comma-separated seeds (SEED macro) for every row (default: each "
                           "row's own `Row.seeds`); a row's seeds are averaged")
  parser.add_argument("--markdown", default=DEFAULT_MARKDOWN, help="write the table here")
  parser.add_argument("--json", default=None, help="also write the JSON rows here")
  args = parser.parse_args(argv)
  names = [r.name for r in ROWS]
  wanted = [n for n in args.rows.split(",") if n] or names
  unknown = [n for n in wanted if n not in names]
  if unknown:
    parser.error(f"unknown rows {unknown}; known: {names}")
  try:
    seeds = [int(x) for x in args.seeds.split(",") if x]
  except ValueError:
    parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
  if (args.seeds and not seeds) or any(x < 0 for x in seeds):
    parser.error(f"--seeds needs one or more seeds >= 0, got {args.seeds!r}")
  rows = [r for r in ROWS if r.name in wanted]
  results: list[tuple[Row, dict[int, dict[str, Any]]]] = []
  missing: list[tuple[Row, int]] = []
  for row in rows:
    by_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds or row.seeds:
      summary = read_summary(row, args.runs_dir, seed)
      if summary is None and args.run:
        name = workdir_name(row, seed)
        print(f"[{name}] {shell_command(row, args.runs_dir, seed)}", flush=True)
        seconds = run_row(row, args.runs_dir, args.timeout_s, seed)
        print(f"[{name}] {seconds:.0f}s", flush=True)
        summary = read_summary(row, args.runs_dir, seed)
      if summary is None:
        missing.append((row, seed))
      else:
        by_seed[seed] = summary
    if by_seed:
      results.append((row, by_seed))
  out: list[dict[str, Any]] = []
  per_seed_baselines: dict[str, dict[int, list[dict]]] = {}
  for row, by_seed in results:
    for seed, s in sorted(by_seed.items()):
      per_corpus = per_seed_baselines.setdefault(row.corpus, {})
      if seed not in per_corpus:
        per_corpus[seed] = baseline_rows(row.corpus, s, seed)
        out += per_corpus[seed]
      out += json_rows(row, s, seed)
  baselines: dict[str, list[dict]] = {}
  for corpus, per_corpus in per_seed_baselines.items():
    systems: dict[str, list[dict]] = {}
    for seed_rows in per_corpus.values():
      for b in seed_rows:
        systems.setdefault(b["system"], []).append(b)
    baselines[corpus] = [mean_rows(v) for v in systems.values()]
  for r in out:
    print(json.dumps(r), flush=True)
  if args.markdown:
    os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(markdown(results, baselines, args.runs_dir, missing))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
