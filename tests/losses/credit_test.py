"""Tests for jaxsearch.losses.credit: turn-level credit, IGPO, implicit process rewards."""
from __future__ import annotations

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxsearch.losses import advantages as adv_lib
from jaxsearch.losses import credit

LOG = np.log
_turn_adv = jax.jit(credit.turn_level_advantages, static_argnames=("scale", "normalize"))
_dual = jax.jit(credit.dual_level_advantages, static_argnames=("scale", "normalize"))
_ig = jax.jit(credit.information_gain_rewards, static_argnames="space")
_build = jax.jit(credit.build_gold_scoring_batch, static_argnames=("num_turns", "pad_id"))

# Two episodes: prompt (0), turn 1 (policy + info), turn 2; row 1 has a single turn and
# padding (id 0).
TURN_IDS = jnp.array([[0, 0, 1, 1, 1, 2, 2],
                      [0, 1, 1, 1, 0, 0, 0]])


class TurnHelpersTest(absltest.TestCase):

  def test_sums_broadcast_present_returns(self):
    x = jnp.array([[9., 9., 1., 2., 3., 4., 5.], [9., 1., 1., 1., 8., 8., 8.]])
    sums = jax.jit(credit.turn_sums, static_argnums=2)(x, TURN_IDS, 3)
    np.testing.assert_allclose(sums, [[6, 9, 0], [3, 0, 0]])
    masked = credit.turn_sums(x.at[0, 2].set(jnp.nan), TURN_IDS, 2,
                              mask=jnp.arange(7) != 2)
    np.testing.assert_allclose(masked, [[5, 9], [2, 0]])
    np.testing.assert_allclose(jax.jit(credit.broadcast_turns)(jnp.array([[5., 7.], [1., 2.]]),
                                                              TURN_IDS),
                               [[0, 0, 5, 5, 5, 7, 7], [0, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(credit.present_turns(TURN_IDS, 3),
                                  [[True, True, False], [True, False, False]])
    ret = jax.jit(credit.turn_returns)(jnp.array([[1., 0., 2.], [3., 9., 1.]]),
                                       jnp.array([[1, 1, 1], [1, 0, 1]], bool), gamma=0.5)
    # Row 1 skips its invalid middle turn: 3 + .5 * 1.
    np.testing.assert_allclose(ret, [[1.5, 1.0, 2.0], [3.5, 0.0, 1.0]])


class TurnLevelAdvantagesTest(parameterized.TestCase):

  def test_hand_computed_none_scale(self):
    r = jnp.array([[0., 1.], [0.5, 7.]])            # row 1 has no turn 2: its 7 is ignored
    adv, ta = _turn_adv(r, TURN_IDS, jnp.array([0, 0]), scale="none")
    # Returns (1, 1) and (.5, -): group mean over 3 valid turns = 2.5 / 3.
    mu = 2.5 / 3
    np.testing.assert_allclose(ta, [[1 - mu, 1 - mu], [.5 - mu, 0]], atol=1e-6)
    np.testing.assert_allclose(adv[0], [0, 0] + [1 - mu] * 5, atol=1e-6)
    np.testing.assert_allclose(adv[1], [0] + [.5 - mu] * 3 + [0] * 3, atol=1e-6)

  def test_group_scale_and_zero_variance_group(self):
    turn_ids = jnp.array([[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2]])
    r = jnp.array([[1., 0.], [0., 0.], [0., 2.], [0., 2.]])
    adv, ta = _turn_adv(r, turn_ids, jnp.array([0, 0, 1, 1]), scale="group")
    # Group 0 returns (1, 0, 0, 0): mean .25, std(ddof=1) .5. Group 1: all 2 -> 0.
    np.testing.assert_allclose(ta[:2], [[1.5, -.5], [-.5, -.5]], atol=1e-5)
    np.testing.assert_array_equal(ta[2:], 0.0)
    chex.assert_tree_all_finite(adv)

  def test_normalize_rewards_then_discount(self):
    turn_ids = jnp.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    r = jnp.array([[1., 0., 1.], [0., 0., 1.]])
    _, ta = _turn_adv(r, turn_ids, jnp.array([0, 0]), gamma=0.5, scale="none",
                      normalize="rewards")
    # Rewards minus their group mean (3 / 6 turns), then reward-to-go with gamma .5.
    c = np.array([[1, 0, 1], [0, 0, 1]]) - 0.5
    want = np.stack([c[:, 0] + .5 * c[:, 1] + .25 * c[:, 2], c[:, 1] + .5 * c[:, 2], c[:, 2]], 1)
    np.testing.assert_allclose(ta, want, atol=1e-6)
    # "returns" order: returns (1.25, .5, 1) and (.25, .5, 1) minus their mean 4.5 / 6.
    _, ta2 = _turn_adv(r, turn_ids, jnp.array([0, 0]), gamma=0.5, scale="none")
    np.testing.assert_allclose(ta2, np.array([[1.25, .5, 1], [.25, .5, 1]]) - .75, atol=1e-6)

  def test_batch_scale_explicit_turn_mask_and_permutation(self):
    rng = np.random.default_rng(0)
    n, k = 6, 3
    turn_ids = jnp.asarray(np.tile([0, 1, 1, 2, 3, 3], (n, 1)))
    r = jnp.asarray(rng.normal(size=[n, k]), jnp.float32)
    tm = jnp.asarray(rng.random([n, k]) < 0.8)
    g = jnp.array([0, 0, 0, 1, 1, 1])
    _, ta = _turn_adv(r, turn_ids, g, turn_mask=tm, scale="batch")
    # Reference: returns over valid turns, whitened over every valid turn of the batch.
    ret = np.asarray(credit.turn_returns(r, tm))
    vals = ret[np.asarray(tm)]
    want = np.where(tm, (ret - vals.mean()) / (vals.std(ddof=1) + 1e-6), 0)
    np.testing.assert_allclose(ta, want, atol=1e-5)
    perm = rng.permutation(n)
    _, ta_p = _turn_adv(r[perm], turn_ids[perm], g[perm], turn_mask=tm[perm], scale="group")
    _, ta_g = _turn_adv(r, turn_ids, g, turn_mask=tm, scale="group")
    np.testing.assert_allclose(ta_p, np.asarray(ta_g)[perm], atol=1e-6)

  def test_bad_options(self):
    with self.assertRaisesRegex(ValueError, "normalize must be one of.*'tokens'"):
      credit.turn_level_advantages(jnp.zeros([1, 1]), TURN_IDS[:1], jnp.zeros(1),
                                   normalize="tokens")
    with self.assertRaisesRegex(ValueError, r"turn_mask must be \[N, K\]"):
      credit.turn_level_advantages(jnp.zeros([1, 2]), TURN_IDS[:1], jnp.zeros(1),
                                   turn_mask=jnp.ones([1, 3], bool))
    self.assertIs(adv_lib.TOKEN_ADVANTAGES.get("turn_level"), credit.turn_level_advantages)


class DualLevelTest(absltest.TestCase):

  def test_hand_computed(self):
    turn_ids = jnp.array([[0, 1, 2], [0, 1, 2]])
    adv, traj = _dual(jnp.array([[1., 0.], [0., 0.]]), turn_ids, jnp.array([1., 0.]),
                      jnp.array([0, 0]), turn_weight=0.5, scale="none")
    np.testing.assert_allclose(traj, [.5, -.5], atol=1e-6)
    # Turn returns (1, 0), (0, 0) minus their mean .25.
    np.testing.assert_allclose(adv, [[.5, .5 + .5 * .75, .5 - .5 * .25],
                                     [-.5, -.5 - .5 * .25, -.5 - .5 * .25]], atol=1e-6)

  def test_zero_weight_is_grpo(self):
    rng = np.random.default_rng(1)
    r_out = jnp.asarray(rng.normal(size=4), jnp.float32)
    g = jnp.array([0, 0, 1, 1])
    turn_ids = jnp.tile(jnp.array([0, 1, 1, 2]), (4, 1))
    adv, _ = _dual(jnp.asarray(rng.normal(size=[4, 2]), jnp.float32), turn_ids, r_out, g,
                   turn_weight=0.0)
    np.testing.assert_allclose(adv, jnp.broadcast_to(adv_lib.grpo_advantages(r_out, g)[:, None],
                                                     (4, 4)), atol=1e-6)


class InformationGainTest(absltest.TestCase):

  def test_hand_values(self):
    g = jnp.log(jnp.array([[.1, .4, .8], [.5, .25, .25]]))
    np.testing.assert_allclose(_ig(g), [[LOG(4), LOG(2)], [-LOG(2), 0]], atol=1e-6)
    np.testing.assert_allclose(_ig(g, space="prob"), [[.3, .4], [-.25, 0]], atol=1e-6)
    masked = _ig(g, jnp.array([[True, False], [True, True]]))
    np.testing.assert_allclose(masked, [[LOG(4), 0], [-LOG(2), 0]], atol=1e-6)

  def test_telescopes(self):
    g = jnp.asarray(np.random.default_rng(2).normal(size=[3, 6]), jnp.float32)
    np.testing.assert_allclose(_ig(g).sum(1), g[:, -1] - g[:, 0], atol=1e-5)

  def test_igpo_turn_rewards(self):
    g = jnp.log(jnp.array([[.1, .4, .8, .8], [.2, .4, .4, .4], [.3, .3, .3, .3]]))
    tm = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]], bool)
    got = jax.jit(credit.igpo_turn_rewards)(g, jnp.array([1., 0., 5.]), tm)
    # Last valid turn -> outcome; earlier ones -> information gain; no turns -> zeros.
    np.testing.assert_allclose(got, [[LOG(4), 1, 0], [LOG(2), 0, 0], [0, 0, 0]], atol=1e-6)
    with self.assertRaisesRegex(ValueError, "space must be"):
      credit.information_gain_rewards(g, space="nats")


