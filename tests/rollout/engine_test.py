"""The chunked rollout engine against the token-by-token reference and a full forward.

Episodes come from a real (random) Transformer. To make them search, answer and misbehave on
purpose, a scripted bias of +50 is added to its logits (`tests/rollout/scripted.py`: row i's
next action id), so greedy decoding follows each row's script while every log-prob still
depends on the Transformer's own logits, hence on its KV cache. The chunked engine must give
the reference's tokens, masks, turn ids, statuses, counts and retrieved ids, log-probs within
1e-5, and log-probs equal to a full forward of the finished sequences; also at temperature 1
(per-row sampling keys make a row's tokens independent of the call schedule), with the text
tags of `text_tags_test`, and on a mesh with the batch sharded.
"""
from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsearch.models.transformer import (Transformer, TransformerConfig, init_cache,
                                          make_decode_fn)
from jaxsearch.retrieval.bm25 import build_sparse_bm25_index, tokenize_corpus
from jaxsearch.retrieval.tool import make_bm25_retrieve_fn
from jaxsearch.rollout.search_env import EnvTokens, EpisodeStatus, RolloutConfig, make_rollout_fn
from tests.rollout import scripted
from tests.rollout import text_tags_test as tt

PAD, BOS, EOS, S_OPEN, S_CLOSE, I_OPEN, I_CLOSE, A_OPEN, A_CLOSE = range(9)
V = 48
ENV = EnvTokens(pad=PAD, eos=EOS, search_open=S_OPEN, search_close=S_CLOSE, info_open=I_OPEN,
                info_close=I_CLOSE, answer_open=A_OPEN, answer_close=A_CLOSE,
                special_ids=tuple(range(9)), invalid_block=(I_OPEN, 30, I_CLOSE),
                budget_block=(I_OPEN, 31, 31, I_CLOSE))
DOCS = [list(np.random.default_rng(i).integers(10, 40, 3 + i % 7)) for i in range(12)]
BIAS = 50.0

# Actions, one kind per row (searches: 2 allowed, query: 4 tokens kept).
SCRIPTS = {
    "search_then_answer": [S_OPEN, 11, 12, S_CLOSE, A_OPEN, 13, A_CLOSE],
    "over_budget": [S_OPEN, 11, S_CLOSE, S_OPEN, 14, S_CLOSE, S_OPEN, 15, S_CLOSE, A_OPEN, 9,
                    A_CLOSE],
    "empty_query": [S_OPEN, S_CLOSE, A_OPEN, 10, A_CLOSE],
    "close_without_open": [S_CLOSE, A_OPEN, 10, A_CLOSE],
    "overlong_query": [S_OPEN, 10, 11, 12, 13, 14, 15, S_CLOSE, A_OPEN, 10, A_CLOSE],
    "no_closing_tag": [S_OPEN] + [20] * 130,
    "eos": [S_OPEN, 16, S_CLOSE, EOS],
    "answer_at_once": [A_OPEN, 16, A_CLOSE],
}


def _model(vocab: int, seed: int = 0):
  cfg = TransformerConfig(vocab_size=vocab, d_model=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, mlp_dim=64, max_len=160, qkv_bias=True)
  model = Transformer(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed),
                                        jnp.zeros((1, 4), jnp.int32))["params"])
  # Larger embeddings than the init's 0.02 so that the logits (and log-probs) vary.
  params = dict(params, embed={"embedding": params["embed"]["embedding"] * 10})
  return model, cfg, params


def biased_policy(model, cfg, scripts, vocab, bias_ids=None):  # bias_ids: [V] or None
  """`(decode_fn, init_cache_fn)`: the Transformer's logits plus +50 on each row's next
  scripted action (`scripts`), or plus a constant [V] bias vector (`bias`, no script)."""
  decode = make_decode_fn(model)
  if scripts is not None:
    s_decode, s_init = scripted.scripted_policy(scripts, vocab)
  const = None if bias_ids is None else jnp.asarray(bias_ids, jnp.float32)

  def init_cache_fn(n, length):
    return init_cache(cfg, n, length), (None if scripts is None else s_init(n, length))

  def decode_fn(params, tokens, cache, index, positions=None, kv_mask=None, logits_at=None):
    kv, ptr = cache
    logits, kv = decode(params, tokens, kv, index, positions, kv_mask, logits_at)
    if scripts is not None:
      bias, ptr = s_decode(None, tokens, ptr, index, positions, kv_mask, logits_at)
      logits = logits + BIAS / 50.0 * bias
    else:
      logits = logits + const
    return logits, (kv, ptr)

  return decode_fn, init_cache_fn


def pad_scripts(scripts, width=150):
  return [s + [EOS] * (width - len(s)) for s in scripts]


