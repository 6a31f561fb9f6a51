"""Tests for jaxsearch.retrieval.retriever: the interface, the registry and the BM25 backends
(host bm25s vs bm25s's own pipeline vs the pure JAX BM25)."""
from __future__ import annotations

import math

from absl.testing import absltest
from absl.testing import parameterized
import bm25s
import jax
import numpy as np

from jaxsearch.data.world import WorldConfig, build_world
from jaxsearch.retrieval import bm25 as bm25_lib
from jaxsearch.retrieval import corpus as corpus_lib
from jaxsearch.retrieval import retriever as retriever_lib
from jaxsearch.retrieval.corpus import Corpus
from jaxsearch.retrieval.retriever import (BM25Retriever, JaxBM25Retriever, Retriever,
                                           build_retriever, top_k_rows)

TEXTS = ["The cat sat on the mat.", "A dog barked at the cat.", "Dogs and cats and dogs.",
         "", "Quantum chromodynamics of the strong force.", "the the the"]


def _assert_same_ranking(ids_a, scores_a, ids_b, scores_b, *, rtol=1e-5, atol=1e-6):
  """Equal scores, and equal ids wherever the score is not (near-)tied with a neighbour."""
  np.testing.assert_allclose(scores_a, scores_b, rtol=rtol, atol=atol)
  for row_a, row_b, s in zip(ids_a, ids_b, np.asarray(scores_b)):
    gaps = np.abs(np.diff(s))
    tied = np.zeros(len(s), bool)
    tied[:-1] |= gaps < 1e-4
    tied[1:] |= gaps < 1e-4
    np.testing.assert_array_equal(row_a[~tied], row_b[~tied])


class TopKTest(parameterized.TestCase):

  @parameterized.parameters(1, 3, 17, 40, 41)
  def test_matches_lax_top_k_with_ties(self, k):
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 4, size=(6, 40)).astype(np.float32)   # many ties
    scores[0] = 0.0
    ids, vals = top_k_rows(scores, k)
    want_vals, want_ids = jax.lax.top_k(scores, min(k, 40))
    np.testing.assert_array_equal(ids, np.asarray(want_ids))
    np.testing.assert_array_equal(vals, np.asarray(want_vals))
    self.assertEqual(ids.dtype, np.int32)

  def test_pad_results(self):
    ids, scores = retriever_lib.pad_results(np.array([[2, 0]]), np.array([[1.0, 0.5]]), 4)
    np.testing.assert_array_equal(ids, [[2, 0, -1, -1]])
    np.testing.assert_array_equal(scores, [[1.0, 0.5, -np.inf, -np.inf]])

  @parameterized.parameters(0, -1, 2.0, True, None)
  def test_bad_k(self, k):
    with self.assertRaisesRegex(ValueError, "k must be an int >= 1"):
      retriever_lib.check_k(k)


class BM25HostTest(absltest.TestCase):

  def test_hand_computed_score(self):
    r = BM25Retriever(["the cat sat", "a dog barked"])
    ids, scores = r.search(["dog"], k=2)
    # N=2, df=1: idf = ln(1 + 1.5/1.5); both docs 2 tokens after stopwords: tf part 1/2.5.
    self.assertEqual(ids.tolist(), [[1, 0]])
    np.testing.assert_allclose(scores, [[math.log(2.0) / 2.5, 0.0]], rtol=1e-6)

  def test_matches_bm25s_pipeline(self):
    world = build_world(WorldConfig(seed=0))
    texts = [d.contents for d in world.documents]
    queries = [q.question for q in world.splits["test"][:40]] + ["zzz unknown words"]
    ref = bm25s.BM25()
    ref.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    want_ids, want_scores = ref.retrieve(bm25s.tokenize(queries, stopwords="en",
                                                        show_progress=False),
                                         k=10, show_progress=False)
    got_ids, got_scores = BM25Retriever(texts).search(queries, k=10)
    self.assertEqual(got_ids.shape, (41, 10))
    self.assertGreater(np.count_nonzero(want_scores), 300)
    _assert_same_ranking(got_ids[:40], got_scores[:40], want_ids[:40],
                         want_scores[:40])
    np.testing.assert_array_equal(got_scores[40], 0.0)     # no known word: no match

  def test_k_larger_than_corpus_is_padded(self):
    r = BM25Retriever(TEXTS)
    ids, scores = r.search(["cat", "dogs"], k=8)
    self.assertEqual(ids.shape, (2, 8))
    np.testing.assert_array_equal(ids[:, 6:], -1)
    self.assertTrue(np.isneginf(scores[:, 6:]).all())
    self.assertEqual(sorted(ids[0, :6].tolist()), list(range(6)))

  def test_empty_query_batch_and_bad_queries(self):
    r = BM25Retriever(TEXTS)
    ids, scores = r.search([], k=3)
    self.assertEqual((ids.shape, scores.shape), ((0, 3), (0, 3)))
    with self.assertRaisesRegex(ValueError, "one string"):
      r.search("cat", k=1)
    with self.assertRaisesRegex(ValueError, "strings"):
      r.search([3], k=1)


