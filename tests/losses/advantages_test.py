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



def _rloo_reference(rewards, group_ids):
  rewards = np.asarray(rewards, np.float64)
  out = np.zeros_like(rewards)
  for i in range(len(rewards)):
    others = [rewards[j] for j in range(len(rewards)) if j != i and group_ids[j] == group_ids[i]]
    out[i] = rewards[i] - np.mean(others) if others else 0.0
  return out


class GroupMomentsTest(absltest.TestCase):

  def test_hand_values_with_valid_mask(self):
    same = jnp.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    # Group {0, 1}: valid entries 1, 3, 5 (the 100 is invalid) -> mean 3, var 4.
    x = jnp.array([[1., 3.], [5., 100.], [7., 7.]])
    valid = jnp.array([[1, 1], [1, 0], [1, 1]], bool)
    mean, var, count = jax.jit(adv_lib.group_moments)(x, same, valid)
    np.testing.assert_allclose(mean, [3, 3, 7], atol=1e-6)
    np.testing.assert_allclose(var, [4, 4, 0], atol=1e-5)
    np.testing.assert_allclose(count, [3, 3, 2])

  def test_large_offset_is_exact(self):
    # Sum-of-squares would cancel catastrophically in float32 at offset 1e4.
    r = jnp.array([1e4, 1e4 + 1, 1e4 + 2], jnp.float32)
    _, var, _ = adv_lib.group_moments(r, jnp.ones([3, 3], bool))
    np.testing.assert_allclose(var, [1, 1, 1], rtol=1e-4)


class RlooTest(absltest.TestCase):

  def test_hand_computed(self):
    fn = jax.jit(adv_lib.rloo_advantages)
    adv = fn(jnp.array([1., 0., 0., 2.]), jnp.array([0, 0, 0, 1]))
    # row 0: 1 - (0 + 0) / 2; rows 1, 2: 0 - (1 + 0) / 2; the singleton group gets 0.
    np.testing.assert_allclose(adv, [1., -0.5, -0.5, 0.], atol=1e-6)
    # n / (n - 1) * (r - mean): 3/2 * (1 - 1/3) = 1.
    self.assertIs(adv_lib.ADVANTAGES.get("rloo"), adv_lib.rloo_advantages)

  def test_zero_variance_group(self):
    adv = adv_lib.rloo_advantages(jnp.array([2., 2., 2., 0., 1.]), jnp.array([3, 3, 3, 4, 4]))
    np.testing.assert_allclose(adv, [0, 0, 0, -1, 1], atol=1e-6)

  def test_matches_loop_reference_and_permutes(self):
    rng = np.random.default_rng(3)
    r = rng.normal(size=21).astype(np.float32)
    g = rng.permutation(np.repeat(np.array([5, 1, 8, 2]), [8, 6, 6, 1]))
    got = jax.jit(adv_lib.rloo_advantages)(jnp.asarray(r), jnp.asarray(g))
    np.testing.assert_allclose(got, _rloo_reference(r, g), atol=1e-5)
    perm = rng.permutation(21)
    np.testing.assert_allclose(adv_lib.rloo_advantages(jnp.asarray(r[perm]), jnp.asarray(g[perm])),
                               np.asarray(got)[perm], atol=1e-6)


class ReinforcePPTest(absltest.TestCase):

  def test_hand_computed(self):
    fn = jax.jit(adv_lib.reinforce_pp_advantages, static_argnames="baseline")
    adv = fn(jnp.array([0., 0., 1., 3.]))
    # mean 1, std(ddof=1) = sqrt((1 + 1 + 0 + 4) / 3) = sqrt(2).
    np.testing.assert_allclose(adv, np.array([-1, -1, 0, 2]) / np.sqrt(2), atol=1e-5)
    # Group baseline first: groups {0, 1} -> (0, 0), {2, 3} -> (-1, 1); then batch whitening
    # of (0, 0, -1, 1): mean 0, std sqrt(2/3).
    adv = fn(jnp.array([0., 0., 1., 3.]), jnp.array([0, 0, 1, 1]), baseline="group")
    np.testing.assert_allclose(adv, np.array([0, 0, -1, 1]) / np.sqrt(2 / 3), atol=1e-5)
    self.assertIs(adv_lib.ADVANTAGES.get("reinforce_pp"), adv_lib.reinforce_pp_advantages)

  def test_group_baseline_only_subtracts_groups_of_different_spreads(self):
    # Groups {0, 1} = (0, 2) and {2, 3} = (0, 4): their spreads differ (std sqrt(2) vs
    # 2 sqrt(2)), so dividing by each group's std would give (-1, 1, -1, 1) / sqrt(2/3).
    # Only the group mean is subtracted: (-1, 1, -2, 2); batch mean 0, squared deviations
    # 1 + 1 + 4 + 4 = 10, std(ddof=1) = sqrt(10 / 3).
    fn = jax.jit(adv_lib.reinforce_pp_advantages, static_argnames="baseline")
    adv = fn(jnp.array([0., 2., 0., 4.]), jnp.array([0, 0, 1, 1]), baseline="group")
    np.testing.assert_allclose(adv, np.array([-1, 1, -2, 2]) / np.sqrt(10 / 3), atol=1e-5)

  def test_zero_variance_and_single_row(self):
    np.testing.assert_array_equal(adv_lib.reinforce_pp_advantages(jnp.full([4], 0.7)), 0.0)
    np.testing.assert_array_equal(adv_lib.reinforce_pp_advantages(jnp.array([3.])), [0.0])

  def test_permutation_and_bad_inputs(self):
    rng = np.random.default_rng(4)
    r = jnp.asarray(rng.normal(size=12), jnp.float32)
    perm = rng.permutation(12)
    np.testing.assert_allclose(adv_lib.reinforce_pp_advantages(r[perm]),
                               np.asarray(adv_lib.reinforce_pp_advantages(r))[perm], atol=1e-6)
    with self.assertRaisesRegex(ValueError, "needs group_ids"):
      adv_lib.reinforce_pp_advantages(r, baseline="group")
    with self.assertRaisesRegex(ValueError, "'leave_one_out'"):
      adv_lib.reinforce_pp_advantages(r, baseline="leave_one_out")


