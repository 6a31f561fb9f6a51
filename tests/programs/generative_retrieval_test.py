"""DSI experiment: config validation, data (splits, templates, WordNet subset), a tiny run that
writes the summary's keys, resume, and the gin files."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from absl.testing import absltest
import pytest

from jaxsearch import metrics as metrics_lib
from jaxsearch.data.world import WorldConfig, build_world
from jaxsearch.generative.workdir import load_docids, load_model
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.programs import generative_retrieval as dsi_run
from jaxsearch.train.optim import OptimizerConfig

SMALL_WORLD = WorldConfig(num_people=40, num_cities=10, num_countries=4, num_companies=8,
                          num_distractors=10, train_size=80, validation_size=10, test_size=30)
TINY = TransformerConfig(vocab_size=1, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
                         mlp_dim=64, max_len=64)


def small_config(**kw) -> dsi_run.DSIConfig:
  base = dict(world=SMALL_WORLD, model=TINY, tokenizer_vocab_size=400, steps=10, batch_size=16,
              optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2), log_every=5,
              checkpoint_every=5, beam_sizes=(1, 3), baselines=("bm25",), latency_queries=2,
              ddro_steps=4, ddro_batch_size=8, hard_negative_depth=3, eval_batch_size=16,
              pseudo_queries="generated", qgen_model=TINY, qgen_steps=4, qgen_batch_size=8,
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


@pytest.mark.slow
class RunTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = small_config()
    cls.workdir = os.path.join(tempfile.mkdtemp(), "run")
    cls.summary = dsi_run.run(cls.config, cls.workdir)

  def test_summary_has_the_expected_keys(self):
    with open(os.path.join(self.workdir, "summary.json")) as f:
      summary = json.load(f)
    self.assertEqual(summary, json.loads(json.dumps(self.summary)))
    for split in ("seen", "unseen"):
      for m in ("recall@1", "recall@10", "mrr@10"):
        for system in ("gr", "ddro_beam1", "ddro_beam3", "ddro_free_beam3", "dsi_beam3",
                       "bm25"):
          value = summary[f"{split}_{system}_{m}"]
          self.assertBetween(value, 0.0, 1.0, msg=f"{split}_{system}_{m}")
        self.assertEqual(summary[f"{split}_gr_{m}"], summary[f"{split}_ddro_beam3_{m}"])
      self.assertBetween(summary[f"{split}_ddro_free_beam3_invalid"], 0.0, 1.0)
      # A beam of 1 returns one document: recall@10 is recall@1.
      self.assertEqual(summary[f"{split}_ddro_beam1_recall@10"],
                       summary[f"{split}_ddro_beam1_recall@1"])
    for system in ("ddro_beam1", "ddro_beam3", "bm25"):
      self.assertGreater(summary[f"latency_ms_{system}"], 0.0)
    world = build_world(SMALL_WORLD)
    self.assertEqual(summary["num_docs"], len(world.documents))
    self.assertEqual(summary["num_codes"], len(world.documents))
    self.assertEqual(summary["docid_length"], 1)
    self.assertEqual(summary["final_system"], "ddro")
    self.assertGreater(summary["num_params"], 0)
    for name in ("dsi_config.json", "model_config.json", "tokenizer.model", "docids.npz",
                 "metrics.jsonl"):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, name)), name)
    self.assertEqual(dsi_run.load_config(self.workdir), self.config)
    # The doc2query stage: trained, sampled for every document, its queries indexed.
    with open(os.path.join(self.workdir, "pseudo_queries.json")) as f:
      pseudo = json.load(f)["queries"]
    self.assertEqual(sorted(pseudo), sorted(d.doc_id for d in world.documents))
    self.assertEqual(summary["num_pseudo_queries"], sum(len(q) for q in pseudo.values()))
    self.assertGreater(summary["num_pseudo_queries"], 0)
    self.assertBetween(summary["pseudo_unseen_coverage"], 0.0, 1.0)
    qgen = [r["step"] for r in metrics_lib.read_metrics(self.workdir) if "qgen/loss" in r]
    self.assertEqual(qgen, [1, 4])
    self.assertIn("qgen_train_seconds", summary)
    docids, doc_ids = load_docids(self.workdir)
    self.assertEqual(docids.kind, "atomic")
    self.assertEqual(doc_ids[0], world.documents[0].doc_id)

  def test_load_model_reproduces_the_final_scores(self):
    import jax  # noqa: PLC0415
    from jaxsearch.generative import dsi  # noqa: PLC0415
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
    retrieve = jax.jit(dsi.make_retrieve_fn(model, layout, beam_size=3,
                                            num_steps=trie_depth(docids)))
    docs, scores = dsi.batched_retrieve(retrieve, params, build_trie(docids), prompts, mask, 16)
    from jaxsearch.retrieval import metrics as rm  # noqa: PLC0415
    run = rm.run_from_arrays(list(split.queries), docs, scores, data.corpus.ids)
    got = rm.mean_measures(rm.evaluate(run, split.qrels, ("mrr@10",), missing_as_zero=True))
    self.assertAlmostEqual(got["mrr@10"], self.summary["unseen_ddro_beam3_mrr@10"], places=5)

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

  def test_resume_continues_from_the_checkpoint(self):
    # A copy of the run as if killed after its step-5 DSI checkpoint.
    workdir = os.path.join(tempfile.mkdtemp(), "run")
    shutil.copytree(self.workdir, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "dsi", "10"))
    shutil.rmtree(os.path.join(workdir, "checkpoints", "ddro"))
    os.remove(os.path.join(workdir, "summary.json"))
    rows = metrics_lib.read_metrics(workdir)
    with open(os.path.join(workdir, metrics_lib.METRICS_FILE), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows if "dsi/loss" in r and r["step"] <= 5)
    resumed = dsi_run.run(self.config, workdir)
    rows = {r["step"]: r for r in metrics_lib.read_metrics(workdir) if "dsi/loss" in r}
    ref = {r["step"]: r for r in metrics_lib.read_metrics(self.workdir) if "dsi/loss" in r}
    self.assertEqual(sorted(rows), [1, 5, 10])              # nothing trained twice
    self.assertAlmostEqual(rows[10]["dsi/loss"], ref[10]["dsi/loss"], places=4)
    ddro = [r["step"] for r in metrics_lib.read_metrics(workdir) if "ddro/loss" in r]
    self.assertEqual(ddro, [1, 4])
    for key in ("unseen_gr_recall@1", "seen_gr_mrr@10", "seen_dsi_beam3_recall@10"):
      self.assertAlmostEqual(resumed[key], self.summary[key], places=4)
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints", "dsi"))),
                     ["10", "5"])


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
