"""The text-tag protocol: tags are text that the policy's tokens spell in any split.

A synthetic byte-level vocabulary holds every byte and every substring (2 to 6 bytes) of the
tags and query words, so one episode text can arrive as many different token sequences. A
scripted policy writes each row's sequence; rows differ only in how the tags are split. Every
split must stop at the tag's last token, pass the exact query ids to the retriever, and give
the masks, turn ids and statuses of the same episode under the special-id protocol.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxsearch.retrieval.bm25 import tokenize_corpus
from jaxsearch.rollout.search_env import (TAIL_BYTES, EnvTokens, EpisodeStatus, RolloutConfig,
                                          make_rollout_fn, token_bytes_table)
from tests.rollout import scripted

PAD, BOS, EOS, EOS2 = 0, 1, 2, 3
BYTE0 = 4                                   # id of byte b: BYTE0 + b
WORDS = (" alpha", " beta", " gamma", "Paris", "?</")
TAGS = ("<search>", "</search>", "<answer>", "</answer>")


def _vocabulary():
  pieces = [bytes([b]) for b in range(256)]
  seen = set(pieces)
  for text in (*TAGS, *WORDS):
    raw = text.encode()
    for i, j in itertools.combinations(range(len(raw) + 1), 2):
      if (2 <= j - i <= 6 or j - i == len(raw)) and raw[i:j] not in seen:
        seen.add(raw[i:j])
        pieces.append(raw[i:j])
  token_bytes = [b"", b"", b"", b""] + pieces
  # The special protocol's single tag ids, after the text vocabulary (bytes: never matched).
  special = {t: len(token_bytes) + k for k, t in enumerate(
      ("<search>", "</search>", "<information>", "</information>", "<answer>", "</answer>"))}
  token_bytes += [b""] * len(special)
  return token_bytes, {p: i for i, p in enumerate(token_bytes) if p}, special


TOKEN_BYTES, ID, SPECIAL = _vocabulary()
V = len(TOKEN_BYTES)
FILL = BYTE0 + 1         # byte 0x01: prompt, passages and wrappers; in no script
INFO_OPEN, INFO_CLOSE = (BYTE0 + 2, BYTE0 + 3), (BYTE0 + 4,)
TAILS, LENGTHS = token_bytes_table(TOKEN_BYTES)
TEXT_ENV = EnvTokens(
    pad=PAD, eos=EOS, search_open=-1, search_close=-1, info_open=INFO_OPEN[0],
    info_close=INFO_CLOSE[-1], answer_open=-1, answer_close=-1, special_ids=(PAD, BOS, EOS, EOS2),
    invalid_block=(*INFO_OPEN, BYTE0 + 5, *INFO_CLOSE),
    budget_block=(*INFO_OPEN, BYTE0 + 6, BYTE0 + 6, *INFO_CLOSE), protocol="text",
    eos_ids=(EOS, EOS2), info_open_ids=INFO_OPEN, info_close_ids=INFO_CLOSE,
    token_tails=TAILS, token_lengths=LENGTHS)
SPECIAL_ENV = EnvTokens(
    pad=PAD, eos=EOS, search_open=SPECIAL["<search>"], search_close=SPECIAL["</search>"],
    info_open=SPECIAL["<information>"], info_close=SPECIAL["</information>"],
    answer_open=SPECIAL["<answer>"], answer_close=SPECIAL["</answer>"],
    special_ids=(PAD, BOS, EOS, EOS2, *SPECIAL.values()),
    invalid_block=(SPECIAL["<information>"], BYTE0 + 5, SPECIAL["</information>"]),
    budget_block=(SPECIAL["<information>"], BYTE0 + 6, BYTE0 + 6, SPECIAL["</information>"]),
    eos_ids=(EOS, EOS2))
LQ, WIDTH, MAX_LEN = 6, 48, 160
PROMPT = [BOS, FILL, FILL]


def split(text: str, rng: np.random.Generator) -> list[int]:
  """Ids of `text` cut at random into pieces of 1 to 6 bytes (each a vocabulary entry), or
  the whole text as one id (a tag that is one token of the vocabulary) one time in four."""
  raw, out, i = text.encode(), [], 0
  if raw in ID and rng.random() < 0.25:
    return [ID[raw]]
  while i < len(raw):
    j = i + int(rng.integers(1, min(6, len(raw) - i) + 1))
    out.append(ID[raw[i:j]])
    i = j
  return out


def scripted_policy(scripts):
  """Greedy choice = the next id of each row's script (forced tokens are FILL / wrapper ids,
  in no script)."""
  return scripted.scripted_policy(scripts, V)


def echo_retrieve_fn(tool_state, query, mask):
  """Returns the query ids themselves as 'documents' (-1 past the query): the rollout's
  `retrieved` then shows exactly which ids the environment took as the query."""
  del tool_state
  return jnp.where(mask, query, -1), jnp.zeros(query.shape, jnp.float32)   # K = Lq


def run(env, scripts, prompt=PROMPT, **config):
  scripts = [s + [EOS] * (WIDTH - len(s)) for s in scripts]
  corpus = tokenize_corpus([[FILL]] * V, pad_id=PAD)         # document i = one FILL token
  cfg = RolloutConfig(**{"temperature": 0.0, "max_len": MAX_LEN, "top_k": LQ,
                         "max_query_tokens": LQ, **config})
  decode_fn, init_cache_fn = scripted_policy(scripts)
  fn = jax.jit(make_rollout_fn(cfg, env, decode_fn, init_cache_fn, echo_retrieve_fn))
  n = len(scripts)
  out = fn(None, None, corpus, jnp.asarray([prompt] * n, jnp.int32),
           jnp.full((n,), len(prompt), jnp.int32), jax.random.key(0))
  return jax.tree.map(np.asarray, out)


def runs(r, row):
  """The episode as runs of (kind, turn): kind p(rompt) / a(ction) / e(nvironment)."""
  n = r.lengths[row]
  kinds = np.where(r.policy_mask[row, :n], "a", np.where(r.env_mask[row, :n], "e", "p"))
  return [(k, int(t)) for k, t in zip(kinds, r.turn_ids[row, :n])]


def collapse(seq):
  return [k for k, _ in itertools.groupby(seq)]


# Episodes as (text actions, special-protocol actions), query words by id.
A, B, G, P = (ID[w.encode()] for w in (" alpha", " beta", " gamma", "Paris"))


def episode(kind: str, rng):
  s = lambda t: split(t, rng)
  if kind == "search_then_answer":
    return ([*s("<search>"), A, B, *s("</search>"), *s("<answer>"), P, *s("</answer>")],
            [SPECIAL["<search>"], A, B, SPECIAL["</search>"], SPECIAL["<answer>"], P,
             SPECIAL["</answer>"]])
  if kind == "two_searches":
    return ([*s("<search>"), G, *s("</search>"), *s("<search>"), A, *s("</search>"),
             *s("<answer>"), B, *s("</answer>")],
            [SPECIAL["<search>"], G, SPECIAL["</search>"], SPECIAL["<search>"], A,
             SPECIAL["</search>"], SPECIAL["<answer>"], B, SPECIAL["</answer>"]])
  if kind == "empty_query":
    return ([*s("<search>"), *s("</search>"), *s("<answer>"), P, *s("</answer>")],
            [SPECIAL["<search>"], SPECIAL["</search>"], SPECIAL["<answer>"], P,
             SPECIAL["</answer>"]])
  if kind == "close_without_open":
    return ([*s("</search>"), *s("<answer>"), P, *s("</answer>")],
            [SPECIAL["</search>"], SPECIAL["<answer>"], P, SPECIAL["</answer>"]])
  if kind == "no_answer_eos2":
    return ([*s("<answer>"), P, EOS2], [SPECIAL["<answer>"], P, EOS2])
  raise ValueError(kind)


KINDS = ("search_then_answer", "two_searches", "empty_query", "close_without_open",
         "no_answer_eos2")


class TextTagsTest(parameterized.TestCase):

  def test_token_bytes_table(self):
    tails, lengths = token_bytes_table([b"", b"ab", b"x" * 20 + b"</answer>"])
    self.assertEqual(lengths.tolist(), [0, 2, 29])
    self.assertEqual(tails.shape, (3, TAIL_BYTES))
    self.assertEqual(bytes(tails[1, -2:]), b"ab")
    self.assertFalse(tails[1, :-2].any())
    self.assertEqual(bytes(tails[2]), (b"x" * 20 + b"</answer>")[-TAIL_BYTES:])

  @parameterized.parameters(0, 1, 2)
  def test_every_split_stops_at_the_tag_and_matches_the_special_protocol(self, seed):
    rng = np.random.default_rng(seed)
    rows = [(kind, *episode(kind, rng)) for kind in KINDS for _ in range(6)]
    text = run(TEXT_ENV, [t for _, t, _ in rows])
    special = run(SPECIAL_ENV, [s for _, _, s in rows])
    # The splits differ between rows of one kind (else the property would be tested once).
    self.assertGreater(len({tuple(t) for k, t, _ in rows if k == "two_searches"}), 3)
    for row, (kind, actions, _) in enumerate(rows):
      with self.subTest(kind=kind, row=row):
        n = text.lengths[row]
        # The policy wrote exactly its script and stopped at the last tag's last token.
        written = text.tokens[row, :n][text.policy_mask[row, :n]]
        np.testing.assert_array_equal(written, actions)
        self.assertEqual(text.status[row], special.status[row])
        self.assertEqual(text.num_searches[row], special.num_searches[row])
        self.assertEqual(text.invalid_searches[row], special.invalid_searches[row])
        np.testing.assert_array_equal(text.retrieved[row], special.retrieved[row])
        self.assertEqual(collapse(runs(text, row)), collapse(runs(special, row)))
    statuses = {kind: text.status[i] for i, (kind, _, _) in enumerate(rows)}
    self.assertEqual(statuses["search_then_answer"], EpisodeStatus.ANSWERED)
    self.assertEqual(statuses["no_answer_eos2"], EpisodeStatus.STOPPED)

  def test_exact_query_ids_and_block(self):
    rng = np.random.default_rng(7)
    actions, _ = episode("search_then_answer", rng)
    r = run(TEXT_ENV, [actions])
    # The retriever saw exactly [alpha, beta]; the response is INFO_OPEN + 2 docs + INFO_CLOSE.
    self.assertEqual(r.retrieved[0, 0].tolist(), [A, B] + [-1] * (LQ - 2))
    n = r.lengths[0]
    env_tokens = r.tokens[0, :n][r.env_mask[0, :n]]
    np.testing.assert_array_equal(env_tokens, [*INFO_OPEN, FILL, FILL, *INFO_CLOSE])

  def test_token_holding_query_text_and_the_closing_tag_is_left_out(self):
    # " alpha" then "?</" then "search>": `</search>` starts inside "?</".
    actions = [ID[b"<searc"], ID[b"h>"], A, ID[b"?</"], ID[b"search"], ID[b">"],
               ID[b"<ans"], ID[b"wer>"], P, ID[b"</ans"], ID[b"wer>"]]
    r = run(TEXT_ENV, [actions])
    self.assertEqual(r.num_searches[0], 1)
    self.assertEqual(r.retrieved[0, 0].tolist(), [A] + [-1] * (LQ - 1))
    self.assertEqual(r.status[0], EpisodeStatus.ANSWERED)

  def test_tags_are_the_policys_own_text(self):
    # The prompt (forced) ends with "</ans"; the policy's "wer>" does not close an answer,
    # its own "</answer>" later does.
    actions = [ID[b"wer>"], P, ID[b"</answer>"]]
    r = run(TEXT_ENV, [actions], prompt=[BOS, FILL, ID[b"</ans"]])
    self.assertEqual(r.status[0], EpisodeStatus.ANSWERED)
    self.assertEqual(r.lengths[0], 3 + 3)
    # Without its own closing tag the row goes on to its <eos> (the script's padding).
    r = run(TEXT_ENV, [[ID[b"wer>"], P]], prompt=[BOS, FILL, ID[b"</ans"]])
    self.assertEqual(r.status[0], EpisodeStatus.STOPPED)
    self.assertEqual(r.lengths[0], 3 + 3)

  def test_overlong_query_is_truncated(self):
    actions = [ID[b"<search>"], *([A] * (LQ + 3)), ID[b"</search>"], ID[b"<answer>"], P,
               ID[b"</answer>"]]
    r = run(TEXT_ENV, [actions])
    self.assertEqual(r.num_searches[0], 1)
    self.assertEqual(r.retrieved[0, 0].tolist(), [A] * LQ)

  def test_text_protocol_needs_the_byte_table(self):
    with self.assertRaisesRegex(ValueError, "token_tails"):
      EnvTokens(pad=0, eos=1, search_open=-1, search_close=-1, info_open=2, info_close=3,
                answer_open=-1, answer_close=-1, special_ids=(0, 1), invalid_block=(2, 3),
                budget_block=(2, 3), protocol="text")
    with self.assertRaisesRegex(ValueError, "'words'"):
      EnvTokens(pad=0, eos=1, search_open=-1, search_close=-1, info_open=2, info_close=3,
                answer_open=-1, answer_close=-1, special_ids=(0, 1), invalid_block=(2, 3),
                budget_block=(2, 3), protocol="words")


if __name__ == "__main__":
  absltest.main()


class FromTokenizerTest(parameterized.TestCase):
  """The text protocol of a real Hugging Face tokenizer (tiny, trained offline)."""

  @parameterized.parameters("chatml", "llama3")
  def test_blocks_stop_ids_and_query_of_a_real_bpe(self, style):
    import tempfile  # noqa: PLC0415

    from jaxsearch.data.hf_tokenizer import load_hf_tokenizer  # noqa: PLC0415
    from tests.data.hf_tokenizer_fixtures import write_tokenizer_dir  # noqa: PLC0415
    tok = load_hf_tokenizer(write_tokenizer_dir(tempfile.mkdtemp(), style))
    env = EnvTokens.from_tokenizer(tok, "text")
    self.assertEqual(env.protocol, "text")
    self.assertEqual(env.eos_ids, tok.eos_ids)
    self.assertGreater(len(env.eos_ids), 1)                 # generation_config lists two
    self.assertEqual(tok.decode(env.info_open_ids, skip_special=False), "\n\n<information>")
    self.assertEqual(tok.decode(env.info_close_ids, skip_special=False), "</information>\n\n")
    self.assertIn("invalid search", tok.decode(env.invalid_block, skip_special=False))
    self.assertTrue(set(env.eos_ids) <= set(env.special_ids))
    # A search written as the tokenizer encodes it: the query is " capital of France" (the token
    # " </" that starts the closing tag is not part of it).
    script = tok.encode("<search> capital of France </search>")
    self.assertGreater(len(script), 4)
    vocab = tok.vocab_size
    corpus = tokenize_corpus([[tok.pad_id]] * vocab, pad_id=tok.pad_id)
    cfg = RolloutConfig(temperature=0.0, max_len=160, top_k=16, max_query_tokens=16)
    decode_fn, init_cache_fn = scripted.scripted_policy([script + [env.eos_ids[-1]] * 4], vocab)
    fn = jax.jit(make_rollout_fn(cfg, env, decode_fn, init_cache_fn, echo_retrieve_fn))
    prompt = [tok.bos_id, *tok.encode("Question")]
    r = jax.tree.map(np.asarray, fn(None, None, corpus, jnp.asarray([prompt], jnp.int32),
                                    jnp.asarray([len(prompt)], jnp.int32), jax.random.key(0)))
    self.assertEqual(r.num_searches[0], 1)
    query = [int(i) for i in r.retrieved[0, 0] if i >= 0]
    self.assertEqual(tok.decode(query), " capital of France ")   # " " then "<" ends it
    self.assertEqual(r.status[0], EpisodeStatus.STOPPED)   # its second stop id
