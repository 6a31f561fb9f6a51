"""New documents in a DSI model: vocabulary extension, the replay mixture, the closed-form
low-rank update (against an independent least-squares solve), that an edit reaches the
model only through the edited down-projections, and, on a tiny DSI model trained here, that
the edit makes new documents top-1 for their queries while old documents keep theirs."""
from __future__ import annotations

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsearch.generative import dsi
from jaxsearch.generative import edit as edit_lib
from jaxsearch.generative.docids import atomic_docids, docid_tokens
from jaxsearch.models.transformer import Transformer, TransformerConfig
from jaxsearch.train.state import TrainState
from tests import compiled


def _model(vocab: int, d: int = 16, layers: int = 2, mlp: int = 32) -> Transformer:
  return Transformer(TransformerConfig(vocab_size=vocab, d_model=d, num_layers=layers,
                                       num_heads=2, num_kv_heads=2, mlp_dim=mlp, max_len=32))


def _leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


class PureFunctionsTest(absltest.TestCase):

  def test_decoding_mask_is_the_loss_mask_shifted_left(self):
    loss_mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(np.asarray(edit_lib.decoding_mask(loss_mask)),
                                  [[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]])

  def test_least_squares_update_matches_an_augmented_lstsq(self):
    rng = np.random.default_rng(0)
    k, r = rng.normal(size=(5, 8)), rng.normal(size=(5, 3))
    a = rng.normal(size=(8, 40))
    c = a @ a.T / 40                                     # a second moment, positive definite
    lam = 0.7
    got = edit_lib.least_squares_update(k, r, c, lam)
    # min |K W - R|^2 + lam P |L^T W|^2 with C = L L^T, as one stacked least-squares problem.
    chol = np.linalg.cholesky(c)
    stacked_k = np.concatenate([k, np.sqrt(lam * 5) * chol.T])
    stacked_r = np.concatenate([r, np.zeros((8, 3))])
    want = np.linalg.lstsq(stacked_k, stacked_r, rcond=None)[0]
    np.testing.assert_allclose(got, want, atol=1e-8)
    # Without preservation and with invertible keys the update reproduces R exactly.
    k_sq = 2.0 * np.linalg.qr(rng.normal(size=(4, 4)))[0]          # well conditioned
    np.testing.assert_allclose(k_sq @ edit_lib.least_squares_update(k_sq, r[:4], np.eye(4), 0.0),
                               r[:4], atol=1e-6)

  def test_truncate_rank_is_the_best_rank_r_approximation(self):
    rng = np.random.default_rng(1)
    delta = rng.normal(size=(12, 7))
    s = np.linalg.svd(delta, compute_uv=False)
    for r in (1, 3, 7):
      u, v = edit_lib.truncate_rank(delta, r)
      self.assertEqual((u.shape, v.shape), ((12, r), (r, 7)))
      self.assertEqual(np.linalg.matrix_rank(u @ v), r)
      # Eckart-Young: the Frobenius error is the norm of the dropped singular values.
      self.assertAlmostEqual(float(np.linalg.norm(delta - u @ v)),
                             float(np.sqrt(np.sum(s[r:] ** 2))), places=4)
    with self.assertRaisesRegex(ValueError, "rank must be an int in"):
      edit_lib.truncate_rank(delta, 8)

  def test_configs_name_the_bad_field(self):
    with self.assertRaisesRegex(ValueError, "EditConfig.rank must be an int >= 1, got 0"):
      edit_lib.EditConfig(rank=0)
    with self.assertRaisesRegex(ValueError, r"EditConfig.soft_weight must be in \[0, 1\)"):
      edit_lib.EditConfig(soft_weight=1.0)
    with self.assertRaisesRegex(ValueError, "EditConfig.layers must not repeat"):
      edit_lib.EditConfig(layers=(1, 1))
    with self.assertRaisesRegex(ValueError, "ReplayConfig.replay_ratio must be a finite"):
      edit_lib.ReplayConfig(replay_ratio=-1.0)
    self.assertEqual(edit_lib.EditConfig(layers=(3, 1)).layers, (1, 3))


