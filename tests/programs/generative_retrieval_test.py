"""DSI experiment: config validation, data (splits, templates, WordNet subset), the stages'
rows, the stage loop, the evaluation on hand-made rankings, one tiny run (summary keys,
checkpoints, resume, reading the workdir back), and the gin files."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest

from jaxsearch import metrics as metrics_lib
from jaxsearch.checkpoint import Checkpointer
from jaxsearch.data.tokenizer import ByteTokenizer
from jaxsearch.data.world import WorldConfig, build_world
from jaxsearch.generative import docids as docids_lib
from jaxsearch.generative import dsi
from jaxsearch.generative.workdir import load_docids, load_model
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.programs import generative_retrieval as dsi_run
from jaxsearch.retrieval import corpus as corpus_lib
from jaxsearch.train import trainer
from jaxsearch.train.optim import OptimizerConfig
from jaxsearch.train.state import TrainState

SMALL_WORLD = WorldConfig(num_people=40, num_cities=10, num_countries=4, num_companies=8,
                          num_distractors=10, train_size=80, validation_size=10, test_size=30)
TINY = TransformerConfig(vocab_size=1, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
                         mlp_dim=64, max_len=64)


def small_config(**kw) -> dsi_run.DSIConfig:
  base = dict(world=SMALL_WORLD, model=TINY, tokenizer_vocab_size=400, steps=4, batch_size=16,
              optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2), log_every=2,
              checkpoint_every=2, beam_sizes=(2,), baselines=("bm25",), latency_queries=2,
              ddro_steps=2, ddro_batch_size=8, hard_negative_depth=3, eval_batch_size=16,
              pseudo_queries="generated", qgen_model=TINY, qgen_steps=2, qgen_batch_size=8,
              qgen_samples_per_doc=2, qgen_max_tokens=8)
  base.update(kw)
  return dsi_run.DSIConfig(**base)


class ConfigTest(absltest.TestCase):

  def test_validation_names_the_field(self):
    cases = {
        "corpus": dict(corpus="msmarco"),
        "max_docs": dict(max_docs=100),                      # world: every passage is indexed
        "docid": dict(docid="title"),
        "embeddings": dict(embeddings="tfidf"),
        "dense_workdir": dict(docid="semantic", embeddings="dense"),
        "pseudo_queries": dict(pseudo_queries="doc2query"),
        "indexing_ratio": dict(indexing_ratio=-1.0),
        "ddro_beta": dict(ddro_beta=0.0),
        "beam_sizes": dict(beam_sizes=(10, 0)),
        "ks": dict(ks=()),
        "baselines": dict(baselines=("bm25", "splade")),
        "steps": dict(steps=-1),
        "batch_size": dict(batch_size=0),
        "naive_base": dict(naive_base=1),
        "model.max_len": dict(max_input_tokens=126),          # the default model has 128
        "qgen_model.max_len": dict(pseudo_queries="generated", qgen_max_tokens=120),
    }
    for field, kw in cases.items():
      with self.assertRaisesRegex(ValueError, f"DSIConfig.{field}", msg=field):
        dsi_run.DSIConfig(**kw)

  def test_normalised_fields(self):
    config = dsi_run.DSIConfig(beam_sizes=[20, 1, 10, 10], ks=[10, 1])
    self.assertEqual(config.beam_sizes, (1, 10, 20))
    self.assertEqual(config.measures, ("recall@1", "recall@10", "mrr@10"))


class DataTest(absltest.TestCase):

  def test_world_splits_templates_and_paths(self):
    data = dsi_run.load_dsi_data(small_config())
    world = build_world(SMALL_WORLD)
    self.assertLen(data.corpus, len(world.documents))
    for name, split in (("seen", "train"), ("unseen", "test")):
      questions = {q.qid: q for q in world.splits[split]}
      got = data.splits[name]
      self.assertLen(got.queries, len({q.question for q in questions.values()}))
      for qid, text in got.queries.items():
        self.assertEqual(text, questions[qid].question)
        self.assertEqual(got.qrels[qid], {questions[qid].supporting_doc_ids[0]: 1})
    # Template pseudo-queries: a test question's wording is among its document's templates.
    templates = dict(zip(data.corpus.ids, data.templates))
    for q in world.splits["test"]:
      self.assertIn(q.question, templates[q.supporting_doc_ids[0]])
    self.assertLen(templates["person-0000"], 5)
    self.assertLen(templates["company-0000"], 2)
    self.assertLen(templates["city-0000"], 1)
    self.assertEqual(templates["country-0000"], ())
    self.assertEqual(data.class_paths[data.corpus.row("distractor-0003")], ("distractor",))

  def test_wordnet_subset_is_seeded_and_restricts_the_queries(self):
    a = dsi_run.load_dsi_data(dsi_run.DSIConfig(corpus="wordnet", max_docs=300, seed=1))
    b = dsi_run.load_dsi_data(dsi_run.DSIConfig(corpus="wordnet", max_docs=300, seed=1))
    c = dsi_run.load_dsi_data(dsi_run.DSIConfig(corpus="wordnet", max_docs=300, seed=2))
    self.assertLen(a.corpus, 300)
    self.assertEqual(a.corpus.ids, b.corpus.ids)
    self.assertNotEqual(a.corpus.ids, c.corpus.ids)
    ids = set(a.corpus.ids)
    seen_docs = {d for j in a.splits["seen"].qrels.values() for d in j}
    unseen_docs = {d for j in a.splits["unseen"].qrels.values() for d in j}
    self.assertTrue(seen_docs <= ids and unseen_docs <= ids)
    self.assertGreater(len(a.splits["seen"].queries), 300)       # ~0.8 * 300 * 2 kinds
    self.assertGreater(len(a.splits["unseen"].queries), 20)
    self.assertEmpty({q.split("-", 1)[1] for q in a.splits["seen"].queries}
                     & {q.split("-", 1)[1] for q in a.splits["unseen"].queries})
    row = a.corpus.row(next(iter(a.splits["unseen"].qrels[next(iter(a.splits["unseen"].queries))])))
    self.assertTrue(a.doc_inputs[row].startswith(a.corpus.titles[row] + ": "))
    self.assertEqual(a.class_paths[row][0], "00001740")              # entity.n.01 first


def _hand_data() -> dsi_run.DSIData:
  """Three documents, two seen queries, one unseen (ByteTokenizer: one id per character)."""
  corpus = corpus_lib.Corpus(ids=("d0", "d1", "d2"), titles=("A", "B", "C"),
                             texts=("aaaaa", "bcdef", "cc"))
  seen = dsi_run.QuerySet({"s0": "xy", "s1": "z"}, {"s0": {"d2": 1}, "s1": {"d0": 1}})
  unseen = dsi_run.QuerySet({"u0": "w"}, {"u0": {"d1": 1}})
  return dsi_run.DSIData(corpus=corpus, doc_inputs=corpus.texts,
                         splits={"seen": seen, "validation": unseen, "unseen": unseen},
                         templates=((), (), ()), class_paths=(("a",), ("b",), ("c",)))


class TrainingDataTest(absltest.TestCase):
  """The DSI and DDRO stages' rows, built from a hand-made corpus."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = ByteTokenizer()
    cls.data = _hand_data()
    cls.layout = dsi.DSILayout(code_offset=cls.tok.vocab_size, num_codes=3,
                               sep_id=cls.tok.bos_id, pad_id=cls.tok.pad_id)
    cls.config = dsi_run.DSIConfig(max_input_tokens=4, batch_size=4, indexing_ratio=1.0,
                                   ddro_batch_size=2)
    cls.td = dsi_run.build_training_data(cls.config, cls.data, cls.tok,
                                         docids_lib.atomic_docids(3), cls.layout,
                                         {"d1": ["pq"]})

  def _inputs(self, batch, i):
    row = batch.tokens[i]
    return row[:list(row).index(self.layout.sep_id)].tolist()

  def test_pools(self):
    td, enc = self.td, self.tok.encode
    self.assertEqual(td.input_width, 4)                         # "aaaaa" and "bcdef" are cut
    self.assertEqual(td.num_pseudo, 1)
    self.assertEqual(td.doc_tokens, [enc("aaaa"), enc("bcde"), enc("cc")])
    self.assertEqual(td.indexing.doc_rows.tolist(), [0, 1, 2, 1])   # documents, then "pq"
    self.assertEqual(self._inputs(td.indexing, 3), enc("pq"))
    self.assertEqual(td.retrieval.doc_rows.tolist(), [2, 0])       # s0 -> d2, s1 -> d0
    self.assertEqual(td.seen_rows.tolist(), [2, 0])
    # A row ends with its document's docID (atomic: one code) and END.
    row = td.retrieval.tokens[0][td.retrieval.loss_mask[0]]
    np.testing.assert_array_equal(row, td.targets[2][td.targets[2] >= 0])
    self.assertEqual(row[0], self.layout.code_offset + 2)

  def test_dsi_batch_mixes_the_pools_and_is_a_function_of_the_step(self):
    td = self.td
    batch = dsi_run.dsi_batch(self.config, td, 0)
    self.assertLen(batch.tokens, 4)
    # indexing_ratio 1: two indexing rows (first), two retrieval rows: one epoch of each.
    self.assertEqual(sorted(batch.doc_rows[2:].tolist()), [0, 2])
    np.testing.assert_array_equal(dsi_run.dsi_batch(self.config, td, 0).tokens, batch.tokens)
    pool = {tuple(r) for r in td.indexing.tokens.tolist()}
    rows = [tuple(r) for s in (0, 1) for r in dsi_run.dsi_batch(self.config, td, s).tokens[:2]
            .tolist()]
    self.assertEqual(set(rows), pool)                 # two steps: the 4 rows of the epoch

  def test_dsi_batch_chunks_documents(self):
    config = dataclasses.replace(self.config, indexing_chunk_tokens=2, indexing_ratio=math.inf)
    for step in range(3):
      batch = dsi_run.dsi_batch(config, self.td, step)
      for i, row in enumerate(batch.doc_rows.tolist()):
        ids = self._inputs(batch, i)
        if ids != self.tok.encode("pq"):                        # a document's chunk
          doc = self.td.doc_tokens[row]
          self.assertLen(ids, min(2, len(doc)))
          self.assertTrue(any(doc[s:s + len(ids)] == ids for s in range(len(doc))), (ids, doc))
        target = self.td.targets[row]
        np.testing.assert_array_equal(batch.tokens[i][batch.loss_mask[i]], target[target >= 0])

  def test_ddro_pairs(self):
    negatives = np.array([[0, 1], [1, 2]])                    # none is the query's own
    pairs = dsi_run.ddro_pairs(self.config, self.td, negatives, step=0)
    np.testing.assert_array_equal(pairs.chosen.attention_mask.sum(1) > 0, True)
    for i in range(2):
      self.assertEqual(self._inputs(pairs.chosen, i), self._inputs(pairs.rejected, i))
      q = [self.tok.encode(t) for t in ("xy", "z")].index(self._inputs(pairs.chosen, i))
      self.assertEqual(pairs.chosen.doc_rows[i], self.td.seen_rows[q])
      self.assertIn(pairs.rejected.doc_rows[i], negatives[q])


