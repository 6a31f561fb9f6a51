"""Tests for jaxsearch.retrieval.bm25: parity with bm25s, hand values, ignore ids, top-k."""
from __future__ import annotations

import dataclasses
import functools

from absl.testing import absltest
from absl.testing import parameterized
import bm25s
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.retrieval import bm25

PAD, BOS, TAG = 0, 1, 2          # ids that the retriever must ignore
IGNORE = (PAD, BOS, TAG)
VOCAB = 64                       # corpus terms are drawn from [3, 48); [48, 64) never occur


def _jit_build(corpus, vocab_size, config, ignore_ids=()):
  build = jax.jit(bm25.build_bm25_index, static_argnums=(1, 2), static_argnames="ignore_ids")
  return build(corpus, vocab_size, config, ignore_ids=tuple(ignore_ids))


def _jit_bag(tokens, mask, vocab_size, ignore_ids=()):
  bag = jax.jit(bm25.query_bag, static_argnums=2, static_argnames="ignore_ids")
  return bag(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), vocab_size,
             ignore_ids=tuple(ignore_ids))


_jit_scores = jax.jit(bm25.bm25_scores)
_jit_search = jax.jit(bm25.bm25_search, static_argnames="k")
_jit_sparse_scores = jax.jit(bm25.sparse_bm25_scores, static_argnames=("ignore_ids", "block"))
_jit_sparse_search = jax.jit(bm25.sparse_bm25_search,
                             static_argnames=("k", "ignore_ids", "block"))


def _pad_queries(queries):
  width = max(len(q) for q in queries)
  tokens = np.zeros((len(queries), width), np.int32)
  mask = np.zeros((len(queries), width), bool)
  for i, q in enumerate(queries):
    tokens[i, :len(q)] = q
    mask[i, :len(q)] = True
  return tokens, mask


def _random_corpus(rng, num_docs=50):
  """Docs of Zipf-ish term ids with ignored ids sprinkled in, plus one all-ignored doc."""
  terms = np.arange(3, 48)
  p = 1.0 / (np.arange(len(terms)) + 3.0)
  p /= p.sum()
  docs = []
  for _ in range(num_docs):
    doc = list(rng.choice(terms, size=rng.integers(3, 30), p=p))
    for _ in range(rng.integers(0, 3)):          # tags / bos inside the text
      doc.insert(int(rng.integers(0, len(doc) + 1)), int(rng.choice([BOS, TAG])))
    docs.append([int(t) for t in doc])
  docs[7] = [BOS, TAG, TAG]                      # empty after ignoring
  return docs


def _random_queries(rng, num_queries=12):
  queries = []
  for _ in range(num_queries):
    q = [int(t) for t in rng.integers(3, 48, size=rng.integers(1, 7))]
    queries.append(q)
  queries[0] = [5, 5, 9, 5]                      # repeated terms
  queries[1] = [50, 6, 60]                       # out-of-corpus ids
  queries[2] = [TAG, 11, BOS, 12]                # ignored ids inside a query
  return queries


def _strip(seq):
  return [t for t in seq if t not in IGNORE]


