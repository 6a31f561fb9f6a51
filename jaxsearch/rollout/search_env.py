"""The multi-turn search environment and its rollout, as one compiled program.

A rollout samples `N` episodes at once, each row from position 0 with its prompt. A row's next
tokens are either *forced* (its prompt, or an environment response waiting in its queue) or
*sampled* by the policy. The default engine ("chunked") feeds forced tokens to the model in
chunks (one call writes up to `prefill_chunk` of them per row, each row at its own KV-cache
slots and RoPE positions) and decodes only the policy's tokens one at a time; the reference
engine ("token") advances every row one token per call. Sampling keys are (rollout key, row,
position), so a row's episode does not depend on the engine or the other rows. The
environment watches the policy's tokens:

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
ENGINES = ("chunked", "token")


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
    engine: "chunked" (environment tokens prefilled in chunks, policy tokens decoded one at a
      time, per-row cache slots) or "token" (the reference: one token per row per model call).
    prefill_chunk: the chunked engine's widest call (tokens per row per call).
    prefill_when: the fraction of the active rows that must be waiting (environment tokens
      queued) for a chunk call; 1.0 waits until no row can decode, 0.0 chunks as soon as one
      row waits; see `make_rollout_fn`.
    cache_dtype: the KV cache's dtype ("float32", "bfloat16", "float16"); "" is the model's
      compute dtype. Its length is `max_len`.
    unroll_layers: decode a `scan_layers` policy with its layers unrolled (the stacked
      parameters are sliced once per rollout, `transformer.unstack_layer_params`): XLA then
      writes each layer's new keys and values into the cache in place, where the scanned
      block copies the whole cache on every model call (measured on CPU, SmolLM2-135M, batch
      32, 608 slots: a decode step alone ~2x faster; a whole chunked-engine rollout ~6%, as
      the engine's own cache copies remain). Costs compile time per layer; read by the
      agent's `experiment.setup`, which builds the decode function.
  """

  max_len: int = 192
  max_searches: int = 3
  top_k: int = 2
  max_query_tokens: int = 16
  temperature: float = 1.0
  top_p: float = 1.0
  engine: str = "chunked"
  prefill_chunk: int = 64
  prefill_when: float = 0.5
  cache_dtype: str = ""
  unroll_layers: bool = True

  def __post_init__(self):
    for name in ("max_len", "max_searches", "top_k", "max_query_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"RolloutConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.temperature < 0:
      raise ValueError(f"RolloutConfig.temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"RolloutConfig.top_p must be in (0, 1], got {self.top_p}")
    if self.engine not in ENGINES:
      raise ValueError(f"RolloutConfig.engine must be one of {ENGINES}, got {self.engine!r}")
    if not 0.0 <= self.prefill_when <= 1.0:
      raise ValueError(f"RolloutConfig.prefill_when must be a fraction in [0, 1], got "
                       f"{self.prefill_when!r}")
    if self.cache_dtype not in ("", "float32", "bfloat16", "float16"):
      raise ValueError(f"RolloutConfig.cache_dtype must be '', 'float32', 'bfloat16' or "
                       f"'float16', got {self.cache_dtype!r}")
    if self.prefill_chunk < 2:
      raise ValueError(f"RolloutConfig.prefill_chunk must be >= 2, got {self.prefill_chunk}")


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


class _Environment:
  """What both engines share: the per-row state of the protocol, the reading of one policy
  token per row, and the response to a closed search. Pure functions of state dicts."""

  def __init__(self, config: RolloutConfig, env: EnvTokens, retrieve_fn: RetrieveFn):
    self.config, self.env, self.retrieve_fn = config, env, retrieve_fn
    self.special = jnp.asarray(env.special_ids, jnp.int32)
    self.stop_ids = jnp.asarray(sorted({*env.eos_ids, env.pad}), jnp.int32)
    self.text = env.protocol == "text"
    if self.text:
      self.tails_table = jnp.asarray(env.token_tails, jnp.int32)        # [V, W]
      self.lengths_table = jnp.asarray(env.token_lengths, jnp.int32)    # [V]

  def init_state(self, n: int, prompts, prompt_lens, width: int, rng) -> dict:
    """The state every row starts in: its prompt queued as forced tokens."""
    env, config = self.env, self.config
    S, K, Lq, p = config.max_searches, config.top_k, config.max_query_tokens, prompts.shape[1]
    zeros_i, zeros_b = jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool)
    T = config.max_len
    state = dict(
        tokens=jnp.full((n, T), env.pad, jnp.int32),
        policy_mask=jnp.zeros((n, T), bool),
        env_mask=jnp.zeros((n, T), bool),
        turn_ids=jnp.zeros((n, T), jnp.int32),
        logp=jnp.zeros((n, T), jnp.float32),
        queue=jnp.pad(prompts.astype(jnp.int32), ((0, 0), (0, width - p)),
                      constant_values=env.pad),
        qlen=prompt_lens.astype(jnp.int32), qpos=zeros_i,
        done=zeros_b, status=zeros_i, lengths=zeros_i,
        in_search=zeros_b, qbuf=jnp.zeros((n, Lq), jnp.int32), qcount=zeros_i,
        turn=zeros_i, prev_forced=jnp.ones((n,), bool),
        searches=zeros_i, invalid=zeros_i, retrieved=jnp.full((n, S, K), -1, jnp.int32),
        rng=rng,
    )
    if self.text:
      state.update(tail=jnp.full((n, TAIL_BYTES), -1, jnp.int32),   # the turn's last policy bytes
                   qbytes=zeros_i,                                  # policy bytes since <search>
                   qends=jnp.zeros((n, Lq), jnp.int32))             # each query token's end byte
    return state

  def sample(self, s: dict, pos):
    """Each row's next token from its logits, with a key of (the rollout's key, row,
    position): a row's tokens do not depend on the engine, the call schedule or the other
    rows. Returns (tokens [N], logp [N])."""
    rows = jnp.arange(pos.shape[0])
    keys = jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(s["rng"], r), t))(
        rows, pos)
    return sample_logits(keys, s["logits"], temperature=self.config.temperature,
                         top_p=self.config.top_p)

  def _ends_with(self, tail, tag: str):
    """[N] bool: the row's recent policy bytes `tail` [N, W] end with `tag`."""
    want = jnp.asarray(np.frombuffer(tag.encode("utf-8"), np.uint8), jnp.int32)
    return jnp.all(tail[:, TAIL_BYTES - want.shape[0]:] == want[None, :], axis=-1)

  def read(self, s: dict, tok, is_policy, reset) -> tuple[dict, dict]:
    """Reads each row's token `tok` [N] where `is_policy` [N]; `reset` [N] marks rows fed
    environment tokens (their byte tail restarts). Returns (state updates, events: `opened`,
    `closed`, `answered`, `stopped` [N] bool, `qmask` [N, Lq] the query's tokens)."""
    Lq, W = self.config.max_query_tokens, TAIL_BYTES
    env, out = self.env, {}
    stopped = is_policy & jnp.any(tok[:, None] == self.stop_ids[None, :], axis=-1)
    regular = ~jnp.any(tok[:, None] == self.special[None, :], axis=-1)
    add = is_policy & s["in_search"] & regular & (s["qcount"] < Lq)
    slot_of = add[:, None] & (jnp.arange(Lq)[None, :] == s["qcount"][:, None])   # [N, Lq]
    if self.text:
      # Append the token's bytes to the row's tail (env tokens clear it), then look for tags
      # completed by this token.
      nbytes = self.lengths_table[tok]                                       # [N]
      shift = jnp.minimum(nbytes, W)[:, None] + jnp.arange(W)[None, :]        # [N, W]
      older = jnp.take_along_axis(s["tail"], jnp.minimum(shift, W - 1), axis=1)
      appended = jnp.where(shift < W, older, self.tails_table[tok])     # right-aligned bytes
      tail = jnp.where(is_policy[:, None], appended,
                       jnp.where(reset[:, None], -1, s["tail"]))
      fresh = is_policy & (nbytes > 0)
      opened = fresh & self._ends_with(tail, "<search>")
      closed = fresh & self._ends_with(tail, "</search>")
      answered = fresh & self._ends_with(tail, "</answer>")
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
    qcount = jnp.where(opened, 0, s["qcount"] + add)
    qbuf = jnp.where(opened[:, None], 0, qbuf)
    in_search = s["in_search"] | opened
    qmask = jnp.arange(Lq)[None, :] < qcount[:, None]
    if self.text:   # only the tokens that end before `</search>` starts
      qmask &= qends <= (qbytes - len("</search>"))[:, None]
    out.update(qbuf=qbuf, in_search=in_search & ~closed, qcount=jnp.where(closed, 0, qcount))
    events = dict(opened=opened, closed=closed, answered=answered, stopped=stopped, qmask=qmask,
                  was_in_search=in_search)
    return out, events

  def respond(self, s: dict, out: dict, events: dict, tool_state, corpus: TokenizedCorpus,
              width: int) -> dict:
    """Queues the response of every row that closed a search (passages, "invalid" or "no
    searches left"), records the retrieved ids and counts; returns the state updates."""
    config, env = self.config, self.env
    n, S, K = s["qlen"].shape[0], config.max_searches, config.top_k
    closed, qmask = events["closed"], events["qmask"]
    valid = closed & events["was_in_search"] & jnp.any(qmask, axis=-1)
    do_search = valid & (s["searches"] < S)

    def retrieve(_):
      ids, _ = self.retrieve_fn(tool_state, out["qbuf"], qmask & do_search[:, None])
      ids = ids.astype(jnp.int32)
      block, blen = information_block(corpus, ids, env, width)
      return ids, block, blen

    def skip(_):
      return (jnp.zeros((n, K), jnp.int32), jnp.zeros((n, width), jnp.int32),
              jnp.zeros((n,), jnp.int32))

    ids, block, blen = jax.lax.cond(jnp.any(do_search), retrieve, skip, None)
    invalid_block, invalid_len = _static_block(env.invalid_block, n, width)
    budget_block, budget_len = _static_block(env.budget_block, n, width)
    over = valid & ~do_search
    msg = jnp.where(over[:, None], budget_block, invalid_block)
    msg_len = jnp.where(over, budget_len, invalid_len)
    new_block = jnp.where(do_search[:, None], block, msg)
    new_len = jnp.where(do_search, blen, msg_len)
    rows = jnp.arange(n)
    slot = jnp.minimum(s["searches"], S - 1)
    retrieved = s["retrieved"].at[rows, slot].set(
        jnp.where(do_search[:, None], ids, s["retrieved"][rows, slot]))
    return dict(queue=jnp.where(closed[:, None], new_block, s["queue"]),
                qlen=jnp.where(closed, new_len, s["qlen"]),
                searches=s["searches"] + do_search, invalid=s["invalid"] + (closed & ~do_search),
                retrieved=retrieved)

  @staticmethod
  def status(s: dict, answered, stopped, truncated):
    status = jnp.where(answered, EpisodeStatus.ANSWERED, s["status"])
    status = jnp.where(stopped, EpisodeStatus.STOPPED, status)
    return jnp.where(truncated, EpisodeStatus.TRUNCATED, status)

  @staticmethod
  def result(state: dict) -> Rollout:
    return Rollout(
        tokens=state["tokens"], policy_mask=state["policy_mask"], env_mask=state["env_mask"],
        turn_ids=state["turn_ids"], logp=state["logp"], lengths=state["lengths"],
        num_searches=state["searches"], invalid_searches=state["invalid"],
        retrieved=state["retrieved"], status=state["status"],
    )


