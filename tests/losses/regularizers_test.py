"""Tests for jaxsearch.losses.regularizers: LLDS and truncated importance sampling."""
from __future__ import annotations

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxsearch.losses import policy, regularizers

LOG = np.log
_llds_vg = jax.jit(jax.value_and_grad(regularizers.llds_penalty, has_aux=True),
                   static_argnames=("agg", "norm_length"))
_tis = jax.jit(regularizers.truncated_is_weights, static_argnames=("cap", "level"))


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


class LldsTest(parameterized.TestCase):

  def test_hand_values_and_gradient(self):
    old = jnp.log(jnp.array([[.5, .5, .5], [.5, .5, .5], [.5, .5, .5]]))
    new = jnp.log(jnp.array([[.25, .6, .9],     # delta = log(.5 * 1.2 * 1.8) > 0: inactive
                             [.25, .6, .5],     # delta = log(.6) < 0: token 0 fell
                             [.4, .1, .7]]))    # delta < 0 over its 2 masked tokens
    mask = jnp.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]], bool)
    (pen, m), g = _llds_vg(new, old, mask)
    # Active rows 1 and 2; fallen tokens: row 1 tok 0 (log 2), row 2 tok 0 (log 1.25) and
    # tok 1 (log 5). Token mean over the 8 policy tokens.
    want = (LOG(2) + LOG(1.25) + LOG(5)) / 8
    np.testing.assert_allclose(pen, want, rtol=1e-5)
    np.testing.assert_allclose(m["llds_active_frac"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["llds_token_frac"], 3 / 8, rtol=1e-6)
    # d/dlogp of max(0, old - logp) / 8 = -1/8 on each fallen token of an active row.
    np.testing.assert_allclose(g, [[0, 0, 0], [-1 / 8, 0, 0], [-1 / 8, -1 / 8, 0]], atol=1e-7)

  def test_rows_gate_and_agg(self):
    old = jnp.zeros([2, 2])
    new = jnp.array([[-1., -3.], [-2., 0.]])
    mask = jnp.ones([2, 2], bool)
    (pen, _), _ = _llds_vg(new, old, mask, rows=jnp.array([False, True]))
    np.testing.assert_allclose(pen, 2 / 4, rtol=1e-6)
    (pen, _), _ = _llds_vg(new, old, mask, agg="seq-mean-token-sum")
    np.testing.assert_allclose(pen, (4 + 2) / 2, rtol=1e-6)

  def test_no_penalty_when_likelihood_rises_or_equal(self):
    old = _rand([3, 4], 0)
    (pen, m), g = _llds_vg(old, old, jnp.ones([3, 4], bool))
    self.assertEqual(float(pen), 0.0)
    np.testing.assert_array_equal(g, 0.0)
    (pen, _), _ = _llds_vg(old + 0.1, old, jnp.ones([3, 4], bool))
    self.assertEqual(float(pen), 0.0)

  def test_padding_invariance(self):
    new, old = _rand([3, 5], 1) * .3, _rand([3, 5], 2) * .3
    mask = jnp.asarray(np.random.default_rng(3).random([3, 5]) < 0.7)
    (pen, m), g = _llds_vg(new, old, mask)
    pad = lambda x, c: jnp.pad(x, ((0, 2), (0, 3)), constant_values=c)
    (pen_p, m_p), g_p = _llds_vg(pad(new, -1e4), pad(old, np.nan), pad(mask, False))
    np.testing.assert_allclose(pen_p, pen, rtol=1e-6)
    chex.assert_trees_all_close(m_p, m, rtol=1e-6)
    np.testing.assert_allclose(g_p[:3, :5], g, atol=1e-7)
    np.testing.assert_array_equal(g_p[3:], 0.0)
    self.assertIs(regularizers.REGULARIZERS.get("llds"), regularizers.llds_penalty)

  def test_bad_shapes(self):
    with self.assertRaisesRegex(ValueError, "old_logp and mask all"):
      regularizers.llds_penalty(jnp.zeros([2, 3]), jnp.zeros([2, 2]), jnp.ones([2, 3], bool))


class TruncatedIsTest(absltest.TestCase):

  def test_token_weights_by_hand(self):
    old = jnp.log(jnp.array([[.6, .2, .3]]))
    sampler = jnp.log(jnp.array([[.2, .4, jnp.nan]]))
    mask = jnp.array([[True, True, False]])
    np.testing.assert_allclose(_tis(old, sampler, mask), [[2.0, 0.5, 0.0]], atol=1e-6)
    np.testing.assert_allclose(_tis(old, sampler, mask, cap=5.0), [[3.0, 0.5, 0.0]], atol=1e-5)

  def test_sequence_weights_by_hand(self):
    old = jnp.log(jnp.array([[.6, .2], [.3, .3]]))
    sampler = jnp.log(jnp.array([[.2, .3], [.3, .6]]))
    w = _tis(old, sampler, jnp.array([[1, 1], [1, 0]], bool), cap=4.0, level="sequence")
    # Row 0: 3 * 2/3 = 2; row 1: only its first token counts, ratio 1.
    np.testing.assert_allclose(w, [[2., 2.], [1., 0.]], atol=1e-5)

  def test_applied_to_ppo_loss_with_gradient(self):
    logp = _rand([2, 3], 4) * .2
    sampler = logp + _rand([2, 3], 5) * .5
    adv, mask = jnp.array([1., -1.]), jnp.ones([2, 3], bool)
    w = _tis(logp, sampler, mask, cap=1.5)
    self.assertTrue(0 < float(w.min()) and float(w.max()) <= 1.5)

    @jax.jit
    @jax.value_and_grad
    def loss_fn(lp):
      return policy.ppo_policy_loss(lp, None, adv, mask, token_weights=w)[0]

    loss, g = loss_fn(logp)
    # On-policy (ratio 1): loss = -mean(w * A), gradient -w * A / 6 (w is a constant).
    np.testing.assert_allclose(loss, -jnp.mean(w * adv[:, None]), rtol=1e-5)
    np.testing.assert_allclose(g, -w * adv[:, None] / 6, atol=1e-6)
    # The weights carry no gradient to old_logp or sampler_logp.
    gw = jax.grad(lambda o: _tis(o, sampler, mask, cap=1.5).sum())(logp)
    np.testing.assert_array_equal(gw, 0.0)

  def test_bad_options(self):
    x = jnp.zeros([1, 2])
    with self.assertRaisesRegex(ValueError, "level must be"):
      regularizers.truncated_is_weights(x, x, x > 0, level="row")
    with self.assertRaisesRegex(ValueError, "cap must be > 0, got 0"):
      regularizers.truncated_is_weights(x, x, x > 0, cap=0)



class DocstringExamplesTest(absltest.TestCase):

  def test_examples_run(self):
    result = doctest.testmod(regularizers)
    self.assertGreater(result.attempted, 5)
    self.assertEqual(result.failed, 0)

if __name__ == "__main__":
  absltest.main()