class BM25ParityTest(parameterized.TestCase):
  """Full score matrices equal bm25s's `get_scores` on the same token-id corpus."""

  @parameterized.named_parameters(
      ("lucene_default", "lucene", 1.5, 0.75),
      ("lucene_k1_1.2_b_0.3", "lucene", 1.2, 0.3),
      ("lucene_b0", "lucene", 0.9, 0.0),
      ("robertson", "robertson", 1.5, 0.75),
      ("atire", "atire", 1.5, 0.75),
      ("bm25l", "bm25l", 1.5, 0.75),
      ("bm25plus", "bm25+", 1.2, 0.5),
  )
  def test_scores_match_bm25s(self, method, k1, b):
    rng = np.random.default_rng(0)
    docs = _random_corpus(rng)
    queries = _random_queries(rng)

    ref = bm25s.BM25(method=method, k1=k1, b=b)
    ref.index([[f"t{t}" for t in _strip(d)] for d in docs], show_progress=False)
    want = np.stack([ref.get_scores([f"t{t}" for t in _strip(q)]) for q in queries])

    config = bm25.BM25Config(method=method, k1=k1, b=b)
    corpus = bm25.tokenize_corpus(docs, pad_id=PAD)
    index = _jit_build(corpus, VOCAB, config, IGNORE)
    tokens, mask = _pad_queries(queries)
    got = np.asarray(_jit_scores(index, _jit_bag(tokens, mask, VOCAB, IGNORE)))
    # Posting lists only (dense_min_df > 1), and with the frequent terms as dense rows.
    postings = bm25.build_sparse_bm25_index(
        corpus, VOCAB, dataclasses.replace(config, dense_min_df=2.0), ignore_ids=IGNORE)
    hybrid = bm25.build_sparse_bm25_index(
        corpus, VOCAB, dataclasses.replace(config, dense_min_df=0.1), ignore_ids=IGNORE)
    # Block 3 splits the frequent terms' posting lists over several loop steps.
    got_sparse = [np.asarray(_jit_sparse_scores(sparse, tokens, mask, ignore_ids=IGNORE,
                                                block=block))
                  for sparse in (postings, hybrid) for block in (3, 256)]

    chex.assert_shape(got, (len(queries), len(docs)))
    self.assertGreater(np.count_nonzero(want), 50)   # the comparison is not vacuous
    for scores in (got, *got_sparse):
      np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    # The index holds one posting per (term, document) pair: bm25s's non-zeros; with dense
    # rows, those of the other terms.
    pairs = [set(_strip(d)) for d in docs]
    self.assertEqual(postings.docs.shape[0] - 1, sum(len(p) for p in pairs))
    self.assertEqual(postings.dense_weights.shape, (0, len(docs)))
    dense_terms = set(np.flatnonzero(np.asarray(hybrid.dense_row) >= 0).tolist())
    self.assertNotEmpty(dense_terms)
    self.assertEqual(hybrid.docs.shape[0] - 1, sum(len(p - dense_terms) for p in pairs))

  def test_topk_scores_match_bm25s_retrieve(self):
    rng = np.random.default_rng(1)
    docs = _random_corpus(rng)
    queries = _random_queries(rng)
    ref = bm25s.BM25()
    ref.index([[f"t{t}" for t in _strip(d)] for d in docs], show_progress=False)
    _, want = ref.retrieve([[f"t{t}" for t in _strip(q)] for q in queries], k=5,
                           show_progress=False, backend_selection="numpy")
    corpus = bm25.tokenize_corpus(docs)
    index = _jit_build(corpus, VOCAB, bm25.BM25Config(), IGNORE)
    tokens, mask = _pad_queries(queries)
    ids, got = _jit_search(index, _jit_bag(tokens, mask, VOCAB, IGNORE), k=5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    sparse = bm25.build_sparse_bm25_index(corpus, VOCAB, ignore_ids=IGNORE)
    sparse_ids, sparse_got = _jit_sparse_search(sparse, tokens, mask, k=5, ignore_ids=IGNORE,
                                                block=4)
    np.testing.assert_allclose(sparse_got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sparse_ids, ids)


class SparseBM25Test(absltest.TestCase):
  """The posting-list search against the dense one and by hand."""

  def test_toy_corpus_by_hand(self):
    # 3 docs over terms {5, 6, 7}; lucene idf = log(1 + (N - df + .5) / (df + .5)), tf part
    # tf / (tf + k1 (1 - b + b len / avg)).
    docs = [[5, 6, 6], [6, 7], [7, 7, 7, 5, 0]]           # 0 is ignored (and not counted)
    corpus = bm25.tokenize_corpus(docs, pad_id=9)
    index = bm25.build_sparse_bm25_index(corpus, 10, bm25.BM25Config(dense_min_df=2.0),
                                         ignore_ids=(0,))
    np.testing.assert_array_equal(index.starts, [0, 0, 0, 0, 0, 0, 2, 4, 6, 6, 6])
    np.testing.assert_array_equal(index.docs[:-1], [0, 2, 0, 1, 1, 2])      # term-major
    np.testing.assert_array_equal(index.doc_len, [3, 2, 4])
    np.testing.assert_array_equal(index.dense_row, [-1] * 10)
    idf = lambda df: np.log(1 + (3 - df + 0.5) / (df + 0.5))
    tfc = lambda tf, n: tf / (tf + 1.5 * (0.25 + 0.75 * n / 3.0))
    want = [idf(2) * tfc(2, 3) + idf(2) * tfc(1, 3),       # doc 0 for the query [6, 5]
            idf(2) * tfc(1, 2), idf(2) * tfc(1, 4)]
    query, query_mask = jnp.array([[6, 5, 0]]), jnp.array([[1, 1, 1]], bool)
    scores = _jit_sparse_scores(index, query, query_mask, ignore_ids=(0,), block=1)
    np.testing.assert_allclose(scores[0], want, rtol=1e-6)
    # Terms in >= 2/3 of the documents as dense rows: 5, 6, 7 (df 2 each), no postings left.
    hybrid = bm25.build_sparse_bm25_index(corpus, 10, bm25.BM25Config(dense_min_df=0.6),
                                          ignore_ids=(0,))
    np.testing.assert_array_equal(hybrid.starts, [0] * 11)
    np.testing.assert_array_equal(hybrid.dense_row, [-1] * 5 + [0, 1, 2] + [-1] * 2)
    np.testing.assert_allclose(hybrid.dense_weights[1],                     # term 6
                               [idf(2) * tfc(2, 3), idf(2) * tfc(1, 2), 0], rtol=1e-6)
    scores = _jit_sparse_scores(hybrid, query, query_mask, ignore_ids=(0,), block=1)
    np.testing.assert_allclose(scores[0], want, rtol=1e-6)
    # At 0.7 no term is frequent enough.
    none = bm25.build_sparse_bm25_index(corpus, 10, bm25.BM25Config(dense_min_df=0.7),
                                        ignore_ids=(0,))
    self.assertEqual(none.dense_weights.shape, (0, 3))

  def test_equals_dense_search_on_a_zipf_corpus(self):
    rng = np.random.default_rng(3)
    docs = _random_corpus(rng, num_docs=300)
    queries = _random_queries(rng, num_queries=40)
    queries[5] = []                                       # empty: ids 0..k-1 at score 0
    corpus = bm25.tokenize_corpus(docs)
    tokens, mask = _pad_queries([q or [PAD] for q in queries])
    mask[5] = False
    for method in ("lucene", "bm25+"):
      config = bm25.BM25Config(method=method)
      dense_ids, dense_scores = _jit_search(_jit_build(corpus, VOCAB, config, IGNORE),
                                            _jit_bag(tokens, mask, VOCAB, IGNORE), k=8)
      sparse = bm25.build_sparse_bm25_index(
          corpus, VOCAB, dataclasses.replace(config, dense_min_df=2.0), ignore_ids=IGNORE)
      self.assertGreater(int(sparse.starts[3 + 1] - sparse.starts[3]), 200)   # a long list
      hybrid = bm25.build_sparse_bm25_index(corpus, VOCAB, config, ignore_ids=IGNORE)
      self.assertGreaterEqual(int(hybrid.dense_row[3]), 0)   # the same term, a dense row
      for index, block in ((sparse, 1), (sparse, 16), (sparse, 1024), (hybrid, 16)):
        ids, scores = _jit_sparse_search(index, tokens, mask, k=8, ignore_ids=IGNORE,
                                         block=block)
        np.testing.assert_allclose(scores, dense_scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ids, dense_ids, err_msg=f"{method} block {block}")
      if method == "lucene":
        np.testing.assert_array_equal(ids[5], np.arange(8))

  def test_empty_corpus_and_errors(self):
    index = bm25.build_sparse_bm25_index(bm25.tokenize_corpus([[0], [0, 0]]), 8,
                                         ignore_ids=(0,))
    self.assertEqual(index.docs.shape, (1,))                 # only the padding entry
    ids, scores = _jit_sparse_search(index, jnp.array([[3, 4]]), jnp.ones((1, 2), bool), k=2)
    np.testing.assert_array_equal(ids, [[0, 1]])
    np.testing.assert_array_equal(scores, [[0.0, 0.0]])
    with self.assertRaisesRegex(ValueError, r"k must be an int in \[1, M=2\], got 3"):
      bm25.sparse_bm25_search(index, jnp.array([[3]]), jnp.ones((1, 1), bool), 3)
    with self.assertRaisesRegex(ValueError, "posting_block must be an int >= 1, got 0"):
      bm25.sparse_bm25_scores(index, jnp.array([[3]]), jnp.ones((1, 1), bool), block=0)
    with self.assertRaisesRegex(ValueError, "posting_block must be an int >= 1, got 0"):
      bm25.BM25Config(posting_block=0)
    with self.assertRaisesRegex(ValueError, r"dense_min_df must be > 0 .*got 0"):
      bm25.BM25Config(dense_min_df=0)
    with self.assertRaisesRegex(ValueError, r"query_tokens and query_mask must both be"):
      bm25.sparse_bm25_scores(index, jnp.array([[3]]), jnp.ones((1,), bool))


class BM25HandTest(absltest.TestCase):

  def test_toy_corpus_by_hand(self):
    # d0 = [1 2 3] (len 3), d1 = [1 1 4 5] (len 4), d2 = [2 6] (len 2): N=3, avg len 3.
    # Query [1 2]: df(1) = df(2) = 2, lucene idf = log(1 + (3-2+.5)/(2+.5)) = log(1.6).
    # tf part tf / (k1 (1 - b + b len/avg) + tf), k1=1.5, b=.75:
    #   d0: 1/(1.5*1 + 1) = .4 for each of the two terms
    #   d1: tf(1)=2, 2/(1.5*(.25 + .75*4/3) + 2) = 2/3.875
    #   d2: tf(2)=1, 1/(1.5*(.25 + .75*2/3) + 1) = 1/2.125
    corpus = bm25.tokenize_corpus([[1, 2, 3], [1, 1, 4, 5], [2, 6]], pad_id=0)
    index = _jit_build(corpus, 8, bm25.BM25Config(k1=1.5, b=0.75))
    bags = _jit_bag([[1, 2]], [[True, True]], 8)
    idf = np.log(1.6)
    want = [[idf * 0.8, idf * 2 / 3.875, idf / 2.125]]
    np.testing.assert_allclose(_jit_scores(index, bags), want, rtol=1e-6)
    ids, scores = _jit_search(index, bags, k=3)
    np.testing.assert_array_equal(ids, [[0, 1, 2]])
    np.testing.assert_allclose(scores, want, rtol=1e-6)
    # The index itself: term 3 only in d0 (df=1, idf=log(1 + 2.5/1.5)).
    np.testing.assert_allclose(index.weights[3], [np.log(1 + 2.5 / 1.5) * 0.4, 0, 0],
                               rtol=1e-6)

  def test_repeated_query_term_counts(self):
    corpus = bm25.tokenize_corpus([[1, 2, 3], [1, 1, 4, 5], [2, 6]])
    index = _jit_build(corpus, 8, bm25.BM25Config())
    once = _jit_scores(index, _jit_bag([[1, 2, 0]], [[True, True, False]], 8))
    twice = _jit_scores(index, _jit_bag([[1, 1, 2]], [[True, True, True]], 8))
    only_1 = _jit_scores(index, _jit_bag([[1]], [[True]], 8))
    np.testing.assert_allclose(twice, once + only_1, rtol=1e-6)

  def test_max_len_truncates(self):
    corpus = bm25.tokenize_corpus([[4, 5, 6, 7], [8]], pad_id=9, max_len=2)
    np.testing.assert_array_equal(corpus.tokens, [[4, 5], [8, 9]])
    np.testing.assert_array_equal(corpus.lengths, [2, 1])
    index = _jit_build(corpus, 10, bm25.BM25Config())
    np.testing.assert_array_equal(index.weights[6], [0, 0])   # truncated away
    self.assertGreater(float(index.weights[5, 0]), 0)


class BM25IgnoreTest(absltest.TestCase):

  def test_ignored_ids_neither_counted_nor_matched(self):
    clean = [[3, 4, 5], [3, 6], [7, 7, 8, 9]]
    noisy = [[BOS, 3, TAG, 4, 5, TAG], [3, TAG, TAG, TAG, 6], [BOS, 7, 7, 8, 9]]
    cfg = bm25.BM25Config()
    want = _jit_build(bm25.tokenize_corpus(clean), 16, cfg)
    got = _jit_build(bm25.tokenize_corpus(noisy), 16, cfg, IGNORE)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got.weights)[[BOS, TAG]], 0)
    # Without ignore_ids the lengths differ, so the weights do too (the test can fail).
    unignored = _jit_build(bm25.tokenize_corpus(noisy), 16, cfg)
    self.assertGreater(float(jnp.abs(unignored.weights[3:] - want.weights[3:]).max()), 1e-3)

    tokens = [[TAG, 3, BOS, 7, TAG, PAD], [3, 7, PAD, PAD, PAD, PAD]]
    mask = [[True] * 5 + [False], [True, True] + [False] * 4]
    bags = _jit_bag(tokens, mask, 16, IGNORE)
    np.testing.assert_array_equal(bags[0], bags[1])
    np.testing.assert_array_equal(np.asarray(bags)[:, list(IGNORE)], 0)

  def test_query_mask_and_out_of_range_ids(self):
    bags = _jit_bag([[5, 6, 99, -1]], [[True, False, True, True]], 16)
    want = np.zeros((1, 16), np.float32)
    want[0, 5] = 1
    np.testing.assert_array_equal(bags, want)

  def test_all_zero_query_returns_lowest_ids(self):
    index = _jit_build(bm25.tokenize_corpus([[3, 4], [4, 5], [5, 6], [6]]), 8,
                       bm25.BM25Config(), IGNORE)
    bags = _jit_bag([[TAG, BOS, PAD]], [[True, True, True]], 8, IGNORE)
    ids, scores = _jit_search(index, bags, k=3)
    np.testing.assert_array_equal(ids, [[0, 1, 2]])
    np.testing.assert_array_equal(scores, 0)


