"""DSI examples, docID log-probabilities, the DSI / DDRO steps, doc2query, and a tiny run that
memorises its retrieval examples (checked by exhaustive scoring and by beam search)."""
from __future__ import annotations

import math

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsearch.generative import doc2query
from jaxsearch.generative import dsi
from jaxsearch.generative.docids import atomic_docids, docid_tokens, naive_docids
from jaxsearch.generative.trie import build_trie, trie_depth
from jaxsearch.losses.preference import dpo_loss
from jaxsearch.models.transformer import Transformer, TransformerConfig
from jaxsearch.train.state import TrainState
from tests import compiled

LAYOUT = dsi.DSILayout(code_offset=40, num_codes=10, sep_id=2, pad_id=0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _tiny_model(vocab: int, d: int = 32) -> Transformer:
  return Transformer(TransformerConfig(vocab_size=vocab, d_model=d, num_layers=2, num_heads=2,
                                       num_kv_heads=2, mlp_dim=2 * d, max_len=64))


class ExamplesTest(absltest.TestCase):

  def test_layout_and_masks_cover_only_docid_tokens(self):
    ids = naive_docids(12, base=10)                      # 2 codes + END
    targets = docid_tokens(ids, LAYOUT.code_offset)
    inputs = [[5, 6, 7, 8, 9], [11], []]
    ex = dsi.build_examples(inputs, [11, 0, 3], targets, LAYOUT, max_input_tokens=3)
    self.assertEqual(ex.tokens.shape, (3, 3 + 1 + 3))
    self.assertEqual(ex.tokens[0].tolist(), [5, 6, 7, 2, 41, 41, 50])     # cut to 3, "1-1" END
    self.assertEqual(ex.tokens[1].tolist(), [11, 2, 40, 40, 50, 0, 0])
    self.assertEqual(ex.tokens[2].tolist(), [2, 40, 43, 50, 0, 0, 0])
    for row in range(3):
      is_docid = ex.tokens[row] >= LAYOUT.code_offset
      np.testing.assert_array_equal(ex.loss_mask[row], is_docid)
      self.assertEqual(int(ex.loss_mask[row].sum()), 3)
      # The attention mask covers the input, SEP and the docID, nothing after END.
      end = int(np.flatnonzero(ex.tokens[row] == LAYOUT.end_id)[0])
      np.testing.assert_array_equal(ex.attention_mask[row], np.arange(7) <= end)
    self.assertEqual(ex.doc_rows.tolist(), [11, 0, 3])

  def test_variable_length_docids(self):
    targets = np.array([[40, 41, 50], [42, 50, -1]])
    ex = dsi.build_examples([[5], [6]], [0, 1], targets, LAYOUT, max_input_tokens=1)
    self.assertEqual(ex.tokens.tolist(), [[5, 2, 40, 41, 50], [6, 2, 42, 50, 0]])
    self.assertEqual(ex.loss_mask.sum(1).tolist(), [3, 2])

  def test_bad_inputs_are_named(self):
    targets = docid_tokens(atomic_docids(3), 40)
    with self.assertRaisesRegex(ValueError, "token id 45, outside the text ids"):
      dsi.build_examples([[45]], [0], targets, LAYOUT, max_input_tokens=4)
    with self.assertRaisesRegex(ValueError, r"doc_rows must be in \[0, 3\)"):
      dsi.build_examples([[4]], [3], targets, LAYOUT, max_input_tokens=4)
    with self.assertRaisesRegex(ValueError, "width must be >= "):
      dsi.build_examples([[4]], [0], targets, LAYOUT, max_input_tokens=4, width=5)
    with self.assertRaisesRegex(ValueError, "DSILayout.sep_id"):
      dsi.build_examples([[4]], [0], targets, LAYOUT._replace(sep_id=40), max_input_tokens=4)

  def test_prompts_are_left_padded_with_sep(self):
    prompts, mask = dsi.prompt_batch([[5, 6, 7, 8], [9]], LAYOUT, max_input_tokens=3)
    self.assertEqual(prompts.tolist(), [[5, 6, 7, 2], [0, 0, 9, 2]])
    self.assertEqual(mask.tolist(), [[True] * 4, [False, False, True, True]])

  def test_mixture_counts_and_resumable_epochs(self):
    self.assertEqual(dsi.mixture_counts(64, 32.0, 10, 10), (62, 2))
    self.assertEqual(dsi.mixture_counts(10, 0.0, 10, 10), (0, 10))
    self.assertEqual(dsi.mixture_counts(10, math.inf, 10, 10), (10, 0))
    self.assertEqual(dsi.mixture_counts(10, 1.0, 10, 0), (10, 0))
    # Every row of a pool is drawn once per epoch, and a step's rows depend only on the step.
    rows = np.concatenate([dsi.epoch_rows(7, 3, s, (0, 1)) for s in range(7)])   # 3 epochs
    for epoch in range(3):
      self.assertCountEqual(rows[7 * epoch:7 * epoch + 7].tolist(), range(7))
    np.testing.assert_array_equal(dsi.epoch_rows(7, 3, 4, (0, 1)), rows[12:15])
    big = dsi.epoch_rows(2, 5, 0, (0, 1))              # more rows than the pool
    self.assertCountEqual(big[:4].tolist(), [0, 0, 1, 1])

  def test_random_chunks_are_contiguous_windows(self):
    inputs = [list(range(10, 20)), [5, 6], []]
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(50):
      a, b, c = dsi.random_chunks(inputs, 4, rng)
      self.assertLen(a, 4)
      self.assertEqual(a, list(range(a[0], a[0] + 4)))
      starts.add(a[0])
      self.assertEqual((b, c), ([5, 6], []))
    self.assertEqual(starts, set(range(10, 17)))      # every window start occurs

  def test_mixture_batch(self):
    targets = docid_tokens(atomic_docids(4), 40)
    index = dsi.build_examples([[3]] * 4, range(4), targets, LAYOUT, max_input_tokens=2)
    retr = dsi.build_examples([[4, 5]] * 6, [0, 1, 2, 3, 0, 1], targets, LAYOUT,
                              max_input_tokens=2)
    batch = dsi.mixture_batch(index, retr, step=3, batch_size=8, indexing_ratio=3.0, seed=0)
    self.assertEqual(batch.tokens.shape, (8, 5))
    self.assertEqual(batch.tokens[:6, 0].tolist(), [3] * 6)      # 6 indexing rows first
    self.assertEqual(batch.tokens[6:, 0].tolist(), [4] * 2)


class LogProbTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = _tiny_model(LAYOUT.vocab_size)
    cls.params = dsi.init_params(cls.model.config, jax.random.key(0))
    cls.targets = np.array([[40, 41, 50], [43, 50, -1], [49, 47, 50]])
    cls.batch = dsi.build_examples([[5, 6, 7], [8], [9, 10]], [0, 1, 2], cls.targets, LAYOUT,
                                   max_input_tokens=4)
    cls.rejected = dsi.build_examples([[5, 6, 7], [8], [9, 10]], [2, 0, 1], cls.targets,
                                      LAYOUT, max_input_tokens=4)
    # staticmethod: a jitted function stored on the class would otherwise bind `self`.
    cls.logprob = staticmethod(jax.jit(dsi.make_sequence_logprob_fn(cls.model, LAYOUT)))
    cls.apply = staticmethod(jax.jit(
        lambda p, t, m: compiled.apply(cls.model, {"params": p}, t, attention_mask=m)))
    # Metrics are computed before the step's update, so one optimizer serves both DDRO tests.
    cls.ddro_update = staticmethod(jax.jit(dsi.make_ddro_update_fn(cls.model, LAYOUT,
                                                                    beta=0.4)))

  def test_sequence_logprob_is_the_sum_of_independent_token_log_softmaxes(self):
    got = np.asarray(self.logprob(self.params, jax.tree.map(jnp.asarray, self.batch)))
    # Unpadded forward passes of each row's full sequence (no attention mask, no shift logic):
    # position t's logits give the distribution of token t + 1.
    for i, inputs in enumerate(([5, 6, 7], [8], [9, 10])):
      target = self.targets[i][self.targets[i] >= 0]
      seq = list(inputs) + [LAYOUT.sep_id] + target.tolist()
      logits = np.asarray(compiled.apply(self.model, {"params": self.params},
                                           jnp.asarray([seq], jnp.int32)))[0]
      total = 0.0
      for j, tok in enumerate(target):
        pos = len(inputs) + j                 # the SEP, then each docID token but the last
        sliced = logits[pos, LAYOUT.code_offset:LAYOUT.code_offset + LAYOUT.num_codes + 1]
        total += _log_softmax(sliced)[tok - LAYOUT.code_offset]
      self.assertAlmostEqual(float(got[i]), total, places=4)

  def test_docid_logits_are_the_slice_of_the_full_logits(self):
    full = self.apply(self.params, self.batch.tokens, self.batch.attention_mask)
    sliced = dsi.make_docid_logits_fn(self.model, LAYOUT)(self.params,
                                                          jax.tree.map(jnp.asarray, self.batch))
    np.testing.assert_allclose(sliced, full[..., 40:51], atol=1e-5)
    a, _ = dsi.docid_token_logprobs(full, self.batch.tokens, self.batch.loss_mask, LAYOUT)
    b, _ = dsi.docid_token_logprobs(sliced, self.batch.tokens, self.batch.loss_mask, LAYOUT)
    np.testing.assert_allclose(a, b, atol=1e-5)

  def test_loss_metrics(self):
    logits = self.apply(self.params, self.batch.tokens, self.batch.attention_mask)
    loss, m = dsi.dsi_loss(logits, jax.tree.map(jnp.asarray, self.batch), LAYOUT)
    lp, _ = dsi.docid_token_logprobs(logits, self.batch.tokens, self.batch.loss_mask, LAYOUT)
    self.assertAlmostEqual(float(loss), -float(lp.sum()) / 8, places=5)       # 3 + 2 + 3 tokens
    self.assertAlmostEqual(float(m["sequence_nll"]), -float(lp.sum()) / 3, places=5)
    # A near-uniform random model: each token's log-prob is about -log(K + 1).
    self.assertLess(abs(float(loss) - math.log(11)), 0.5)

  def test_ddro_step_loss_matches_dpo_of_sequence_logprobs(self):
    rejected, logprob = self.rejected, self.logprob
    ref = dsi.init_params(self.model.config, jax.random.key(1))
    pc, pr = (logprob(self.params, jax.tree.map(jnp.asarray, b)) for b in (self.batch, rejected))
    rc, rr = (logprob(ref, jax.tree.map(jnp.asarray, b)) for b in (self.batch, rejected))
    expected, _ = dpo_loss(pc, pr, rc, rr, beta=0.4)
    tx = optax.adam(1e-2)
    state = TrainState.create(apply_fn=None, params=self.params, tx=tx)
    update = self.ddro_update
    state, m = update(state, ref, dsi.PairBatch(*(jax.tree.map(jnp.asarray, b)
                                                  for b in (self.batch, rejected))))
    self.assertAlmostEqual(float(m["loss"]), float(expected), places=5)
    self.assertAlmostEqual(float(m["chosen_logprob"]), float(pc.mean()), places=4)
    # With the policy as its own reference the loss is log 2 and the rewards are 0.
    state = TrainState.create(apply_fn=None, params=self.params, tx=tx)
    _, m = update(state, self.params, dsi.PairBatch(*(jax.tree.map(jnp.asarray, b)
                                                      for b in (self.batch, rejected))))
    self.assertAlmostEqual(float(m["loss"]), math.log(2), places=5)

  def test_ddro_steps_raise_the_chosen_over_the_rejected(self):
    pairs = dsi.PairBatch(*(jax.tree.map(jnp.asarray, b) for b in (self.batch, self.rejected)))
    state = TrainState.create(apply_fn=None, params=self.params, tx=optax.adam(1e-2))
    update = self.ddro_update
    for _ in range(20):
      state, m = update(state, self.params, pairs)
    self.assertLess(float(m["loss"]), 0.3)
    self.assertEqual(float(m["accuracy"]), 1.0)
    self.assertGreater(float(m["chosen_reward"]), float(m["rejected_reward"]))


class Doc2QueryTest(absltest.TestCase):

  def test_examples_and_learning_to_copy(self):
    b = doc2query.build_qgen_examples([[5, 6, 7], [8]], [[9], [10, 11, 12]], sep_id=2,
                                      eos_id=3, pad_id=0, max_doc_tokens=2, max_query_tokens=2)
    self.assertEqual(b.tokens.tolist(), [[5, 6, 2, 9, 3, 0], [8, 2, 10, 11, 3, 0]])
    self.assertEqual(b.loss_mask.astype(int).tolist(), [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 0]])
    # A generator trained to write "doc token 0 + 20" learns it, and sampling returns it.
    docs = [[4 + i, 30] for i in range(12)]
    queries = [[24 + i] for i in range(12)]
    data = doc2query.build_qgen_examples(docs, queries, sep_id=2, eos_id=3, pad_id=0,
                                         max_doc_tokens=2, max_query_tokens=2)
    model = _tiny_model(40)
    state = TrainState.create(apply_fn=None, params=dsi.init_params(model.config,
                                                                      jax.random.key(0)),
                              tx=optax.adam(2e-2))
    update = jax.jit(doc2query.make_qgen_update_fn(model))
    batch = jax.tree.map(jnp.asarray, data)
    for _ in range(60):
      state, m = update(state, batch)
    self.assertGreater(float(m["token_accuracy"]), 0.95)
    out = doc2query.generate_queries(model, state.params, docs[:3], sep_id=2, eos_id=3,
                                     pad_id=0, max_doc_tokens=2, max_new_tokens=4,
                                     num_samples=2, rng=jax.random.key(0), temperature=0.0,
                                     batch_size=2)
    self.assertEqual(out, [[[24], [24]], [[25], [25]], [[26], [26]]])


