"""Tests for jaxsearch.generative.docids: hand-checked docIDs, uniqueness of every builder,
DSI leaf sizes, RQ reconstruction, hypernym paths on the real WordNet asset, and errors."""
from __future__ import annotations

import collections

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from jaxsearch.data.wordnet import load_wordnet_entities
from jaxsearch.generative import docids as D


def _sequences(ids: D.DocIds) -> list[tuple[int, ...]]:
  return [tuple(int(c) for c in row[:n]) for row, n in zip(ids.codes, ids.lengths)]


def _assert_unique_prefix_free(test, ids: D.DocIds, prefix_free=True):
  seqs = _sequences(ids)
  test.assertLen(set(seqs), len(seqs), "docIDs are not unique")
  if prefix_free:
    full = set(seqs)
    for s in seqs:
      for m in range(1, len(s)):
        test.assertNotIn(s[:m], full, f"{s[:m]} is a docID and a prefix of {s}")
  # Padding and range invariants, checked directly.
  for row, n in zip(ids.codes, ids.lengths):
    test.assertTrue(np.all(row[:n] >= 0) and np.all(row[:n] < ids.num_codes))
    test.assertTrue(np.all(row[n:] == -1))


def _random_paths(rng, n, depth=5, branching=3):
  paths = []
  for _ in range(n):
    length = int(rng.integers(1, depth + 1))
    paths.append(tuple(f"c{int(x)}" for x in rng.integers(0, branching, length)))
  return paths


class SimpleDocIdsTest(parameterized.TestCase):

  def test_atomic(self):
    ids = D.atomic_docids(4)
    np.testing.assert_array_equal(ids.codes, [[0], [1], [2], [3]])
    np.testing.assert_array_equal(ids.lengths, [1, 1, 1, 1])
    self.assertEqual((ids.num_codes, ids.kind), (4, "atomic"))

  @parameterized.named_parameters(
      ("one_doc", 1, 10, 1), ("ten_docs", 10, 10, 1), ("eleven_docs", 11, 10, 2),
      ("hundred_docs", 100, 10, 2), ("hundred_one_docs", 101, 10, 3), ("binary_9", 9, 2, 4))
  def test_naive_width(self, n, base, width):
    ids = D.naive_docids(n, base=base)
    self.assertEqual(ids.codes.shape, (n, width))
    self.assertEqual(ids.num_codes, base)
    # Reading the digits back gives the row index.
    values = (ids.codes * base ** np.arange(width)[::-1]).sum(1)
    np.testing.assert_array_equal(values, np.arange(n))

  def test_naive_by_hand(self):
    np.testing.assert_array_equal(D.naive_docids(12).codes[[0, 7, 10, 11]],
                                  [[0, 0], [0, 7], [1, 0], [1, 1]])

  def test_tokens_and_strings(self):
    ids = D.make_docids([[3, 1, 7], [2], [0, 5]])
    self.assertEqual(ids.num_codes, 8)
    np.testing.assert_array_equal(
        D.docid_tokens(ids, code_offset=100),
        [[103, 101, 107, 108], [102, 108, -1, -1], [100, 105, 108, -1]])
    self.assertEqual(D.docid_strings(ids), ["3-1-7", "2", "0-5"])


class UniquenessTest(parameterized.TestCase):

  @parameterized.product(n=[1, 2, 7, 60, 300],
                         builder=["atomic", "naive", "semantic", "rq", "hypernym"])
  def test_unique(self, n, builder):
    rng = np.random.default_rng(n)
    emb = rng.normal(size=(n, 6))
    ids = {
        "atomic": lambda: D.atomic_docids(n),
        "naive": lambda: D.naive_docids(n, base=3),
        "semantic": lambda: D.semantic_docids(emb, k=3, c=4, seed=1),
        "rq": lambda: D.rq_docids(emb, levels=2, codebook_size=4, seed=1),
        "hypernym": lambda: D.hypernym_docids(_random_paths(rng, n)),
    }[builder]()
    self.assertEqual(ids.kind, builder)
    self.assertEqual(ids.codes.shape[0], n)
    _assert_unique_prefix_free(self, ids)

  def test_duplicate_embeddings_still_unique(self):
    emb = np.repeat(np.arange(3.0)[:, None], 40, axis=0)           # 3 points, 40 copies each
    sem = D.semantic_docids(emb, k=4, c=5)
    _assert_unique_prefix_free(self, sem)
    leaves = collections.Counter(s[:-1] for s in _sequences(sem))
    self.assertLessEqual(max(leaves.values()), 5)
    rq = D.rq_docids(emb, levels=2, codebook_size=8)
    _assert_unique_prefix_free(self, rq)
    self.assertEqual(rq.codes.shape[1], 3)                          # a suffix was needed
    self.assertEqual(rq.num_codes, 40)                              # max(8, largest suffix + 1)