class BM25SearchTest(absltest.TestCase):

  def test_topk_order_and_ties(self):
    # Docs 1, 3 and 4 are identical, so they tie; doc 2 scores highest.
    docs = [[9, 9, 9], [3, 4, 5], [3, 3, 4], [3, 4, 5], [3, 4, 5], [6]]
    index = _jit_build(bm25.tokenize_corpus(docs), 10, bm25.BM25Config())
    bags = _jit_bag([[3, 4]], [[True, True]], 10)
    scores = np.asarray(_jit_scores(index, bags))[0]
    self.assertEqual(scores[1], scores[3])
    self.assertEqual(scores[1], scores[4])
    self.assertGreater(scores[2], scores[1])
    ids, top = _jit_search(index, bags, k=6)
    np.testing.assert_array_equal(ids, [[2, 1, 3, 4, 0, 5]])   # zeros: docs 0, 5 in order
    np.testing.assert_array_equal(top[0], scores[ids[0]])

  def test_matches_stable_numpy_sort(self):
    rng = np.random.default_rng(3)
    docs = _random_corpus(rng)
    index = _jit_build(bm25.tokenize_corpus(docs), VOCAB, bm25.BM25Config(), IGNORE)
    tokens, mask = _pad_queries(_random_queries(rng))
    bags = _jit_bag(tokens, mask, VOCAB, IGNORE)
    scores = np.asarray(_jit_scores(index, bags))
    ids, top = _jit_search(index, bags, k=10)
    for q in range(scores.shape[0]):
      order = np.lexsort((np.arange(scores.shape[1]), -scores[q]))[:10]
      np.testing.assert_array_equal(ids[q], order)
      np.testing.assert_array_equal(top[q], scores[q, order])

  def test_batched_equals_per_query(self):
    rng = np.random.default_rng(4)
    docs = _random_corpus(rng)
    index = _jit_build(bm25.tokenize_corpus(docs), VOCAB, bm25.BM25Config(), IGNORE)
    tokens, mask = _pad_queries(_random_queries(rng))

    @functools.partial(jax.jit, static_argnames="k")
    def search(index, tokens, mask, k):
      return bm25.bm25_search(index, bm25.query_bag(tokens, mask, VOCAB, ignore_ids=IGNORE), k)

    ids, scores = search(index, tokens, mask, k=4)
    chex.assert_shape(ids, (len(tokens), 4))
    self.assertEqual(ids.dtype, jnp.int32)
    for q in range(len(tokens)):
      ids_q, scores_q = search(index, tokens[q:q + 1], mask[q:q + 1], k=4)
      np.testing.assert_array_equal(ids[q], ids_q[0])
      np.testing.assert_allclose(scores[q], scores_q[0], rtol=1e-6)


