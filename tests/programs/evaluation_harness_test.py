"""The evaluation harness (issue 18): QA files' `data_source` and `supporting_doc_ids`, every
metric column checked by hand on hand-built episodes (no model), the RAG prompt in both styles
and protocols, and `experiments.evaluate` end to end (a tiny random Qwen2 `hf:` checkpoint,
untrained; and a training run's workdir, not retrained)."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from absl.testing import absltest

from jaxsearch.data import prompts as prompts_lib
from jaxsearch.data import qa_files
from jaxsearch.data.qa_files import QAExample
from jaxsearch.data.world import Document
from jaxsearch.programs.search_agent import evaluate as eval_lib
from jaxsearch.rewards.combine import weighted_rewards
from jaxsearch.programs.search_agent import harness
from jaxsearch.rollout.search_env import EpisodeStatus
from jaxsearch.types import Rollout
from tests.xla_env import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CITIES = [("Paris", "France"), ("Rome", "Italy"), ("Lima", "Peru"), ("Oslo", "Norway"),
          ("Cairo", "Egypt"), ("Quito", "Ecuador"), ("Hanoi", "Vietnam"), ("Dakar", "Senegal")]


def _jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return path


class QAFileFieldsTest(absltest.TestCase):

  def test_data_source_and_supporting_ids_from_jsonl_and_parquet(self):
    root = tempfile.mkdtemp()
    path = _jsonl(os.path.join(root, "dev.jsonl"), [
        {"id": "a", "question": "q1?", "golden_answers": ["x"], "data_source": "nq",
         "supporting_doc_ids": ["d1", 7, "d1"]},
        {"id": "b", "question": "q2?", "golden_answers": ["y"],
         "metadata": {"data_source": "popqa", "supporting_doc_ids": ["d2"]}},
        {"id": "c", "question": "q3?", "golden_answers": ["z"]}])
    self.assertEqual(qa_files.read_qa_file(path), (
        QAExample("a", "q1?", ("x",), "nq", ("d1", "7")),     # ints as strings, deduplicated
        QAExample("b", "q2?", ("y",), "popqa", ("d2",)),
        QAExample("c", "q3?", ("z",), "", ())))
    parquet = os.path.join(root, "test.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"data_source": "hotpotqa", "question": "q?", "golden_answers": ["g"],
         "extra_info": {"split": "test", "index": 3, "supporting_doc_ids": ["d9", "d8"]}}]),
        parquet)
    self.assertEqual(qa_files.read_qa_file(parquet),
                     (QAExample("test_3", "q?", ("g",), "hotpotqa", ("d9", "d8")),))
    q, = qa_files.to_questions(qa_files.read_qa_file(parquet))
    self.assertEqual((q.source, q.supporting_doc_ids), ("hotpotqa", ("d9", "d8")))
    # Round trip through the writer.
    out = os.path.join(root, "out.jsonl")
    qa_files.write_qa_jsonl(qa_files.read_qa_file(path), out)
    self.assertEqual(qa_files.read_qa_file(out), qa_files.read_qa_file(path))

  def test_malformed_fields_name_the_line(self):
    root = tempfile.mkdtemp()
    for bad, field in (({"data_source": 3}, "'data_source'"),
                       ({"supporting_doc_ids": {"a": 1}}, "'supporting_doc_ids'"),
                       ({"supporting_doc_ids": ["d1", ""]}, "id 1")):
      path = _jsonl(os.path.join(root, "bad.jsonl"),
                    [{"question": "q?", "golden_answers": ["x"]},
                     {"question": "q?", "golden_answers": ["x"], **bad}])
      with self.assertRaisesRegex(qa_files.QAFormatError, rf"bad.jsonl:2: .*{field}"):
        qa_files.read_qa_file(path)

  def test_world_rejects_unknown_supporting_ids(self):
    docs = [Document("d1", "T", "text")]
    with self.assertRaisesRegex(ValueError, "question 'q1' names supporting document 'd9'"):
      qa_files.make_qa_world(docs, {"train": [QAExample("q1", "q?", ("x",), "", ("d9",))]})
    world = qa_files.make_qa_world(docs, {"train": [QAExample("q1", "q?", ("x",), "", ("d1",))]})
    self.assertEqual(world.splits["train"][0].supporting_doc_ids, ("d1",))

  def test_datasets_split_by_source_named_and_cut(self):
    root = tempfile.mkdtemp()
    merged = os.path.join(root, "merged.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"id": f"r{i}", "data_source": src, "question": f"q{i}?", "golden_answers": ["a"]}
        for i, src in enumerate(["nq", "hotpotqa", "nq", "nq", "hotpotqa"])]), merged)
    os.makedirs(os.path.join(root, "bamboogle"))
    flashrag = _jsonl(os.path.join(root, "bamboogle", "test.jsonl"),
                      [{"id": f"b{i}", "question": "q?", "golden_answers": ["a"]}
                       for i in range(3)])
    other = _jsonl(os.path.join(root, "other.jsonl"),
                   [{"id": "o", "question": "q?", "golden_answers": ["a"], "data_source": "nq"}])
    datasets = harness.load_datasets([merged, flashrag, f"mine={other}"], max_questions=2)
    self.assertEqual([(d.name, [q.qid for q in d.questions]) for d in datasets], [
        ("nq", ["r0", "r2"]), ("hotpotqa", ["r1", "r4"]), ("bamboogle", ["b0", "b1"]),
        ("mine", ["o"])])
    self.assertTrue(all(q.source == d.name for d in datasets for q in d.questions))
    with self.assertRaisesRegex(ValueError, "dataset 'nq' comes from both"):
      harness.load_datasets([merged, other])
    self.assertEqual(harness.paper_dataset("2WikiMultihopQA"), "2wikimultihopqa")
    self.assertIsNone(harness.paper_dataset("mine"))


def _world_and_questions():
  docs = [Document("d0", "Paris", "The capital city of a European country."),   # answer: title
          Document("d1", "Rome", "Rome is a city in Italy."),
          Document("d2", "Oslo", "A city in Norway.")]
  examples = [QAExample("q0", "What is the capital of France?", ("Paris",), "nq"),
              QAExample("q1", "Where is Rome?", ("Italy",), "nq", ("d1",)),
              QAExample("q2", "Which country is Oslo in?", ("Norway",), "hotpotqa",
                        ("d2", "d1"))]
  world = qa_files.make_qa_world(docs, {"test": examples})
  return world, list(world.splits["test"])


def _scored(context=None):
  n, t = 3, 8
  rollout = Rollout(
      tokens=np.zeros((n, t), np.int32), policy_mask=np.zeros((n, t), bool),
      env_mask=np.zeros((n, t), bool), turn_ids=np.zeros((n, t), np.int32),
      logp=np.zeros((n, t), np.float32), lengths=np.array([30, 10, 50], np.int32),
      num_searches=np.array([1, 0, 2], np.int32),
      invalid_searches=np.array([0, 0, 1], np.int32),
      retrieved=np.array([[[0, -1], [-1, -1]], [[-1, -1], [-1, -1]], [[2, 0], [1, -1]]],
                         np.int32),
      status=np.array([EpisodeStatus.ANSWERED, EpisodeStatus.ANSWERED,
                       EpisodeStatus.TRUNCATED], np.int32))
  completions = [
      "<search> France capital </search><information> Paris: ... </information>"
      "<answer> Paris </answer>",
      "<answer> It is in Italy </answer>",
      "I think Sweden"]
  return eval_lib.ScoredBatch(rollout, completions, np.array([1.1, 0.1, 0.0], np.float32),
                              {}, context_doc_ids=context)


class MetricsByHandTest(absltest.TestCase):

  def test_answer_contains_gold(self):
    f = eval_lib.answer_contains_gold
    self.assertEqual(f("It is in Italy.", ["italy"]), 1.0)
    self.assertEqual(f("The Eiffel-Tower", ["eiffeltower"]), 1.0)   # both normalised
    self.assertEqual(f("Ital", ["Italy"]), 0.0)
    self.assertEqual(f("Italy", ["the"]), 0.0)                       # gold normalises to ""
    self.assertEqual(f(None, ["Italy"]), 0.0)
    self.assertEqual(f("Romeo", "Rome"), 1.0)                        # a substring, as Search-R1

  def test_support_recall_counts_ids_or_reads_titles(self):
    world, qs = _world_and_questions()
    # No ids: the answer "Paris" is only in d0's title.
    self.assertTrue(eval_lib.support_found(qs[0], [0], world))
    self.assertFalse(eval_lib.answer_in_passages(qs[0].answers, [world.documents[0].text]))
    self.assertFalse(eval_lib.support_found(qs[0], [1, 2, -1], world))
    # Ids: every one must be retrieved, whatever the passages say.
    self.assertFalse(eval_lib.support_found(qs[2], [2], world))
    self.assertTrue(eval_lib.support_found(qs[2], [1, -1, 2], world))
    self.assertFalse(eval_lib.support_found(qs[1], [0], world))   # "Italy" not in d0 anyway

  def test_every_column_per_dataset_and_averaged(self):
    world, qs = _world_and_questions()
    scores = eval_lib.episode_scores(_scored(), qs, world)
    expected = {
        "em": [1, 0, 0], "f1": [1, 0.4, 0], "subem": [1, 1, 0], "format": [1, 1, 0],
        "reward": [1.1, 0.1, 0], "searches": [1, 0, 2], "invalid_searches": [0, 0, 1],
        "answered": [1, 1, 0], "truncated": [0, 0, 1], "support_recall": [1, 0, 1],
        "length": [30, 10, 50]}
    self.assertEqual(set(scores), set(expected))
    for k, v in expected.items():
      np.testing.assert_allclose(scores[k], v, rtol=1e-6, err_msg=k)
    m = eval_lib.dataset_metrics(scores, [q.source for q in qs])
    self.assertEqual(list(m["per_dataset"]), ["nq", "hotpotqa"])
    nq, hp = m["per_dataset"]["nq"], m["per_dataset"]["hotpotqa"]
    for got, want in ((nq, dict(n=2, em=0.5, f1=0.7, subem=1, format=1, searches=0.5,
                                support_recall=0.5, answered=1)),
                      (hp, dict(n=1, em=0, f1=0, subem=0, format=0, searches=2,
                                support_recall=1, answered=0)),
                      # The average weighs each dataset the same (Search-R1's "Avg.").
                      (m["average"], dict(n=2, em=0.25, f1=0.35, subem=0.5, format=0.5,
                                          searches=1.25, support_recall=0.75, answered=0.5)),
                      (m["overall"], dict(n=3, em=1 / 3, f1=1.4 / 3, subem=2 / 3,
                                          searches=1, support_recall=2 / 3))):
      for k, v in want.items():
        self.assertAlmostEqual(got[k], v, msg=k)
    # episode_metrics: the overall means (+ hop splits: all one-hop here).
    em = eval_lib.episode_metrics(_scored(), qs, world)
    self.assertAlmostEqual(em["f1"], 1.4 / 3)
    self.assertAlmostEqual(em["em_1hop"], 1 / 3)
    self.assertNotIn("em_2hop", em)

  def test_open_answers_of_the_direct_and_rag_prompts(self):
    # Prompts that end with <answer>: the answer runs to </answer> or to the end of the turn;
    # format still asks for the model's own </answer>.
    world, qs = _world_and_questions()

    class Tok:
      def decode(self, ids):
        return {1: " Paris </answer>", 2: " It is Italy", 3: " Sweden, I think"}[ids[0]]

    r = _scored().rollout._replace(tokens=np.array([[9, 1], [9, 2], [9, 3]], np.int32),
                                   lengths=np.array([2, 2, 2], np.int32))
    scored = eval_lib.score_rollout(r, np.array([1, 1, 1]), [q.answers for q in qs], Tok(),
                                    weighted_rewards({"exact_match": 1.0, "format": 0.1}),
                                    answer_open=True)
    self.assertEqual(scored.answers, ["Paris", "It is Italy", "Sweden, I think"])
    self.assertEqual(scored.completions[0], "<answer> Paris </answer>")
    scores = eval_lib.episode_scores(scored, qs, world)
    np.testing.assert_array_equal(scores["em"], [1, 0, 0])
    np.testing.assert_array_equal(scores["subem"], [1, 1, 0])
    np.testing.assert_array_equal(scores["format"], [1, 0, 0])
    self.assertEqual(eval_lib.open_answer(" a </answer> b </answer>"), "a")

  def test_rag_context_documents_count_for_support(self):
    world, qs = _world_and_questions()
    context = np.array([[-1, -1], [1, 0], [-1, -1]])
    scores = eval_lib.episode_scores(_scored(context), qs, world)
    np.testing.assert_array_equal(scores["support_recall"], [1, 1, 1])

  def test_em_table_with_paper_rows(self):
    datasets = [harness.Dataset("hotpotqa", ()), harness.Dataset("NQ", ()),
                harness.Dataset("mine", ())]
    result = {"per_dataset": {"hotpotqa": {"em": 0.25}, "NQ": {"em": 0.5}, "mine": {"em": 1.0}},
              "average": {"em": 0.5833}}
    text = harness.em_table({"agent": result}, datasets)
    lines = text.splitlines()
    self.assertEqual(lines[0].split(), ["EM", "NQ", "hotpotqa", "mine", "Avg"])  # paper order
    self.assertEqual(lines[1].split(), ["agent", "0.500", "0.250", "1.000", "0.583"])
    ppo = next(l for l in lines if l.startswith("Search-R1 PPO, Qwen2.5-7B base (paper)"))
    self.assertEqual(ppo.split()[-3:], ["0.480", "0.433", "0.431"])   # nq, hotpotqa, avg
    rag = next(l for l in lines if l.startswith("RAG, Qwen2.5-3B (paper)"))
    self.assertEqual(rag.split()[-1], "0.270")
    self.assertIn("arXiv 2503.09516 v5", text)
    self.assertNotIn("(paper)", harness.em_table({"agent": result}, datasets[2:]))


class FakeTokenizer:
  """Characters as ids (+ 10); tags 900+; a chat template that brackets the user message."""

  bos_id, pad_id = 1, 0
  chat_template = "fake"
  TAGS = ("<search>", "</search>", "<information>", "</information>", "<answer>", "</answer>")

  def encode(self, text):
    return [ord(c) + 10 for c in text]

  def decode(self, ids):
    return "".join(self.TAGS[i - 900] if i >= 900 else chr(i - 10) for i in ids if i > 1)

  def tag_id(self, tag):
    return 900 + self.TAGS.index(tag)

  def apply_chat_template(self, messages, add_generation_prompt):
    assert add_generation_prompt
    return self.encode("".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]")


class RagPromptTest(absltest.TestCase):

  def test_block_follows_the_question_then_the_answer_tag(self):
    tok = FakeTokenizer()
    block = [902, *tok.encode(" Paris: capital of France "), 903]
    cfg = prompts_lib.PromptConfig(rag_instruction="Read and answer: {question}")
    for style in ("plain", "chat"):
      for protocol in ("special", "text"):
        config = prompts_lib.PromptConfig(style=style, rag_instruction=cfg.rag_instruction)
        ids = prompts_lib.prompt_ids(tok, "Capital?", config, protocol=protocol,
                                     information=block)
        answer = [904] if protocol == "special" else tok.encode("<answer>")
        head = ([1, *tok.encode("Question: Capital?")] if style == "plain" else
                tok.encode("[user]Read and answer: Capital?[assistant]"))
        self.assertEqual(ids, head + block + answer, (style, protocol))
    with self.assertRaisesRegex(ValueError, "closed-book or RAG"):
      prompts_lib.prompt_ids(tok, "q", protocol="text", closed_book=True, information=block)
    with self.assertRaisesRegex(ValueError, "empty"):
      prompts_lib.prompt_ids(tok, "q", protocol="text", information=[])
    with self.assertRaisesRegex(ValueError, "rag_instruction"):
      prompts_lib.PromptConfig(rag_instruction="no slot")


def _write_data(root):
  corpus = _jsonl(os.path.join(root, "corpus.jsonl"), [
      {"id": f"doc{i}", "contents": f'"{city}"\n{city} is the capital of {country}.'}
      for i, (city, country) in enumerate(CITIES)])
  merged = os.path.join(root, "test.parquet")
  pq.write_table(pa.table({
      "id": [f"test_{i}" for i in range(6)],
      "data_source": ["nq" if i % 2 else "hotpotqa" for i in range(6)],
      "prompt": [[{"role": "user", "content": f"Answer it. Question: What country has {c} as "
                                              "its capital?\n"}] for c, _ in CITIES[:6]],
      "reward_model": [{"style": "rule", "ground_truth": {"target": [k]}}
                       for _, k in CITIES[:6]]}), merged)
  mine = _jsonl(os.path.join(root, "mine.jsonl"), [
      {"id": f"m{i}", "question": f"Which country is {c} in?", "golden_answers": [k],
       "supporting_doc_ids": [f"doc{6 + i}"]} for i, (c, k) in enumerate(CITIES[6:])])
  return corpus, merged, mine


def _hf_bindings(ckpt, corpus, qa):
  return [f"experiment.RunConfig.pretrained = 'hf:{ckpt}'", f"QA_TRAIN = '{qa}'",
          f"QA_TEST = '{qa}'", f"CORPUS = '{corpus}'",
          "search_env.RolloutConfig.max_len = 384", "transformer.TransformerConfig.max_len = 384",
          "MAX_PASSAGE_TOKENS = 24", "experiment.RunConfig.eval_batch_size = 4",
          'prompts.PromptConfig.instruction = "Search with <search> q </search>, answer with '
          '<answer> a </answer>. {question}"',
          'prompts.PromptConfig.closed_book_instruction = "Answer with <answer> a </answer>. '
          '{question}"',
          'prompts.PromptConfig.rag_instruction = "Read, answer with <answer> a </answer>. '
          '{question}"']


HF_GIN = ("gin/experiments/qa_file.gin", "gin/models/smollm2_135m.gin")


class PretrainedEndToEndTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    from tests.data.hf_tokenizer_fixtures import write_tokenizer_dir  # noqa: PLC0415
    from tests.models import hf_fixtures as fx  # noqa: PLC0415
    cls.root = tempfile.mkdtemp()
    cls.corpus, cls.merged, cls.mine = _write_data(cls.root)
    cls.ckpt = fx.save(fx.build("qwen2_bias_tied", vocab_size=320))
    write_tokenizer_dir(cls.ckpt, "chatml")
    cls.bindings = _hf_bindings(cls.ckpt, cls.corpus, cls.merged)

  def test_rag_prompt_holds_the_retrieved_block(self):
    from jaxsearch.data import demos  # noqa: PLC0415
    from jaxsearch.programs.search_agent import inspect_lib  # noqa: PLC0415
    from experiments.gin_agent import run_config_from_gin  # noqa: PLC0415
    config = run_config_from_gin(HF_GIN, self.bindings, (REPO,))
    exp, params, where = inspect_lib.load_pretrained_agent(config)
    self.assertIn("no training", where)
    self.assertEqual(exp.env.protocol, "text")
    qs = list(exp.world.splits["test"][:4])
    blocks, doc_ids = eval_lib.retrieve_for_questions(exp, qs)
    self.assertEqual(doc_ids.shape, (4, exp.config.rollout.top_k))
    answer = exp.tokenizer.encode("<answer>")
    for q, block, ids in zip(qs, blocks, doc_ids):
      prompt = demos.prompt_ids(exp.tokenizer, q, exp.config.prompt, protocol="text",
                                information=block)
      self.assertEqual(prompt[-len(answer) - len(block):], block + answer)
      text = exp.tokenizer.decode(prompt, skip_special=False)
      self.assertIn("<information>", text)
      self.assertIn("Read, answer with", text)            # rag_instruction in the user turn
      self.assertLess(text.index("<|im_start|>assistant"), text.index("<information>"))
      city = q.question.split(" has ")[1].split(" as ")[0]
      self.assertIn(city, [exp.world.documents[j].title for j in ids])   # BM25 finds it
    # The RAG prompts are longer than the world's: the evaluation widens, setup is untouched.
    rag = eval_lib.prompt_width_for(exp, max(len(demos.prompt_ids(
        exp.tokenizer, q, exp.config.prompt, protocol="text", information=b))
        for q, b in zip(qs, blocks)), what="rag")
    self.assertGreater(rag, exp.prompt_width)
    metrics, scored = eval_lib.evaluate(exp, params, qs, __import__("jax").random.key(0),
                                        method="rag")
    self.assertEqual(metrics["searches"], 0.0)
    self.assertEqual(metrics["support_recall"], 1.0)       # the block's passages count
    np.testing.assert_array_equal(scored.context_doc_ids, doc_ids)

  def test_command_on_merged_and_flashrag_files(self):
    out_json = os.path.join(self.root, "results.json")
    out = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", *(f"--gin_file={f}" for f in HF_GIN),
         *(f"--gin_param={b}" for b in self.bindings), f"--qa_file={self.merged}",
         f"--qa_file={self.mine}", "--max_questions=2", f"--out={out_json}"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL)
    self.assertEqual(out.returncode, 0, out.stderr[-4000:])
    self.assertIn("(pretrained, no training)", out.stdout)
    header = next(l for l in out.stdout.splitlines() if l.startswith("EM "))
    self.assertEqual(header.split(), ["EM", "nq", "hotpotqa", "mine", "Avg"])
    self.assertIn("Search-R1 PPO, Qwen2.5-7B base (paper)", out.stdout)
    with open(out_json) as f:
      result = json.load(f)
    self.assertEqual([(d["name"], d["n"]) for d in result["datasets"]],
                     [("hotpotqa", 2), ("nq", 2), ("mine", 2)])
    self.assertEqual(list(result["results"]), ["agent", "direct", "rag"])
    for method, r in result["results"].items():
      episodes = r["episodes"]
      self.assertLen(episodes, 6)
      for name, m in r["per_dataset"].items():      # per dataset = mean of its episodes
        rows = [e for e in episodes if e["dataset"] == name]
        for k in ("em", "f1", "subem", "searches", "support_recall"):
          self.assertAlmostEqual(m[k], np.mean([e[k] for e in rows]), msg=(method, name, k))
      for k in ("em", "f1", "support_recall"):        # average = unweighted over datasets
        self.assertAlmostEqual(r["average"][k],
                               np.mean([m[k] for m in r["per_dataset"].values()]))
        self.assertAlmostEqual(result["summary"][f"{method}_{k}"], r["average"][k])
    self.assertEqual(result["results"]["direct"]["average"]["searches"], 0.0)
    self.assertEqual(result["results"]["rag"]["average"]["support_recall"], 1.0)
    self.assertEqual(result["reference"]["em"]["Search-R1 GRPO, Qwen2.5-3B base"]["avg"], 0.312)

  def test_inspect_agent_runs_an_untrained_hf_policy(self):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.inspect_agent",
         *(f"--gin_file={f}" for f in HF_GIN), *(f"--gin_param={b}" for b in self.bindings),
         "--num=1"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL)
    self.assertEqual(out.returncode, 0, out.stderr[-4000:])
    self.assertIn("(pretrained, no training)", out.stdout)
    self.assertIn("question  What country has Paris as its capital?", out.stdout)


@pytest.mark.slow
class WorkdirEndToEndTest(absltest.TestCase):

  def test_evaluates_a_training_run_without_retraining_it(self):
    from tests.integration.launcher_test import launch  # noqa: PLC0415
    workdir = tempfile.mkdtemp()
    run = launch(workdir, "RL_STEPS = 0")
    self.assertEqual(run.returncode, 0, run.stderr[-4000:])

    def snapshot():
      return sorted((os.path.relpath(os.path.join(d, f), workdir),
                     os.path.getmtime(os.path.join(d, f)))
                    for d, _, files in os.walk(workdir) for f in files)

    before = snapshot()
    out_json = os.path.join(tempfile.mkdtemp(), "r.json")
    out = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}",
         f"--out={out_json}"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL)
    self.assertEqual(out.returncode, 0, out.stderr[-4000:])
    self.assertEqual(snapshot(), before)                 # nothing written, nothing trained
    self.assertNotIn("[sft", out.stdout)
    with open(out_json) as f:
      result = json.load(f)
    self.assertEqual(result["agent"]["checkpoint"], "sft step 3")
    self.assertEqual([(d["name"], d["n"]) for d in result["datasets"]], [("test", 16)])
    # The same checkpoint, questions, prompts and key as the training run's own evaluations
    # (greedy): the same figures.
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    for method, name in (("agent", "sft"), ("direct", "closed_book")):
      for k in ("em", "f1", "searches", "support_recall"):
        self.assertAlmostEqual(result["results"][method]["average"][k], summary[f"{name}_{k}"],
                               msg=(method, k))
    self.assertEqual(result["results"]["direct"]["average"]["searches"], 0.0)
    self.assertIn("rag", result["results"])


if __name__ == "__main__":
  absltest.main()
