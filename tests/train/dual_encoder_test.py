"""Tests for jaxsearch.train.dual_encoder: the dual-encoder step (shared and separate encoders,
dropout), recall@k by hand, and a small encoder trained from scratch on the world."""
from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.data.tokenizer import SentencePieceTokenizer
from jaxsearch.data.wordpiece import pad_batch
from jaxsearch.data.world import WorldConfig
from jaxsearch.data.world import build_world
from jaxsearch.losses.contrastive import info_nce_loss
from jaxsearch.models.encoder import BertEncoder
from jaxsearch.models.encoder import EncoderConfig
from jaxsearch.models.encoder import init_encoder_params
from jaxsearch.train.dual_encoder import DualEncoderBatch
from jaxsearch.train.dual_encoder import DualEncoderConfig
from jaxsearch.train.dual_encoder import make_dual_encoder_loss_fn
from jaxsearch.train.dual_encoder import make_dual_encoder_update_fn
from jaxsearch.train.dual_encoder import make_embed_fn
from jaxsearch.train.dual_encoder import recall_at_k
from jaxsearch.train.optim import OptimizerConfig
from jaxsearch.train.optim import make_optimizer
from jaxsearch.train.state import TrainState

_TINY = EncoderConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2,
                      intermediate_size=32, max_position=8)


def _random_params(cfg: EncoderConfig, seed: int):
  """Seeded NumPy params on the encoder's tree (no init compilation): N(0, 0.1) kernels,
  embeddings and biases, norm scales near 1."""
  ids = jnp.zeros((1, 4), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(BertEncoder(cfg).init, jax.random.key(0), ids, ids))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(
          rng.normal(0.0, 0.1, leaf.shape) + (path[-1].key == "scale"), leaf.dtype),
      abstract["params"])


def _tiny_batch(seed=0, b=4, h=2):
  rng = np.random.default_rng(seed)
  q = rng.integers(1, 40, size=(b, 6))
  d = rng.integers(1, 40, size=(b + h, 8))
  q_mask = np.ones_like(q)
  q_mask[1, 4:] = 0
  d_mask = np.ones_like(d)
  d_mask[0, 5:] = 0
  return DualEncoderBatch(jnp.asarray(q), jnp.asarray(q_mask), jnp.asarray(d),
                          jnp.asarray(d_mask))


class DualEncoderStepTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.embed_fn = staticmethod(make_embed_fn(BertEncoder(_TINY)))
    cls.p1 = _random_params(_TINY, seed=1)
    cls.p2 = _random_params(_TINY, seed=2)

  def test_shared_loss_is_info_nce_of_the_embeddings(self):
    batch = _tiny_batch()
    cfg = DualEncoderConfig(temperature=0.1, symmetric=True)
    loss, aux = jax.jit(make_dual_encoder_loss_fn(self.embed_fn, config=cfg))(self.p1, batch)

    @jax.jit
    def reference(p, b):
      q = self.embed_fn(p, b.query_ids, b.query_mask)
      d = self.embed_fn(p, b.doc_ids, b.doc_mask)
      return info_nce_loss(q, d, temperature=0.1, symmetric=True)

    ref, ref_aux = reference(self.p1, batch)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(aux["accuracy"], ref_aux["accuracy"])

  def test_separate_encoders_use_their_own_trees(self):
    batch = _tiny_batch()
    cfg = DualEncoderConfig(temperature=0.1, shared=False)
    loss_fn = jax.jit(make_dual_encoder_loss_fn(self.embed_fn, config=cfg))
    loss, _ = loss_fn({"query": self.p1, "document": self.p2}, batch)
    shared_fn = jax.jit(make_dual_encoder_loss_fn(self.embed_fn, config=DualEncoderConfig(
        temperature=0.1)))
    # Separate trees holding the same values are the shared encoder.
    np.testing.assert_allclose(loss_fn({"query": self.p1, "document": self.p1}, batch)[0],
                               shared_fn(self.p1, batch)[0], rtol=1e-6)
    swapped, _ = loss_fn({"query": self.p2, "document": self.p1}, batch)
    self.assertGreater(abs(float(swapped) - float(loss)), 1e-4)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch)[0]))(
        {"query": self.p1, "document": self.p2})
    for side in ("query", "document"):
      norm = float(jnp.linalg.norm(grads[side]["layers_0"]["attn"]["query"]["kernel"]))
      self.assertGreater(norm, 0.0, side)

  @parameterized.parameters(True, False)
  def test_update_step(self, shared):
    batch = _tiny_batch()
    cfg = DualEncoderConfig(temperature=0.1, shared=shared)
    params = self.p1 if shared else {"query": self.p1, "document": self.p2}
    state = TrainState.create(apply_fn=self.embed_fn, params=params,
                              tx=make_optimizer(OptimizerConfig(learning_rate=1e-2)))
    update_fn = jax.jit(make_dual_encoder_update_fn(self.embed_fn, config=cfg))
    state, first = update_fn(state, batch)
    self.assertEqual(int(state.step), 1)
    self.assertEqual(set(first), {"loss", "grad_norm", "accuracy", "positive_score",
                                  "negative_score"})
    self.assertGreater(float(first["grad_norm"]), 0.0)
    for _ in range(5):
      state, metrics = update_fn(state, batch)
    self.assertEqual(int(state.step), 6)
    self.assertLess(float(metrics["loss"]), float(first["loss"]))   # loss before step 6

  def test_dropout_uses_the_rng(self):
    cfg = EncoderConfig(**{**_TINY.__dict__, "dropout_rate": 0.3})
    embed_fn = make_embed_fn(BertEncoder(cfg))
    loss_fn = jax.jit(make_dual_encoder_loss_fn(embed_fn, config=DualEncoderConfig()))
    batch = _tiny_batch()
    # Without an rng the encoder is deterministic: the same as the dropout-free encoder.
    plain = jax.jit(make_dual_encoder_loss_fn(self.embed_fn, config=DualEncoderConfig()))
    np.testing.assert_allclose(loss_fn(self.p1, batch)[0], plain(self.p1, batch)[0], rtol=1e-6)
    # The update step folds the step into the rng: the same key gives different masks at
    # step 0 and step 1 (so the same batch gives a different loss at the same params).
    update_fn = jax.jit(make_dual_encoder_update_fn(embed_fn, config=DualEncoderConfig()))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-9))   # params barely move
    state = TrainState.create(apply_fn=embed_fn, params=self.p1, tx=tx)
    state, m0 = update_fn(state, batch, jax.random.key(0))
    _, m1 = update_fn(state, batch, jax.random.key(0))
    self.assertNotAlmostEqual(float(m0["loss"]), float(m1["loss"]), places=4)
    self.assertNotAlmostEqual(float(m0["loss"]), float(plain(self.p1, batch)[0]), places=4)

  def test_config_validation(self):
    with self.assertRaisesRegex(ValueError, "temperature.*0"):
      DualEncoderConfig(temperature=0.0)
    with self.assertRaisesRegex(ValueError, "shared"):
      DualEncoderConfig(shared="yes")


