"""Value and reward heads: hand-checked read-outs, padding invariance, policy parity, axes."""
from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.losses.distributional import categorical_value, make_support
from jaxsearch.models.heads import (PolicyWithValue, RewardModel, ValueHeadConfig, ValueModel,
                                    last_token_index, load_trunk)
from jaxsearch.models.transformer import Transformer, TransformerConfig
from tests import compiled

CFG = TransformerConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        mlp_dim=64, max_len=32)
SCALAR = ValueHeadConfig(init_scale=1.0)
CATEGORICAL = ValueHeadConfig(num_bins=7, v_min=-2.0, v_max=1.0, init_scale=1.0)


def _tokens(b=3, t=10, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(4, CFG.vocab_size, (b, t)), jnp.int32)


def _init(model, *args, seed=0):
  boxed = compiled.init(model, jax.random.key(seed), *args)["params"]
  return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def _with_bias(params, key, seed=1):
  """Non-zero head bias, so a test also sees whether the bias is added."""
  bias = params[key]["bias"]
  noise = np.random.default_rng(seed).normal(size=bias.shape).astype(np.float32)
  return {**params, key: {**params[key], "bias": jnp.asarray(noise)}}


def _hidden(trunk_params, tokens, config=CFG):
  return compiled.apply(Transformer(config), {"params": trunk_params}, tokens,
                                   method=Transformer.hidden_states)


