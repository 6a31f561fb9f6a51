"""Benchmark: jaxsearch's one-program search rollout against a host-loop rollout.

jaxsearch runs a whole multi-turn search episode as ONE compiled program
(`jaxsearch.rollout.search_env.make_rollout_fn`: generation, query parsing, in-graph BM25 and the
insertion of the `<information>` block all inside one `lax.while_loop`). The peers (Search-R1 on
verl, TRL) run a host loop instead. This file implements that host loop in JAX, with the same
model and parameters, so that the comparison isolates the rollout design:

  for each turn, until every episode has ended:
    (a) one jitted KV-cache generation call: prefill of the whole conversation so far (right
        padded to a multiple of 32 tokens, so only a few shapes are ever compiled), then a
        `lax.while_loop` decode until every still-active row has emitted `</search>`,
        `</answer>` or `<eos>`, or has run out of length. Rows keep their own positions
        (`Transformer.decode` vmapped over rows, one cache index per row), as HF / vLLM
        generation does;
    (b) on the host: copy the tokens back, find each row's query after its last `<search>` and
        decode it to text with the tokenizer;
    (c) retrieve with `bm25s` on the host (an index over the words of the same passage texts,
        `jaxsearch.programs.search_agent.experiment.passage_text`), tokenize the retrieved passages into an
        `<information>` block, append it, and go back to (a) (re-prefilling everything).

Both implementations decode greedily (temperature 0) with the same parameters: a policy
warm-started by a few hundred steps of SFT on the teacher's demonstrations (as
`jaxsearch.programs.search_agent.loop.warm_start` does, `--sft_steps`), so episodes really search. The host loop
mirrors the in-graph environment's rules exactly (query = the first `max_query_tokens` regular
tokens after the last `<search>`, invalid / over-budget searches answered with the same
messages, the same truncation at `max_len`), so its episodes equal the in-graph ones whenever
both retrievers return the same passages. They need not: the in-graph BM25 scores the policy's
token ids, bm25s scores words. The benchmark therefore also runs the host loop once with the
in-graph BM25 (the same jitted scorer, called from the host on the query ids) to check that the
generation itself is identical, and reports both fractions of identical episodes.

Timing: each implementation is called once cold (compilation included; for the host loop this
compiles one prefill per length bucket met and the decode loop) and then `--repeats` times, the
warm calls of the two interleaved; `steady_s` is the median of the warm calls,
`compile_s = first_call_s - steady_s`, and `host_loop_over_in_graph_time` the median over the
warm pairs of the ratio of their times. Every call
includes bringing the finished episodes to the host as numpy arrays. `tokens_per_s` counts all
episode tokens (prompt, policy and environment tokens; what a trainer then scores);
`generated_tokens_per_s` counts the policy's tokens only. Neither implementation drops finished
rows from the batch. `host_loop.breakdown_s` splits a warm host-loop call into device work
(prefill + decode + copy back), host retrieval, and the rest of the host environment.

What decides the result is the token mix. The one-program rollout feeds every token, forced
ones included (the prompt and each `<information>` block), through one-token decode steps, so it
runs about `max(lengths)` sequential steps (`sequential_decode_steps`); the host loop prefills
forced tokens in one parallel call per turn and decodes only what the policy writes. Search
episodes are mostly environment tokens (`mean_env_tokens_per_episode` against
`mean_policy_tokens_per_episode`), which favours prefilling; the host loop pays instead for a
device->host round trip, host parsing and retrieval, and a full re-prefill on every turn: it
processes more tokens in all (every turn re-reads the conversation, padded to its bucket, and
the prefill computes logits at every position), but in far fewer sequential steps. Where the
device is compute-bound (a small CPU) the total work decides; where each decode step is
latency-bound (an accelerator with a small model) the number of sequential steps does.

Usage:
  python benchmarks/rollout.py [--json OUT] [--batch 64] [--repeats 3] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DISABLE_TQDM", "1")

import bm25s  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxsearch.metrics import write_json  # noqa: E402
from jaxsearch.data import demos  # noqa: E402
from jaxsearch.data.world import WorldConfig  # noqa: E402
from jaxsearch.models.transformer import (KVCache, Transformer, TransformerConfig,  # noqa: E402
                                          init_cache)
from jaxsearch.retrieval.tool import make_bm25_retrieve_fn  # noqa: E402
from jaxsearch.rewards.qa import exact_match, extract_answer  # noqa: E402
from jaxsearch.rollout.sampling import sample_logits  # noqa: E402
from jaxsearch.rollout.search_env import (BUDGET_MESSAGE, INVALID_SEARCH_MESSAGE,  # noqa: E402
                                          EpisodeStatus, RolloutConfig)
from jaxsearch.programs.search_agent.experiment import Experiment, RunConfig, passage_text, setup  # noqa: E402
from jaxsearch.train.optim import make_optimizer  # noqa: E402
from jaxsearch.train.state import TrainState  # noqa: E402
from jaxsearch.train.steps import make_sft_update_fn  # noqa: E402
from jaxsearch.types import PyTree, Rollout, SequenceBatch  # noqa: E402

PREFILL_MULTIPLE = 32
ROLLOUT_FIELDS = ("tokens", "policy_mask", "env_mask", "turn_ids", "lengths", "num_searches",
                  "invalid_searches", "retrieved", "status")


# ------------------------------------------------------------------------------------------
# Configurations.
# ------------------------------------------------------------------------------------------


def run_config(smoke: bool, seed: int = 0) -> RunConfig:
  """The benchmarked agent: the quickstart's tiny model and world, or a smaller one (`smoke`)."""
  if smoke:
    world = WorldConfig(seed=seed, num_people=60, num_distractors=20, train_size=100,
                        validation_size=10, test_size=16)
    model = TransformerConfig(vocab_size=768, d_model=32, num_layers=1, num_heads=4,
                              num_kv_heads=2, mlp_dim=64, max_len=128)
    rollout = RolloutConfig(max_len=128, max_searches=3, top_k=2)
    vocab = 768
  else:  # gin/models/tiny.gin + gin/runs/train.gin
    world = WorldConfig(seed=seed)
    model = TransformerConfig(vocab_size=768, d_model=128, num_layers=2, num_heads=4,
                              num_kv_heads=2, mlp_dim=384, max_len=256)
    rollout = RolloutConfig(max_len=192, max_searches=3, top_k=2)
    vocab = 768
  return RunConfig(seed=seed, world=world, model=model, rollout=rollout,
                   tokenizer_vocab_size=vocab, eval_temperature=0.0)


