"""Collapse warnings (`jaxsearch.train.health`) on hand-made metric sequences, and the
likelihood change the RL update measures (`rl_update.likelihood_change`) by hand."""
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from jaxsearch.train.health import HealthConfig, HealthMonitor
from jaxsearch.train.rl_update import likelihood_change

HEALTHY = {"entropy": 1.0, "length": 100.0, "searches": 1.0, "format": 0.9, "clip_frac": 0.05,
           "logp_change_pos": 0.01}


def run(monitor, rows, start=1):
  out = []
  for i, row in enumerate(rows):
    lines, scalars = monitor.update(start + i, row)
    out.append((lines, scalars))
  return out


class HealthMonitorTest(absltest.TestCase):

  def test_each_condition_fires_after_patience_once_and_rearms(self):
    config = HealthConfig(baseline_steps=2, patience=2)
    cases = {
        "entropy_collapse": {"entropy": 0.1},             # < 0.2 x 1.0
        "likelihood_displacement": {"logp_change_pos": -0.05},
        "length_drift": {"length": 160.0},                # +60% > 50%
        "search_collapse": {"searches": 0.4},             # < 0.5 x 1.0
        "format_collapse": {"format": 0.3},               # < 0.5 x 0.9
        "over_clipping": {"clip_frac": 0.5},
    }
    for name, bad in cases.items():
      monitor = HealthMonitor(config)
      bad_row = {**HEALTHY, **bad}
      out = run(monitor, [HEALTHY, HEALTHY, bad_row, bad_row, bad_row, HEALTHY, bad_row, bad_row])
      fired = [i for i, (lines, _) in enumerate(out) if lines]
      self.assertEqual(fired, [3, 7], name)              # 2nd bad step; again after clearing
      self.assertIn(f"[health] step 4: {name}: ", out[3][0][0])
      self.assertEqual([s[f"health/{name}"] for _, s in out], [0, 0, 0, 1, 1, 0, 0, 1], name)
      self.assertEqual(out[4][1]["health/warnings"], 1.0)
      others = [k for k in out[4][1] if k.startswith("health/") and k not in (
          f"health/{name}", "health/warnings")]
      self.assertTrue(all(out[4][1][k] == 0.0 for k in others), (name, out[4][1]))

  def test_messages_and_baseline(self):
    monitor = HealthMonitor(HealthConfig(baseline_steps=2, patience=1))
    run(monitor, [HEALTHY, {**HEALTHY, "entropy": 3.0}])
    self.assertEqual(monitor.baseline()["entropy"], 2.0)
    lines, _ = monitor.update(3, {**HEALTHY, "entropy": 0.2})
    self.assertEqual(lines, ["[health] step 3: entropy_collapse: entropy fell to 10% of its "
                             "start (2 -> 0.2) (1 steps in a row)"])

  def test_baseline_conditions_wait_and_missing_metrics_are_skipped(self):
    monitor = HealthMonitor(HealthConfig(baseline_steps=3, patience=1))
    # Before the baseline is complete, drift cannot be judged; no searches metric at all.
    rows = [{"entropy": 1.0}, {"entropy": 0.01}]
    out = run(monitor, rows)
    self.assertEqual([lines for lines, _ in out], [[], []])
    self.assertNotIn("health/search_collapse", out[1][1])
    # A search rate that starts below min_searches never "collapses".
    monitor = HealthMonitor(HealthConfig(baseline_steps=1, patience=1))
    out = run(monitor, [{"searches": 0.1}, {"searches": 0.0}])
    self.assertEqual(out[1][1]["health/search_collapse"], 0.0)

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, "HealthConfig.patience must be an int >= 1, got 0"):
      HealthConfig(patience=0)
    with self.assertRaisesRegex(ValueError, r"HealthConfig.entropy_floor must be in \(0, 1\)"):
      HealthConfig(entropy_floor=1.5)


class LikelihoodChangeTest(absltest.TestCase):

  def test_by_hand(self):
    before = jnp.array([[0.0, -1.0, -2.0], [0.0, -1.0, -1.0], [0.0, -3.0, -3.0]])
    after = jnp.array([[0.0, -0.5, -2.5], [0.0, -2.0, -1.0], [0.0, -3.0, -9.0]])
    mask = jnp.array([[False, True, True], [False, True, False], [False, True, True]])
    # Episode 0 rewarded (+0.5 - 0.5 = 0 -> mean 0), 1 penalised (-1), 2 neutral (0, -6).
    m = likelihood_change(before, after, mask, jnp.array([1.0, -2.0, 0.0]))
    np.testing.assert_allclose(m["logp_change"], (0.5 - 0.5 - 1.0 + 0.0 - 6.0) / 5)
    np.testing.assert_allclose(m["logp_change_pos"], 0.0)
    np.testing.assert_allclose(m["logp_change_neg"], -1.0)
    np.testing.assert_allclose(m["logp_before"], (-1 - 2 - 1 - 3 - 3) / 5)
    # Per-token advantages: an episode's sign is its mean over its policy tokens.
    tok = jnp.array([[0.0, -1.0, 3.0], [0.0, 1.0, 5.0], [0.0, -1.0, -1.0]])
    m = likelihood_change(before, after, mask, tok)
    np.testing.assert_allclose(m["logp_change_pos"], (0.5 - 0.5 - 1.0) / 3)
    np.testing.assert_allclose(m["logp_change_neg"], -3.0)


if __name__ == "__main__":
  absltest.main()
