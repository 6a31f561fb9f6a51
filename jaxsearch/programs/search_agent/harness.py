"""The evaluation harness: an agent and Search-R1's two baselines on QA test sets, per dataset.

`experiments/evaluate.py` is its command line. The pieces:

- `load_datasets`: QA files (`jaxsearch.data.qa_files`: FlashRAG JSONL, Search-R1 parquet, or
  "tfds:NAME:SPLIT") become named datasets. A file whose rows carry `data_source` is split by
  it (Search-R1 evaluates its seven test sets from one merged parquet); rows without one take
  the file's name (its stem, or its directory's name when the stem is a split name such as
  `test`: FlashRAG's `nq/test.jsonl` is "nq"); `NAME=PATH` names every row of a file.
  `max_questions` keeps the first N questions of each dataset.
- `evaluate_methods`: each method ("agent", "direct", "rag"; `evaluate.evaluate`) runs once on
  every dataset's questions together, then `evaluate.dataset_metrics` splits the scores by
  dataset and averages over datasets, unweighted, as Search-R1's "Avg." column.
- `format_report`: Search-R1's table (rows = methods, columns = datasets + Avg) for exact
  match, with the paper's reference rows (`REFERENCE`) for the datasets whose names match,
  then every metric per dataset for each method.

Example:
  >>> datasets = load_datasets(["/data/test.parquet"], max_questions=100)  # doctest: +SKIP
  >>> results = evaluate_methods(exp, params, datasets, ("agent", "rag"), jax.random.key(0))  # doctest: +SKIP
  >>> print(format_report(results, datasets))  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Sequence

import jax
import numpy as np

from jaxsearch.data import qa_files
from jaxsearch.data.world import Question
from jaxsearch.programs.search_agent import evaluate as eval_lib
from jaxsearch.rewards.qa import extract_answer
from jaxsearch.types import PyTree

# Search-R1's seven test sets, in the column order of its tables.
PAPER_DATASETS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique",
                  "bamboogle")
_ALIASES = {"nq": "nq", "naturalquestions": "nq", "nqopen": "nq", "naturalquestionsopen": "nq",
            "triviaqa": "triviaqa", "tqa": "triviaqa", "popqa": "popqa", "hotpotqa": "hotpotqa",
            "2wikimultihopqa": "2wikimultihopqa", "2wiki": "2wikimultihopqa",
            "musique": "musique", "bamboogle": "bamboogle"}

# Exact match reported by Search-R1 (Jin et al., arXiv 2503.09516 v5, Tables 2-3), as quoted
# in the project's research notes; "avg" is the unweighted mean over the seven datasets. Only
# the averages of the RAG baseline are quoted there.
REFERENCE_SOURCE = "Search-R1, arXiv 2503.09516 v5, Tables 2-3 (exact match)"
REFERENCE = {
    "Search-R1 PPO, Qwen2.5-7B base": {
        "nq": 0.480, "triviaqa": 0.638, "popqa": 0.457, "hotpotqa": 0.433,
        "2wikimultihopqa": 0.382, "musique": 0.196, "bamboogle": 0.432, "avg": 0.431},
    "Search-R1 GRPO, Qwen2.5-3B base": {
        "nq": 0.421, "triviaqa": 0.583, "popqa": 0.413, "hotpotqa": 0.297,
        "2wikimultihopqa": 0.274, "musique": 0.066, "bamboogle": 0.128, "avg": 0.312},
    "RAG, Qwen2.5-7B": {"avg": 0.304},
    "RAG, Qwen2.5-3B": {"avg": 0.270},
}

SPLIT_STEMS = ("train", "dev", "test", "val", "validation")
# Columns of the per-dataset tables, in order.
REPORT_COLUMNS = ("em", "f1", "subem", "format", "searches", "support_recall", "answered")


def paper_dataset(name: str) -> str | None:
  """The Search-R1 test set a dataset name means ("NQ", "natural_questions" -> "nq"), or None.

  Example:
    >>> paper_dataset("2WikiMultihopQA"), paper_dataset("trivia_qa"), paper_dataset("mine")
    ('2wikimultihopqa', 'triviaqa', None)
  """
  return _ALIASES.get(re.sub(r"[^a-z0-9]", "", name.lower()))


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One evaluated dataset: its name, questions and the files they came from."""

  name: str
  questions: tuple[Question, ...]
  files: tuple[str, ...] = ()


def file_dataset_name(path: str) -> str:
  """The dataset name of a file's rows without `data_source`: its stem, or the name of its
  directory when the stem is a split name.

  Example:
    >>> file_dataset_name("data/nq/test.jsonl"), file_dataset_name("bamboogle.parquet")
    ('nq', 'bamboogle')
  """
  if path.startswith("tfds:"):
    return path.split(":")[1]
  stem = os.path.basename(path).split(".")[0]
  parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
  return parent if stem.lower() in SPLIT_STEMS and parent else stem or "qa"