def train_policy(exp: Experiment, *, steps: int, batch_size: int, num_demos: int) -> PyTree:
  """Fresh parameters warm-started by `steps` SFT steps on teacher demonstrations.

  The same recipe as `jaxsearch.programs.search_agent.loop.warm_start` (without checkpoints or logging).

  Returns:
    The policy's parameters.
  """
  params, _ = exp.init_params(jax.random.fold_in(jax.random.key(exp.config.seed), 0))
  if steps == 0:
    return params
  train_qs = exp.world.splits["train"]
  qs = [train_qs[i % len(train_qs)] for i in range(num_demos)]
  data, _ = demos.build_demonstrations(exp.world, qs, exp.tokenizer, exp.respond,
                                       exp.config.sft.teacher, max_len=exp.config.rollout.max_len)
  state = TrainState.create(apply_fn=exp.apply_fn, params=params,
                            tx=make_optimizer(exp.config.sft.optimizer))
  update = jax.jit(make_sft_update_fn(exp.apply_fn), donate_argnums=0)
  lengths = np.sum(np.cumsum(data.tokens[:, ::-1] != exp.tokenizer.pad_id, 1) > 0, 1)
  n, width_max = data.tokens.shape
  for step in range(steps):
    epoch, pos = divmod(step * batch_size, n)
    order = np.random.default_rng([exp.config.seed, 1, epoch]).permutation(n)
    idx = np.take(order, np.arange(pos, pos + batch_size), mode="wrap")
    width = _bucket(int(lengths[idx].max()), width_max, 64)  # few shapes: few compiles
    state, _ = update(state, SequenceBatch(jnp.asarray(data.tokens[idx, :width]),
                                           jnp.asarray(data.loss_mask[idx, :width])))
  return jax.block_until_ready(state.params)


