"""Tests for jaxsearch.losses.policy with hand-computed values."""
from __future__ import annotations


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import rlax
from absl.testing import absltest, parameterized

from jaxsearch.losses import policy

LOG = np.log

# Jit by default (one compile per shape instead of one per eager op).
_PPO_STATIC = ("clip_low", "clip_high", "agg", "dual_clip", "ratio_level", "norm_length")
_ppo = jax.jit(policy.ppo_policy_loss, static_argnames=_PPO_STATIC)
_gspo = jax.jit(policy.gspo_policy_loss, static_argnames=_PPO_STATIC)
# Loss, metrics and d loss / d logp in one compiled call.
_ppo_vg = jax.jit(jax.value_and_grad(policy.ppo_policy_loss, has_aux=True),
                  static_argnames=_PPO_STATIC)
_grpo = jax.jit(policy.grpo_loss,
                static_argnames=("clip_eps", "clip_eps_high", "kl_coef", "kl_kind", "agg",
                                 "dual_clip", "ratio_level", "norm_length"))
_agg = jax.jit(policy.aggregate, static_argnames=("agg", "norm_length"))
_entropy = jax.jit(policy.entropy_from_logits)
_ce = jax.jit(policy.cross_entropy_loss)


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


class TokenLogprobsTest(parameterized.TestCase):

  def test_parity_with_optax(self):
    logits = _rand([3, 5, 11], 0) * 3
    targets = jnp.asarray(np.random.default_rng(1).integers(0, 11, size=[3, 5]))
    want = -optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    got = policy.token_logprobs(logits, targets)
    chex.assert_shape(got, (3, 5))
    np.testing.assert_allclose(got, want, atol=1e-5)

  def test_bf16_logits_give_float32(self):
    logits = (_rand([2, 3, 7], 2) * 4).astype(jnp.bfloat16)
    targets = jnp.zeros([2, 3], jnp.int32)
    got = policy.token_logprobs(logits, targets)
    self.assertEqual(got.dtype, jnp.float32)
    want = jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0]
    np.testing.assert_allclose(got, want, atol=1e-5)

  def test_uniform(self):
    got = policy.token_logprobs(jnp.zeros([1, 2, 4]), jnp.array([[0, 3]]))
    np.testing.assert_allclose(got, [[-LOG(4), -LOG(4)]], atol=1e-6)


class MaskedReductionsTest(absltest.TestCase):

  def test_values(self):
    x = jnp.array([[1., 2., 3.], [4., 5., 6.]])
    m = jnp.array([[True, False, True], [False, False, False]])
    self.assertAlmostEqual(float(policy.masked_sum(x, m)), 4.0)
    self.assertAlmostEqual(float(policy.masked_mean(x, m)), 2.0)
    np.testing.assert_allclose(policy.masked_mean(x, m, axis=1), [2.0, 0.0])
    np.testing.assert_allclose(policy.masked_sum(x, m, axis=0), [1.0, 0.0, 3.0])

  def test_empty_mask_is_zero_not_nan(self):
    x = jnp.array([1., jnp.nan, jnp.inf])
    m = jnp.zeros([3], bool)
    self.assertEqual(float(policy.masked_mean(x, m)), 0.0)
    self.assertEqual(float(policy.masked_sum(x, m)), 0.0)
    grad = jax.grad(lambda y: policy.masked_mean(y, m))(jnp.ones(3))
    np.testing.assert_array_equal(grad, [0, 0, 0])

  def test_broadcast_mask(self):
    x = jnp.array([[1., 2.], [3., 4.]])
    self.assertAlmostEqual(float(policy.masked_mean(x, jnp.array([True, False]))), 2.0)


class KlPenaltyTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # logp = log .5, ref = log .25: logp - ref = log 2.
      ("kl", "kl", LOG(2)),
      ("k1", "k1", LOG(2)),
      ("abs", "abs", LOG(2)),
      ("mse", "mse", 0.5 * LOG(2) ** 2),
      ("low_var_kl", "low_var_kl", 0.5 + LOG(2) - 1),   # exp(-log 2) - (-log 2) - 1
      ("k3", "k3", 0.5 + LOG(2) - 1),
  )
  def test_hand_values(self, kind, want):
    got = policy.kl_penalty(jnp.log(jnp.array([[.5]])), jnp.log(jnp.array([[.25]])), kind)
    np.testing.assert_allclose(got, [[want]], rtol=1e-5)

  def test_abs_sign(self):
    np.testing.assert_allclose(policy.kl_penalty(jnp.array(-2.), jnp.array(-1.), "abs"), 1.)
    np.testing.assert_allclose(policy.kl_penalty(jnp.array(-2.), jnp.array(-1.), "kl"), -1.)

  @parameterized.named_parameters(*[(k, k) for k in policy.KL_KINDS])
  def test_zero_when_equal(self, kind):
    x = _rand([4, 6], 3)
    np.testing.assert_array_equal(policy.kl_penalty(x, x, kind), np.zeros([4, 6]))

  def test_k3_nonnegative_and_clamped(self):
    logp, ref = _rand([64, 32], 4) * 3, _rand([64, 32], 5) * 3
    self.assertGreaterEqual(float(policy.kl_penalty(logp, ref).min()), 0.0)
    big = policy.kl_penalty(jnp.array([0., -100.]), jnp.array([-100., 0.]))
    np.testing.assert_allclose(big, [10., 10.])   # 19 and exp(20) - 21, clamped to 10

  def test_unknown_kind(self):
    with self.assertRaisesRegex(ValueError, r"low_var_kl.*got 'k4'"):
      policy.kl_penalty(jnp.zeros(2), jnp.zeros(2), "k4")