class JaxBM25Test(parameterized.TestCase):

  @parameterized.named_parameters(("lucene", "lucene"), ("bm25plus", "bm25+"),
                                  ("atire", "atire"))
  def test_same_scores_as_host(self, method):
    world = build_world(WorldConfig(seed=2))
    texts = [d.contents for d in world.documents]
    queries = ([q.question for q in world.splits["validation"]]
               + [" ".join(q.search_queries) for q in world.splits["test"][:50]])
    config = bm25_lib.BM25Config(method=method, k1=1.2, b=0.7)
    host = BM25Retriever(texts, config)
    graph = JaxBM25Retriever.from_bm25(host, batch_size=64)  # several batches
    full_host = host.scores(queries)
    self.assertGreater(np.count_nonzero(full_host), 1000)
    host_ids, host_scores = host.search(queries, k=10)
    jax_ids, jax_scores = graph.search(queries, k=10)
    _assert_same_ranking(jax_ids, jax_scores, host_ids, host_scores)
    # Token-id queries give the same result as the texts they came from.
    ids2, scores2 = graph.search(host.tokenizer.encode(queries[:5]), k=10)
    np.testing.assert_array_equal(ids2, jax_ids[:5])
    np.testing.assert_array_equal(scores2, jax_scores[:5])

  def test_text_queries_need_tokenizer(self):
    r = JaxBM25Retriever.from_token_ids([[1, 2], [2, 3]], vocab_size=4)
    ids, scores = r.search([[3], [2, 2]], k=2)
    self.assertEqual(ids[0, 0], 1)
    np.testing.assert_allclose(scores[1, 0], scores[1, 1])   # term 2 in both docs
    with self.assertRaisesRegex(ValueError, "tokenize"):
      r.search(["text"], k=1)


class RegistryTest(parameterized.TestCase):

  def test_names(self):
    self.assertEqual(retriever_lib.RETRIEVERS.names(), ["bm25", "bm25_jax", "exact", "scann"])
    with self.assertRaisesRegex(LookupError, "unknown retriever 'nope'"):
      build_retriever("nope", Corpus(ids=["a"], titles=[""], texts=["x"]))
    with self.assertRaisesRegex(ValueError, "must be a Corpus"):
      build_retriever("bm25", ["x"])

  def test_every_backend_finds_the_matching_document(self):
    corpus = corpus_lib.from_world(build_world(WorldConfig(seed=0)))
    rng = np.random.default_rng(0)
    vocab = {}

    def encoder(texts):           # a bag-of-words hash embedding: deterministic, host-side
      out = np.zeros((len(texts), 64), np.float32)
      for i, t in enumerate(texts):
        for w in t.lower().replace('"', " ").replace(".", " ").split():
          if w not in vocab:
            vocab[w] = rng.standard_normal(64)
          out[i] += vocab[w]
      return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    targets = [5, 17, 123]
    queries = [corpus.contents[t] for t in targets]
    for name in retriever_lib.RETRIEVERS.names():
      kwargs = {"encoder": encoder} if name in ("exact", "scann") else {}
      r = build_retriever(name, corpus, **kwargs)
      self.assertIsInstance(r, Retriever)
      self.assertEqual(r.num_docs, len(corpus))
      ids, scores = r.search(queries, k=3)
      self.assertEqual((ids.dtype, scores.dtype), (np.int32, np.float32), name)
      self.assertEqual(ids[:, 0].tolist(), targets, name)
      self.assertTrue((np.diff(scores, axis=1) <= 1e-6).all(), name)


if __name__ == "__main__":
  absltest.main()