def _toy_apply(variables, tokens):
  """A causal model: position p sees the running mean of embeddings of tokens <= p.

  Written with array methods so it runs on jax arrays (the test) and numpy (the reference).
  """
  e = variables["E"][tokens]                                             # [M, W, D]
  h = e.cumsum(axis=1) / (1.0 + np.arange(tokens.shape[1]))[None, :, None]
  tanh = np.tanh if isinstance(h, np.ndarray) else jnp.tanh
  return tanh(h) @ variables["O"] + variables["b"]


class GoldScoringTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(3)
    v, d = 11, 6
    self.variables = {"E": jnp.asarray(rng.normal(size=[v, d]), jnp.float32),
                      "O": jnp.asarray(rng.normal(size=[d, v]) * 2, jnp.float32),
                      "b": jnp.asarray(rng.normal(size=[v]), jnp.float32)}
    # Row 0: prompt 2, turn 1 = 2 policy + 2 env tokens, turn 2 = 2 tokens, padding 1.
    # Row 1: prompt 3, turn 1 = 2 tokens, padding (turn id 0, excluded by valid_mask).
    self.tokens = jnp.array([[1, 2, 3, 4, 9, 9, 5, 6, 0], [7, 8, 1, 2, 3, 0, 0, 0, 0]])
    self.turn_ids = jnp.array([[0, 0, 1, 1, 1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 0, 0, 0, 0]])
    self.valid = jnp.array([[1] * 8 + [0], [1] * 5 + [0] * 4], bool)
    self.gold = jnp.array([[10, 4, 0], [6, 0, 0]])
    self.gold_mask = jnp.array([[1, 1, 0], [1, 0, 0]], bool)

  def test_build_batch_by_hand(self):
    b = _build(self.tokens, self.turn_ids, self.valid, self.gold, self.gold_mask, num_turns=2,
               pad_id=0)
    chex.assert_shape(b.tokens, (6, 12))
    np.testing.assert_array_equal(b.gold_start, [2, 6, 8, 3, 5, 5])
    np.testing.assert_array_equal(b.tokens[0], [1, 2, 10, 4] + [0] * 8)
    np.testing.assert_array_equal(b.tokens[1], [1, 2, 3, 4, 9, 9, 10, 4] + [0] * 4)
    np.testing.assert_array_equal(b.tokens[2], [1, 2, 3, 4, 9, 9, 5, 6, 10, 4, 0, 0])
    np.testing.assert_array_equal(b.tokens[3], [7, 8, 1, 6] + [0] * 8)
    np.testing.assert_array_equal(b.tokens[4], [7, 8, 1, 2, 3, 6] + [0] * 6)
    np.testing.assert_array_equal(b.tokens[5], b.tokens[4])    # row 1 has no turn 2
    np.testing.assert_array_equal(b.gold_mask[3], [1, 0, 0])

  @parameterized.named_parameters(("sum", False), ("mean", True))
  def test_matches_per_prefix_loop(self, length_normalize):
    fn = jax.jit(credit.gold_answer_logprobs,
                 static_argnames=("apply_fn", "num_turns", "pad_id", "length_normalize"))
    got = fn(_toy_apply, self.variables, self.tokens, self.turn_ids, self.valid, self.gold,
             self.gold_mask, num_turns=2, length_normalize=length_normalize)
    chex.assert_shape(got, (2, 3))
    toks, tids, valid = map(np.asarray, (self.tokens, self.turn_ids, self.valid))
    np_vars = {k: np.asarray(v, np.float64) for k, v in self.variables.items()}
    for n in range(2):
      gold = np.asarray(self.gold)[n][np.asarray(self.gold_mask)[n]]
      for k in range(3):
        prefix = [int(x) for x, t, ok in zip(toks[n], tids[n], valid[n]) if ok and t <= k]
        seq = np.asarray(prefix + list(gold))
        logits = _toy_apply(np_vars, seq[None])[0]                     # numpy, float64
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        want = sum(float(lp[len(prefix) + j - 1, gold[j]]) for j in range(len(gold)))
        if length_normalize:
          want /= len(gold)
        np.testing.assert_allclose(got[n, k], want, rtol=1e-5, atol=1e-5, err_msg=f"{n} {k}")
    # An absent turn leaves the prefix unchanged: zero information gain.
    ig = credit.information_gain_rewards(got)
    self.assertEqual(float(ig[1, 1]), 0.0)


