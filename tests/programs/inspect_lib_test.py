"""Inspection: a hand-built episode is split into turns and rendered with its query, passages,
information block, answer and reward; an agent rebuilt from a workdir runs on questions."""
from __future__ import annotations

import functools
import io
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

from experiments import inspect_agent as inspect_cli
from jaxsearch.checkpoint import Checkpointer
from jaxsearch.data.tokenizer import save_tokenizer
from jaxsearch.data.world import WorldConfig
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.rollout.search_env import EpisodeStatus, RolloutConfig
from jaxsearch.programs.search_agent import evaluate as eval_lib
from jaxsearch.programs.search_agent import inspect_lib
from jaxsearch.programs.search_agent.experiment import RunConfig, setup
from jaxsearch.train.optim import make_optimizer
from jaxsearch.programs.search_agent.workdir import CONFIG_FILE, config_to_json
from jaxsearch.types import Rollout
from tests.xla_env import subprocess_env

CONFIG = RunConfig(
    world=WorldConfig(num_people=60, num_distractors=20, train_size=100, validation_size=10,
                      test_size=16),
    model=TransformerConfig(vocab_size=1024, d_model=32, num_layers=1, num_heads=4,
                            num_kv_heads=2, mlp_dim=64, max_len=128),
    rollout=RolloutConfig(max_len=128), eval_batch_size=16)


@functools.lru_cache(maxsize=None)
def experiment():
  return setup(CONFIG)


def make_workdir(exp, phases=("rl",), step=1) -> str:
  """A workdir as `loop.run` leaves it (config, tokenizer, checkpoints) with untrained params."""
  workdir = tempfile.mkdtemp()
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config_to_json(exp.config))
  save_tokenizer(exp.tokenizer, os.path.join(workdir, "tokenizer.model"))
  params, _ = exp.init_params(jax.random.key(0))
  for phase in phases:
    cfg = exp.config.rl if phase == "rl" else exp.config.sft
    state = {"params": params, "opt_state": make_optimizer(cfg.optimizer, cfg.steps).init(params),
             "step": jnp.asarray(step, jnp.int32)}
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints", phase))
    ckpt.save(step, state, {"phase": phase})
    ckpt.close()
  return workdir


def hand_built_episode(exp, question, first_query, second_query, answer):
  """prompt | <search>q1</search> info | <search> </search> invalid | <search>q2</search> info |
  <answer>a</answer>, exactly as the environment would insert the blocks."""
  tok = exp.tokenizer
  prompts, lens = exp.encode_prompts([question])
  blocks, doc_ids = exp.respond([first_query, second_query])
  pieces = [(prompts[0, : lens[0]].tolist(), 0, "prompt"),
            (tok.encode(f"<search> {first_query} </search>"), 1, "policy"), (blocks[0], 1, "env"),
            (tok.encode("<search> </search>"), 2, "policy"), (list(exp.env.invalid_block), 2, "env"),
            (tok.encode(f"<search> {second_query} </search>"), 3, "policy"), (blocks[1], 3, "env"),
            (tok.encode(f"<answer> {answer} </answer>"), 4, "policy")]
  T = exp.config.rollout.max_len
  tokens = np.full((1, T), tok.pad_id, np.int32)
  policy, env = np.zeros((1, T), bool), np.zeros((1, T), bool)
  turns = np.zeros((1, T), np.int32)
  t = 0
  for ids, turn, kind in pieces:
    tokens[0, t: t + len(ids)] = ids
    turns[0, t: t + len(ids)] = turn
    policy[0, t: t + len(ids)] = kind == "policy"
    env[0, t: t + len(ids)] = kind == "env"
    t += len(ids)
  S, K = exp.config.rollout.max_searches, exp.config.rollout.top_k
  retrieved = np.full((1, S, K), -1, np.int32)
  retrieved[0, 0], retrieved[0, 1] = doc_ids[0], doc_ids[1]
  rollout = Rollout(tokens=tokens, policy_mask=policy, env_mask=env, turn_ids=turns,
                    logp=np.zeros((1, T), np.float32), lengths=np.array([t], np.int32),
                    num_searches=np.array([2], np.int32), invalid_searches=np.array([1], np.int32),
                    retrieved=retrieved, status=np.array([EpisodeStatus.ANSWERED], np.int32))
  scored = eval_lib.score_rollout(rollout, lens, [question.answers], tok, exp.reward_fn)
  return scored, doc_ids


class FormatTrajectoryTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.exp = experiment()
    # A two-hop question: its ideal queries retrieve its supporting documents.
    self.q = next(q for q in self.exp.world.splits["test"] if q.hops == 2)
    self.scored, self.doc_ids = hand_built_episode(
        self.exp, self.q, self.q.search_queries[0], self.q.search_queries[1], self.q.answers[0])

  def test_turns(self):
    prompt, turns = inspect_lib.episode_turns(self.exp, self.scored, 0)
    self.assertIn(self.q.question, prompt)
    self.assertEqual([t.kind for t in turns], ["search", "invalid", "search", "final"])
    self.assertEqual([t.query for t in turns],
                     [self.q.search_queries[0], "", self.q.search_queries[1], None])
    # The invalid search uses no slot of `retrieved`: the third turn gets the second slot.
    self.assertEqual(turns[0].doc_indices, tuple(self.doc_ids[0]))
    self.assertEqual(turns[1].doc_indices, ())
    self.assertEqual(turns[2].doc_indices, tuple(self.doc_ids[1]))
    self.assertTrue(turns[0].inserted.startswith("<information>"))
    self.assertIn("invalid search", turns[1].inserted)
    self.assertEqual(turns[3].inserted, "")
    # Nothing lost: the turns put back together are the completion (up to spacing).
    joined = "".join(t.generated + t.inserted for t in turns)
    self.assertEqual("".join(joined.split()), "".join(self.scored.completions[0].split()))

  def test_rendering(self):
    text = inspect_lib.format_trajectory(self.exp, self.scored, 0, self.q, passage_chars=0,
                                         information_chars=0)
    lines = text.splitlines()
    self.assertEqual(lines[0], f"question  {self.q.question}  [{self.q.qid}, 2-hop]")
    self.assertEqual(lines[1], "gold      " + " | ".join(self.q.answers))
    self.assertIn(f"  search  {self.q.search_queries[0]}", lines)
    self.assertIn(f"  search  {self.q.search_queries[1]}", lines)
    # Every retrieved passage, full text (passage_chars=0), * on the supporting documents.
    docs = self.exp.world.documents
    for ids in self.doc_ids:
      for rank, d in enumerate(ids, start=1):
        doc = docs[d]
        mark = "*" if doc.doc_id in self.q.supporting_doc_ids else " "
        self.assertIn(f"  {rank}. {mark} {doc.title} ({doc.doc_id}): {doc.text}", lines)
    # The ideal queries find both supporting documents, so two lines carry a *.
    self.assertLen([ln for ln in lines if ln.startswith(("  1. *", "  2. *"))], 2)
    self.assertLen([ln for ln in lines if ln.startswith("  info    <information>")], 2)
    self.assertTrue(any(ln.startswith("  invalid <information>invalid search") or
                        ln.startswith("  invalid <information> invalid search") for ln in lines),
                    text)
    self.assertIn("<answer>", text)
    self.assertEqual(lines[-3], f"answer    {self.q.answers[0]}  (correct)")
    # exact_match 1, format 0 (an empty query breaks the format): 1.0 * 1 + 0.1 * 0.
    self.assertEqual(lines[-2], "reward    1.000  (exact_match=1.000 format=0.000)")
    self.assertEqual(lines[-1], f"episode   answered, 2 searches, 1 invalid, "
                                f"{int(self.scored.rollout.lengths[0])} tokens")

  def test_shortening(self):
    self.assertEqual(inspect_lib.shorten("a  b\nc", 0), "a b c")
    self.assertEqual(inspect_lib.shorten("abcdefghij", 6), "abc...")
    self.assertEqual(inspect_lib.shorten("abcdef", 6), "abcdef")
    text = inspect_lib.format_trajectory(self.exp, self.scored, 0, self.q, passage_chars=30)
    passages = [ln for ln in text.splitlines() if ln.startswith(("  1.", "  2."))]
    self.assertNotEmpty(passages)
    for ln in passages:
      self.assertLessEqual(len(ln), len("  1. * ") + 30)

  def test_typed_question(self):
    q = inspect_lib.typed_question("  Where is X?  ", [" Y "])
    self.assertEqual((q.question, q.answers, q.supporting_doc_ids), ("Where is X?", ("Y",), ()))
    with self.assertRaisesRegex(ValueError, "must not be empty"):
      inspect_lib.typed_question("   ")


class WorkdirAgentTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = make_workdir(experiment(), phases=("sft", "rl"), step=3)
    cls.exp, cls.params, cls.where = inspect_lib.load_agent(cls.workdir)

  def test_load_agent_takes_the_latest_phase(self):
    exp, params, where = self.exp, self.params, self.where
    self.assertEqual(where, "rl step 3")
    self.assertEqual(exp.config, CONFIG)
    self.assertEqual(exp.tokenizer.vocab_size, experiment().tokenizer.vocab_size)
    expected, _ = experiment().init_params(jax.random.key(0))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, sft_params, where = inspect_lib.load_agent(self.workdir, "sft")
    self.assertEqual(where, "sft step 3")
    for a, b in zip(jax.tree.leaves(sft_params), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    only_sft = make_workdir(experiment(), phases=("sft",), step=2)
    self.assertEqual(inspect_lib.load_agent(only_sft)[2], "sft step 2")
    with self.assertRaisesRegex(FileNotFoundError, "has no checkpoint yet"):
      inspect_lib.load_agent(make_workdir(experiment(), phases=()))

  def test_cli_shows_split_questions(self):
    exp, params = self.exp, self.params
    questions = exp.world.splits["validation"][:3]
    out = io.StringIO()
    inspect_cli.show(exp, params, questions, out)
    text = out.getvalue()
    self.assertEqual(text.count(inspect_cli.SEPARATOR), 3)
    for q in questions:
      self.assertIn(f"question  {q.question}  [{q.qid}", text)
      self.assertIn("gold      " + " | ".join(q.answers), text)
    self.assertEqual(text.count("\nreward    "), 3)
    self.assertEqual(text.count("\nturn 1 "), 3)   # an untrained policy still takes a turn
    # Same episodes as the evaluation the training loop runs (greedy, same key).
    _, scored = eval_lib.evaluate(exp, params, questions,
                                  jax.random.fold_in(jax.random.key(exp.config.seed), 2))
    for i, q in enumerate(questions):
      self.assertIn(inspect_lib.format_trajectory(exp, scored, i, q), text)

  def test_interactive_reads_until_an_empty_line(self):
    exp, params = self.exp, self.params
    q = exp.world.splits["test"][0]
    stdin = io.StringIO(f"{q.question} || {q.answers[0]} | other\n"
                        "Who is nobody?\n" + "word " * 500 + "\n\nnever read\n")
    out = io.StringIO()
    self.assertEqual(inspect_cli.interact(exp, params, stdin, out), 3)
    text = out.getvalue()
    self.assertEqual(text.count(inspect_cli.SEPARATOR), 2)
    self.assertIn(f"question  {q.question}  [typed]", text)
    self.assertIn(f"gold      {q.answers[0]} | other", text)
    self.assertIn("question  Who is nobody?  [typed]", text)
    self.assertIn("gold      (none given)", text)
    # Too long for RolloutConfig.max_len: reported, the loop goes on. (Shorter ones than
    # that run, wider than the world's prompts: `evaluate.prompt_width_for`.)
    self.assertIn("error: the agent prompts need", text)
    self.assertNotIn("never read", text)

  @pytest.mark.slow
  def test_command_line_with_piped_stdin(self):
    q = self.exp.world.splits["test"][1]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = subprocess_env()
    out = subprocess.run(
        [sys.executable, "-m", "experiments.inspect_agent", f"--workdir={self.workdir}",
         "--interactive", "--passage_chars=40"],
        input=f"{q.question} || {q.answers[0]}\n", cwd=repo, env=env, capture_output=True,
        text=True, timeout=600)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    self.assertIn(f"agent: {self.workdir} (rl step 3)", out.stdout)
    self.assertEqual(out.stdout.count(inspect_cli.SEPARATOR), 1)
    self.assertIn(f"question  {q.question}  [typed]", out.stdout)
    self.assertIn(f"gold      {q.answers[0]}", out.stdout)
    self.assertIn("\nreward    ", out.stdout)


if __name__ == "__main__":
  absltest.main()
