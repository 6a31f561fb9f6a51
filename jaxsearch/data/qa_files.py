"""Question-answer files in the Search-R1 / FlashRAG formats, and a `World` built from them.

A QA file is one split: JSONL (one JSON object per line; gzip-compressed files are recognised
by their magic bytes, whatever their name) or Apache Parquet (recognised by its `PAR1` magic;
read with pyarrow). Each line / row is one question; what is read of it:

  id         `id` (a string or an integer) if present; else `extra_info.split` and
             `extra_info.index` as "{split}_{index}" (Search-R1); else "{file stem}-{n}" with n
             the 0-based record number. Ids need not be unique (Search-R1's merged NQ+HotpotQA
             train set repeats FlashRAG's "train_0" ...): the k-th repeat gets "-k" appended.
  question   the first of:
               `question`                a non-empty string (FlashRAG; Search-R1's parquet rows
                                         keep it next to the prompt);
               `extra_info.question`     a non-empty string;
               `prompt`                  a string, or a chat list of {"role", "content"}: the
                                         content of the last "user" message (the last message
                                         if none has a role), and of it the text after the last
                                         "Question:" (Search-R1's template ends with
                                         "Question: {question}\\n"), whitespace-stripped.
  answers    the first present of `golden_answers` (FlashRAG), `answers`, `answer`,
             `reward_model.ground_truth.target` (Search-R1), `reward_model.ground_truth`: a
             string (one answer), a list of strings, or a TriviaQA-style dict {"value",
             "aliases"} (the value, then the aliases). At least one answer, none empty.
             Duplicates are dropped, order kept: the first answer is what the warm-start
             teacher answers.

  source     `data_source` (Search-R1's parquet rows name each row's dataset there: "nq",
             "hotpotqa", ...; a FlashRAG-style JSONL line may carry it too) or
             `metadata.data_source`: a string, "" when absent. `split_by_source` splits a
             merged file into its datasets by it, as Search-R1 evaluates its seven test sets
             from one merged parquet.
  support    `supporting_doc_ids` at the top level, in `metadata` or in `extra_info` (the
             first present): a list of corpus document ids (strings or integers, compared as
             strings with the corpus's `id`s) that answer the question; () when absent. With
             them, an evaluation's support recall counts retrieved ids
             (`jaxsearch.programs.search_agent.evaluate`), and `make_qa_world` checks that the
             corpus has every one.

Every other field (`ability`, the rest of `metadata`, ...) is ignored. Blank JSONL lines are
skipped. Anything else that is malformed (bad JSON or UTF-8, a line that is not an object, a
missing or mistyped field) raises `QAFormatError`, a `ValueError` whose message starts with
`path:line:` (JSONL, 1-based line as in `jaxsearch.retrieval.corpus`) or `path:row N:`
(parquet, 0-based row as pandas shows it) and names the problem.

Files have no search plan, so `to_questions` makes each record a one-hop `Question` of kind
`QA_KIND` whose ideal search is the question itself: `search_queries=(question,)`,
`supporting_doc_ids` the record's `supporting_doc_ids` (usually ()), `source` its
`data_source`. The warm-start teacher
(`jaxsearch.data.demos`) therefore searches once with the question text and answers the first
golden answer (or, with `no_search_prob`, guesses one of the train split's answers without
searching): it teaches the format and the search-then-copy habit, not where the answer is.
`QAWorld` is the `World` that holds such questions with a corpus.

Example:
  >>> import json, tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), "dev.jsonl")
  >>> with open(path, "w") as f:
  ...   _ = f.write(json.dumps({"id": "dev_0", "question": "who wrote hamlet?",
  ...                           "golden_answers": ["Shakespeare", "William Shakespeare"]}))
  >>> read_qa_file(path)
  (QAExample(qid='dev_0', question='who wrote hamlet?', answers=('Shakespeare', \
'William Shakespeare'), source='', support_ids=()),)
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

from jaxsearch.data.world import SPLITS, Document, Question, World, WorldConfig

QA_KIND = "qa"   # Question.kind of every question read from a file
_PARQUET_MAGIC = b"PAR1"
_GZIP_MAGIC = b"\x1f\x8b"
ANSWER_FIELDS = ("golden_answers", "answers", "answer")
SOURCE_FIELD = "data_source"
SUPPORT_FIELD = "supporting_doc_ids"


class QAFormatError(ValueError):
  """A malformed record of a QA file: `path:line: message` (JSONL) or `path:row N: message`
  (parquet). Exactly one of `line` (1-based) and `row` (0-based) is set."""

  def __init__(self, path: str | os.PathLike, message: str, *, line: int | None = None,
               row: int | None = None):
    self.path = os.fspath(path)
    self.line = line
    self.row = row
    where = f"{line}" if line is not None else f"row {row}"
    super().__init__(f"{self.path}:{where}: {message}")


class QAExample(NamedTuple):
  """One question of a QA file."""

  qid: str
  question: str
  answers: tuple[str, ...]   # at least one, the teacher's answer first
  source: str = ""           # `data_source`: the dataset the question belongs to ("" unknown)
  support_ids: tuple[str, ...] = ()   # `supporting_doc_ids`: corpus ids that answer it


# ----------------------------------------------------------------------------------------
# Records -> examples
# ----------------------------------------------------------------------------------------


def question_from_prompt(prompt: Any) -> str:
  """The question inside a Search-R1 prompt (a string or a chat list of messages).

  Takes the last "user" message's content (the last message if none has a role) and returns
  the text after its last "Question:", stripped (all of it when there is no such marker).

  Raises:
    ValueError: the prompt is not a string or a list of {"content": str} messages.

  Example:
    >>> question_from_prompt([{"role": "user", "content": "Answer it. Question: who?\\n"}])
    'who?'
  """
  if isinstance(prompt, str):
    content = prompt
  elif isinstance(prompt, (list, tuple)) and prompt:
    if not all(isinstance(m, Mapping) and isinstance(m.get("content"), str) for m in prompt):
      raise ValueError("field 'prompt' must be a list of {'role', 'content'} messages with "
                       f"string contents, got {str(prompt)[:80]}")
    users = [m for m in prompt if m.get("role") == "user"]
    content = (users or list(prompt))[-1]["content"]
  else:
    raise ValueError(f"field 'prompt' must be a string or a non-empty list of messages, got "
                     f"{type(prompt).__name__}")
  marker = content.rfind("Question:")
  if marker >= 0:
    content = content[marker + len("Question:"):]
  return content.strip()


def _answers(value: Any, field: str) -> tuple[str, ...]:
  if isinstance(value, Mapping) and ("value" in value or "aliases" in value):
    aliases = value.get("aliases") or []
    if not isinstance(aliases, (list, tuple)):
      raise ValueError(f"field '{field}.aliases' must be a list of strings, got "
                       f"{type(aliases).__name__}")
    value = [v for v in (value.get("value"), *aliases) if v is not None]
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, (list, tuple)):
    raise ValueError(f"field {field!r} must be a string or a list of strings, got "
                     f"{type(value).__name__} {str(value)[:60]}")
  out: list[str] = []
  for i, answer in enumerate(value):
    if not isinstance(answer, str):
      raise ValueError(f"field {field!r}: answer {i} must be a string, got "
                       f"{type(answer).__name__} {answer!r}")
    if not answer.strip():
      raise ValueError(f"field {field!r}: answer {i} is empty")
    if answer not in out:
      out.append(answer)
  if not out:
    raise ValueError(f"field {field!r} has no answer")
  return tuple(out)


def example_from_record(record: Mapping[str, Any], *, default_id: str) -> QAExample:
  """Reads one FlashRAG / Search-R1 record (see the module docstring for the fields).

  Args:
    record: the decoded JSON object or parquet row.
    default_id: the id when the record has none.

  Raises:
    ValueError: naming the missing or mistyped field (callers add the file and line).

  Example:
    >>> example_from_record({"prompt": [{"role": "user", "content": "Question: Why?"}],
    ...                      "reward_model": {"ground_truth": {"target": ["because"]}},
    ...                      "extra_info": {"split": "train", "index": 7}}, default_id="x")
    QAExample(qid='train_7', question='Why?', answers=('because',), source='', support_ids=())
  """
  if not isinstance(record, Mapping):
    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
  extra = record.get("extra_info")
  extra = extra if isinstance(extra, Mapping) else {}
  # Id.
  if record.get("id") is not None:
    qid = record["id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or qid == "":
      raise ValueError(f"field 'id' must be a non-empty string or an integer, got {qid!r}")
    qid = str(qid)
  elif extra.get("index") is not None:
    qid = f"{extra.get('split', 'row')}_{extra['index']}"
  else:
    qid = default_id
  # Question.
  if record.get("question") is not None:
    question, field = record["question"], "question"
  elif extra.get("question") is not None:
    question, field = extra["question"], "extra_info.question"
  elif record.get("prompt") is not None:
    question, field = question_from_prompt(record["prompt"]), "prompt"
  else:
    raise ValueError(f"missing field 'question' (or 'extra_info.question', 'prompt'); fields: "
                     f"{sorted(record)}")
  if not isinstance(question, str):
    raise ValueError(f"field {field!r} must be a string, got {type(question).__name__}")
  question = question.strip()
  if not question:
    raise ValueError(f"field {field!r} holds an empty question")
  source, support = _source(record), _support_ids(record)
  return QAExample(qid, question, _record_answers(record), source, support)


def _record_answers(record: Mapping[str, Any]) -> tuple[str, ...]:
  for name in ANSWER_FIELDS:
    if record.get(name) is not None:
      return _answers(record[name], name)
  truth = record.get("reward_model")
  truth = truth.get("ground_truth") if isinstance(truth, Mapping) else None
  if isinstance(truth, Mapping) and truth.get("target") is not None:
    return _answers(truth["target"], "reward_model.ground_truth.target")
  if truth is not None and not isinstance(truth, Mapping):
    return _answers(truth, "reward_model.ground_truth")
  raise ValueError("missing answers: no field 'golden_answers', 'answers', 'answer' or "
                   f"'reward_model.ground_truth.target'; fields: {sorted(record)}")


def _nested(record: Mapping[str, Any], name: str) -> tuple[Any, str]:
  """`(value, field name)` of `name` at the top level, in `metadata` or in `extra_info`."""
  for parent in ("", "metadata", "extra_info"):
    holder = record.get(parent) if parent else record
    if isinstance(holder, Mapping) and holder.get(name) is not None:
      return holder[name], f"{parent}.{name}" if parent else name
  return None, name


def _source(record: Mapping[str, Any]) -> str:
  value, field = _nested(record, SOURCE_FIELD)
  if value is None:
    return ""
  if not isinstance(value, str):
    raise ValueError(f"field {field!r} must be a string (a dataset name), got "
                     f"{type(value).__name__} {value!r}")
  return value.strip()


def _support_ids(record: Mapping[str, Any]) -> tuple[str, ...]:
  value, field = _nested(record, SUPPORT_FIELD)
  if value is None:
    return ()
  if isinstance(value, (str, int)) and not isinstance(value, bool):
    value = [value]
  if not isinstance(value, (list, tuple)):
    raise ValueError(f"field {field!r} must be a list of corpus ids, got "
                     f"{type(value).__name__} {str(value)[:60]}")
  out: list[str] = []
  for i, doc_id in enumerate(value):
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or doc_id == "":
      raise ValueError(f"field {field!r}: id {i} must be a non-empty string or an integer, got "
                       f"{doc_id!r}")
    if str(doc_id) not in out:
      out.append(str(doc_id))
  return tuple(out)


# ----------------------------------------------------------------------------------------
# Files -> records
# ----------------------------------------------------------------------------------------


def _magic(path: str) -> bytes:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such QA file: {path}")
  with open(path, "rb") as f:
    return f.read(4)


def _jsonl_records(path: str) -> Iterator[tuple[dict[str, int], Any]]:
  gzipped = _magic(path)[:2] == _GZIP_MAGIC
  with (gzip.open if gzipped else open)(path, "rb") as f:
    try:
      for lineno, raw in enumerate(f, start=1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise QAFormatError(path, f"invalid UTF-8 ({e.reason})", line=lineno) from None
        if lineno == 1:
          line = line.lstrip("\ufeff")  # byte-order mark
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise QAFormatError(path, f"invalid JSON ({e.msg} at column {e.colno})",
                              line=lineno) from None
        yield {"line": lineno}, obj
    except (OSError, EOFError) as e:  # truncated or corrupt gzip stream
      raise ValueError(f"{path}: cannot read: {e}") from None


def _parquet_records(path: str) -> Iterator[tuple[dict[str, int], Any]]:
  import pyarrow.parquet as pq  # noqa: PLC0415 (only parquet readers pay for it)
  try:
    reader = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses
    raise ValueError(f"{path}: cannot read parquet: {e}") from None
  row = 0
  for batch in reader.iter_batches(batch_size=1024):
    for record in batch.to_pylist():
      yield {"row": row}, record
      row += 1


def qa_records(path: str | os.PathLike) -> Iterator[tuple[dict[str, int], Any]]:
  """Yields `(location, record)` of a QA file: `{"line": n}` (JSONL) or `{"row": n}` (parquet).

  Example:
    >>> next(qa_records("nq/dev.jsonl"))  # doctest: +SKIP
    ({'line': 1}, {'id': 'dev_0', 'question': '...', 'golden_answers': ['...']})
  """
  path = os.fspath(path)
  if _magic(path) == _PARQUET_MAGIC:
    return _parquet_records(path)
  return _jsonl_records(path)


def read_qa_file(path: str | os.PathLike, *, max_questions: int = 0) -> tuple[QAExample, ...]:
  """Reads one QA split (JSONL[.gz] or parquet; formats in the module docstring).

  Args:
    path: the file.
    max_questions: keep only the first this many questions (0: all); reading stops there.

  Returns:
    The questions in file order, with unique ids.

  Raises:
    QAFormatError: a malformed line or row (named by path and line / row).
    FileNotFoundError: no such file.
    ValueError: the file holds no question.

  Example:
    >>> train = read_qa_file("nq_search/train.parquet", max_questions=1000)  # doctest: +SKIP
  """
  path = os.fspath(path)
  if max_questions < 0:
    raise ValueError(f"max_questions must be >= 0, got {max_questions}")
  stem = os.path.basename(path).split(".")[0] or "q"
  out: list[QAExample] = []
  seen: dict[str, int] = {}
  for n, (where, record) in enumerate(qa_records(path)):
    if max_questions and len(out) >= max_questions:
      break
    try:
      example = example_from_record(record, default_id=f"{stem}-{n}")
    except ValueError as e:
      raise QAFormatError(path, str(e), **where) from None
    repeats = seen.get(example.qid, 0)
    seen[example.qid] = repeats + 1
    if repeats:
      example = example._replace(qid=f"{example.qid}-{repeats + 1}")
    out.append(example)
  if not out:
    raise ValueError(f"{path}: no questions")
  return tuple(out)


def write_qa_jsonl(examples: Sequence[QAExample], path: str | os.PathLike) -> None:
  """Writes FlashRAG JSONL `{"id", "question", "golden_answers"}` (gzip if `path` ends in .gz),
  with `data_source` and `supporting_doc_ids` when an example has them.

  Example:
    >>> write_qa_jsonl([QAExample("q1", "Why?", ("because",))], "/tmp/qa.jsonl")  # doctest: +SKIP
  """
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as f:
    for e in examples:
      record = {"id": e.qid, "question": e.question, "golden_answers": list(e.answers)}
      if e.source:
        record[SOURCE_FIELD] = e.source
      if e.support_ids:
        record[SUPPORT_FIELD] = list(e.support_ids)
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------
# Examples -> the agent's questions and world
# ----------------------------------------------------------------------------------------


def to_questions(examples: Sequence[QAExample]) -> tuple[Question, ...]:
  """One-hop `Question`s whose ideal search is the question itself; `supporting_doc_ids` are
  the record's (usually none) and `source` its `data_source`.

  Example:
    >>> q, = to_questions([QAExample("q1", "Who wrote Hamlet?", ("Shakespeare",), "nq")])
    >>> q.search_queries, q.supporting_doc_ids, q.hops, q.kind, q.source
    (('Who wrote Hamlet?',), (), 1, 'qa', 'nq')
  """
  return tuple(Question(qid=e.qid, question=e.question, answers=tuple(e.answers),
                        supporting_doc_ids=tuple(e.support_ids), hops=1,
                        search_queries=(e.question,), bridge_answers=(), kind=QA_KIND,
                        source=e.source) for e in examples)


def split_by_source(examples: Sequence[QAExample], default: str
                    ) -> dict[str, tuple[QAExample, ...]]:
  """Splits a (merged) file's examples into datasets by their `data_source`.

  Args:
    examples: a file's examples, in file order.
    default: the dataset name of examples without a `data_source` (e.g. the file's name).

  Returns:
    dataset name -> its examples in file order; names in order of first appearance.

  Example:
    >>> split = split_by_source([QAExample("a", "q?", ("x",), "nq"),
    ...                          QAExample("b", "r?", ("y",), "hotpotqa"),
    ...                          QAExample("c", "s?", ("z",))], default="extra")
    >>> {name: [e.qid for e in rows] for name, rows in split.items()}
    {'nq': ['a'], 'hotpotqa': ['b'], 'extra': ['c']}
  """
  if not default:
    raise ValueError(f"split_by_source needs a default dataset name, got {default!r}")
  out: dict[str, list[QAExample]] = {}
  for e in examples:
    out.setdefault(e.source or default, []).append(e)
  return {name: tuple(rows) for name, rows in out.items()}


@dataclasses.dataclass(frozen=True)
class QAWorld(World):
  """A `World` read from files: a corpus and QA splits, no entity tables.

  `config` is a default `WorldConfig` and means nothing here. `answer_values(kind)` (the
  warm-start teacher's pool of guesses) is the sorted set of the answers of the train split's
  questions of that kind (`QA_KIND` for files; the WordNet world's kinds), so no held-out
  answer leaks into the demonstrations.
  """

  def answer_values(self, kind: str) -> tuple[str, ...]:
    train = [q for q in self.splits.get("train", ()) if q.kind == kind]
    if not train:
      raise ValueError(f"no train question of kind {kind!r}; the train split has kinds "
                       f"{sorted({q.kind for q in self.splits.get('train', ())})}")
    return tuple(sorted({a for q in train for a in q.answers}))


def check_support_ids(examples, doc_ids) -> None:
  """Raises a ValueError naming the first example whose `support_ids` the corpus lacks.

  Example:
    >>> check_support_ids([QAExample("q1", "Why?", ("x",), support_ids=("d9",))], ["d1"])
    Traceback (most recent call last):
    ...
    ValueError: question 'q1' names supporting document 'd9', which the corpus (1 documents) does not have
  """
  known = set(doc_ids)
  for e in examples:
    ids = e.support_ids if isinstance(e, QAExample) else e.supporting_doc_ids
    for d in ids:
      if d not in known:
        raise ValueError(f"question {e.qid!r} names supporting document {d!r}, which the "
                         f"corpus ({len(known)} documents) does not have")


def make_qa_world(documents: Sequence[Document],
                  splits: Mapping[str, Sequence[QAExample]]) -> QAWorld:
  """The `QAWorld` of a corpus and QA splits ("train", "validation", "test"; missing = empty).

  Args:
    documents: the corpus in index-row order (unique ids).
    splits: split name -> examples.

  Example:
    >>> world = make_qa_world([Document("d1", "Hamlet", "A play by Shakespeare.")],
    ...                       {"train": [QAExample("q1", "Who wrote Hamlet?", ("Shakespeare",))]})
    >>> len(world.splits["train"]), world.splits["test"], world.answer_values(QA_KIND)
    (1, (), ('Shakespeare',))
  """
  unknown = sorted(set(splits) - set(SPLITS))
  if unknown:
    raise ValueError(f"unknown splits {unknown}; expected some of {list(SPLITS)}")
  documents = tuple(documents)
  if not documents:
    raise ValueError("documents must not be empty")
  ids = [d.doc_id for d in documents]
  if len(set(ids)) != len(ids):
    raise ValueError("document ids must be unique")
  check_support_ids((e for rows in splits.values() for e in rows), ids)
  return QAWorld(WorldConfig(), documents,
                 {s: to_questions(splits.get(s, ())) for s in SPLITS})