def parse_spec(spec: str) -> tuple[str, str]:
  """`(name, path)` of a `--qa_file` value: "PATH" (name "") or "NAME=PATH".

  Example:
    >>> parse_spec("nq=data/test.jsonl"), parse_spec("data/test.jsonl")
    (('nq', 'data/test.jsonl'), ('', 'data/test.jsonl'))
  """
  if "=" in spec and not os.path.exists(spec):
    name, path = spec.split("=", 1)
    if not re.fullmatch(r"[\w.-]+", name) or not path:
      raise ValueError(f"a QA file is PATH or NAME=PATH (NAME of letters, digits, '_', '.', "
                       f"'-'), got {spec!r}")
    return name, path
  return "", spec


def load_datasets(specs: Sequence[str], *, max_questions: int = 0,
                  tfds_data_dir: str = "") -> list[Dataset]:
  """Reads QA files into datasets (see the module docstring).

  Args:
    specs: "PATH" or "NAME=PATH" per file (QA files or "tfds:NAME:SPLIT").
    max_questions: keep the first this many questions of each dataset (0: all).
    tfds_data_dir: where "tfds:" splits were prepared.

  Returns:
    The datasets, in order of first appearance.

  Raises:
    ValueError: no spec; two files give the same dataset name; a malformed file.
  """
  from jaxsearch.programs.search_agent.experiment import load_split  # noqa: PLC0415
  if max_questions < 0:
    raise ValueError(f"max_questions must be >= 0, got {max_questions}")
  if not specs:
    raise ValueError("load_datasets needs at least one QA file")
  out: dict[str, Dataset] = {}
  for spec in specs:
    name, path = parse_spec(spec)
    examples = load_split(path, tfds_data_dir=tfds_data_dir)
    groups = ({name: tuple(e._replace(source=name) for e in examples)} if name
              else qa_files.split_by_source(examples, file_dataset_name(path)))
    for dataset, rows in groups.items():
      if dataset in out:
        raise ValueError(f"dataset {dataset!r} comes from both {out[dataset].files[0]!r} and "
                         f"{path!r}: name one of them (--qa_file=NAME=PATH)")
      rows = rows[:max_questions] if max_questions else rows
      questions = tuple(dataclasses.replace(q, source=dataset)
                        for q in qa_files.to_questions(rows))
      out[dataset] = Dataset(dataset, questions, (path,))
  return list(out.values())


def split_datasets(questions: Sequence[Question], default: str, *,
                   max_questions: int = 0) -> list[Dataset]:
  """A world split's questions as datasets: grouped by `source` (`default` for those without).

  Example:
    >>> [d.name for d in split_datasets(exp.world.splits["test"], "test")]  # doctest: +SKIP
    ['test']
  """
  groups: dict[str, list[Question]] = {}
  for q in questions:
    groups.setdefault(q.source or default, []).append(q)
  return [Dataset(name, tuple(qs[:max_questions] if max_questions else qs))
          for name, qs in groups.items()]


def evaluate_methods(exp, params: PyTree, datasets: Sequence[Dataset], methods: Sequence[str],
                     rng: jax.Array, *, log=print) -> dict[str, Any]:
  """Runs each method on every dataset's questions and scores them per dataset.

  Args:
    exp: the agent (`Experiment`); its world's corpus is searched.
    params: its parameters.
    datasets: the datasets (`load_datasets`).
    methods: some of `evaluate.METHODS`.
    rng: the evaluation key (sampling only with a non-zero `eval_temperature`).
    log: called with one progress line per method (None: silent).

  Returns:
    `{method: dataset_metrics(...) + {"seconds", "episodes": [per question: qid, dataset,
    question, answers, prediction, em, f1, subem, format, searches, support_recall]}}`.

  Raises:
    ValueError: an unknown method; a question names a supporting document the corpus lacks.
  """
  unknown = [m for m in methods if m not in eval_lib.METHODS]
  if unknown or not methods:
    raise ValueError(f"methods must be some of {eval_lib.METHODS}, got {list(methods)}")
  questions = [q for d in datasets for q in d.questions]
  labels = [d.name for d in datasets for _ in d.questions]
  if not questions:
    raise ValueError("no question to evaluate")
  qa_files.check_support_ids(questions, [d.doc_id for d in exp.world.documents])
  results = {}
  for method in methods:
    t0 = time.time()
    _, scored = eval_lib.evaluate(exp, params, questions, rng, method=method)
    scores = eval_lib.episode_scores(scored, questions, exp.world)
    table = eval_lib.dataset_metrics(scores, labels)
    table["seconds"] = time.time() - t0
    table["episodes"] = [
        {"qid": q.qid, "dataset": label, "question": q.question, "answers": list(q.answers),
         "prediction": extract_answer(c),
         **{k: float(scores[k][i]) for k in ("em", "f1", "subem", "format", "searches",
                                             "support_recall")}}
        for i, (q, label, c) in enumerate(zip(questions, labels, scored.completions))]
    results[method] = table
    if log:
      log(f"[{method}] {len(questions)} questions in {table['seconds']:.1f} s: "
          f"avg em={table['average']['em']:.3f} f1={table['average']['f1']:.3f} "
          f"searches={table['average']['searches']:.2f}")
  return results


