"""Tests for jaxsearch.retrieval.embedding: batched == one-shot embeddings, one compilation for
any number of batches, and the on-disk cache (hit, miss on changed key parts, corrupt files)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from jaxsearch.models.encoder import BertEncoder
from jaxsearch.models.encoder import EncoderConfig
from jaxsearch.models.encoder import init_encoder_params
from jaxsearch.retrieval import embedding
from jaxsearch.train.dual_encoder import make_embed_fn

_CFG = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                     intermediate_size=32, max_position=12)


def _tokens(m, t=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 50, size=(m, t)).astype(np.int32)
  lengths = rng.integers(1, t + 1, size=m)
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  return ids * mask, mask


class EmbedCorpusTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model_embed = staticmethod(make_embed_fn(BertEncoder(_CFG)))
    cls.params = init_encoder_params(_CFG, jax.random.key(0))

  def counting_embed_fn(self):
    """The encoder, counting how often jax traces it (= compilations, one per shape)."""
    traces = []

    def embed_fn(params, ids, mask):
      traces.append(ids.shape)
      return self.model_embed(params, ids, mask)

    return embed_fn, traces

  @parameterized.parameters(1, 7, 8, 23)
  def test_batched_equals_one_shot(self, m):
    ids, mask = _tokens(m, seed=m)
    one_shot = np.asarray(jax.jit(self.model_embed)(self.params, ids, mask))
    batched = embedding.embed_corpus(self.model_embed, self.params, ids, mask, batch_size=8,
                                     progress=False)
    self.assertEqual(batched.shape, (m, _CFG.hidden_size))
    self.assertEqual(batched.dtype, np.float32)
    np.testing.assert_allclose(batched, one_shot, atol=1e-5)
    # Rows are unit-norm (the encoder normalises): padding never leaks in as zeros / NaN.
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)

  def test_one_compilation_for_any_number_of_batches(self):
    embed_fn, traces = self.counting_embed_fn()
    for m in (3, 8, 9, 20, 33):                 # 1, 1, 2, 3 and 5 batches of 8
      ids, mask = _tokens(m, seed=m)
      out = embedding.embed_corpus(embed_fn, self.params, ids, mask, batch_size=8,
                                   progress=False)
      self.assertEqual(out.shape[0], m)
    self.assertEqual(traces, [(8, 12)])

  def test_progress_bar_goes_to_stderr(self):
    ids, mask = _tokens(20)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      embedding.embed_corpus(self.model_embed, self.params, ids, mask, batch_size=8,
                             desc="corpus-bar")
    self.assertIn("corpus-bar", err.getvalue())
    self.assertIn("3/3", err.getvalue())
    self.assertEqual(out.getvalue(), "")

  def test_bad_input(self):
    ids, mask = _tokens(4)
    with self.assertRaisesRegex(ValueError, "batch_size"):
      embedding.embed_corpus(self.model_embed, self.params, ids, mask, batch_size=0)
    with self.assertRaisesRegex(ValueError, r"\[M, T\]"):
      embedding.embed_corpus(self.model_embed, self.params, ids, mask[:, :5], batch_size=2)


class FingerprintTest(absltest.TestCase):

  def test_arrays(self):
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    same = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    self.assertEqual(embedding.array_fingerprint(a), embedding.array_fingerprint(same))
    changed = {**a, "b": np.array([0, 0, 1e-7], np.float32)}
    self.assertNotEqual(embedding.array_fingerprint(a), embedding.array_fingerprint(changed))
    reshaped = {**a, "w": a["w"].reshape(3, 2)}
    self.assertNotEqual(embedding.array_fingerprint(a), embedding.array_fingerprint(reshaped))
    renamed = {"v": a["w"], "b": a["b"]}
    self.assertNotEqual(embedding.array_fingerprint(a), embedding.array_fingerprint(renamed))

  def test_texts(self):
    self.assertEqual(embedding.text_fingerprint(["a", "b"]),
                     embedding.text_fingerprint(("a", "b")))
    self.assertNotEqual(embedding.text_fingerprint(["ab", ""]),
                        embedding.text_fingerprint(["a", "b"]))


class CacheTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.calls = 0

  def compute(self, seed=0, m=5):
    def fn():
      self.calls += 1
      return np.random.default_rng(seed).standard_normal((m, 4)).astype(np.float32)
    return fn

  def entry(self, key_parts):
    stem = os.path.join(self.dir, embedding.cache_key(key_parts))
    return stem + ".npy", stem + ".json"

  def test_hit_returns_the_same_array_without_computing(self):
    key = {"corpus": "c1", "params": "p1", "max_length": 32}
    first = embedding.cached_corpus_embeddings(self.dir, key, self.compute())
    self.assertEqual(self.calls, 1)
    again = embedding.cached_corpus_embeddings(self.dir, dict(reversed(list(key.items()))),
                                               self.compute(seed=1))
    self.assertEqual(self.calls, 1)                  # key order does not matter
    np.testing.assert_array_equal(again, first)
    array_path, meta_path = self.entry(key)
    with open(meta_path) as f:
      meta = json.load(f)
    self.assertEqual(meta["key_parts"], key)
    self.assertEqual(meta["shape"], [5, 4])
    self.assertEqual([n for n in os.listdir(self.dir) if n.endswith(".tmp")], [])

  def test_changed_key_parts_miss(self):
    key = {"corpus": "c1", "params": "p1", "max_length": 32}
    base = embedding.cached_corpus_embeddings(self.dir, key, self.compute())
    for change in ({"params": "p2"}, {"corpus": "c2"}, {"max_length": 64}):
      out = embedding.cached_corpus_embeddings(self.dir, {**key, **change},
                                               self.compute(seed=7))
      self.assertFalse(np.array_equal(out, base), change)
    self.assertEqual(self.calls, 4)
    self.assertLen([n for n in os.listdir(self.dir) if n.endswith(".npy")], 4)

  def test_truncated_file_is_recomputed(self):
    key = {"corpus": "c1"}
    base = embedding.cached_corpus_embeddings(self.dir, key, self.compute())
    array_path, _ = self.entry(key)
    size = os.path.getsize(array_path)
    with open(array_path, "r+b") as f:
      f.truncate(size - 7)
    with self.assertLogs(level="WARNING") as logs:
      out = embedding.cached_corpus_embeddings(self.dir, key, self.compute())
    self.assertIn("corrupt", "\n".join(logs.output))
    self.assertEqual(self.calls, 2)
    np.testing.assert_array_equal(out, base)
    # The rewritten entry is whole again: a hit.
    embedding.cached_corpus_embeddings(self.dir, key, self.compute())
    self.assertEqual(self.calls, 2)

  def test_flipped_bytes_and_missing_sidecar_are_recomputed(self):
    key = {"corpus": "c1"}
    embedding.cached_corpus_embeddings(self.dir, key, self.compute())
    array_path, meta_path = self.entry(key)
    with open(array_path, "r+b") as f:             # same length, one value changed
      f.seek(-3, os.SEEK_END)
      f.write(b"\x7f\x7f\x7f")
    embedding.cached_corpus_embeddings(self.dir, key, self.compute())
    self.assertEqual(self.calls, 2)
    os.remove(meta_path)                            # a run killed between the two renames
    embedding.cached_corpus_embeddings(self.dir, key, self.compute())
    self.assertEqual(self.calls, 3)

  def test_sidecar_for_other_key_parts_is_recomputed(self):
    key = {"corpus": "c1"}
    embedding.cached_corpus_embeddings(self.dir, key, self.compute())
    _, meta_path = self.entry(key)
    with open(meta_path) as f:
      meta = json.load(f)
    meta["key_parts"] = {"corpus": "other"}
    with open(meta_path, "w") as f:
      json.dump(meta, f)
    with self.assertLogs(level="WARNING"):
      embedding.cached_corpus_embeddings(self.dir, key, self.compute())
    self.assertEqual(self.calls, 2)

  def test_bad_compute_output_and_key(self):
    with self.assertRaisesRegex(ValueError, r"\[M, D\]"):
      embedding.cached_corpus_embeddings(self.dir, {"a": 1}, lambda: np.zeros(3))
    with self.assertRaisesRegex(ValueError, "JSON"):
      embedding.cached_corpus_embeddings(self.dir, {"a": object()}, self.compute())


if __name__ == "__main__":
  absltest.main()