class ValueModelTest(parameterized.TestCase):

  def test_scalar_value_is_the_head_on_each_hidden_state(self):
    tokens = _tokens()
    model = ValueModel(CFG, SCALAR)
    params, _ = _init(model, tokens)
    params = _with_bias(params, "value_head")
    values = jax.jit(model.apply)({"params": params}, tokens)
    self.assertEqual(values.shape, (3, 10))
    self.assertEqual(values.dtype, jnp.float32)
    h = np.asarray(_hidden(params["trunk"], tokens), np.float64)
    k = np.asarray(params["value_head"]["kernel"], np.float64)
    b = np.asarray(params["value_head"]["bias"], np.float64)
    np.testing.assert_allclose(values, (h @ k)[..., 0] + b[0], atol=1e-5)

  def test_categorical_value_is_the_expectation_over_bin_centers(self):
    tokens = _tokens()
    model = ValueModel(CFG, CATEGORICAL)
    params, _ = _init(model, tokens)
    params = _with_bias(params, "value_head")
    values, logits = compiled.apply(model, {"params": params}, tokens, return_logits=True)
    self.assertEqual(logits.shape, (3, 10, 7))
    h = np.asarray(_hidden(params["trunk"], tokens), np.float64)
    expected_logits = h @ np.asarray(params["value_head"]["kernel"], np.float64) + np.asarray(
        params["value_head"]["bias"], np.float64)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5)
    p = np.exp(expected_logits - expected_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    centers = np.linspace(-2.0, 1.0, 7)
    np.testing.assert_allclose(values, p @ centers, atol=1e-5)
    # The same read-out as the loss module's, on the same support.
    np.testing.assert_allclose(CATEGORICAL.support(), make_support(-2.0, 1.0, 7))
    np.testing.assert_allclose(values, categorical_value(logits, make_support(-2.0, 1.0, 7)),
                               atol=1e-6)

  def test_zero_initialised_heads(self):
    tokens = _tokens()
    params, _ = _init(ValueModel(CFG), tokens)
    np.testing.assert_array_equal(params["value_head"]["kernel"], 0.0)
    np.testing.assert_array_equal(compiled.apply(ValueModel(CFG), {"params": params}, tokens), 0.0)
    head = ValueHeadConfig(num_bins=5, v_min=0.0, v_max=4.0)
    params, _ = _init(ValueModel(CFG, head), tokens)
    np.testing.assert_allclose(compiled.apply(ValueModel(CFG, head), {"params": params}, tokens), 2.0,
                               atol=1e-6)   # uniform over the bins: the mean center
    small, _ = _init(ValueModel(CFG, ValueHeadConfig(init_scale=0.01)), tokens)
    self.assertLess(float(jnp.std(small["value_head"]["kernel"])), 0.01)
    self.assertGreater(float(jnp.std(small["value_head"]["kernel"])), 0.0)

  def test_logical_axes_of_head_params(self):
    _, specs = _init(ValueModel(CFG, CATEGORICAL), _tokens())
    self.assertEqual(tuple(specs["value_head"]["kernel"]), ("embed", None))
    self.assertEqual(tuple(specs["value_head"]["bias"]), (None,))
    self.assertEqual(tuple(specs["trunk"]["embed"]["embedding"]), ("vocab", "embed"))


class PolicyWithValueTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_logits_equal_the_plain_transformer(self, tied):
    cfg = TransformerConfig(**{**CFG.__dict__, "tie_embeddings": tied})
    tokens = _tokens()
    model = PolicyWithValue(cfg, SCALAR)
    params, _ = _init(model, tokens)
    params = _with_bias(params, "value_head")
    logits, values = compiled.apply(model, {"params": params}, tokens)
    plain = compiled.apply(Transformer(cfg), {"params": params["policy"]}, tokens)
    np.testing.assert_array_equal(logits, plain)    # the same ops, run one by one
    jitted, _ = jax.jit(model.apply)({"params": params}, tokens)
    np.testing.assert_allclose(jitted, plain, atol=1e-5)
    h = _hidden(params["policy"], tokens, cfg)
    np.testing.assert_allclose(
        values, h @ params["value_head"]["kernel"][:, 0] + params["value_head"]["bias"][0],
        atol=1e-5)
    # A policy's own parameters initialise the sub-tree; decode goes to the policy.
    policy_params, _ = _init(Transformer(cfg), tokens, seed=5)
    loaded = load_trunk(params, policy_params, "policy")
    logits2, _ = compiled.apply(model, {"params": loaded}, tokens)
    np.testing.assert_array_equal(logits2, compiled.apply(Transformer(cfg), {"params": policy_params},
                                                                  tokens))

  def test_categorical_returns_bin_logits(self):
    tokens = _tokens()
    model = PolicyWithValue(CFG, CATEGORICAL)
    params, _ = _init(model, tokens)
    logits, values, bins = compiled.apply(model, {"params": params}, tokens, return_logits=True)
    self.assertEqual((logits.shape, values.shape, bins.shape),
                     ((3, 10, 48), (3, 10), (3, 10, 7)))
    np.testing.assert_allclose(values, categorical_value(bins, CATEGORICAL.support()), atol=1e-6)


class RewardModelTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.model = RewardModel(CFG, SCALAR)
    params, self.specs = _init(self.model, _tokens(), jnp.array([10, 10, 10]))
    self.params = _with_bias(params, "reward_head")
    self.apply = jax.jit(self.model.apply)

  def test_reads_the_last_valid_token(self):
    tokens, lengths = _tokens(), jnp.array([4, 10, 1])
    rewards = self.apply({"params": self.params}, tokens, lengths)
    self.assertEqual(rewards.shape, (3,))
    h = _hidden(self.params["trunk"], tokens)
    head = self.params["reward_head"]
    expected = [float(h[i, n - 1] @ head["kernel"][:, 0] + head["bias"][0])
                for i, n in enumerate([4, 10, 1])]
    np.testing.assert_allclose(rewards, expected, atol=1e-5)

  def test_padding_beyond_the_length_does_not_matter(self):
    tokens, lengths = _tokens(), jnp.array([4, 7, 2])
    base = self.apply({"params": self.params}, tokens, lengths)
    noise = _tokens(seed=9)
    after = jnp.arange(10)[None, :] >= lengths[:, None]
    changed = self.apply({"params": self.params}, jnp.where(after, noise, tokens), lengths)
    np.testing.assert_allclose(changed, base, atol=1e-6)
    # ... but a real token does.
    moved = self.apply({"params": self.params}, tokens.at[0, 3].set((tokens[0, 3] + 1) % 48),
                       lengths)
    self.assertNotAlmostEqual(float(moved[0]), float(base[0]), places=4)
    # A mask marking the same tokens gives the same rewards.
    mask = ~after
    np.testing.assert_allclose(compiled.apply(self.model, {"params": self.params}, tokens, mask=mask),
                               base, atol=1e-6)

  def test_left_padding_with_mask_and_positions(self):
    tokens, lengths = _tokens(), jnp.array([4, 7, 2])
    right = self.apply({"params": self.params}, tokens, lengths)
    t = tokens.shape[1]
    shift = t - lengths
    idx = (jnp.arange(t)[None, :] - shift[:, None]) % t
    left = jnp.take_along_axis(tokens, idx, axis=1)   # row i's tokens end at T-1
    mask = jnp.arange(t)[None, :] >= shift[:, None]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    got = compiled.apply(self.model, {"params": self.params}, left, mask=mask, positions=positions,
                           attention_mask=mask)
    np.testing.assert_allclose(got, right, atol=1e-5)

  def test_last_token_index(self):
    np.testing.assert_array_equal(
        last_token_index((2, 4), mask=jnp.array([[1, 1, 0, 0], [0, 1, 1, 1]], bool)), [1, 3])
    np.testing.assert_array_equal(last_token_index((2, 4), lengths=jnp.array([0, 9])), [0, 3])
    with self.assertRaisesRegex(ValueError, "exactly one of lengths"):
      last_token_index((2, 4))

  def test_load_trunk(self):
    policy_params, _ = _init(Transformer(CFG), _tokens(), seed=3)
    loaded = load_trunk(self.params, policy_params)
    np.testing.assert_array_equal(loaded["reward_head"]["bias"], self.params["reward_head"]["bias"])
    tokens, lengths = _tokens(), jnp.array([4, 10, 1])
    h = _hidden(policy_params, tokens)
    head = self.params["reward_head"]
    np.testing.assert_allclose(
        self.apply({"params": loaded}, tokens, lengths),
        h[jnp.arange(3), lengths - 1] @ head["kernel"][:, 0] + head["bias"][0], atol=1e-5)
    # An untied policy's lm_head is ignored; a missing or mis-shaped leaf is named.
    untied, _ = _init(Transformer(TransformerConfig(**{**CFG.__dict__, "tie_embeddings": False})),
                      _tokens())
    self.assertIn("lm_head", untied)
    load_trunk(self.params, untied)
    partial = {k: v for k, v in policy_params.items() if k != "final_norm"}
    with self.assertRaisesRegex(ValueError, "'final_norm/scale' is missing"):
      load_trunk(self.params, partial)
    wide, _ = _init(Transformer(TransformerConfig(**{**CFG.__dict__, "vocab_size": 50})),
                    _tokens())
    with self.assertRaisesRegex(ValueError, r"'embed/embedding' has shape \(50, 32\), expected "
                                r"\(48, 32\)"):
      load_trunk(self.params, wide)
    with self.assertRaisesRegex(ValueError, "no subtree 'policy'"):
      load_trunk(self.params, policy_params, "policy")

  def test_reward_head_axes_and_config_errors(self):
    self.assertEqual(tuple(self.specs["reward_head"]["kernel"]), ("embed", None))
    with self.assertRaisesRegex(ValueError, "needs a scalar head"):
      compiled.init(RewardModel(CFG, CATEGORICAL), jax.random.key(0), _tokens(), jnp.array([1, 1, 1]))
    with self.assertRaisesRegex(ValueError, "num_bins must be 0 .* got 1"):
      ValueHeadConfig(num_bins=1)
    with self.assertRaisesRegex(ValueError, "v_min < v_max, got v_min=1.0, v_max=1.0"):
      ValueHeadConfig(num_bins=3, v_min=1.0, v_max=1.0)
    with self.assertRaisesRegex(ValueError, "init_scale must be .* got -0.1"):
      ValueHeadConfig(init_scale=-0.1)


if __name__ == "__main__":
  absltest.main()