def _bucket(length: int, max_len: int, multiple: int = PREFILL_MULTIPLE) -> int:
  return min(max_len, -(-length // multiple) * multiple)


# ------------------------------------------------------------------------------------------
# Host-side retrievers: `(query texts, query ids) -> doc indices [Q, K]`.
# ------------------------------------------------------------------------------------------


class Bm25sWordRetriever:
  """bm25s over the words of the passage texts (lowercased, English stopwords removed).

  This is what a host loop plugs in: the policy's query is decoded to text and retrieved by
  words, as a Search-R1 retrieval server does.
  """

  def __init__(self, passages: Sequence[str], k: int):
    self.k = k
    self.index = bm25s.BM25()
    self.index.index(bm25s.tokenize(list(passages), stopwords="en", show_progress=False),
                     show_progress=False)

  def __call__(self, texts: Sequence[str], query_ids: Sequence[Sequence[int]]) -> np.ndarray:
    del query_ids
    words = bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)
    docs, _ = self.index.retrieve(words, k=self.k, sorted=True, show_progress=False,
                                  n_threads=0)
    return np.asarray(docs, np.int32)                             # [Q, K]


class InGraphBm25Retriever:
  """The rollout's own BM25 over token ids, called from the host on the query's ids.

  Used to check that the host loop generates exactly what the one-program rollout generates
  when retrieval agrees. Queries are padded to a fixed `[batch, max_query_tokens]` shape.
  """

  def __init__(self, exp: Experiment, batch: int):
    cfg = exp.config.rollout
    self.batch, self.lq, self.pad = batch, cfg.max_query_tokens, exp.tokenizer.pad_id
    retrieve = make_bm25_retrieve_fn(exp.model.config.vocab_size, cfg.top_k, exp.env.special_ids)
    self._index = exp.tool.index
    self._fn = jax.jit(lambda index, q, m: retrieve(index, q, m)[0])

  def __call__(self, texts: Sequence[str], query_ids: Sequence[Sequence[int]]) -> np.ndarray:
    del texts
    q, qlen = demos.pad_sequences([list(x)[: self.lq] for x in query_ids], self.pad, self.lq)
    out = []
    for start in range(0, len(q), self.batch):
      chunk = q[start: start + self.batch]
      rows = len(chunk)
      chunk = np.pad(chunk, ((0, self.batch - rows), (0, 0)), constant_values=self.pad)
      lens = np.pad(qlen[start: start + self.batch], (0, self.batch - rows))
      mask = np.arange(self.lq)[None, :] < lens[:, None]
      out.append(np.asarray(self._fn(self._index, jnp.asarray(chunk), jnp.asarray(mask)))[:rows])
    return np.concatenate(out, 0) if out else np.zeros((0, 0), np.int32)


# ------------------------------------------------------------------------------------------
# The host-loop rollout.
# ------------------------------------------------------------------------------------------


class Turn(NamedTuple):
  """One generation call's output, on the device."""

  tokens: jax.Array    # [N, T] int32, the conversation with this turn's tokens written
  lengths: jax.Array   # [N] int32, lengths after this turn
  logp: jax.Array      # [N, T] float32, log-probs of this turn's tokens (0 elsewhere)


def make_prefill_fn(model: Transformer, max_len: int) -> Callable:
  """`prefill(params, tokens [N, P], lengths [N]) -> (next logits [N, V], cache)`, pure.

  Runs the conversations (right-padded, positions 0..P-1) into a fresh `[L, N, Hkv, max_len, hd]`
  cache; the logits are those at each row's last real position. Pad positions write junk keys
  that the decode masks out (keys after a row's position are never attended) or overwrites.
  """

  def prefill(params, tokens, lengths):
    cache = init_cache(model.config, tokens.shape[0], max_len)
    logits, cache = model.apply({"params": params}, tokens, cache, jnp.int32(0),
                                method=Transformer.decode)               # [N, P, V]
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return last.astype(jnp.float32), cache

  return prefill


def make_generate_fn(model: Transformer, stop_ids: Sequence[int], max_len: int) -> Callable:
  """Greedy decode of one turn: `generate(params, cache, logits, tokens, lengths, active) -> Turn`.

  Each active row writes its greedy token at its own position `lengths[i]` and goes on until it
  emits one of `stop_ids` or reaches `max_len`; the loop ends when no row is active. Rows keep
  their own positions: `Transformer.decode` is vmapped over rows with one cache index each (the
  loop keeps the cache batch-major, `[N, L, Hkv, S, hd]`, so the vmapped decode costs about what a
  shared-index batched decode does). Pure; the caller jits it.
  """
  stop = jnp.asarray(stop_ids, jnp.int32)

  def decode_row(params, tok, k, v, pos):  # tok [], k/v [L, Hkv, S, hd], pos []
    logits, cache = model.apply({"params": params}, tok[None, None],
                                KVCache(k[:, None], v[:, None]), pos, method=Transformer.decode)
    return logits[0, 0], cache.k[:, 0], cache.v[:, 0]

  decode_rows = jax.vmap(decode_row, in_axes=(None, 0, 0, 0, 0), out_axes=0)

  def generate(params, cache, logits, tokens, lengths, active) -> Turn:
    rows = jnp.arange(tokens.shape[0])
    key = jax.random.key(0)  # unused by greedy sampling

    def cond(s):
      return jnp.any(s["active"])

    def body(s):
      tok, lp = sample_logits(key, s["logits"], temperature=0.0)
      act = s["active"]
      pos = jnp.minimum(s["lengths"], max_len - 1)
      tokens = s["tokens"].at[rows, pos].set(jnp.where(act, tok, s["tokens"][rows, pos]))
      logp = s["logp"].at[rows, pos].set(jnp.where(act, lp, s["logp"][rows, pos]))
      lengths = s["lengths"] + act
      hit = jnp.any(tok[:, None] == stop[None, :], axis=-1)
      still = act & ~hit & (lengths < max_len)
      next_logits, k, v = decode_rows(params, tok, s["k"], s["v"], pos)
      return dict(k=k, v=v, logits=next_logits.astype(jnp.float32), tokens=tokens, logp=logp,
                  lengths=lengths, active=still)

    s = dict(k=jnp.moveaxis(cache.k, 1, 0), v=jnp.moveaxis(cache.v, 1, 0), logits=logits,
             tokens=tokens, logp=jnp.zeros(tokens.shape, jnp.float32), lengths=lengths,
             active=active & (lengths < max_len))
    s = jax.lax.while_loop(cond, body, s)
    return Turn(tokens=s["tokens"], lengths=s["lengths"], logp=s["logp"])

  return generate


def make_host_loop_rollout(exp: Experiment, retriever: Callable, *, trace: list | None = None,
                           profile: dict | None = None) -> Callable[..., Rollout]:
  """The peers' rollout design: one generate call per turn, the environment on the host.

  Args:
    exp: the experiment (model, tokenizer, protocol tokens, rollout config, world).
    retriever: `(query texts, query ids) -> doc indices [Q, K]` on the host.
    trace: if given, `(query ids, doc ids)` of every answered search is appended to it.
    profile: if given, seconds are added to its "generate_s" (prefill + decode + copy to the
      host) and "retrieve_s" (query decoding + retrieval) entries.

  Returns:
    `rollout(params, prompts [N, P], prompt_lens [N]) -> Rollout` of numpy arrays, greedy,
    with the fields and conventions of `make_rollout_fn`'s `Rollout`.
  """
  cfg, env, tok = exp.config.rollout, exp.env, exp.tokenizer
  T, S, K, Lq = cfg.max_len, cfg.max_searches, cfg.top_k, cfg.max_query_tokens
  prefill = jax.jit(make_prefill_fn(exp.model, T))
  generate = jax.jit(make_generate_fn(exp.model, (env.search_close, env.answer_close, env.eos,
                                                   env.pad), T))
  special = set(env.special_ids)
  docs = exp.world.documents

  def block_of(doc_ids) -> list[int]:
    # Tokenized when retrieved, as a host loop does; one encode per passage, so the ids are
    # those of the in-graph corpus (`build_search_tool` encodes each passage alone).
    ids = [env.info_open]
    for d in doc_ids:
      ids += tok.encode(passage_text(docs[int(d)]))
    return ids + [env.info_close]

  def rollout(params, prompts, prompt_lens) -> Rollout:
    prompts, prompt_lens = np.asarray(prompts), np.asarray(prompt_lens, np.int32)
    n = prompts.shape[0]
    tokens = np.full((n, T), env.pad, np.int32)
    tokens[:, : prompts.shape[1]] = prompts[:, :T]
    lengths = prompt_lens.copy()
    policy_mask = np.zeros((n, T), bool)
    env_mask = np.zeros((n, T), bool)
    turn_ids = np.zeros((n, T), np.int32)
    logp = np.zeros((n, T), np.float32)
    status = np.zeros((n,), np.int32)
    done = np.zeros((n,), bool)
    searches = np.zeros((n,), np.int32)
    invalid = np.zeros((n,), np.int32)
    retrieved = np.full((n, S, K), -1, np.int32)
    turn = 0

    def append(i, block):  # environment tokens, cut at max_len
      s = int(lengths[i])
      block = block[: T - s]
      tokens[i, s: s + len(block)] = block
      env_mask[i, s: s + len(block)] = True
      turn_ids[i, s: s + len(block)] = turn
      lengths[i] = s + len(block)

    while not done.all():
      turn += 1
      active = ~done
      # (a) Prefill the whole conversation so far (bucketed width), then decode this turn.
      t0 = time.perf_counter()
      width = _bucket(int(lengths[active].max()), T)
      logits, cache = prefill(params, jnp.asarray(tokens[:, :width]),
                              jnp.asarray(np.clip(lengths, 1, width)))
      out = generate(params, cache, logits, jnp.asarray(tokens), jnp.asarray(lengths),
                     jnp.asarray(active))
      new_tokens, new_lengths, new_logp = (np.asarray(x) for x in out)
      if profile is not None:
        profile["generate_s"] = profile.get("generate_s", 0.0) + time.perf_counter() - t0
      # (b) Parse every active row's turn on the host.
      requests = []  # (row, query ids)
      for i in np.flatnonzero(active):
        s, e = int(lengths[i]), int(new_lengths[i])
        seg = new_tokens[i, s:e]
        tokens[i, s:e] = seg
        policy_mask[i, s:e] = True
        turn_ids[i, s:e] = turn
        logp[i, s:e] = new_logp[i, s:e]
        lengths[i] = e
        last = int(seg[-1])
        if last == env.answer_close:
          status[i], done[i] = EpisodeStatus.ANSWERED, True
        elif last in (env.eos, env.pad):
          status[i], done[i] = EpisodeStatus.STOPPED, True
        elif last == env.search_close:
          opens = np.flatnonzero(seg[:-1] == env.search_open)
          query = ([int(t) for t in seg[opens[-1] + 1: -1] if int(t) not in special][:Lq]
                   if len(opens) else [])
          if query and searches[i] < S:
            requests.append((i, query))
          else:
            invalid[i] += 1
            append(i, [env.info_open, *tok.encode(BUDGET_MESSAGE if query else
                                                  INVALID_SEARCH_MESSAGE), env.info_close])
        else:  # out of length
          status[i], done[i] = EpisodeStatus.TRUNCATED, True
      # (c) Retrieve on the host (one batched call per turn), tokenize the blocks, append them.
      if requests:
        t0 = time.perf_counter()
        doc_ids = retriever([tok.decode(q) for _, q in requests], [q for _, q in requests])
        if profile is not None:
          profile["retrieve_s"] = profile.get("retrieve_s", 0.0) + time.perf_counter() - t0
        for (i, query), ids in zip(requests, doc_ids):
          retrieved[i, searches[i]] = ids
          searches[i] += 1
          if trace is not None:
            trace.append((query, [int(d) for d in ids]))
          append(i, block_of(ids))
      # Rows at max_len end here (a `</search>` in the last position still counts as a search,
      # as in-graph, but its block does not fit).
      for i in np.flatnonzero(~done & (lengths >= T)):
        status[i], done[i] = EpisodeStatus.TRUNCATED, True
    return Rollout(tokens=tokens, policy_mask=policy_mask, env_mask=env_mask, turn_ids=turn_ids,
                   logp=logp, lengths=lengths, num_searches=searches, invalid_searches=invalid,
                   retrieved=retrieved, status=status)

  return rollout


# ------------------------------------------------------------------------------------------
# Comparison and timing.
# ------------------------------------------------------------------------------------------


def identical_rows(a: Rollout, b: Rollout) -> np.ndarray:
  """[N] bool: rows whose episodes are the same (tokens, masks, turns, counters, status).

  Log-probs are compared separately (`max_logp_diff`): they are floats.
  """
  a, b = jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b)
  same = np.ones(a.lengths.shape, bool)
  for name in ROLLOUT_FIELDS:
    x, y = getattr(a, name), getattr(b, name)
    same &= (x == y).reshape(x.shape[0], -1).all(axis=1)
  return same


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def _speed(first: float, times: list[float], rollout: Rollout) -> dict[str, float]:
  steady = statistics.median(times)
  n = rollout.lengths.shape[0]
  return {
      "first_call_s": first,
      "compile_s": max(first - steady, 0.0),
      "steady_s": steady,
      "steady_all_s": times,
      "episodes_per_s": n / steady,
      "tokens_per_s": float(np.sum(rollout.lengths)) / steady,
      "generated_tokens_per_s": float(np.sum(rollout.policy_mask)) / steady,
  }


