"""Tests for jaxsearch.retrieval.text_encoder: the batched BertEncoder text encoder, query and
corpus vectors."""
from __future__ import annotations

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.data.wordpiece import pad_batch
from jaxsearch.models.encoder import BertEncoder, EncoderConfig, init_encoder_params
from jaxsearch.retrieval import text_encoder
from jaxsearch.retrieval.corpus import Corpus


class _WordTokenizer:
  """[CLS]=1 word ids [SEP]=2 with a 100-id vocabulary (the WordPieceTokenizer interface)."""

  vocab_size = 100

  def encode_batch(self, texts, pad_to_multiple_of=None):
    rows = [[1] + [3 + sum(map(ord, w)) % 97 for w in t.split()] + [2] for t in texts]
    return pad_batch(rows, pad_id=0, max_length=64, pad_to_multiple_of=pad_to_multiple_of)


class TextEncoderTest(absltest.TestCase):

  def test_batched_encoder_equals_one_text_at_a_time(self):
    tokenizer = _WordTokenizer()
    config = EncoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_heads=4,
                           num_layers=2, intermediate_size=64, max_position=64)
    # Random parameters of the right shapes, without compiling the initializer (slow on CPU).
    shapes = jax.eval_shape(lambda: init_encoder_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype),
                          shapes)
    texts = ["a", "a much longer text about cats, dogs and other animals " * 3, "", "b c",
             "the cat sat"]
    encode = text_encoder.make_text_encoder(config, params, tokenizer, batch_size=2)
    got = encode(texts)
    model = BertEncoder(config)
    embed = jax.jit(lambda ids, mask: model.apply({"params": params}, ids, mask,
                                                  method=BertEncoder.embed))
    for i, text in enumerate(texts):
      batch = tokenizer.encode_batch([text])         # unpadded: one row, its own length
      want = embed(batch.input_ids, batch.attention_mask)
      np.testing.assert_allclose(got[i], np.asarray(want)[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    self.assertEqual(encode([]).shape, (0, 32))




class VectorsTest(absltest.TestCase):

  def test_query_vectors(self):
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(text_encoder.as_query_vectors(vectors, None, 2), vectors)
    got = text_encoder.as_query_vectors(["a", "b"], lambda t: vectors[:len(t)], 2)
    np.testing.assert_array_equal(got, vectors[:2])
    self.assertEqual(text_encoder.as_query_vectors([], None, 2).shape, (0, 2))
    with self.assertRaisesRegex(ValueError, "query encoder"):
      text_encoder.as_query_vectors(["a"], None, 2)
    with self.assertRaisesRegex(ValueError, "one string"):
      text_encoder.as_query_vectors("a", None, 2)

  def test_corpus_embeddings(self):
    corpus = Corpus(ids=("a", "b"), titles=("", ""), texts=("x", "y"))
    emb = text_encoder.corpus_embeddings(corpus, lambda t: np.ones((len(t), 3)), None)
    self.assertEqual((emb.shape, emb.dtype), ((2, 3), np.float32))
    with self.assertRaisesRegex(ValueError, "exactly one of encoder"):
      text_encoder.corpus_embeddings(corpus, None, None)
    with self.assertRaisesRegex(ValueError, "len\\(corpus\\)=2"):
      text_encoder.corpus_embeddings(corpus, None, np.ones((3, 3)))


if __name__ == "__main__":
  absltest.main()