def make_rollout_fn(
    config: RolloutConfig,
    env: EnvTokens,
    decode_fn: DecodeFn,
    init_cache_fn: Callable[[int, int], Any],
    retrieve_fn: RetrieveFn,
    *,
    return_stats: bool = False,
) -> Callable[..., Rollout]:
  """Builds the pure multi-turn rollout (`config.engine` picks the engine).

  "chunked" (the default): every row keeps its own length, RoPE positions and KV-cache slots.
  The prompt and every environment response (passages, "invalid search", "no searches left")
  are fed to the model in chunks of up to `config.prefill_chunk` tokens (one model call writes
  many tokens, and only the last one's logits are computed); only the policy's tokens are
  decoded one at a time. A chunk call runs once at least `config.prefill_when` of the active
  rows wait for their response (or no row can decode); the decoding rows write their one
  token in it too, so no row ever stalls while another waits. Between chunk calls, waiting
  rows sit out the one-token calls. A high fraction batches the responses of many rows into
  one chunk call (best where a chunk call costs many one-token calls: compute-bound CPUs); a
  low one keeps every row moving (best where a chunk costs about what a one-token call costs:
  bandwidth-bound accelerators).
  "token": the reference engine: every row advances one token per model call from position 0,
  prompt and responses included, so every row shares one cache index.

  Both give the same episodes for the same sampled tokens (greedy: identical), with the same
  masks, turn ids, statuses and retrieved ids; the chunked engine needs far fewer sequential
  model calls when the environment writes most of the tokens.

  Args:
    config: sampling, budget and engine settings.
    env: the protocol's token ids.
    decode_fn: the policy's decode with a KV cache, `(params, tokens [N, C], cache, index,
      positions=None, kv_mask=None, logits_at=None) -> (logits, cache)` (index [] or [N];
      `jaxsearch.models.transformer.make_decode_fn`); the token engine needs only the first
      four arguments.
    init_cache_fn: `(batch_size, max_len) -> cache`.
    retrieve_fn: the in-graph search tool.
    return_stats: the function also returns `{"model_calls": [], "chunk_calls": []}` int32.

  Returns:
    `rollout_fn(params, tool_state, corpus, prompts [N, P], prompt_lens [N], rng) -> Rollout`
    (`(Rollout, stats)` with `return_stats`), pure and jittable (the caller jits it); rows are
    `G` copies of each prompt when the caller repeats prompts.

  Example:
    >>> rollout_fn = jax.jit(make_rollout_fn(cfg, env, decode_fn, init_cache_fn, retrieve_fn))
    >>> rollout = rollout_fn(params, bm25_index, corpus, prompts, prompt_lens, jax.random.key(0))
  """
  environment = _Environment(config, env, retrieve_fn)
  make = _chunked_engine if config.engine == "chunked" else _token_engine
  rollout_fn = make(config, environment, decode_fn, init_cache_fn)
  if return_stats:
    return rollout_fn

  def without_stats(*args):
    return rollout_fn(*args)[0]

  return without_stats