class _Writer:
  def __init__(self):
    self.rows = []

  def write_scalars(self, step, scalars):
    self.rows.append((int(step), dict(scalars)))


class RunStageTest(absltest.TestCase):
  """`run_stage`: the log cadence (first step included), checkpoints with their metadata,
  resume, a finished stage, and the launcher's callback once per call."""

  def _state(self):
    return TrainState.create(apply_fn=None, params={"w": jnp.zeros(2)}, tx=optax.sgd(1.0))

  def _run(self, workdir, steps, writer, callback, **kw):
    config = dsi_run.DSIConfig(log_every=3, checkpoint_every=2, **kw)

    def step_fn(state, step):
      return state.apply_gradients(grads={"w": -jnp.ones(2)}), {
          "loss": jnp.float32(10 * step)}, trainer.StepWork()
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "dsi"))
    return dsi_run.run_stage("dsi", config, self._state(), step_fn, steps=steps, ckpt=ckpt,
                             writer=writer, progress_keys=("loss",), after_first_step=callback)

  def test_cadence_checkpoints_and_resume(self):
    workdir, writer, calls = tempfile.mkdtemp(), _Writer(), []
    callback = trainer.once(lambda: calls.append(1))
    state, last, seconds = self._run(workdir, 5, writer, callback)
    self.assertEqual([s for s, _ in writer.rows], [1, 3, 5])
    self.assertEqual([r["dsi/loss"] for _, r in writer.rows], [0, 20, 40])
    self.assertIn("dsi/s_per_step", writer.rows[0][1])
    self.assertEqual(last, {"loss": 40.0})
    self.assertGreater(seconds, 0.0)
    np.testing.assert_array_equal(state.params["w"], [5, 5])
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "dsi"))
    self.assertEqual(ckpt.all_steps(), [4, 5])            # every 2 steps and the last
    tree, meta = ckpt.restore(5, None)
    ckpt.close()
    self.assertEqual((meta["phase"], meta["last"]), ("dsi", {"loss": 40.0}))
    self.assertBetween(meta["seconds"], 0.0, seconds)
    # A longer second stage resumes at step 5; the callback has already run.
    state, last, _ = self._run(workdir, 7, writer, callback)
    self.assertEqual([s for s, _ in writer.rows[3:]], [6, 7])
    self.assertEqual(last, {"loss": 60.0})
    np.testing.assert_array_equal(state.params["w"], [7, 7])
    self.assertEqual(calls, [1])
    # A finished stage runs nothing and reports its checkpoint's metrics.
    state, last, seconds2 = self._run(workdir, 7, writer, callback)
    self.assertLen(writer.rows, 5)
    self.assertEqual(last, {"loss": 60.0})
    self.assertGreaterEqual(seconds2, meta["seconds"])


