"""Categorical value targets: hand-computed two-hot / HL-Gauss, read-out and the loss."""
from __future__ import annotations

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.losses.distributional import (bin_edges, categorical_value, categorical_value_loss,
                                             hl_gauss, make_support, two_hot)

SUPPORT = jnp.array([-1.0, -0.5, 0.0, 0.5, 1.0])


def _phi(z: float) -> float:
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


class TwoHotTest(parameterized.TestCase):

  def test_value_between_two_centers(self):
    # 0.2 lies 0.4 of the way from 0.0 to 0.5: weights 0.6 and 0.4.
    np.testing.assert_allclose(two_hot(jnp.array(0.2), SUPPORT), [0, 0, 0.6, 0.4, 0], atol=1e-6)
    # 1 / 3 of the way from -1 to -0.5.
    np.testing.assert_allclose(two_hot(jnp.array(-5.0 / 6.0), SUPPORT),
                               [2 / 3, 1 / 3, 0, 0, 0], atol=1e-6)

  def test_on_a_center_is_one_hot(self):
    np.testing.assert_allclose(two_hot(jnp.array([0.5, -1.0, 1.0]), SUPPORT),
                               np.eye(5)[[3, 0, 4]], atol=1e-6)

  def test_expectation_recovers_x(self):
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (7, 3)), jnp.float32)
    p = two_hot(x, SUPPORT)
    self.assertEqual(p.shape, (7, 3, 5))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(jnp.sum(p * SUPPORT, -1), x, atol=1e-6)
    self.assertTrue(bool(jnp.all(jnp.sum(p > 0, -1) <= 2)))

  def test_clips_outside_the_support(self):
    np.testing.assert_allclose(two_hot(jnp.array([-3.0, 7.0]), SUPPORT),
                               np.eye(5)[[0, 4]], atol=1e-6)

  def test_uneven_support(self):
    support = jnp.array([0.0, 1.0, 10.0])
    np.testing.assert_allclose(two_hot(jnp.array(4.0), support), [0, 2 / 3, 1 / 3], atol=1e-6)


class HLGaussTest(parameterized.TestCase):

  def test_edges(self):
    np.testing.assert_allclose(bin_edges(jnp.array([0.0, 1.0, 2.0])), [-0.5, 0.5, 1.5, 2.5])

  def test_hand_computed_probabilities(self):
    # Bin width 0.5, sigma = 0.75 * 0.5 = 0.375, edges -1.25, -0.75, ..., 1.25; x = 0.2.
    x, sigma = 0.2, 0.375
    edges = [-1.25, -0.75, -0.25, 0.25, 0.75, 1.25]
    cdf = [_phi((e - x) / sigma) for e in edges]
    expected = np.diff(cdf) / (cdf[-1] - cdf[0])
    np.testing.assert_allclose(hl_gauss(jnp.array(x), SUPPORT), expected, rtol=1e-5, atol=1e-6)
    # An explicit sigma gives the same with that sigma.
    cdf = [_phi((e - x) / 0.1) for e in edges]
    np.testing.assert_allclose(hl_gauss(jnp.array(x), SUPPORT, 0.1),
                               np.diff(cdf) / (cdf[-1] - cdf[0]), rtol=1e-5, atol=1e-6)

  def test_sums_to_one_and_mean_near_x_inside(self):
    support = make_support(-1.0, 1.0, 51)
    x = jnp.linspace(-0.7, 0.7, 29)
    p = hl_gauss(x, support)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    self.assertTrue(bool(jnp.all(p >= 0)))
    np.testing.assert_allclose(jnp.sum(p * support, -1), x, atol=1e-4)

  def test_symmetric_around_a_center(self):
    p = hl_gauss(jnp.array(0.0), SUPPORT)
    np.testing.assert_allclose(p, p[::-1], atol=1e-6)
    self.assertEqual(int(jnp.argmax(p)), 2)

  def test_clips_outside_the_support(self):
    np.testing.assert_allclose(hl_gauss(jnp.array(9.0), SUPPORT), hl_gauss(jnp.array(1.0), SUPPORT),
                               atol=1e-7)

  def test_bad_sigma(self):
    with self.assertRaisesRegex(ValueError, "sigma must be > 0, got -1"):
      hl_gauss(jnp.array(0.0), SUPPORT, -1.0)