def prompts_of(n, seed=3):
  rng = np.random.default_rng(seed)
  lens = 3 + np.arange(n) % 5                                # ragged prompts: 3..7 tokens
  prompts = np.zeros((n, int(lens.max())), np.int32)
  for i, k in enumerate(lens):
    prompts[i, :k] = [BOS, *rng.integers(40, V, k - 1)]
  return jnp.asarray(prompts), jnp.asarray(lens, jnp.int32)


def special_run(engine, *, scripts=None, temperature=0.0, mesh=None, chunk=8,
                prefill_when=0.5, bias_ids=None, seed=0):
  model, cfg, params = _model(V)
  n = len(scripts) if scripts is not None else 8
  corpus = tokenize_corpus(DOCS, pad_id=PAD)
  index = build_sparse_bm25_index(corpus, V, ignore_ids=ENV.special_ids)
  config = RolloutConfig(max_len=120, max_searches=2, top_k=2, max_query_tokens=4,
                         temperature=temperature, engine=engine, prefill_chunk=chunk,
                         prefill_when=prefill_when)
  decode_fn, init_cache_fn = biased_policy(model, cfg, scripts, V, bias_ids)
  fn = make_rollout_fn(config, ENV, decode_fn, init_cache_fn,
                       make_bm25_retrieve_fn(V, 2, ENV.special_ids), return_stats=True)
  prompts, lens = prompts_of(n)
  key = jax.random.key(seed)
  if mesh is None:
    out, stats = jax.jit(fn)(params, index, corpus, prompts, lens, key)
  else:
    rows = NamedSharding(mesh, P("data"))
    with jax.set_mesh(mesh):
      out, stats = jax.jit(fn)(params, index, corpus, jax.device_put(prompts, rows),
                               jax.device_put(lens, rows), key)
  return jax.tree.map(np.asarray, out), jax.tree.map(int, stats), (model, params)


def full_forward_logp(model, params, tokens, policy_mask, bias_fn):
  """Log-probs of each policy token from a full forward of the finished sequences, with the
  bias the rollout's policy added at that token (`bias_fn(row, k)` for its k-th action)."""
  logits = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens))
  out = np.zeros(tokens.shape, np.float32)
  for i in range(tokens.shape[0]):
    k = 0
    for t in np.nonzero(policy_mask[i])[0]:
      z = logits[i, t - 1].astype(np.float64) + bias_fn(i, k)
      z = z - z.max()
      out[i, t] = z[tokens[i, t]] - np.log(np.exp(z).sum())
      k += 1
  return out