def _token_engine(config: RolloutConfig, e: _Environment, decode_fn, init_cache_fn):
  T = config.max_len
  env = e.env

  def rollout_fn(params, tool_state, corpus: TokenizedCorpus, prompts, prompt_lens, rng):
    n, p = prompts.shape
    width = max(p, block_width(corpus.tokens.shape[1], config.top_k, env))
    zeros_i = jnp.zeros((n,), jnp.int32)
    state = e.init_state(n, prompts, prompt_lens, width, rng)
    state.update(t=jnp.zeros([], jnp.int32), cache=init_cache_fn(n, T),
                 logits=jnp.zeros((n, 1), jnp.float32))  # replaced after the first step

    def step(s):
      t = s["t"]
      forced = s["qpos"] < s["qlen"]
      active = ~s["done"]
      if s["logits"].shape[-1] > 1:
        sampled, sampled_logp = e.sample(s, jnp.full((n,), t, jnp.int32))
      else:  # first step: every row is forced (prompts are non-empty)
        sampled, sampled_logp = zeros_i, jnp.zeros((n,), jnp.float32)
      forced_tok = jnp.take_along_axis(
          s["queue"], jnp.minimum(s["qpos"], width - 1)[:, None], 1)[:, 0]
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
      read, ev = e.read(s, tok, is_policy, active & forced)
      out.update(read)
      out.update(e.respond(s, read, ev, tool_state, corpus, width))
      ended = ev["answered"] | ev["stopped"]
      truncated = active & ~ended & (t == T - 1)
      logits, cache = decode_fn(params, tok[:, None], s["cache"], t)
      out.update(
          t=t + 1, cache=cache, logits=logits[:, 0].astype(jnp.float32),
          qpos=jnp.where(ev["closed"], 0, s["qpos"] + (active & forced)),
          done=s["done"] | ended | truncated,
          status=e.status(s, ev["answered"], ev["stopped"], truncated),
      )
      return {**s, **out}

    # The first step has no logits to sample from; run it outside the loop so the loop carry
    # has a fixed [N, V] logits shape.
    state = step(state)
    state = jax.lax.while_loop(lambda s: (s["t"] < T) & ~jnp.all(s["done"]), step, state)
    return e.result(state), dict(model_calls=state["t"], chunk_calls=jnp.zeros([], jnp.int32))

  return rollout_fn


