"""A trained generative retriever (DSI) as the search agent's tool (`RunConfig.search_tool`)."""
from __future__ import annotations

import dataclasses

from jaxsearch.generative.tool import GenerativeSearchClient
from jaxsearch.retrieval.http_tool import make_http_retrieve_fn
from jaxsearch.retrieval.search_tools import SEARCH_TOOLS, RetrieveFn, SearchContext


@SEARCH_TOOLS.register("generative")
@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerativeSearch:
  """Each search is decoded into docIDs by a trained DSI model's trie-constrained beam
  search (`GenerativeSearchClient`, on the host through a callback); the docIDs' documents
  are the passages shown.

  Attributes:
    workdir: a finished generative-retrieval workdir (`gin/experiments/dsi_world.gin`) over
      the same corpus.
    beam_size: the beam width (>= the rollout's top_k: the beam holds the documents returned).
  """

  workdir: str = dataclasses.field(metadata={"path": True})
  beam_size: int = 10
  kind: str = dataclasses.field(default="generative", init=False)

  def __post_init__(self):
    if not isinstance(self.workdir, str) or not self.workdir:
      raise ValueError(f"GenerativeSearch.workdir must be a DSI workdir, got {self.workdir!r}")
    if self.beam_size < 1:
      raise ValueError(f"GenerativeSearch.beam_size must be >= 1, got {self.beam_size}")

  def build(self, context: SearchContext) -> RetrieveFn:
    if self.beam_size < context.top_k:
      raise ValueError(f"GenerativeSearch.beam_size ({self.beam_size}) must be >= "
                       f"RolloutConfig.top_k ({context.top_k}): the beam holds the documents "
                       "returned")
    client = GenerativeSearchClient.from_workdir(self.workdir, beam_size=self.beam_size)
    return make_http_retrieve_fn(client, context.tokenizer, context.doc_ids, context.top_k)