class ReadOutAndLossTest(parameterized.TestCase):

  def test_make_support(self):
    np.testing.assert_allclose(make_support(-1.0, 1.0, 5), SUPPORT)
    with self.assertRaisesRegex(ValueError, "num_bins must be an int >= 2, got 1"):
      make_support(0.0, 1.0, 1)
    with self.assertRaisesRegex(ValueError, "v_min < v_max, got v_min=1.0, v_max=0.0"):
      make_support(1.0, 0.0, 3)

  def test_categorical_value(self):
    # Uniform logits: the mean of the centers; a peaked softmax: the peak's center.
    self.assertAlmostEqual(float(categorical_value(jnp.zeros(3), jnp.array([0., 1., 5.]))), 2.0,
                           places=5)
    logits = jnp.log(jnp.array([0.1, 0.2, 0.7]))
    self.assertAlmostEqual(float(categorical_value(logits, jnp.array([0., 1., 5.]))),
                           0.2 + 3.5, places=5)

  @parameterized.parameters("two_hot", "hl_gauss")
  def test_loss_is_cross_entropy_to_the_target(self, kind):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
    targets = jnp.asarray(rng.uniform(-1, 1, (3, 4)), jnp.float32)
    mask = jnp.asarray(rng.random((3, 4)) < 0.6).at[0, 0].set(True)
    loss, metrics = categorical_value_loss(logits, targets, SUPPORT, mask, target_kind=kind)
    probs = two_hot(targets, SUPPORT) if kind == "two_hot" else hl_gauss(targets, SUPPORT)
    ce = -np.sum(np.asarray(probs) * np.asarray(jax.nn.log_softmax(logits)), -1)
    m = np.asarray(mask)
    self.assertAlmostEqual(float(loss), ce[m].mean(), places=5)
    value = np.asarray(categorical_value(logits, SUPPORT))
    self.assertAlmostEqual(float(metrics["value_abs_error"]),
                           np.abs(value - np.asarray(targets))[m].mean(), places=5)

  def test_masked_elements_do_not_matter_even_nan(self):
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 5)), jnp.float32)
    targets = jnp.array([[0.1, 0.2, jnp.nan], [0.3, jnp.inf, 0.4]])
    mask = jnp.isfinite(targets)

    def f(lg):
      return categorical_value_loss(lg, targets, SUPPORT, mask)[0]

    loss, grad = jax.jit(jax.value_and_grad(f))(logits)
    other = f(logits.at[0, 2].set(100.0))
    self.assertTrue(np.isfinite(float(loss)))
    self.assertAlmostEqual(float(loss), float(other), places=5)
    self.assertTrue(bool(jnp.all(jnp.isfinite(grad))))
    np.testing.assert_array_equal(grad[0, 2], 0.0)
    np.testing.assert_array_equal(grad[1, 1], 0.0)

  def test_gradient_under_jit_is_softmax_minus_target(self):
    # d CE / d logits = softmax(logits) - p, divided by the number of masked elements.
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 5)), jnp.float32)
    targets = jnp.array([0.2, -0.9, 0.5, 3.0])
    grad = jax.jit(jax.grad(lambda lg: categorical_value_loss(
        lg, targets, SUPPORT, target_kind="two_hot")[0]))(logits)
    expected = (jax.nn.softmax(logits) - two_hot(targets, SUPPORT)) / 4
    np.testing.assert_allclose(grad, expected, atol=1e-6)

  @parameterized.parameters("two_hot", "hl_gauss")
  def test_minimum_at_the_target_distribution(self, kind):
    # Cross-entropy to p is minimised at softmax(logits) = p: the gradient vanishes there and
    # the read-out recovers the (in-range) targets.
    targets = jnp.array([0.3, -0.45, 0.6])
    support = make_support(-1.0, 1.0, 21)
    fn = two_hot if kind == "two_hot" else hl_gauss
    logits = jnp.log(fn(targets, support) + 1e-30)
    grad = jax.jit(jax.grad(lambda lg: categorical_value_loss(
        lg, targets, support, target_kind=kind)[0]))(logits)
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)
    np.testing.assert_allclose(categorical_value(logits, support), targets, atol=1e-4)
    # Anywhere else the loss is larger.
    loss = categorical_value_loss(logits, targets, support, target_kind=kind)[0]
    mixed = jnp.log(0.9 * fn(targets, support) + 0.1 / 21)
    worse = categorical_value_loss(mixed, targets, support, target_kind=kind)[0]
    self.assertGreater(float(worse), float(loss))

  def test_errors_name_the_problem(self):
    with self.assertRaisesRegex(ValueError, "target_kind must be one of"):
      categorical_value_loss(jnp.zeros((2, 5)), jnp.zeros(2), SUPPORT, target_kind="mse")
    with self.assertRaisesRegex(ValueError, r"logits must be targets.shape \+ \(K,\)"):
      categorical_value_loss(jnp.zeros((2, 4)), jnp.zeros(2), SUPPORT)
    with self.assertRaisesRegex(ValueError, "support must be a 1-D array"):
      two_hot(jnp.zeros(2), jnp.zeros((2, 2)))


if __name__ == "__main__":
  absltest.main()
