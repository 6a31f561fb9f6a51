"""Tests for jaxsearch.data.qa_files: FlashRAG / Search-R1 QA files, their errors, the QA world
and the warm-start demonstrations built on it."""
from __future__ import annotations

import gzip
import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl.testing import absltest
from absl.testing import parameterized

from jaxsearch.data import demos
from jaxsearch.data import qa_files
from jaxsearch.data.qa_files import QAExample, QAFormatError
from jaxsearch.data.tokenizer import ByteTokenizer
from jaxsearch.data.world import Document

# Search-R1's prompt template ("base"), written out by hand from its data_process/utils.py.
SEARCH_R1_PREFIX = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: ")


def _write(path: str, lines, *, gz: bool = False) -> str:
  data = "".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines)
  with (gzip.open(path, "wt", encoding="utf-8") if gz else open(path, "w", encoding="utf-8")) as f:
    f.write(data)
  return path


class ReadJsonlTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()

  def test_flashrag_rows(self):
    path = _write(os.path.join(self.dir, "dev.jsonl"), [
        {"id": "dev_0", "question": " who wrote hamlet? ",
         "golden_answers": ["Shakespeare", "William Shakespeare", "Shakespeare"],
         "metadata": {"x": 1}},
        "",                                   # blank lines are skipped
        {"id": 7, "question": "capital of france", "golden_answers": "Paris"},
    ])
    self.assertEqual(qa_files.read_qa_file(path), (
        QAExample("dev_0", "who wrote hamlet?", ("Shakespeare", "William Shakespeare")),
        QAExample("7", "capital of france", ("Paris",))))

  def test_answer_field_alternatives_and_trivia_dict(self):
    path = _write(os.path.join(self.dir, "a.jsonl"), [
        {"question": "q0", "answers": ["a", "b"]},
        {"question": "q1", "answer": ["c"]},
        {"question": "q2", "answer": {"value": "Paris", "aliases": ["Paree", "Paris"]}},
    ])
    got = qa_files.read_qa_file(path)
    self.assertEqual([e.answers for e in got], [("a", "b"), ("c",), ("Paris", "Paree")])
    # No id: "<file stem>-<record number>".
    self.assertEqual([e.qid for e in got], ["a-0", "a-1", "a-2"])

  def test_gzip_by_magic_bom_and_max_questions(self):
    rows = [{"id": f"q{i}", "question": f"question {i}", "golden_answers": [str(i)]}
            for i in range(5)]
    gz = _write(os.path.join(self.dir, "train.jsonl"), rows, gz=True)   # no .gz suffix
    self.assertLen(qa_files.read_qa_file(gz), 5)
    self.assertEqual([e.qid for e in qa_files.read_qa_file(gz, max_questions=2)], ["q0", "q1"])
    bom = os.path.join(self.dir, "bom.jsonl")
    with open(bom, "w", encoding="utf-8-sig") as f:
      f.write(json.dumps(rows[0]) + "\n")
    self.assertEqual(qa_files.read_qa_file(bom)[0].qid, "q0")

  def test_repeated_ids_are_made_unique(self):
    path = _write(os.path.join(self.dir, "merged.jsonl"), [
        {"id": "train_0", "question": "a", "golden_answers": ["x"]},
        {"id": "train_0", "question": "b", "golden_answers": ["y"]},
        {"id": "train_0", "question": "c", "golden_answers": ["z"]}])
    self.assertEqual([e.qid for e in qa_files.read_qa_file(path)],
                     ["train_0", "train_0-2", "train_0-3"])

  def test_write_then_read_round_trip(self):
    examples = (QAExample("a", "Où est Paris?", ("France", "la France")), QAExample("b", "q", ("x",)))
    for name in ("rt.jsonl", "rt.jsonl.gz"):
      path = os.path.join(self.dir, name)
      qa_files.write_qa_jsonl(examples, path)
      self.assertEqual(qa_files.read_qa_file(path), examples)

  def test_world_jsonl_is_readable(self):
    # The embedded world's Search-R1 export carries extra fields; they are ignored.
    from jaxsearch.data.world import WorldConfig, build_world  # noqa: PLC0415
    world = build_world(WorldConfig(num_people=20, num_cities=6, num_countries=3,
                                    num_companies=5, num_distractors=5, train_size=30,
                                    validation_size=6, test_size=6))
    world.write_jsonl(self.dir)
    got = qa_files.read_qa_file(os.path.join(self.dir, "test.jsonl"))
    self.assertEqual([(e.qid, e.question, e.answers) for e in got],
                     [(q.qid, q.question, q.answers) for q in world.splits["test"]])


