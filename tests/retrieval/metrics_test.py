"""Tests for jaxsearch.retrieval.metrics: parity with pytrec_eval (trec_eval) on random runs
and qrels with ties, graded and negative grades, and queries without relevant documents."""
from __future__ import annotations

import math

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytrec_eval

from jaxsearch.retrieval import metrics

CUTOFFS = (1, 3, 5, 10, 20)


def _random_case(seed: int, num_queries: int = 30, num_docs: int = 40):
  rng = np.random.default_rng(seed)
  docs = [f"d{i}" for i in range(num_docs)] + ["D1", "a", "z9", "d1 0"]   # mixed-case ids
  run, qrels = {}, {}
  for q in range(num_queries):
    qid = f"q{q}"
    judged = rng.choice(docs, size=int(rng.integers(1, 12)), replace=False)
    qrels[qid] = {str(d): int(rng.choice([-1, 0, 0, 1, 1, 2, 3])) for d in judged}
    retrieved = set(rng.choice(docs, size=int(rng.integers(0, 25)), replace=False))
    retrieved |= set(judged[:len(judged) // 2 + 1])    # overlap, not always complete
    # Scores from a few values: many ties, broken by document id.
    run[qid] = {str(d): float(rng.choice([0.5, 1.0, 1.5, 2.25, -1.0]))
                for d in sorted(retrieved)}
  qrels["q0"] = {d: 0 for d in qrels["q0"]}              # judged, nothing relevant
  qrels["only_in_qrels"] = {"d1": 1}                     # missing from the run
  run["only_in_run"] = {"d1": 1.0}                       # missing from the qrels
  run["q1"] = {}                                         # in the run, nothing retrieved
  return run, qrels


def _truncate(run, k):
  """Keeps each query's top k in trec_eval order (pytrec_eval has no recip_rank cutoff)."""
  return {q: {d: s[d] for d in metrics.rank(s)[:k]} for q, s in run.items()}


class ParityTest(parameterized.TestCase):

  @parameterized.parameters((0, 1), (1, 1), (2, 2), (3, 3))
  def test_matches_pytrec_eval(self, seed, relevance_level):
    run, qrels = _random_case(seed)
    cuts = ",".join(map(str, CUTOFFS))
    ref = pytrec_eval.RelevanceEvaluator(
        qrels, {f"recall.{cuts}", f"P.{cuts}", f"ndcg_cut.{cuts}", f"map_cut.{cuts}", "ndcg",
                "map", "recip_rank"}, relevance_level=relevance_level).evaluate(run)
    names = ([f"{m}@{k}" for m in ("recall", "precision", "ndcg", "map", "mrr")
              for k in CUTOFFS] + ["ndcg", "map", "mrr"])
    got = metrics.evaluate(run, qrels, names, relevance_level=relevance_level)
    self.assertEqual(set(got), set(ref))
    self.assertNotIn("only_in_qrels", got)
    self.assertNotIn("only_in_run", got)
    self.assertIn("q1", got)
    rr_at = {k: pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"},
                                               relevance_level=relevance_level
                                               ).evaluate(_truncate(run, k))
             for k in CUTOFFS}
    nonzero = 0
    for qid, want in ref.items():
      for k in CUTOFFS:
        pairs = [(f"recall@{k}", want[f"recall_{k}"]), (f"precision@{k}", want[f"P_{k}"]),
                 (f"ndcg@{k}", want[f"ndcg_cut_{k}"]), (f"map@{k}", want[f"map_cut_{k}"]),
                 (f"mrr@{k}", rr_at[k][qid]["recip_rank"])]
        for name, value in pairs:
          self.assertAlmostEqual(got[qid][name], value, delta=1e-6, msg=f"{qid} {name}")
          nonzero += value > 0
      self.assertAlmostEqual(got[qid]["ndcg"], want["ndcg"], delta=1e-6, msg=qid)
      self.assertAlmostEqual(got[qid]["map"], want["map"], delta=1e-6, msg=qid)
      self.assertAlmostEqual(got[qid]["mrr"], want["recip_rank"], delta=1e-6, msg=qid)
    self.assertGreater(nonzero, 100)                     # the comparison is not vacuous
    for name in ("recall@10", "ndcg@10", "mrr"):
      self.assertEqual(got["q0"][name], 0.0)             # no relevant document

  def test_mean_matches_pytrec_eval_aggregate(self):
    run, qrels = _random_case(7)
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    want = pytrec_eval.compute_aggregated_measure(
        "ndcg_cut_10", [v["ndcg_cut_10"] for v in ref.values()])
    got = metrics.mean_measures(metrics.evaluate(run, qrels, ["ndcg@10"]))
    self.assertAlmostEqual(got["ndcg@10"], want, delta=1e-9)


class HandValuesTest(absltest.TestCase):

  def test_ties_are_broken_by_docid_descending(self):
    self.assertEqual(metrics.rank({"a": 1.0, "c": 1.0, "b": 1.0, "z": 0.5, "B": 1.0}),
                     ["c", "b", "a", "B", "z"])
    run = {"q": {"a": 1.0, "b": 1.0, "c": 1.0}}
    self.assertEqual(metrics.evaluate(run, {"q": {"a": 1}}, ["mrr"])["q"]["mrr"], 1 / 3)

  def test_graded_ndcg(self):
    # ranking d2 (grade 0), d1 (1), d3 (2): DCG = 1/log2(3) + 2/log2(4); ideal = 2 + 1/log2(3).
    run = {"q": {"d1": 0.5, "d2": 0.9, "d3": 0.1}}
    qrels = {"q": {"d1": 1, "d3": 2, "d4": -1}}
    got = metrics.evaluate(run, qrels, ["ndcg@3", "ndcg@1", "recall@2", "precision@2", "map"])
    want = (1 / math.log2(3) + 1.0) / (2 + 1 / math.log2(3))
    self.assertAlmostEqual(got["q"]["ndcg@3"], want, places=12)
    self.assertEqual(got["q"]["ndcg@1"], 0.0)
    self.assertEqual(got["q"]["recall@2"], 0.5)
    self.assertEqual(got["q"]["precision@2"], 0.5)
    self.assertAlmostEqual(got["q"]["map"], (1 / 2 + 2 / 3) / 2, places=12)

  def test_missing_as_zero(self):
    got = metrics.evaluate({}, {"q": {"d": 1}}, ["recall@5"], missing_as_zero=True)
    self.assertEqual(got, {"q": {"recall@5": 0.0}})
    self.assertEqual(metrics.evaluate({}, {"q": {"d": 1}}, ["recall@5"]), {})

  def test_run_from_arrays_and_ann_recall(self):
    run = metrics.run_from_arrays(["q1", "q2"], np.array([[2, 0], [1, -1]]),
                                  np.array([[0.9, 0.1], [0.5, -np.inf]]), ["a", "b", "c"])
    self.assertEqual(run, {"q1": {"c": 0.9, "a": 0.1}, "q2": {"b": 0.5}})
    self.assertEqual(metrics.retrieval_recall(np.array([[1, 2], [3, -1]]),
                                              np.array([[2, 5], [3, 4]])), 0.5)

  def test_bad_measures(self):
    for bad in ("recall", "precision", "ndcg@0", "f1@10", "mrr@", 3):
      with self.assertRaisesRegex(ValueError, "measure"):
        metrics.parse_measure(bad)
    self.assertEqual(metrics.parse_measure("map"), metrics.Measure("map", None))


if __name__ == "__main__":
  absltest.main()