class _FakeSearcher:
  """Returns fixed rankings: row `code` of `RANKS[params]`, `code` = the prompt's first id;
  free (unconstrained) search puts an invalid output (-1) first."""

  RANKS = {"ddro": {0: [0, 1], 1: [2, 0], 2: [1, 2], 10: [2, 1], 11: [0, 1], 12: [1, 0]},
           "dsi": {c: [2, 1] for c in (0, 1, 2, 10, 11, 12)}}

  def search(self, params, prompts, mask, beam, constrained):
    docs = np.array([self.RANKS[params][int(c)] for c in prompts[:, 0]])[:, :beam]
    if not constrained:
      docs = np.concatenate([np.full((len(docs), 1), -1), docs[:, :-1]], axis=1)
    return docs, np.tile(-np.arange(beam, dtype=np.float32), (len(docs), 1))

  def batched_ms_per_query(self, beam, constrained):
    return 0.5

  def latency_ms(self, params, prompts, mask, beam, constrained, n):
    return 7.0


class EvaluateTest(absltest.TestCase):

  def test_measures_by_hand(self):
    corpus = corpus_lib.Corpus(ids=("d0", "d1", "d2"), titles=("", "", ""), texts=("", "", ""))
    unseen = dsi_run.QuerySet({"u0": "", "u1": "", "u2": ""},
                              {"u0": {"d0": 1}, "u1": {"d0": 1}, "u2": {"d1": 1}})
    seen = dsi_run.QuerySet({"s0": "", "s1": "", "s2": ""},
                            {"s0": {"d2": 1}, "s1": {"d1": 1}, "s2": {"d0": 1}})
    data = dsi_run.DSIData(corpus, ("", "", ""), {"seen": seen, "unseen": unseen}, (), ())
    prompts = {"unseen": (np.array([[0], [1], [2]]), np.ones((3, 1), bool)),
               "seen": (np.array([[10], [11], [12]]), np.ones((3, 1), bool))}
    config = dsi_run.DSIConfig(beam_sizes=(1, 2), ks=(1, 2), latency_queries=2)
    got = dsi_run.evaluate_model(config, _FakeSearcher(), "ddro", "ddro", prompts, data,
                                 {"seen": ["s2", "s0"], "unseen": None}, dsi_params="dsi")
    # unseen: u0 [d0, d1] hit at 1; u1 [d2, d0] at 2; u2 [d1, d2] at 1.
    self.assertAlmostEqual(got["unseen_ddro_beam2_recall@1"], 2 / 3)
    self.assertAlmostEqual(got["unseen_ddro_beam2_recall@2"], 1.0)
    self.assertAlmostEqual(got["unseen_ddro_beam2_mrr@2"], (1 + 0.5 + 1) / 3)
    # seen, s2 then s0 only: s2 [d1, d0] at 2, s0 [d2, d1] at 1.
    self.assertAlmostEqual(got["seen_ddro_beam2_recall@1"], 0.5)
    self.assertAlmostEqual(got["seen_ddro_beam2_mrr@2"], 0.75)
    # A beam of one returns one document: recall@2 is recall@1.
    self.assertAlmostEqual(got["unseen_ddro_beam1_recall@2"], got["unseen_ddro_beam1_recall@1"])
    self.assertAlmostEqual(got["unseen_ddro_beam1_recall@1"], 2 / 3)
    for split in ("seen", "unseen"):
      for m in config.measures:
        self.assertEqual(got[f"{split}_gr_{m}"], got[f"{split}_ddro_beam2_{m}"])
      self.assertEqual(got[f"{split}_ddro_free_beam2_invalid"], 1.0)
      self.assertNotIn(f"{split}_ddro_beam2_invalid", got)
    # The DSI stage's model (every query gets [d2, d1]), constrained, largest beam only.
    self.assertAlmostEqual(got["unseen_dsi_beam2_recall@1"], 0.0)
    self.assertAlmostEqual(got["unseen_dsi_beam2_recall@2"], 1 / 3)
    self.assertAlmostEqual(got["seen_dsi_beam2_recall@1"], 0.5)
    self.assertNotIn("unseen_dsi_beam1_recall@1", got)
    self.assertEqual(got["latency_ms_ddro_beam2"], 7.0)
    self.assertNotIn("latency_ms_ddro_free_beam2", got)
    self.assertEqual(got["batched_ms_per_query_ddro_free_beam1"], 0.5)


