"""`Transformer.token_scores`: chunked log-probs and entropies equal the whole-sequence ones
(values and gradients, tied / untied / scanned models, LoRA with an `lm_head` adapter), and the
chunked backward pass never holds `[N, T, V]` logits."""
from __future__ import annotations

import dataclasses
import functools

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch import losses
from jaxsearch.models import lora as lora_lib
from jaxsearch.models.transformer import TokenScores
from jaxsearch.models.transformer import Transformer
from jaxsearch.models.transformer import TransformerConfig


def _config(**kw) -> TransformerConfig:
  base = dict(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
  base.update(kw)
  return TransformerConfig(**base)


def _tokens(batch=3, length=22, vocab=97, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,))
def _scores_and_grads(model, params, tokens):
  """TokenScores of `tokens[:, 1:]` and the gradient of a loss that weighs every position
  differently and uses the entropy too (a swapped or shifted column changes it)."""

  def loss(p):
    s = model.apply({"params": p}, tokens[:, :-1], tokens[:, 1:], method=Transformer.token_scores)
    w = jnp.arange(1, tokens.shape[1], dtype=jnp.float32)
    return jnp.sum(s.logp * w) + 0.3 * jnp.sum(s.entropy * w[::-1]), s

  (_, scores), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return scores, grads


class TokenScoresTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("tied_chunk_divides", dict(), 7),          # 21 positions = 3 chunks of 7
      ("tied_last_chunk_padded", dict(), 8),      # 8 + 8 + 5
      ("untied_scan", dict(tie_embeddings=False, scan_layers=True), 5),
      ("chunk_wider_than_the_sequence", dict(), 64))
  def test_chunked_equals_whole_sequence_and_the_losses_functions(self, kw, chunk):
    cfg = _config(**kw)
    model = Transformer(cfg)
    tokens = _tokens()
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    logits = jax.jit(model.apply)({"params": params}, tokens[:, :-1])
    want = TokenScores(losses.token_logprobs(logits, tokens[:, 1:]),
                       losses.entropy_from_logits(logits),
                       jnp.argmax(logits, -1) == tokens[:, 1:])
    whole, whole_grads = _scores_and_grads(model, params, tokens)
    chunked, chunked_grads = _scores_and_grads(
        Transformer(dataclasses.replace(cfg, logits_chunk=chunk)), params, tokens)
    for got in (whole, chunked):
      self.assertEqual(got.logp.shape, (3, 21))
      np.testing.assert_allclose(got.logp, want.logp, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(got.top1, want.top1)
    self.assertBetween(float(jnp.mean(want.entropy)), 1.0, np.log(97))
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(whole_grads))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5 * scale),
                 chunked_grads, whole_grads)

  def test_lora_with_an_lm_head_adapter(self):
    # Every target, lm_head included, on an untied model with random B: the chunked head runs
    # the adapter too.
    cfg = _config(tie_embeddings=False)
    lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=lora_lib.TARGETS)
    tokens = _tokens()
    results = []
    for chunk in (0, 6):
      lora = lora_lib.lora_model(Transformer(dataclasses.replace(cfg, logits_chunk=chunk)), lcfg)
      params = nn.meta.unbox(jax.jit(lora.init)(jax.random.key(0), tokens)["params"])
      rng = np.random.default_rng(0)
      params = jax.tree_util.tree_map_with_path(
          lambda path, x: jnp.asarray(rng.standard_normal(x.shape), x.dtype) * 0.5
          if "lora_b" in jax.tree_util.keystr(path) else x, params)
      results.append((params, _scores_and_grads(lora, params, tokens)))
    (p0, (s0, g0)), (p1, (s1, g1)) = results
    jax.tree.map(np.testing.assert_array_equal, p1, p0)       # the same initialisation
    head_b = g0["lm_head"]["kernel_lora_b"]
    self.assertGreater(float(jnp.max(jnp.abs(head_b))), 1e-3)  # the head adapter is trained
    np.testing.assert_allclose(s1.logp, s0.logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g1["lm_head"]["kernel_lora_b"], head_b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g1["lm_head"]["kernel_lora_a"], g0["lm_head"]["kernel_lora_a"],
                               rtol=1e-4, atol=1e-5)

  def test_the_backward_pass_holds_no_full_logits(self):
    # A 4k vocabulary, 8 x 256 positions: the [N, T, V] float32 logits are 33.6 MB, more than
    # the chunked program's whole scratch space; the whole-sequence program needs several.
    cfg = _config(vocab_size=4096, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                  mlp_dim=32)
    tokens = jax.ShapeDtypeStruct((8, 257), jnp.int32)
    full_logits = 8 * 256 * 4096 * 4
    temp = {}
    for chunk in (0, 32):
      model = Transformer(dataclasses.replace(cfg, logits_chunk=chunk))
      params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
      temp[chunk] = jax.jit(_scores_and_grads.__wrapped__, static_argnums=0).lower(
          model, nn.meta.unbox(params["params"]), tokens).compile().memory_analysis(
          ).temp_size_in_bytes
    self.assertGreater(temp[0], 2 * full_logits)
    self.assertLess(temp[32], full_logits)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, r"logits_chunk must be an int >= 0 .*got -1"):
      _config(logits_chunk=-1)
    model = Transformer(_config())
    tokens = _tokens(length=6)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    with self.assertRaisesRegex(ValueError, r"targets must have the shape of tokens \(3, 6\), "
                                r"got \(3, 5\)"):
      jax.eval_shape(functools.partial(model.apply, method=Transformer.token_scores),
                     {"params": params}, tokens, tokens[:, 1:])


if __name__ == "__main__":
  absltest.main()