class StratifiedTest(parameterized.TestCase):

  def test_hand_computed_pure_san(self):
    fn = jax.jit(adv_lib.stratified_advantages, static_argnames="global_scale")
    # One prompt; rows 0-1 searched once (rewards 1, 0), rows 2-3 twice (both 1: zero var).
    r, g, s = jnp.array([1., 0., 1., 1.]), jnp.zeros(4, int), jnp.array([1, 1, 2, 2])
    np.testing.assert_allclose(fn(r, g, s, blend=1.0), [R, -R, 0, 0], atol=1e-5)
    # blend 0 is GRPO: mean .75, std(ddof=1) .5 -> (.25, -1.5, .25, .25) / .5.
    np.testing.assert_allclose(fn(r, g, s, blend=0.0), [.5, -1.5, .5, .5], atol=1e-5)
    np.testing.assert_allclose(fn(r, g, s, blend=0.25),
                               0.25 * np.array([R, -R, 0, 0]) + 0.75 * np.array([.5, -1.5, .5, .5]),
                               atol=1e-5)

  def test_strata_do_not_cross_groups(self):
    # Stratum id 1 appears in two groups; each (group, stratum) is normalised on its own.
    r = jnp.array([0., 2., 10., 30.])
    g = jnp.array([0, 0, 1, 1])
    s = jnp.array([1, 1, 1, 1])
    san = adv_lib.stratified_advantages(r, g, s, blend=1.0)
    np.testing.assert_allclose(san, [-R, R, -R, R], atol=1e-5)
    # With one stratum per group, SAN == GRPO whatever the blend.
    np.testing.assert_allclose(adv_lib.stratified_advantages(r, g, s, blend=0.3),
                               adv_lib.grpo_advantages(r, g), atol=1e-5)

  def test_loop_reference_permutation_and_traced_blend(self):
    rng = np.random.default_rng(5)
    r = rng.normal(size=24).astype(np.float32)
    g = np.repeat(np.arange(3), 8)
    s = rng.integers(0, 3, size=24)
    want = np.zeros(24)
    for key in set(zip(g, s)):
      idx = np.flatnonzero((g == key[0]) & (s == key[1]))
      x = r[idx].astype(np.float64)
      want[idx] = (x - x.mean()) / ((x.std(ddof=1) if len(x) > 1 else 0.0) + 1e-6)
    want = 0.6 * want + 0.4 * _reference(r, g, "group")
    fn = jax.jit(lambda rr, gg, ss, b: adv_lib.stratified_advantages(rr, gg, ss, blend=b))
    got = fn(jnp.asarray(r), jnp.asarray(g), jnp.asarray(s), 0.6)
    np.testing.assert_allclose(got, want, atol=1e-4)
    perm = rng.permutation(24)
    np.testing.assert_allclose(fn(jnp.asarray(r[perm]), jnp.asarray(g[perm]),
                                  jnp.asarray(s[perm]), 0.6), np.asarray(got)[perm], atol=1e-5)

  def test_bad_shapes(self):
    with self.assertRaisesRegex(ValueError, r"strata \[N\]"):
      adv_lib.stratified_advantages(jnp.zeros(3), jnp.zeros(3, int), jnp.zeros(2, int))


class MaskedWhitenTest(absltest.TestCase):

  def test_hand_values_and_ignores_masked(self):
    fn = jax.jit(adv_lib.masked_whiten)
    got = fn(jnp.array([[1., 3.], [jnp.nan, 5.]]), jnp.array([[1, 1], [0, 1]], bool))
    # mean 3, var(ddof=1) = (4 + 0 + 4) / 2 = 4 -> (x - 3) / 2.
    np.testing.assert_allclose(got, [[-1, 0], [0, 1]], atol=1e-6)

  def test_zero_variance_fraction(self):
    fn = jax.jit(adv_lib.zero_variance_fraction)
    # Groups 7 (3 rows, all 1), 2 (rows 0 and .5) and 9 (a singleton): 2 of 3 groups.
    r = jnp.array([1., 0., 1., .5, 1., 4.])
    g = jnp.array([7, 2, 7, 2, 7, 9])
    np.testing.assert_allclose(fn(r, g), 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(adv_lib.zero_variance_fraction(r, g, atol=0.5), 1.0, rtol=1e-6)

  def test_registries_list_all_names(self):
    self.assertEqual(adv_lib.ADVANTAGES.names(),
                     ["drgrpo", "grpo", "reinforce_pp", "rloo", "stratified"])


if __name__ == "__main__":
  absltest.main()