def _episode_stats(rollout: Rollout, prompt_lens, questions, tokenizer) -> dict[str, float]:
  r = jax.tree.map(np.asarray, rollout)
  answers = [extract_answer(tokenizer.decode(r.tokens[i, prompt_lens[i]: r.lengths[i]].tolist()))
             for i in range(r.lengths.shape[0])]
  return {
      "mean_episode_length": float(r.lengths.mean()),
      "mean_searches_per_episode": float(r.num_searches.mean()),
      "mean_invalid_searches_per_episode": float(r.invalid_searches.mean()),
      "mean_policy_tokens_per_episode": float(r.policy_mask.sum(axis=1).mean()),
      "mean_env_tokens_per_episode": float(r.env_mask.sum(axis=1).mean()),
      "answered_fraction": float(np.mean(r.status == EpisodeStatus.ANSWERED)),
      "exact_match": float(np.mean([exact_match(a, q.answers)
                                    for a, q in zip(answers, questions)])),
  }


def _load_note(load_before: float, load_after: float) -> str | None:
  cores = os.cpu_count() or 1
  if max(load_before, load_after) > 0.5 * cores:
    return (f"the 1-minute load average was {load_before:.1f} before and {load_after:.1f} after "
            f"the run on {cores} cores: other processes were using the CPU, so timings are "
            "noisy (compare the two implementations' ratio rather than absolute numbers)")
  return None


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
  """Builds the agent, warm-starts it, times both rollouts and compares their episodes."""
  load_before = os.getloadavg()[0]
  t0 = time.perf_counter()
  exp = setup(run_config(args.smoke, args.seed))
  setup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  params = train_policy(exp, steps=args.sft_steps, batch_size=args.sft_batch,
                        num_demos=args.sft_demos)
  sft_s = time.perf_counter() - t0

  split = exp.world.splits["test"]
  questions = [split[i % len(split)] for i in range(args.batch)]
  prompts, prompt_lens = exp.encode_prompts(questions)
  key = jax.random.key(args.seed)
  k = exp.config.rollout.top_k

  def in_graph():
    out = exp.eval_rollout_fn(params, exp.tool, jnp.asarray(prompts), jnp.asarray(prompt_lens), key)
    return jax.tree.map(np.asarray, out)

  words = Bm25sWordRetriever([passage_text(d) for d in exp.world.documents], k)
  trace: list = []
  profile: dict = {}
  host = make_host_loop_rollout(exp, words, trace=trace, profile=profile)
  host_same = make_host_loop_rollout(exp, InGraphBm25Retriever(exp, args.batch))

  def host_loop():
    return host(params, prompts, prompt_lens)

  # Cold calls (compilation), then warm calls interleaved A, B, A, B, ... so that a change in
  # the machine's load hits both implementations alike.
  ref, in_graph_first = _timed(in_graph)
  base, host_first = _timed(host_loop)
  queries = list(trace)                                  # the cold call's searches
  profile.clear()                                        # keep the warm calls only
  in_graph_times, host_times = [], []
  for _ in range(args.repeats):
    in_graph_times.append(_timed(in_graph)[1])
    host_times.append(_timed(host_loop)[1])
  in_graph_speed = _speed(in_graph_first, in_graph_times, ref)
  host_speed = _speed(host_first, host_times, base)
  # Where a warm host-loop call spends its time (means over the warm calls).
  breakdown = {k: v / args.repeats for k, v in sorted(profile.items())}
  breakdown["host_other_s"] = statistics.mean(host_times) - sum(breakdown.values())
  turns = int(base.turn_ids.max())
  same = host_same(params, prompts, prompt_lens)

  identical = identical_rows(base, ref)
  identical_same = identical_rows(same, ref)
  both = identical_same & ref.policy_mask.any(axis=1)
  logp_diff = float(np.max(np.abs(np.where(ref.policy_mask, same.logp - ref.logp, 0.0))[both])
                    ) if both.any() else 0.0
  in_graph_ids = InGraphBm25Retriever(exp, args.batch)(
      [], [q for q, _ in queries]) if queries else np.zeros((0, k), np.int32)
  agree = [list(ids) == list(ref_ids) for (_, ids), ref_ids in zip(queries, in_graph_ids.tolist())]
  top1 = [ids[0] == ref_ids[0] for (_, ids), ref_ids in zip(queries, in_graph_ids.tolist())]

  stats = _episode_stats(ref, prompt_lens, questions, exp.tokenizer)
  load_after = os.getloadavg()[0]
  mc = exp.model.config
  result = {
      "device": str(jax.devices()[0]),
      "device_kind": jax.devices()[0].device_kind,
      "backend": jax.default_backend(),
      "jax_version": jax.__version__,
      "bm25s_version": bm25s.__version__,
      "smoke": bool(args.smoke),
      "batch_size": args.batch,
      "repeats": args.repeats,
      "mean_episode_length": stats["mean_episode_length"],
      "mean_searches_per_episode": stats["mean_searches_per_episode"],
      # The one-program loop advances every row one token per step (prompt and information
      # blocks included) until the longest episode ends.
      "in_graph": {**in_graph_speed, **stats, "sequential_decode_steps": int(ref.lengths.max())},
      "host_loop": {**host_speed, **_episode_stats(base, prompt_lens, questions, exp.tokenizer),
                    "generate_calls_per_batch": turns, "retriever": "bm25s over words",
                    # One-token decode steps in a row: per turn, the longest generation.
                    "sequential_decode_steps": int(sum(
                        np.max(np.sum(base.policy_mask & (base.turn_ids == t), axis=1))
                        for t in range(1, turns + 1))),
                    "breakdown_s": breakdown},
      # Median over the interleaved warm pairs of host-loop time / in-graph time.
      "host_loop_over_in_graph_time": statistics.median(
          h / g for h, g in zip(host_times, in_graph_times)),
      "identical_fraction": float(identical.mean()),
      "identical_fraction_same_retriever": float(identical_same.mean()),
      "max_logp_diff_same_retriever": logp_diff,
      "retrieval_agreement": float(np.mean(agree)) if agree else None,
      "retrieval_top1_agreement": float(np.mean(top1)) if top1 else None,
      "num_host_searches": len(queries),
      "config": {
          "max_len": exp.config.rollout.max_len, "max_searches": exp.config.rollout.max_searches,
          "top_k": k, "num_docs": len(exp.world.documents), "vocab_size": mc.vocab_size,
          "d_model": mc.d_model, "num_layers": mc.num_layers, "mlp_dim": mc.mlp_dim,
          "params": int(sum(x.size for x in jax.tree.leaves(params))),
          "sft_steps": args.sft_steps, "sft_batch": args.sft_batch,
          "prefill_multiple": PREFILL_MULTIPLE, "temperature": 0.0,
      },
      "setup_s": setup_s,
      "sft_s": sft_s,
      "load_average": [load_before, load_after],
  }
  note = _load_note(load_before, load_after)
  if note:
    result["note"] = note
  return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None, help="also write the result dict here")
  parser.add_argument("--batch", type=int, default=None, help="episodes per batch (64; smoke 16)")
  parser.add_argument("--repeats", type=int, default=None, help="timed warm calls (3; smoke 1)")
  parser.add_argument("--smoke", action="store_true", help="tiny world and model, for tests")
  parser.add_argument("--sft_steps", type=int, default=None,
                      help="warm-start steps (300; smoke 80)")
  parser.add_argument("--sft_batch", type=int, default=None)
  parser.add_argument("--sft_demos", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  defaults = dict(batch=16, repeats=1, sft_steps=80, sft_batch=16, sft_demos=200) if args.smoke \
      else dict(batch=64, repeats=3, sft_steps=300, sft_batch=16, sft_demos=2000)
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  for name in ("batch", "repeats", "sft_batch", "sft_demos"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.sft_steps < 0:
    parser.error(f"--sft_steps must be >= 0, got {args.sft_steps}")

  result = run_benchmark(args)
  print(json.dumps(result, indent=2, sort_keys=True))
  if args.json:
    write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