class BM25ValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("negative_k1", dict(k1=-0.1), "k1"),
      ("nan_k1", dict(k1=float("nan")), "k1"),
      ("b_above_1", dict(b=1.5), "b"),
      ("b_negative", dict(b=-0.5), "b"),
      ("string_b", dict(b="0.5"), "b"),
      ("negative_delta", dict(delta=-1.0), "delta"),
      ("unknown_method", dict(method="okapi"), "okapi"),
  )
  def test_bad_config(self, kwargs, needle):
    with self.assertRaisesRegex(ValueError, needle):
      bm25.BM25Config(**kwargs)

  def test_good_configs(self):
    for method in ("lucene", "robertson", "atire", "bm25l", "bm25+"):
      self.assertEqual(bm25.BM25Config(method=method, k1=0, b=1).method, method)

  def test_bad_arguments(self):
    corpus = bm25.tokenize_corpus([[3, 4], [5]])
    index = bm25.build_bm25_index(corpus, 8)
    bags = bm25.query_bag(jnp.array([[3]]), jnp.array([[True]]), 8)
    with self.assertRaisesRegex(ValueError, "k must be"):
      bm25.bm25_search(index, bags, k=3)
    with self.assertRaisesRegex(ValueError, "k must be"):
      bm25.bm25_search(index, bags, k=0)
    with self.assertRaisesRegex(ValueError, "bags must be"):
      bm25.bm25_scores(index, jnp.zeros((1, 9)))
    with self.assertRaisesRegex(ValueError, "vocab_size"):
      bm25.build_bm25_index(corpus, 0)
    with self.assertRaisesRegex(ValueError, "ignore_ids"):
      bm25.build_bm25_index(corpus, 8, ignore_ids=("a",))
    with self.assertRaisesRegex(ValueError, "max_len"):
      bm25.tokenize_corpus([[1]], max_len=0)
    with self.assertRaisesRegex(ValueError, "at least one"):
      bm25.tokenize_corpus([])
    with self.assertRaisesRegex(ValueError, r"docs\[1\]"):
      bm25.tokenize_corpus([[1], [[1, 2]]])
    with self.assertRaisesRegex(ValueError, "query_mask"):
      bm25.query_bag(jnp.array([[3]]), jnp.array([True]), 8)


if __name__ == "__main__":
  absltest.main()
