"""The search agent's search tools, each a small frozen config with a `build`.

A run names its tool by config (`RunConfig.search_tool`, from gin):

  BM25Search()                      in-graph BM25 over the policy's token ids (the default):
                                    the whole episode stays one compiled program
  HttpSearch(url=...)               a Search-R1-style retrieval server (POST /retrieve), asked
                                    from the host once per turn through a callback
  GenerativeSearch(workdir=...)     a trained generative retriever (DSI), registered by
                                    `jaxsearch.generative.search_tool`

`build(context)` returns the rollout's `retrieve_fn(tool_index, query_tokens [N, Lq],
query_mask [N, Lq]) -> (ids [N, k], scores [N, k])`. Tools register in `SEARCH_TOOLS` under
their `kind`; a saved config (`run_config.json`) names its tool by that kind, and
`search_tool_from_dict` rebuilds it.

Example:
  >>> tool = HttpSearch(url="http://127.0.0.1:8000/retrieve")
  >>> retrieve_fn = tool.build(SearchContext(tokenizer, vocab_size, doc_ids, top_k=3,
  ...                                        special_ids=env.special_ids))  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Sequence

from jaxsearch.registry import Registry
from jaxsearch.retrieval.http_tool import SearchClient, make_http_retrieve_fn
from jaxsearch.retrieval.tool import make_bm25_retrieve_fn

RetrieveFn = Callable[..., Any]
SEARCH_TOOLS: Registry[type] = Registry("search tool")


class SearchContext(NamedTuple):
  """What a tool is built against: the policy's tokenizer and the local corpus."""

  tokenizer: Any                 # the policy's tokenizer (decodes queries for host tools)
  vocab_size: int                # V, the policy's vocabulary size
  doc_ids: Sequence[str]         # the document id of each local corpus row
  top_k: int                     # documents per search
  special_ids: Sequence[int]     # ids that are never query terms (pad, tags)
  bm25_posting_block: int = 4096  # `BM25Config.posting_block` of the in-graph BM25


@SEARCH_TOOLS.register("bm25")
@dataclasses.dataclass(frozen=True, kw_only=True)
class BM25Search:
  """In-graph BM25 over token ids (the index's parameters are `RunConfig.bm25`)."""

  kind: str = dataclasses.field(default="bm25", init=False)
  uses_bm25_index: ClassVar[bool] = True   # `setup` builds the in-graph index for it only

  def build(self, context: SearchContext) -> RetrieveFn:
    return make_bm25_retrieve_fn(context.vocab_size, context.top_k, context.special_ids,
                                 posting_block=context.bm25_posting_block)


@SEARCH_TOOLS.register("http")
@dataclasses.dataclass(frozen=True, kw_only=True)
class HttpSearch:
  """A Search-R1-style retrieval server serving the same corpus (`python -m experiments.serve
  --corpus=world`, or Search-R1's own): each turn's searches go to it in one request from
  the host (timeouts and retries; a failing server gives empty results and a logged error),
  and the returned ids select the local passages.

  Attributes:
    url: the server's `/retrieve` URL (e.g. "http://127.0.0.1:8000/retrieve").
  """

  url: str
  kind: str = dataclasses.field(default="http", init=False)

  def __post_init__(self):
    if not isinstance(self.url, str) or not self.url:
      raise ValueError(f"HttpSearch.url must be a server URL, got {self.url!r}")

  def build(self, context: SearchContext) -> RetrieveFn:
    return make_http_retrieve_fn(SearchClient(self.url), context.tokenizer, context.doc_ids,
                                 context.top_k)


def search_tool_from_dict(data: Mapping[str, Any] | Any) -> Any:
  """A tool config from its saved dict (`{"kind": ..., **fields}`); configs pass through."""
  if not isinstance(data, Mapping):
    return data
  data = dict(data)
  kind = data.pop("kind", "bm25")
  return SEARCH_TOOLS.get(kind)(**data)
