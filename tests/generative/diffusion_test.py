"""Tests of the masked-diffusion docID head (jaxsearch.generative.diffusion)."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsearch.data.tokenizer import SentencePieceTokenizer
from jaxsearch.data.world import WorldConfig, build_world
from jaxsearch.generative import diffusion as D
from jaxsearch.generative.docids import atomic_docids, make_docids, naive_docids
from jaxsearch.generative.trie import build_trie


# One jitted function each (config static), so a config compiles once for the whole file.
apply_head = jax.jit(D.apply_head, static_argnames="config")
diffusion_loss = jax.jit(D.diffusion_loss, static_argnames="config")
corrupt = jax.jit(D.corrupt, static_argnames="config")


def tiny_config(**kw) -> D.DiffusionConfig:
  base = dict(text_vocab_size=20, num_codes=5, num_slots=4, max_query_len=6, hidden_size=16,
              num_layers=2, num_heads=2, intermediate_size=32)
  base.update(kw)
  return D.DiffusionConfig(**base)


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class ConfigAndLayoutTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("num_codes", dict(num_codes=0), "num_codes"),
      ("num_slots", dict(num_slots=1), "num_slots"),
      ("heads", dict(hidden_size=30, num_heads=4), "num_heads"),
      ("weighting", dict(weighting="bogus"), "weighting"),
      ("min_t", dict(min_t=1.0), "min_t"),
      ("dtype", dict(dtype="int8"), "dtype"))
  def test_bad_config_names_field(self, kw, field):
    with self.assertRaisesRegex(ValueError, field):
      tiny_config(**kw)

  def test_class_layout(self):
    cfg = tiny_config()
    self.assertEqual((cfg.end_class, cfg.pad_class, cfg.mask_class, cfg.num_classes),
                     (5, 6, 7, 7))
    self.assertEqual(cfg.vocab_size, 20 + 5 + 3)
    self.assertEqual(cfg.code_offset, 20)

  def test_slot_targets_by_hand(self):
    ids = make_docids([[0, 1, 2], [3], [4, 0]], num_codes=5)
    np.testing.assert_array_equal(
        D.slot_targets(ids), [[0, 1, 2, 5], [3, 5, 6, 6], [4, 0, 5, 6]])
    self.assertEqual(D.slot_count(ids), 4)

  def test_unmask_schedule(self):
    np.testing.assert_array_equal(D.unmask_schedule(4, 4), [1, 1, 1, 1])
    np.testing.assert_array_equal(D.unmask_schedule(4, 1), [4])
    np.testing.assert_array_equal(D.unmask_schedule(5, 2), [2, 3])
    np.testing.assert_array_equal(D.unmask_schedule(7, 3), [2, 2, 3])
    for l in range(1, 9):
      for t in range(1, l + 1):
        counts = D.unmask_schedule(l, t)
        self.assertEqual(counts.sum(), l)
        self.assertLessEqual(counts.max() - counts.min(), 1)   # L / T per step, rounded
    with self.assertRaisesRegex(ValueError, "num_steps"):
      D.unmask_schedule(4, 5)

  def test_train_rejects_config_that_does_not_fit_docids(self):
    ids = naive_docids(30)                        # K = 10, L = 3 slots
    q, qm = D.pad_queries([[1, 2]] * 30, 6)
    with self.assertRaisesRegex(ValueError, "num_slots"):
      D.train_diffusion_head(tiny_config(num_codes=10, num_slots=4), q, qm, np.arange(30), ids,
                             steps=1)
    with self.assertRaisesRegex(ValueError, "doc_rows"):
      D.train_diffusion_head(tiny_config(num_codes=10, num_slots=3), q, qm, np.arange(30) + 1,
                             ids, steps=1)

  def test_pad_queries(self):
    tok, mask = D.pad_queries([[5, 6, 7], [8]], 2)
    np.testing.assert_array_equal(tok, [[5, 6], [8, 0]])
    np.testing.assert_array_equal(mask, [[1, 1], [1, 0]])


class LossTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cfg = tiny_config()
    cls.params = D.init_diffusion_params(cls.cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    b = 8
    q = rng.integers(1, 20, (b, 6)).astype(np.int32)
    qm = (np.arange(6)[None] < rng.integers(2, 7, (b, 1))).astype(np.int32)
    targets = rng.integers(0, 7, (b, 4)).astype(np.int32)
    cls.batch = D.DiffusionBatch(jnp.asarray(q), jnp.asarray(qm), jnp.asarray(targets))

  def test_corrupt_masks_with_rate_t(self):
    cfg = tiny_config(num_slots=16, stratified_t=True, min_t=0.0)
    targets = jnp.tile(jnp.arange(16, dtype=jnp.int32) % 7, (512, 1))
    slots, masked, t = corrupt(jax.random.key(3), targets, config=cfg)
    slots, masked, t = map(np.asarray, (slots, masked, t))
    np.testing.assert_array_equal(slots[masked], cfg.mask_class)
    np.testing.assert_array_equal(slots[~masked], np.asarray(targets)[~masked])
    # Stratified: exactly one t per [b/B, (b+1)/B).
    np.testing.assert_array_equal(np.floor(t * 512).astype(int), np.arange(512))
    # Masked fraction per example tracks t (binomial(16, t) / 16).
    self.assertLess(abs(masked.mean() - t.mean()), 0.02)
    self.assertGreater(np.corrcoef(masked.mean(1), t)[0, 1], 0.9)

  def test_loss_equals_numpy_with_hand_logits(self):
    # Zero head kernel: every slot's logits are the head bias, so the CE is known by hand.
    bias = np.array([0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 0.25], np.float32)
    params = jax.tree.map(lambda x: x, self.params)
    params["head"] = {"kernel": jnp.zeros_like(params["head"]["kernel"]),
                      "bias": jnp.asarray(bias)}
    ce = -np_log_softmax(bias)                                          # [C]
    rng = jax.random.key(7)
    for weighting in ("elbo", "mean"):
      cfg = tiny_config(weighting=weighting)
      loss, _ = diffusion_loss(params, self.batch, rng, config=cfg)
      _, masked, t = corrupt(jax.random.split(rng)[0], self.batch.targets, config=cfg)
      masked, t = np.asarray(masked), np.asarray(t, np.float64)
      per_slot = ce[np.asarray(self.batch.targets)] * masked
      if weighting == "elbo":
        expected = np.mean(per_slot.sum(1) / t / 4)
      else:
        expected = per_slot.sum() / max(masked.sum(), 1)
      self.assertGreater(masked.sum(), 0)
      np.testing.assert_allclose(float(loss), expected, rtol=1e-5)

  def test_loss_equals_numpy_with_model_logits(self):
    rng = jax.random.key(11)
    for weighting in ("elbo", "mean"):
      cfg = tiny_config(weighting=weighting)
      loss, aux = diffusion_loss(self.params, self.batch, rng, config=cfg)
      slots, masked, t = corrupt(jax.random.split(rng)[0], self.batch.targets, config=cfg)
      self.assertTrue(np.all(np.asarray(slots)[np.asarray(masked)] == cfg.mask_class))
      logits = apply_head(self.params, self.batch.query_tokens, self.batch.query_mask, slots,
                          config=cfg)
      logp = np_log_softmax(logits)
      tg = np.asarray(self.batch.targets)
      ce = -np.take_along_axis(logp, tg[..., None], -1)[..., 0]
      m = np.asarray(masked, np.float64)
      if weighting == "elbo":
        expected = np.mean((ce * m).sum(1) / np.asarray(t, np.float64) / 4)
      else:
        expected = (ce * m).sum() / max(m.sum(), 1)
      np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
      acc = ((np.argmax(logp, -1) == tg) * m).sum() / max(m.sum(), 1)
      np.testing.assert_allclose(float(aux["accuracy"]), acc, rtol=1e-6)

  def test_elbo_weighting_is_unbiased(self):
    # With uniform logits every masked slot costs log C; E[(1/t) #masked / L] = 1, so the
    # 1/t-weighted loss estimates log C whatever the masks (the ELBO of a uniform model).
    cfg = tiny_config(num_slots=4, min_t=1e-3)
    c = cfg.num_classes
    targets = jnp.zeros((20000, 4), jnp.int32)
    estimates = []
    for seed in range(3):
      _, masked, t = corrupt(jax.random.key(seed), targets, config=cfg)
      estimates.append(float(D.masked_loss(jnp.zeros((20000, 4, c)), targets, masked, t,
                                           weighting="elbo")))
    np.testing.assert_allclose(np.mean(estimates), np.log(c), rtol=0.03)


class ModelAndDecodeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cfg = tiny_config()
    cls.params = D.init_diffusion_params(cls.cfg, jax.random.key(1))
    rng = np.random.default_rng(1)
    cls.q = jnp.asarray(rng.integers(1, 20, (5, 6)), jnp.int32)
    cls.qm = jnp.ones((5, 6), jnp.int32)

  def logits(self, slots, q=None, qm=None):
    return np.asarray(apply_head(self.params, self.q if q is None else q,
                                 self.qm if qm is None else qm, jnp.asarray(slots),
                                 config=self.cfg))

  def test_head_is_bidirectional(self):
    slots = np.full((5, 4), self.cfg.mask_class, np.int32)
    base = self.logits(slots)
    later = slots.copy()
    later[:, 3] = 2                      # change the LAST slot
    diff_first = np.abs(self.logits(later)[:, 0] - base[:, 0]).max()
    self.assertGreater(diff_first, 1e-5)  # a causal model's slot 0 could not see slot 3
    earlier = slots.copy()
    earlier[:, 0] = 2
    self.assertGreater(np.abs(self.logits(earlier)[:, 3] - base[:, 3]).max(), 1e-5)
    q2 = np.asarray(self.q).copy()
    q2[:, 0] = (q2[:, 0] % 19) + 1       # a different real query token
    self.assertGreater(np.abs(self.logits(slots, q=jnp.asarray(q2)) - base).max(), 1e-5)

  def test_padded_query_tokens_are_ignored(self):
    slots = np.full((5, 4), self.cfg.mask_class, np.int32)
    qm = np.ones((5, 6), np.int32)
    qm[:, 4:] = 0
    q1 = np.asarray(self.q).copy()
    q2 = q1.copy()
    q2[:, 4:] = 3
    np.testing.assert_allclose(self.logits(slots, jnp.asarray(q1), jnp.asarray(qm)),
                               self.logits(slots, jnp.asarray(q2), jnp.asarray(qm)),
                               atol=1e-5)

  def test_one_slot_per_step_when_t_equals_l(self):
    out = D.diffusion_decode(self.params, self.q, self.qm, config=self.cfg, num_steps=4)
    filled = np.asarray(out.step_filled)
    for row in filled:
      np.testing.assert_array_equal(np.sort(row), np.arange(4))   # each step fills one slot

  def test_fill_counts_follow_schedule(self):
    for t in (1, 2, 3, 4):                       # L = 4: counts [4], [2, 2], [1, 1, 2], ones
      out = D.diffusion_decode(self.params, self.q, self.qm, config=self.cfg, num_steps=t,
                               rng=jax.random.key(t), temperature=1.0)
      filled = np.asarray(out.step_filled)
      counts = np.stack([(filled == s).sum(1) for s in range(t)], 1)
      np.testing.assert_array_equal(counts, np.tile(D.unmask_schedule(4, t), (5, 1)))
    with self.assertRaisesRegex(ValueError, "num_steps"):
      D.diffusion_decode(self.params, self.q, self.qm, config=self.cfg, num_steps=5)

  def test_decoded_outputs_never_mask(self):
    for t in (1, 2, 4):
      for tau in (0.0, 2.0):
        out = D.diffusion_decode(self.params, self.q, self.qm, config=self.cfg, num_steps=t,
                                 rng=jax.random.key(0), temperature=tau)
        classes = np.asarray(out.classes)
        self.assertTrue(np.all((classes >= 0) & (classes < self.cfg.num_classes)))
        np.testing.assert_allclose(np.asarray(out.scores), np.asarray(out.logp).sum(1),
                                   rtol=1e-6)

  def test_single_step_is_argmax_of_all_masked_logits(self):
    out = D.diffusion_decode(self.params, self.q, self.qm, config=self.cfg, num_steps=1)
    logp = np_log_softmax(self.logits(np.full((5, 4), self.cfg.mask_class, np.int32)))
    np.testing.assert_array_equal(np.asarray(out.classes), logp.argmax(-1))
    np.testing.assert_allclose(np.asarray(out.logp), logp.max(-1), rtol=1e-5, atol=1e-6)

  def test_stepwise_decode_matches_manual_loop(self):
    # T = L greedy: at each step the slot filled is the most confident masked one.
    out = D.diffusion_decode(self.params, self.q, self.qm, config=self.cfg, num_steps=4)
    slots = np.full((5, 4), self.cfg.mask_class, np.int32)
    for _ in range(4):
      logp = np_log_softmax(self.logits(slots))
      conf = np.where(slots == self.cfg.mask_class, logp.max(-1), -np.inf)
      pos = conf.argmax(-1)
      slots[np.arange(5), pos] = logp.argmax(-1)[np.arange(5), pos]
    np.testing.assert_array_equal(np.asarray(out.classes), slots)


  def test_retrieve_in_batches_matches_one_batch(self):
    trie = build_trie(make_docids([[0, 1, 2], [3], [4, 0]], num_codes=5))   # L = 4 slots
    whole = D.diffusion_retrieve(self.params, self.q, self.qm, trie, config=self.cfg,
                                 num_steps=2, num_samples=1, k=2)
    parts = D.diffusion_retrieve(self.params, self.q, self.qm, trie, config=self.cfg,
                                 num_steps=2, num_samples=1, k=2, batch_size=2)
    out = D.diffusion_decode(self.params, self.q, self.qm, config=self.cfg, num_steps=2)
    expected = D.decoded_docs(np.asarray(out.classes), trie, 5)
    for r in (whole, parts):
      np.testing.assert_array_equal(r.greedy_docs, expected)
      np.testing.assert_array_equal(r.docs[:, 0], expected)
      np.testing.assert_array_equal(r.docs[:, 1], -1)           # one sample: one document
      self.assertAlmostEqual(r.valid_fraction, float(np.mean(expected >= 0)))


def np_allowed(slots, targets, num_classes, mask_class):
  """Brute force `allowed_classes`: loop over queries, docIDs, slots."""
  b, l = slots.shape
  out = np.zeros((b, l, num_classes), bool)
  for i in range(b):
    for row in targets:
      if all(slots[i, j] == mask_class or slots[i, j] == row[j] for j in range(l)):
        for j in range(l):
          out[i, j, row[j]] = True
  return out


class ConstrainedDecodeTest(absltest.TestCase):
  """Decoding constrained to a docID set (`docid_targets`)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cfg = tiny_config()                      # K = 5: END 5, PAD 6, MASK 7; L = 4 slots
    cls.params = D.init_diffusion_params(cls.cfg, jax.random.key(3))
    rng = np.random.default_rng(3)
    cls.q = jnp.asarray(rng.integers(1, 20, (6, 6)), jnp.int32)
    cls.qm = jnp.ones((6, 6), jnp.int32)

  def test_allowed_classes_match_brute_force(self):
    rng = np.random.default_rng(0)
    ids = make_docids([[0, 1, 2], [0, 1, 3], [0, 4], [2], [3, 3, 3], [4, 0, 1]], num_codes=5)
    targets = D.slot_targets(ids)
    for _ in range(20):
      rows = targets[rng.integers(0, len(targets), 8)].copy()
      rows[rng.random(rows.shape) < 0.6] = 7                      # mask most slots
      rows[0] = 7
      rows[1, 0] = 1                                              # consistent with no docID
      got = np.asarray(D.allowed_classes(jnp.asarray(rows), jnp.asarray(targets), 7, 7))
      np.testing.assert_array_equal(got, np_allowed(rows, targets, 7, 7))
    self.assertFalse(got[1].any())
    np.testing.assert_array_equal(got[0, 0], [1, 0, 1, 1, 1, 0, 0])   # first codes 0, 2, 3, 4

  def test_everything_allowed_equals_unconstrained(self):
    # targets = every class sequence in C^L: the constraint removes nothing, so the
    # one-at-a-time commits must reproduce the parallel top-n unmasking exactly.
    c, l = self.cfg.num_classes, self.cfg.num_slots
    grid = np.stack(np.meshgrid(*[np.arange(c)] * l, indexing="ij"), -1).reshape(-1, l)
    for t in (1, 2, 3, 4):
      for tau in (0.0, 1.5):
        kw = dict(config=self.cfg, num_steps=t, rng=jax.random.key(t), temperature=tau)
        free = D.diffusion_decode(self.params, self.q, self.qm, **kw)
        cons = D.diffusion_decode(self.params, self.q, self.qm, docid_targets=grid, **kw)
        for a, b in zip(free, cons):
          np.testing.assert_array_equal(np.asarray(a), np.asarray(b), f"T={t} tau={tau}")

  def test_greedy_one_slot_per_step_matches_numpy_reference(self):
    ids = make_docids([[0, 1, 2], [0, 1, 3], [0, 4], [2], [3, 3, 3], [4, 0, 1]], num_codes=5)
    targets = D.slot_targets(ids)
    out = D.diffusion_decode(self.params, self.q, self.qm, config=self.cfg, num_steps=4,
                             docid_targets=targets)
    slots = np.full((6, 4), self.cfg.mask_class, np.int32)
    kept = np.zeros((6, 4))
    for _ in range(4):
      logp = np_log_softmax(self.logits(slots))
      allowed = np_allowed(slots, targets, 7, 7)
      best = np.where(allowed, logp, -np.inf)
      conf = np.where(slots == self.cfg.mask_class, best.max(-1), -np.inf)
      pos = conf.argmax(-1)
      rows = np.arange(6)
      slots[rows, pos] = best.argmax(-1)[rows, pos]
      kept[rows, pos] = best.max(-1)[rows, pos]
    np.testing.assert_array_equal(np.asarray(out.classes), slots)
    np.testing.assert_allclose(np.asarray(out.logp), kept, rtol=1e-5, atol=1e-6)
    self.assertTrue(all(tuple(r) in set(map(tuple, targets)) for r in slots))

  def logits(self, slots):
    return np.asarray(apply_head(self.params, self.q, self.qm, jnp.asarray(slots),
                                 config=self.cfg))

  @settings(max_examples=25, deadline=None)
  @given(codes=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=3), min_size=1,
                        max_size=12, unique_by=tuple),
         num_steps=st.integers(1, 4), tau=st.sampled_from([0.0, 1.0, 3.0]),
         seed=st.integers(0, 2**16))
  def test_constrained_decodes_are_always_docids(self, codes, num_steps, tau, seed):
    # A docID must not be a prefix of another for a trie; drop those that are.
    codes = [c for c in codes if not any(o != c and o[:len(c)] == c for o in codes)]
    ids = make_docids(codes, num_codes=5)
    targets = D.slot_targets(ids)                       # [n, longest + 1]: PAD up to L = 4
    targets = np.pad(targets, ((0, 0), (0, 4 - targets.shape[1])), constant_values=6)
    exact = targets
    targets = np.concatenate([targets, np.repeat(targets[:1], 12 - len(targets), 0)])  # 1 shape
    out = D.diffusion_decode(self.params, self.q, self.qm, config=self.cfg,
                             num_steps=num_steps, rng=jax.random.key(seed), temperature=tau,
                             docid_targets=targets)
    classes = np.asarray(out.classes)
    self.assertTrue(np.all(D.well_formed(classes, 5)))
    docs = D.decoded_docs(classes, build_trie(ids), 5, strict=True)
    self.assertTrue(np.all(docs >= 0), (codes, classes))
    np.testing.assert_array_equal(exact[docs], classes)
    filled = np.asarray(out.step_filled)
    counts = np.stack([(filled == s).sum(1) for s in range(num_steps)], 1)
    np.testing.assert_array_equal(counts, np.tile(D.unmask_schedule(4, num_steps), (6, 1)))

  def test_constrained_retrieve_is_always_valid(self):
    ids = make_docids([[0, 1, 2], [3], [4, 0]], num_codes=5)
    trie = build_trie(ids)
    r = D.diffusion_retrieve(self.params, self.q, self.qm, trie, config=self.cfg, num_steps=2,
                             num_samples=4, k=3, rng=jax.random.key(0),
                             docid_targets=D.slot_targets(ids))
    self.assertEqual(r.valid_fraction, 1.0)
    self.assertTrue(np.all(r.greedy_docs >= 0))
    with self.assertRaisesRegex(ValueError, "docid_targets must be"):
      D.diffusion_decode(self.params, self.q, self.qm, config=self.cfg, num_steps=2,
                         docid_targets=D.slot_targets(ids)[:, :3])
    with self.assertRaisesRegex(ValueError, r"classes in \[0, 7\)"):
      D.diffusion_decode(self.params, self.q, self.qm, config=self.cfg, num_steps=2,
                         docid_targets=np.full((2, 4), 7))


