"""Tests for jaxsearch.retrieval.stale_index: exact and ScaNN agree before and after a refresh;
segments search one world and return rows of the whole array."""
from __future__ import annotations

import numpy as np
from absl.testing import absltest

from jaxsearch.retrieval.scann_index import ScannConfig
from jaxsearch.retrieval.stale_index import StaleIndex


class StaleIndexTest(absltest.TestCase):

  def test_scann_matches_exact_before_and_after_refresh(self):
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    exact = StaleIndex("exact", ScannConfig(), docs, 0)
    scann = StaleIndex("scann", ScannConfig(), docs, 0)
    np.testing.assert_array_equal(exact.search(queries, 5)[0], scann.search(queries, 5)[0])
    np.testing.assert_array_equal(exact.search(queries, 5)[0],
                                  np.argsort(-(queries @ docs.T), axis=1)[:, :5])
    new = rng.standard_normal((300, 16)).astype(np.float32)
    exact.refresh(new, 7)
    scann.refresh(new, 7)
    self.assertEqual(scann.refreshed_at, 7)
    ids, scores = scann.search(queries, 5)
    np.testing.assert_array_equal(exact.search(queries, 5)[0], ids)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ new.T, ids, 1), rtol=1e-5)

  def test_segments_search_one_world_and_return_global_rows(self):
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((50, 8)).astype(np.float32)
    queries = rng.standard_normal((6, 8)).astype(np.float32)
    segments = [(0, 20), (20, 50)]
    for kind in ("exact", "scann"):
      index = StaleIndex(kind, ScannConfig(), docs, 0, segments)
      for w, (a, b) in enumerate(segments):
        ids, _ = index.search(queries, 3, segment=w)
        expected = a + np.argsort(-(queries @ docs[a:b].T), axis=1)[:, :3]
        np.testing.assert_array_equal(ids, expected, err_msg=f"{kind} segment {w}")
    with self.assertRaisesRegex(ValueError, "segments"):
      StaleIndex("exact", ScannConfig(), docs, 0, [(0, 60)])


if __name__ == "__main__":
  absltest.main()