class PpoPolicyLossTest(parameterized.TestCase):

  def test_ratio_one_gives_minus_mean_advantage(self):
    logp = _rand([3, 4], 6)
    adv = jnp.array([1., -2., 4.])
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
    loss, m = _ppo(logp, logp, adv, mask)
    # Token mean: (2 * 1 + 4 * -2 + 1 * 4) / 7 = -2/7; loss is minus that.
    np.testing.assert_allclose(loss, 2 / 7, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac"], 0.0)
    np.testing.assert_allclose(m["ratio_mean"], 1.0)
    np.testing.assert_allclose(m["approx_kl"], 0.0, atol=1e-7)
    # old_logp=None means on-policy: same loss, and gradient -A / count per masked token.
    loss2, _ = _ppo(logp, None, adv, mask)
    np.testing.assert_allclose(loss2, loss)
    grad = jax.grad(lambda lp: _ppo(lp, None, adv, mask)[0])(logp)
    np.testing.assert_allclose(grad, -adv[:, None] * mask / 7, atol=1e-7)

  def test_clipping_by_hand(self):
    # Ratios 1.5, 1.1, 0.5, 2.0 with advantages +1, +1, -1, -1 and eps 0.2:
    #   +1, 1.5: max(-1.5, -1.2) = -1.2 clipped (no gradient)
    #   +1, 1.1: -1.1 unclipped
    #   -1, 0.5: max(0.5, 0.8) = 0.8 clipped (no gradient)
    #   -1, 2.0: max(2.0, 1.2) = 2.0 unclipped (pessimistic bound)
    ratios = jnp.array([[1.5, 1.1, 0.5, 2.0]])
    old = jnp.full([1, 4], -1.0)
    logp = old + jnp.log(ratios)
    adv = jnp.array([[1., 1., -1., -1.]])
    mask = jnp.ones([1, 4], bool)
    fn = lambda lp: _ppo(lp, old, adv, mask)
    loss, m = fn(logp)
    np.testing.assert_allclose(loss, (-1.2 - 1.1 + 0.8 + 2.0) / 4, rtol=1e-5)
    np.testing.assert_allclose(m["clip_frac"], 0.5)
    np.testing.assert_allclose(m["ratio_max"], 2.0, rtol=1e-5)
    np.testing.assert_allclose(m["ratio_mean"], 5.1 / 4, rtol=1e-5)
    r = np.array([1.5, 1.1, 0.5, 2.0])
    np.testing.assert_allclose(m["approx_kl"], np.mean(r - 1 - np.log(r)), rtol=1e-5)
    grad = jax.grad(lambda lp: fn(lp)[0])(logp)
    # d(-A * ratio)/d logp = -A * ratio, over 4 tokens.
    np.testing.assert_allclose(grad, [[0.0, -1.1 / 4, 0.0, 2.0 / 4]], atol=1e-6)

  def test_asymmetric_clip_high(self):
    old = jnp.zeros([1, 1])
    logp = jnp.log(jnp.array([[1.5]]))
    adv = jnp.array([1.])
    mask = jnp.ones([1, 1], bool)
    loss, m = _ppo(logp, old, adv, mask, clip_low=0.2, clip_high=0.6)
    np.testing.assert_allclose(loss, -1.5, rtol=1e-5)   # 1.5 < 1.6: not clipped
    self.assertEqual(float(m["clip_frac"]), 0.0)
    loss, _ = _ppo(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    np.testing.assert_allclose(loss, -1.28, rtol=1e-5)

  def test_masked_tokens_contribute_nothing(self):
    logp, old = _rand([2, 5], 7) * 0.1, _rand([2, 5], 8) * 0.1
    adv = jnp.array([1.5, -0.5])
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1]], bool)
    fn = lambda lp, o: _ppo(lp, o, adv, mask)
    loss, m = fn(logp, old)
    g = jax.grad(lambda lp: fn(lp, old)[0])(logp)
    # Garbage at masked positions: huge, opposite-sign log-probs (exp would overflow).
    logp2 = jnp.where(mask, logp, 1e4)
    old2 = jnp.where(mask, old, -1e4)
    loss2, m2 = fn(logp2, old2)
    g2 = jax.grad(lambda lp: fn(lp, old2)[0])(logp2)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    chex.assert_trees_all_close(m2, m, rtol=1e-6)
    np.testing.assert_allclose(g2, g, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(g2)[~np.asarray(mask)], 0.0)
    self.assertTrue(np.any(np.asarray(g)[np.asarray(mask)] != 0))

  def test_agg_modes_by_hand(self):
    # Rows with 3, 1 and 0 policy tokens, ratio 1, advantages 1, 4, 100:
    #   token-mean = -(3 * 1 + 1 * 4) / 4 = -1.75
    #   seq-mean-token-mean = -(1 + 4) / 2 = -2.5 (the empty row is not counted)
    logp = _rand([3, 3], 9)
    adv = jnp.array([1., 4., 100.])
    mask = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], bool)
    tm, _ = _ppo(logp, logp, adv, mask, agg="token-mean")
    sm, _ = _ppo(logp, logp, adv, mask, agg="seq-mean-token-mean")
    np.testing.assert_allclose(tm, -1.75, rtol=1e-6)
    np.testing.assert_allclose(sm, -2.5, rtol=1e-6)

  @parameterized.named_parameters(("tm", "token-mean"), ("sm", "seq-mean-token-mean"))
  def test_empty_mask_zero_loss_finite_grad(self, agg):
    logp = _rand([2, 3], 10)
    mask = jnp.zeros([2, 3], bool)
    fn = lambda lp: _ppo(lp, lp + 1.0, jnp.ones(2), mask, agg=agg)[0]
    self.assertEqual(float(fn(logp)), 0.0)
    np.testing.assert_array_equal(jax.grad(fn)(logp), np.zeros([2, 3]))

  def test_jit_and_bad_inputs(self):
    logp = _rand([2, 3], 11)
    mask = jnp.ones([2, 3], bool)
    fn = jax.jit(policy.ppo_policy_loss, static_argnames="agg")
    loss, _ = fn(logp, logp, jnp.array([1., 3.]), mask, agg="seq-mean-token-mean")
    np.testing.assert_allclose(loss, -2.0, rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "'sum'"):
      _ppo(logp, logp, jnp.ones(2), mask, agg="sum")
    with self.assertRaisesRegex(ValueError, r"advantages must be \[N\] or \[N, T\]"):
      _ppo(logp, logp, jnp.ones(3), mask)