def _chunked_engine(config: RolloutConfig, e: _Environment, decode_fn, init_cache_fn):
  T = config.max_len
  C = min(config.prefill_chunk, T)        # a call never writes more than the cache holds
  env = e.env

  def rollout_fn(params, tool_state, corpus: TokenizedCorpus, prompts, prompt_lens, rng):
    n, p = prompts.shape
    width = max(p, block_width(corpus.tokens.shape[1], config.top_k, env))
    rows = jnp.arange(n)
    state = e.init_state(n, prompts, prompt_lens, width, rng)
    state.update(cache=init_cache_fn(n, T), calls=jnp.zeros([], jnp.int32),
                 chunk_calls=jnp.zeros([], jnp.int32),
                 logits=jnp.zeros((n, 1), jnp.float32))  # replaced after the first call

    def advance(s, w: int):
      """One model call of width `w`: every decoding row writes its sampled token, every row
      with queued environment tokens (when `w > 1`) up to `w` of them; the others wait."""
      active = ~s["done"]
      pos = s["lengths"]                                            # [N] next slot
      pending = active & (s["qpos"] < s["qlen"])
      decoding = active & ~pending
      if s["logits"].shape[-1] > 1:
        sampled, sampled_logp = e.sample(s, pos)
      else:  # the prompt call: no row decodes
        sampled, sampled_logp = jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.float32)
      j = jnp.arange(w)[None, :]                                    # [1, w]
      n_forced = (jnp.where(pending, jnp.minimum(s["qlen"] - s["qpos"], T - pos), 0)
                  if w > 1 else jnp.zeros((n,), jnp.int32))
      n_forced = jnp.minimum(n_forced, w)
      count = jnp.where(decoding, 1, n_forced)                      # [N] tokens this call
      keep = j < count[:, None]                                     # [N, w]
      forced_chunk = jnp.take_along_axis(
          s["queue"], jnp.minimum(s["qpos"][:, None] + j, width - 1), axis=1)
      chunk = jnp.where(decoding[:, None], jnp.where(j == 0, sampled[:, None], env.pad),
                        forced_chunk)
      chunk = jnp.where(keep, chunk, env.pad)
      fed = n_forced > 0
      turn = jnp.where(decoding & s["prev_forced"], s["turn"] + 1, s["turn"])
      cols = jnp.where(keep, pos[:, None] + j, T)                   # T: dropped

      def put(buf, v):
        return buf.at[rows[:, None], cols].set(jnp.broadcast_to(v, cols.shape).astype(buf.dtype),
                                               mode="drop")

      out = dict(
          tokens=put(s["tokens"], chunk),
          policy_mask=put(s["policy_mask"], decoding[:, None]),
          env_mask=put(s["env_mask"], (fed & (turn > 0))[:, None]),
          turn_ids=put(s["turn_ids"], turn[:, None]),
          logp=put(s["logp"], jnp.where(decoding, sampled_logp, 0.0)[:, None]),
          lengths=pos + count,
          prev_forced=jnp.where(decoding, False, jnp.where(fed, True, s["prev_forced"])),
          turn=turn,
      )
      tok = jnp.where(decoding, sampled, env.pad)
      read, ev = e.read(s, tok, decoding, fed)
      out.update(read)
      out.update(e.respond(s, read, ev, tool_state, corpus, width))
      ended = ev["answered"] | ev["stopped"]
      truncated = active & ~ended & (pos + count >= T)
      logits, cache = decode_fn(params, chunk, s["cache"], pos,
                                positions=pos[:, None] + j,
                                logits_at=jnp.maximum(count - 1, 0))
      logits = logits.astype(jnp.float32)
      if s["logits"].shape[-1] > 1:
        logits = jnp.where((count > 0)[:, None], logits, s["logits"])
      out.update(
          cache=cache, logits=logits,
          qpos=jnp.where(ev["closed"], 0, s["qpos"] + n_forced),
          done=s["done"] | ended | truncated,
          status=e.status(s, ev["answered"], ev["stopped"], truncated),
          calls=s["calls"] + 1, chunk_calls=s["chunk_calls"] + (w > 1),
      )
      return {**s, **out}

    # The prompts, in one call of their padded width (it fixes the [N, V] logits' shape).
    state = advance(state, min(max(p, 2), T))

    def step(s):
      active = ~s["done"]
      pending = active & (s["qpos"] < s["qlen"])
      waiting = jnp.sum(pending)
      chunk_now = (waiting > 0) & ((waiting >= config.prefill_when * jnp.sum(active))
                                   | ~jnp.any(active & ~pending))
      return jax.lax.cond(chunk_now, lambda s: advance(s, C), lambda s: advance(s, 1), s)

    state = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), step, state)
    return e.result(state), dict(model_calls=state["calls"], chunk_calls=state["chunk_calls"])

  return rollout_fn