def _train_tiny_dsi(docids, steps: int, seed: int = 0):
  """20 documents of 6 random tokens, 2 queries each (3 of the document's tokens, shuffled);
  DSI on indexing + retrieval examples, full batch. Returns what the checks need."""
  rng = np.random.default_rng(seed)
  n = docids.codes.shape[0]
  layout = dsi.DSILayout(code_offset=60, num_codes=docids.num_codes, sep_id=2, pad_id=0)
  docs = [rng.choice(np.arange(4, 60), 6, replace=False).tolist() for _ in range(n)]
  queries, rows = [], []
  for d, doc in enumerate(docs):
    for _ in range(2):
      queries.append(rng.permutation(doc)[:3].tolist())
      rows.append(d)
  targets = docid_tokens(docids, layout.code_offset)
  train = dsi.concat_examples([
      dsi.build_examples(docs, np.arange(n), targets, layout, max_input_tokens=6),
      dsi.build_examples(queries, rows, targets, layout, max_input_tokens=6)])
  model = _tiny_model(layout.vocab_size, d=64)
  state = TrainState.create(apply_fn=model.apply,
                            params=dsi.init_params(model.config, jax.random.key(seed)),
                            tx=optax.adam(3e-3))
  update = jax.jit(dsi.make_dsi_update_fn(model, layout), donate_argnums=0)
  batch = jax.tree.map(jnp.asarray, train)
  for _ in range(steps):
    state, m = update(state, batch)
  return model, state.params, layout, queries, np.array(rows), targets, m


class TinyRunTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.docids = atomic_docids(20)
    (cls.model, cls.params, cls.layout, cls.queries, cls.rows, cls.targets,
     cls.metrics) = _train_tiny_dsi(cls.docids, steps=80)
    # One compilation each, shared by the tests (staticmethod: no `self` binding).
    cls.logprob = staticmethod(jax.jit(dsi.make_sequence_logprob_fn(cls.model, cls.layout)))
    cls.retrieve = staticmethod(jax.jit(dsi.make_retrieve_fn(
        cls.model, cls.layout, beam_size=20, num_steps=trie_depth(cls.docids))))

  def test_memorises_its_retrieval_examples(self):
    self.assertGreater(float(self.metrics["sequence_accuracy"]), 0.9)
    scores = dsi.score_all_docids(self.logprob, self.params, self.queries, self.targets,
                                  self.layout, max_input_tokens=6, batch_size=80)  # [40, 20]
    self.assertGreater(float(np.mean(scores.argmax(1) == self.rows)), 0.9)
    # Constrained beam search finds the same documents: recall@1 > 0.9.
    prompts, mask = dsi.prompt_batch(self.queries, self.layout, max_input_tokens=6)
    docs, beam_scores = dsi.batched_retrieve(self.retrieve, self.params,
                                             build_trie(self.docids), prompts, mask,
                                             batch_size=16)
    self.assertEqual(docs.shape, (40, 20))
    self.assertGreater(float(np.mean(docs[:, 0] == self.rows)), 0.9)
    # Beam scores are teacher-forced sequence log-probs (no renormalisation).
    picked = scores[np.arange(40), docs[:, 0]]
    np.testing.assert_allclose(beam_scores[:, 0], picked, atol=1e-4)

  def test_full_width_beam_equals_exhaustive_ranking(self):
    queries = self.queries[:4]
    scores = dsi.score_all_docids(self.logprob, self.params, queries, self.targets,
                                  self.layout, max_input_tokens=6, batch_size=80)
    prompts, mask = dsi.prompt_batch(queries * 4, self.layout, max_input_tokens=6)  # 16 rows
    out = self.retrieve(self.params, prompts, mask, build_trie(self.docids))
    for q in range(4):
      np.testing.assert_allclose(np.asarray(out.scores[q]), np.sort(scores[q])[::-1], atol=1e-4)
      self.assertCountEqual(np.asarray(out.docs[q]).tolist(), range(20))


class NaiveDocidsRunTest(absltest.TestCase):

  def test_memorises_with_multi_token_docids(self):
    docids = naive_docids(20, base=5)                         # 2 codes + END
    model, params, layout, queries, rows, targets, m = _train_tiny_dsi(docids, steps=150)
    prompts, mask = dsi.prompt_batch(queries, layout, max_input_tokens=6)
    retrieve = jax.jit(dsi.make_retrieve_fn(model, layout, beam_size=4,
                                            num_steps=trie_depth(docids)))
    docs, _ = dsi.batched_retrieve(retrieve, params, build_trie(docids), prompts, mask, 40)
    self.assertGreater(float(np.mean(docs[:, 0] == rows)), 0.9)


if __name__ == "__main__":
  absltest.main()
