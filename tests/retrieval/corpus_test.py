"""Tests for jaxsearch.retrieval.corpus: Search-R1 / BEIR / world loaders and their errors."""
from __future__ import annotations

import gzip
import json
import os
import re
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from jaxsearch.data.world import WorldConfig, build_world
from jaxsearch.retrieval import corpus as corpus_lib
from jaxsearch.retrieval.corpus import Corpus, CorpusFormatError


def _write(path: str, lines: list[str] | str, *, gz: bool = False) -> str:
  data = lines if isinstance(lines, str) else "".join(line + "\n" for line in lines)
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(data)
  else:
    with open(path, "w", encoding="utf-8") as f:
      f.write(data)
  return path


def _jsonl(*objs) -> list[str]:
  return [o if isinstance(o, str) else json.dumps(o) for o in objs]


class CorpusContainerTest(absltest.TestCase):

  def test_contents_rows_and_concat(self):
    c = Corpus(ids=["a", "b"], titles=["T1", ""], texts=["x y", "z"])
    self.assertEqual(c.ids, ("a", "b"))                # lists become tuples
    self.assertEqual(c.contents, ('"T1"\nx y', '""\nz'))
    self.assertEqual(c.row("b"), 1)
    self.assertEqual(c.rows(["b", "a"]).tolist(), [1, 0])
    with self.assertRaisesRegex(KeyError, "'nope'"):
      c.row("nope")
    both = c.concat(Corpus(ids=["c"], titles=["T3"], texts=["w"]))
    self.assertEqual(both.ids, ("a", "b", "c"))
    self.assertEqual(both.row("c"), 2)

  def test_invalid_corpora_raise(self):
    with self.assertRaisesRegex(ValueError, "unique.*'a'"):
      Corpus(ids=["a", "a"], titles=["", ""], texts=["x", "y"])
    with self.assertRaisesRegex(ValueError, "equal lengths"):
      Corpus(ids=["a"], titles=["", ""], texts=["x"])
    with self.assertRaisesRegex(ValueError, "strings"):
      Corpus(ids=[1], titles=[""], texts=["x"])
    with self.assertRaisesRegex(ValueError, "newline"):
      Corpus(ids=["a"], titles=["a\nb"], texts=["x"])

  def test_split_contents(self):
    self.assertEqual(corpus_lib.split_contents('"Paris"\nCapital.\nMore.'),
                     ("Paris", "Capital.\nMore."))
    self.assertEqual(corpus_lib.split_contents("Paris\nCapital."), ("Paris", "Capital."))
    self.assertEqual(corpus_lib.split_contents("no newline"), ("", "no newline"))
    self.assertEqual(corpus_lib.split_contents('"\nx'), ('"', "x"))  # one quote: kept


