"""Tests for jaxsearch.data.tokenizer: tags, round trips, training, serialization."""
from __future__ import annotations

import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import sentencepiece as spm

from jaxsearch.data import tokenizer as tok_lib
from jaxsearch.data import world as world_lib

SMALL_WORLD = world_lib.WorldConfig(seed=5, num_people=60, num_cities=12, num_countries=5,
                                    num_companies=10, num_distractors=30, train_size=150,
                                    validation_size=30, test_size=30)

TRICKY = ("", " ", " x", "x ", "  a  b ", "a\nb\n\n", "\t tab", "naïve café", "漢字とかな",
          "emoji 🙂🚀", "digits 2024 and 3.14", "<search>Mira Tolven</search>",
          "<answer> a </answer><answer>", "<search", "</search>>", "a<think>b</think>c")


def random_unicode(rng: np.random.Generator, n: int) -> str:
  points = rng.integers(0, 0x10FFFF, size=n)
  points = np.where((points >= 0xD800) & (points < 0xE000), 0x41, points)  # No surrogates.
  return "".join(map(chr, points))


def is_contiguous_run(seq: list[int], sub: list[int]) -> bool:
  return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


class TokenizerTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.world = world_lib.build_world(SMALL_WORLD)
    cls.texts = cls.world.texts()
    cls.sp = tok_lib.SentencePieceTokenizer.train(cls.texts, vocab_size=1024)
    cls.sp_small = tok_lib.SentencePieceTokenizer.train(cls.texts, vocab_size=320)
    cls.byte = tok_lib.ByteTokenizer()

  def tokenizers(self):
    return {"byte": self.byte, "sp": self.sp, "sp_small": self.sp_small}

  @parameterized.parameters("byte", "sp", "sp_small")
  def test_tags_are_single_tokens(self, name):
    tok = self.tokenizers()[name]
    self.assertIsInstance(tok, tok_lib.Tokenizer)
    ids = [tok.tag_id(t) for t in tok_lib.TAGS]
    self.assertLen(set(ids), len(tok_lib.TAGS))
    self.assertNoCommonElements(ids, [tok.pad_id, tok.bos_id, tok.eos_id])
    for tag, i in zip(tok_lib.TAGS, ids):
      self.assertIn(i, tok.encode(tag))
      self.assertEqual(tok.decode([i]), tag)
      self.assertEqual(tok.encode(f"x{tag}y").count(i), 1)
    text = "<think>hm</think><search>Mira Tolven</search><answer>Brindel</answer>"
    ids_in_text = [i for i in tok.encode(text) if i in ids]
    self.assertEqual(ids_in_text, [tok.tag_id(t) for t in
                                   ("<think>", "</think>", "<search>", "</search>",
                                    "<answer>", "</answer>")])

  @parameterized.parameters("byte", "sp")
  def test_unknown_tag_raises(self, name):
    with self.assertRaisesRegex(ValueError, r"<tool>.*<search>"):
      self.tokenizers()[name].tag_id("<tool>")

  def test_byte_ids_by_hand(self):
    self.assertEqual(self.byte.vocab_size, 267)
    self.assertEqual((self.byte.pad_id, self.byte.bos_id, self.byte.eos_id), (0, 1, 2))
    self.assertEqual(self.byte.tag_id("<search>"), 3)
    self.assertEqual(self.byte.tag_id("</think>"), 10)
    self.assertEqual(self.byte.encode("A<answer>é"), [65 + 11, 7, 0xC3 + 11, 0xA9 + 11])
    self.assertEqual(self.byte.decode([1, 65 + 11, 0, 7, 2, 0]), "A<answer>")
    self.assertEqual(self.byte.decode([0xC3 + 11]), "\ufffd")  # Partial UTF-8.
    with self.assertRaisesRegex(ValueError, "267"):
      self.byte.decode([267])

  def test_byte_round_trip_arbitrary_unicode(self):
    rng = np.random.default_rng(0)
    for n in (1, 7, 50, 300):
      s = random_unicode(rng, n)
      self.assertEqual(self.byte.decode(self.byte.encode(s)), s)
    for s in TRICKY:
      self.assertEqual(self.byte.decode(self.byte.encode(s)), s)
      self.assertTrue(all(0 <= i < self.byte.vocab_size for i in self.byte.encode(s)))

  @parameterized.parameters("sp", "sp_small")
  def test_sp_round_trip_world_and_tricky(self, name):
    tok = self.tokenizers()[name]
    for s in self.texts:
      self.assertEqual(tok.decode(tok.encode(s)), s)
    for d in self.world.documents:
      self.assertEqual(tok.decode(tok.encode(d.contents)), d.contents)
    for s in TRICKY:
      self.assertEqual(tok.decode(tok.encode(s)), s, repr(s))
    rng = np.random.default_rng(1)
    for n in (5, 40, 200):  # Byte fallback: lossless on text never seen in training.
      s = random_unicode(rng, n)
      self.assertEqual(tok.decode(tok.encode(s)), s)
    ids = tok.encode("Which company")
    self.assertEqual(tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]), "Which company")

  def test_sp_whitespace_behaviour(self):
    tok = self.sp
    # The dummy prefix: a leading space is kept ("▁" + "▁x"), extra spaces survive.
    self.assertEqual(tok.decode(tok.encode(" x")), " x")
    self.assertLen(tok.encode(" city"), len(tok.encode("city")) + 1)
    self.assertEqual(tok.encode(" city")[1:], tok.encode("city"))
    # Concatenating two encodings inserts one space.
    self.assertEqual(tok.decode(tok.encode("in") + tok.encode("city")), "in city")
    self.assertEqual((tok.pad_id, tok.bos_id, tok.eos_id), (0, 2, 3))

  @parameterized.parameters("sp", "sp_small", "byte")
  def test_entity_names_encode_like_in_context(self, name):
    tok = self.tokenizers()[name]
    strings = list(self.texts)
    checked = 0
    for entity in self.world.entity_names:
      alone = tok.encode(entity)
      self.assertNotEmpty(alone)
      for s in strings:
        if s.startswith(entity) or f" {entity}" in s:
          self.assertTrue(is_contiguous_run(tok.encode(s), alone), (entity, s))
          checked += 1
      # A search call built from tag ids plus the encoded query decodes to the text form.
      call = [tok.tag_id("<search>")] + alone + [tok.tag_id("</search>")]
      self.assertIn(tok.decode(call), (f"<search>{entity}</search>",
                                       f"<search> {entity}</search>"))
    self.assertGreater(checked, 3 * len(self.world.entity_names))

  def test_names_split_into_several_pieces_with_small_vocab(self):
    # Guards the test above: with 320 ids most names are several pieces, so matching in
    # context is not trivial.
    lengths = [len(self.sp_small.encode(n)) for n in self.world.entity_names]
    self.assertGreater(np.mean(lengths), 2.0)

  def test_tokens_per_passage_small(self):
    sp = [len(self.sp.encode(d.text)) for d in self.world.documents]
    raw = [len(self.byte.encode(d.text)) for d in self.world.documents]
    self.assertLess(np.mean(sp), 16.0)
    self.assertLessEqual(max(sp), 24)
    self.assertLess(np.mean(sp), np.mean(raw) / 3)
    self.assertLessEqual(self.sp.vocab_size, 1024)
    self.assertLess(self.sp_small.vocab_size, self.sp.vocab_size)

  def test_training_is_deterministic(self):
    again = tok_lib.SentencePieceTokenizer.train(self.texts, vocab_size=1024)
    self.assertEqual(again.model_proto, self.sp.model_proto)
    self.assertEqual(again, self.sp)
    other_world = world_lib.build_world(
        world_lib.WorldConfig(**{**SMALL_WORLD.__dict__, "seed": 6}))
    other = tok_lib.SentencePieceTokenizer.train(other_world.texts(), vocab_size=1024)
    self.assertNotEqual(other.model_proto, self.sp.model_proto)

  def test_digits_split(self):
    tok = tok_lib.SentencePieceTokenizer.train(["in 2024 and 1999 and 2024 ok"] * 50,
                                               vocab_size=300)
    pieces = [tok.id_to_piece(i) for i in tok.encode("2024")]
    self.assertEqual(pieces, ["▁", "2", "0", "2", "4"])
    self.assertIn("▁and", [tok.id_to_piece(i) for i in tok.encode("and")])  # Merges happen.

  def test_train_validates(self):
    with self.assertRaisesRegex(ValueError, "vocab_size"):
      tok_lib.SentencePieceTokenizer.train(self.texts, vocab_size=100)
    with self.assertRaisesRegex(ValueError, "texts"):
      tok_lib.SentencePieceTokenizer.train([], vocab_size=512)

  @parameterized.parameters("byte", "sp")
  def test_bytes_and_file_round_trip(self, name):
    tok = self.tokenizers()[name]
    restored = tok_lib.tokenizer_from_bytes(tok.to_bytes())
    self.assertIs(type(restored), type(tok))
    sample = self.texts[7] + "<answer>x</answer>"
    self.assertEqual(restored.encode(sample), tok.encode(sample))
    self.assertEqual(restored.vocab_size, tok.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "tok.bin")
      tok.save(path)
      loaded = type(tok).load(path)
      self.assertEqual(loaded.encode(sample), tok.encode(sample))
      path2 = os.path.join(tmp, "tok2.bin")
      tok_lib.save_tokenizer(tok, path2)
      self.assertEqual(tok_lib.load_tokenizer(path2).encode(sample), tok.encode(sample))

  def test_sp_file_is_a_plain_sentencepiece_model(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "tok.model")
      self.sp.save(path)
      raw = spm.SentencePieceProcessor(model_file=path)
      text = self.texts[3]
      self.assertEqual(raw.encode(text), self.sp.encode(text))
      self.assertEqual(tok_lib.SentencePieceTokenizer.from_bytes(self.sp.model_proto), self.sp)

  def test_from_bytes_rejects_garbage(self):
    with self.assertRaisesRegex(ValueError, "unrecognised"):
      tok_lib.tokenizer_from_bytes(b"not a tokenizer")


if __name__ == "__main__":
  absltest.main()
