"""Dense-retriever experiment: config validation, data and training pairs, BM25 hard negatives,
a tiny run (loss falls, beats the untrained encoder), resume, and the gin file."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from absl.testing import absltest
import numpy as np

from jaxsearch import metrics as metrics_lib
from jaxsearch.data.world import WorldConfig
from jaxsearch.models.encoder import EncoderConfig
from jaxsearch.retrieval.corpus import Corpus
from jaxsearch.retrieval.hard_negatives import mine_hard_negatives
from jaxsearch.retrieval.retriever import build_retriever
from jaxsearch.retrieval.trained_encoder import load_text_encoder
from jaxsearch.programs import dense_retriever as dr
from jaxsearch.train.optim import OptimizerConfig

SMALL_WORLD = WorldConfig(num_people=60, num_cities=16, num_countries=6, num_companies=12,
                          num_distractors=20, train_size=120, validation_size=16, test_size=40)


def small_config(**kw) -> dr.DenseRetrieverConfig:
  base = dict(
      world=SMALL_WORLD,
      model=EncoderConfig(vocab_size=1, hidden_size=32, num_layers=1, num_heads=2,
                          intermediate_size=64, max_position=64),
      tokenizer_vocab_size=300, num_hard_negatives=1, hard_negative_depth=5, steps=20,
      batch_size=16, optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
      log_every=5, eval_every=10, checkpoint_every=10, embed_batch_size=64,
      train_eval_size=60)
  base.update(kw)
  return dr.DenseRetrieverConfig(**base)


class ConfigTest(absltest.TestCase):

  def test_validation_names_the_field(self):
    cases = {
        "batch_size": dict(batch_size=0),
        "steps": dict(steps=-1),
        "temperature": dict(temperature=0.0),
        "encoder": dict(encoder="bert-large"),
        "ks": dict(ks=(1, 0)),
        "hard_negative_depth": dict(num_hard_negatives=4, hard_negative_depth=2),
        "max_position": dict(doc_max_length=128),            # the default model has 64
        "queries_path": dict(corpus="/nonexistent/corpus.jsonl"),
        "query_max_length": dict(query_max_length=1),
    }
    for field, kw in cases.items():
      with self.assertRaisesRegex(ValueError, field, msg=field):
        dr.DenseRetrieverConfig(**kw)

  def test_measures(self):
    self.assertEqual(dr.DenseRetrieverConfig(ks=[1, 5, 20]).measures,
                     ("recall@1", "recall@5", "recall@20", "mrr@20", "ndcg@20"))
    self.assertEqual(dr.DenseRetrieverConfig().ks, (1, 10))


class DataTest(absltest.TestCase):

  def test_world_pairs_use_the_first_hop(self):
    data = dr.load_retrieval_data(small_config())
    pairs = dr.training_pairs(data)
    from jaxsearch.data.world import build_world  # noqa: PLC0415
    world = build_world(SMALL_WORLD)
    questions = {q.qid: q for q in world.splits["train"]}
    self.assertLen(pairs.queries, len({q.question for q in world.splits["train"]}))
    self.assertTrue(any(questions[q].hops == 2 for q in pairs.qids))
    for qid, text, pos, excl in zip(pairs.qids, pairs.queries, pairs.positives, pairs.exclude):
      q = questions[qid]
      self.assertEqual(text, q.question)
      self.assertEqual(data.corpus.ids[pos], q.supporting_doc_ids[0])
      self.assertEqual({data.corpus.ids[r] for r in excl}, set(q.supporting_doc_ids))
    # Test questions are judged against their first hop only.
    for qid, judged in data.test_qrels.items():
      self.assertLen(judged, 1)

  def test_beir_directory_and_search_r1_file(self):
    d = tempfile.mkdtemp()
    corpus = Corpus(ids=("d1", "d2", "d3"), titles=("A", "B", ""),
                    texts=("alpha text", "beta text", "gamma"))
    with open(os.path.join(d, "corpus.jsonl"), "w") as f:
      for i, t, x in zip(corpus.ids, corpus.titles, corpus.texts):
        f.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    with open(os.path.join(d, "queries.jsonl"), "w") as f:
      for qid, text in (("q1", "alpha?"), ("q2", "beta or gamma?"), ("q3", "unused")):
        f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    os.makedirs(os.path.join(d, "qrels"))
    with open(os.path.join(d, "qrels", "train.tsv"), "w") as f:
      f.write("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\nq2\td3\t1\nq2\td1\t0\n")
    with open(os.path.join(d, "qrels", "test.tsv"), "w") as f:
      f.write("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    r1 = os.path.join(d, "r1.jsonl")
    corpus.write_jsonl(r1)
    for config in (dr.DenseRetrieverConfig(corpus=d),
                   dr.DenseRetrieverConfig(
                       corpus=r1, queries_path=os.path.join(d, "queries.jsonl"),
                       train_qrels_path=os.path.join(d, "qrels", "train.tsv"),
                       test_qrels_path=os.path.join(d, "qrels", "test.tsv"))):
      data = dr.load_retrieval_data(config)
      self.assertEqual(data.corpus.ids, corpus.ids)
      self.assertEqual(data.test_queries, {"q1": "alpha?"})
      pairs = dr.training_pairs(data)
      self.assertEqual(pairs.qids, ("q1", "q2", "q2"))        # grade 0 is not a positive
      self.assertEqual(pairs.positives.tolist(), [0, 1, 2])
      self.assertEqual(pairs.exclude[1], frozenset({1, 2}))
    with open(os.path.join(d, "qrels", "test.tsv"), "a") as f:
      f.write("q1\tnope\t1\n")
    with self.assertRaisesRegex(ValueError, "nope"):
      dr.load_retrieval_data(dr.DenseRetrieverConfig(corpus=d))


class HardNegativesTest(absltest.TestCase):

  def test_bm25_order_without_positives(self):
    data = dr.load_retrieval_data(small_config())
    pairs = dr.training_pairs(data)
    bm25 = build_retriever("bm25", data.corpus)
    depth = 6
    negatives = mine_hard_negatives(bm25, pairs.queries, pairs.exclude, depth, batch_size=7)
    self.assertEqual(negatives.shape, (len(pairs.queries), depth))
    # Reference: the full BM25 score matrix, ranked by score (ties toward the lower row),
    # relevant rows dropped.
    scores = bm25.scores(list(pairs.queries))
    for i, excl in enumerate(pairs.exclude):
      self.assertNotIn(int(pairs.positives[i]), negatives[i].tolist())
      self.assertEmpty(set(negatives[i].tolist()) & excl)
      ranking = np.lexsort((np.arange(scores.shape[1]), -scores[i]))
      expected = [r for r in ranking.tolist() if r not in excl][:depth]
      self.assertEqual(negatives[i].tolist(), expected)
    # They are hard: most share words with the query (positive BM25 score).
    self.assertGreater(np.mean(np.take_along_axis(scores, negatives, axis=1) > 0), 0.9)


class RunTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = small_config()
    cls.workdir = tempfile.mkdtemp()
    cls.summary = dr.run(cls.config, cls.workdir)

  def test_loss_falls_and_beats_the_untrained_encoder(self):
    rows = [r for r in metrics_lib.read_metrics(self.workdir) if "dense/loss" in r]
    self.assertEqual([r["step"] for r in rows], [1, 5, 10, 15, 20])
    self.assertLess(rows[-1]["dense/loss"], 0.5 * rows[0]["dense/loss"])
    s = self.summary
    self.assertGreater(s["train_trained_recall@1"], s["train_untrained_recall@1"] + 0.2)
    self.assertGreater(s["train_trained_mrr@10"], s["train_untrained_mrr@10"])
    for split in ("test", "train"):
      for system in dr.SYSTEMS:
        for m in self.config.measures:
          self.assertBetween(s[f"{split}_{system}_{m}"], 0.0, 1.0)
    self.assertEqual(s["num_test_queries"], 40)
    self.assertTrue(any("valid/recall@1" in r for r in metrics_lib.read_metrics(self.workdir)))

  def test_workdir_and_cache(self):
    names = set(os.listdir(self.workdir))
    for name in ("summary.json", "metrics.jsonl", dr.CONFIG_FILE, dr.ENCODER_CONFIG_FILE,
                 dr.TOKENIZER_FILE, "checkpoints", dr.EMBEDDINGS_DIR):
      self.assertIn(name, names)
    cached = [n for n in os.listdir(os.path.join(self.workdir, dr.EMBEDDINGS_DIR))
              if n.endswith(".npy")]
    self.assertLen(cached, 2)                             # trained and untrained
    self.assertEqual(dr.load_config(self.workdir), self.config)
    # The saved encoder reproduces the test recall through the text encoder + exact search.
    data = dr.load_retrieval_data(self.config)
    retriever = build_retriever("exact", data.corpus, encoder=load_text_encoder(self.workdir))
    got = dr.evaluate_search(retriever.search, data.test_queries, data.test_qrels,
                             data.corpus.ids, ("recall@10",))
    self.assertAlmostEqual(got["recall@10"], self.summary["test_trained_recall@10"], delta=0.03)

  def test_resume_continues_from_the_checkpoint(self):
    # A copy of the run as if killed after its step-10 checkpoint: the step-20 checkpoint,
    # the metrics after step 10 and the summary are gone.
    workdir = os.path.join(tempfile.mkdtemp(), "run")
    shutil.copytree(self.workdir, workdir)
    shutil.rmtree(os.path.join(workdir, dr.CHECKPOINT_DIR, "20"))
    os.remove(os.path.join(workdir, "summary.json"))
    rows = metrics_lib.read_metrics(workdir)
    with open(os.path.join(workdir, metrics_lib.METRICS_FILE), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= 10)
    resumed = dr.run(self.config, workdir)                 # steps 11..20 only
    rows = {r["step"]: r for r in metrics_lib.read_metrics(workdir) if "dense/loss" in r}
    ref = {r["step"]: r for r in metrics_lib.read_metrics(self.workdir) if "dense/loss" in r}
    self.assertEqual(sorted(rows), [1, 5, 10, 15, 20])    # nothing trained twice
    for step in (15, 20):                                  # the same batches from the same state
      self.assertAlmostEqual(rows[step]["dense/loss"], ref[step]["dense/loss"], places=4)
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, dr.CHECKPOINT_DIR))), ["10", "20"])
    for key in ("test_trained_recall@1", "test_trained_recall@10", "train_trained_mrr@10"):
      self.assertAlmostEqual(resumed[key], self.summary[key], places=4)


def gin_config(*bindings) -> dr.DenseRetrieverConfig:
  """The DenseRetrieverConfig that gin/experiments/dense_retriever.gin binds to `run.config`."""
  import gin  # noqa: PLC0415
  from experiments.run import parse_gin  # noqa: PLC0415
  gin.clear_config()
  try:
    parse_gin(["gin/experiments/dense_retriever.gin"], list(bindings))
    return gin.get_configurable(dr.DenseRetrieverConfig)()
  finally:
    gin.clear_config()


class GinExperimentTest(absltest.TestCase):

  def test_gin_file_binds_the_library_defaults(self):
    self.assertEqual(gin_config(), dr.DenseRetrieverConfig())
    self.assertEqual(gin_config("DENSE_STEPS = 7").steps, 7)

  def test_entry_point(self):
    import gin  # noqa: PLC0415
    from experiments import run as launcher  # noqa: PLC0415
    self.assertIn("jaxsearch.programs.dense_retriever.run", launcher.ENTRY_POINTS)
    gin.clear_config()
    try:
      launcher.parse_gin(["gin/experiments/dense_retriever.gin"], [])
      self.assertIs(launcher.entry_point().__wrapped__, dr.run)
    finally:
      gin.clear_config()


if __name__ == "__main__":
  absltest.main()
