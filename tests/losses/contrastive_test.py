"""Tests for jaxsearch.losses.contrastive: InfoNCE by hand, its gradient, masking, errors."""
from __future__ import annotations

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.losses.contrastive import info_nce_loss

Q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
D = np.array([[0.6, 0.8], [0.0, 1.0]], np.float32)
# <q_i, d_j>: row 0 = [0.6, 0.0], row 1 = [0.8, 1.0].


def _lse(*xs):
  return math.log(sum(math.exp(x) for x in xs))


class InfoNCETest(parameterized.TestCase):

  def test_identity_2x2(self):
    loss, aux = info_nce_loss(jnp.eye(2), jnp.eye(2), temperature=1.0)
    self.assertAlmostEqual(float(loss), math.log(1 + math.exp(-1)), places=6)
    loss, _ = info_nce_loss(jnp.eye(2), jnp.eye(2), temperature=0.5)
    self.assertAlmostEqual(float(loss), math.log(1 + math.exp(-2)), places=6)
    self.assertEqual(float(aux["accuracy"]), 1.0)

  @parameterized.parameters(1.0, 0.25)
  def test_2x2_by_hand(self, t):
    loss, aux = info_nce_loss(jnp.asarray(Q), jnp.asarray(D), temperature=t)
    row0 = _lse(0.6 / t, 0.0) - 0.6 / t
    row1 = _lse(0.8 / t, 1.0 / t) - 1.0 / t
    self.assertAlmostEqual(float(loss), (row0 + row1) / 2, places=5)
    self.assertEqual(float(aux["accuracy"]), 1.0)                # 0.6 > 0, 1.0 > 0.8
    self.assertAlmostEqual(float(aux["positive_score"]), 0.8, places=6)     # (0.6 + 1) / 2
    self.assertAlmostEqual(float(aux["negative_score"]), 0.4, places=6)     # (0 + 0.8) / 2

  def test_symmetric_by_hand(self):
    loss, _ = info_nce_loss(jnp.asarray(Q), jnp.asarray(D), temperature=1.0, symmetric=True)
    q2d = ((_lse(0.6, 0.0) - 0.6) + (_lse(0.8, 1.0) - 1.0)) / 2
    # doc 0 against queries: scores [0.6, 0.8]; doc 1: [0.0, 1.0].
    d2q = ((_lse(0.6, 0.8) - 0.6) + (_lse(0.0, 1.0) - 1.0)) / 2
    self.assertAlmostEqual(float(loss), (q2d + d2q) / 2, places=5)

  def test_hard_negatives_by_hand(self):
    docs = jnp.array([[0.6, 0.8], [0.0, 1.0], [1.0, 1.0]])   # third row: a hard negative
    loss, aux = info_nce_loss(jnp.asarray(Q), docs, temperature=1.0)
    row0 = _lse(0.6, 0.0, 1.0) - 0.6
    row1 = _lse(0.8, 1.0, 1.0) - 1.0
    self.assertAlmostEqual(float(loss), (row0 + row1) / 2, places=5)
    self.assertEqual(float(aux["accuracy"]), 0.0)             # 1.0 beats 0.6; 1.0 ties 1.0
    # Symmetric: hard negatives have no query, the d->q part is the 2x2 one.
    sym, _ = info_nce_loss(jnp.asarray(Q), docs, temperature=1.0, symmetric=True)
    d2q = ((_lse(0.6, 0.8) - 0.6) + (_lse(0.0, 1.0) - 1.0)) / 2
    self.assertAlmostEqual(float(sym), ((row0 + row1) / 2 + d2q) / 2, places=5)

  def test_shared_positive_is_not_a_negative(self):
    q = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    d = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])      # rows 0 and 1: the same passage
    loss, aux = info_nce_loss(q, d, temperature=1.0, doc_ids=jnp.array([7, 7, 3]))
    # Row 0 drops column 1, row 1 drops column 0; row 2 keeps all three.
    row0 = _lse(1.0, 0.0) - 1.0
    row1 = _lse(0.8, 0.6) - 0.8
    row2 = _lse(0.0, 0.0, 1.0) - 1.0
    self.assertAlmostEqual(float(loss), (row0 + row1 + row2) / 3, places=5)
    self.assertEqual(float(aux["accuracy"]), 1.0)
    unmasked, _ = info_nce_loss(q, d, temperature=1.0)
    self.assertGreater(float(unmasked), float(loss))

  def test_grad_under_jit_matches_hand_derivation(self):
    t = 0.5

    @jax.jit
    def grads(q, d):
      return jax.grad(lambda q, d: info_nce_loss(q, d, temperature=t)[0], argnums=(0, 1))(q, d)

    gq, gd = grads(jnp.asarray(Q), jnp.asarray(D))
    s = Q @ D.T / t
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = (p - np.eye(2)) / (2 * t)                 # d loss / d s, times 1/t
    np.testing.assert_allclose(gq, delta @ D, atol=1e-6)
    np.testing.assert_allclose(gd, delta.T @ Q, atol=1e-6)

  def test_masked_columns_have_finite_zero_gradient(self):
    d = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    gd = jax.jit(jax.grad(lambda d: info_nce_loss(
        jnp.eye(2), d, temperature=0.1, doc_ids=jnp.array([1, 1]))[0]))(d)
    # Each row's only candidate is its own positive: loss 0, gradient exactly 0.
    np.testing.assert_array_equal(gd, np.zeros((2, 2)))

  def test_traced_temperature(self):
    f = jax.jit(lambda t: info_nce_loss(jnp.eye(2), jnp.eye(2), temperature=t)[0])
    self.assertAlmostEqual(float(f(jnp.float32(1.0))), math.log(1 + math.exp(-1)), places=6)
    g = jax.grad(lambda t: info_nce_loss(jnp.eye(2), jnp.eye(2), temperature=t)[0])(1.0)
    # d/dt log(1 + e^{-1/t}) = e^{-1/t} / (1 + e^{-1/t}) / t^2.
    self.assertAlmostEqual(float(g), math.exp(-1) / (1 + math.exp(-1)), places=6)

  @parameterized.named_parameters(
      ("rank", jnp.ones(3), jnp.ones((3, 2)), {}, r"\[B, D\]"),
      ("width", jnp.ones((2, 3)), jnp.ones((2, 2)), {}, "same width"),
      ("too_few_docs", jnp.ones((3, 2)), jnp.ones((2, 2)), {}, "B=3"),
      ("doc_ids", jnp.ones((2, 2)), jnp.ones((3, 2)), {"doc_ids": jnp.ones(2)}, r"\[3\]"),
      ("temperature", jnp.ones((2, 2)), jnp.ones((2, 2)), {"temperature": 0.0}, "temperature"))
  def test_errors(self, q, d, kw, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      info_nce_loss(q, d, **kw)


if __name__ == "__main__":
  absltest.main()
