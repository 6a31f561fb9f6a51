"""The one pure RL update (`rl_update.make_rl_update_fn`) against the same step done by hand
with the pure loss functions; micro-batched gradients against full-batch ones; the reference
and behaviour log-probs coming from the right parameters."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import flax
import optax
from absl.testing import absltest, parameterized
from flax import linen as nn

from jaxsearch import losses
from jaxsearch.models.transformer import Transformer, TransformerConfig
from jaxsearch.train import optim, steps
from jaxsearch.train.rl_update import RLBatch, RLState, jit_rl_update, make_rl_update_fn
from jaxsearch.train.state import TrainState
from jaxsearch.types import SequenceBatch

V = 32
CFG = TransformerConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                        mlp_dim=32, max_len=16)
MODEL = Transformer(CFG)
# The same parameters scored 4 positions at a time (`TransformerConfig.logits_chunk`): the
# steps read `TokenScores` from it without ever holding [N, T, V] logits.
CHUNKED = Transformer(dataclasses.replace(CFG, logits_chunk=4))


def apply_fn(variables, tokens):
  return MODEL.apply(variables, tokens)


def chunked_score_fn(variables, tokens, targets):
  return CHUNKED.apply(variables, tokens, targets, method=Transformer.token_scores)


@jax.jit
def _init(key):
  return nn.meta.unbox(MODEL.init(key, jnp.zeros((1, 4), jnp.int32))["params"])


def init(seed):
  # Jitted (here and below): op by op, every operation of the model is its own compile.
  return _init(jax.random.key(seed))


def batch(n=8, t=10, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(1, V, (n, t)), jnp.int32)
  mask = np.zeros((n, t), bool)
  mask[:, 2:5] = True
  mask[:, 7:] = True
  mask[0, 8:] = False
  mask[5, :] = False            # a row without policy tokens (a micro-batch weight edge case)
  rewards = jnp.asarray(rng.random(n), jnp.float32)     # groups of different spreads
  group_ids = jnp.repeat(jnp.arange(n // 2, dtype=jnp.int32), 2)
  return RLBatch(tokens, jnp.asarray(mask), rewards, group_ids,
                 jnp.asarray(rng.integers(0, 3, n), jnp.int32))


@jax.jit
def logp_of(params, tokens):
  logits = apply_fn({"params": params}, tokens[:, :-1])
  return jnp.pad(losses.token_logprobs(logits, tokens[:, 1:]), ((0, 0), (1, 0)))


def copy(tree):
  return jax.tree.map(jnp.copy, tree)


def k3(logp, ref, mask):
  d = np.where(mask, np.asarray(ref) - np.asarray(logp), 0.0)
  return (np.exp(d) - d - 1.0)[mask].mean()


class RLUpdateTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.policy = init(0)
    self.ref = init(1)            # reference != policy: a swap of the two must show

  def state(self, tx, params=None):
    return TrainState.create(apply_fn=apply_fn, params=copy(self.policy if params is None
                                                            else params), tx=tx)

  def test_kl_metric_is_k3_of_policy_against_reference(self):
    config = steps.PolicyGradientConfig(num_generations=2, prompts_per_step=4, kl_coef=0.1)
    b = batch()
    update = jit_rl_update(make_rl_update_fn(apply_fn, config), None)
    _, m = update(RLState(policy=self.state(optax.sgd(0.1)), critic=None,
                          ref_params=copy(self.ref)), b, True)
    expected = k3(logp_of(self.policy, b.tokens), logp_of(self.ref, b.tokens),
                  np.asarray(b.policy_mask))
    self.assertGreater(expected, 1e-3)
    np.testing.assert_allclose(m["kl"], expected, rtol=1e-4)

  def test_behaviour_logprobs_are_the_policys_before_the_step(self):
    # With a zero learning rate the parameters never move, so every update of the batch sees
    # ratio 1 exactly when the behaviour log-probs came from the policy (not the reference).
    config = steps.PolicyGradientConfig(num_generations=2, prompts_per_step=4, kl_coef=0.1,
                                        updates_per_batch=2)
    update = jit_rl_update(make_rl_update_fn(apply_fn, config), None)
    _, m = update(RLState(policy=self.state(optax.sgd(0.0)), critic=None,
                          ref_params=copy(self.ref)), batch(), True)
    np.testing.assert_allclose([m["ratio_min"], m["ratio_max"]], [1.0, 1.0], atol=1e-6)
    self.assertGreater(float(m["kl"]), 1e-3)

  @parameterized.named_parameters(("full_batch", 0, None), ("micro_batches", 2, None),
                                  ("chunked_logits_micro_batches", 2, chunked_score_fn))
  def test_one_call_equals_the_step_by_hand(self, micro, score_fn):
    lr, clip, kl_coef = 0.5, 0.2, 0.05
    config = steps.PolicyGradientConfig(num_generations=2, prompts_per_step=4, kl_coef=kl_coef,
                                        clip_eps=clip, updates_per_batch=2,
                                        micro_batch_size=micro)
    b = batch(seed=3)
    update = jit_rl_update(make_rl_update_fn(apply_fn, config, score_fn=score_fn), None)
    out, m = update(RLState(policy=self.state(optax.sgd(lr)), critic=None,
                            ref_params=copy(self.ref)), b, True)
    out, m = jax.block_until_ready((out, m))
    self.assertEqual(update._cache_size(), 1)       # one compiled program for the whole step
    # By hand, full batch: GRPO advantages, reference and behaviour log-probs from the right
    # parameters, two plain gradient steps of the pure loss.
    adv = losses.grpo_advantages(b.rewards, b.group_ids)
    ref_logp, old_logp = logp_of(self.ref, b.tokens), logp_of(self.policy, b.tokens)

    def loss(p):
      return losses.grpo_loss(logp_of(p, b.tokens), old_logp, ref_logp, adv, b.policy_mask,
                              clip_eps=clip, kl_coef=kl_coef)[0]

    params = self.policy
    for _ in range(2):
      grads = jax.grad(loss)(params)
      params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    chex_close = functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-6)
    jax.tree.map(chex_close, out.policy.params, params)
    self.assertEqual(int(out.policy.step), 2)
    self.assertFalse(np.allclose(out.policy.params["embed"]["embedding"],
                                 self.policy["embed"]["embedding"]))
    # The reference is untouched.
    jax.tree.map(np.testing.assert_array_equal, out.ref_params, self.ref)
    # Health telemetry: how the step moved the likelihood of the batch's own tokens.
    mask = np.asarray(b.policy_mask)
    delta = np.asarray(logp_of(params, b.tokens) - old_logp)
    np.testing.assert_allclose(m["logp_change"], delta[mask].mean(), rtol=1e-3, atol=1e-5)
    pos = mask & (np.asarray(adv) > 0)[:, None]
    np.testing.assert_allclose(m["logp_change_pos"], delta[pos].mean(), rtol=1e-3, atol=1e-5)
    self.assertGreater(abs(float(m["logp_change"])), 1e-3)


class MicroBatchTest(parameterized.TestCase):

  @parameterized.product(agg=list(losses.AGG_MODES), micro=[2, 4])
  def test_accumulated_gradient_equals_the_full_batch_gradient(self, agg, micro):
    config = steps.PolicyGradientConfig(num_generations=2, prompts_per_step=4, agg=agg,
                                        kl_coef=0.05, entropy_coef=0.01)
    loss_fn = steps.make_policy_loss_fn(apply_fn, config, norm_length=12)
    b = batch(seed=5)
    params = init(0)
    pg = steps.PolicyGradientBatch(b.tokens, b.policy_mask,
                                   losses.grpo_advantages(b.rewards, b.group_ids),
                                   logp_of(init(2), b.tokens), logp_of(init(1), b.tokens))
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, pg)
    (mloss, maux), mgrads = jax.jit(functools.partial(
        steps.accumulate_gradients, loss_fn, micro_batch_size=micro,
        weights_fn=lambda mb: steps.agg_shares(mb.policy_mask, agg)))(params, pg)
    np.testing.assert_allclose(mloss, loss, rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
                 mgrads, grads)
    np.testing.assert_allclose(maux["ratio_max"], aux["ratio_max"], rtol=1e-6)
    np.testing.assert_allclose(maux["ratio_min"], aux["ratio_min"], rtol=1e-6)
    if agg == "token-mean":     # token-weighted means of token means are the batch's
      np.testing.assert_allclose(maux["entropy"], aux["entropy"], rtol=1e-5)

  def test_sft_update_with_micro_batches_equals_the_full_batch(self):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, V, (8, 10)), jnp.int32)
    mask = jnp.asarray(rng.random((8, 10)) < 0.6)
    b = SequenceBatch(tokens, mask)
    results = []
    for micro in (0, 2):
      state = TrainState.create(apply_fn=apply_fn, params=init(0), tx=optax.sgd(0.5))
      results.append(jax.jit(steps.make_sft_update_fn(apply_fn, micro_batch_size=micro))(
          state, b))
    (full, fm), (acc, am) = results
    np.testing.assert_allclose(am["loss"], fm["loss"], rtol=1e-5)
    np.testing.assert_allclose(am["token_accuracy"], fm["token_accuracy"], rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
                 acc.params, full.params)

  def test_sft_update_with_chunked_logits_is_cross_entropy(self):
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(1, V, (8, 11)), jnp.int32)   # 10 positions: chunks 4+4+2
    mask = jnp.asarray(rng.random((8, 11)) < 0.6)
    params = init(0)
    loss, aux = losses.cross_entropy_loss(apply_fn({"params": params}, tokens[:, :-1]),
                                          tokens[:, 1:], mask[:, 1:])
    results = []
    for score_fn, micro in ((None, 0), (chunked_score_fn, 2)):
      state = TrainState.create(apply_fn=apply_fn, params=init(0), tx=optax.sgd(0.5))
      update = steps.make_sft_update_fn(apply_fn, micro_batch_size=micro, score_fn=score_fn)
      results.append(jax.jit(update)(state, SequenceBatch(tokens, mask)))
    (plain, pm), (chunked, cm) = results
    for m in (pm, cm):
      np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
      np.testing.assert_allclose(m["token_accuracy"], aux["token_accuracy"], rtol=1e-6)
    self.assertBetween(float(aux["token_accuracy"]), 0.0, 0.5)   # a random policy
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
                 chunked.params, plain.params)
    self.assertFalse(np.allclose(chunked.params["embed"]["embedding"],
                                 params["embed"]["embedding"]))

  def test_micro_batched_logprobs_keep_the_row_order(self):
    b = batch(n=8, seed=4)
    params = init(0)
    want = logp_of(params, b.tokens)
    for micro in (2, 4):
      got = steps.sequence_logprobs(apply_fn, params, b.tokens, micro_batch_size=micro,
                                    score_fn=chunked_score_fn)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    rows = jnp.arange(12.0).reshape(6, 2)
    np.testing.assert_array_equal(steps.map_micro_batches(lambda x: x * 2, rows, 3), rows * 2)
    with self.assertRaisesRegex(ValueError, r"micro_batch_size \(4\) must divide the batch's "
                                "6 rows"):
      steps.map_micro_batches(lambda x: x, rows, 4)

  def test_bfloat16_parameters_accumulate_in_float32(self):
    # A bf16 model's micro-batch gradients are summed in float32 and handed back as bf16 (the
    # dtype a one-pass gradient has); a bf16 running sum would compile neither (scan's carry
    # dtype) nor keep small micro-batches' share.
    params = {"w": jnp.asarray([1.0, -2.0, 0.5], jnp.bfloat16)}
    # Micro-batch 0 (rows 0 and 4) sums to 256 and the three others to 0.9 each: in bfloat16
    # (spacing 2 at 256) each 0.9 would vanish from a running sum, in float32 they add 2.7.
    x = jnp.full((8, 3), 0.45, jnp.bfloat16).at[0].set(256.0).at[4].set(0.0)

    def loss_fn(p, xb):
      return jnp.sum(xb.astype(jnp.float32) @ p["w"].astype(jnp.float32)), {}

    (_, _), grads = jax.jit(functools.partial(
        steps.accumulate_gradients, loss_fn, micro_batch_size=2,
        weights_fn=lambda mb: jnp.ones(mb.shape[0])))(params, x)
    self.assertEqual(grads["w"].dtype, jnp.bfloat16)
    self.assertEqual(float(grads["w"][0]), 258.0)    # 256 + 3 x bf16(0.9), rounded to bf16
    by_hand = np.zeros(3, np.float32)
    for m in range(4):                         # strided micro-batches, bf16 grads, f32 sum
      by_hand += np.asarray(jnp.sum(x[m::4].astype(jnp.float32), 0).astype(jnp.bfloat16),
                            np.float32)
    np.testing.assert_array_equal(np.asarray(grads["w"], np.float32),
                                  np.asarray(jnp.asarray(by_hand).astype(jnp.bfloat16),
                                             np.float32))

  @parameterized.parameters(0, 2)
  def test_only_trainable_leaves_are_differentiated(self, micro):
    # LoRA's case: the optimizer trains some leaves (`optim.train_only`); the update must
    # give those the plain gradient, the frozen ones exactly 0, and never compute the latter.
    trained = lambda path: path[-1] == "kernel" and "mlp" in "/".join(path)
    config = steps.PolicyGradientConfig(num_generations=2, prompts_per_step=4, kl_coef=0.0)
    loss_fn = steps.make_policy_loss_fn(apply_fn, config, norm_length=12)
    b = batch(seed=3)
    params = init(0)
    pg = steps.PolicyGradientBatch(b.tokens, b.policy_mask,
                                   losses.grpo_advantages(b.rewards, b.group_ids),
                                   logp_of(params, b.tokens), None)

    def grads_of(trainable):
      return functools.partial(steps.accumulate_gradients, loss_fn, micro_batch_size=micro,
                               weights_fn=lambda mb: steps.agg_shares(mb.policy_mask,
                                                                      config.agg),
                               trainable=trainable)

    (loss, _), plain = jax.jit(grads_of(None))(params, pg)
    (tloss, _), grads = jax.jit(grads_of(trained))(params, pg)
    np.testing.assert_allclose(tloss, loss, rtol=1e-6)
    flat, plain_flat = (flax.traverse_util.flatten_dict(g) for g in (grads, plain))
    self.assertEqual(set(flat), set(plain_flat))
    n_trained = 0
    for path, g in flat.items():
      if trained(path):
        n_trained += 1
        np.testing.assert_allclose(g, plain_flat[path], rtol=1e-5, atol=1e-7)
        self.assertGreater(float(jnp.max(jnp.abs(g))), 0.0)
      else:
        self.assertGreater(float(jnp.max(jnp.abs(plain_flat[path]))), 0.0, path)
        np.testing.assert_array_equal(g, jnp.zeros_like(g))
    self.assertBetween(n_trained, 1, len(flat) - 1)
    # Fewer matrix products: the frozen weights' gradient products are not in the program.
    dots = lambda fn: str(jax.make_jaxpr(fn)(params, pg)).count("dot_general")
    self.assertLess(dots(grads_of(trained)), dots(grads_of(None)))

  def test_update_with_trainable_equals_the_masked_optimizer_alone(self):
    trained = lambda path: "attn" in "/".join(path)
    b = batch(seed=4)
    sb = SequenceBatch(b.tokens, b.policy_mask)
    tx = optim.train_only(optax.adam(1e-2), trained)
    out = []
    for trainable in (None, trained):
      state = TrainState.create(apply_fn=apply_fn, params=init(0), tx=tx)
      out.append(jax.jit(steps.make_sft_update_fn(apply_fn, micro_batch_size=4,
                                                  trainable=trainable))(state, sb))
    (plain, pm), (only, om) = out
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
                 only.params, plain.params)
    # The reported norm is the trained leaves' (what `train_only`'s clipping sees).
    masked = jax.tree.map(jnp.zeros_like, init(0))
    self.assertLess(float(om["grad_norm"]), float(pm["grad_norm"]))
    with self.assertRaisesRegex(ValueError, "no parameter is trainable"):
      steps.partition_trainable(masked, lambda path: False)

  def test_micro_batches_are_strided(self):
    x = jnp.arange(8)
    np.testing.assert_array_equal(steps.micro_batches(x, 4), [[0, 4], [1, 5], [2, 6], [3, 7]])
    with self.assertRaisesRegex(ValueError, "cannot be split into 3"):
      steps.micro_batches(x, 3)


class NormLengthTest(absltest.TestCase):

  def test_config_norm_length_wins_over_the_argument(self):
    b = batch(seed=7)
    pg = steps.PolicyGradientBatch(b.tokens, b.policy_mask,
                                   losses.grpo_advantages(b.rewards, b.group_ids), None, None)
    params = init(0)
    logp = logp_of(params, b.tokens)
    for config_norm, arg_norm, used in ((0, 16, 16), (40, 16, 40), (0, None, b.tokens.shape[1])):
      config = steps.PolicyGradientConfig(num_generations=2, prompts_per_step=4, kl_coef=0.0,
                                          agg="seq-mean-token-sum-norm",
                                          norm_length=config_norm)
      loss, _ = jax.jit(steps.make_policy_loss_fn(apply_fn, config, norm_length=arg_norm))(
          params, pg)
      expected, _ = losses.grpo_loss(logp, None, None, pg.advantages, b.policy_mask,
                                     kl_coef=0.0, agg="seq-mean-token-sum-norm",
                                     norm_length=used)
      np.testing.assert_allclose(loss, expected, rtol=1e-6, err_msg=str((config_norm, arg_norm)))
      self.assertNotAlmostEqual(float(expected), 0.0)


if __name__ == "__main__":
  absltest.main()