class ImplicitProcessRewardsTest(absltest.TestCase):

  def test_hand_values_and_turn_sums(self):
    logp = jnp.log(jnp.array([[.5, .9, .2, .3]]))
    ref = jnp.log(jnp.array([[.25, .1, .4, .3]]))
    mask = jnp.array([[True, False, True, True]])
    r = jax.jit(credit.implicit_process_rewards)(logp, ref, mask, beta=0.1)
    np.testing.assert_allclose(r, [[.1 * LOG(2), 0, -.1 * LOG(2), 0]], atol=1e-6)
    per_turn = credit.turn_sums(r, jnp.array([[1, 1, 2, 2]]), 2)
    np.testing.assert_allclose(per_turn, [[.1 * LOG(2), -.1 * LOG(2)]], atol=1e-6)
    # Telescoping: the sum over a response is beta * log(pi(y) / pi_ref(y)).
    np.testing.assert_allclose(r.sum(), 0.1 * jnp.sum(jnp.where(mask, logp - ref, 0)),
                               atol=1e-6)



class DocstringExamplesTest(absltest.TestCase):

  def test_examples_run(self):
    result = doctest.testmod(credit)
    self.assertGreater(result.attempted, 5)
    self.assertEqual(result.failed, 0)

if __name__ == "__main__":
  absltest.main()
