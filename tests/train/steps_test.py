"""Update steps: hand-checked objectives, rollout/trainer log-prob agreement, sharding invariance."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsearch.models.transformer import Transformer, TransformerConfig, init_cache, make_decode_fn
from jaxsearch.retrieval.bm25 import build_sparse_bm25_index, tokenize_corpus
from jaxsearch.retrieval.tool import make_bm25_retrieve_fn
from jaxsearch.rollout.search_env import EnvTokens, RolloutConfig, make_rollout_fn
from jaxsearch.train.optim import OptimizerConfig, make_optimizer
from jaxsearch.train.state import TrainState
from jaxsearch.train.steps import (PolicyGradientConfig, PolicyGradientBatch, make_grpo_loss_fn,
                                   make_grpo_update_fn, make_policy_loss_fn, make_sft_update_fn,
                                   sequence_logprobs)
from jaxsearch.types import SequenceBatch

V = 48
CFG = TransformerConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        mlp_dim=64, max_len=64)
MODEL = Transformer(CFG)


@jax.jit
def apply_fn(variables, tokens):
  # Jitted, as every model call of this file: op by op, each operation is its own compile.
  return MODEL.apply(variables, tokens)


@jax.jit
def _init(key):
  from flax import linen as nn  # noqa: PLC0415
  return nn.meta.unbox(MODEL.init(key, jnp.zeros((1, 4), jnp.int32))["params"])


def init_params(seed=0):
  return _init(jax.random.key(seed))


logprobs = jax.jit(lambda params, tokens: sequence_logprobs(apply_fn, params, tokens))


def random_batch(seed, n=8, t=12):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(9, V, (n, t)), jnp.int32)
  mask = jnp.asarray(rng.random((n, t)) < 0.6).at[:, 0].set(False)
  return tokens, mask, jnp.asarray(rng.normal(size=n), jnp.float32)


class StepsTest(absltest.TestCase):

  def test_sequence_logprobs_match_a_manual_log_softmax(self):
    params = init_params()
    tokens, _, _ = random_batch(0)
    logp = sequence_logprobs(apply_fn, params, tokens)
    logits = apply_fn({"params": params}, tokens)
    manual = jax.nn.log_softmax(logits[:, :-1], -1)
    manual = jnp.take_along_axis(manual, tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(logp[:, 1:], manual, atol=1e-5)
    np.testing.assert_array_equal(logp[:, 0], 0.0)

  def test_on_policy_grpo_gradient_is_reinforce(self):
    # With ratio 1 and no KL, the clipped surrogate's gradient is -mean_t A * grad log pi.
    params = init_params()
    tokens, mask, adv = random_batch(1)
    batch = PolicyGradientBatch(tokens, mask, adv, None, None)
    loss_fn = make_grpo_loss_fn(apply_fn, PolicyGradientConfig(kl_coef=0.0))
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch)[0]))(params)

    def reinforce(p):
      logp = logprobs(p, tokens)
      return -jnp.sum(adv[:, None] * logp * mask) / jnp.sum(mask)

    expected = jax.jit(jax.grad(reinforce))(params)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
      np.testing.assert_allclose(g, e, atol=1e-6)

  def test_kl_term_is_zero_at_the_reference_and_positive_away_from_it(self):
    params = init_params()
    tokens, mask, adv = random_batch(2)
    ref = logprobs(params, tokens)
    loss_fn = make_grpo_loss_fn(apply_fn, PolicyGradientConfig(kl_coef=0.5))
    _, at_ref = loss_fn(params, PolicyGradientBatch(tokens, mask, adv, None, ref))
    self.assertAlmostEqual(float(at_ref["kl"]), 0.0, places=6)
    other = logprobs(init_params(seed=7), tokens)
    _, away = loss_fn(params, PolicyGradientBatch(tokens, mask, adv, None, other))
    self.assertGreater(float(away["kl"]), 1e-3)

  def test_sft_loss_ignores_unmasked_tokens(self):
    params = init_params()
    tokens, mask, _ = random_batch(3)
    mask = mask.at[:, 8:].set(False)
    state = TrainState.create(apply_fn=apply_fn, params=params, tx=make_optimizer(OptimizerConfig()))
    update = jax.jit(make_sft_update_fn(apply_fn))
    _, m1 = update(state, SequenceBatch(tokens, mask))
    _, m2 = update(state, SequenceBatch(tokens.at[:, 9:].set(5), mask))  # beyond the mask
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    logp = logprobs(params, tokens)
    np.testing.assert_allclose(m1["loss"], -jnp.sum(logp * mask) / jnp.sum(mask), rtol=1e-5)

  def test_rollout_logprobs_equal_trainer_logprobs(self):
    # The sampler (KV cache, one token at a time) and the trainer (full forward) must agree on
    # the log-prob of every sampled token: this is what makes the GRPO ratio correct.
    env = EnvTokens(pad=0, eos=2, search_open=3, search_close=4, info_open=5, info_close=6,
                    answer_open=7, answer_close=8, special_ids=tuple(range(9)),
                    invalid_block=(5, 30, 6), budget_block=(5, 31, 6))
    corpus = tokenize_corpus([[10, 11, 12], [13, 14], [15, 10, 16]], pad_id=0)
    index = build_sparse_bm25_index(corpus, V, ignore_ids=env.special_ids)
    params = init_params(seed=3)

    decode_fn = make_decode_fn(MODEL)
    fn = make_rollout_fn(RolloutConfig(max_len=40, top_k=1, temperature=1.0), env, decode_fn,
                         lambda n, t: init_cache(CFG, n, t),
                         make_bm25_retrieve_fn(V, 1, env.special_ids))
    prompts = jnp.array([[1, 20, 21, 22]] * 6, jnp.int32)
    r = jax.jit(fn)(params, index, corpus, prompts, jnp.full((6,), 4, jnp.int32),
                    jax.random.key(5))
    recomputed = logprobs(params, r.tokens)
    self.assertGreater(int(r.policy_mask.sum()), 20)
    np.testing.assert_allclose(np.where(r.policy_mask, recomputed, 0.0), r.logp, atol=2e-4)

  def test_entropy_telemetry_and_bonus(self):
    # Column t's entropy is that of the distribution token t was drawn from (logits at t - 1).
    params = init_params()
    tokens, mask, adv = random_batch(5)
    batch = PolicyGradientBatch(tokens, mask, adv, None, None)
    base = PolicyGradientConfig(kl_coef=0.0)
    loss0, m0 = jax.jit(make_policy_loss_fn(apply_fn, base))(params, batch)
    logits = apply_fn({"params": params}, tokens)[:, :-1]
    p = jax.nn.softmax(logits, -1)
    h = -jnp.sum(p * jnp.log(p), -1)                                          # [N, T-1]
    expected = jnp.sum(h * mask[:, 1:]) / jnp.sum(mask)
    np.testing.assert_allclose(m0["entropy"], expected, rtol=1e-5)
    bonus = dataclasses.replace(base, entropy_coef=0.3)
    loss1, _ = jax.jit(make_policy_loss_fn(apply_fn, bonus))(params, batch)
    np.testing.assert_allclose(loss1, loss0 - 0.3 * expected, rtol=1e-5, atol=1e-6)
    # The bonus has a gradient (the telemetry alone has none).
    with_bonus, without = make_policy_loss_fn(apply_fn, bonus), make_policy_loss_fn(apply_fn, base)
    diff = jax.jit(jax.grad(lambda q: with_bonus(q, batch)[0] - without(q, batch)[0]))(params)
    self.assertGreater(sum(float(jnp.abs(d).sum()) for d in jax.tree.leaves(diff)), 1e-4)

  def test_llds_penalises_fallen_tokens_of_preserved_rows(self):
    params = init_params()
    tokens, mask, _ = random_batch(6)
    adv = jnp.array([1.0, -1.0, 0.0, 2.0, -0.5, 1.0, -2.0, 0.5])
    logp = logprobs(params, tokens)
    old = logp + 0.1      # every policy token's log-prob fell by 0.1 since the behaviour policy
    base = PolicyGradientConfig(kl_coef=0.0, updates_per_batch=2)
    batch = PolicyGradientBatch(tokens, mask, adv, old, None)
    loss0, _ = jax.jit(make_policy_loss_fn(apply_fn, base))(params, batch)
    for preserve, rows in (("all", np.ones(8, bool)), ("nonnegative", np.asarray(adv) >= 0)):
      config = dataclasses.replace(base, llds_coef=2.0, llds_preserve=preserve)
      loss, m = jax.jit(make_policy_loss_fn(apply_fn, config))(params, batch)
      m_np = np.asarray(mask)
      frac = m_np[rows].sum() / m_np.sum()          # token-mean over all policy tokens
      np.testing.assert_allclose(m["llds"], 0.1 * frac, rtol=1e-4)
      np.testing.assert_allclose(loss - loss0, 2.0 * 0.1 * frac, rtol=1e-4)
      np.testing.assert_allclose(m["llds_active_frac"], rows.mean(), rtol=1e-6)

  def test_dr_grpo_loss_does_not_depend_on_the_batch_width(self):
    # seq-mean-token-sum-norm divides by a constant: padding columns change nothing.
    params = init_params()
    tokens, mask, adv = random_batch(7)
    config = PolicyGradientConfig(kl_coef=0.1, agg="seq-mean-token-sum-norm")
    ref = logprobs(init_params(seed=9), tokens)
    fn = jax.jit(make_policy_loss_fn(apply_fn, config, norm_length=40))
    loss, _ = fn(params, PolicyGradientBatch(tokens, mask, adv, None, ref))
    pad = lambda x, v: jnp.pad(x, ((0, 0), (0, 4)), constant_values=v)  # noqa: E731
    wide, _ = fn(params, PolicyGradientBatch(pad(tokens, 9), pad(mask, False), adv, None,
                                             pad(ref, 0.0)))
    np.testing.assert_allclose(wide, loss, rtol=1e-5)
    logp = logprobs(params, tokens)
    kl = jnp.exp(ref - logp) - (ref - logp) - 1
    np.testing.assert_allclose(loss, jnp.sum((-adv[:, None] + 0.1 * kl) * mask) / 40, rtol=1e-4)

  def test_data_parallel_update_matches_single_device(self):
    params = init_params()
    tokens, mask, adv = random_batch(4, n=16)
    ref = logprobs(params, tokens)
    batch = PolicyGradientBatch(tokens, mask, adv, None, ref)
    update = make_grpo_update_fn(apply_fn, PolicyGradientConfig(kl_coef=0.1))
    # Plain SGD: Adam's first step is ~lr * sign(g), which amplifies float reduction-order noise
    # on near-zero gradient entries; SGD compares the gradients themselves.
    tx = optax.sgd(0.5)
    single, _ = jax.jit(update)(TrainState.create(apply_fn=apply_fn, params=params, tx=tx), batch)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    sharded_batch = jax.tree.map(lambda x: jax.device_put(x, rows), batch)
    state = TrainState.create(apply_fn=apply_fn, params=params, tx=tx)
    replicated = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), state)
    sharded, _ = jax.jit(update)(replicated, sharded_batch)
    self.assertLen(sharded_batch.tokens.sharding.device_set, 8)
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
      np.testing.assert_allclose(a, b, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