class SearchR1Test(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()

  @parameterized.named_parameters(("plain", False), ("gzip", True))
  def test_loads_both_schemas(self, gz):
    path = _write(os.path.join(self.dir, "c.jsonl" + (".gz" if gz else "")), _jsonl(
        {"id": "0", "contents": '"Aaron"\nAaron is a prophet.'},
        {"id": 7, "contents": "Untitled text"},
        {"id": "x", "title": "Bee", "text": "Bees buzz.", "extra": 1},
        {"id": "y", "text": "No title field."},
    ) + ["", "   "], gz=gz)
    c = corpus_lib.load_search_r1_corpus(path)
    self.assertEqual(c.ids, ("0", "7", "x", "y"))
    self.assertEqual(c.titles, ("Aaron", "", "Bee", ""))
    self.assertEqual(c.texts, ("Aaron is a prophet.", "Untitled text", "Bees buzz.",
                               "No title field."))

  def test_gzip_detected_by_magic_bytes_not_suffix(self):
    path = _write(os.path.join(self.dir, "c.jsonl"), _jsonl({"id": "a", "contents": "t\nx"}),
                  gz=True)
    self.assertEqual(corpus_lib.load_search_r1_corpus(path).texts, ("x",))

  @parameterized.named_parameters(("plain", "c.jsonl"), ("gzip", "c.jsonl.gz"))
  def test_write_then_load_round_trips(self, name):
    c = Corpus(ids=("a", "b", "c"), titles=("Tï", "", 'Q "x"'),
               texts=("one\ntwo", "three", ""))
    path = os.path.join(self.dir, name)
    c.write_jsonl(path)
    self.assertEqual(corpus_lib.load_search_r1_corpus(path), c)

  def test_world_writer_and_from_world_agree(self):
    world = build_world(WorldConfig(seed=3))
    world.write_jsonl(self.dir)
    loaded = corpus_lib.load_search_r1_corpus(os.path.join(self.dir, "corpus.jsonl"))
    expected = corpus_lib.from_world(world)
    self.assertLen(expected, len(world.documents))
    self.assertEqual(loaded, expected)
    self.assertEqual(expected.contents, tuple(d.contents for d in world.documents))

  @parameterized.named_parameters(
      ("bad_json", '{"id": "b", "contents": ', "invalid JSON"),
      ("not_object", '["b", "x"]', "expected a JSON object, got list"),
      ("missing_id", '{"contents": "x"}', "missing field 'id'"),
      ("missing_contents", '{"id": "b", "body": "x"}', "missing field 'contents'"),
      ("null_id", '{"id": null, "contents": "x"}', "'id' must be a string or an integer"),
      ("float_id", '{"id": 1.5, "contents": "x"}', "'id' must be a string or an integer"),
      ("bool_id", '{"id": true, "contents": "x"}', "'id' must be a string or an integer"),
      ("empty_id", '{"id": "", "contents": "x"}', "'id' must not be empty"),
      ("contents_not_str", '{"id": "b", "contents": 3}', "'contents' must be a string"),
      ("title_not_str", '{"id": "b", "title": 3, "text": "x"}', "'title' must be a string"),
      ("duplicate_id", '{"id": "a", "contents": "x"}', "duplicate document id 'a' .*line 1"),
      ("title_newline", '{"id": "b", "title": "a\\nb", "text": "x"}', "newline"),
  )
  def test_malformed_line_names_file_and_line(self, bad_line, message):
    path = _write(os.path.join(self.dir, "bad.jsonl"),
                  ['{"id": "a", "contents": "T\\nx"}', "", bad_line,
                   '{"id": "c", "contents": "x"}'])
    with self.assertRaisesRegex(CorpusFormatError, f"^{re.escape(path)}:3: .*{message}") as ctx:
      corpus_lib.load_search_r1_corpus(path)
    self.assertEqual((ctx.exception.path, ctx.exception.line), (path, 3))
    self.assertIsInstance(ctx.exception, ValueError)

  def test_invalid_utf8_names_line(self):
    path = os.path.join(self.dir, "bad.jsonl")
    with open(path, "wb") as f:
      f.write(b'{"id": "a", "contents": "x"}\n{"id": "b", "contents": "\xff"}\n')
    with self.assertRaisesRegex(CorpusFormatError, f"{re.escape(path)}:2: invalid UTF-8"):
      corpus_lib.load_search_r1_corpus(path)

  def test_malformed_line_in_gzip_file(self):
    path = _write(os.path.join(self.dir, "bad.jsonl.gz"),
                  ['{"id": "a", "contents": "x"}', "{oops"], gz=True)
    with self.assertRaisesRegex(CorpusFormatError, f"{re.escape(path)}:2: invalid JSON"):
      corpus_lib.load_search_r1_corpus(path)

  def test_empty_and_missing_files(self):
    path = _write(os.path.join(self.dir, "empty.jsonl"), ["", ""])
    with self.assertRaisesRegex(ValueError, "no documents"):
      corpus_lib.load_search_r1_corpus(path)
    with self.assertRaises(FileNotFoundError):
      corpus_lib.load_search_r1_corpus(os.path.join(self.dir, "nope.jsonl"))


class BeirTest(parameterized.TestCase):

  def _dataset(self, *, gz_qrels=False, qrels=None, corpus=None, queries=None) -> str:
    d = tempfile.mkdtemp()
    os.makedirs(os.path.join(d, "qrels"))
    _write(os.path.join(d, "corpus.jsonl"), corpus or _jsonl(
        {"_id": "d1", "title": "One", "text": "first doc", "metadata": {}},
        {"_id": "d2", "text": "second doc, no title"},
        {"_id": 3, "title": "Three", "text": "third"}))
    _write(os.path.join(d, "queries.jsonl"), queries or _jsonl(
        {"_id": "q1", "text": "first?"}, {"_id": "q2", "text": "second?"},
        {"_id": "q3", "text": "not judged in test"}))
    _write(os.path.join(d, "qrels", "test.tsv" + (".gz" if gz_qrels else "")), qrels or [
        "query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\t3\t2", "q2\td2\t0"], gz=gz_qrels)
    return d

  @parameterized.named_parameters(("plain", False), ("gzip_qrels", True))
  def test_load_beir(self, gz):
    data = corpus_lib.load_beir(self._dataset(gz_qrels=gz), split="test")
    self.assertEqual(data.corpus.ids, ("d1", "d2", "3"))
    self.assertEqual(data.corpus.titles, ("One", "", "Three"))
    self.assertEqual(data.queries, {"q1": "first?", "q2": "second?"})   # q3 has no qrels
    self.assertEqual(data.qrels, {"q1": {"d1": 1, "3": 2}, "q2": {"d2": 0}})

  def test_trec_qrels_and_headerless(self):
    d = tempfile.mkdtemp()
    trec = _write(os.path.join(d, "q.trec"), ["q1 0 d1 1", "q1 0 d2 0", "q2 Q0 d9 -1"])
    self.assertEqual(corpus_lib.load_qrels(trec),
                     {"q1": {"d1": 1, "d2": 0}, "q2": {"d9": -1}})
    plain = _write(os.path.join(d, "q.tsv"), ["q1\td1\t2"])
    self.assertEqual(corpus_lib.load_qrels(plain), {"q1": {"d1": 2}})

  @parameterized.named_parameters(
      ("too_few_fields", "q1\td1", "expected 3 tab-separated fields"),
      ("too_many_fields", "q1\td1\t1\tx\ty", "expected 3 tab-separated fields"),
      ("float_score", "q1\td2\t0.5", "score must be an integer, got '0.5'"),
      ("text_score", "q1\td2\thigh", "score must be an integer"),
      ("duplicate", "q1\td1\t2", "duplicate judgement .*'q1'.*'d1'.*line 2"),
      ("empty_id", "\td1\t1", "empty query or corpus id"),
  )
  def test_malformed_qrels_row(self, bad_row, message):
    d = tempfile.mkdtemp()
    path = _write(os.path.join(d, "test.tsv"),
                  ["query-id\tcorpus-id\tscore", "q1\td1\t1", bad_row])
    with self.assertRaisesRegex(CorpusFormatError, f"^{re.escape(path)}:3: .*{message}"):
      corpus_lib.load_qrels(path)

  def test_malformed_beir_corpus_and_queries(self):
    d = tempfile.mkdtemp()
    path = _write(os.path.join(d, "corpus.jsonl"), _jsonl(
        {"_id": "d1", "text": "x"}, {"_id": "d2", "title": "no text"}))
    with self.assertRaisesRegex(CorpusFormatError, f"{re.escape(path)}:2: missing field 'text'"):
      corpus_lib.load_beir_corpus(path)
    path = _write(os.path.join(d, "queries.jsonl"), _jsonl(
        {"_id": "q1", "text": "x"}, {"_id": "q1", "text": "y"}))
    with self.assertRaisesRegex(CorpusFormatError,
                                f"{re.escape(path)}:2: duplicate query id 'q1' .*line 1"):
      corpus_lib.load_beir_queries(path)

  def test_qrels_must_match_corpus_and_queries(self):
    d = self._dataset(qrels=["query-id\tcorpus-id\tscore", "q1\tmissing\t1"])
    with self.assertRaisesRegex(ValueError, "document 'missing'.*not in corpus.jsonl"):
      corpus_lib.load_beir(d)
    d = self._dataset(qrels=["query-id\tcorpus-id\tscore", "q9\td1\t1"])
    with self.assertRaisesRegex(ValueError, "not in queries.jsonl.*'q9'"):
      corpus_lib.load_beir(d)
    with self.assertRaisesRegex(FileNotFoundError, "qrels/dev.tsv"):
      corpus_lib.load_beir(d, split="dev")


class WorldQueriesTest(absltest.TestCase):

  def test_queries_and_qrels_from_supporting_docs(self):
    world = build_world(WorldConfig(seed=1))
    corpus = corpus_lib.from_world(world)
    queries, qrels = corpus_lib.world_queries(world, "validation")
    questions = world.splits["validation"]
    self.assertEqual(list(queries), [q.qid for q in questions])
    two_hop = next(q for q in questions if q.hops == 2)
    self.assertEqual(qrels[two_hop.qid], {d: 1 for d in two_hop.supporting_doc_ids})
    self.assertLen(qrels[two_hop.qid], 2)
    for judged in qrels.values():                    # every judged doc is in the corpus
      corpus.rows(list(judged))
    with self.assertRaisesRegex(ValueError, "unknown split 'dev'"):
      corpus_lib.world_queries(world, "dev")


if __name__ == "__main__":
  absltest.main()
