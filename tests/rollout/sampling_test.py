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

  @parameterized.named_parameters(
      # Probabilities and their running sums are exact in float32: mass before each sorted
      # token is [0, .5, .75, .875]. Convention: keep the smallest prefix whose mass reaches
      # top_p, i.e. the tokens whose preceding mass is < top_p. A token whose own cumulative
      # mass only *equals* top_p already completes the prefix: the next one is dropped.
      ("reaches_p_at_token_0", 0.5, {0}),
      ("reaches_p_at_token_1", 0.75, {0, 1}),
      ("just_above_token_1", 0.76, {0, 1, 2, 3}),   # tokens 2 and 3 tie: both kept
  )
  def test_top_p_boundary_when_mass_equals_p_exactly(self, top_p, support):
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.125, 0.125]], jnp.float32))
    probs = jax.nn.softmax(logits[0])
    np.testing.assert_array_equal(np.cumsum(np.asarray(probs)), [0.5, 0.75, 0.875, 1.0])
    n = 4000
    fn = jax.jit(lambda k: sample_logits(k, jnp.repeat(logits, n, 0), top_p=top_p))
    tokens, logp = fn(jax.random.key(4))
    self.assertEqual(set(np.unique(np.asarray(tokens)).tolist()), support)
    # The returned log-prob is the untruncated one.
    np.testing.assert_allclose(logp, jnp.log(probs)[tokens], atol=1e-6)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "temperature"):
      sample_logits(jax.random.key(0), LOGITS, temperature=-1.0)
    with self.assertRaisesRegex(ValueError, "top_p"):
      sample_logits(jax.random.key(0), LOGITS, top_p=0.0)


if __name__ == "__main__":
  absltest.main()
