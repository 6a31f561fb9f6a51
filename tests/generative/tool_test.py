"""The generative retriever as the agent's search tool (issue 7, item 6)."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

from jaxsearch.generative import dsi
from jaxsearch.generative.docids import atomic_docids, docid_tokens, naive_docids
from jaxsearch.config_files import config_from_dict, config_to_json
from jaxsearch.generative.search_tool import GenerativeSearch
from jaxsearch.generative.tool import GenerativeSearchClient
from jaxsearch.models.transformer import Transformer, TransformerConfig
from jaxsearch.retrieval.http_tool import make_http_retrieve_fn
from jaxsearch.programs.search_agent.experiment import RunConfig

TEXT_VOCAB = 40
MAX_INPUT = 6


class CharTokenizer:
  """Letters a..z -> 4..29 (0 pad, 1 sep/bos); enough for the client's encode / decode."""

  pad_id, bos_id = 0, 1

  def encode(self, text: str) -> list[int]:
    return [4 + ord(c) - ord("a") for c in text.lower() if "a" <= c <= "z"]

  def decode(self, ids) -> str:
    return "".join(chr(ord("a") + i - 4) for i in ids if 4 <= i < 30)


def _client(docids, beam_size, seed=0):
  layout = dsi.DSILayout(code_offset=TEXT_VOCAB, num_codes=docids.num_codes, sep_id=1, pad_id=0)
  model = Transformer(TransformerConfig(vocab_size=layout.vocab_size, d_model=32, num_layers=2,
                                        num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=32))
  params = dsi.init_params(model.config, jax.random.key(seed))
  # Unit-scale embeddings: a random model with peaked, query-dependent docID distributions.
  params = {**params, "embed": {"embedding": params["embed"]["embedding"] * 30.0}}
  doc_ids = [f"doc-{i}" for i in range(docids.codes.shape[0])]
  client = GenerativeSearchClient(model, params, CharTokenizer(), docids, layout, doc_ids,
                                  beam_size=beam_size, max_input_tokens=MAX_INPUT,
                                  batch_size=4)
  return client, model, params, layout


class GenerativeSearchClientTest(absltest.TestCase):

  def test_full_beam_returns_the_exhaustive_ranking(self):
    docids = naive_docids(12, base=4)                       # 2 codes each, 12 valid of 16
    client, model, params, layout = _client(docids, beam_size=12)
    queries = ["mave sima", "bavun", "pebe trading", "doctor", "x"]
    results = client.search(queries, k=12)
    exhaustive = dsi.score_all_docids(
        jax.jit(dsi.make_sequence_logprob_fn(model, layout)), params,
        [CharTokenizer().encode(q) for q in queries], docid_tokens(docids, TEXT_VOCAB), layout,
        max_input_tokens=MAX_INPUT)
    for q, entries in enumerate(results):
      self.assertLen(entries, 12)
      got = [int(e["document"]["id"].split("-")[1]) for e in entries]
      self.assertEqual(sorted(got), list(range(12)))        # only valid docIDs, all of them
      np.testing.assert_allclose([e["score"] for e in entries], exhaustive[q, got], atol=1e-4)
      np.testing.assert_array_equal(got, np.argsort(-exhaustive[q], kind="stable")[:12])

  def test_k_cuts_and_scores_descend(self):
    client, *_ = _client(atomic_docids(9), beam_size=5)
    for entries in client.search(["alpha", "beta gamma"], k=3):
      self.assertLen(entries, 3)
      scores = [e["score"] for e in entries]
      self.assertEqual(scores, sorted(scores, reverse=True))
    self.assertEqual(client.search([], k=3), [])

  def test_rollout_retrieve_fn_maps_to_the_agent_corpus_rows(self):
    docids = atomic_docids(6)
    client, *_ = _client(docids, beam_size=4)
    # The agent's corpus lists the same documents in another order, plus one the GR lacks.
    corpus_ids = ["doc-5", "extra", "doc-0", "doc-3", "doc-1", "doc-4", "doc-2"]
    row_of = {d: r for r, d in enumerate(corpus_ids)}
    retrieve_fn = make_http_retrieve_fn(client, CharTokenizer(), corpus_ids, k=3)
    tok = CharTokenizer()
    queries = ["mave", "bavun city"]
    width = 12
    tokens = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), bool)
    for i, q in enumerate(queries):
      ids = tok.encode(q)
      tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True     # row 2: no search this turn
    ids, scores = jax.jit(retrieve_fn)(None, jnp.asarray(tokens), jnp.asarray(mask))
    ids, scores = np.asarray(ids), np.asarray(scores)
    expected = client.search(queries, k=3)
    for i, entries in enumerate(expected):
      np.testing.assert_array_equal(ids[i], [row_of[e["document"]["id"]] for e in entries])
      np.testing.assert_allclose(scores[i], [e["score"] for e in entries], rtol=1e-6)
    np.testing.assert_array_equal(ids[2], [-1, -1, -1])
    self.assertNotIn(row_of["extra"], ids[:2])

  def test_bad_arguments_name_the_value(self):
    docids = atomic_docids(3)
    client, model, params, layout = _client(docids, beam_size=2)
    with self.assertRaisesRegex(ValueError, "beam_size must be an int >= 1, got 0"):
      GenerativeSearchClient(model, params, CharTokenizer(), docids, layout, ["a", "b", "c"],
                             beam_size=0)
    with self.assertRaisesRegex(ValueError, "doc_ids has 2 entries but there are 3 docIDs"):
      GenerativeSearchClient(model, params, CharTokenizer(), docids, layout, ["a", "b"])

  def test_run_config_checks_the_generative_tool(self):
    with self.assertRaisesRegex(ValueError, "GenerativeSearch.beam_size \\(1\\) must be >= "):
      RunConfig(search_tool=GenerativeSearch(workdir="runs/dsi", beam_size=1))
    with self.assertRaisesRegex(ValueError, "GenerativeSearch.workdir must be a DSI workdir"):
      GenerativeSearch(workdir="")
    # A saved config names its tool by kind and comes back as the same tool; so does the
    # config of a workdir written before search tools were configs.
    workdir = os.path.abspath("runs/dsi")   # saved configs record absolute paths
    config = RunConfig(search_tool=GenerativeSearch(workdir=workdir, beam_size=4))
    again = config_from_dict(RunConfig, json.loads(config_to_json(config)))
    self.assertEqual(again.search_tool, config.search_tool)
    old = json.loads(config_to_json(RunConfig()))
    del old["search_tool"]
    old.update(generative_retriever=workdir, generative_beam_size=4, search_url="")
    self.assertEqual(config_from_dict(RunConfig, old).search_tool, config.search_tool)


