"""Demonstrations: the teacher's habits, and trajectories in the rollout's exact token format."""
import collections

import numpy as np
from absl.testing import absltest

from jaxsearch.data import demos
from jaxsearch.data.world import WorldConfig
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.programs.search_agent.experiment import RunConfig, setup

WORLD = WorldConfig(num_people=60, num_distractors=20, train_size=200, validation_size=10,
                    test_size=20)


class DemosTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.exp = setup(RunConfig(world=WORLD, model=TransformerConfig(vocab_size=1, d_model=16,
                                                                   num_layers=1, mlp_dim=32)))

  def test_teacher_habits_have_the_configured_rates(self):
    world = self.exp.world
    cfg = demos.TeacherConfig(no_search_prob=0.2, stop_early_prob=0.6, seed=1)
    rng = np.random.default_rng(0)
    outcome = collections.Counter()
    for _ in range(5):
      for q in world.splits["train"]:
        queries, answer = demos.teacher_plan(q, world, cfg, rng)
        if not queries:
          outcome["guess"] += 1
          self.assertIn(answer, world.answer_values(q.kind))
        elif len(queries) < q.hops:
          outcome["early"] += 1
          self.assertEqual(answer, q.bridge_answers[0])   # the bridge entity, not a guess
        else:
          outcome["full", q.hops] += 1
          self.assertEqual(list(queries), list(q.search_queries))
          self.assertEqual(answer, q.answers[0])
    n = 5 * len(world.splits["train"])
    two_hop = 5 * sum(q.hops == 2 for q in world.splits["train"])
    self.assertAlmostEqual(outcome["guess"] / n, 0.2, delta=0.03)
    self.assertAlmostEqual(outcome["early"] / two_hop, 0.8 * 0.6, delta=0.04)
    clean = demos.TeacherConfig(no_search_prob=0.0, stop_early_prob=0.0)
    for q in world.splits["train"][:50]:
      self.assertEqual(demos.teacher_plan(q, world, clean, rng), (list(q.search_queries),
                                                                  q.answers[0]))

  def test_demonstration_tokens_and_masks(self):
    exp, tok = self.exp, self.exp.tokenizer
    qs = [q for q in exp.world.splits["train"] if q.hops == 2][:4]
    clean = demos.TeacherConfig(no_search_prob=0.0, stop_early_prob=0.0)
    data, stats = demos.build_demonstrations(exp.world, qs, tok, exp.respond, clean, max_len=192)
    self.assertEqual(stats["full_plan_fraction"], 1.0)
    self.assertEqual(stats["teacher_retrieval_hit_rate"], 1.0)
    blocks, _ = exp.respond([query for q in qs for query in q.search_queries])
    tag = tok.tag_id
    for i, q in enumerate(qs):
      expected = [tok.bos_id, *tok.encode(demos.PROMPT_TEMPLATE.format(question=q.question))]
      mask = [False] * len(expected)
      for hop, query in enumerate(q.search_queries):
        action = [tag("<search>"), *tok.encode(query), tag("</search>")]
        expected += action + blocks[2 * i + hop]
        mask += [True] * len(action) + [False] * len(blocks[2 * i + hop])
      action = [tag("<answer>"), *tok.encode(q.answers[0]), tag("</answer>")]
      expected += action
      mask += [True] * len(action)
      n = len(expected)
      np.testing.assert_array_equal(data.tokens[i, :n], expected)
      np.testing.assert_array_equal(data.tokens[i, n:], tok.pad_id)
      np.testing.assert_array_equal(data.loss_mask[i, :n], mask)
      self.assertFalse(data.loss_mask[i, n:].any())
      # The information blocks carry the supporting passages, so the answer can be copied.
      self.assertIn(q.answers[0], tok.decode(data.tokens[i, :n].tolist()))

  def test_too_long_demonstrations_raise(self):
    exp = self.exp
    with self.assertRaisesRegex(ValueError, "max_len=20"):
      demos.build_demonstrations(exp.world, exp.world.splits["train"][:3], exp.tokenizer,
                                 exp.respond, demos.TeacherConfig(no_search_prob=0.0), max_len=20)

  def test_closed_book_prompts_end_with_answer_tag(self):
    exp = self.exp
    prompts, lens = exp.encode_prompts(exp.world.splits["test"][:3], closed_book=True)
    self.assertEqual(prompts.shape[1], exp.prompt_width)
    for row, n in zip(prompts, lens):
      self.assertEqual(row[n - 1], exp.tokenizer.tag_id("<answer>"))
      self.assertEqual(row[0], exp.tokenizer.bos_id)


if __name__ == "__main__":
  absltest.main()
