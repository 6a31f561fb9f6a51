"""Tests for jaxsearch.losses.advantages."""
from __future__ import annotations


import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxsearch.losses import advantages as adv_lib

R = 1 / np.sqrt(2)   # (x - .5) / std([0, 1], ddof=1) with std = 0.7071


def _reference(rewards, group_ids, scale, eps=1e-6):
  """Loop-over-groups numpy reference."""
  rewards = np.asarray(rewards, np.float64)
  out = np.zeros_like(rewards)
  batch_std = rewards.std(ddof=1) if len(rewards) > 1 else 0.0
  for g in np.unique(group_ids):
    idx = np.flatnonzero(group_ids == g)
    r = rewards[idx]
    centered = r - r.mean()
    if scale == "group":
      std = r.std(ddof=1) if len(r) > 1 else 0.0
      centered = centered / (std + eps)
    elif scale == "batch":
      centered = centered / (batch_std + eps)
    out[idx] = centered
  return out


class GrpoAdvantagesTest(parameterized.TestCase):

  def test_hand_computed(self):
    adv = adv_lib.grpo_advantages(jnp.array([0., 1., 0., 1.]), jnp.array([0, 0, 1, 1]))
    np.testing.assert_allclose(adv, [-R, R, -R, R], atol=1e-5)
    self.assertEqual(adv.dtype, jnp.float32)

  def test_unsorted_noncontiguous_ids(self):
    # Group 7 = rows {0, 2} rewards (2, 0); group -3 = rows {1, 3, 4} rewards (1, 2, 3).
    adv = adv_lib.grpo_advantages(jnp.array([2., 1., 0., 2., 3.]),
                                  jnp.array([7, -3, 7, -3, -3]))
    s = np.sqrt(2.0)   # std(ddof=1) of (2, 0) and of (1, 2, 3): sqrt(2) and 1
    np.testing.assert_allclose(adv, [1 / s, -1, -1 / s, 0, 1], atol=1e-5)

  def test_all_equal_group_and_singleton_give_zero(self):
    adv = adv_lib.grpo_advantages(jnp.array([3., 3., 3., 5.]), jnp.array([0, 0, 0, 1]))
    np.testing.assert_array_equal(adv, [0, 0, 0, 0])
    chex.assert_tree_all_finite(adv)

  def test_none_is_r_minus_group_mean(self):
    r = jnp.array([1., 2., 6., 10., 20.])
    g = jnp.array([0, 0, 0, 1, 1])
    want = [-2, -1, 3, -5, 5]
    np.testing.assert_allclose(adv_lib.grpo_advantages(r, g, scale="none"), want, atol=1e-6)
    np.testing.assert_allclose(adv_lib.ADVANTAGES.get("drgrpo")(r, g), want, atol=1e-6)

  def test_batch_scale(self):
    r = jnp.array([0., 1., 0., 3.])
    g = jnp.array([0, 0, 1, 1])
    # Batch std (ddof=1): mean 1, squared deviations 1+0+1+4 = 6 -> sqrt(2).
    want = np.array([-0.5, 0.5, -1.5, 1.5]) / np.sqrt(2)
    np.testing.assert_allclose(adv_lib.grpo_advantages(r, g, scale="batch"), want, atol=1e-5)

  @parameterized.named_parameters(("group", "group"), ("batch", "batch"), ("none", "none"))
  def test_matches_loop_reference(self, scale):
    rng = np.random.default_rng(0)
    r = rng.normal(size=37).astype(np.float32)
    g = rng.permutation(np.repeat(np.array([4, 11, 0, 9, 2, 30]), [8, 8, 8, 8, 4, 1]))
    got = adv_lib.grpo_advantages(jnp.asarray(r), jnp.asarray(g), scale=scale)
    np.testing.assert_allclose(got, _reference(r, g, scale), atol=1e-5)

  @parameterized.named_parameters(("group", "group"), ("batch", "batch"), ("none", "none"))
  def test_jit(self, scale):
    fn = jax.jit(adv_lib.grpo_advantages, static_argnames="scale")
    r, g = jnp.array([0., 1., 0., 1.]), jnp.array([0, 0, 1, 1])
    np.testing.assert_allclose(fn(r, g, scale=scale),
                               adv_lib.grpo_advantages(r, g, scale=scale), atol=1e-6)
    np.testing.assert_allclose(fn(r, g), [-R, R, -R, R], atol=1e-5)

  def test_permutation_equivariance(self):
    rng = np.random.default_rng(1)
    r = jnp.asarray(rng.normal(size=24), jnp.float32)
    g = jnp.asarray(np.repeat(np.arange(6), 4))
    perm = jnp.asarray(rng.permutation(24))
    for scale in adv_lib.SCALES:
      base = adv_lib.grpo_advantages(r, g, scale=scale)
      np.testing.assert_allclose(adv_lib.grpo_advantages(r[perm], g[perm], scale=scale),
                                 base[perm], atol=1e-6, err_msg=scale)

  def test_group_zero_mean(self):
    rng = np.random.default_rng(2)
    r = jnp.asarray(rng.normal(size=16), jnp.float32)
    g = jnp.asarray(np.repeat(np.arange(4), 4))
    adv = adv_lib.grpo_advantages(r, g)
    np.testing.assert_allclose(adv.reshape(4, 4).sum(1), 0, atol=1e-5)
    # Group scaling: each group's advantages have unit std (ddof=1).
    np.testing.assert_allclose(np.std(np.asarray(adv).reshape(4, 4), axis=1, ddof=1), 1,
                               atol=1e-4)

  def test_single_row_batch(self):
    for scale in adv_lib.SCALES:
      np.testing.assert_array_equal(
          adv_lib.grpo_advantages(jnp.array([2.]), jnp.array([0]), scale=scale), [0])

  def test_registry(self):
    self.assertIs(adv_lib.ADVANTAGES.get("grpo"), adv_lib.grpo_advantages)
    with self.assertRaisesRegex(LookupError, "drgrpo.*grpo"):
      adv_lib.ADVANTAGES.get("rloo_typo")

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, "'zscore'"):
      adv_lib.grpo_advantages(jnp.zeros(2), jnp.zeros(2, int), scale="zscore")
    with self.assertRaisesRegex(ValueError, r"\(3,\) and \(2,\)"):
      adv_lib.grpo_advantages(jnp.zeros(3), jnp.zeros(2, int))


if __name__ == "__main__":
  absltest.main()
