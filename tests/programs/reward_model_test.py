"""Reward-model experiment: preference pairs, batches, the update and the evaluation on
hand-made inputs, one tiny run (files, cadence, resume, the saved model), and the gin file."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch import metrics as metrics_lib
from jaxsearch.data import demos
from jaxsearch.data.questions import unique_questions
from jaxsearch.data.world import WorldConfig
from jaxsearch.models.heads import RewardModel, ValueHeadConfig
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.rewards.qa import REWARDS
from jaxsearch.programs import reward_model as rm
from jaxsearch.train import sharding
from jaxsearch.train.optim import OptimizerConfig, make_optimizer
from jaxsearch.train.state import TrainState
from tests import compiled

SMALL_WORLD = WorldConfig(num_people=60, num_cities=16, num_countries=6, num_companies=12,
                          num_distractors=20, train_size=120, validation_size=16, test_size=40)


def small_config(**kw) -> rm.RewardModelConfig:
  base = dict(
      world=SMALL_WORLD, tokenizer_vocab_size=512,
      model=TransformerConfig(vocab_size=512, d_model=32, num_layers=1, num_heads=2,
                              num_kv_heads=2, mlp_dim=64),
      head=ValueHeadConfig(), steps=40, batch_size=16, pairs_per_question=3, lm_coef=1.0,
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5), eval_batch_size=64,
      checkpoint_every=20, extra_train_worlds=1)
  base.update(kw)
  return rm.RewardModelConfig(**base)


def episode_text(tokenizer, data, row, question) -> str:
  """The completion after the prompt, decoded as the RL loop decodes it."""
  prompt_len = len(demos.prompt_ids(tokenizer, question))
  return tokenizer.decode(data.tokens[row, prompt_len: data.lengths[row]].tolist())


class PreferencePairsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = small_config()
    cls.exp = rm._environment(cls.config, None, cls.config.tokenizer_vocab_size)
    cls.questions = unique_questions(cls.exp.world.splits["test"])
    cls.data = rm.build_preference_pairs(cls.exp.world, cls.questions, cls.exp.tokenizer,
                                         cls.exp.respond, seed=3)

  def test_exact_match_agrees_with_every_preference(self):
    # The rule-based reward pays 1 for every chosen episode and 0 for every rejected one.
    em, fmt = REWARDS.get("exact_match"), REWARDS.get("format")
    tok, d = self.exp.tokenizer, self.data
    for c, r, q in zip(d.chosen, d.rejected, d.question):
      q = self.questions[q]
      chosen, rejected = episode_text(tok, d, c, q), episode_text(tok, d, r, q)
      self.assertEqual(float(em([chosen], [q.answers])[0]), 1.0, chosen)
      self.assertEqual(float(fmt([chosen])[0]), 1.0, chosen)
      self.assertEqual(float(em([rejected], [q.answers])[0]), 0.0, rejected)

  def test_kinds(self):
    d = self.data
    kinds = [rm.REJECTION_KINDS[k] for k in d.kind]
    # Held-out pairs: every applicable kind once per question; stop_early on 2-hop only.
    for qi, q in enumerate(self.questions):
      got = sorted(k for k, i in zip(kinds, d.question) if i == qi)
      expected = sorted(rm.REJECTION_KINDS if q.hops == 2 else
                        [k for k in rm.REJECTION_KINDS if k != "stop_early"])
      self.assertEqual(got, expected)
    tok = self.exp.tokenizer
    for c, r, k, qi in zip(d.chosen, d.rejected, kinds, d.question):
      q = self.questions[qi]
      text = episode_text(tok, d, r, q)
      searches = text.count("<search>")
      if k == "no_search":
        self.assertEqual(searches, 0)
      elif k == "stop_early":
        self.assertEqual(searches, 1)
        self.assertTrue(text.endswith(f"<answer> {q.bridge_answers[0]}</answer>"), text)
      elif k == "wrong_answer":
        self.assertEqual(searches, q.hops)
        self.assertEqual(float(REWARDS.get("format")([text])[0]), 1.0)
      else:
        self.assertFalse(text.endswith("</answer>"), text)
      self.assertEqual(episode_text(tok, d, c, q).count("<search>"), q.hops)

  def test_chosen_episodes_are_the_teachers_full_plans(self):
    # A teacher that never skips or stops early writes exactly the chosen episodes.
    teacher = demos.TeacherConfig(no_search_prob=0.0, stop_early_prob=0.0)
    demo, _ = demos.build_demonstrations(self.exp.world, self.questions, self.exp.tokenizer,
                                         self.exp.respond, teacher, max_len=192)
    chosen_rows = np.unique(self.data.chosen)
    self.assertLen(chosen_rows, len(self.questions))
    width = self.data.tokens.shape[1]
    np.testing.assert_array_equal(self.data.tokens[chosen_rows], demo.tokens[:, :width])
    # The agent mask marks the tokens the teacher wrote (its SFT loss mask).
    np.testing.assert_array_equal(self.data.agent_mask[chosen_rows], demo.loss_mask[:, :width])

  def test_pairs_per_question_and_seeds(self):
    train_qs = unique_questions(self.exp.world.splits["train"])
    a = rm.build_preference_pairs(self.exp.world, train_qs, self.exp.tokenizer, self.exp.respond,
                                  pairs_per_question=2, seed=0)
    b = rm.build_preference_pairs(self.exp.world, train_qs, self.exp.tokenizer, self.exp.respond,
                                  pairs_per_question=2, seed=0)
    self.assertEqual(a.chosen.size, 2 * len(train_qs))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # Two pairs of one question never repeat a kind while another is unused.
    for qi in range(len(train_qs)):
      self.assertLen(set(a.kind[a.question == qi]), 2)
    only = rm.build_preference_pairs(self.exp.world, train_qs, self.exp.tokenizer,
                                     self.exp.respond, kinds=("wrong_answer",),
                                     pairs_per_question=1)
    self.assertTrue(np.all(only.kind == rm.REJECTION_KINDS.index("wrong_answer")))
    # Weights: a kind weighted 0 never appears; a heavy one is drawn first most of the time.
    weighted = rm.build_preference_pairs(
        self.exp.world, train_qs, self.exp.tokenizer, self.exp.respond, pairs_per_question=1,
        kinds={"wrong_answer": 8.0, "no_search": 1.0, "stop_early": 0.0, "malformed": 1.0})
    counts = np.bincount(weighted.kind, minlength=4)
    self.assertEqual(counts[rm.REJECTION_KINDS.index("stop_early")], 0)
    self.assertGreater(counts[0] / counts.sum(), 0.65)   # expected 0.8
    with self.assertRaisesRegex(ValueError, "more than max_len=20"):
      rm.build_preference_pairs(self.exp.world, train_qs[:3], self.exp.tokenizer,
                                self.exp.respond, pairs_per_question=1, max_len=20)

  def test_concatenate_and_drop(self):
    d = self.data
    both = rm.concatenate_pairs([d, d], self.exp.tokenizer.pad_id)
    self.assertEqual(both.chosen.size, 2 * d.chosen.size)
    np.testing.assert_array_equal(both.tokens[both.chosen[d.chosen.size:]], d.tokens[d.chosen])
    short = rm.drop_long_pairs(d, int(np.median(d.lengths)))
    self.assertTrue(np.all(short.lengths[short.rejected] <= np.median(d.lengths)))
    self.assertLess(short.chosen.size, d.chosen.size)

  def test_config_errors(self):
    for kwargs, message in (
        (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
        (dict(rejection_weights={"nonsense": 1.0}), "rejection_weights must map names from"),
        (dict(rejection_weights={"no_search": -1.0}), "to weights >= 0"),
        (dict(rejection_weights={"stop_early": 1.0, "no_search": 0.0}),
         "leaves 1-hop questions"),
        (dict(lm_coef=-1.0), "lm_coef must be a finite number >= 0, got -1.0"),
        (dict(eval_split="dev"), "eval_split must be one of .* got 'dev'"),
        (dict(head=ValueHeadConfig(num_bins=3)), "scalar head"),
        (dict(init_phase="final"), "init_phase must be 'sft' or 'rl', got 'final'"),
        (dict(extra_train_worlds=-1), "extra_train_worlds must be an int >= 0, got -1"),
    ):
      with self.assertRaisesRegex(ValueError, message):
        small_config(**kwargs)


class UpdateTest(absltest.TestCase):

  def test_objective_is_bradley_terry_plus_the_agent_token_loss(self):
    cfg = TransformerConfig(vocab_size=40, d_model=16, num_layers=1, num_heads=2,
                            num_kv_heads=2, mlp_dim=32)
    model = RewardModel(cfg, ValueHeadConfig(init_scale=1.0))
    rng = np.random.default_rng(0)
    chosen = jnp.asarray(rng.integers(4, 40, (4, 9)), jnp.int32)
    rejected = jnp.asarray(rng.integers(4, 40, (4, 9)), jnp.int32)
    cl, rl = jnp.array([9, 5, 7, 3]), jnp.array([6, 9, 2, 8])
    mask = jnp.asarray(rng.random((4, 9)) < 0.5)
    batch = rm.PreferenceBatch(chosen, cl, rejected, rl, mask)
    params = nn.meta.unbox(compiled.init(model, jax.random.key(0), chosen, cl,
                                         return_lm_logits=True)["params"])
    rc = compiled.apply(model, {"params": params}, chosen, cl)
    rr = compiled.apply(model, {"params": params}, rejected, rl)
    bt = float(np.mean(np.log1p(np.exp(-(np.asarray(rc) - np.asarray(rr))))))
    _, logits = compiled.apply(model, {"params": params}, chosen, cl, return_lm_logits=True)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    nll = [-logp[i, t - 1, int(chosen[i, t])] for i in range(4) for t in range(1, 9)
           if bool(mask[i, t])]
    for coef in (0.0, 0.5):
      state = TrainState.create(apply_fn=model.apply, params=params,
                                tx=make_optimizer(OptimizerConfig(learning_rate=1e-3)))
      update = jax.jit(rm.make_rm_update_fn(model.apply, lm_coef=coef))
      new_state, m = update(state, batch)
      self.assertAlmostEqual(float(m["bt_loss"]), bt, places=5)
      self.assertAlmostEqual(float(m["loss"]), bt + coef * float(np.mean(nll)), places=5)
      self.assertEqual(int(new_state.step), 1)
      if coef:
        self.assertAlmostEqual(float(m["lm_loss"]), float(np.mean(nll)), places=5)


def hand_pairs() -> rm.PreferenceData:
  """Five episodes (token 0 of each = its id + 1) and four pairs over them, by hand."""
  tokens = np.zeros((5, 40), np.int32)
  tokens[:, 0] = np.arange(1, 6)
  lengths = np.array([3, 33, 40, 7, 1], np.int32)
  agent_mask = np.zeros((5, 40), bool)
  agent_mask[1, 2] = agent_mask[3, 5] = True
  return rm.PreferenceData(
      tokens, lengths, agent_mask,
      chosen=np.array([0, 0, 3, 3], np.int32), rejected=np.array([1, 2, 4, 1], np.int32),
      kind=np.array([0, 1, 0, 3], np.int32), question=np.array([0, 0, 1, 1], np.int32))


class BatchTest(absltest.TestCase):

  def test_batch_pairs_are_seeded_epochs(self):
    config = small_config(batch_size=4, seed=7)
    # Today's order is the pre-skeleton one: epoch e is permutation(n) of rng [seed, 1, e].
    for step in range(6):
      epoch, pos = divmod(step * 4, 10)
      order = np.random.default_rng([7, 1, epoch]).permutation(10)
      np.testing.assert_array_equal(rm.batch_pairs(config, step, 10),
                                    np.take(order, np.arange(pos, pos + 4), mode="wrap"))
    # Five steps of 4 over 20 pairs: every pair once per epoch; another seed, another order.
    seen = np.concatenate([rm.batch_pairs(config, s, 20) for s in range(5)])
    self.assertEqual(sorted(seen.tolist()), list(range(20)))
    other = np.concatenate([rm.batch_pairs(small_config(batch_size=4, seed=8), s, 20)
                            for s in range(5)])
    self.assertFalse(np.array_equal(seen, other))

  def test_make_batch_rows_widths_and_masks(self):
    d = hand_pairs()
    b = rm.make_batch(d, np.array([0, 2]))          # pairs (0, 1) and (3, 4)
    self.assertEqual(b.chosen.shape, (2, 40))        # longest episode 33 -> 64, capped at 40
    np.testing.assert_array_equal(b.chosen[:, 0], [1, 4])
    np.testing.assert_array_equal(b.rejected[:, 0], [2, 5])
    np.testing.assert_array_equal(b.chosen_lengths, [3, 7])
    np.testing.assert_array_equal(b.rejected_lengths, [33, 1])
    np.testing.assert_array_equal(b.chosen_agent_mask, d.agent_mask[[0, 3]])
    narrow = rm.make_batch(d, np.array([2]))         # pair (3, 4): longest 7 -> 32
    self.assertEqual(narrow.chosen.shape, (1, 32))
    self.assertEqual(narrow.rejected.shape, (1, 32))
    self.assertTrue(narrow.chosen_agent_mask[0, 5])
    self.assertEqual(rm.make_batch(d, np.array([2]), multiple=8).chosen.shape, (1, 8))

  def test_step_work_counts_the_head_only_where_it_runs(self):
    trunk = TransformerConfig(vocab_size=100, d_model=16, num_layers=1, num_heads=2,
                              num_kv_heads=2, mlp_dim=32)
    b = rm.make_batch(hand_pairs(), np.array([2, 2]))   # 2 pairs x 32 tokens, twice
    per_token = sharding.transformer_flops_per_token(trunk, 32)
    head = 6 * 16 * 100
    bt = rm.step_work(trunk, b, lm_coef=0.0)
    self.assertEqual(bt.tokens, 128)
    self.assertAlmostEqual(bt.flops, 128 * (per_token - head))
    self.assertAlmostEqual(rm.step_work(trunk, b, lm_coef=1.0).flops,
                           128 * (per_token - head) + 64 * head)


class MetricsTest(absltest.TestCase):

  def test_pairwise_metrics_by_hand(self):
    d = hand_pairs()
    scores = np.array([2.0, 1.0, 3.0, 0.0, 0.0])
    # diffs: 0-1 = 1 (win), 0-2 = -1 (loss), 3-4 = 0 (tie: 1/2), 3-1 = -1 (loss).
    m = rm.pairwise_metrics(d, scores, "x_")
    self.assertEqual(m["x_accuracy"], 1.5 / 4)
    self.assertEqual(m["x_margin"], -0.25)
    self.assertEqual(m["x_pairs"], 4)
    self.assertEqual(m["x_accuracy_wrong_answer"], 0.75)     # pairs 0 and 2
    self.assertEqual(m["x_accuracy_no_search"], 0.0)
    self.assertEqual(m["x_accuracy_malformed"], 0.0)
    self.assertNotIn("x_accuracy_stop_early", m)

  def test_final_metrics_scores_held_out_and_a_train_sample(self):
    d = hand_pairs()
    scored = []

    def score_tokens(tokens, lengths):   # the score of an episode is its first token
      scored.append(tokens[:, 0].copy())
      return tokens[:, 0].astype(np.float32)

    m = rm.final_metrics(score_tokens, d, d, seed=0)
    # First token = row + 1: pairs (0,1), (0,2), (3,4), (3,1) lose, lose, lose, win.
    self.assertEqual(m["heldout_accuracy"], 0.25)
    self.assertEqual(m["train_accuracy"], 0.25)        # 4 pairs < 1000: all of them
    self.assertEqual(m["heldout_margin"], -0.5)        # (-1 - 2 - 1 + 2) / 4
    self.assertEqual(m["train_pairs"], 4)
    self.assertEqual(sorted(scored[1].tolist()), [1, 2, 3, 4, 5])   # each episode once

  def test_train_sample_is_seeded_and_capped(self):
    n = 1500
    d = rm.PreferenceData(np.zeros((2, 1), np.int32), np.ones(2, np.int32),
                          np.zeros((2, 1), bool), np.arange(n, dtype=np.int32),
                          np.arange(n, dtype=np.int32) + n, np.zeros(n, np.int32),
                          np.arange(n, dtype=np.int32))
    a, b = rm.train_sample(d, 3), rm.train_sample(d, 3)
    self.assertLen(a.chosen, 1000)
    self.assertLen(set(a.chosen.tolist()), 1000)
    np.testing.assert_array_equal(a.chosen, b.chosen)
    np.testing.assert_array_equal(a.rejected, a.chosen + n)   # pairs stay whole
    np.testing.assert_array_equal(a.question, a.chosen)
    np.testing.assert_array_equal(
        a.chosen, np.random.default_rng([3, 3]).permutation(n)[:1000])


class RunTest(absltest.TestCase):
  """One tiny end-to-end run: files, checkpoints, summary keys, resume, reloading."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.config = small_config(
        model=TransformerConfig(vocab_size=512, d_model=16, num_layers=1, num_heads=2,
                                num_kv_heads=2, mlp_dim=32),
        steps=4, batch_size=8, pairs_per_question=1, extra_train_worlds=0,
        checkpoint_every=2, eval_every=2)
    cls.calls = []
    cls.summary = rm.run(cls.config, cls.workdir, after_first_step=lambda: cls.calls.append(1))

  def test_workdir_summary_and_metrics(self):
    self.assertEqual(self.calls, [1])
    names = set(os.listdir(self.workdir))
    for name in ("summary.json", "metrics.jsonl", "tokenizer.model", rm.CONFIG_FILE,
                 rm.TRUNK_CONFIG_FILE, "checkpoints"):
      self.assertIn(name, names)
    self.assertEqual(sorted(os.listdir(os.path.join(self.workdir, rm.CHECKPOINT_DIR))),
                     ["2", "4"])
    self.assertEqual(rm.load_config(self.workdir), self.config)
    s = self.summary
    for key in ("heldout_accuracy", "heldout_margin", "heldout_pairs", "train_accuracy",
                "train_margin", "train_pairs", "steps", "num_train_pairs", "num_params",
                "eval_split", "train_seconds", "eval_seconds", "wall_seconds",
                *(f"heldout_accuracy_{k}" for k in rm.REJECTION_KINDS)):
      self.assertIn(key, s)
    self.assertEqual(s["steps"], 4)
    with open(os.path.join(self.workdir, "summary.json")) as f:
      self.assertEqual(json.load(f)["heldout_accuracy"], s["heldout_accuracy"])
    rows = metrics_lib.read_metrics(self.workdir)
    self.assertEqual([r["step"] for r in rows if "rm/loss" in r], [4])   # the last step
    self.assertEqual([r["step"] for r in rows if "validation/accuracy" in r], [2, 4])
    for key in ("rm/bt_loss", "rm/lm_loss", "rm/s_per_step", "rm/tokens_per_s"):
      self.assertIn(key, [r for r in rows if "rm/loss" in r][0])

  def test_resume_continues_from_the_checkpoint(self):
    # A copy of the run as if killed after its step-2 checkpoint.
    workdir = os.path.join(tempfile.mkdtemp(), "run")
    shutil.copytree(self.workdir, workdir)
    shutil.rmtree(os.path.join(workdir, rm.CHECKPOINT_DIR, "4"))
    os.remove(os.path.join(workdir, "summary.json"))
    rows = metrics_lib.read_metrics(workdir)
    with open(os.path.join(workdir, metrics_lib.METRICS_FILE), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= 2)
    calls = []
    resumed = rm.run(self.config, workdir, after_first_step=lambda: calls.append(1))
    self.assertEqual(calls, [1])                     # steps 3 and 4 ran
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, rm.CHECKPOINT_DIR))), ["2", "4"])
    got = [r for r in metrics_lib.read_metrics(workdir) if "rm/loss" in r]
    ref = [r for r in metrics_lib.read_metrics(self.workdir) if "rm/loss" in r]
    self.assertEqual([r["step"] for r in got], [4])
    self.assertAlmostEqual(got[0]["rm/loss"], ref[0]["rm/loss"], places=5)
    for key in ("heldout_accuracy", "heldout_margin", "train_accuracy"):
      self.assertAlmostEqual(resumed[key], self.summary[key], places=5)
    # A finished workdir trains nothing more.
    calls.clear()
    rm.run(self.config, workdir, after_first_step=lambda: calls.append(1))
    self.assertEqual(calls, [])
    self.assertLen([r for r in metrics_lib.read_metrics(workdir) if "rm/loss" in r], 1)

  def test_saved_model_reproduces_the_summary(self):
    reward = rm.load_reward_fn(self.workdir)
    exp = rm._environment(self.config, reward.tokenizer, self.config.tokenizer_vocab_size)
    data = rm.build_preference_pairs(exp.world, unique_questions(exp.world.splits["test"]),
                                     reward.tokenizer, exp.respond, seed=self.config.seed + 1)
    scores = reward.score_tokens(data.tokens, data.lengths)
    m = rm.pairwise_metrics(data, scores)
    self.assertEqual(m["pairs"], self.summary["heldout_pairs"])
    train_qs = unique_questions(exp.world.splits["train"])
    self.assertEqual(self.summary["num_train_pairs"], len(train_qs))   # 1 per question
    self.assertAlmostEqual(m["accuracy"], self.summary["heldout_accuracy"], places=6)
    self.assertAlmostEqual(m["margin"], self.summary["heldout_margin"], places=5)


def gin_config(*bindings) -> rm.RewardModelConfig:
  """The RewardModelConfig that gin/experiments/reward_model.gin binds to `run.config`."""
  import gin  # noqa: PLC0415
  from experiments.run import parse_gin  # noqa: PLC0415
  gin.clear_config()
  try:
    parse_gin(["gin/experiments/reward_model.gin"], list(bindings))
    return gin.get_configurable(rm.RewardModelConfig)()
  finally:
    gin.clear_config()


class GinExperimentTest(absltest.TestCase):

  def test_gin_file_binds_the_library_defaults(self):
    # The experiment and `RewardModelConfig()` are the same recipe (vocab_size aside, which the
    # run replaces by the tokenizer's).
    config = gin_config()
    default = rm.RewardModelConfig()
    self.assertEqual(config, dataclasses.replace(
        default, model=dataclasses.replace(default.model, vocab_size=1)))
    self.assertEqual(gin_config("RM_STEPS = 7").steps, 7)


if __name__ == "__main__":
  absltest.main()
