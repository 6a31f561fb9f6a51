"""Tests for jaxsearch.losses.policy with hand-computed values."""
from __future__ import annotations


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from jaxsearch.losses import policy

LOG = np.log

# Jit by default (one compile per shape instead of one per eager op).
_ppo = jax.jit(policy.ppo_policy_loss, static_argnames=("clip_low", "clip_high", "agg"))
_grpo = jax.jit(policy.grpo_loss,
                static_argnames=("clip_eps", "clip_eps_high", "kl_coef", "kl_kind", "agg"))
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


if __name__ == "__main__":
  absltest.main()
