"""The in-graph search tool: passages tokenized once, a BM25 index over their token ids, and a
pure `retrieve_fn` the rollout calls inside its compiled loop."""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax

from jaxsearch.retrieval.bm25 import (BM25Config, BM25Index, TokenizedCorpus, bm25_search,
                                      build_bm25_index, query_bag, tokenize_corpus)


class SearchTool(NamedTuple):
  """What the rollout needs to answer searches (a pytree of arrays)."""

  corpus: TokenizedCorpus   # tokens [M, L] int32, lengths [M] int32: the passages as shown
  index: BM25Index          # weights [V, M] float32


def build_search_tool(
    passages: Sequence[str], tokenizer: Any, vocab_size: int, *,
    bm25: BM25Config = BM25Config(), ignore_ids: Sequence[int] = (), max_passage_tokens: int | None = None,
) -> SearchTool:
  """Tokenizes passages once and indexes their token ids with BM25.

  Args:
    passages: M passage texts, in document-index order.
    tokenizer: the policy's tokenizer (queries are policy tokens, so terms are its ids).
    vocab_size: V, the policy's vocabulary size (>= tokenizer.vocab_size).
    bm25: BM25 parameters.
    ignore_ids: ids that are never terms (pad, bos, eos, tags).
    max_passage_tokens: truncate passages to this many tokens (None: the longest passage).

  Returns:
    A `SearchTool`.
  """
  docs = [tokenizer.encode(p) for p in passages]
  corpus = tokenize_corpus(docs, pad_id=tokenizer.pad_id, max_len=max_passage_tokens)
  return SearchTool(corpus=corpus,
                    index=build_bm25_index(corpus, vocab_size, bm25, ignore_ids=ignore_ids))


def make_bm25_retrieve_fn(vocab_size: int, k: int, ignore_ids: Sequence[int] = ()):
  """Returns `retrieve_fn(index, query_tokens [N, Lq], query_mask [N, Lq]) -> (ids, scores)`.

  `ids` and `scores` are [N, k], best first; pure and jittable.
  """
  ignore_ids = tuple(ignore_ids)

  def retrieve_fn(index: BM25Index, query_tokens: jax.Array, query_mask: jax.Array):
    bags = query_bag(query_tokens, query_mask, vocab_size, ignore_ids=ignore_ids)
    return bm25_search(index, bags, k)

  return retrieve_fn
