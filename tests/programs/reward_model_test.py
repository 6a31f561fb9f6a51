"""Reward-model experiment: preference pairs, a short Bradley–Terry run, resume, the adapter."""
from __future__ import annotations

import dataclasses
import json
import os
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
from jaxsearch.train.optim import OptimizerConfig, make_optimizer
from jaxsearch.train.state import TrainState

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
    params = nn.meta.unbox(model.init(jax.random.key(0), chosen, cl,
                                      return_lm_logits=True)["params"])
    rc = model.apply({"params": params}, chosen, cl)
    rr = model.apply({"params": params}, rejected, rl)
    bt = float(np.mean(np.log1p(np.exp(-(np.asarray(rc) - np.asarray(rr))))))
    _, logits = model.apply({"params": params}, chosen, cl, return_lm_logits=True)
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


class RunTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.config = small_config()
    cls.summary = rm.run(cls.config, cls.workdir)

  def test_held_out_accuracy_clearly_above_chance(self):
    s = self.summary
    self.assertGreater(s["heldout_accuracy"], 0.75)
    self.assertGreater(s["heldout_pairs"], 40)
    for kind in rm.REJECTION_KINDS:
      self.assertIn(f"heldout_accuracy_{kind}", s)
    self.assertEqual(s["eval_split"], "test")
    self.assertGreater(s["train_accuracy"], 0.75)

  def test_workdir_files_and_metrics(self):
    names = set(os.listdir(self.workdir))
    for name in ("summary.json", "metrics.jsonl", "tokenizer.model", rm.CONFIG_FILE,
                 "trunk_config.json", "checkpoints"):
      self.assertIn(name, names)
    self.assertEqual(sorted(os.listdir(os.path.join(self.workdir, rm.CHECKPOINT_DIR))),
                     ["20", "40"])
    rows = metrics_lib.read_metrics(self.workdir)
    losses = [r["rm/bt_loss"] for r in rows if "rm/bt_loss" in r]
    self.assertLen(losses, 2)                        # steps 25 and 40
    self.assertLess(losses[-1], np.log(2.0))         # below the loss of a constant reward
    with open(os.path.join(self.workdir, "summary.json")) as f:
      self.assertEqual(json.load(f)["heldout_accuracy"], self.summary["heldout_accuracy"])
    self.assertEqual(rm.load_config(self.workdir), self.config)

  def test_resume_retrains_nothing(self):
    again = rm.run(self.config, self.workdir)
    for key in ("heldout_accuracy", "heldout_margin", "train_accuracy"):
      self.assertAlmostEqual(again[key], self.summary[key], places=5)
    rows = metrics_lib.read_metrics(self.workdir)
    self.assertLen([r for r in rows if "rm/loss" in r], 2)

  def test_adapter_prefers_chosen_on_held_out_pairs(self):
    reward = rm.load_reward_fn(self.workdir)
    exp = rm._environment(self.config, reward.tokenizer, self.config.tokenizer_vocab_size)
    questions = unique_questions(exp.world.splits["test"])
    data = rm.build_preference_pairs(exp.world, questions, reward.tokenizer, exp.respond,
                                     seed=self.config.seed + 1)
    # Token path: the same accuracy the run reported.
    scores = reward.score_tokens(data.tokens, data.lengths)
    self.assertAlmostEqual(rm.pairwise_metrics(data, scores)["accuracy"],
                           self.summary["heldout_accuracy"], places=5)
    # Text path, as the RL loop sees episodes: decoded prompt + completion.
    rows = np.concatenate([data.chosen, data.rejected])
    qs = [questions[i] for i in np.concatenate([data.question, data.question])]
    prompts = [demos.PROMPT_TEMPLATE.format(question=q.question) for q in qs]
    completions = [episode_text(reward.tokenizer, data, r, q) for r, q in zip(rows, qs)]
    text_scores = reward(completions, [q.answers for q in qs], prompts=prompts)
    np.testing.assert_allclose(text_scores, scores[rows], atol=1e-5)
    n = data.chosen.size
    self.assertGreater(float(np.mean(text_scores[:n] > text_scores[n:])), 0.75)


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