class SearchR1Test(absltest.TestCase):

  def test_question_from_prompt(self):
    chat = [{"role": "system", "content": "Be brief. Question: not this one"},
            {"role": "user", "content": SEARCH_R1_PREFIX + "who sings the song sweet caroline?\n"}]
    self.assertEqual(qa_files.question_from_prompt(chat), "who sings the song sweet caroline?")
    self.assertEqual(qa_files.question_from_prompt([{"content": " plain text "}]), "plain text")
    self.assertEqual(qa_files.question_from_prompt("Question: a? Question: b?"), "b?")
    with self.assertRaisesRegex(ValueError, "messages"):
      qa_files.question_from_prompt([{"role": "user", "content": 3}])

  def test_parquet_rows(self):
    path = os.path.join(tempfile.mkdtemp(), "train.parquet")
    rows = [
        # As Search-R1's nq_search.py writes them (no FlashRAG columns kept).
        {"data_source": "nq",
         "prompt": [{"role": "user", "content": SEARCH_R1_PREFIX + "when was the eiffel tower built?\n"}],
         "ability": "fact-reasoning",
         "reward_model": {"style": "rule", "ground_truth": {"target": ["1889", "1887"]}},
         "extra_info": {"split": "train", "index": 0}},
        {"data_source": "hotpotqa",
         "prompt": [{"role": "user", "content": SEARCH_R1_PREFIX + "who founded x?\n"}],
         "ability": "fact-reasoning",
         "reward_model": {"style": "rule", "ground_truth": {"target": ["Ann"]}},
         "extra_info": {"split": "train", "index": 1}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    self.assertEqual(qa_files.read_qa_file(path), (
        QAExample("train_0", "when was the eiffel tower built?", ("1889", "1887"), "nq"),
        QAExample("train_1", "who founded x?", ("Ann",), "hotpotqa")))   # data_source kept
    # When the FlashRAG columns are kept beside the prompt, they win.
    rows = [dict(r, id=f"nq_{i}", question=f"q{i}?", golden_answers=[f"g{i}"])
            for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    self.assertEqual(qa_files.read_qa_file(path),
                     (QAExample("nq_0", "q0?", ("g0",), "nq"),
                      QAExample("nq_1", "q1?", ("g1",), "hotpotqa")))

  def test_parquet_error_names_the_row(self):
    path = os.path.join(tempfile.mkdtemp(), "bad.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"question": "a", "golden_answers": ["x"]},
        {"question": "b", "golden_answers": []},
    ]), path)
    with self.assertRaises(QAFormatError) as ctx:
      qa_files.read_qa_file(path)
    self.assertEqual(str(ctx.exception), f"{path}:row 1: field 'golden_answers' has no answer")
    self.assertEqual((ctx.exception.row, ctx.exception.line), (1, None))


class ErrorsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("bad_json", '{"question": "q", "golden_answers": ["a"]', "invalid JSON"),
      ("not_object", '["q", ["a"]]', "expected a JSON object, got list"),
      ("no_question", {"id": "x", "golden_answers": ["a"]}, "missing field 'question'"),
      ("empty_question", {"question": "  ", "golden_answers": ["a"]},
       "field 'question' holds an empty question"),
      ("question_type", {"question": 5, "golden_answers": ["a"]},
       "field 'question' must be a string, got int"),
      ("no_answers", {"question": "q"}, "missing answers"),
      ("answer_type", {"question": "q", "golden_answers": ["a", 3]},
       "field 'golden_answers': answer 1 must be a string, got int 3"),
      ("empty_answer", {"question": "q", "golden_answers": [""]},
       "field 'golden_answers': answer 0 is empty"),
      ("answers_type", {"question": "q", "golden_answers": 1.5},
       "field 'golden_answers' must be a string or a list of strings, got float"),
      ("bad_id", {"id": True, "question": "q", "golden_answers": ["a"]},
       "field 'id' must be a non-empty string or an integer"),
  )
  def test_message_names_file_line_and_problem(self, line, problem):
    path = _write(os.path.join(tempfile.mkdtemp(), "qa.jsonl"), [
        {"question": "fine", "golden_answers": ["ok"]}, "", line])
    with self.assertRaises(QAFormatError) as ctx:
      qa_files.read_qa_file(path)
    self.assertTrue(str(ctx.exception).startswith(f"{path}:3: "), str(ctx.exception))
    self.assertIn(problem, str(ctx.exception))
    self.assertEqual(ctx.exception.line, 3)

  def test_invalid_utf8(self):
    path = os.path.join(tempfile.mkdtemp(), "qa.jsonl")
    with open(path, "wb") as f:
      f.write(b'{"question": "q", "golden_answers": ["a"]}\n{"question": "\xff"}\n')
    with self.assertRaisesRegex(QAFormatError, r"qa\.jsonl:2: invalid UTF-8"):
      qa_files.read_qa_file(path)

  def test_empty_and_missing_files(self):
    path = _write(os.path.join(tempfile.mkdtemp(), "empty.jsonl"), ["", "  "])
    with self.assertRaisesRegex(ValueError, "empty.jsonl: no questions"):
      qa_files.read_qa_file(path)
    with self.assertRaisesRegex(FileNotFoundError, "no such QA file: /nope.jsonl"):
      qa_files.read_qa_file("/nope.jsonl")
    with self.assertRaisesRegex(ValueError, "max_questions must be >= 0"):
      qa_files.read_qa_file(path, max_questions=-1)


class QAWorldTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.docs = [Document("d0", "Hamlet", "A play by Shakespeare."),
                 Document("d1", "Paris", "The capital of France."),
                 Document("d2", "", "An untitled passage.")]
    self.world = qa_files.make_qa_world(self.docs, {
        "train": [QAExample("t0", "Who wrote Hamlet?", ("Shakespeare", "Will")),
                  QAExample("t1", "Capital of France?", ("Paris",))],
        "test": [QAExample("s0", "Secret?", ("Heldout",))]})

  def test_questions_are_one_hop_searches_of_themselves(self):
    q = self.world.splits["train"][0]
    self.assertEqual((q.qid, q.question, q.answers), ("t0", "Who wrote Hamlet?", ("Shakespeare", "Will")))
    self.assertEqual((q.hops, q.search_queries, q.supporting_doc_ids, q.bridge_answers, q.kind),
                     (1, ("Who wrote Hamlet?",), (), (), qa_files.QA_KIND))
    self.assertEqual(self.world.splits["validation"], ())
    self.assertEqual(self.world.doc_index("d2"), 2)

  def test_guesses_come_from_train_answers_only(self):
    self.assertEqual(self.world.answer_values(qa_files.QA_KIND), ("Paris", "Shakespeare", "Will"))

  def test_texts_hold_passages_and_questions(self):
    texts = self.world.texts()
    self.assertEqual(texts[:3], tuple(d.text for d in self.docs))
    self.assertEqual(set(texts[3:]), {"Who wrote Hamlet?", "Capital of France?", "Secret?"})

  def test_bad_worlds_raise(self):
    with self.assertRaisesRegex(ValueError, "unknown splits \\['dev'\\]"):
      qa_files.make_qa_world(self.docs, {"dev": []})
    with self.assertRaisesRegex(ValueError, "unique"):
      qa_files.make_qa_world(self.docs + [self.docs[0]], {})

  def test_demonstrations_search_the_question_and_answer_the_first_gold(self):
    tok = ByteTokenizer()
    block = [tok.tag_id("<information>"), *tok.encode("X"), tok.tag_id("</information>")]
    asked = []

    def respond(queries):
      asked.extend(queries)
      return [block] * len(queries), [[0, 1]] * len(queries)

    qs = self.world.splits["train"]
    data, stats = demos.build_demonstrations(
        self.world, qs, tok, respond, demos.TeacherConfig(no_search_prob=0.0), max_len=96)
    self.assertEqual(asked, ["Who wrote Hamlet?", "Capital of France?"])
    tag = tok.tag_id
    expected = ([tok.bos_id, *tok.encode("Question: Who wrote Hamlet?")]
                + [tag("<search>"), *tok.encode("Who wrote Hamlet?"), tag("</search>")] + block
                + [tag("<answer>"), *tok.encode("Shakespeare"), tag("</answer>")])
    np.testing.assert_array_equal(data.tokens[0, :len(expected)], expected)
    self.assertTrue(np.all(data.tokens[0, len(expected):] == tok.pad_id))
    prompt = 1 + len(tok.encode("Question: Who wrote Hamlet?"))
    search = 2 + len(tok.encode("Who wrote Hamlet?"))
    mask = [False] * prompt + [True] * search + [False] * len(block) + [True] * (
        len(expected) - prompt - search - len(block))
    np.testing.assert_array_equal(data.loss_mask[0, :len(expected)], mask)
    self.assertEqual(stats["full_plan_fraction"], 1.0)
    self.assertEqual(stats["searches_per_demo"], 1.0)

  def test_guessing_teacher_never_guesses_a_test_answer(self):
    tok = ByteTokenizer()
    qs = self.world.splits["train"] * 20
    data, stats = demos.build_demonstrations(
        self.world, qs, tok, lambda q: ([[]] * len(q), [[]] * len(q)),
        demos.TeacherConfig(no_search_prob=1.0), max_len=64)
    self.assertEqual(stats["searches_per_demo"], 0.0)
    answers = {tok.decode(row[np.flatnonzero(row == tok.tag_id("<answer>"))[0] + 1:
                              np.flatnonzero(row == tok.tag_id("</answer>"))[0]].tolist())
               for row in data.tokens}
    self.assertLessEqual(answers, {"Paris", "Shakespeare", "Will"})
    self.assertNotIn("Heldout", answers)


if __name__ == "__main__":
  absltest.main()