class ReplayMixtureTest(absltest.TestCase):

  def _pools(self):
    layout = dsi.DSILayout(code_offset=40, num_codes=12, sep_id=2, pad_id=0)
    targets = docid_tokens(atomic_docids(12), 40)
    new = dsi.build_examples([[5, i] for i in range(6)], range(6), targets, layout,
                             max_input_tokens=2)                     # marker 5: a new row
    old = dsi.build_examples([[7, i] for i in range(30)], [6 + i % 6 for i in range(30)],
                             targets, layout, max_input_tokens=2)   # marker 7: an old row
    return new, old

  def test_batches_have_the_configured_ratio(self):
    new, old = self._pools()
    for ratio, want_old in ((1.0, 8), (3.0, 12), (1.0 / 3.0, 4), (0.0, 0)):
      n_new, n_old = edit_lib.replay_counts(16, ratio, 6, 30)
      self.assertEqual((n_new, n_old), (16 - want_old, want_old))
      for step in range(3):
        b = edit_lib.replay_batch(new, old, step=step, batch_size=16, replay_ratio=ratio,
                                  seed=0)
        markers = b.tokens[:, 0]
        self.assertEqual(b.tokens.shape[0], 16)
        np.testing.assert_array_equal(markers[:n_new], 5)
        np.testing.assert_array_equal(markers[n_new:], 7)
    # Without old examples every row is new.
    self.assertEqual(edit_lib.replay_counts(16, 3.0, 6, 0), (16, 0))

  def test_each_pool_is_drawn_epoch_by_epoch(self):
    new, old = self._pools()
    seen_new, seen_old = [], []
    for step in range(5):                      # 2 new rows x 5 steps; 6 old rows x 5 steps
      b = edit_lib.replay_batch(new, old, step=step, batch_size=8, replay_ratio=3.0, seed=1)
      seen_new += b.tokens[:2, 1].tolist()
      seen_old += b.tokens[2:, 1].tolist()
    self.assertCountEqual(seen_new[:6], range(6))          # one epoch of the 6 new rows
    self.assertCountEqual(seen_old, range(30))             # one epoch of the 30 old rows

  def test_replay_buffer_is_a_seeded_subset(self):
    _, old = self._pools()
    a = edit_lib.replay_buffer(old, 10, seed=3)
    b = edit_lib.replay_buffer(old, 10, seed=3)
    self.assertEqual(a.tokens.shape[0], 10)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    self.assertEqual(len(set(a.tokens[:, 1].tolist())), 10)
    self.assertIs(edit_lib.replay_buffer(old, 0, seed=3), old)


class EditMechanicsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.layout = dsi.DSILayout(code_offset=30, num_codes=6, sep_id=2, pad_id=0)
    cls.model = _model(cls.layout.vocab_size, layers=3)
    cls.params = dsi.init_params(cls.model.config, jax.random.key(0))
    targets = docid_tokens(atomic_docids(6), 30)
    cls.batch = dsi.build_examples([[5, 6, 7], [8, 9], [10, 11, 12, 13]], [0, 3, 5], targets,
                                   cls.layout, max_input_tokens=4)

  def _edit(self, layers, rank, seed=0):
    cfg = self.model.config
    keys = jax.random.split(jax.random.key(seed), 2)
    u = 0.3 * jax.random.normal(keys[0], (len(layers), cfg.mlp_dim, rank))
    v = 0.3 * jax.random.normal(keys[1], (len(layers), rank, cfg.d_model))
    return edit_lib.LowRankEdit(tuple(layers), u, v)

  def test_only_the_edited_down_projections_change_and_with_the_stated_rank(self):
    edit = self._edit((0, 2), rank=3)
    before, after = _leaves(self.params), _leaves(edit_lib.apply_edit(self.params, edit))
    self.assertEqual(before.keys(), after.keys())
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    self.assertEqual(changed, ["['layers_0']['mlp']['down_proj']['kernel']",
                               "['layers_2']['mlp']['down_proj']['kernel']"])
    for i, name in enumerate(changed):
      diff = after[name] - before[name]
      np.testing.assert_allclose(diff, np.asarray(edit.u[i] @ edit.v[i]), atol=1e-6)
      self.assertEqual(np.linalg.matrix_rank(diff, tol=1e-4), 3)

  def test_outputs_change_only_through_the_edited_layer(self):
    edit = self._edit((1,), rank=2)
    edited = edit_lib.apply_edit(self.params, edit)
    batch = jax.tree.map(jnp.asarray, self.batch)
    trace = jax.jit(lambda p: edit_lib._traced(self.model, self.layout, p, batch, keys=(1,),
                                               resid=(0, 1, 2)))
    orig, new = trace(self.params), trace(edited)
    # Below the edited layer nothing moves; from it on the residual stream does.
    np.testing.assert_array_equal(np.asarray(orig.resid[0]), np.asarray(new.resid[0]))
    np.testing.assert_array_equal(np.asarray(orig.keys[1]), np.asarray(new.keys[1]))
    self.assertGreater(float(jnp.abs(orig.resid[1] - new.resid[1]).max()), 1e-3)
    self.assertGreater(float(jnp.abs(orig.logits - new.logits).max()), 1e-3)
    # The edited model equals the original one with keys @ (u v) added to layer 1's MLP
    # output (an intervention on the activations, not on the parameters).
    dw = edit.u[0] @ edit.v[0]
    hooked = edit_lib._traced(self.model, self.layout, self.params, batch,
                              add={1: orig.keys[1] @ dw})
    np.testing.assert_allclose(np.asarray(hooked.logits), np.asarray(new.logits), atol=1e-4)

  def test_a_silenced_mlp_has_no_effect(self):
    params = jax.tree.map(lambda x: x, self.params)
    params["layers_1"] = {**params["layers_1"], "mlp": {**params["layers_1"]["mlp"],
                          "down_proj": {"kernel": jnp.zeros_like(
                              params["layers_1"]["mlp"]["down_proj"]["kernel"])}}}
    eff = edit_lib.component_effects(self.model, self.layout, params, self.batch)
    self.assertEqual(eff.mlp.shape, (3,))
    self.assertAlmostEqual(float(eff.mlp[1]), 0.0, places=6)    # output 0 = its mean
    self.assertGreater(float(np.abs(eff.mlp[[0, 2]]).max()), 1e-4)
    self.assertEqual(edit_lib.select_layers(eff, 1), (int(np.argmax(eff.mlp)),))
    self.assertEqual(edit_lib.select_layers(eff, 3), (0, 1, 2))
    # The unablated log-prob is the teacher-forced sequence log-prob.
    lp = dsi.make_sequence_logprob_fn(self.model, self.layout)(params, jax.tree.map(
        jnp.asarray, self.batch))
    self.assertAlmostEqual(eff.base_logprob, float(lp.mean()), places=4)

  def test_extend_docid_vocab_keeps_old_tokens_and_moves_end(self):
    params, layout = edit_lib.extend_docid_vocab(self.params, self.layout, 3,
                                                 jax.random.key(1))
    self.assertEqual((layout.num_codes, layout.end_id, layout.vocab_size), (9, 39, 40))
    old_emb = np.asarray(self.params["embed"]["embedding"])
    emb = np.asarray(params["embed"]["embedding"])
    np.testing.assert_array_equal(emb[:36], old_emb[:36])              # text and codes 0..5
    np.testing.assert_array_equal(emb[39], old_emb[36])                # END
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    self.assertLess(abs(rms(emb[36:39]) / rms(old_emb[30:36]) - 1.0), 0.5)
    # An input with old docID tokens gets the same logits for the old codes and END.
    model = _model(layout.vocab_size, layers=3)
    tokens = jnp.array([[5, 6, 2, 33]])
    a = compiled.apply(self.model, {"params": self.params}, tokens)[0]
    b = compiled.apply(model, {"params": params}, tokens)[0]
    np.testing.assert_allclose(b[:, :36], a[:, :36], atol=1e-5)
    np.testing.assert_allclose(b[:, 39], a[:, 36], atol=1e-5)


def _tiny_world(seed: int = 0, num_old: int = 20, num_new: int = 4):
  """Documents of 6 random tokens, 2 queries each (3 of its tokens, shuffled)."""
  rng = np.random.default_rng(seed)
  n = num_old + num_new
  docs = [rng.choice(np.arange(4, 60), 6, replace=False).tolist() for _ in range(n)]
  queries = [(rng.permutation(doc)[:3].tolist(), d) for d, doc in enumerate(docs) for _ in range(2)]
  return docs, queries


def _examples(pairs, layout):
  targets = docid_tokens(atomic_docids(layout.num_codes), layout.code_offset)
  return dsi.build_examples([p for p, _ in pairs], [d for _, d in pairs], targets, layout,
                            max_input_tokens=6, width=9)


_LOGPROB_FNS = {}


def _top1(model, layout, params, pairs):
  """Top-1 document of each query by exhaustive scoring of every docID."""
  key = (model.config, layout)
  if key not in _LOGPROB_FNS:
    _LOGPROB_FNS[key] = jax.jit(dsi.make_sequence_logprob_fn(model, layout))
  logprob = _LOGPROB_FNS[key]
  targets = docid_tokens(atomic_docids(layout.num_codes), layout.code_offset)
  scores = dsi.score_all_docids(logprob, params, [p for p, _ in pairs], targets, layout,
                                max_input_tokens=6, batch_size=256)
  return scores.argmax(1)