@pytest.mark.slow
class AgentWithGenerativeRetrieverTest(absltest.TestCase):
  """The search agent's environment answers searches with a trained DSI model (from gin:
  `SEARCH_TOOL = @search_tool.GenerativeSearch()`, `GenerativeSearch.workdir = WORKDIR`)."""

  def test_the_agents_searches_are_decoded_into_docids(self):
    import tempfile  # noqa: PLC0415
    from jaxsearch.data.world import WorldConfig  # noqa: PLC0415
    from jaxsearch.programs import generative_retrieval as dsi_run  # noqa: PLC0415
    from jaxsearch.programs.search_agent.experiment import setup  # noqa: PLC0415
    from jaxsearch.train.optim import OptimizerConfig  # noqa: PLC0415
    world = WorldConfig(num_people=40, num_cities=10, num_countries=4, num_companies=8,
                        num_distractors=10, train_size=80, validation_size=10, test_size=30)
    workdir = tempfile.mkdtemp()
    dsi_run.run(dsi_run.DSIConfig(
        world=world, tokenizer_vocab_size=400, steps=150, batch_size=32,
        model=TransformerConfig(vocab_size=1, d_model=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, mlp_dim=128, max_len=64),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=10), beam_sizes=(5,),
        baselines=(), latency_queries=0, eval_batch_size=16), workdir)
    exp = setup(RunConfig(world=world, tokenizer_vocab_size=400,
                          search_tool=GenerativeSearch(workdir=workdir, beam_size=5)))
    questions = [q.question for q in exp.world.splits["train"][:6]]
    blocks, ids = exp.respond(questions)
    client = GenerativeSearchClient.from_workdir(workdir, beam_size=5)
    k = exp.config.rollout.top_k
    row_of = {d.doc_id: i for i, d in enumerate(exp.world.documents)}
    # The environment sends the text of the policy's query tokens, all queries in one call.
    lq = exp.config.rollout.max_query_tokens
    texts = [exp.tokenizer.decode(exp.tokenizer.encode(q)[:lq]) for q in questions]
    hits = 0
    for results, q_ids, q in zip(client.search(texts, k), ids, exp.world.splits["train"][:6]):
      expected = [row_of[e["document"]["id"]] for e in results]
      self.assertNotEmpty(expected)
      self.assertEqual(q_ids[:len(expected)], expected)     # the environment used the client
      hits += row_of[q.supporting_doc_ids[0]] in q_ids
    self.assertGreaterEqual(hits, 4)    # trained on these questions: their documents come back
    # The information block shows the retrieved passages' tokens.
    first = exp.tool.corpus.tokens[ids[0][0], :exp.tool.corpus.lengths[ids[0][0]]].tolist()
    self.assertTrue(any(blocks[0][i:i + len(first)] == first for i in range(len(blocks[0]))))


if __name__ == "__main__":
  absltest.main()