class SemanticDocIdsTest(parameterized.TestCase):

  def test_one_level_by_hand(self):
    # Two tight pairs far apart, k=2, c=2: [cluster, index in cluster (row order)].
    ids = D.semantic_docids(np.array([[0.0], [100.0], [0.1], [100.1]]), k=2, c=2)
    codes = ids.codes
    self.assertEqual(codes[0, 0], codes[2, 0])
    self.assertEqual(codes[1, 0], codes[3, 0])
    self.assertNotEqual(codes[0, 0], codes[1, 0])
    np.testing.assert_array_equal(codes[:, 1], [0, 0, 1, 1])
    self.assertEqual(ids.num_codes, 2)

  def test_two_levels_by_hand(self):
    # Two far groups (x = 0 / 1000), each of two pairs (y = 0 / 10): 3 codes per docID.
    pts = np.array([[0, 0], [1000, 0], [0, 10], [1000, 10],
                    [0, 0.1], [1000, 0.1], [0, 10.1], [1000, 10.1]])
    ids = D.semantic_docids(pts, k=2, c=2, seed=3)
    np.testing.assert_array_equal(ids.lengths, [3] * 8)
    by_group = {0: [0, 2, 4, 6], 1000: [1, 3, 5, 7]}
    tops = {x: {int(ids.codes[i, 0]) for i in rows} for x, rows in by_group.items()}
    self.assertEqual([len(t) for t in tops.values()], [1, 1])
    self.assertNotEqual(tops[0], tops[1000])
    for rows in by_group.values():
      pair_a, pair_b = (rows[0], rows[2]), (rows[1], rows[3])     # y = 0 pair, y = 10 pair
      for a, b in (pair_a, pair_b):
        np.testing.assert_array_equal(ids.codes[a, :2], ids.codes[b, :2])
        self.assertEqual((ids.codes[a, 2], ids.codes[b, 2]), (0, 1))
      self.assertNotEqual(ids.codes[pair_a[0], 1], ids.codes[pair_b[0], 1])

  def test_small_corpus_is_one_leaf(self):
    ids = D.semantic_docids(np.random.default_rng(0).normal(size=(5, 3)), k=10, c=100)
    np.testing.assert_array_equal(ids.codes, np.arange(5)[:, None])
    self.assertEqual(ids.num_codes, 100)

  @parameterized.named_parameters(("k2_c3", 2, 3), ("k5_c10", 5, 10), ("k10_c1", 10, 1))
  def test_leaf_clusters_and_ranges(self, k, c):
    emb = np.random.default_rng(k * 7 + c).normal(size=(400, 8))
    ids = D.semantic_docids(emb, k=k, c=c, seed=0)
    self.assertEqual(ids.num_codes, max(k, c))
    seqs = _sequences(ids)
    leaves = collections.Counter(s[:-1] for s in seqs)
    self.assertLessEqual(max(leaves.values()), c)
    self.assertTrue(all(s[-1] < c for s in seqs))
    self.assertTrue(all(x < k for s in seqs for x in s[:-1]))
    # Every internal node of the cluster tree splits into >= 2 children.
    children = collections.defaultdict(set)
    for s in seqs:
      for d in range(len(s) - 1):
        children[s[:d]].add(s[d])
    self.assertTrue(all(len(v) >= 2 for v in children.values()))

  def test_clusters_follow_geometry(self):
    # Four well separated blobs of 30 points, k=4, c=30: one top-level code per blob.
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [50, 0], [0, 50], [50, 50]], float)
    emb = np.concatenate([c + rng.normal(size=(30, 2)) for c in centres])
    ids = D.semantic_docids(emb, k=4, c=30, seed=0)
    tops = ids.codes[:, 0].reshape(4, 30)
    self.assertTrue(all(len(set(row)) == 1 for row in tops))
    self.assertLen(set(tops[:, 0]), 4)

  def test_deterministic(self):
    emb = np.random.default_rng(1).normal(size=(200, 5))
    a = D.semantic_docids(emb, k=3, c=7, seed=5)
    b = D.semantic_docids(emb, k=3, c=7, seed=5)
    np.testing.assert_array_equal(a.codes, b.codes)