@pytest.mark.slow
class RunTest(absltest.TestCase):
  """One short end-to-end run of the three stages (qgen, dsi, ddro), then a resume."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = small_config(eval_every=2)
    cls.workdir = os.path.join(tempfile.mkdtemp(), "run")
    cls.summary = dsi_run.run(cls.config, cls.workdir)

  def test_summary_workdir_and_resume(self):
    config, summary = self.config, self.summary
    with open(os.path.join(self.workdir, "summary.json")) as f:
      self.assertEqual(json.load(f), json.loads(json.dumps(summary)))
    for split in ("seen", "unseen"):
      for m in config.measures:
        for system in ("gr", "ddro_beam2", "ddro_free_beam2", "dsi_beam2", "bm25"):
          self.assertBetween(summary[f"{split}_{system}_{m}"], 0.0, 1.0, f"{split}_{system}_{m}")
        self.assertEqual(summary[f"{split}_gr_{m}"], summary[f"{split}_ddro_beam2_{m}"])
      self.assertBetween(summary[f"{split}_ddro_free_beam2_invalid"], 0.0, 1.0)
    for key in ("latency_ms_ddro_beam2", "latency_ms_bm25", "final_loss", "qgen_final_loss",
                "ddro_final_loss", "train_seconds", "qgen_train_seconds", "ddro_seconds"):
      self.assertGreater(summary[key], 0.0, key)
    world = build_world(SMALL_WORLD)
    self.assertEqual((summary["num_docs"], summary["num_codes"], summary["docid_length"]),
                     (len(world.documents), len(world.documents), 1))
    self.assertEqual(summary["final_system"], "ddro")
    for name in ("dsi_config.json", "model_config.json", "tokenizer.model", "docids.npz"):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, name)), name)
    self.assertEqual(dsi_run.load_config(self.workdir), config)
    with open(os.path.join(self.workdir, "pseudo_queries.json")) as f:
      pseudo = json.load(f)["queries"]
    self.assertEqual(sorted(pseudo), sorted(d.doc_id for d in world.documents))
    self.assertEqual(summary["num_pseudo_queries"], sum(len(q) for q in pseudo.values()))
    rows = metrics_lib.read_metrics(self.workdir)
    for stage, steps in (("qgen", [1, 2]), ("dsi", [1, 2, 4]), ("ddro", [1, 2])):
      self.assertEqual([r["step"] for r in rows if f"{stage}/loss" in r], steps, stage)
    # Validation every 2 DSI steps, but not at the last (the full evaluation follows).
    self.assertEqual([r["step"] for r in rows if "valid/recall@1" in r], [2])
    for stage, steps in (("qgen", ["2"]), ("dsi", ["2", "4"]), ("ddro", ["2"])):
      self.assertEqual(sorted(os.listdir(os.path.join(self.workdir, "checkpoints", stage))),
                       steps, stage)
    docids, doc_ids = load_docids(self.workdir)
    self.assertEqual((docids.kind, doc_ids[0]), ("atomic", world.documents[0].doc_id))

    # Resume, as if killed after the DSI checkpoint of step 2: the same summary.
    workdir = os.path.join(tempfile.mkdtemp(), "run")
    shutil.copytree(self.workdir, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "dsi", "4"))
    shutil.rmtree(os.path.join(workdir, "checkpoints", "ddro"))
    os.remove(os.path.join(workdir, "summary.json"))
    with open(os.path.join(workdir, metrics_lib.METRICS_FILE), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows
                   if "qgen/loss" in r or ("dsi/loss" in r and r["step"] <= 2))
    resumed = dsi_run.run(config, workdir)
    got = [r for r in metrics_lib.read_metrics(workdir, deduplicate=False) if "dsi/loss" in r]
    ref = {r["step"]: r for r in rows if "dsi/loss" in r}
    self.assertEqual([r["step"] for r in got], [1, 2, 4])   # nothing trained twice
    got = {r["step"]: r for r in got}
    self.assertAlmostEqual(got[4]["dsi/loss"], ref[4]["dsi/loss"], places=4)
    for key in ("unseen_gr_recall@1", "seen_gr_mrr@10", "seen_dsi_beam2_recall@10",
                "qgen_final_loss"):
      self.assertAlmostEqual(resumed[key], summary[key], places=4)

  def test_load_model_reproduces_the_final_scores(self):
    import jax  # noqa: PLC0415
    from jaxsearch.generative.trie import build_trie, trie_depth  # noqa: PLC0415
    model, params, tok, docids, layout = load_model(self.workdir)       # DDRO stage
    self.assertEqual(model.config.vocab_size, layout.vocab_size)
    self.assertEqual(layout.code_offset, tok.vocab_size)
    _, dsi_params, _, _, _ = load_model(self.workdir, phase="dsi")
    differs = jax.tree.leaves(jax.tree.map(lambda a, b: bool((a != b).any()), params,
                                           dsi_params))
    self.assertTrue(any(differs))                                  # DDRO moved the weights
    data = dsi_run.load_dsi_data(self.config)
    split = data.splits["unseen"]
    prompts, mask = dsi.prompt_batch([tok.encode(q) for q in split.queries.values()], layout,
                                     max_input_tokens=self.config.max_input_tokens)
    retrieve = jax.jit(dsi.make_retrieve_fn(model, layout, beam_size=2,
                                            num_steps=trie_depth(docids)))
    docs, scores = dsi.batched_retrieve(retrieve, params, build_trie(docids), prompts, mask, 16)
    from jaxsearch.retrieval import metrics as rm  # noqa: PLC0415
    run = rm.run_from_arrays(list(split.queries), docs, scores, data.corpus.ids)
    got = rm.mean_measures(rm.evaluate(run, split.qrels, ("mrr@10",), missing_as_zero=True))
    self.assertAlmostEqual(got["mrr@10"], self.summary["unseen_ddro_beam2_mrr@10"], places=5)

  def test_bm25_rows_match_a_direct_evaluation(self):
    from jaxsearch.retrieval import metrics as rm  # noqa: PLC0415
    from jaxsearch.retrieval.retriever import build_retriever  # noqa: PLC0415
    data = dsi_run.load_dsi_data(self.config)
    split = data.splits["unseen"]
    ids, scores = build_retriever("bm25", data.corpus).search(list(split.queries.values()), 10)
    run = rm.run_from_arrays(list(split.queries), ids, scores, data.corpus.ids)
    expected = rm.mean_measures(rm.evaluate(run, split.qrels, ("recall@1", "mrr@10")))
    self.assertAlmostEqual(self.summary["unseen_bm25_recall@1"], expected["recall@1"])
    self.assertAlmostEqual(self.summary["unseen_bm25_mrr@10"], expected["mrr@10"])


def gin_config(path: str, *bindings) -> dsi_run.DSIConfig:
  """The DSIConfig a gin file binds to `dsi.run.config`."""
  import gin  # noqa: PLC0415
  from experiments.run import entry_point, parse_gin  # noqa: PLC0415
  gin.clear_config()
  try:
    parse_gin([path], list(bindings))
    assert entry_point().__module__ == "jaxsearch.programs.generative_retrieval"
    return gin.get_configurable(dsi_run.DSIConfig)()
  finally:
    gin.clear_config()


class GinExperimentTest(absltest.TestCase):

  def test_world_gin_file_binds_the_library_defaults(self):
    self.assertEqual(gin_config("gin/experiments/dsi_world.gin"), dsi_run.DSIConfig())
    config = gin_config("gin/experiments/dsi_world.gin", 'DOCID = "semantic"', "DSI_STEPS = 7")
    self.assertEqual((config.docid, config.steps), ("semantic", 7))

  def test_wordnet_gin_file(self):
    config = gin_config("gin/experiments/dsi_wordnet.gin")
    self.assertEqual(config.corpus, "wordnet")
    self.assertGreater(config.max_docs, 0)


if __name__ == "__main__":
  absltest.main()