class GrpoLossTest(parameterized.TestCase):

  def test_kl_coef_zero_equals_ppo_and_ignores_ref(self):
    logp, old = _rand([2, 4], 12) * 0.3, _rand([2, 4], 13) * 0.3
    adv = jnp.array([0.7, -1.3])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    for agg in policy.AGG_MODES:
      want, want_m = _ppo(logp, old, adv, mask, agg=agg)
      got, m = _grpo(logp, old, None, adv, mask, kl_coef=0.0, agg=agg)
      np.testing.assert_array_equal(got, want)
      self.assertEqual(float(m["kl"]), 0.0)
      np.testing.assert_array_equal(m["pg_loss"], want)
      np.testing.assert_array_equal(m["clip_frac"], want_m["clip_frac"])

  def test_kl_term_by_hand(self):
    # Ratio 1 and k3 per token 0.5 + log 2 - 1 on the 3 masked tokens of 4.
    logp = jnp.log(jnp.full([1, 4], 0.5))
    ref = jnp.log(jnp.array([[0.25, 0.25, 0.25, 0.9]]))
    mask = jnp.array([[1, 1, 1, 0]], bool)
    loss, m = _grpo(logp, logp, ref, jnp.array([2.0]), mask, kl_coef=0.1)
    k3 = 0.5 + LOG(2) - 1
    np.testing.assert_allclose(m["kl"], k3, rtol=1e-5)
    np.testing.assert_allclose(m["pg_loss"], -2.0, rtol=1e-6)
    np.testing.assert_allclose(loss, -2.0 + 0.1 * k3, rtol=1e-5)
    # k1 kind and gradient: d/dlogp of 0.1 * mean(logp - ref) = 0.1 / 3 on masked tokens.
    fn = lambda lp: _grpo(lp, jax.lax.stop_gradient(lp), ref, jnp.zeros(1), mask,
                                     kl_coef=0.1, kl_kind="kl")[0]
    np.testing.assert_allclose(jax.grad(fn)(logp), [[0.1 / 3] * 3 + [0.0]], atol=1e-7)

  def test_traced_kl_coef_under_jit(self):
    logp = jnp.log(jnp.full([1, 2], 0.5))
    ref = jnp.log(jnp.full([1, 2], 0.25))
    mask = jnp.ones([1, 2], bool)
    fn = jax.jit(lambda c: policy.grpo_loss(logp, logp, ref, jnp.zeros(1), mask, kl_coef=c)[0])
    np.testing.assert_allclose(fn(0.5), 0.5 * (0.5 + LOG(2) - 1), rtol=1e-5)
    np.testing.assert_allclose(fn(0.0), 0.0, atol=1e-7)

  def test_clip_eps_high(self):
    old = jnp.zeros([1, 1])
    logp = jnp.log(jnp.array([[1.5]]))
    loss, _ = _grpo(logp, old, None, jnp.ones(1), jnp.ones([1, 1], bool),
                               clip_eps=0.2, clip_eps_high=0.3, kl_coef=0.0)
    np.testing.assert_allclose(loss, -1.3, rtol=1e-5)

  def test_missing_ref_raises(self):
    x = jnp.zeros([1, 2])
    with self.assertRaisesRegex(ValueError, "ref_logp is None"):
      _grpo(x, x, None, jnp.ones(1), jnp.ones([1, 2], bool), kl_coef=0.04)