class RecallTest(absltest.TestCase):

  def test_by_hand(self):
    q = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    docs = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.6]])
    # Scores: q0 [1, 0, .6] -> ranking [0, 2, 1]; q1 [0, 1, .6] -> [1, 2, 0];
    # q2 [.7, .7, .84] -> [2, 0, 1] (0 and 1 tie: the lower index first).
    targets = jnp.array([2, 1, 1])
    self.assertAlmostEqual(float(recall_at_k(q, docs, targets, k=1)), 1 / 3, places=6)
    self.assertAlmostEqual(float(recall_at_k(q, docs, targets, k=2)), 2 / 3, places=6)
    self.assertAlmostEqual(float(recall_at_k(q, docs, targets, k=3)), 1.0, places=6)


class TrainFromScratchOnWorldTest(absltest.TestCase):
  """Questions -> the passage of their subject (the first supporting document); held-out
  questions are about subjects no training question mentions."""

  def test_recall_improves_on_held_out_questions(self):
    world = build_world(WorldConfig(seed=0))
    tok = SentencePieceTokenizer.train(world.texts(), vocab_size=1024)

    def encode(texts, length):
      b = pad_batch([[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in texts],
                    pad_id=tok.pad_id, max_length=length, padding="max_length")
      return jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask)

    def questions(split):
      qs = world.splits[split]
      ids, mask = encode([q.question for q in qs], 24)
      return ids, mask, jnp.array([world.doc_index(q.supporting_doc_ids[0]) for q in qs])

    doc_ids, doc_mask = encode([d.text for d in world.documents], 32)
    train, test = questions("train"), questions("test")
    cfg = EncoderConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                        intermediate_size=128, max_position=32)
    embed_fn = make_embed_fn(BertEncoder(cfg))

    @jax.jit
    def heldout_recall(params):
      return recall_at_k(embed_fn(params, test[0], test[1]),
                         embed_fn(params, doc_ids, doc_mask), test[2], k=1)

    params = init_encoder_params(cfg, jax.random.key(0))
    untrained = float(heldout_recall(params))
    state = TrainState.create(
        apply_fn=embed_fn, params=params,
        tx=make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=10)))
    update_fn = jax.jit(make_dual_encoder_update_fn(
        embed_fn, config=DualEncoderConfig(temperature=0.05)))
    rng = np.random.default_rng(0)
    for _ in range(60):
      rows = rng.choice(len(train[2]), 64, replace=False)
      targets = train[2][rows]
      batch = DualEncoderBatch(train[0][rows], train[1][rows], doc_ids[targets],
                               doc_mask[targets], doc_keys=targets)
      state, metrics = update_fn(state, batch)
    trained = float(heldout_recall(state.params))
    self.assertLess(untrained, 0.2)     # 448 passages: a random encoder is near chance
    self.assertGreater(trained, 0.8)
    self.assertGreater(float(metrics["accuracy"]), 0.9)


if __name__ == "__main__":
  absltest.main()
