import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxsearch.rollout.sampling import sample_logits

LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))


class SamplingTest(parameterized.TestCase):

  def test_greedy_is_argmax_with_its_logprob(self):
    logits = jax.random.normal(jax.random.key(0), (16, 10))
    tokens, logp = sample_logits(jax.random.key(1), logits, temperature=0.0)
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))
    np.testing.assert_allclose(logp, jnp.max(jax.nn.log_softmax(logits), -1), atol=1e-6)

  def test_frequencies_follow_the_tempered_distribution(self):
    n = 20000
    logits = jnp.repeat(LOGITS, n, 0)
    tokens, logp = jax.jit(lambda k: sample_logits(k, logits, temperature=2.0))(jax.random.key(2))
    p = jax.nn.softmax(LOGITS[0] / 2.0)
    freq = np.bincount(np.asarray(tokens), minlength=4) / n
    np.testing.assert_allclose(freq, p, atol=0.015)   # ~4 standard errors
    np.testing.assert_allclose(logp, jnp.log(p)[tokens], atol=1e-5)

  @parameterized.named_parameters(("nucleus_keeps_two", 0.7, {0, 1}), ("top1", 0.1, {0}),
                                  ("just_below_two", 0.79, {0, 1}), ("all", 1.0, {0, 1, 2, 3}))
  def test_top_p_support(self, top_p, support):
    n = 4000
    tokens, _ = sample_logits(jax.random.key(3), jnp.repeat(LOGITS, n, 0), top_p=top_p)
    self.assertEqual(set(np.unique(np.asarray(tokens)).tolist()), support)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "temperature"):
      sample_logits(jax.random.key(0), LOGITS, temperature=-1.0)
    with self.assertRaisesRegex(ValueError, "top_p"):
      sample_logits(jax.random.key(0), LOGITS, top_p=0.0)


if __name__ == "__main__":
  absltest.main()