class CrossEntropyTest(absltest.TestCase):

  def test_uniform_logits(self):
    v = 13
    loss, m = _ce(jnp.zeros([2, 3, v]), jnp.ones([2, 3], jnp.int32),
                                        jnp.ones([2, 3], bool))
    np.testing.assert_allclose(loss, LOG(v), rtol=1e-6)
    np.testing.assert_allclose(m["nll"], LOG(v), rtol=1e-6)

  def test_accuracy_and_mask(self):
    logits = jnp.array([[[5., 0., 0.], [0., 5., 0.], [0., 0., 5.]]])
    targets = jnp.array([[0, 2, 2]])
    mask = jnp.array([[True, True, False]])
    loss, m = _ce(logits, targets, mask)
    np.testing.assert_allclose(m["token_accuracy"], 0.5)
    lse = LOG(np.exp(5) + 2)
    np.testing.assert_allclose(loss, ((lse - 5) + lse) / 2, rtol=1e-5)
    # Changing a masked position's logits changes nothing.
    loss2, m2 = _ce(logits.at[0, 2].set(-30.), targets, mask)
    np.testing.assert_allclose(loss2, loss)
    np.testing.assert_allclose(m2["token_accuracy"], m["token_accuracy"])

  def test_parity_with_optax_mean(self):
    logits = _rand([3, 4, 9], 14) * 2
    targets = jnp.asarray(np.random.default_rng(15).integers(0, 9, size=[3, 4]))
    mask = jnp.asarray(np.random.default_rng(16).random([3, 4]) < 0.6)
    loss, _ = _ce(logits, targets, mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(loss, ce[mask].mean(), rtol=1e-5)



class AggregateTest(parameterized.TestCase):

  def test_all_modes_by_hand(self):
    # Row sums 2 and 4 (row means 1 and 4), 3 tokens, one empty row, T = 3.
    x = jnp.array([[1., 1., 7.], [4., 0., 7.], [9., 9., 9.]])
    m = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
    np.testing.assert_allclose(_agg(x, m, agg="token-mean"), 6 / 3, rtol=1e-6)
    np.testing.assert_allclose(_agg(x, m, agg="seq-mean-token-mean"), (1 + 4) / 2, rtol=1e-6)
    np.testing.assert_allclose(_agg(x, m, agg="seq-mean-token-sum"), (2 + 4) / 2, rtol=1e-6)
    np.testing.assert_allclose(_agg(x, m, agg="seq-mean-token-sum-norm"), 6 / 3, rtol=1e-6)
    np.testing.assert_allclose(_agg(x, m, agg="seq-mean-token-sum-norm", norm_length=12),
                               6 / 12, rtol=1e-6)

  @parameterized.named_parameters(*[(a, a) for a in policy.AGG_MODES])
  def test_padding_rows_and_columns_change_nothing(self, agg):
    x, m = _rand([3, 5], 20), jnp.asarray(np.random.default_rng(21).random([3, 5]) < 0.7)
    xp = jnp.pad(x, ((0, 2), (0, 4)), constant_values=np.nan)
    mp = jnp.pad(m, ((0, 2), (0, 4)))
    np.testing.assert_allclose(_agg(xp, mp, agg=agg, norm_length=8),
                               _agg(x, m, agg=agg, norm_length=8), rtol=1e-6)

  def test_agg_modes_extend_the_old_tuple(self):
    self.assertEqual(policy.AGG_MODES[:2], ("token-mean", "seq-mean-token-mean"))
    with self.assertRaisesRegex(ValueError, "got 'seq-sum'"):
      policy.aggregate(jnp.zeros([1, 1]), jnp.ones([1, 1], bool), "seq-sum")


class EntropyTest(absltest.TestCase):

  def test_parity_with_rlax(self):
    logits = _rand([3, 4, 9], 22) * 3
    got = _entropy(logits)
    chex.assert_shape(got, (3, 4))
    # rlax.entropy_loss = -mean(w * H) over a [T, V] sequence.
    want = -rlax.entropy_loss(logits.reshape(12, 9), jnp.ones(12))
    np.testing.assert_allclose(got.mean(), want, rtol=1e-5)
    np.testing.assert_allclose(_entropy(jnp.zeros([1, 1, 7])), [[LOG(7)]], rtol=1e-6)

  def test_minus_inf_logits_and_large_logits(self):
    logits = jnp.array([[[0., 0., -jnp.inf], [1e4, 0., 0.]]])
    h = _entropy(logits)
    np.testing.assert_allclose(h, [[LOG(2), 0.0]], atol=1e-6)
    g = jax.grad(lambda lg: _entropy(lg).sum())(logits)
    chex.assert_tree_all_finite(g)
    # dH/dz_j = -p_j (log p_j + H): for p = (.5, .5, 0): -.5 * (log .5 + log 2) = 0.
    np.testing.assert_allclose(g[0, 0], [0, 0, 0], atol=1e-6)

  def test_gradient_by_hand(self):
    logits = jnp.array([[[0.3, -1.2, 2.0]]])
    p = jax.nn.softmax(logits[0, 0])
    h = -jnp.sum(p * jnp.log(p))
    want = -p * (jnp.log(p) + h)
    got = jax.grad(lambda lg: _entropy(lg)[0, 0])(logits)[0, 0]
    np.testing.assert_allclose(got, want, atol=1e-6)

  def test_bf16(self):
    logits = (_rand([2, 3, 5], 23) * 2).astype(jnp.bfloat16)
    h = _entropy(logits)
    self.assertEqual(h.dtype, jnp.float32)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32))
    np.testing.assert_allclose(h, -(jnp.exp(lp) * lp).sum(-1), atol=1e-5)


