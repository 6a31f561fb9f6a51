"""The multi-turn search environment and its rollout, as one compiled program.

A rollout samples `N` episodes at once. Every row starts at position 0 with its prompt and
advances one token per step, so all rows share one KV-cache index. A row's next token is either
*forced* (its prompt, or an environment response waiting in its queue) or *sampled* by the policy.
The environment watches the policy's tokens:

- `<search>` opens a query; the regular tokens that follow are the query (at most
  `max_query_tokens`; an overlong query is truncated, never an error);
- `</search>` closes it: the query's token ids go to the in-graph retriever, and
  `<information> passage ... passage </information>` (passages tokenized once, when the corpus was
  built) is queued and fed to the model token by token;
- `</answer>` ends the episode; so does `<eos>` (no answer) or running out of length.

Two protocols (`EnvTokens.protocol`):

- "special": each tag is one id of the vocabulary (the from-scratch world model, or a
  pretrained vocabulary grown by `add_tags=True`); a tag is recognised by its id.
- "text" (Search-R1's, the default for pretrained policies): the tags are ordinary text in the
  model's own vocabulary, however its BPE splits them. Every id has a byte string
  (`token_bytes_table`); each row keeps the last `TAIL_BYTES` bytes its policy wrote in the
  current turn, and a tag is recognised on the token whose bytes complete it (so `</search>`
  may arrive as `</`, `search`, `>` or as `?</` + `search>`). The query is the exact ids of the
  tokens written between the token completing `<search>` and the token where `</search>`
  starts (a token holding both query text and the start of `</search>` is left out); the
  `<information>` block is `info_open_ids`, the passages' ids (tokenized once) and
  `info_close_ids`. Every id in `eos_ids` (Qwen / Llama 3 have several) ends an episode.

Both protocols give the same masks, turn ids and statuses for the same episode.

Malformed actions are part of the environment, never a crash: an empty query or a `</search>`
without `<search>` is answered with an "invalid search" block, a search past the budget with a
"no searches left" block; both are counted in `Rollout.invalid_searches`, and the reward decides
what they cost. Token ids are kept end to end: text is decoded only to score answers and to show
people.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.data.prompts import PROTOCOLS
from jaxsearch.retrieval.bm25 import TokenizedCorpus
from jaxsearch.rollout.sampling import sample_logits
from jaxsearch.types import PyTree, Rollout

INVALID_SEARCH_MESSAGE = "invalid search: write a non-empty query between <search> and </search>"
BUDGET_MESSAGE = "no searches left: answer now"
# The text protocol's response wrapper: blank lines around the block, as the prompt shows it.
TEXT_INFO_OPEN = "\n\n<information>"
TEXT_INFO_CLOSE = "</information>\n\n"
# Bytes of the policy's recent text each row keeps: enough for the longest tag.
TAIL_BYTES = 16


class EpisodeStatus(enum.IntEnum):
  RUNNING = 0
  ANSWERED = 1    # the policy closed </answer>
  TRUNCATED = 2   # ran out of length before answering
  STOPPED = 3     # the policy emitted <eos> (or <pad>) without an answer


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
  """How episodes are sampled.

  Attributes:
    max_len: tokens per row, prompt and environment responses included (the KV-cache length).
    max_searches: the search budget per episode (S).
    top_k: passages returned per search (K).
    max_query_tokens: longest query kept; longer queries are truncated.
    temperature: sampling temperature; 0 is greedy.
    top_p: nucleus sampling mass.
  """

  max_len: int = 192
  max_searches: int = 3
  top_k: int = 2
  max_query_tokens: int = 16
  temperature: float = 1.0
  top_p: float = 1.0

  def __post_init__(self):
    for name in ("max_len", "max_searches", "top_k", "max_query_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"RolloutConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.temperature < 0:
      raise ValueError(f"RolloutConfig.temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"RolloutConfig.top_p must be in (0, 1], got {self.top_p}")


def token_bytes_table(token_bytes: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
  """The text protocol's id -> bytes table.

  Args:
    token_bytes: [V] the bytes each id stands for (a tokenizer's `token_bytes()`).

  Returns:
    `(tails [V, TAIL_BYTES] uint8, lengths [V] int32)`: each id's last `TAIL_BYTES` bytes,
    right-aligned (only they can complete a tag), and its full byte length.

  Example:
    >>> tails, lengths = token_bytes_table([b"ab", b"</search>"])
    >>> bytes(tails[1, -9:]), int(lengths[0])
    (b'</search>', 2)
  """
  tails = np.zeros((len(token_bytes), TAIL_BYTES), np.uint8)
  lengths = np.zeros((len(token_bytes),), np.int32)
  for i, b in enumerate(token_bytes):
    b = bytes(b)
    lengths[i] = len(b)
    last = b[-TAIL_BYTES:]
    if last:
      tails[i, TAIL_BYTES - len(last):] = np.frombuffer(last, np.uint8)
  return tails, lengths


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnvTokens:
  """The protocol's token ids (static: they select code paths at trace time).

  The single tag ids (`search_open`, ...) are the "special" protocol's; the "text" protocol
  sets them to -1 and recognises tags by bytes (`token_tails`, `token_lengths`, compared by
  `token_table_digest`). `info_open_ids` / `info_close_ids` wrap every response ((`info_open`,)
  and (`info_close`,) when empty), `eos_ids` are the stop ids ((`eos`,) when empty).
  """

  pad: int
  eos: int
  search_open: int
  search_close: int
  info_open: int
  info_close: int
  answer_open: int
  answer_close: int
  special_ids: tuple[int, ...]        # never part of a query (tags, pad, bos, eos)
  invalid_block: tuple[int, ...]      # full `<information>...</information>` response
  budget_block: tuple[int, ...]
  protocol: str = "special"
  eos_ids: tuple[int, ...] = ()
  info_open_ids: tuple[int, ...] = ()
  info_close_ids: tuple[int, ...] = ()
  token_tails: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
  token_lengths: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
  token_table_digest: str = ""

  def __post_init__(self):
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
    if not self.eos_ids:
      object.__setattr__(self, "eos_ids", (self.eos,))
    if not self.info_open_ids:
      object.__setattr__(self, "info_open_ids", (self.info_open,))
    if not self.info_close_ids:
      object.__setattr__(self, "info_close_ids", (self.info_close,))
    if self.protocol == "text":
      if self.token_tails is None or self.token_lengths is None:
        raise ValueError("the text protocol needs token_tails and token_lengths "
                         "(token_bytes_table of the tokenizer)")
      if not self.token_table_digest:
        digest = hashlib.sha256(np.ascontiguousarray(self.token_tails).tobytes()
                                + np.ascontiguousarray(self.token_lengths).tobytes())
        object.__setattr__(self, "token_table_digest", digest.hexdigest()[:16])

  @classmethod
  def from_tokenizer(cls, tokenizer: Any, protocol: str = "special") -> "EnvTokens":
    """The protocol of `tokenizer`.

    Args:
      tokenizer: a jaxsearch tokenizer; "special" needs its `tag_id`, "text" its
        `token_bytes()` and that every tag encodes (to any ids) and decodes back.
      protocol: "special" or "text".
    """
    if protocol not in PROTOCOLS:
      raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    eos_ids = tuple(getattr(tokenizer, "eos_ids", ()) or (tokenizer.eos_id,))
    if protocol == "text":
      return cls._text(tokenizer, eos_ids)
    tag = tokenizer.tag_id
    info_open, info_close = tag("<information>"), tag("</information>")

    def block(text: str) -> tuple[int, ...]:
      return (info_open, *tokenizer.encode(text), info_close)

    tags = ("<search>", "</search>", "<information>", "</information>", "<answer>", "</answer>",
            "<think>", "</think>")
    return cls(
        pad=tokenizer.pad_id, eos=tokenizer.eos_id,
        search_open=tag("<search>"), search_close=tag("</search>"),
        info_open=info_open, info_close=info_close,
        answer_open=tag("<answer>"), answer_close=tag("</answer>"),
        special_ids=tuple(sorted({tokenizer.pad_id, tokenizer.bos_id, *eos_ids,
                                  *(tag(t) for t in tags)})),
        invalid_block=block(INVALID_SEARCH_MESSAGE),
        budget_block=block(BUDGET_MESSAGE),
        eos_ids=eos_ids,
    )

  @classmethod
  def _text(cls, tokenizer: Any, eos_ids: tuple[int, ...]) -> "EnvTokens":
    if not hasattr(tokenizer, "token_bytes"):
      raise ValueError(f"the text protocol needs a tokenizer with token_bytes() (a byte-level "
                       f"BPE / Hugging Face tokenizer), got {type(tokenizer).__name__}")
    for tag in ("<search>", "</search>", "<answer>", "</answer>", TEXT_INFO_OPEN,
                TEXT_INFO_CLOSE):
      ids = tokenizer.encode(tag)
      if not ids or tokenizer.decode(ids, skip_special=False) != tag:
        raise ValueError(f"the tokenizer cannot encode the tag {tag!r} as text (encode gives "
                         f"{ids}, which decodes to {tokenizer.decode(ids, skip_special=False)!r})")
    tails, lengths = token_bytes_table(tokenizer.token_bytes())
    info_open, info_close = (tuple(tokenizer.encode(TEXT_INFO_OPEN)),
                             tuple(tokenizer.encode(TEXT_INFO_CLOSE)))

    def block(text: str) -> tuple[int, ...]:
      return (*info_open, *tokenizer.encode(text), *info_close)

    return cls(
        pad=tokenizer.pad_id, eos=eos_ids[0], search_open=-1, search_close=-1,
        info_open=info_open[0], info_close=info_close[-1], answer_open=-1, answer_close=-1,
        special_ids=tuple(sorted({tokenizer.pad_id, tokenizer.bos_id, *eos_ids})),
        invalid_block=block(INVALID_SEARCH_MESSAGE), budget_block=block(BUDGET_MESSAGE),
        protocol="text", eos_ids=eos_ids, info_open_ids=info_open, info_close_ids=info_close,
        token_tails=tails, token_lengths=lengths)


# retrieve_fn(tool_state, query_tokens [N, Lq] int32, query_mask [N, Lq] bool)
#   -> (doc ids [N, K] int32, scores [N, K] float32)
RetrieveFn = Callable[[PyTree, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# decode_fn(params, tokens [N, 1] int32, cache, index [] int32) -> (logits [N, 1, V], cache)
DecodeFn = Callable[[PyTree, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


def block_width(corpus_width: int, top_k: int, env: EnvTokens) -> int:
  """Longest environment response: K passages of at most `corpus_width` tokens, plus tags."""
  wrap = len(env.info_open_ids) + len(env.info_close_ids)
  return max(wrap + top_k * corpus_width, len(env.invalid_block), len(env.budget_block))


def information_block(
    corpus: TokenizedCorpus, doc_ids: jax.Array, env: EnvTokens, width: int
) -> tuple[jax.Array, jax.Array]:
  """Concatenates retrieved passages into one `<information>` block per row.

  Args:
    corpus: passages as token ids, tokens [M, L], lengths [M].
    doc_ids: [N, K] int32 retrieved document indices, best first; -1 (no result) adds nothing.
    env: the protocol's token ids.
    width: W >= len(info_open_ids) + K * L + len(info_close_ids), the padded block width.

  Returns:
    `(block [N, W] int32, length [N] int32)`: `<information> p_1 ... p_K </information>`
    (the wrappers `env.info_open_ids` / `env.info_close_ids`), padded.
  """
  a, c = len(env.info_open_ids), len(env.info_close_ids)
  opening = jnp.asarray(env.info_open_ids, jnp.int32)
  closing = jnp.asarray(env.info_close_ids, jnp.int32)
  passages = corpus.tokens[doc_ids]                          # [N, K, L]
  lens = jnp.where(doc_ids >= 0, corpus.lengths[doc_ids], 0)  # [N, K]; id -1 (no result): empty
  ends = jnp.cumsum(lens, axis=-1)                           # [N, K]
  total = ends[:, -1]                                        # [N]
  j = jnp.arange(width)[None, :] - a                         # [1, W] position inside the passages
  which = jnp.sum(j[:, :, None] >= ends[:, None, :], axis=-1)          # [N, W]
  which_c = jnp.minimum(which, doc_ids.shape[1] - 1)
  start = jnp.take_along_axis(ends - lens, which_c, axis=1)            # [N, W]
  offset = jnp.clip(j - start, 0, passages.shape[-1] - 1)
  body = passages[jnp.arange(doc_ids.shape[0])[:, None], which_c, offset]  # [N, W]
  after = j - total[:, None]                                 # [N, W] position in the closing
  block = jnp.where(
      j < 0, opening[jnp.clip(j + a, 0, a - 1)],
      jnp.where(j < total[:, None], body,
                jnp.where(after < c, closing[jnp.clip(after, 0, c - 1)], env.pad)))
  return block.astype(jnp.int32), (total + a + c).astype(jnp.int32)


def _static_block(ids: Sequence[int], n: int, width: int) -> tuple[jax.Array, jax.Array]:
  row = jnp.full((width,), 0, jnp.int32).at[: len(ids)].set(jnp.asarray(ids, jnp.int32))
  return jnp.broadcast_to(row, (n, width)), jnp.full((n,), len(ids), jnp.int32)


def make_rollout_fn(
    config: RolloutConfig,
    env: EnvTokens,
    decode_fn: DecodeFn,
    init_cache_fn: Callable[[int, int], Any],
    retrieve_fn: RetrieveFn,
) -> Callable[..., Rollout]:
  """Builds the pure multi-turn rollout.

  Args:
    config: sampling and budget settings.
    env: the protocol's token ids.
    decode_fn: the policy's one-step decode with a KV cache.
    init_cache_fn: `(batch_size, max_len) -> cache`.
    retrieve_fn: the in-graph search tool.

  Returns:
    `rollout_fn(params, tool_state, corpus, prompts [N, P], prompt_lens [N], rng) -> Rollout`,
    pure and jittable (the caller jits it); rows are `G` copies of each prompt when the caller
    repeats prompts.

  Example:
    >>> rollout_fn = jax.jit(make_rollout_fn(cfg, env, decode_fn, init_cache_fn, retrieve_fn))
    >>> rollout = rollout_fn(params, bm25_index, corpus, prompts, prompt_lens, jax.random.key(0))
  """
  T, S, K, Lq = config.max_len, config.max_searches, config.top_k, config.max_query_tokens
  special = jnp.asarray(env.special_ids, jnp.int32)
  stop_ids = jnp.asarray(sorted({*env.eos_ids, env.pad}), jnp.int32)
  text = env.protocol == "text"
  W = TAIL_BYTES
  if text:
    tails_table = jnp.asarray(env.token_tails, jnp.int32)        # [V, W]
    lengths_table = jnp.asarray(env.token_lengths, jnp.int32)    # [V]

  def ends_with(tail, tag: str):
    """[N] bool: the row's recent policy bytes `tail` [N, W] end with `tag`."""
    want = jnp.asarray(np.frombuffer(tag.encode("utf-8"), np.uint8), jnp.int32)
    return jnp.all(tail[:, W - want.shape[0]:] == want[None, :], axis=-1)

  def rollout_fn(params, tool_state, corpus: TokenizedCorpus, prompts, prompt_lens, rng) -> Rollout:
    n, p = prompts.shape
    width = max(p, block_width(corpus.tokens.shape[1], K, env))
    invalid_block, invalid_len = _static_block(env.invalid_block, n, width)
    budget_block, budget_len = _static_block(env.budget_block, n, width)
    rows = jnp.arange(n)
    zeros_i = jnp.zeros((n,), jnp.int32)
    zeros_b = jnp.zeros((n,), bool)
    state = dict(
        t=jnp.zeros([], jnp.int32),
        cache=init_cache_fn(n, T),
        logits=jnp.zeros((n, 1), jnp.float32),  # replaced after the first (forced) step
        tokens=jnp.full((n, T), env.pad, jnp.int32),
        policy_mask=jnp.zeros((n, T), bool),
        env_mask=jnp.zeros((n, T), bool),
        turn_ids=jnp.zeros((n, T), jnp.int32),
        logp=jnp.zeros((n, T), jnp.float32),
        queue=jnp.pad(prompts.astype(jnp.int32), ((0, 0), (0, width - p)), constant_values=env.pad),
        qlen=prompt_lens.astype(jnp.int32), qpos=zeros_i,
        done=zeros_b, status=zeros_i, lengths=zeros_i,
        in_search=zeros_b, qbuf=jnp.zeros((n, Lq), jnp.int32), qcount=zeros_i,
        turn=zeros_i, prev_forced=jnp.ones((n,), bool),
        searches=zeros_i, invalid=zeros_i, retrieved=jnp.full((n, S, K), -1, jnp.int32),
        rng=rng,
    )
    if text:
      state.update(tail=jnp.full((n, W), -1, jnp.int32),   # the turn's last W policy bytes
                   qbytes=zeros_i,                          # policy bytes since <search>
                   qends=jnp.zeros((n, Lq), jnp.int32))     # each query token's end byte

    def step(s):
      t = s["t"]
      rng, key = jax.random.split(s["rng"])
      forced = s["qpos"] < s["qlen"]
      active = ~s["done"]
      if s["logits"].shape[-1] > 1:
        sampled, sampled_logp = sample_logits(
            key, s["logits"], temperature=config.temperature, top_p=config.top_p)
      else:  # first step: every row is forced (prompts are non-empty)
        sampled, sampled_logp = zeros_i, jnp.zeros((n,), jnp.float32)
      forced_tok = jnp.take_along_axis(s["queue"], jnp.minimum(s["qpos"], width - 1)[:, None], 1)[:, 0]
      tok = jnp.where(active, jnp.where(forced, forced_tok, sampled), env.pad)
      is_policy = active & ~forced
      turn = jnp.where(is_policy & s["prev_forced"], s["turn"] + 1, s["turn"])
      is_env = active & forced & (turn > 0)
      col = lambda buf, v: buf.at[:, t].set(v)
      out = dict(
          tokens=col(s["tokens"], tok),
          policy_mask=col(s["policy_mask"], is_policy),
          env_mask=col(s["env_mask"], is_env),
          turn_ids=col(s["turn_ids"], jnp.where(active, turn, 0)),
          logp=col(s["logp"], jnp.where(is_policy, sampled_logp, 0.0)),
          lengths=jnp.where(active, t + 1, s["lengths"]),
          prev_forced=jnp.where(active, forced, s["prev_forced"]),
          turn=turn,
      )
      qpos = s["qpos"] + (active & forced)

      # Parse the policy's token.
      stopped = is_policy & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
      regular = ~jnp.any(tok[:, None] == special[None, :], axis=-1)
      add = is_policy & s["in_search"] & regular & (s["qcount"] < Lq)
      slot_of = add[:, None] & (jnp.arange(Lq)[None, :] == s["qcount"][:, None])   # [N, Lq]
      if text:
        # Append the token's bytes to the row's tail (env tokens clear it), then look for tags
        # completed by this token.
        nbytes = lengths_table[tok]                                   # [N]
        shift = jnp.minimum(nbytes, W)[:, None] + jnp.arange(W)[None, :]        # [N, W]
        older = jnp.take_along_axis(s["tail"], jnp.minimum(shift, W - 1), axis=1)
        appended = jnp.where(shift < W, older, tails_table[tok])     # right-aligned bytes
        tail = jnp.where(is_policy[:, None], appended,
                         jnp.where((active & forced)[:, None], -1, s["tail"]))
        fresh = is_policy & (nbytes > 0)
        opened = fresh & ends_with(tail, "<search>")
        closed = fresh & ends_with(tail, "</search>")
        answered = fresh & ends_with(tail, "</answer>")
        qbytes = s["qbytes"] + jnp.where(is_policy & s["in_search"], nbytes, 0)
        qends = jnp.where(slot_of, qbytes[:, None], s["qends"])
        out["tail"] = tail
        out["qbytes"] = jnp.where(opened, 0, qbytes)
        out["qends"] = jnp.where(opened[:, None], 0, qends)
      else:
        opened = is_policy & (tok == env.search_open)
        closed = is_policy & (tok == env.search_close)
        answered = is_policy & (tok == env.answer_close)
      qbuf = jnp.where(slot_of, tok[:, None], s["qbuf"])
      qcount = s["qcount"] + add
      in_search = s["in_search"] | opened
      qcount = jnp.where(opened, 0, qcount)
      qbuf = jnp.where(opened[:, None], 0, qbuf)

      # Answer closed searches.
      qmask = jnp.arange(Lq)[None, :] < qcount[:, None]
      if text:   # only the tokens that end before `</search>` starts
        qmask &= qends <= (qbytes - len("</search>"))[:, None]
      valid = closed & in_search & jnp.any(qmask, axis=-1)
      do_search = valid & (s["searches"] < S)

      def respond(_):
        ids, _ = retrieve_fn(tool_state, qbuf, qmask & do_search[:, None])
        ids = ids.astype(jnp.int32)
        block, blen = information_block(corpus, ids, env, width)
        return ids, block, blen

      def skip(_):
        return (jnp.zeros((n, K), jnp.int32), jnp.zeros((n, width), jnp.int32), zeros_i)

      ids, block, blen = jax.lax.cond(jnp.any(do_search), respond, skip, None)
      msg = jnp.where((valid & ~do_search)[:, None], budget_block, invalid_block)
      msg_len = jnp.where(valid & ~do_search, budget_len, invalid_len)
      new_block = jnp.where(do_search[:, None], block, msg)
      new_len = jnp.where(do_search, blen, msg_len)
      slot = jnp.minimum(s["searches"], S - 1)
      retrieved = s["retrieved"].at[rows, slot].set(
          jnp.where(do_search[:, None], ids, s["retrieved"][rows, slot]))

      ended = answered | stopped
      truncated = active & ~ended & (t == T - 1)
      status = jnp.where(answered, EpisodeStatus.ANSWERED, s["status"])
      status = jnp.where(stopped, EpisodeStatus.STOPPED, status)
      status = jnp.where(truncated, EpisodeStatus.TRUNCATED, status)

      logits, cache = decode_fn(params, tok[:, None], s["cache"], t)
      out.update(
          t=t + 1, rng=rng, cache=cache, logits=logits[:, 0].astype(jnp.float32),
          queue=jnp.where(closed[:, None], new_block, s["queue"]),
          qlen=jnp.where(closed, new_len, s["qlen"]),
          qpos=jnp.where(closed, 0, qpos),
          done=s["done"] | ended | truncated, status=status,
          in_search=in_search & ~closed, qbuf=qbuf, qcount=jnp.where(closed, 0, qcount),
          searches=s["searches"] + do_search, invalid=s["invalid"] + (closed & ~do_search),
          retrieved=retrieved,
      )
      return out

    # The first step has no logits to sample from; run it outside the loop so the loop carry
    # has a fixed [N, V] logits shape.
    state = step(state)

    def cond(s):
      return (s["t"] < T) & ~jnp.all(s["done"])

    state = jax.lax.while_loop(cond, step, state)
    return Rollout(
        tokens=state["tokens"], policy_mask=state["policy_mask"], env_mask=state["env_mask"],
        turn_ids=state["turn_ids"], logp=state["logp"], lengths=state["lengths"],
        num_searches=state["searches"], invalid_searches=state["invalid"],
        retrieved=state["retrieved"], status=state["status"],
    )

  return rollout_fn
