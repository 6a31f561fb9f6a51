"""Tests for jaxsearch.retrieval.mips: exact MIPS == numpy brute force, sharded == unsharded
on the 8 fake CPU devices, approx_max_k."""
from __future__ import annotations

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.retrieval import mips
from jaxsearch.retrieval.corpus import Corpus

AUTO = jax.sharding.AxisType.Auto


def _numpy_top_k(queries, docs, k):
  """Brute force in float64, ties toward the lower row (stable argsort)."""
  scores = queries.astype(np.float64) @ docs.astype(np.float64).T
  ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return ids, np.take_along_axis(scores, ids, axis=1)


def _data(seed, n, q, d=24):
  rng = np.random.default_rng(seed)
  docs = rng.standard_normal((n, d)).astype(np.float32)
  queries = rng.standard_normal((q, d)).astype(np.float32)
  return docs, queries


class ExactSearchTest(parameterized.TestCase):

  @parameterized.parameters(1, 10, 257)
  def test_matches_numpy(self, k):
    docs, queries = _data(k, 257, 9)
    search = jax.jit(mips.exact_search, static_argnames="k")
    ids, scores = search(jnp.asarray(queries), jnp.asarray(docs), k=k)
    want_ids, want_scores = _numpy_top_k(queries, docs, k)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5, atol=1e-5)

  def test_ties_break_toward_lower_row(self):
    docs = np.zeros((6, 2), np.float32)
    docs[[1, 3, 4]] = [1.0, 0.0]
    ids, _ = mips.exact_search(jnp.array([[1.0, 0.0]]), jnp.asarray(docs), k=4)
    np.testing.assert_array_equal(np.asarray(ids), [[1, 3, 4, 0]])

  def test_num_valid_masks_padding(self):
    docs, queries = _data(0, 20, 3)
    docs[15:] = 100.0                                 # padding rows that would win
    ids, _ = mips.exact_search(jnp.asarray(queries), jnp.asarray(docs), k=5, num_valid=15)
    np.testing.assert_array_equal(np.asarray(ids), _numpy_top_k(queries, docs[:15], 5)[0])

  def test_approx_max_k_is_exact_on_cpu(self):
    docs, queries = _data(1, 500, 7)
    exact = mips.exact_search(jnp.asarray(queries), jnp.asarray(docs), k=10)
    approx = mips.exact_search(jnp.asarray(queries), jnp.asarray(docs), k=10, approx=True)
    np.testing.assert_array_equal(np.asarray(approx[0]), np.asarray(exact[0]))

  def test_bad_arguments(self):
    docs, queries = _data(0, 10, 2)
    with self.assertRaisesRegex(ValueError, "k <= num_valid"):
      mips.exact_search(jnp.asarray(queries), jnp.asarray(docs), k=11)
    with self.assertRaisesRegex(ValueError, "share D"):
      mips.exact_search(jnp.ones((2, 3)), jnp.asarray(docs), k=1)
    with self.assertRaisesRegex(ValueError, "recall_target"):
      mips.exact_search(jnp.asarray(queries), jnp.asarray(docs), k=1, approx=True,
                         recall_target=1.5)


class ShardedSearchTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.assertEqual(jax.device_count(), 8)   # tests/conftest.py: 8 fake CPU devices

  @parameterized.named_parameters(
      ("one_axis", (8,), ("data",), "data", 1000, 10),
      ("two_axes_both", (2, 4), ("x", "y"), ("x", "y"), 1003, 10),
      ("two_axes_inner", (2, 4), ("x", "y"), "y", 999, 7),
      ("k_above_shard_size", (8,), ("data",), "data", 61, 20),
      ("k_equals_n", (8,), ("data",), "data", 13, 13),
  )
  def test_sharded_equals_unsharded(self, shape, names, axes, n, k):
    mesh = jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape))
    docs, queries = _data(n, n, 11)
    docs[n // 2] = docs[3]                           # a tie across shards
    queries[0] = docs[3]
    sharded_docs, num_valid = mips.shard_corpus(docs, mesh, axes)
    self.assertEqual(num_valid, n)
    self.assertEqual(sharded_docs.shape[0] % mips.num_shards(mesh, axes), 0)
    search = jax.jit(functools.partial(mips.sharded_exact_search, mesh=mesh, axes=axes),
                     static_argnames=("k", "num_valid"))
    ids, scores = search(jnp.asarray(queries), sharded_docs, k=k, num_valid=n)
    want_ids, want_scores = mips.exact_search(jnp.asarray(queries), jnp.asarray(docs), k=k)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(want_scores), rtol=1e-5,
                               atol=1e-5)
    self.assertEqual(np.asarray(ids)[0, :2].tolist(), [3, n // 2])

  def test_unknown_axis(self):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AUTO,))
    with self.assertRaisesRegex(ValueError, "not mesh axes"):
      mips.shard_corpus(np.ones((8, 2), np.float32), mesh, "model")


class ExactDenseRetrieverTest(parameterized.TestCase):

  @parameterized.named_parameters(("single_device", False), ("sharded", True))
  def test_retriever_matches_numpy(self, sharded):
    docs, queries = _data(2, 301, 37)
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AUTO, AUTO)) if sharded else None
    r = mips.ExactDenseRetriever(docs, mesh=mesh, batch_size=16)   # 3 batches, last short
    ids, scores = r.search(queries, k=10)
    want_ids, want_scores = _numpy_top_k(queries, docs, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    self.assertEqual((ids.dtype, scores.dtype, r.num_docs), (np.int32, np.float32, 301))

  def test_padding_texts_and_bfloat16(self):
    docs, queries = _data(3, 5, 2, d=4)
    calls = []

    def encoder(texts):
      calls.append(list(texts))
      return queries[:len(texts)]

    corpus = Corpus(ids=[f"d{i}" for i in range(5)], titles=[""] * 5,
                    texts=[f"t{i}" for i in range(5)])
    r = mips.ExactDenseRetriever.from_corpus(corpus, embeddings=docs, query_encoder=encoder)
    ids, scores = r.search(["first", "second"], k=7)
    self.assertEqual(calls, [["first", "second"]])
    np.testing.assert_array_equal(ids[:, :5], _numpy_top_k(queries, docs, 5)[0])
    np.testing.assert_array_equal(ids[:, 5:], -1)
    self.assertTrue(np.isneginf(scores[:, 5:]).all())
    low = mips.ExactDenseRetriever(docs, dtype=jnp.bfloat16)
    self.assertEqual(low.docs.dtype, jnp.bfloat16)
    np.testing.assert_allclose(low.search(queries, k=5)[1], scores[:, :5], rtol=0.05, atol=0.1)
    with self.assertRaisesRegex(ValueError, "query encoder"):
      mips.ExactDenseRetriever(docs).search(["text"], k=1)
    with self.assertRaisesRegex(ValueError, r"\[Q, D=4\]"):
      r.search(np.ones((2, 3)), k=1)
    with self.assertRaisesRegex(ValueError, "exactly one of encoder"):
      mips.ExactDenseRetriever.from_corpus(corpus)


if __name__ == "__main__":
  absltest.main()
