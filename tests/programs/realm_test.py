"""Tests for the REALM experiment (jaxsearch.programs.realm) on a tiny world."""
from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from flax import linen as nn

from jaxsearch import metrics as metrics_lib
from jaxsearch.checkpoint import Checkpointer
from jaxsearch.data.world import WorldConfig
from jaxsearch.models.encoder import EncoderConfig, init_encoder_params
from jaxsearch.models.transformer import Transformer, TransformerConfig
from jaxsearch.programs import realm
from jaxsearch.train.optim import OptimizerConfig
from jaxsearch.train.state import TrainState

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

  def test_top_k_larger_than_a_world(self):
    with self.assertRaisesRegex(ValueError, "top_k"):
      realm.run(dataclasses.replace(TINY, top_k=10_000), tempfile.mkdtemp())


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
                  "reader": nn.meta.unbox(cls.reader.init(jax.random.fold_in(key, 2),
                                                          jnp.zeros((1, 4), jnp.int32))["params"])}
    rng = np.random.default_rng(0)
    n, b, k = 6, 2, 3
    ones = lambda *s: np.ones(s, bool)
    cls.corpus = realm.Corpus(rng.integers(1, 32, (n, 5)).astype(np.int32),
                              ones(n, 5).astype(np.int32),
                              rng.integers(1, 32, (n, 6)).astype(np.int32), ones(n, 6))
    doc_ids = np.array([[0, 2, 4], [1, 3, 5]], np.int32)
    d = np.asarray(cls.embed(cls.params["doc"], cls.corpus.enc_ids, cls.corpus.enc_mask))
    q_ids = rng.integers(1, 32, (b, 4)).astype(np.int32)
    q_vec = np.asarray(cls.embed(q, q_ids, np.ones((b, 4), np.int32)))
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
    logits0 = np.asarray(self.reader.apply(
        {"params": self.params["reader"]},
        np.concatenate([b.prefix, passage, b.answer[:, :1]], axis=1)))
    end_id = int(np.argmax(logits0[0, -1]))   # row 0 stops at once; row 1 may not
    start = b.answer[:, 0]
    seg = np.asarray(jax.jit(realm.make_greedy_answer_fn(self.reader, end_id),
                             static_argnames="width")(
        self.params["reader"], b.prefix, b.prefix_mask, passage, passage_mask, start,
        width=width))
    for r in range(2):
      tokens, out = [int(start[r])], [int(start[r])]
      while len(out) < width and end_id not in out[1:]:
        x = np.concatenate([b.prefix[r], passage[r], tokens])[None]
        nxt = int(np.argmax(np.asarray(self.reader.apply({"params": self.params["reader"]},
                                                         x))[0, -1]))
        tokens.append(nxt)
        out.append(nxt)
      out += [end_id] * (width - len(out))
      self.assertEqual(seg[r].tolist(), out, r)
    self.assertEqual(seg[0, 1], end_id)

  def test_index_vectors_stand_in_for_an_untrained_doc_encoder(self):
    # With E_d not trained the update reads d from the index (`doc_vecs`): the loss must be
    # the one computed by embedding the documents with E_d.
    losses = [realm.make_realm_loss_fn(dataclasses.replace(TINY, train_doc_encoder=t),
                                       self.embed, self.loglik)(self.params, self.batch,
                                                                self.corpus)[0]
              for t in (True, False)]
    np.testing.assert_allclose(float(losses[0]), float(losses[1]), rtol=1e-5)


class RealmRunTest(absltest.TestCase):

  CONFIG = dataclasses.replace(TINY, refresh_every=3, steps=4, train_worlds=1,
                               reader_warmup_steps=1, ict_steps=1)

  def test_steps_staleness_refresh_warmups_and_extra_worlds(self):
    workdir = tempfile.mkdtemp()
    config = self.CONFIG
    summary = realm.run(config, workdir)
    for key in ("recall@1", "recall@k", "recall@2", "em", "em_gold_doc"):
      self.assertBetween(summary[key], 0.0, 1.0)
    self.assertEqual(summary["num_train_docs"], 2 * summary["num_docs"])
    rows = metrics_lib.read_metrics(workdir)
    train_rows = [r for r in rows if "index/steps_since_refresh" in r]
    self.assertEqual([r["step"] for r in train_rows], [1, 2, 3, 4])
    # The update of step s (row s + 1) runs s - (last multiple of 3) steps after a refresh.
    self.assertEqual([r["index/steps_since_refresh"] for r in train_rows], [0, 1, 2, 0])
    self.assertEqual([r["index/refreshes"] for r in train_rows], [0, 0, 0, 1])
    gaps = [r["index/stale_score_gap"] for r in train_rows]
    # Right after a refresh the index holds the live doc encoder's embeddings: no gap.
    self.assertLess(gaps[0], 1e-5)
    self.assertLess(gaps[3], 1e-5)
    # In between, the trained doc encoder has moved away from the index.
    for i in (1, 2):
      self.assertGreater(gaps[i], 1e-5)
    # The checkpointed index is the refresh of step 3, made with the params of step 3, over
    # both worlds' documents.
    params3, _, _ = _params(workdir, 3)
    params4, index4, refreshed4 = _params(workdir, 4)
    self.assertEqual(refreshed4, 3)
    embed = jax.jit(realm.make_embed_fn(realm.BertEncoder(dataclasses.replace(
        config.encoder, vocab_size=_vocab(workdir)))))
    corpus = _corpus(config, workdir)
    self.assertEqual(index4.shape[0], corpus.enc_ids.shape[0])
    np.testing.assert_allclose(
        index4, np.asarray(embed(params3["doc"], corpus.enc_ids, corpus.enc_mask)), atol=1e-5)
    self.assertTrue(_changed(params3["query"], params4["query"]))

  @pytest.mark.slow
  def test_resume(self):
    workdir = tempfile.mkdtemp()
    config = self.CONFIG
    realm.run(config, workdir)
    # Resume (with the ScaNN index this time): three more steps continue from step 4.
    realm.run(dataclasses.replace(config, steps=7, index="scann"), workdir)
    rows = [r for r in metrics_lib.read_metrics(workdir) if "index/steps_since_refresh" in r]
    self.assertEqual([r["step"] for r in rows], [1, 2, 3, 4, 5, 6, 7])
    self.assertEqual([r["index/steps_since_refresh"] for r in rows[4:]], [1, 2, 0])
    _, _, refreshed7 = _params(workdir, 7)
    self.assertEqual(refreshed7, 6)
    self.assertTrue(os.path.exists(os.path.join(workdir, "summary.json")))


def _vocab(workdir: str) -> int:
  return realm.SentencePieceTokenizer.load(os.path.join(workdir, "tokenizer.model")).vocab_size


def _corpus(config, workdir):
  from jaxsearch.data.world import build_world  # noqa: PLC0415
  tok = realm.SentencePieceTokenizer.load(os.path.join(workdir, "tokenizer.model"))
  worlds = [build_world(dataclasses.replace(config.world, seed=config.world.seed + 1000 * w))
            for w in range(config.train_worlds + 1)]
  return realm.build_corpus(worlds, tok)


if __name__ == "__main__":
  absltest.main()
