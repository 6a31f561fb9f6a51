import numpy as np
from absl.testing import absltest

from jaxsearch.train.optim import OptimizerConfig, make_optimizer, make_schedule


class ScheduleTest(absltest.TestCase):

  def test_warmup_then_cosine_to_the_end_of_the_phase(self):
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, decay_steps=-1, end_lr_fraction=0.1)
    sched = make_schedule(cfg, total_steps=110)
    np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(sched(60), 0.55, atol=1e-6)     # half way: (1 + 0.1) / 2
    np.testing.assert_allclose(sched(110), 0.1, atol=1e-6)

  def test_constant_after_warmup(self):
    sched = make_schedule(OptimizerConfig(learning_rate=2.0, warmup_steps=4))
    np.testing.assert_allclose([sched(2), sched(4), sched(1000)], [1.0, 2.0, 2.0], atol=1e-6)

  def test_phase_length_required_and_bad_values(self):
    with self.assertRaisesRegex(ValueError, "pass total_steps"):
      make_optimizer(OptimizerConfig(decay_steps=-1))
    with self.assertRaisesRegex(ValueError, "decay_steps must be >= -1, got -2"):
      OptimizerConfig(decay_steps=-2)
    with self.assertRaisesRegex(ValueError, "learning_rate must be > 0, got 0"):
      OptimizerConfig(learning_rate=0)


if __name__ == "__main__":
  absltest.main()
