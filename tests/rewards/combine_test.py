"""Tests for jaxsearch.rewards.combine.weighted_rewards."""
from __future__ import annotations


import numpy as np
from absl.testing import absltest, parameterized

from jaxsearch.rewards import combine

COMPLETIONS = ["<answer>Paris</answer>", "<answer>Paris France</answer>", "Paris", ""]
GOLDS = [["paris"], ["Paris"], ["paris"], ["x"]]
# Per completion: em [1, 0, 0, 0], f1 [1, 2/3, 0, 0], format [1, 1, 0, 0].


class WeightedRewardsTest(parameterized.TestCase):

  def test_total_and_parts(self):
    fn = combine.weighted_rewards({"exact_match": 1.0, "f1": 0.5, "format": 0.2})
    total, parts = fn(COMPLETIONS, GOLDS)
    np.testing.assert_allclose(total, [1.7, 0.5 * 2 / 3 + 0.2, 0.0, 0.0], rtol=1e-6)
    self.assertEqual(total.dtype, np.float32)
    self.assertEqual(set(parts), {"exact_match", "f1", "format"})
    np.testing.assert_allclose(parts["f1"], [1, 2 / 3, 0, 0], rtol=1e-6)   # unweighted
    np.testing.assert_array_equal(parts["format"], [1, 1, 0, 0])

  def test_zero_weight_part_reported_not_added(self):
    fn = combine.weighted_rewards({"f1": 1.0, "exact_match": 0.0})
    total, parts = fn(COMPLETIONS, GOLDS)
    np.testing.assert_allclose(total, [1, 2 / 3, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(parts["exact_match"], [1, 0, 0, 0])

  def test_negative_weight(self):
    total, _ = combine.weighted_rewards({"format": -1.0})(COMPLETIONS, GOLDS)
    np.testing.assert_array_equal(total, [-1, -1, 0, 0])

  def test_unknown_name_fails_at_construction_listing_known(self):
    with self.assertRaisesRegex(LookupError, r"'exactmatch'.*exact_match.*f1.*format"):
      combine.weighted_rewards({"f1": 1.0, "exactmatch": 1.0})

  @parameterized.named_parameters(("nan", float("nan")), ("inf", float("inf")),
                                  ("string", "1"), ("none", None), ("bool", True))
  def test_bad_weight_raises(self, w):
    with self.assertRaisesRegex(ValueError, "finite number"):
      combine.weighted_rewards({"f1": w})

  def test_empty_weights_raise(self):
    with self.assertRaisesRegex(ValueError, "at least one"):
      combine.weighted_rewards({})

  def test_length_mismatch_raises(self):
    fn = combine.weighted_rewards({"format": 1.0})
    with self.assertRaisesRegex(ValueError, "4 completions but 3"):
      fn(COMPLETIONS, GOLDS[:3])


if __name__ == "__main__":
  absltest.main()
