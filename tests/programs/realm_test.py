"""Tests for the REALM experiment (jaxsearch.programs.realm) on a tiny world."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from types import SimpleNamespace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from flax import linen as nn

from jaxsearch import metrics as metrics_lib
from jaxsearch.checkpoint import Checkpointer
from jaxsearch.data.tokenizer import ByteTokenizer
from jaxsearch.data.world import WorldConfig
from jaxsearch.models.encoder import EncoderConfig, init_encoder_params
from jaxsearch.models.transformer import Transformer, TransformerConfig
from jaxsearch.programs import realm
from jaxsearch.train.optim import OptimizerConfig
from jaxsearch.train.state import TrainState
from tests import compiled

TINY = realm.RealmConfig(
    world=WorldConfig(num_people=12, num_cities=4, num_countries=2, num_companies=3,
                      num_distractors=4, two_hop_fraction=0.0, train_size=40,
                      validation_size=4, test_size=8),
    tokenizer_vocab_size=384,
    encoder=EncoderConfig(vocab_size=1, hidden_size=16, num_layers=1, num_heads=2,
                          intermediate_size=32, max_position=64),
    reader=TransformerConfig(vocab_size=1, d_model=16, num_layers=1, num_heads=2,
                             num_kv_heads=2, mlp_dim=32, max_len=128),
    top_k=2, steps=4, batch_size=4, refresh_every=2, ict_steps=0, eval_batch_size=16,
    log_every=1, checkpoint_every=1, train_worlds=0, reader_warmup_steps=0,
    train_doc_encoder=True,
    retriever_optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0),
    reader_optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0))


def _params(workdir: str, step: int):
  ckpt = Checkpointer(os.path.join(workdir, realm.CHECKPOINT_DIR))
  tree, _ = ckpt.restore(step, None)
  ckpt.close()
  return tree["params"], np.asarray(tree["index_emb"]), int(tree["refreshed_at"])


def _changed(a, b) -> bool:
  return any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def gin_config(*bindings) -> realm.RealmConfig:
  """The RealmConfig that gin/experiments/realm.gin binds to `run.config`."""
  import gin  # noqa: PLC0415
  from experiments.run import parse_gin  # noqa: PLC0415
  gin.clear_config()
  try:
    parse_gin(["gin/experiments/realm.gin"], list(bindings))
    return gin.get_configurable(realm.RealmConfig)()
  finally:
    gin.clear_config()


class RealmConfigTest(absltest.TestCase):

  def test_validation_names_the_field(self):
    cases = {
        "top_k": dict(top_k=0), "temperature": dict(temperature=0.0),
        "index": dict(index="faiss"), "refresh_every": dict(refresh_every=0),
        "steps": dict(steps=-1), "freeze_retriever": dict(freeze_retriever="yes"),
        "ict_span": dict(ict_span=(3, 2)), "ict_title_prob": dict(ict_title_prob=1.5),
        "eval_split": dict(eval_split="dev"), "train_worlds": dict(train_worlds=-1),
        "reader_warmup_steps": dict(reader_warmup_steps=-2),
        "reader_warmup_batch_size": dict(reader_warmup_batch_size=0),
        "two_hop_fraction": dict(world=WorldConfig(two_hop_fraction=0.5)),
        "normalize": dict(encoder=EncoderConfig(vocab_size=1, normalize=False)),
    }
    for field, kwargs in cases.items():
      with self.subTest(field), self.assertRaisesRegex(ValueError, field):
        dataclasses.replace(TINY, **kwargs)

class GinExperimentTest(absltest.TestCase):

  def test_gin_file_binds_the_library_defaults(self):
    # The experiment and `RealmConfig()` are the same recipe.
    self.assertEqual(gin_config(), realm.RealmConfig())
    frozen = gin_config("FREEZE_RETRIEVER = True", "STEPS = 7")
    self.assertEqual(frozen, dataclasses.replace(realm.RealmConfig(), freeze_retriever=True,
                                                 steps=7))


class BatchScheduleTest(absltest.TestCase):

  def test_batches_are_single_world_and_an_epoch_covers_every_question(self):
    world_of = np.array([0] * 7 + [1] * 5 + [2] * 4, np.int32)
    schedule = realm._BatchSchedule(world_of, 3, seed=0)
    self.assertEqual(schedule.per_epoch, 3 + 2 + 2)
    seen = []
    for step in range(schedule.per_epoch):
      rows, w = schedule(step)
      self.assertLen(rows, 3)
      np.testing.assert_array_equal(world_of[rows], w)
      seen.extend(rows.tolist())
    self.assertEqual(set(seen), set(range(16)))
    again = realm._BatchSchedule(world_of, 3, seed=0)
    for step in (5, 0, 9):       # deterministic, in any order (resume)
      np.testing.assert_array_equal(again(step)[0], schedule(step)[0])


class UpdateTest(absltest.TestCase):
  """One REALM update on a synthetic batch, per retriever setting (no world, no tokenizer)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    enc = dataclasses.replace(TINY.encoder, vocab_size=32, max_position=16)
    cls.reader = Transformer(dataclasses.replace(TINY.reader, vocab_size=32, max_len=32))
    cls.embed = staticmethod(realm.make_embed_fn(realm.BertEncoder(enc)))
    key = jax.random.key(0)
    q = init_encoder_params(enc, jax.random.fold_in(key, 0))
    cls.params = {"query": q, "doc": init_encoder_params(enc, jax.random.fold_in(key, 1)),
                  "reader": nn.meta.unbox(compiled.init(cls.reader, jax.random.fold_in(key, 2),
                                                        jnp.zeros((1, 4), jnp.int32))["params"])}
    rng = np.random.default_rng(0)
    n, b, k = 6, 2, 3
    ones = lambda *s: np.ones(s, bool)
    cls.corpus = realm.Corpus(rng.integers(1, 32, (n, 5)).astype(np.int32),
                              ones(n, 5).astype(np.int32),
                              rng.integers(1, 32, (n, 6)).astype(np.int32), ones(n, 6))
    doc_ids = np.array([[0, 2, 4], [1, 3, 5]], np.int32)
    embed = jax.jit(cls.embed)          # op by op, every operation is its own compile
    d = np.asarray(embed(cls.params["doc"], cls.corpus.enc_ids, cls.corpus.enc_mask))
    q_ids = rng.integers(1, 32, (b, 4)).astype(np.int32)
    q_vec = np.asarray(embed(q, q_ids, np.ones((b, 4), np.int32)))
    stale = np.einsum("bd,bkd->bk", q_vec, d[doc_ids])
    cls.batch = realm.RealmBatch(q_ids, np.ones((b, 4), np.int32),
                                 rng.integers(1, 32, (b, 3)).astype(np.int32), ones(b, 3),
                                 rng.integers(1, 32, (b, 3)).astype(np.int32), ones(b, 3),
                                 doc_ids, stale.astype(np.float32), d[doc_ids])
    cls.loglik = staticmethod(realm.make_reader_loglik_fn(cls.reader))

  def _step(self, **kwargs):
    config = dataclasses.replace(TINY, **kwargs)
    state = TrainState.create(apply_fn=None, params=self.params,
                              tx=realm.make_optimizer_for(config))
    update = jax.jit(realm.make_realm_update_fn(config, self.embed, self.loglik))
    new, metrics = update(state, self.batch, self.corpus)
    return new.params, metrics

  def test_which_parts_train(self):
    for kwargs, trained in (
        (dict(train_doc_encoder=True), ("query", "doc", "reader")),
        (dict(train_doc_encoder=False), ("query", "reader")),
        (dict(freeze_retriever=True), ("reader",))):
      with self.subTest(**kwargs):
        params, metrics = self._step(**kwargs)
        for part in ("query", "doc", "reader"):
          self.assertEqual(_changed(self.params[part], params[part]), part in trained, part)
        # The batch's stale scores were computed with the current encoders: no gap.
        self.assertLess(float(metrics["stale_score_gap"]), 1e-5)

  def test_greedy_answer_matches_a_step_by_step_reference(self):
    b, width = self.batch, 5
    rows = b.doc_ids[:, 0]
    passage, passage_mask = self.corpus.passage[rows], self.corpus.passage_mask[rows]
    logits0 = np.asarray(compiled.apply(
        self.reader, {"params": self.params["reader"]},
        np.concatenate([b.prefix, passage, b.answer[:, :1]], axis=1)))
    end_id = int(np.argmax(logits0[0, -1]))   # row 0 stops at once; row 1 may not
    start = b.answer[:, 0]
    seg = np.asarray(jax.jit(realm.make_greedy_answer_fn(self.reader, end_id),
                             static_argnames="width")(
        self.params["reader"], b.prefix, b.prefix_mask, passage, passage_mask, start,
        width=width))
    full = b.prefix.shape[1] + passage.shape[1] + width
    for r in range(2):
      tokens, out = [int(start[r])], [int(start[r])]
      while len(out) < width and end_id not in out[1:]:
        # The reader is causal: zeros after the last token leave its logits as they are, so
        # every step is the same (compiled once) full-width forward.
        x = np.concatenate([b.prefix[r], passage[r], tokens])
        n = len(x)
        x = np.pad(x, (0, full - n))[None].astype(np.int32)
        nxt = int(np.argmax(np.asarray(compiled.apply(
            self.reader, {"params": self.params["reader"]}, x))[0, n - 1]))
        tokens.append(nxt)
        out.append(nxt)
      out += [end_id] * (width - len(out))
      self.assertEqual(seg[r].tolist(), out, r)
    self.assertEqual(seg[0, 1], end_id)

  def test_index_vectors_stand_in_for_an_untrained_doc_encoder(self):
    # With E_d not trained the update reads d from the index (`doc_vecs`): the loss must be
    # the one computed by embedding the documents with E_d.
    losses = [jax.jit(realm.make_realm_loss_fn(dataclasses.replace(TINY, train_doc_encoder=t),
                                               self.embed, self.loglik))(self.params, self.batch,
                                                                         self.corpus)[0]
              for t in (True, False)]
    np.testing.assert_allclose(float(losses[0]), float(losses[1]), rtol=1e-5)