def _columns(datasets: Sequence[Dataset]) -> list[str]:
  names = [d.name for d in datasets]
  known = sorted((n for n in names if paper_dataset(n)),
                 key=lambda n: PAPER_DATASETS.index(paper_dataset(n)))
  return known + [n for n in names if not paper_dataset(n)]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
  fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)   # noqa: E731
                            for i, (c, w) in enumerate(zip(r, widths)))
  return [fmt(header), *(fmt(r) for r in rows)]


def em_table(results: dict[str, Any], datasets: Sequence[Dataset]) -> str:
  """Search-R1's table: rows = methods, columns = datasets + Avg (exact match), then the
  paper's rows where dataset names match (their Avg is over the paper's seven datasets)."""
  columns = _columns(datasets)
  header = ["EM", *columns, "Avg"]
  rows = [[method, *(f"{r['per_dataset'][c]['em']:.3f}" for c in columns),
           f"{r['average']['em']:.3f}"] for method, r in results.items()]
  matched = [c for c in columns if paper_dataset(c)]
  ref_rows = []
  if matched:
    for name, ref in REFERENCE.items():
      ref_rows.append([f"{name} (paper)",
                       *(f"{ref[paper_dataset(c)]:.3f}" if paper_dataset(c) in ref
                         and paper_dataset(c) else "" for c in columns),
                       f"{ref['avg']:.3f}"])
  lines = _table(header, rows + ref_rows)
  if matched:
    lines.insert(1 + len(rows), "-" * len(lines[0]))
    lines.append(f"paper rows: {REFERENCE_SOURCE}; their Avg is over all seven of "
                 f"{', '.join(PAPER_DATASETS)}; ours over the {len(columns)} above.")
  return "\n".join(lines)


def metrics_table(method: str, result: dict[str, Any], datasets: Sequence[Dataset]) -> str:
  """Every `REPORT_COLUMNS` metric of one method per dataset, then the average over datasets."""
  header = [method, "n", *REPORT_COLUMNS]
  rows = []
  for name in _columns(datasets):
    m = result["per_dataset"][name]
    rows.append([name, str(m["n"]), *(f"{m[k]:.3f}" for k in REPORT_COLUMNS)])
  avg = result["average"]
  rows.append(["Avg", str(result["overall"]["n"]), *(f"{avg[k]:.3f}" for k in REPORT_COLUMNS)])
  return "\n".join(_table(header, rows))


def format_report(results: dict[str, Any], datasets: Sequence[Dataset]) -> str:
  """The EM table (`em_table`), then one `metrics_table` per method."""
  parts = [em_table(results, datasets)]
  parts += [metrics_table(m, r, datasets) for m, r in results.items()]
  return "\n\n".join(parts)


def summary(results: dict[str, Any]) -> dict[str, float]:
  """Flat `{method_metric: average over datasets}` (e.g. "rag_em"), for logs and JSON.

  Example:
    >>> summary({"rag": {"average": {"em": 0.25, "n": 2}}})
    {'rag_em': 0.25}
  """
  return {f"{m}_{k}": float(v) for m, r in results.items() for k, v in r["average"].items()
          if k != "n"}


def to_json(results: dict[str, Any], datasets: Sequence[Dataset], **info: Any) -> dict[str, Any]:
  """Everything as one JSON object: `info` (the agent, the command's settings), the datasets,
  the results of every method (per dataset, average, overall, episodes), the flat summary and
  the reference numbers."""
  return {
      **info,
      "datasets": [{"name": d.name, "n": len(d.questions), "files": list(d.files),
                    "paper_dataset": paper_dataset(d.name)} for d in datasets],
      "summary": summary(results),
      "results": results,
      "reference": {"source": REFERENCE_SOURCE, "em": REFERENCE},
  }


def as_float_dict(x):
  """`x` with numpy scalars as Python numbers (for `json.dump`)."""
  if isinstance(x, dict):
    return {k: as_float_dict(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [as_float_dict(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x
