"""Tests for jaxsearch.retrieval.hard_negatives (a hand example and the errors; the dense
retriever's test checks BM25 order on a whole world's training pairs)."""
from __future__ import annotations

from absl.testing import absltest

from jaxsearch.retrieval.corpus import Corpus
from jaxsearch.retrieval.hard_negatives import mine_hard_negatives
from jaxsearch.retrieval.retriever import build_retriever


class HardNegativesTest(absltest.TestCase):

  def test_hand_example_and_errors(self):
    corpus = Corpus(ids=("a", "b", "c", "d"), titles=("", "", "", ""),
                    texts=("red apple", "red red car", "green apple", "blue sky"))
    bm25 = build_retriever("bm25", corpus)
    # "red apple": a (both words) > b (red twice) > c (apple) > d (none); a is the positive.
    self.assertEqual(mine_hard_negatives(bm25, ["red apple"], [{0}], 2).tolist(), [[1, 2]])
    self.assertEqual(mine_hard_negatives(bm25, ["red apple"], [{1}], 3).tolist(),
                     [[0, 2, 3]])
    with self.assertRaisesRegex(ValueError, "documents"):
      mine_hard_negatives(bm25, ["red apple"], [{0, 1}], 3)
    with self.assertRaisesRegex(ValueError, "depth"):
      mine_hard_negatives(bm25, ["red apple"], [{0}], 0)


if __name__ == "__main__":
  absltest.main()
