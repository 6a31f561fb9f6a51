"""Dense-retriever experiment: config validation, data and training pairs, BM25 hard negatives,
batches, the update and the evaluation on hand-made inputs, one tiny run (files, cadence,
resume), and the gin file."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch import metrics as metrics_lib
from jaxsearch.data.world import WorldConfig
from jaxsearch.data.wordpiece import WordPieceTokenizer
from jaxsearch.models.encoder import EncoderConfig, init_encoder_params
from jaxsearch.retrieval.corpus import Corpus
from jaxsearch.retrieval.hard_negatives import mine_hard_negatives
from jaxsearch.retrieval.retriever import build_retriever
from jaxsearch.retrieval.trained_encoder import load_text_encoder
from jaxsearch.programs import dense_retriever as dr
from jaxsearch.train.dual_encoder import DualEncoderBatch
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


def hand_pairs(n: int = 6) -> tuple[dr.TrainingPairs, np.ndarray]:
  """n pairs whose positive is row 10 + i, and 3 mined negatives each (100 + 3 i + j)."""
  pairs = dr.TrainingPairs(tuple(f"q{i}" for i in range(n)), tuple(f"text {i}" for i in range(n)),
                           10 + np.arange(n), tuple(frozenset({10 + i}) for i in range(n)))
  return pairs, 100 + np.arange(3 * n).reshape(n, 3)


class BatchTest(absltest.TestCase):

  def test_batch_rows_epochs_and_negatives(self):
    pairs, negatives = hand_pairs()
    config = small_config(batch_size=4, num_hard_negatives=2, hard_negative_depth=3, seed=5)
    seen = []
    for step in range(3):
      idx, rows = dr.batch_rows(pairs, negatives, step, config)
      # The pre-skeleton order: epoch e is permutation(n) of rng [seed, 1, e], wrapping.
      epoch, pos = divmod(step * 4, 6)
      order = np.random.default_rng([5, 1, epoch]).permutation(6)
      np.testing.assert_array_equal(idx, np.take(order, np.arange(pos, pos + 4), mode="wrap"))
      self.assertEqual(rows.shape, (4 + 4 * 2,))
      np.testing.assert_array_equal(rows[:4], 10 + idx)          # positives first
      negs = rows[4:].reshape(4, 2)                              # then H per pair, in order
      for i, pair in enumerate(idx):
        self.assertLen(set(negs[i].tolist()), 2)
        self.assertContainsSubset(negs[i].tolist(), negatives[pair].tolist())
      seen.append(idx)
      again = dr.batch_rows(pairs, negatives, step, config)
      np.testing.assert_array_equal(again[1], rows)               # resumable: same draw
    self.assertEqual(sorted(seen[0].tolist() + seen[1][:2].tolist()), list(range(6)))
    # The draw changes with the step.
    draws = {tuple(dr.batch_rows(pairs, negatives, s, config)[1][4:]) for s in range(6)}
    self.assertGreater(len(draws), 1)
    idx, rows = dr.batch_rows(pairs, negatives, 0, small_config(batch_size=4,
                                                                num_hard_negatives=0, seed=5))
    np.testing.assert_array_equal(rows, 10 + idx)

  def test_sample_batch_tensors(self):
    pairs, negatives = hand_pairs()
    config = small_config(batch_size=2, num_hard_negatives=1, hard_negative_depth=3)
    # Row r of the docs / queries carries r in column 1; masks cover 2 + r % 3 tokens.
    def tokenized(n, width):
      ids = np.zeros((n, width), np.int32)
      ids[:, 1] = np.arange(n)
      mask = (np.arange(width)[None] < (2 + np.arange(n) % 3)[:, None]).astype(np.int32)
      return dr.Tokenized(ids, mask)
    docs, queries = tokenized(200, 8), tokenized(6, 4)
    batch = dr.sample_batch(pairs, negatives, docs, queries, 3, config)
    idx, rows = dr.batch_rows(pairs, negatives, 3, config)
    self.assertEqual(batch.query_ids.shape, (2, 4))
    self.assertEqual(batch.doc_ids.shape, (4, 8))
    np.testing.assert_array_equal(batch.query_ids[:, 1], idx)
    np.testing.assert_array_equal(batch.doc_ids[:, 1], rows)
    np.testing.assert_array_equal(batch.doc_keys, rows)
    np.testing.assert_array_equal(batch.doc_mask, docs.attention_mask[rows])
    np.testing.assert_array_equal(batch.query_mask, queries.attention_mask[idx])


class UpdateTest(absltest.TestCase):

  def test_update_is_info_nce_at_the_configured_temperature(self):
    cfg = EncoderConfig(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2,
                        intermediate_size=16, max_position=16)
    params = init_encoder_params(cfg, jax.random.key(0))
    fns = dr._functions(cfg, OptimizerConfig(learning_rate=1e-2), 10, 0.5)
    rng = np.random.default_rng(0)
    q_ids = jnp.asarray(rng.integers(5, 20, (2, 6)), jnp.int32)
    d_ids = jnp.asarray(rng.integers(5, 20, (4, 6)), jnp.int32)
    q_mask, d_mask = jnp.ones((2, 6), jnp.int32), jnp.ones((4, 6), jnp.int32)
    # Doc 2 is query 0's positive again (key 7): not a negative of query 0, one of query 1.
    keys = jnp.array([7, 8, 7, 9], jnp.int32)
    embed = jax.jit(fns.embed_fn)      # op by op, every operation is its own compile
    q = np.asarray(embed(params, q_ids, q_mask), np.float64)
    d = np.asarray(embed(params, d_ids, d_mask), np.float64)
    logits = q @ d.T / 0.5
    lse0 = np.log(np.sum(np.exp(logits[0, [0, 1, 3]])))
    lse1 = np.log(np.sum(np.exp(logits[1])))
    expected = ((lse0 - logits[0, 0]) + (lse1 - logits[1, 1])) / 2
    state = fns.create_state(params)
    new, m = fns.update(state, DualEncoderBatch(q_ids, q_mask, d_ids, d_mask, keys),
                        jax.random.key(0))
    self.assertAlmostEqual(float(m["loss"]), expected, places=5)
    self.assertEqual(int(new.step), 1)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params, params)
    self.assertGreater(max(jax.tree.leaves(moved)), 0.0)


def fixed_search(table):
  """`search(texts, k)` returning the rows `table[text]` with decreasing scores."""
  def search(texts, k):
    rows = np.array([table[t][:k] for t in texts])
    return rows, np.tile(np.arange(k, 0, -1, dtype=np.float32), (len(texts), 1))
  return search


class EvaluationTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    corpus = Corpus(ids=("a", "b", "c"), titles=("", "", ""), texts=("x", "y", "z"))
    judged = {"x": "a", "y": "c", "z": "b"}                # each text's relevant document
    queries = {f"q{i}": t for i, t in enumerate("xyz")}
    qrels = {q: {judged[t]: 1} for q, t in queries.items()}
    train_queries = {f"t{i}": t for i, t in enumerate("xyz")}
    train_qrels = {q: {judged[t]: 1} for q, t in train_queries.items()}
    self.data = dr.RetrievalData(corpus, train_queries, train_qrels, {}, queries, qrels,
                                 queries, qrels)
    # x: a first (hit at 1); y: c second (hit at 2); z: b never.
    self.fixed = fixed_search({"x": [0, 1], "y": [1, 2], "z": [0, 2]})
    self.perfect = fixed_search({"x": [0, 1], "y": [2, 0], "z": [1, 0]})

  def test_evaluate_search_by_hand(self):
    got = dr.evaluate_search(self.fixed, self.data.test_queries, self.data.test_qrels,
                             self.data.corpus.ids, ("recall@1", "recall@2", "mrr@2", "ndcg@2"))
    self.assertAlmostEqual(got["recall@1"], 1 / 3)
    self.assertAlmostEqual(got["recall@2"], 2 / 3)
    self.assertAlmostEqual(got["mrr@2"], (1 + 0.5 + 0) / 3)
    self.assertAlmostEqual(got["ndcg@2"], (1 + 1 / np.log2(3) + 0) / 3)
    self.assertEqual(dr.evaluate_search(self.fixed, {}, {}, self.data.corpus.ids,
                                        ("recall@1",)), {"recall@1": 0.0})

  def test_evaluate_systems_names_and_train_sample(self):
    config = small_config(ks=(1, 2), train_eval_size=2)
    got = dr.evaluate_systems({"fixed": self.fixed, "perfect": self.perfect}, self.data, config)
    self.assertLen(got, 2 * 2 * 4)                        # systems x splits x measures
    self.assertAlmostEqual(got["test_fixed_recall@1"], 1 / 3)
    self.assertAlmostEqual(got["test_fixed_mrr@2"], 0.5)
    # The train sample is the first two training queries (x, y) only.
    self.assertEqual(got["train_fixed_recall@1"], 0.5)
    self.assertEqual(got["train_fixed_recall@2"], 1.0)
    self.assertEqual(got["train_fixed_mrr@2"], 0.75)
    for split in ("test", "train"):
      for m in config.measures:
        self.assertEqual(got[f"{split}_perfect_{m}"], 1.0)
    self.assertEqual(dr.train_sample(self.data, 2)[1], {"t0": {"a": 1}, "t1": {"c": 1}})

  def test_dense_search_chunks_and_pads_queries(self):
    tok = WordPieceTokenizer(dr.train_wordpiece(["a cat sat", "a dog"], 64), max_length=16)
    rng = np.random.default_rng(0)
    qv, dv = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
    widths = []

    def embed(tokens):
      widths.append(tokens.input_ids.shape)
      return qv[:len(tokens.input_ids)]

    search = dr._dense_search(embed, tok, dv, width=12, batch_size=2)
    ids, scores = search(["a cat", "a dog", "cat", "dog sat", "a"], 3)
    self.assertEqual(widths, [(5, 12)])                   # padded to the shared width
    np.testing.assert_array_equal(ids, np.argsort(-(qv @ dv.T), axis=1)[:, :3])
    np.testing.assert_allclose(scores, np.sort(qv @ dv.T, axis=1)[:, ::-1][:, :3], rtol=1e-5)


class RunTest(absltest.TestCase):
  """One tiny end-to-end run: files, checkpoints, cadence, summary keys, resume."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = small_config(
        model=EncoderConfig(vocab_size=1, hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32, max_position=64),
        steps=4, batch_size=8, log_every=3, eval_every=2, checkpoint_every=2,
        train_eval_size=20)
    cls.workdir = tempfile.mkdtemp()
    cls.calls = []
    cls.summary = dr.run(cls.config, cls.workdir, after_first_step=lambda: cls.calls.append(1))

  def test_workdir_cadence_and_summary(self):
    self.assertEqual(self.calls, [1])
    names = set(os.listdir(self.workdir))
    for name in ("summary.json", "metrics.jsonl", dr.CONFIG_FILE, dr.ENCODER_CONFIG_FILE,
                 dr.TOKENIZER_FILE, "checkpoints", dr.EMBEDDINGS_DIR):
      self.assertIn(name, names)
    self.assertEqual(sorted(os.listdir(os.path.join(self.workdir, dr.CHECKPOINT_DIR))),
                     ["2", "4"])
    cached = [n for n in os.listdir(os.path.join(self.workdir, dr.EMBEDDINGS_DIR))
              if n.endswith(".npy")]
    self.assertLen(cached, 2)                             # trained and untrained
    self.assertEqual(dr.load_config(self.workdir), self.config)
    rows = metrics_lib.read_metrics(self.workdir)
    losses = [r for r in rows if "dense/loss" in r]
    self.assertEqual([r["step"] for r in losses], [1, 3, 4])     # step 1, every 3, the last
    self.assertEqual([r["step"] for r in rows if "valid/recall@1" in r], [2])   # not at 4
    s = self.summary
    self.assertEqual(s["final_loss"], losses[-1]["dense/loss"])
    for split in ("test", "train"):
      for system in dr.SYSTEMS:
        for m in self.config.measures:
          self.assertBetween(s[f"{split}_{system}_{m}"], 0.0, 1.0)
    for key in ("encoder", "corpus", "steps", "num_docs", "num_train_pairs",
                "num_test_queries", "num_params", "train_seconds", "eval_seconds",
                "wall_seconds"):
      self.assertIn(key, s)
    self.assertEqual(s["num_test_queries"], 40)
    self.assertEqual(s["num_train_eval_queries"], 20)
    with open(os.path.join(self.workdir, "summary.json")) as f:
      self.assertEqual(json.load(f)["test_trained_recall@10"], s["test_trained_recall@10"])
    # The saved encoder reproduces the test recall through the text encoder + exact search.
    data = dr.load_retrieval_data(self.config)
    retriever = build_retriever("exact", data.corpus, encoder=load_text_encoder(self.workdir))
    got = dr.evaluate_search(retriever.search, data.test_queries, data.test_qrels,
                             data.corpus.ids, ("recall@10",))
    self.assertAlmostEqual(got["recall@10"], s["test_trained_recall@10"], delta=0.03)

  def test_resume_continues_from_the_checkpoint(self):
    # A copy of the run as if killed after its step-2 checkpoint: the step-4 checkpoint,
    # the metrics after step 2 and the summary are gone.
    workdir = os.path.join(tempfile.mkdtemp(), "run")
    shutil.copytree(self.workdir, workdir)
    shutil.rmtree(os.path.join(workdir, dr.CHECKPOINT_DIR, "4"))
    os.remove(os.path.join(workdir, "summary.json"))
    rows = metrics_lib.read_metrics(workdir)
    with open(os.path.join(workdir, metrics_lib.METRICS_FILE), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= 2)
    calls = []
    resumed = dr.run(self.config, workdir, after_first_step=lambda: calls.append(1))
    self.assertEqual(calls, [1])                           # steps 3 and 4 only
    rows = {r["step"]: r for r in metrics_lib.read_metrics(workdir) if "dense/loss" in r}
    ref = {r["step"]: r for r in metrics_lib.read_metrics(self.workdir) if "dense/loss" in r}
    self.assertEqual(sorted(rows), [1, 3, 4])              # nothing trained twice
    for step in (3, 4):                                    # the same batches from the same state
      self.assertAlmostEqual(rows[step]["dense/loss"], ref[step]["dense/loss"], places=5)
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, dr.CHECKPOINT_DIR))), ["2", "4"])
    for key in ("test_trained_recall@1", "test_trained_recall@10", "train_trained_mrr@10"):
      self.assertAlmostEqual(resumed[key], self.summary[key], places=5)


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
