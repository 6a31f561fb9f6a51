"""Prompts and demonstration trajectories for the search agent.

A prompt is `<bos>Question: {question}` followed, for a closed-book baseline, by `<answer>`.
A demonstration is what a *noisy teacher* does on a question, written in the same token stream
the rollout produces: `<search> query </search>` (policy tokens), the environment's
`<information> ... </information>` block built by the same in-graph retriever and block builder
the rollout uses (environment tokens), and finally `<answer> text </answer>`.

The teacher follows the ideal search plan of the question (one search per hop, then the gold
answer) but has two bad habits of weak agents: with `no_search_prob` it answers at once from
"memory" (a guess of the right type, wrong almost always because the world's facts are random),
and on a multi-hop question it stops after an intermediate hop with `stop_early_prob` and
answers the entity found so far (the bridge entity: the classic multi-hop error). A policy
warm-started on these knows the format and how to search and copy, and inherits the bad habits;
with `stop_early_prob > 0.5` stopping early is its most likely action after the first hop, so
its greedy answers to multi-hop questions are wrong. RL can remove both habits: the reward only
pays for the right final answer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from jaxsearch.data import prompts as prompts_lib
from jaxsearch.data.prompts import PromptConfig
from jaxsearch.data.world import Question, World
from jaxsearch.types import SequenceBatch

PROMPT_TEMPLATE = prompts_lib.PLAIN_TEMPLATE


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherConfig:
  """How noisy the demonstrating teacher is.

  Attributes:
    no_search_prob: probability of answering a question at once with a guess.
    stop_early_prob: on a multi-hop question, probability of stopping after each intermediate
      hop and answering the bridge entity found by that hop.
    seed: seeds the teacher's choices and guesses.
  """

  no_search_prob: float = 0.1
  stop_early_prob: float = 0.8
  seed: int = 0

  def __post_init__(self):
    for name in ("no_search_prob", "stop_early_prob"):
      v = getattr(self, name)
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"TeacherConfig.{name} must be in [0, 1], got {v}")


def prompt_ids(tokenizer: Any, question: Question, prompt: PromptConfig | None = None, *,
               protocol: str = "special", closed_book: bool = False,
               information: Sequence[int] | None = None) -> list[int]:
  """The prompt of one question (`jaxsearch.data.prompts.prompt_ids`); with the default
  plain style `<bos>` and the tokens of `PROMPT_TEMPLATE`. `information` (a retrieved
  `<information>` block's ids) makes it the RAG baseline's prompt."""
  return prompts_lib.prompt_ids(tokenizer, question.question, prompt, protocol=protocol,
                                closed_book=closed_book, information=information)


def encode_prompts(
    tokenizer: Any, questions: Sequence[Question], *, closed_book: bool = False,
    prompt: PromptConfig | None = None, protocol: str = "special",
    information: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes questions into right-padded prompts.

  Args:
    tokenizer: a `jaxsearch.data.tokenizer.Tokenizer`.
    questions: the questions.
    closed_book: end with `<answer>` so the policy must answer without searching.
    prompt: the prompt settings (default `PromptConfig()`).
    protocol: "special" or "text" (see `jaxsearch.data.prompts`).
    information: per question, the `<information>` block of the RAG baseline's prompt
      (None: no block).

  Returns:
    `(prompts [N, P] int32, lengths [N] int32)`, padded with `tokenizer.pad_id`.
  """
  if information is not None and len(information) != len(questions):
    raise ValueError(f"information must hold one block per question ({len(questions)}), got "
                     f"{len(information)}")
  blocks = [None] * len(questions) if information is None else information
  return pad_sequences([prompt_ids(tokenizer, q, prompt, protocol=protocol,
                                   closed_book=closed_book, information=b)
                        for q, b in zip(questions, blocks)], tokenizer.pad_id)


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads id lists into `(array [N, width] int32, lengths [N] int32)`."""
  lengths = np.array([len(s) for s in seqs], np.int32)
  width = int(lengths.max(initial=1)) if width is None else width
  if len(seqs) and lengths.max() > width:
    raise ValueError(f"a sequence of {lengths.max()} tokens does not fit width {width}")
  out = np.full((len(seqs), width), pad_id, np.int32)
  for i, s in enumerate(seqs):
    out[i, : len(s)] = s
  return out, lengths


def teacher_plan(question: Question, world: World, config: TeacherConfig,
                 rng: np.random.Generator) -> tuple[list[str], str]:
  """The teacher's searches and final answer for one question.

  Returns:
    `(queries, answer)`: the search queries in order (possibly fewer than the question's hops)
    and the answer text: the gold answer after a full plan, the bridge entity after stopping
    early, a guess of the right type without searching.
  """
  def guess() -> str:
    return str(rng.choice(world.answer_values(question.kind)))

  if rng.random() < config.no_search_prob:
    return [], guess()
  queries = []
  for hop, query in enumerate(question.search_queries):
    queries.append(query)
    if hop < question.hops - 1 and rng.random() < config.stop_early_prob:
      return queries, question.bridge_answers[hop]
  return queries, question.answers[0]


# respond_fn(list of query texts) -> list of environment blocks (token-id lists) and retrieved
# doc-index lists, as the rollout's environment would answer them.
RespondFn = Callable[[Sequence[str]], tuple[list[list[int]], list[list[int]]]]


def build_demonstrations(
    world: World,
    questions: Sequence[Question],
    tokenizer: Any,
    respond_fn: RespondFn,
    config: TeacherConfig,
    *,
    max_len: int,
    prompt: PromptConfig | None = None,
    protocol: str = "special",
) -> tuple[SequenceBatch, dict[str, float]]:
  """Builds teacher trajectories as token sequences with a loss mask on the policy's tokens.

  Args:
    world: the world (for guesses of the right answer type).
    questions: the questions to demonstrate.
    tokenizer: the policy's tokenizer.
    respond_fn: answers a batch of queries exactly as the rollout's environment does.
    config: the teacher's noise.
    max_len: T; demonstrations longer than this raise.
    prompt: the prompt settings (default `PromptConfig()`).
    protocol: how tags are written: "special" (one id each) or "text".

  Returns:
    `(SequenceBatch(tokens [N, T], loss_mask [N, T]), stats)`, stats holding the fraction of
    full plans, the mean number of searches and the fraction of searches whose supporting
    document was retrieved.
  """
  rng = np.random.default_rng(config.seed)
  plans = [teacher_plan(q, world, config, rng) for q in questions]
  all_queries = [query for queries, _ in plans for query in queries]
  blocks, retrieved = respond_fn(all_queries) if all_queries else ([], [])
  seqs, masks, hits, full = [], [], [], 0
  cursor = 0
  for q, (queries, answer) in zip(questions, plans):
    ids = prompt_ids(tokenizer, q, prompt, protocol=protocol)
    mask = [False] * len(ids)
    for hop, query in enumerate(queries):
      action = prompts_lib.tagged_ids(tokenizer, protocol, "search", query)
      ids += action + blocks[cursor]
      mask += [True] * len(action) + [False] * len(blocks[cursor])
      if hop < len(q.supporting_doc_ids):   # questions from QA files name none
        hits.append(world.doc_index(q.supporting_doc_ids[hop]) in retrieved[cursor])
      cursor += 1
    action = prompts_lib.tagged_ids(tokenizer, protocol, "answer", answer)
    ids += action
    mask += [True] * len(action)
    full += len(queries) == q.hops and answer == q.answers[0]
    if len(ids) > max_len:
      raise ValueError(f"a demonstration of question {q.qid!r} has {len(ids)} tokens, more than "
                       f"max_len={max_len}: raise the rollout's max_len or shorten passages")
    seqs.append(ids)
    masks.append(mask)
  tokens, _ = pad_sequences(seqs, tokenizer.pad_id, max_len)
  loss_mask = np.zeros_like(tokens, dtype=bool)
  for i, m in enumerate(masks):
    loss_mask[i, : len(m)] = m
  stats = {
      "full_plan_fraction": full / max(len(questions), 1),
      "searches_per_demo": len(all_queries) / max(len(questions), 1),
      "teacher_retrieval_hit_rate": float(np.mean(hits)) if hits else 0.0,
  }
  return SequenceBatch(tokens=tokens, loss_mask=loss_mask), stats
