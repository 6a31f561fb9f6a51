"""The rollout on hand-built episodes: a scripted policy, a 3-document corpus, exact tokens."""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxsearch.retrieval.bm25 import build_sparse_bm25_index, tokenize_corpus
from jaxsearch.retrieval.tool import make_bm25_retrieve_fn
from jaxsearch.rollout.search_env import (EnvTokens, EpisodeStatus, RolloutConfig,
                                          information_block, make_rollout_fn)
from tests.rollout import scripted

PAD, BOS, EOS, S_OPEN, S_CLOSE, I_OPEN, I_CLOSE, A_OPEN, A_CLOSE = range(9)
V = 40
ENV = EnvTokens(pad=PAD, eos=EOS, search_open=S_OPEN, search_close=S_CLOSE, info_open=I_OPEN,
                info_close=I_CLOSE, answer_open=A_OPEN, answer_close=A_CLOSE,
                special_ids=tuple(range(9)), invalid_block=(I_OPEN, 30, I_CLOSE),
                budget_block=(I_OPEN, 31, 32, I_CLOSE))
DOCS = [[10, 11, 12], [13, 14], [15, 10, 16, 17]]
PROMPT = [BOS, 20, 21]


def scripted_policy(scripts):
  """A 'model' whose greedy choice is the next action token of each row's script (forced
  tokens never match: every action after a forced block starts with a tag that no prompt or
  passage contains)."""
  return scripted.scripted_policy(scripts, V)


def run(scripts, **config):
  width = max(len(s) for s in scripts)
  scripts = [s + [EOS] * (width - len(s)) for s in scripts]
  corpus = tokenize_corpus(DOCS, pad_id=PAD)
  index = build_sparse_bm25_index(corpus, V, ignore_ids=ENV.special_ids)
  cfg = RolloutConfig(temperature=0.0, **{"max_len": 48, "top_k": 1, **config})
  decode_fn, init_cache_fn = scripted_policy(scripts)
  fn = make_rollout_fn(cfg, ENV, decode_fn, init_cache_fn,
                       make_bm25_retrieve_fn(V, cfg.top_k, ENV.special_ids))
  n = len(scripts)
  prompts = jnp.asarray([PROMPT] * n, jnp.int32)
  out = jax.jit(fn)(None, index, corpus, prompts, jnp.full((n,), 3, jnp.int32),
                    jax.random.key(0))
  return jax.tree.map(np.asarray, out)