class EngineEquivalenceTest(parameterized.TestCase):

  def assert_same_episodes(self, a, b):
    for field in ("tokens", "policy_mask", "env_mask", "turn_ids", "lengths", "status",
                  "num_searches", "invalid_searches", "retrieved"):
      np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    np.testing.assert_allclose(a.logp, b.logp, atol=1e-5, rtol=0)

  @parameterized.named_parameters(("half_waiting", 0.5, 8), ("all_waiting", 1.0, 8),
                                  ("any_waiting", 0.0, 8), ("chunks_of_3", 0.5, 3))
  def test_scripted_greedy_episodes_equal_the_reference_and_a_full_forward(self, when, chunk):
    kinds = list(SCRIPTS)
    scripts = pad_scripts([SCRIPTS[k] for k in kinds])
    new, new_stats, (model, params) = special_run("chunked", scripts=scripts, chunk=chunk,
                                                  prefill_when=when)
    ref, ref_stats, _ = special_run("token", scripts=scripts)
    self.assert_same_episodes(new, ref)
    status = dict(zip(kinds, new.status))
    self.assertEqual(status["search_then_answer"], EpisodeStatus.ANSWERED)
    self.assertEqual(status["no_closing_tag"], EpisodeStatus.TRUNCATED)
    self.assertEqual(status["eos"], EpisodeStatus.STOPPED)
    row = kinds.index("over_budget")
    self.assertEqual((new.num_searches[row], new.invalid_searches[row]), (2, 1))
    self.assertEqual(new.lengths[kinds.index("no_closing_tag")], 120)
    # Each row wrote exactly its script.
    for i, k in enumerate(kinds):
      n = new.lengths[i]
      want = SCRIPTS[k][: int(new.policy_mask[i].sum())]
      np.testing.assert_array_equal(new.tokens[i, :n][new.policy_mask[i, :n]], want)
    # Environment tokens go in chunks. Waiting for every row (1.0) lets the row that never
    # closes its search hold the others back: more sequential calls than the reference.
    self.assertGreater(new_stats["chunk_calls"], 0)
    if when < 1.0:
      self.assertLess(new_stats["model_calls"], ref_stats["model_calls"])
    bias = lambda i, k: BIAS * np.eye(V)[scripts[i][min(k, len(scripts[i]) - 1)]]
    full = full_forward_logp(model, params, new.tokens, new.policy_mask, bias)
    np.testing.assert_allclose(np.where(new.policy_mask, new.logp, 0), full, atol=1e-5)

  def test_sampled_episodes_equal_the_reference(self):
    # Temperature 1, no script: the Transformer's own choices, with a constant bias towards
    # <search> and </search> (and away from stopping) so that rows search, answer, stop and
    # run out of length at different times.
    bias = np.zeros(V, np.float32)
    bias[[S_OPEN, S_CLOSE, A_CLOSE, EOS]] = 4.0, 2.0, -1.0, -1.0
    new, _, (model, params) = special_run("chunked", temperature=1.0, bias_ids=bias, seed=5)
    ref, _, _ = special_run("token", temperature=1.0, bias_ids=bias, seed=5)
    self.assert_same_episodes(new, ref)
    self.assertGreater(new.num_searches.sum(), 0)
    self.assertGreater(new.invalid_searches.sum(), 0)
    self.assertContainsSubset({EpisodeStatus.ANSWERED, EpisodeStatus.STOPPED,
                               EpisodeStatus.TRUNCATED}, set(new.status.tolist()))
    full = full_forward_logp(model, params, new.tokens, new.policy_mask, lambda i, k: bias)
    np.testing.assert_allclose(np.where(new.policy_mask, new.logp, 0), full, atol=1e-5)
    # Another key gives other episodes (the key is used).
    other, _, _ = special_run("chunked", temperature=1.0, bias_ids=bias, seed=6)
    self.assertFalse(np.array_equal(other.tokens, new.tokens))

  def test_sharded_batch_equals_one_device(self):
    scripts = pad_scripts([SCRIPTS[k] for k in SCRIPTS])
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])
    sharded, _, _ = special_run("chunked", scripts=scripts, mesh=mesh)
    alone, _, _ = special_run("chunked", scripts=scripts)
    self.assert_same_episodes(sharded, alone)

  def test_text_tags_every_split_equals_the_reference(self):
    rng = np.random.default_rng(0)
    rows = [tt.episode(kind, rng)[0] for kind in tt.KINDS for _ in range(2)]
    scripts = [s + [tt.EOS] * (tt.WIDTH - len(s)) for s in rows]
    model, cfg, params = _model(tt.V)
    corpus = tokenize_corpus([[tt.FILL]] * tt.V, pad_id=tt.PAD)
    prompts = jnp.asarray([tt.PROMPT] * len(rows), jnp.int32)
    lens = jnp.full((len(rows),), len(tt.PROMPT), jnp.int32)
    outs = {}
    for engine in ("chunked", "token"):
      config = RolloutConfig(temperature=0.0, max_len=tt.MAX_LEN, top_k=tt.LQ,
                             max_query_tokens=tt.LQ, engine=engine, prefill_chunk=4)
      decode_fn, init_cache_fn = biased_policy(model, cfg, scripts, tt.V)
      fn = make_rollout_fn(config, tt.TEXT_ENV, decode_fn, init_cache_fn, tt.echo_retrieve_fn)
      outs[engine] = jax.tree.map(np.asarray, jax.jit(fn)(params, None, corpus, prompts, lens,
                                                          jax.random.key(0)))
    self.assert_same_episodes(outs["chunked"], outs["token"])
    self.assertGreater(outs["chunked"].num_searches.sum(), 0)
    bias = lambda i, k: BIAS * np.eye(tt.V)[scripts[i][min(k, len(scripts[i]) - 1)]]
    full = full_forward_logp(model, params, outs["chunked"].tokens,
                             outs["chunked"].policy_mask, bias)
    np.testing.assert_allclose(np.where(outs["chunked"].policy_mask, outs["chunked"].logp, 0),
                               full, atol=1e-5)


class ConfigTest(absltest.TestCase):

  def test_bad_engine_settings_are_named(self):
    with self.assertRaisesRegex(ValueError, "engine must be one of .* got 'fast'"):
      RolloutConfig(engine="fast")
    with self.assertRaisesRegex(ValueError, r"prefill_when must be a fraction in \[0, 1\], got 2"):
      RolloutConfig(prefill_when=2.0)
    with self.assertRaisesRegex(ValueError, "prefill_chunk must be >= 2, got 1"):
      RolloutConfig(prefill_chunk=1)
    with self.assertRaisesRegex(ValueError, "cache_dtype must be .* got 'int8'"):
      RolloutConfig(cache_dtype="int8")



if __name__ == "__main__":
  absltest.main()
