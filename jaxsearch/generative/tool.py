"""A generative retriever as the search agent's tool: query text -> docIDs -> passages.

The search agent's rollout calls a `retrieve_fn(tool_state, query_tokens [N, Lq], query_mask)
-> (ids [N, k], scores [N, k])` once per turn for every episode that searched. Here the
retriever is a trained DSI model (`jaxsearch.programs.generative_retrieval`): each query is decoded with a
trie-constrained beam search (`jaxsearch.generative.beam`), so it can only name documents
that exist, and the top-k docIDs are mapped to the rows of the agent's own corpus.

The DSI model has its own tokenizer (trained on the corpus and the training queries), not the
policy's, so the policy's query tokens are turned back into text on the host and re-encoded:
`GenerativeSearchClient` answers `search(queries, k)` in the result format of a Search-R1
retrieval server, and `jaxsearch.retrieval.http_tool.make_http_retrieve_fn` (a
`jax.pure_callback` from inside the compiled rollout) turns any such client into the
rollout's `retrieve_fn`. The agent chooses it from gin with
`RunConfig.search_tool = GenerativeSearch(workdir="<DSI workdir>")`
(`jaxsearch.generative.search_tool`).

Example:
  >>> client = GenerativeSearchClient.from_workdir("runs/dsi_world", beam_size=10)
  >>> client.search(["Which company does Mave Sima work for?"], k=3)[0][0]["document"]["id"]
  'person-0012'
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.generative import dsi
from jaxsearch.generative import workdir as workdir_lib
from jaxsearch.generative.docids import DocIds
from jaxsearch.generative.trie import build_trie, trie_depth


class GenerativeSearchClient:
  """Answers text queries with a DSI model's constrained beam search.

  Args:
    model: the DSI `Transformer`.
    params: its parameters.
    tokenizer: the DSI model's text tokenizer (`encode(text) -> list[int]`).
    docids: the docIDs it was trained on (row i = `doc_ids[i]`).
    layout: its vocabulary layout (`dsi.DSILayout`).
    doc_ids: the document id of each docID row (e.g. the world's `doc_id`s).
    beam_size: W, the beam width; at most W documents come back per query.
    max_input_tokens: queries are cut to this many tokens (as in training).
    batch_size: queries per compiled beam-search call (the last chunk is padded, so one
      compilation serves every call).
    constrained: decode only valid docIDs (False: invalid outputs are dropped).

  Example:
    >>> client = GenerativeSearchClient(model, params, tok, docids, layout, ids, beam_size=5)
    >>> results = client.search(["who founded Pebe Trading?"], k=3)
  """

  def __init__(self, model: Any, params: Any, tokenizer: Any, docids: DocIds,
               layout: dsi.DSILayout, doc_ids: Sequence[str], *, beam_size: int = 10,
               max_input_tokens: int = 32, batch_size: int = 16, constrained: bool = True):
    for name, value in (("beam_size", beam_size), ("max_input_tokens", max_input_tokens),
                        ("batch_size", batch_size)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if len(doc_ids) != docids.codes.shape[0]:
      raise ValueError(f"doc_ids has {len(doc_ids)} entries but there are "
                       f"{docids.codes.shape[0]} docIDs")
    self.params = params
    self.tokenizer = tokenizer
    self.layout = layout
    self.doc_ids = [str(d) for d in doc_ids]
    self.beam_size = beam_size
    self.max_input_tokens = max_input_tokens
    self.batch_size = batch_size
    self.trie = jax.tree.map(jnp.asarray, build_trie(docids))
    self._retrieve = jax.jit(dsi.make_retrieve_fn(
        model, layout, beam_size=beam_size, num_steps=trie_depth(docids),
        constrained=constrained))

  @classmethod
  def from_workdir(cls, workdir: str, **kwargs: Any) -> "GenerativeSearchClient":
    """The client of a finished `jaxsearch.programs.generative_retrieval.run` workdir (DDRO
    stage if it ran), read by `jaxsearch.generative.workdir`.

    `max_input_tokens` defaults to the workdir's `DSIConfig.max_input_tokens`.
    """
    model, params, tokenizer, docids, layout = workdir_lib.load_model(workdir)
    _, doc_ids = workdir_lib.load_docids(workdir)
    kwargs.setdefault("max_input_tokens", workdir_lib.load_max_input_tokens(workdir))
    return cls(model, params, tokenizer, docids, layout, doc_ids, **kwargs)

  def retrieve(self, queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`(rows [Q, W] int32, scores [Q, W] float32)`: docID rows best first (-1: none)."""
    inputs = [self.tokenizer.encode(q) for q in queries]
    prompts, mask = dsi.prompt_batch(inputs, self.layout, max_input_tokens=self.max_input_tokens)
    return dsi.batched_retrieve(self._retrieve, self.params, self.trie, prompts, mask,
                                self.batch_size)

  def search(self, queries: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """Search-R1 server results: per query, up to k `{"document": {"id"}, "score"}` entries.

    Scores are the docIDs' log-likelihoods under the model (higher is better).
    """
    if not queries:
      return []
    rows, scores = self.retrieve(queries)
    results = []
    for q in range(len(queries)):
      entries = []
      for row, score in zip(rows[q], scores[q]):
        if row < 0 or len(entries) == k:
          continue
        entries.append({"document": {"id": self.doc_ids[row]}, "score": float(score)})
      results.append(entries)
    return results