class RolloutTest(parameterized.TestCase):

  def test_two_searches_then_answer_masks_and_turns(self):
    script = [S_OPEN, 11, S_CLOSE, S_OPEN, 16, 17, S_CLOSE, A_OPEN, 22, A_CLOSE]
    r = run([script])
    # Hand-built stream: prompt | turn 1 action + doc 0 | turn 2 action + doc 2 | answer.
    blk0 = [I_OPEN, 10, 11, 12, I_CLOSE]
    blk2 = [I_OPEN, 15, 10, 16, 17, I_CLOSE]
    expected = (PROMPT + [S_OPEN, 11, S_CLOSE] + blk0 + [S_OPEN, 16, 17, S_CLOSE] + blk2
                + [A_OPEN, 22, A_CLOSE])
    kinds = ("p" * 3 + "a" * 3 + "e" * 5 + "a" * 4 + "e" * 6 + "a" * 3)
    turns = [0] * 3 + [1] * 8 + [2] * 10 + [3] * 3
    n = len(expected)
    self.assertEqual(r.lengths[0], n)
    np.testing.assert_array_equal(r.tokens[0, :n], expected)
    np.testing.assert_array_equal(r.tokens[0, n:], PAD)
    np.testing.assert_array_equal(r.policy_mask[0, :n], [k == "a" for k in kinds])
    np.testing.assert_array_equal(r.env_mask[0, :n], [k == "e" for k in kinds])
    self.assertFalse(r.policy_mask[0, n:].any() or r.env_mask[0, n:].any())
    np.testing.assert_array_equal(r.turn_ids[0, :n], turns)
    self.assertEqual(r.status[0], EpisodeStatus.ANSWERED)
    self.assertEqual(r.num_searches[0], 2)
    self.assertEqual(r.invalid_searches[0], 0)
    np.testing.assert_array_equal(r.retrieved[0, :, 0], [0, 2, -1])
    # Greedy log-probs of a one-hot-ish policy are ~0 on policy tokens, exactly 0 elsewhere.
    self.assertTrue(np.all(r.logp[0][~r.policy_mask[0]] == 0))
    self.assertTrue(np.all(r.logp[0][r.policy_mask[0]] > -1e-3))

  def test_malformed_actions_are_answered_by_the_environment(self):
    scripts = [
        [S_OPEN, S_CLOSE, A_OPEN, 22, A_CLOSE],              # empty query
        [S_CLOSE, A_OPEN, 22, A_CLOSE],                      # closing tag without opening
        [S_OPEN, 13, S_CLOSE, S_OPEN, 16, S_CLOSE, A_OPEN, 23, A_CLOSE],  # past the budget
        [S_OPEN, 13, S_OPEN, 14, S_CLOSE, A_OPEN, 22, A_CLOSE],  # re-opened: query restarts
        [S_OPEN, 13, 14, 13, 14, 13, 14, 13, 14],            # never closes
        [A_OPEN, 22, EOS],                                   # stops without closing the answer
        [EOS],                                               # stops at once
    ]
    r = run(scripts, max_searches=1, max_len=24)
    invalid = [I_OPEN, 30, I_CLOSE]
    budget = [I_OPEN, 31, 32, I_CLOSE]
    expect = {
        0: PROMPT + [S_OPEN, S_CLOSE] + invalid + [A_OPEN, 22, A_CLOSE],
        1: PROMPT + [S_CLOSE] + invalid + [A_OPEN, 22, A_CLOSE],
        2: PROMPT + [S_OPEN, 13, S_CLOSE, I_OPEN, 13, 14, I_CLOSE, S_OPEN, 16, S_CLOSE] + budget
           + [A_OPEN, 23, A_CLOSE],
        3: PROMPT + [S_OPEN, 13, S_OPEN, 14, S_CLOSE, I_OPEN, 13, 14, I_CLOSE, A_OPEN, 22, A_CLOSE],
        5: PROMPT + [A_OPEN, 22, EOS],
        6: PROMPT + [EOS],
    }
    for row, tokens in expect.items():
      np.testing.assert_array_equal(r.tokens[row, :r.lengths[row]], tokens, err_msg=f"row {row}")
    np.testing.assert_array_equal(r.status, [1, 1, 1, 1, EpisodeStatus.TRUNCATED,
                                             EpisodeStatus.STOPPED, EpisodeStatus.STOPPED])
    np.testing.assert_array_equal(r.num_searches, [0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(r.invalid_searches, [1, 1, 1, 0, 0, 0, 0])
    # The truncated row filled the whole budget of tokens with its unfinished query.
    self.assertEqual(r.lengths[4], 24)
    # Environment messages are masked out of the loss, and belong to the turn that caused them.
    self.assertFalse(r.policy_mask[0, 5:8].any())
    self.assertTrue(r.env_mask[0, 5:8].all())
    np.testing.assert_array_equal(r.turn_ids[0, 3:11], [1, 1, 1, 1, 1, 2, 2, 2])

  def test_policy_pad_ends_the_episode_like_eos(self):
    # A sampled <pad> stops the row (status STOPPED) right after it, as <eos> does; the script
    # would go on to answer if <pad> were an ordinary token.
    r = run([[A_OPEN, 22, PAD, 23, A_CLOSE]])
    self.assertEqual(r.status[0], EpisodeStatus.STOPPED)
    self.assertEqual(r.lengths[0], 6)
    np.testing.assert_array_equal(r.tokens[0, :6], PROMPT + [A_OPEN, 22, PAD])
    np.testing.assert_array_equal(r.policy_mask[0], [False] * 3 + [True] * 3 + [False] * 42)

  @parameterized.named_parameters(
      # PROMPT (3 tokens) + [A_OPEN, 22, A_CLOSE]: </answer> sits at position 5.
      ("answer_closes_at_the_last_position", [A_OPEN, 22, A_CLOSE], 6, EpisodeStatus.ANSWERED),
      ("answer_closes_before_the_end", [A_OPEN, 22, A_CLOSE], 7, EpisodeStatus.ANSWERED),
      ("answer_does_not_fit", [A_OPEN, 22, A_CLOSE], 5, EpisodeStatus.TRUNCATED),
      ("eos_at_the_last_position", [A_OPEN, 22, EOS], 6, EpisodeStatus.STOPPED),
  )
  def test_status_at_the_length_limit(self, script, max_len, status):
    r = run([script], max_len=max_len)
    self.assertEqual(r.status[0], status)
    self.assertEqual(r.lengths[0], min(max_len, 6))

  def test_overlong_query_is_truncated_not_an_error(self):
    script = [S_OPEN, 16, 13, 14, 13, S_CLOSE, A_OPEN, 22, A_CLOSE]
    r = run([script], max_query_tokens=1)
    # Only the first query token (16) counts: document 2 is retrieved.
    self.assertEqual(r.retrieved[0, 0, 0], 2)
    self.assertEqual(r.status[0], EpisodeStatus.ANSWERED)

  def test_information_block_concatenates_passages(self):
    corpus = tokenize_corpus(DOCS, pad_id=PAD)
    block, length = information_block(corpus, jnp.array([[2, 1], [1, 0]]), ENV, width=12)
    np.testing.assert_array_equal(length, [8, 7])
    np.testing.assert_array_equal(block[0, :8], [I_OPEN, 15, 10, 16, 17, 13, 14, I_CLOSE])
    np.testing.assert_array_equal(block[1, :7], [I_OPEN, 13, 14, 10, 11, 12, I_CLOSE])
    np.testing.assert_array_equal(block[:, 8:], PAD)

  def test_information_block_skips_missing_documents(self):
    # Id -1 means "no result" (a failed host search, an id the local corpus lacks): it adds no
    # tokens, wherever it sits; a row of -1 is an empty block. Last doc (2) must not leak in.
    corpus = tokenize_corpus(DOCS, pad_id=PAD)
    ids = jnp.array([[-1, -1], [1, -1], [-1, 0], [2, 1]], jnp.int32)
    block, length = jax.jit(lambda i: information_block(corpus, i, ENV, width=12))(ids)
    expected = [[I_OPEN, I_CLOSE],
                [I_OPEN, 13, 14, I_CLOSE],
                [I_OPEN, 10, 11, 12, I_CLOSE],
                [I_OPEN, 15, 10, 16, 17, 13, 14, I_CLOSE]]
    np.testing.assert_array_equal(length, [len(e) for e in expected])
    for row, tokens in enumerate(expected):
      np.testing.assert_array_equal(block[row, :len(tokens)], tokens, err_msg=f"row {row}")
      np.testing.assert_array_equal(block[row, len(tokens):], PAD, err_msg=f"row {row}")

  def test_rows_are_independent(self):
    a = [S_OPEN, 11, S_CLOSE, A_OPEN, 22, A_CLOSE]
    b = [A_OPEN, 23, A_CLOSE]
    both = run([a, b])
    alone = run([a])
    n = alone.lengths[0]
    np.testing.assert_array_equal(both.tokens[0, :n], alone.tokens[0, :n])
    np.testing.assert_array_equal(both.turn_ids[0], alone.turn_ids[0])


if __name__ == "__main__":
  absltest.main()
