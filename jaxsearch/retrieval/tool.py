"""The in-graph search tool: passages tokenized once, a sparse BM25 index over their token ids,
and a pure `retrieve_fn` the rollout calls inside its compiled loop."""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax

from jaxsearch.retrieval.bm25 import (BM25Config, BM25Index, SparseBM25Index, TokenizedCorpus,
                                      bm25_search, build_sparse_bm25_index, query_bag,
                                      sparse_bm25_search, tokenize_corpus)


class SearchTool(NamedTuple):
  """What the rollout needs to answer searches (a pytree of arrays)."""

  corpus: TokenizedCorpus   # tokens [M, L] int32, lengths [M] int32: the passages as shown
  index: SparseBM25Index | None   # the in-graph BM25's posting lists; None: another tool


def build_search_tool(
    passages: Sequence[str], tokenizer: Any, vocab_size: int, *,
    bm25: BM25Config = BM25Config(), ignore_ids: Sequence[int] = (),
    max_passage_tokens: int | None = None, index: bool = True,
) -> SearchTool:
  """Tokenizes passages once and indexes their token ids with BM25 (sparse).

  Args:
    passages: M passage texts, in document-index order.
    tokenizer: the policy's tokenizer (queries are policy tokens, so terms are its ids).
    vocab_size: V, the policy's vocabulary size (>= tokenizer.vocab_size).
    bm25: BM25 parameters.
    ignore_ids: ids that are never terms (pad, bos, eos, tags).
    max_passage_tokens: truncate passages to this many tokens (None: the longest passage).
    index: build the BM25 index; False when the run searches with another tool (host, HTTP,
      generative), which needs only the passages.

  Returns:
    A `SearchTool`.
  """
  docs = [tokenizer.encode(p) for p in passages]
  corpus = tokenize_corpus(docs, pad_id=tokenizer.pad_id, max_len=max_passage_tokens)
  return SearchTool(corpus=corpus, index=build_sparse_bm25_index(
      corpus, vocab_size, bm25, ignore_ids=ignore_ids) if index else None)


def make_bm25_retrieve_fn(vocab_size: int, k: int, ignore_ids: Sequence[int] = (), *,
                          posting_block: int = BM25Config().posting_block):
  """Returns `retrieve_fn(index, query_tokens [N, Lq], query_mask [N, Lq]) -> (ids, scores)`.

  `ids` and `scores` are [N, k], best first; pure and jittable. `index` is a
  `SparseBM25Index` (`sparse_bm25_search`, `posting_block` postings per step) or a dense
  `BM25Index` (`bm25_search`); both give the same results.
  """
  ignore_ids = tuple(ignore_ids)

  def retrieve_fn(index: SparseBM25Index | BM25Index, query_tokens: jax.Array,
                  query_mask: jax.Array):
    if isinstance(index, SparseBM25Index):
      return sparse_bm25_search(index, query_tokens, query_mask, k, ignore_ids=ignore_ids,
                                block=posting_block)
    bags = query_bag(query_tokens, query_mask, vocab_size, ignore_ids=ignore_ids)
    return bm25_search(index, bags, k)

  return retrieve_fn
