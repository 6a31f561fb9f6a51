"""Tests for jaxsearch.rollout.sampler: padding invariance, log-probs, stops, limits, G."""
from __future__ import annotations

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.models.transformer import (Transformer, TransformerConfig, init_cache,
                                          make_decode_fn)
from jaxsearch.rollout import sampler as sampler_lib
from jaxsearch.rollout.sampling import sample_logits
from tests import compiled

CFG = TransformerConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        mlp_dim=64, max_len=64)
MODEL = Transformer(CFG)
PARAMS = compiled.init(MODEL, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
# Larger weights make the random model's distributions peaked enough to exercise stops.
PARAMS = jax.tree.map(lambda x: x * 3.0, PARAMS)
PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 4, 6], [11]]


_APPLY = jax.jit(lambda tokens: compiled.apply(MODEL, {"params": PARAMS}, tokens))


def _forward(tokens):
  return _APPLY(jnp.asarray(tokens, jnp.int32)[None])[0]


def _greedy_alone(prompt, steps):
  seq = list(prompt)
  for _ in range(steps):
    seq.append(int(jnp.argmax(_forward(seq)[-1])))
  return seq[len(prompt):]


def _batch(prompts, width=6):
  right = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    right[i, :len(p)] = p
  return sampler_lib.left_pad(right, np.array([len(p) for p in prompts]))


def _sampler(**kw):
  cfg = sampler_lib.SamplerConfig(**kw)
  return jax.jit(sampler_lib.make_sampler(make_decode_fn(MODEL),
                                          functools.partial(init_cache, CFG), cfg))


class SamplerTest(parameterized.TestCase):

  def test_left_pad(self):
    tokens, mask = sampler_lib.left_pad(np.array([[1, 2, 0], [3, 0, 0]]), np.array([2, 1]))
    np.testing.assert_array_equal(tokens, [[0, 1, 2], [0, 0, 3]])
    np.testing.assert_array_equal(mask, [[False, True, True], [False, False, True]])
    with self.assertRaisesRegex(ValueError, "lengths"):
      sampler_lib.left_pad(np.zeros((2, 3), int), np.array([4, 1]))

  def test_greedy_left_padded_equals_each_prompt_alone(self):
    prompts, mask = _batch(PROMPTS)
    out = _sampler(max_new_tokens=8, temperature=0.0)(PARAMS, prompts, mask, jax.random.key(1))
    for i, p in enumerate(PROMPTS):
      self.assertEqual(out.tokens[i].tolist(), _greedy_alone(p, 8))
    np.testing.assert_array_equal(out.lengths, [8, 8, 8])
    self.assertFalse(np.any(out.stopped))

  def test_top_k_one_is_greedy(self):
    prompts, mask = _batch(PROMPTS)
    greedy = _sampler(max_new_tokens=6, temperature=0.0)(PARAMS, prompts, mask, jax.random.key(1))
    top1 = _sampler(max_new_tokens=6, temperature=1.5, top_k=1)(PARAMS, prompts, mask,
                                                                 jax.random.key(2))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)

  def test_logp_equals_teacher_forced_logp(self):
    prompts, mask = _batch(PROMPTS)
    out = _sampler(max_new_tokens=7, temperature=0.8, num_samples=2)(
        PARAMS, prompts, mask, jax.random.key(3))
    for row in range(6):
      p = PROMPTS[row // 2]
      gen = out.tokens[row].tolist()
      logits = _forward(list(p) + gen)[len(p) - 1:-1] / 0.8          # predicts gen[t]
      expected = jax.nn.log_softmax(logits)[np.arange(7), gen]
      np.testing.assert_allclose(out.logp[row], expected, atol=1e-4, rtol=1e-4)

  def test_stop_tokens_end_rows_and_pad_after(self):
    prompts, mask = _batch(PROMPTS)
    free = _sampler(max_new_tokens=10, temperature=0.0)(PARAMS, prompts, mask, jax.random.key(0))
    stop = int(free.tokens[1, 3])                     # row 1's 4th greedy token stops it
    out = _sampler(max_new_tokens=10, temperature=0.0, stop_tokens=(stop,), pad_id=47)(
        PARAMS, prompts, mask, jax.random.key(0))
    for i in range(3):
      row = free.tokens[i].tolist()
      end = row.index(stop) + 1 if stop in row else 10
      self.assertEqual(int(out.lengths[i]), end)
      self.assertEqual(bool(out.stopped[i]), stop in row)
      self.assertEqual(out.tokens[i, :end].tolist(), row[:end])
      self.assertTrue(np.all(out.tokens[i, end:] == 47))
      self.assertTrue(np.all(out.logp[i, end:] == 0))

  def test_per_row_limits(self):
    prompts, mask = _batch(PROMPTS)
    out = _sampler(max_new_tokens=6, temperature=1.0, num_samples=2, pad_id=0)(
        PARAMS, prompts, mask, jax.random.key(4), jnp.array([2, 6, 9]))
    np.testing.assert_array_equal(out.lengths, [2, 2, 6, 6, 6, 6])
    self.assertTrue(np.all(out.tokens[:2, 2:] == 0))

  def test_samples_per_prompt_differ_and_are_deterministic(self):
    prompts, mask = _batch(PROMPTS)
    fn = _sampler(max_new_tokens=12, temperature=1.0, num_samples=4)
    a = fn(PARAMS, prompts, mask, jax.random.key(5))
    b = fn(PARAMS, prompts, mask, jax.random.key(5))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    self.assertEqual(a.tokens.shape, (12, 12))
    self.assertGreater(len({tuple(r) for r in np.asarray(a.tokens[:4]).tolist()}), 1)
    greedy = _sampler(max_new_tokens=5, temperature=0.0, num_samples=3)(
        PARAMS, prompts, mask, jax.random.key(5))
    np.testing.assert_array_equal(greedy.tokens[0], greedy.tokens[2])

  def test_config_errors_name_the_field(self):
    for kw, msg in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(top_k=-1), "top_k"),
                    (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature"),
                    (dict(num_samples=0), "num_samples")]:
      with self.assertRaisesRegex(ValueError, msg):
        sampler_lib.SamplerConfig(**kw)


class TopKTest(absltest.TestCase):

  def test_top_k_support_and_top_p_after_it(self):
    logits = jnp.repeat(jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]])), 4000, 0)
    tokens, logp = sample_logits(jax.random.key(0), logits, top_k=2)
    self.assertEqual(set(np.unique(np.asarray(tokens)).tolist()), {0, 1})
    np.testing.assert_allclose(logp, jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1]))[tokens], atol=1e-5)
    # top-k renormalises to (4/7, 3/7); top_p=0.5 then keeps only the first.
    tokens, _ = sample_logits(jax.random.key(1), logits, top_k=2, top_p=0.5)
    self.assertEqual(set(np.unique(np.asarray(tokens)).tolist()), {0})
    with self.assertRaisesRegex(ValueError, "top_k"):
      sample_logits(jax.random.key(0), logits, top_k=-2)


if __name__ == "__main__":
  absltest.main()
