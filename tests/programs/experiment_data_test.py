"""Tests for `RunConfig.data`: DataConfig validation, the world read from QA files and a corpus,
the agent `setup` builds on it, the answer-recall fallback of the evaluation, and the workdir
round trip of the config."""
from __future__ import annotations

import json
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
from absl.testing import absltest
from absl.testing import parameterized

from jaxsearch.data import demos
from jaxsearch.data import wordnet
from jaxsearch.data.qa_files import QA_KIND, QAFormatError, QAWorld
from jaxsearch.retrieval.corpus import CorpusFormatError
from jaxsearch.rewards.qa import extract_answer
from jaxsearch.programs.search_agent import evaluate as eval_lib
from jaxsearch.programs.search_agent import workdir as workdir_lib
from jaxsearch.programs.search_agent.experiment import (DataConfig, RunConfig, load_world,
                                                        passage_lead, passage_text, setup)

PASSAGES = [
    ("p-hamlet", "Hamlet", "Hamlet is a tragedy written by Shakespeare around 1600."),
    ("p-paris", "Paris", "Paris is the capital and largest city of France."),
    ("p-nile", "Nile", "The Nile is a river in Africa that flows into the Mediterranean."),
    ("p-untitled", "", "Mount Fuji is the highest mountain in Japan."),
]
TRAIN = [{"id": "t0", "question": "Who wrote the tragedy Hamlet?", "golden_answers": ["Shakespeare"]},
         {"id": "t1", "question": "Which river flows into the Mediterranean?",
          "golden_answers": ["Nile", "the Nile"]},
         {"id": "t2", "question": "What is the capital of France?", "golden_answers": ["Paris"]}]
TEST = [{"question": "What is the highest mountain in Japan?", "golden_answers": ["Mount Fuji"]}]


def write_files(directory: str) -> dict[str, str]:
  paths = {"corpus": os.path.join(directory, "corpus.jsonl"),
           "train": os.path.join(directory, "train.jsonl"),
           "test": os.path.join(directory, "test.parquet")}
  with open(paths["corpus"], "w") as f:
    for doc_id, title, text in PASSAGES:
      contents = f'"{title}"\n{text}' if title else text
      f.write(json.dumps({"id": doc_id, "contents": contents}) + "\n")
  with open(paths["train"], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in TRAIN)
  pq.write_table(pa.Table.from_pylist(TEST), paths["test"])
  return paths


class DataConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("test_without_train", dict(qa_test="t.jsonl", corpus="c.jsonl"), "qa_train must name"),
      ("train_without_corpus", dict(qa_train="t.jsonl"), "corpus must name .* got corpus=''"),
      ("max_questions", dict(max_questions=-1), "max_questions must be >= 0, got -1"),
      ("max_passage_tokens", dict(max_passage_tokens=-2), "max_passage_tokens must be >= 0, got -2"),
      ("tfds_spec", dict(qa_train="tfds:natural_questions_open", corpus="c.jsonl"),
       "qa_train must be 'tfds:NAME:SPLIT'.* got 'tfds:natural_questions_open'"),
      ("not_a_string", dict(qa_train=3, corpus="c"), "qa_train must be a string .* got 3"),
      ("max_eval_questions", dict(max_eval_questions=-3), "max_eval_questions must be >= 0"),
      ("wordnet_kind", dict(wordnet_kinds=("wordnet_birthday",)),
       "wordnet_kinds must be some of .* unknown \\['wordnet_birthday'\\]"),
      ("wordnet_and_files", dict(wordnet_kinds=("wordnet_category",), qa_train="t.jsonl",
                                 corpus="c.jsonl"), "leave qa_\\* and corpus empty"),
  )
  def test_bad_value_is_named(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      DataConfig(**kwargs)

  def test_default_is_the_embedded_world(self):
    self.assertFalse(DataConfig().from_files)
    self.assertFalse(isinstance(load_world(RunConfig()), QAWorld))


class WordNetWorldTest(absltest.TestCase):

  def test_documents_questions_and_eval_limit(self):
    kinds = ("wordnet_birth_year", "wordnet_located_in_2hop")
    full = wordnet.agent_questions(kinds=kinds, seed=1)
    world = load_world(RunConfig(data=DataConfig(wordnet_kinds=kinds, wordnet_split_seed=1,
                                                 max_eval_questions=7)))
    self.assertIsInstance(world, QAWorld)
    entities = wordnet.load_wordnet_entities()
    self.assertEqual([(d.doc_id, d.title, d.text) for d in world.documents],
                     [(e.doc_id, e.title, e.text) for e in entities])
    # The limit cuts the held-out splits only; RL draws from the whole train split.
    self.assertEqual(world.splits["train"], full["train"])
    self.assertEqual(world.splits["test"], full["test"][:7])
    self.assertEqual(world.splits["validation"], full["validation"][:7])
    # The teacher's guesses come from the train split's answers of the same kind only.
    self.assertEqual(set(world.answer_values("wordnet_birth_year")),
                     {a for q in full["train"] if q.kind == "wordnet_birth_year"
                      for a in q.answers})
    with self.assertRaisesRegex(ValueError, "no train question of kind 'qa'"):
      world.answer_values(QA_KIND)
    # The supporting documents are the world's (support recall counts them), shown titled.
    for q in world.splits["test"]:
      doc = world.documents[world.doc_index(q.supporting_doc_ids[0])]
      self.assertEqual(passage_text(doc), f"{doc.title}: {doc.text}")
      if q.kind == "wordnet_birth_year":
        self.assertIn(f"({q.answers[0]}-", doc.text)

  def test_embedded_world_eval_limit(self):
    world = load_world(RunConfig(data=DataConfig(max_eval_questions=5)))
    self.assertLen(world.splits["test"], 5)
    self.assertGreater(len(world.splits["train"]), 5)

  def test_baselines_are_checked(self):
    with self.assertRaisesRegex(ValueError, "baselines must be some of .*\\['oracle'\\]"):
      RunConfig(baselines=("direct", "oracle"))
    from jaxsearch.programs.search_agent import loop  # noqa: PLC0415
    from jaxsearch.programs.search_agent.experiment import BASELINE_NAMES  # noqa: PLC0415
    self.assertEqual(tuple(loop.BASELINES), BASELINE_NAMES)


class FileWorldTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    cls.paths = write_files(cls.dir)
    cls.data = DataConfig(qa_train=cls.paths["train"], qa_test=cls.paths["test"],
                          corpus=cls.paths["corpus"])

  def test_load_world_reads_the_files(self):
    world = load_world(RunConfig(data=self.data))
    self.assertIsInstance(world, QAWorld)
    self.assertEqual([(d.doc_id, d.title, d.text) for d in world.documents], PASSAGES)
    self.assertEqual([(q.qid, q.question, q.answers) for q in world.splits["train"]],
                     [(r["id"], r["question"], tuple(r["golden_answers"])) for r in TRAIN])
    self.assertEqual([(q.qid, q.answers) for q in world.splits["test"]],
                     [("test-0", ("Mount Fuji",))])
    self.assertEqual(world.splits["validation"], ())
    self.assertEqual(world.answer_values(QA_KIND), ("Nile", "Paris", "Shakespeare", "the Nile"))
    small = load_world(RunConfig(data=DataConfig(qa_train=self.paths["train"],
                                                 qa_test=self.paths["test"],
                                                 corpus=self.paths["corpus"], max_questions=2)))
    self.assertLen(small.splits["train"], 2)

  def test_missing_evaluation_split_is_named(self):
    data = DataConfig(qa_train=self.paths["train"], corpus=self.paths["corpus"])
    with self.assertRaisesRegex(ValueError, "RunConfig.eval_split needs the 'test' split but "
                                "DataConfig.qa_test is empty.*\\['train'\\]"):
      load_world(RunConfig(data=data))
    with self.assertRaisesRegex(ValueError, "eval_every > 0 needs the 'validation' split"):
      load_world(RunConfig(data=self.data, eval_every=5))
    self.assertLen(load_world(RunConfig(data=data, eval_split="train")).splits["train"], 3)

  def test_malformed_files_name_the_line(self):
    bad_qa = os.path.join(self.dir, "bad.jsonl")
    with open(bad_qa, "w") as f:
      f.write(json.dumps(TRAIN[0]) + "\n" + json.dumps({"question": "no answers"}) + "\n")
    with self.assertRaisesRegex(QAFormatError, f"^{bad_qa}:2: missing answers"):
      load_world(RunConfig(data=DataConfig(qa_train=bad_qa, qa_test=self.paths["test"],
                                           corpus=self.paths["corpus"])))
    bad_corpus = os.path.join(self.dir, "bad_corpus.jsonl")
    with open(bad_corpus, "w") as f:
      f.write('{"id": "a", "contents": "x"}\n{"id": "a", "contents": "y"}\n')
    with self.assertRaisesRegex(CorpusFormatError, "bad_corpus.jsonl:2: duplicate document id"):
      load_world(RunConfig(data=DataConfig(qa_train=self.paths["train"],
                                           qa_test=self.paths["test"], corpus=bad_corpus)))

  def test_setup_searches_the_file_corpus(self):
    exp = setup(RunConfig(data=self.data, tokenizer_vocab_size=512))
    self.assertEqual(exp.tool.corpus.tokens.shape[0], len(PASSAGES))
    self.assertEqual(passage_text(exp.world.documents[3]), PASSAGES[3][2])   # untitled
    questions = [*exp.world.splits["train"], *exp.world.splits["test"]]
    _, retrieved = exp.respond([q.question for q in questions])
    # BM25 over the question words ranks the passage holding the answer first.
    expected = ["p-hamlet", "p-nile", "p-paris", "p-untitled"]
    self.assertEqual([exp.world.documents[r[0]].doc_id for r in retrieved], expected)
    data, stats = demos.build_demonstrations(
        exp.world, exp.world.splits["train"], exp.tokenizer, exp.respond,
        demos.TeacherConfig(no_search_prob=0.0), max_len=exp.config.rollout.max_len)
    self.assertEqual(stats["searches_per_demo"], 1.0)
    text = exp.tokenizer.decode(data.tokens[0].tolist())
    self.assertEqual(extract_answer(text.split("</information>")[-1]), "Shakespeare")

  def test_passages_are_cut_to_max_passage_tokens(self):
    exp = setup(RunConfig(data=DataConfig(qa_train=self.paths["train"], qa_test=self.paths["test"],
                                          corpus=self.paths["corpus"], max_passage_tokens=5),
                          tokenizer_vocab_size=512))
    self.assertEqual(exp.tool.corpus.tokens.shape[1], 5)

  def test_config_round_trips_through_the_workdir(self):
    config = RunConfig(data=self.data, eval_split="test")
    workdir = tempfile.mkdtemp()
    with open(os.path.join(workdir, workdir_lib.CONFIG_FILE), "w") as f:
      f.write(workdir_lib.config_to_json(config))
    self.assertEqual(workdir_lib.load_config(workdir), config)


class AnswerRecallTest(absltest.TestCase):

  def test_whole_words_as_dpr(self):
    passages = ["The capital of France is Paris!", "Mount Fuji, Japan", "Alaska's coast"]
    self.assertTrue(eval_lib.answer_in_passages(["paris"], passages))
    self.assertTrue(eval_lib.answer_in_passages(["MOUNT  fuji"], passages))
    self.assertTrue(eval_lib.answer_in_passages(["Rome", "japan"], passages))
    self.assertTrue(eval_lib.answer_in_passages(["Alaska"], passages))           # 's splits off
    self.assertFalse(eval_lib.answer_in_passages(["Pari"], passages))            # not a word
    self.assertFalse(eval_lib.answer_in_passages(["France Paris"], passages))    # not contiguous
    self.assertFalse(eval_lib.answer_in_passages(["The Mount Fuji"], passages))  # as DPR: no
    self.assertFalse(eval_lib.answer_in_passages(["!!"], passages))              # no word
    self.assertFalse(eval_lib.answer_in_passages(["paris"], []))

if __name__ == "__main__":
  absltest.main()


class PassageLeadTest(absltest.TestCase):
  """Passages are tokenized the way the policy spells its queries (`passage_lead`)."""

  def test_byte_level_bpe_gets_a_leading_space(self):
    from jaxsearch.data import prompts as prompts_lib  # noqa: PLC0415
    from jaxsearch.models import gguf  # noqa: PLC0415
    tok = gguf.load_gguf_tokenizer(gguf.smollm2_path())
    self.assertEqual(passage_lead(tok, "text"), " ")
    query = prompts_lib.search_query_ids(tok, "text", "Bontemps")
    passage = "Bontemps: United States writer (1902-1973)"
    # Without the lead the title's first token differs from the query's; with it, the
    # passage starts with the query's very ids.
    self.assertNotEqual(tok.encode(passage)[:len(query)], query)
    self.assertEqual(tok.encode(passage_lead(tok, "text") + passage)[:len(query)], query)
    # With one id per tag the query is encode(text): no lead.
    self.assertEqual(passage_lead(tok, "special"), "")

  def test_sentencepiece_gets_none(self):
    from jaxsearch.data.tokenizer import SentencePieceTokenizer  # noqa: PLC0415
    world = load_world(RunConfig())
    tok = SentencePieceTokenizer.train([d.text for d in world.documents][:300], vocab_size=512,
                                       seed=0)
    self.assertEqual(passage_lead(tok, "special"), "")