class ValidityTest(absltest.TestCase):

  def test_codes_not_in_trie_are_invalid(self):
    ids = naive_docids(30)                        # 2 digits, K = 10, END = 10, PAD = 11
    trie = build_trie(ids)
    classes = np.array([
        [1, 2, 10],    # docID 12
        [2, 9, 10],    # docID 29
        [3, 0, 10],    # "30" is not a docID (only 0..29)
        [9, 9, 10],    # not a docID
        [1, 11, 10],   # PAD before END
        [1, 2, 3],     # no END
        [10, 11, 11],  # END first (empty docID)
    ])
    np.testing.assert_array_equal(D.decoded_docs(classes, trie, 10),
                                  [12, 29, -1, -1, -1, -1, -1])

  def test_strict_requires_pad_after_end(self):
    ids = make_docids([[0, 1], [2]], num_codes=3)           # END = 3, PAD = 4
    trie = build_trie(ids)
    classes = np.array([[0, 1, 3], [2, 3, 4], [2, 3, 1]])
    np.testing.assert_array_equal(D.decoded_docs(classes, trie, 3), [0, 1, 1])
    np.testing.assert_array_equal(D.decoded_docs(classes, trie, 3, strict=True), [0, 1, -1])

  def test_rank_samples_dedupes_and_sorts(self):
    docs, scores = D.rank_samples(np.array([[4, 2, 4, -1, 7], [-1, -1, -1, -1, -1]]),
                                  np.array([[-1., -3., -0.5, 0., -3.]]).repeat(2, 0), 3)
    np.testing.assert_array_equal(docs, [[4, 2, 7], [-1, -1, -1]])
    np.testing.assert_allclose(scores[0], [-0.5, -3., -3.])
    self.assertTrue(np.all(np.isneginf(scores[1])))


