"""Tests for jaxsearch.losses.value: GAE, REINFORCE++ token returns, the clipped value loss."""
from __future__ import annotations

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import rlax
from absl.testing import absltest, parameterized

from jaxsearch.losses import advantages as adv_lib
from jaxsearch.losses import value

_gae = jax.jit(value.gae)
_returns = jax.jit(value.discounted_returns)
_rpp = jax.jit(value.reinforce_pp_token_advantages)
_vloss_vg = jax.jit(jax.value_and_grad(value.value_loss, has_aux=True),
                    static_argnames=("clip", "agg"))


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _ragged_mask(n, t, seed):
  """Prompt columns off, policy tokens with environment gaps, right padding."""
  rng = np.random.default_rng(seed)
  mask = rng.random([n, t]) < 0.6
  mask[:, :2] = False                                       # prompt
  for i, length in enumerate(rng.integers(t // 2, t + 1, size=n)):
    mask[i, length:] = False                                # padding
  mask[0, 2:] = True                                        # one row without gaps
  mask[1] = False                                           # one empty row
  return mask


def _rlax_gae_on_policy_tokens(rewards, values, mask, gamma, lam, bootstrap=None):
  """rlax's truncated GAE on each row's compacted policy tokens, scattered back."""
  rewards, values, mask = map(np.asarray, (rewards, values, mask))
  n, t = mask.shape
  r_c = np.zeros([n, t], np.float32)
  v_c = np.zeros([n, t + 1], np.float32)
  lam_c = np.full([n, t], lam, np.float32)
  counts = mask.sum(1)
  for i in range(n):
    k = counts[i]
    r_c[i, :k] = rewards[i, mask[i]]
    v_c[i, :k] = values[i, mask[i]]
    if bootstrap is not None:
      v_c[i, k] = bootstrap[i]
    lam_c[i, max(k - 1, 0):] = 0.0   # nothing after a row's last step leaks into it
  disc = jnp.full([t], gamma, jnp.float32)
  adv_c = jax.jit(jax.vmap(rlax.truncated_generalized_advantage_estimation,
                           in_axes=(0, None, 0, 0)))(jnp.asarray(r_c), disc,
                                                     jnp.asarray(lam_c), jnp.asarray(v_c))
  adv = np.zeros([n, t], np.float32)
  for i in range(n):
    adv[i, mask[i]] = np.asarray(adv_c)[i, :counts[i]]
  return adv


class GaeTest(parameterized.TestCase):

  def test_env_tokens_in_the_middle_by_hand(self):
    # Policy tokens at 0, 1 and 4; 2-3 are environment tokens with garbage values.
    r = jnp.array([[0., 0., 7., 7., 1.]])
    v = jnp.array([[.1, .2, 99., jnp.nan, .5]])
    m = jnp.array([[1, 1, 0, 0, 1]], bool)
    adv, ret = _gae(r, v, m, gamma=0.9, lam=0.8)
    a4 = 1 - .5
    a1 = 0 + .9 * .5 - .2 + .9 * .8 * a4         # V(4) bootstraps across the gap: one gamma
    a0 = 0 + .9 * .2 - .1 + .9 * .8 * a1
    np.testing.assert_allclose(adv, [[a0, a1, 0, 0, a4]], atol=1e-6)
    np.testing.assert_allclose(ret, [[a0 + .1, a1 + .2, 0, 0, 1.0]], atol=1e-6)

  def test_lambda_one_is_return_minus_value(self):
    r = jnp.array([[0., 0., 3., 0., 1., 0.]])
    v = _rand([1, 6], 0)
    m = jnp.array([[0, 1, 0, 1, 1, 0]], bool)
    adv, ret = _gae(r, v, m, gamma=0.5, lam=1.0)
    # Policy rewards (0, 0, 1) at steps 1, 3, 4: returns .25, .5, 1 (the 3 is ignored).
    want_ret = np.array([[0, .25, 0, .5, 1, 0]])
    np.testing.assert_allclose(ret, want_ret, atol=1e-6)
    np.testing.assert_allclose(adv, (want_ret - v) * np.asarray(m), atol=1e-6)

  def test_lambda_zero_is_td_error(self):
    r, v = _rand([2, 4], 1), _rand([2, 4], 2)
    m = jnp.array([[1, 0, 1, 1], [1, 1, 0, 0]], bool)
    adv, _ = _gae(r, v, m, gamma=0.7, lam=0.0)
    want = np.array([[r[0, 0] + .7 * v[0, 2] - v[0, 0], 0, r[0, 2] + .7 * v[0, 3] - v[0, 2],
                      r[0, 3] - v[0, 3]],
                     [r[1, 0] + .7 * v[1, 1] - v[1, 0], r[1, 1] - v[1, 1], 0, 0]])
    np.testing.assert_allclose(adv, want, atol=1e-6)

  @parameterized.named_parameters(("llm", 1.0, 0.95), ("discounted", 0.9, 0.7),
                                  ("mc", 0.99, 1.0))
  def test_parity_with_rlax(self, gamma, lam):
    mask = _ragged_mask(6, 13, 3)
    r, v = _rand([6, 13], 4), _rand([6, 13], 5)
    adv, ret = _gae(r, v, jnp.asarray(mask), gamma=gamma, lam=lam)
    want = _rlax_gae_on_policy_tokens(r, v, mask, gamma, lam)
    np.testing.assert_allclose(adv, want, atol=1e-5)
    np.testing.assert_allclose(ret, (want + np.asarray(v)) * mask, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(adv)[~mask], 0.0)

  def test_bootstrap_value_parity_with_rlax(self):
    mask = _ragged_mask(5, 9, 6)
    r, v = _rand([5, 9], 7), _rand([5, 9], 8)
    boot = np.random.default_rng(9).normal(size=5).astype(np.float32)
    adv, _ = _gae(r, v, jnp.asarray(mask), gamma=0.9, lam=0.8, bootstrap_value=boot)
    want = _rlax_gae_on_policy_tokens(r, v, mask, 0.9, 0.8, boot)
    np.testing.assert_allclose(adv, want, atol=1e-5)

  def test_returns_parity_with_rlax_lambda_returns(self):
    # GAE returns are lambda-returns: rlax.lambda_returns(r, gamma, V_{t+1}, lam).
    r, v = _rand([1, 7], 10)[0], _rand([1, 7], 11)[0]
    _, ret = _gae(r[None], v[None], jnp.ones([1, 7], bool), gamma=0.9, lam=0.6)
    want = rlax.lambda_returns(r, jnp.full([7], 0.9), jnp.append(v[1:], 0.0), 0.6)
    np.testing.assert_allclose(ret[0], want, atol=1e-5)

  def test_padding_and_permutation_invariance(self):
    mask = jnp.asarray(_ragged_mask(4, 8, 12))
    r, v = _rand([4, 8], 13), _rand([4, 8], 14)
    adv, ret = _gae(r, v, mask, gamma=0.9, lam=0.9)
    pad = lambda x, c: jnp.pad(x, ((0, 2), (0, 3)), constant_values=c)
    adv_p, ret_p = _gae(pad(r, np.nan), pad(v, np.inf), pad(mask, False), gamma=0.9, lam=0.9)
    np.testing.assert_allclose(adv_p[:4, :8], adv, atol=1e-6)
    np.testing.assert_allclose(ret_p[:4, :8], ret, atol=1e-6)
    np.testing.assert_array_equal(adv_p[4:], 0.0)
    np.testing.assert_array_equal(adv_p[:, 8:], 0.0)
    perm = np.array([3, 1, 0, 2])
    np.testing.assert_allclose(_gae(r[perm], v[perm], mask[perm], gamma=0.9, lam=0.9)[0],
                               np.asarray(adv)[perm], atol=1e-6)

  def test_traced_gamma_lam_and_gradient(self):
    r, v = _rand([2, 5], 15), _rand([2, 5], 16)
    m = jnp.asarray(_ragged_mask(2, 5, 17)).at[1, 3].set(True)
    fn = jax.jit(lambda g, l: value.gae(r, v, m, gamma=g, lam=l)[0])
    np.testing.assert_allclose(fn(0.9, 0.5), _gae(r, v, m, gamma=0.9, lam=0.5)[0], atol=1e-6)
    # lam = 0: sum_t A_t = sum_t (r_t + .9 V_next(t) - V_t), so dV_t = -1 + .9 for every
    # policy token that follows another one in its row, -1 for a row's first, 0 elsewhere.
    g = jax.grad(lambda vv: value.gae(r, vv, m, gamma=0.9, lam=0.0)[0].sum())(v)
    mask = np.asarray(m)
    first = np.cumsum(mask, axis=1) == 1
    want = np.where(mask, np.where(first, -1.0, -0.1), 0.0)
    np.testing.assert_allclose(g, want, atol=1e-6)

  def test_bad_shapes(self):
    with self.assertRaisesRegex(ValueError, r"values must have shape \(2, 3\)"):
      value.gae(jnp.zeros([2, 3]), jnp.zeros([2, 4]), jnp.ones([2, 3], bool))
    self.assertEqual(adv_lib.TOKEN_ADVANTAGES.get("gae"), value.gae)


class ReturnsAndReinforcePPTest(absltest.TestCase):

  def test_discounted_returns_by_hand_and_rlax(self):
    got = _returns(jnp.array([[1., 5., 2.]]), jnp.array([[1, 0, 1]], bool), gamma=.5)
    np.testing.assert_allclose(got, [[2., 0., 2.]], atol=1e-6)
    r = _rand([1, 6], 18)[0]
    want = rlax.discounted_returns(r, jnp.full([6], 0.8), 0.0)
    np.testing.assert_allclose(_returns(r[None], jnp.ones([1, 6], bool), gamma=0.8)[0], want,
                               atol=1e-5)

  def test_equals_gae_with_zero_values_and_lambda_one(self):
    mask = jnp.asarray(_ragged_mask(4, 9, 19))
    r = _rand([4, 9], 20)
    np.testing.assert_allclose(_returns(r, mask, gamma=0.9),
                               _gae(r, jnp.zeros([4, 9]), mask, gamma=0.9, lam=1.0)[1],
                               atol=1e-5)

  def test_outcome_reward_by_hand(self):
    # Outcome reward on the last policy token; an environment gap in row 0.
    r = jnp.array([[0., 9., 1.], [0., 0., 0.]])
    m = jnp.array([[1, 0, 1], [1, 1, 0]], bool)
    adv, ret = _rpp(r, m)
    np.testing.assert_allclose(ret, [[1, 0, 1], [0, 0, 0]], atol=1e-6)
    # Whitened over the 4 policy tokens (1, 1, 0, 0): mean .5, std(ddof=1) sqrt(1/3).
    z = .5 / np.sqrt(1 / 3)
    np.testing.assert_allclose(adv, [[z, 0, z], [-z, -z, 0]], atol=1e-4)

  def test_kl_shaping_by_hand(self):
    r = jnp.array([[0., 1.]])
    kl = jnp.array([[.5, .25]])
    _, ret = _rpp(r, jnp.ones([1, 2], bool), gamma=1.0, kl=kl, kl_coef=0.1)
    # Shaped rewards (-.05, 1 - .025): returns (.925, .975).
    np.testing.assert_allclose(ret, [[.925, .975]], atol=1e-6)
    self.assertEqual(adv_lib.TOKEN_ADVANTAGES.get("reinforce_pp_token"),
                     value.reinforce_pp_token_advantages)


class ValueLossTest(absltest.TestCase):

  def test_clipped_by_hand_with_gradient(self):
    values = jnp.array([[1.0, 0.3, -2.0, 50.]])
    old = jnp.zeros([1, 4])
    returns = jnp.array([[2.0, -1.0, -1.0, 0.]])
    mask = jnp.array([[1, 1, 1, 0]], bool)
    (loss, m), g = _vloss_vg(values, old, returns, mask, clip=0.5)
    # tok 0: V_clip .5, max(1, 2.25) = 2.25 (clipped: no gradient)
    # tok 1: inside the clip range, 1.69
    # tok 2: V_clip -.5, max(1, .25) = 1 (unclipped)
    np.testing.assert_allclose(loss, 0.5 * (2.25 + 1.69 + 1.0) / 3, rtol=1e-5)
    np.testing.assert_allclose(m["vf_clipfrac"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["vpred_mean"], (1 + .3 - 2) / 3, rtol=1e-5)
    np.testing.assert_allclose(g, [[0.0, 1.3 / 3, -1.0 / 3, 0.0]], atol=1e-6)

  def test_unclipped_parity_with_rlax_l2(self):
    v, ret = _rand([3, 5], 21), _rand([3, 5], 22)
    (loss, m), g = _vloss_vg(v, v + 10.0, ret, jnp.ones([3, 5], bool), clip=None)
    np.testing.assert_allclose(loss, rlax.l2_loss(v - ret).mean(), rtol=1e-5)
    np.testing.assert_allclose(g, (v - ret) / 15, atol=1e-6)
    self.assertEqual(float(m["vf_clipfrac"]), 0.0)

  def test_explained_variance(self):
    ret = jnp.array([[1., 2., 3., 4.]])
    mask = jnp.ones([1, 4], bool)
    (_, m), _ = _vloss_vg(ret, ret, ret, mask, clip=0.2)
    np.testing.assert_allclose(m["explained_variance"], 1.0, atol=1e-6)
    (_, m), _ = _vloss_vg(jnp.full([1, 4], 2.5), ret, ret, mask, clip=None)
    np.testing.assert_allclose(m["explained_variance"], 0.0, atol=1e-6)
    (_, m), _ = _vloss_vg(ret, ret, jnp.ones([1, 4]), mask, clip=None)   # Var(R) = 0
    self.assertEqual(float(m["explained_variance"]), 0.0)

  def test_padding_invariance_and_empty_mask(self):
    v, old, ret = _rand([3, 4], 23), _rand([3, 4], 24), _rand([3, 4], 25)
    mask = jnp.asarray(_ragged_mask(3, 4, 26)).at[0, 0].set(True)
    pad = lambda x, c: jnp.pad(x, ((0, 1), (0, 2)), constant_values=c)
    for agg in ("token-mean", "seq-mean-token-mean"):
      (loss, m), g = _vloss_vg(v, old, ret, mask, clip=0.3, agg=agg)
      (loss_p, m_p), g_p = _vloss_vg(pad(v, 1e30), pad(old, np.nan), pad(ret, np.inf),
                                     pad(mask, False), clip=0.3, agg=agg)
      np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
      chex.assert_trees_all_close(m_p, m, rtol=1e-5)
      np.testing.assert_allclose(g_p[:3, :4], g, atol=1e-7)
      np.testing.assert_array_equal(g_p[3:], 0.0)
    (loss, _), g = _vloss_vg(v, old, ret, jnp.zeros([3, 4], bool), clip=0.3)
    self.assertEqual(float(loss), 0.0)
    np.testing.assert_array_equal(g, 0.0)



class DocstringExamplesTest(absltest.TestCase):

  def test_examples_run(self):
    result = doctest.testmod(value)
    self.assertGreater(result.attempted, 5)
    self.assertEqual(result.failed, 0)

if __name__ == "__main__":
  absltest.main()