class DataTest(absltest.TestCase):
  """`build_data` on two tiny worlds with the byte tokenizer (no training)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = dataclasses.replace(TINY, train_worlds=1)
    cls.worlds = realm.build_worlds(cls.config)
    cls.tok = ByteTokenizer()
    cls.data = realm.build_data(cls.config, cls.worlds, cls.tok)

  def test_segments_gold_rows_and_passages(self):
    data, (w0, w1) = self.data, self.worlds
    n0, n1 = len(w0.documents), len(w1.documents)
    self.assertEqual(data.segments, ((0, n0), (n0, n0 + n1)))
    self.assertNotEqual(w0.documents[0].text, w1.documents[0].text)   # other facts
    questions = [*realm.unique_questions(w0.splits["train"]),
                 *realm.unique_questions(w1.splits["train"])]
    self.assertLen(data.train_world, len(questions))
    for i in (0, len(questions) - 1):         # one question of each world
      q, w = questions[i], data.train_world[i]
      world = self.worlds[w]
      doc = world.documents[world.doc_index(q.supporting_doc_ids[0])]
      row = int(data.train_q.gold[i])
      self.assertBetween(row, *data.segments[w])
      passage = data.corpus.passage[row][data.corpus.passage_mask[row]]
      self.assertEqual(self.tok.decode(passage), f"<information>{doc.text}</information>")
      answer = data.train_q.answer[i][data.train_q.answer_mask[i]]
      self.assertEqual(self.tok.decode(answer), f"<answer>{q.answers[0]}</answer>")
      # The reader's question has the subject removed (reader_sees_subject=False).
      prefix = self.tok.decode(data.train_q.prefix[i][data.train_q.prefix_mask[i]][1:])
      self.assertNotIn(q.search_queries[0], prefix)
      self.assertIn(q.search_queries[0], self.tok.decode(
          data.train_q.enc_ids[i][data.train_q.enc_mask[i] > 0]))

  def test_eval_questions_share_the_training_widths(self):
    data = self.data
    for field in ("enc_ids", "prefix", "answer"):
      self.assertEqual(getattr(data.eval_q, field).shape[1],
                       getattr(data.train_q, field).shape[1], field)
    self.assertLen(data.eval_questions, data.eval_q.gold.shape[0])
    self.assertLess(int(data.eval_q.gold.max()), data.segments[0][1])   # the first world's

  def test_top_k_larger_than_a_world(self):
    with self.assertRaisesRegex(ValueError, "top_k"):
      realm.build_data(dataclasses.replace(self.config, top_k=10_000), self.worlds, self.tok)


class BatchTest(absltest.TestCase):

  def test_realm_batch_and_support_metrics(self):
    q = realm.Questions(*(np.arange(4 * 3).reshape(4, 3) + 100 * i for i in range(6)),
                        gold=np.array([5, 1, 2, 0], np.int32))
    emb = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)
    doc_ids = np.array([[5, 3], [4, 1]])
    batch = realm.realm_batch(q, np.array([0, 1]), doc_ids, np.ones((2, 2)), emb)
    np.testing.assert_array_equal(batch.prefix, q.prefix[:2])
    np.testing.assert_array_equal(batch.doc_vecs[1, 0], [8.0, 9.0])      # row 4 of the index
    self.assertEqual(batch.doc_ids.dtype, np.int32)
    # Question 0's gold 5 is first; question 1's gold 1 is second: in top-k 2/2, top-1 1/2.
    self.assertEqual(realm.support_metrics(doc_ids, q.gold[:2]),
                     {"support_in_topk": 1.0, "support_top1": 0.5})
    self.assertEqual(realm.support_metrics(doc_ids, np.array([0, 2])),
                     {"support_in_topk": 0.0, "support_top1": 0.0})


class _Train(NamedTuple):
  params: dict


class StepFnTest(absltest.TestCase):
  """`make_step_fn` with a stand-in update and encoders: refresh cadence, retrieval from the
  world's segment, metrics averaged over the log window."""

  def test_refresh_cadence_segments_and_window_means(self):
    # 4 documents in two worlds; document j is e_j; a question's embedding is e_(its enc id).
    corpus = realm.Corpus(*(np.zeros((4, 2), np.int32) for _ in range(4)))
    enc = np.array([[0], [1], [2], [3]], np.int32)
    ones = np.ones((4, 1), np.int32)
    q = realm.Questions(enc, ones, ones, ones.astype(bool), ones, ones.astype(bool),
                        gold=np.array([0, 0, 2, 3], np.int32))
    data = realm.RealmData(corpus, ((0, 2), (2, 4)), [], q, np.array([0, 0, 1, 1], np.int32),
                           q, [], {"enc": 1, "prefix": 1, "answer": 1})
    config = dataclasses.replace(TINY, top_k=1, batch_size=2, refresh_every=3, log_every=2)
    loop = realm.trainer.LoopConfig(name="train", steps=5, log_every=2)
    embed = lambda params, ids, mask: np.eye(4, dtype=np.float32)[ids[:, 0]]
    embed_docs = lambda doc: np.eye(4, dtype=np.float32) * doc     # the "doc encoder" scales
    seen = []

    def update(train, batch, corpus):
      seen.append(batch)
      loss = float(len(seen))                                       # 1, 2, 3, ...
      return _Train({**train.params, "doc": train.params["doc"] + 1}), {
          "loss": loss, "stale_score_gap": 10 * loss}

    step_fn = realm.make_step_fn(config, loop, data, update, embed, embed_docs, corpus)
    state = realm.RealmState(_Train({"query": None, "doc": 1.0}),
                             realm.StaleIndex("exact", realm.ScannConfig(), embed_docs(1.0), 0,
                                              data.segments))
    out = []
    for step in range(5):
      state, m, work = step_fn(state, step)
      out.append(m)
    self.assertGreater(work.tokens, 0)
    # Steps 0..4 run 0, 1, 2, 0, 1 steps after a refresh; step 3 refreshes with doc = 4.
    self.assertEqual([m["index/steps_since_refresh"] for m in out], [0, 1, 2, 0, 1])
    self.assertEqual([m["index/refreshes"] for m in out], [0, 0, 0, 1, 1])
    self.assertEqual(state.index.refreshed_at, 3)
    np.testing.assert_array_equal(state.index.embeddings, np.eye(4) * 4.0)
    # Means over the window since the last log step (logs after steps 2 and 4 and 5).
    self.assertEqual([m["loss"] for m in out], [1.0, 1.5, 3.0, 3.5, 5.0])
    self.assertEqual([m["index/stale_score_gap"] for m in out], [10, 20, 30, 40, 50])
    self.assertEqual(out[1]["index/stale_score_gap_mean"], 15.0)
    self.assertNotIn("stale_score_gap", out[0])
    # Every batch is one world's questions, retrieved from that world's documents only.
    for batch in seen:
      worlds = {int(d) // 2 for d in batch.doc_ids[:, 0]}
      self.assertLen(worlds, 1)
      np.testing.assert_array_equal(batch.doc_ids[:, 0] // 2, batch.enc_ids[:, 0] // 2)
    # A question is retrieved its own document (e_j . e_j is the only non-zero score).
    np.testing.assert_array_equal(seen[0].doc_ids[:, 0], seen[0].enc_ids[:, 0])


class _CopyReader:
  """A stand-in reader: after `<answer>` it predicts the passage's first word (the token at
  `answer_at`), after anything else `</answer>`."""

  def __init__(self, answer_at: int, answer_id: int, end_id: int, vocab: int):
    self.answer_at, self.answer_id, self.end_id, self.vocab = answer_at, answer_id, end_id, vocab

  def apply(self, variables, tokens, positions=None, attention_mask=None):
    copy = jax.nn.one_hot(tokens[:, self.answer_at], self.vocab)[:, None, :]
    end = jax.nn.one_hot(self.end_id, self.vocab)
    return jnp.where((tokens == self.answer_id)[..., None], copy, end)


class EvaluateTest(absltest.TestCase):

  def test_recall_and_exact_match_by_hand(self):
    tok = ByteTokenizer()
    tag = tok.tag_id
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    # Documents 0 and 2 say "a", document 1 says "b"; the index holds e_0, e_1, e_2.
    passage = np.array([[tag("<information>"), w, tag("</information>")] for w in (a, b, a)])
    corpus = realm.Corpus(np.zeros((3, 1), np.int32), np.ones((3, 1), np.int32), passage,
                          np.ones((3, 3), bool))
    index = realm.StaleIndex("exact", realm.ScannConfig(), np.eye(3, dtype=np.float32), 0)
    # Query vectors rank the documents [0, 1], [1, 2], [0, 2], [2, 1]; the golds are 0, 1, 2, 1.
    vectors = np.array([[1, .5, 0], [0, 1, .5], [1, 0, .5], [0, .5, 1]], np.float32)
    gold = np.array([0, 1, 2, 1], np.int32)
    answers = ["a", "b", "a", "b"]
    n = len(gold)
    questions = realm.Questions(
        np.arange(n, dtype=np.int32)[:, None], np.ones((n, 1), np.int32),
        np.full((n, 2), tok.bos_id, np.int32), np.ones((n, 2), bool),
        np.array([[tag("<answer>"), tok.encode(x)[0], tag("</answer>")] for x in answers]),
        np.ones((n, 3), bool), gold)
    embed = lambda params, ids, mask: vectors[np.asarray(ids)[:, 0]]
    reader = _CopyReader(answer_at=2 + 1, answer_id=tag("<answer>"), end_id=tag("</answer>"),
                         vocab=tok.vocab_size)
    raw = [SimpleNamespace(answers=[x]) for x in answers]
    got = realm.evaluate(dataclasses.replace(TINY, top_k=2, eval_batch_size=3), {"query": None,
                         "reader": None}, questions, corpus, index, embed, reader, tok, raw)
    # top-1 hits: q0, q1 (2/4); top-2: all four. The reader copies the top-1 passage's word:
    # a, b, a (right word, wrong document), a (wrong): em 3/4; from the gold document: 4/4.
    self.assertEqual(got, {"recall@1": 0.5, "recall@k": 1.0, "recall@2": 1.0, "em": 0.75,
                           "em_gold_doc": 1.0, "num_eval_questions": 4})


@pytest.mark.slow
class RealmRunTest(absltest.TestCase):
  """One end-to-end run (two worlds, the warm-ups, checkpoints, summary), then a resume."""

  CONFIG = dataclasses.replace(TINY, refresh_every=3, steps=2, train_worlds=1,
                               reader_warmup_steps=1, ict_steps=1)

  def test_run_and_resume(self):
    workdir = tempfile.mkdtemp()
    config = self.CONFIG
    summary = realm.run(config, workdir)
    for key in ("recall@1", "recall@k", "recall@2", "em", "em_gold_doc"):
      self.assertBetween(summary[key], 0.0, 1.0)
    for key in ("ict_loss", "ict_accuracy", "reader_warmup_loss", "num_params",
                "train_seconds", "wall_seconds"):
      self.assertIn(key, summary)
    self.assertEqual(summary["num_train_docs"], 2 * summary["num_docs"])
    with open(os.path.join(workdir, "summary.json")) as f:
      self.assertEqual(json.load(f)["recall@1"], summary["recall@1"])
    self.assertEqual(realm.load_config(workdir), config)
    rows = [r for r in metrics_lib.read_metrics(workdir) if "train/loss" in r]
    self.assertEqual([r["step"] for r in rows], [1, 2])
    self.assertEqual([r["index/steps_since_refresh"] for r in rows], [0, 1])
    # The trained doc encoder has moved away from the index of step 0.
    self.assertLess(rows[0]["index/stale_score_gap"], 1e-5)
    self.assertGreater(rows[1]["index/stale_score_gap"], 1e-5)
    params2, index2, refreshed2 = _params(workdir, 2)
    self.assertEqual((refreshed2, index2.shape[0]), (0, 2 * summary["num_docs"]))

    # Resume: one more step from the checkpoint of step 2, its stale index restored (no
    # refresh before step 3): two steps since the refresh of step 0.
    resumed = realm.run(dataclasses.replace(config, steps=3), workdir)
    rows = [r for r in metrics_lib.read_metrics(workdir) if "train/loss" in r]
    self.assertEqual([r["step"] for r in rows], [1, 2, 3])
    self.assertEqual(rows[2]["index/steps_since_refresh"], 2)
    params3, index3, refreshed3 = _params(workdir, 3)
    self.assertEqual(refreshed3, 0)
    np.testing.assert_array_equal(index3, index2)
    self.assertTrue(_changed(params2["query"], params3["query"]))
    self.assertEqual(resumed["steps"], 3)
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, realm.CHECKPOINT_DIR))),
                     ["2", "3"])


if __name__ == "__main__":
  absltest.main()