class PpoExtensionsTest(parameterized.TestCase):

  def test_parity_with_rlax_clipped_surrogate(self):
    logp, old = _rand([4, 6], 24) * 0.3, _rand([4, 6], 25) * 0.3
    adv = _rand([4, 6], 26)
    mask = jnp.ones([4, 6], bool)
    (loss, _), grad = _ppo_vg(logp, old, adv, mask, clip_low=0.1, clip_high=0.1)

    @jax.jit
    @jax.value_and_grad
    def theirs(lp):
      ratio = jnp.exp(lp - old).reshape(-1)
      return rlax.clipped_surrogate_pg_loss(ratio, adv.reshape(-1), 0.1)

    want, want_grad = theirs(logp)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)

  def test_dual_clip_by_hand(self):
    # Ratios 4, 2, 4, .5 with A = -1, -1, +1, -1, eps .2 and c = 3:
    #   A=-1, r=4:  max(4, 1.2) = 4, dual min(4, 3) = 3 (dual clip, no gradient)
    #   A=-1, r=2:  max(2, 1.2) = 2 < 3 (unclipped, gradient r = 2)
    #   A=+1, r=4:  max(-4, -1.2) = -1.2 (clipped; the dual clip ignores A > 0)
    #   A=-1, r=.5: max(.5, .8) = .8 (clipped)
    ratios = jnp.array([[4., 2., 4., .5]])
    old = jnp.full([1, 4], -2.0)
    logp = old + jnp.log(ratios)
    adv = jnp.array([[-1., -1., 1., -1.]])
    mask = jnp.ones([1, 4], bool)
    (loss, m), grad = _ppo_vg(logp, old, adv, mask, dual_clip=3.0)
    np.testing.assert_allclose(loss, (3 + 2 - 1.2 + .8) / 4, rtol=1e-5)
    np.testing.assert_allclose(m["dual_clip_frac"], 0.25)
    np.testing.assert_allclose(m["clip_frac"], 0.5)
    np.testing.assert_allclose(m["ratio_min"], 0.5, rtol=1e-5)
    np.testing.assert_allclose(m["ratio_max"], 4.0, rtol=1e-5)
    np.testing.assert_allclose(grad, [[0, 2 / 4, 0, 0]], atol=1e-6)
    # Without the dual clip the first token costs 4.
    np.testing.assert_allclose(_ppo(logp, old, adv, mask)[0], (4 + 2 - 1.2 + .8) / 4, rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "dual_clip must be None or > 1, got 0.5"):
      policy.ppo_policy_loss(logp, old, adv, mask, dual_clip=0.5)

  def test_gspo_by_hand(self):
    # Row 0: token ratios 2 and .5 -> sequence ratio sqrt(2 * .5) = 1 (unclipped).
    # Row 1: token ratios 1.5, 1.5 -> 1.5 > 1 + eps: clipped for A > 0, no gradient.
    ratios = jnp.array([[2., .5], [1.5, 1.5]])
    old = jnp.full([2, 2], -1.0)
    logp = old + jnp.log(ratios)
    adv = jnp.array([2., 1.])
    mask = jnp.ones([2, 2], bool)
    loss, m = _gspo(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    np.testing.assert_allclose(loss, (-2 * 1 + -1 * 1.2) / 2, rtol=1e-5)
    np.testing.assert_allclose(m["clip_frac"], 0.5)
    np.testing.assert_allclose(m["ratio_max"], 1.5, rtol=1e-5)
    # d/dlogp_t of (1/2 rows) * (-A s) with s = exp(mean_t log r): -A * s / |y| / 2.
    _, grad = _ppo_vg(logp, old, adv, mask, clip_low=0.2, clip_high=0.2,
                      agg="seq-mean-token-mean", ratio_level="sequence")
    np.testing.assert_allclose(grad, [[-2 / 2 / 2, -2 / 2 / 2], [0, 0]], atol=1e-6)
    self.assertIs(policy.POLICY_LOSSES.get("gspo"), policy.gspo_policy_loss)

  def test_gspo_matches_sequence_formula(self):
    # GSPO's sequence objective written directly, on random ragged masks.
    logp, old = _rand([5, 7], 27) * 0.05, _rand([5, 7], 28) * 0.05
    adv = _rand([5], 29)
    mask = jnp.asarray(np.random.default_rng(30).random([5, 7]) < 0.6).at[:, 0].set(True)
    eps_lo, eps_hi = 0.01, 0.02

    @jax.jit
    @jax.value_and_grad
    def direct(lp):
      n = mask.sum(1)
      s = jnp.exp(jnp.where(mask, lp - old, 0).sum(1) / n)
      per_row = jnp.maximum(-adv * s, -adv * jnp.clip(s, 1 - eps_lo, 1 + eps_hi))
      return per_row.mean()

    (loss, _), grad = _ppo_vg(logp, old, adv, mask, clip_low=eps_lo, clip_high=eps_hi,
                              agg="seq-mean-token-mean", ratio_level="sequence")
    want, want_grad = direct(logp)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)

  def test_sequence_ratio_equals_token_ratio_for_one_token_rows(self):
    logp, old = _rand([4, 1], 31) * 0.3, _rand([4, 1], 32) * 0.3
    adv, mask = _rand([4], 33), jnp.ones([4, 1], bool)
    a, _ = _ppo(logp, old, adv, mask, ratio_level="sequence")
    b, _ = _ppo(logp, old, adv, mask)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "ratio_level.*'seq'"):
      policy.ppo_policy_loss(logp, old, adv, mask, ratio_level="seq")

  def test_token_weights_by_hand(self):
    logp = _rand([2, 2], 34)
    adv = jnp.array([1., -2.])
    mask = jnp.array([[1, 1], [1, 0]], bool)
    w = jnp.array([[2., .5], [1.5, 99.]])
    loss, _ = _ppo(logp, logp, adv, mask, token_weights=w)
    # Ratio 1: -(2 * 1 + .5 * 1 + 1.5 * -2) / 3.
    np.testing.assert_allclose(loss, -(2 + .5 - 3) / 3, rtol=1e-6)
    _, g = _ppo_vg(logp, None, adv, mask, token_weights=w)
    np.testing.assert_allclose(g, [[-2 / 3, -.5 / 3], [3 / 3, 0]], atol=1e-6)
    with self.assertRaisesRegex(ValueError, "token_weights must be"):
      policy.ppo_policy_loss(logp, logp, adv, mask, token_weights=jnp.ones([2]))

  def test_seq_mean_token_sum_norm_gradient(self):
    logp = _rand([2, 3], 35)
    adv = jnp.array([1., 2.])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]], bool)
    (loss, _), g = _ppo_vg(logp, None, adv, mask, agg="seq-mean-token-sum-norm", norm_length=10)
    np.testing.assert_allclose(loss, -(1 + 1 + 2) / 10, rtol=1e-6)
    np.testing.assert_allclose(g, -adv[:, None] * mask / 10, atol=1e-7)

  @parameterized.named_parameters(
      ("tm", "token-mean", "token", None), ("smtm", "seq-mean-token-mean", "token", 2.5),
      ("smts", "seq-mean-token-sum", "sequence", None),
      ("norm", "seq-mean-token-sum-norm", "token", 3.0))
  def test_padding_invariance_with_grad(self, agg, level, dual):
    rng = np.random.default_rng(36)
    logp, old = _rand([3, 4], 37) * 0.5, _rand([3, 4], 38) * 0.5
    adv = _rand([3, 4], 39)
    mask = jnp.asarray(rng.random([3, 4]) < 0.7).at[:, 0].set(True)
    w = jnp.asarray(rng.random([3, 4]) + 0.5, jnp.float32)
    kw = dict(agg=agg, ratio_level=level, dual_clip=dual, norm_length=6)
    pad = lambda x, v: jnp.pad(x, ((0, 1), (0, 2)), constant_values=v)
    (loss, met), g = _ppo_vg(logp, old, adv, mask, token_weights=w, **kw)
    # Garbage in the padding: NaN log-probs, advantages and weights, huge old log-probs.
    (loss_p, met_p), g_p = _ppo_vg(pad(logp, np.nan), pad(old, -1e4), pad(adv, np.nan),
                                   pad(mask, False), token_weights=pad(w, np.nan), **kw)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
    chex.assert_trees_all_close(met_p, met, rtol=1e-6)
    chex.assert_tree_all_finite(g)
    np.testing.assert_allclose(g_p[:3, :4], g, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g_p[3:], 0.0)
    np.testing.assert_array_equal(g_p[:, 4:], 0.0)

  def test_row_permutation_invariance(self):
    logp, old, adv = _rand([4, 3], 40) * .3, _rand([4, 3], 41) * .3, _rand([4], 42)
    mask = jnp.asarray(np.random.default_rng(43).random([4, 3]) < 0.7).at[:, 0].set(True)
    perm = np.array([2, 0, 3, 1])
    for agg in policy.AGG_MODES:
      a, _ = _ppo(logp, old, adv, mask, agg=agg)
      b, _ = _ppo(logp[perm], old[perm], adv[perm], mask[perm], agg=agg)
      np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=agg)

  def test_registry_and_grpo_passthrough(self):
    self.assertEqual(policy.POLICY_LOSSES.names(), ["gspo", "ppo"])
    logp, old = _rand([2, 3], 44) * .2, _rand([2, 3], 45) * .2
    adv, mask = jnp.array([1., -1.]), jnp.ones([2, 3], bool)
    want, _ = _ppo(logp, old, adv, mask, ratio_level="sequence", dual_clip=2.0)
    got, m = _grpo(logp, old, None, adv, mask, kl_coef=0.0, ratio_level="sequence",
                   dual_clip=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    self.assertIn("ratio_min", m)

  def test_grpo_nan_padding_with_kl(self):
    logp, old, ref = _rand([2, 3], 46) * .3, _rand([2, 3], 47) * .3, _rand([2, 3], 48) * .3
    adv, mask = jnp.array([1., -1.]), jnp.array([[1, 1, 0], [1, 0, 0]], bool)
    vg = jax.jit(jax.value_and_grad(
        lambda lp, o, r, m: policy.grpo_loss(lp, o, r, adv, m, kl_coef=0.1)[0]))
    loss, g = vg(logp, old, ref, mask)
    nan = lambda x: jnp.where(mask, x, jnp.nan)
    loss_p, g_p = vg(nan(logp), nan(old), nan(ref), mask)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
    np.testing.assert_allclose(g_p, g, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(g_p)[~np.asarray(mask)], 0.0)

  def test_kl_with_sum_norm_agg(self):
    logp = jnp.log(jnp.full([1, 4], 0.5))
    ref = jnp.log(jnp.array([[0.25, 0.25, 0.9, 0.9]]))
    mask = jnp.array([[1, 1, 0, 0]], bool)
    _, m = _grpo(logp, logp, ref, jnp.zeros(1), mask, kl_coef=0.1, kl_kind="kl",
                 agg="seq-mean-token-sum-norm", norm_length=8)
    np.testing.assert_allclose(m["kl"], 2 * LOG(2) / 8, rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