class RQDocIdsTest(absltest.TestCase):

  def test_reconstruction_error_decreases_with_levels(self):
    emb = np.random.default_rng(0).normal(size=(300, 8))
    codes, books = D.residual_quantize(emb, levels=4, codebook_size=8, seed=0)
    self.assertEqual(codes.shape, (300, 4))
    recon = np.zeros_like(emb)
    errors = [float(np.sum(emb ** 2))]
    for level, book in enumerate(books):
      self.assertLessEqual(book.shape[0], 8)
      recon = recon + book[codes[:, level]]
      errors.append(float(np.sum((emb - recon) ** 2)))
    self.assertTrue(all(b < a for a, b in zip(errors, errors[1:])), errors)

  def test_codes_match_residual_quantize_and_kmeans(self):
    emb = np.random.default_rng(1).normal(size=(50, 4))
    codes, books = D.residual_quantize(emb, levels=2, codebook_size=6, seed=2)
    ids = D.rq_docids(emb, levels=2, codebook_size=6, seed=2)
    np.testing.assert_array_equal(ids.codes[:, :2], codes)
    # Each point's level-1 code is its nearest level-1 centroid.
    d = ((emb[:, None] - books[0][None]) ** 2).sum(-1)
    np.testing.assert_array_equal(codes[:, 0], d.argmin(1))

  def test_no_suffix_without_collisions(self):
    # codebook_size >= N with distinct points: level 1 alone separates every document.
    emb = np.random.default_rng(2).normal(size=(10, 3))
    ids = D.rq_docids(emb, levels=2, codebook_size=16)
    self.assertEqual(ids.codes.shape, (10, 2))
    self.assertLen(set(ids.codes[:, 0].tolist()), 10)
    self.assertEqual(ids.num_codes, 16)

  def test_suffix_by_hand(self):
    ids = D.rq_docids(np.array([[0.0], [0.0], [5.0], [0.0]]), levels=1, codebook_size=2)
    # Rows 0, 1, 3 share the level-1 code: suffixes 0, 1, 2 in row order; row 2 gets 0.
    np.testing.assert_array_equal(ids.codes[:, 1], [0, 1, 0, 2])
    self.assertEqual(ids.codes[0, 0], ids.codes[1, 0])
    self.assertNotEqual(ids.codes[0, 0], ids.codes[2, 0])
    self.assertEqual(ids.num_codes, 3)


class HypernymDocIdsTest(absltest.TestCase):

  def test_by_hand(self):
    paths = [("e", "place", "city"), ("e", "act"), ("e", "place", "city"), ("e", "place")]
    ids = D.hypernym_docids(paths)
    # Root "e" -> 0. Children of e: act 0, place 1. Children of (e, place): city 0, then the
    # document ending there (row 3) 1. Children of (e, place, city): rows 0, 2 -> 0, 1.
    # Children of (e, act): row 1 -> 0.
    self.assertEqual(_sequences(ids), [(0, 1, 0, 0), (0, 0, 0), (0, 1, 0, 1), (0, 1, 1)])
    self.assertEqual(ids.num_codes, 2)
    self.assertEqual(ids.kind, "hypernym")

  def test_wordnet_asset(self):
    entities = load_wordnet_entities()
    paths = [e.hypernym_path for e in entities]
    self.assertLen(paths, 7730)
    ids = D.hypernym_docids(paths)
    _assert_unique_prefix_free(self, ids)
    np.testing.assert_array_equal(ids.lengths, [len(p) + 1 for p in paths])
    self.assertTrue(np.all(ids.codes[:, 0] == 0))                   # one root: "entity"
    # Documents share a docID prefix exactly as far as they share their class path.
    seqs = _sequences(ids)
    by_path = collections.defaultdict(list)
    for s, p in zip(seqs, paths):
      by_path[tuple(p)].append(s)
    for group in by_path.values():
      self.assertLen({s[:-1] for s in group}, 1)
    self.assertLen({s[:-1] for s in seqs}, len(by_path))
    largest = max(len(g) for g in by_path.values())
    self.assertGreaterEqual(ids.num_codes, largest)


class ErrorsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("atomic_zero", lambda: D.atomic_docids(0), "n"),
      ("atomic_float", lambda: D.atomic_docids(2.0), "n"),
      ("naive_base_one", lambda: D.naive_docids(5, base=1), "base"),
      ("semantic_k_one", lambda: D.semantic_docids(np.ones((4, 2)), k=1), "k must"),
      ("semantic_c_zero", lambda: D.semantic_docids(np.ones((4, 2)), c=0), "c must"),
      ("semantic_1d", lambda: D.semantic_docids(np.ones(4)), r"\[N, D\].*\(4,\)"),
      ("semantic_empty", lambda: D.semantic_docids(np.ones((0, 3))), r"\(0, 3\)"),
      ("semantic_nan", lambda: D.semantic_docids(np.full((2, 2), np.nan)), "finite"),
      ("rq_levels_zero", lambda: D.rq_docids(np.ones((4, 2)), levels=0), "levels"),
      ("rq_codebook_zero", lambda: D.rq_docids(np.ones((4, 2)), codebook_size=0),
       "codebook_size"),
      ("hypernym_none", lambda: D.hypernym_docids([]), "at least one"),
      ("hypernym_empty_path", lambda: D.hypernym_docids([("a",), ()]), r"paths\[1\]"),
      ("hypernym_string_path", lambda: D.hypernym_docids(["abc"]), "'abc'"),
      ("make_duplicates", lambda: D.make_docids([[1, 2], [0], [1, 2]]), r"rows \[0, 2\]"),
      ("make_empty_seq", lambda: D.make_docids([[1], []]), "sequence 1"),
      ("make_code_range", lambda: D.make_docids([[1, 5]], num_codes=3), r"codes\[0, 1\] = 5"),
      ("tokens_offset", lambda: D.docid_tokens(D.atomic_docids(2), -1), "code_offset"),
  )
  def test_raises(self, fn, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      fn()

  def test_validate_padding(self):
    bad = D.DocIds(codes=np.array([[0, 1], [1, 0]], np.int32), lengths=np.array([2, 1]),
                   num_codes=2, kind="custom")
    with self.assertRaisesRegex(ValueError, r"codes\[1, 1\] = 0 must be -1"):
      D.validate_docids(bad)
    bad = bad._replace(lengths=np.array([2, 3]))
    with self.assertRaisesRegex(ValueError, "lengths"):
      D.validate_docids(bad)


class BuilderRegistryTest(parameterized.TestCase):
  """`build_docids(kind, inputs)` calls the registered builder with the inputs it names."""

  def test_each_kind_is_its_builder(self):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    paths = [("entity", "city" if i % 2 else "person", str(i)) for i in range(40)]
    inputs = {"n": 40, "base": 4, "embeddings": lambda: emb, "k": 3, "c": 5, "levels": 2,
              "codebook_size": 8, "seed": 1, "paths": paths}
    direct = {"atomic": D.atomic_docids(40), "naive": D.naive_docids(40, 4),
              "semantic": D.semantic_docids(emb, k=3, c=5, seed=1),
              "rq": D.rq_docids(emb, levels=2, codebook_size=8, seed=1),
              "hypernym": D.hypernym_docids(paths)}
    self.assertCountEqual(D.KINDS, D.DOCID_BUILDERS.names())
    for kind in D.KINDS:
      got = D.build_docids(kind, inputs)
      np.testing.assert_array_equal(got.codes, direct[kind].codes, err_msg=kind)
      self.assertEqual(got.num_codes, direct[kind].num_codes)

  def test_lazy_inputs_are_computed_only_when_taken(self):
    def boom():
      raise AssertionError("embeddings computed for a kind that does not use them")
    self.assertEqual(D.build_docids("naive", {"n": 5, "base": 2, "embeddings": boom}).num_codes, 2)

  def test_missing_inputs_and_unknown_kinds_are_named(self):
    with self.assertRaisesRegex(ValueError, "docID kind 'semantic' needs inputs \\['embeddings'\\]"):
      D.build_docids("semantic", {"n": 5})
    with self.assertRaisesRegex(LookupError, "unknown docID kind 'random'"):
      D.build_docids("random", {"n": 5})


if __name__ == "__main__":
  absltest.main()