class TrainingTest(parameterized.TestCase):

  def test_tiny_run_memorizes_30_docs_naive(self):
    self.check_tiny_run("naive")

  @pytest.mark.slow
  def test_tiny_run_memorizes_30_docs_atomic(self):
    self.check_tiny_run("atomic")

  def check_tiny_run(self, kind):
    start = time.perf_counter()
    world = build_world(WorldConfig())
    texts = [d.text for d in world.documents[56:86]]   # 30 companies and people
    tok = SentencePieceTokenizer.train(texts, vocab_size=400)
    ids = naive_docids(30) if kind == "naive" else atomic_docids(30)
    cfg = D.DiffusionConfig(text_vocab_size=tok.vocab_size, num_codes=ids.num_codes,
                            num_slots=D.slot_count(ids), max_query_len=24, hidden_size=64,
                            num_heads=4, num_layers=2, intermediate_size=128)
    q, qm = D.pad_queries([tok.encode(t) for t in texts], cfg.max_query_len)
    params, history = D.train_diffusion_head(cfg, q, qm, np.arange(30), ids, steps=150,
                                             batch_size=32, learning_rate=5e-3,
                                             warmup_steps=25)
    self.assertLess(history[-1]["loss"], 0.2)
    trie = build_trie(ids)
    for t in (1, cfg.num_slots):
      r = D.diffusion_retrieve(params, q, qm, trie, config=cfg, num_steps=t, num_samples=4,
                               k=3, rng=jax.random.key(0))
      self.assertGreater(np.mean(r.greedy_docs == np.arange(30)), 0.9, f"T={t}")
      self.assertGreater(np.mean(r.docs[:, 0] == np.arange(30)), 0.9, f"T={t}")
      self.assertGreater(r.valid_fraction, 0.5)
      np.testing.assert_array_equal(r.valid[:, 0], r.greedy_docs >= 0)
      self.assertTrue(np.all((r.docs[:, 1:] != r.docs[:, :1]) | (r.docs[:, 1:] == -1)))
    print(f"tiny {kind} run: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  absltest.main()
