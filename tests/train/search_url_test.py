"""The search agent with its searches answered by a Search-R1-style HTTP server (`HttpSearch`)."""
from __future__ import annotations

import numpy as np
from absl.testing import absltest

from jaxsearch.data.world import WorldConfig, build_world
from jaxsearch.retrieval import corpus as corpus_lib
from jaxsearch.retrieval.retriever import build_retriever
from jaxsearch.retrieval.search_tools import HttpSearch
from jaxsearch.retrieval.server import serve_in_thread
from jaxsearch.programs.search_agent.experiment import RunConfig, setup

WORLD = WorldConfig(num_people=60, num_distractors=20, train_size=100, validation_size=10,
                    test_size=16)


class SearchUrlTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    world = build_world(WORLD)
    cls.corpus = corpus_lib.from_world(world)
    cls.retriever = build_retriever("bm25", cls.corpus)
    cls.server, _ = serve_in_thread(cls.retriever, cls.corpus)
    cls.exp = setup(RunConfig(world=WORLD, search_tool=HttpSearch(url=cls.server.url + "/retrieve")))
    cls.questions = world.splits["test"][:4]

  @classmethod
  def tearDownClass(cls):
    cls.server.shutdown()
    cls.server.server_close()
    super().tearDownClass()

  def _query_tokens(self, texts):
    tok = self.exp.tokenizer
    width = max(len(tok.encode(t)) for t in texts)
    ids = np.zeros((len(texts), width), np.int32)
    mask = np.zeros((len(texts), width), bool)
    for i, t in enumerate(texts):
      enc = tok.encode(t)
      ids[i, :len(enc)] = enc
      mask[i, :len(enc)] = True
    return ids, mask

  def test_searches_are_answered_by_the_server(self):
    texts = [q.search_queries[0] for q in self.questions]
    ids, mask = self._query_tokens(texts)
    mask[1] = False                                     # a row that does not search this turn
    served = self.server.requests_served
    got, block, length = self.exp.respond_fn(self.exp.tool, ids, mask)
    self.assertEqual(self.server.requests_served, served + 1)   # one request per turn
    k = self.exp.config.rollout.top_k
    positions = {d: i for i, d in enumerate(self.corpus.ids)}
    for row, text in enumerate(texts):
      if row == 1:
        np.testing.assert_array_equal(np.asarray(got[row]), -np.ones(k))
        self.assertEqual(int(length[row]), 2)           # <information></information>
        continue
      # What the server's retriever ranks for the decoded query, as local corpus rows.
      decoded = self.exp.tokenizer.decode(ids[row][mask[row]].tolist())
      want, _ = self.retriever.search([decoded], k)
      want = [positions[self.corpus.ids[j]] for j in want[0]]
      np.testing.assert_array_equal(np.asarray(got[row]), want)
      self.assertGreater(int(length[row]), 2)

  def test_a_dead_server_gives_empty_results(self):
    exp = setup(RunConfig(world=WORLD, search_tool=HttpSearch(url="http://127.0.0.1:9/retrieve")),
                tokenizer=self.exp.tokenizer)
    ids, mask = self._query_tokens([self.questions[0].search_queries[0]])
    got, _, length = exp.respond_fn(exp.tool, ids, mask)
    np.testing.assert_array_equal(np.asarray(got), -np.ones_like(np.asarray(got)))
    self.assertEqual(int(length[0]), 2)


if __name__ == "__main__":
  absltest.main()