class NewDocumentsTest(absltest.TestCase):
  """A tiny DSI model trained on 20 documents; 4 new documents are added."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    num_old, num_new = 20, 4
    docs, queries = _tiny_world()
    layout_old = dsi.DSILayout(code_offset=60, num_codes=num_old, sep_id=2, pad_id=0)
    cls.old_pairs = [(doc, d) for d, doc in enumerate(docs[:num_old])] + [
        (q, d) for q, d in queries if d < num_old]
    cls.old_queries = [(q, d) for q, d in queries if d < num_old]
    cls.new_pairs = [(doc, num_old + j) for j, doc in enumerate(docs[num_old:])] + [
        (q, d) for q, d in queries if d >= num_old]
    cls.new_queries = [(q, d) for q, d in queries if d >= num_old]
    model_old = _model(layout_old.vocab_size, d=32, layers=2, mlp=64)
    state = TrainState.create(apply_fn=None,
                              params=dsi.init_params(model_old.config, jax.random.key(0)),
                              tx=optax.adam(5e-3))
    update = jax.jit(dsi.make_dsi_update_fn(model_old, layout_old), donate_argnums=0)
    batch = jax.tree.map(jnp.asarray, _examples(cls.old_pairs, layout_old))
    for _ in range(100):
      state, _ = update(state, batch)
    cls.params, cls.layout = edit_lib.extend_docid_vocab(state.params, layout_old, num_new,
                                                         jax.random.key(1))
    cls.model = _model(cls.layout.vocab_size, d=32, layers=2, mlp=64)
    cls.new_ex = _examples(cls.new_pairs, cls.layout)
    cls.old_ex = _examples(cls.old_pairs, cls.layout)
    cls.old_gold = np.array([d for _, d in cls.old_queries])
    cls.new_gold = np.array([d for _, d in cls.new_queries])
    cls.old_before = _top1(cls.model, cls.layout, cls.params, cls.old_queries)

  def test_base_model_knows_old_documents_and_not_new_ones(self):
    self.assertGreaterEqual(float(np.mean(self.old_before == self.old_gold)), 0.9)
    new_top1 = _top1(self.model, self.layout, self.params, self.new_queries)
    # New rows are random (a new document may win a query by chance, not by knowledge).
    self.assertLessEqual(float(np.mean(new_top1 == self.new_gold)), 0.25)

  def test_edit_adds_new_documents_and_keeps_old_ones(self):
    config = edit_lib.EditConfig(num_layers=2, rank=8, vector_steps=30, refine_steps=10)
    edit, info = edit_lib.edit_for_new_documents(self.model, self.layout, self.params,
                                                 self.new_ex, self.old_ex, config)
    self.assertEqual(edit.layers, (0, 1))
    self.assertEqual(info["layers"], [0, 1])
    self.assertLen(info["effects_mlp"], 2)
    self.assertEqual(info["vector_top1_after"], 1.0)
    self.assertGreater(info["vector_ce_before"], info["vector_ce_after"])
    # The refinement lowers its objective, new CE + kl_weight * old KL (kl_weight = 1).
    self.assertLess(info["refine_new_ce_after"] + info["refine_old_kl_after"],
                    info["refine_new_ce_before"] + info["refine_old_kl_before"])
    for m in range(2):                              # each layer's update has rank exactly 8
      dw = np.asarray(edit.u[m] @ edit.v[m])
      self.assertEqual(dw.shape, (64, 32))
      self.assertEqual(np.linalg.matrix_rank(dw, tol=1e-5 * np.abs(dw).max()), 8)
    edited = edit_lib.apply_edit(self.params, edit)
    new_top1 = _top1(self.model, self.layout, edited, self.new_queries)
    old_top1 = _top1(self.model, self.layout, edited, self.old_queries)
    # Thresholds the method must meet: 7 of the 8 new queries find their new document, and
    # 90% of the old queries keep their top-1 document.
    self.assertGreaterEqual(float(np.mean(new_top1 == self.new_gold)), 7 / 8)
    self.assertGreaterEqual(float(np.mean(old_top1 == self.old_before)), 0.9)

  def test_incremental_training_with_replay(self):
    config = edit_lib.ReplayConfig(steps=30, batch_size=16, replay_ratio=1.0,
                                   learning_rate=3e-3, warmup_steps=0)
    params, info = edit_lib.incremental_train(self.model, self.layout, self.params,
                                              self.new_ex, self.old_ex, config)
    self.assertEqual((info["new_rows"], info["old_rows"]), (8, 8))
    new_top1 = _top1(self.model, self.layout, params, self.new_queries)
    old_top1 = _top1(self.model, self.layout, params, self.old_queries)
    self.assertGreaterEqual(float(np.mean(new_top1 == self.new_gold)), 7 / 8)
    self.assertGreaterEqual(float(np.mean(old_top1 == self.old_gold)), 0.8)


if __name__ == "__main__":
  absltest.main()
