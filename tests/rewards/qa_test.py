"""Tests for jaxsearch.rewards.qa: SQuAD normalisation, EM/F1, answer extraction, format."""
from __future__ import annotations


import numpy as np
from absl.testing import absltest, parameterized

from jaxsearch.rewards import qa


class NormalizeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("lower_and_space", "  Hello   World ", "hello world"),
      ("articles", "The cat ate an apple and a pear", "cat ate apple and pear"),
      ("articles_whole_words_only", "theater anathema", "theater anathema"),
      # Punctuation is removed before articles, so joined words stay joined.
      ("punct_before_articles", "the-the (The) cat", "thethe cat"),
      ("punct_joins", "U.S.A.", "usa"),
      ("only_articles", "A an THE", ""),
      ("non_ascii_punct_kept", "caf\u00e9 \u2019s", "caf\u00e9 \u2019s"),
      ("tabs_newlines", "a\tb\nc", "b c"),
  )
  def test_normalize(self, text, expected):
    self.assertEqual(qa.normalize_answer(text), expected)


class EmF1Test(parameterized.TestCase):

  def test_exact_match(self):
    self.assertEqual(qa.exact_match("The Beatles!", ["beatles"]), 1.0)
    self.assertEqual(qa.exact_match("Beatles band", ["beatles"]), 0.0)
    self.assertEqual(qa.exact_match("fab four", ["beatles", "The Fab Four"]), 1.0)

  @parameterized.named_parameters(("none", None), ("empty", ""), ("blank", "  \n"))
  def test_missing_prediction_scores_zero(self, pred):
    self.assertEqual(qa.exact_match(pred, [""]), 0.0)
    self.assertEqual(qa.f1(pred, [""]), 0.0)

  def test_no_golds_scores_zero(self):
    self.assertEqual(qa.exact_match("x", []), 0.0)
    self.assertEqual(qa.f1("x", []), 0.0)

  def test_bare_string_gold_is_one_answer(self):
    self.assertEqual(qa.exact_match("paris", "Paris"), 1.0)
    self.assertEqual(qa.exact_match("p", "paris"), 0.0)   # not a list of characters

  def test_f1_hand_values(self):
    # common {blue, green}: P = 2/3, R = 2/4 -> F1 = 4/7.
    self.assertAlmostEqual(qa.f1("red blue green", ["blue green yellow orange"]), 4 / 7)
    # Multiplicity: common {x:1, y:1} of [x x y] and [x y y]: P = R = 2/3.
    self.assertAlmostEqual(qa.f1("x x y", ["x y y"]), 2 / 3)
    # Max over golds; articles and punctuation ignored.
    self.assertAlmostEqual(qa.f1("The red, car", ["blue", "red car"]), 1.0)
    self.assertEqual(qa.f1("red", ["blue"]), 0.0)


class ExtractAnswerTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("single", "<answer> Paris </answer>", "Paris"),
      ("last_of_many", "<answer>a</answer> x <answer>b</answer>", "b"),
      ("unclosed_last_ignored", "<answer>a</answer><answer>b", "a"),
      ("inner_pair", "<answer>a <answer>b</answer>", "b"),
      ("multiline", "<answer>New\nYork</answer>\n", "New\nYork"),
      ("empty_content", "<answer>  </answer>", ""),
      ("none", "no tags here", None),
      ("only_open", "<answer>x", None),
  )
  def test_extract(self, text, expected):
    self.assertEqual(qa.extract_answer(text), expected)


class FormatTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("answer_only", "<answer>x</answer>"),
      ("think_answer", "<think>hm</think>\n<answer>x</answer>\n  "),
      ("one_turn", "<search>q</search><information>d</information><answer>x</answer>"),
      ("two_turns_with_think",
       "<think>a</think> <search>q1</search>\n<information>d1</information>\n"
       "<search>q2</search> <information></information> <think></think> <answer>x</answer>"),
      ("leading_whitespace", "\n <answer>x</answer>"),
  )
  def test_well_formed(self, text):
    self.assertEqual(qa.format_score(text), 1.0)

  @parameterized.named_parameters(
      ("empty", ""),
      ("no_answer", "<search>q</search><information>d</information>"),
      ("text_after_answer", "<answer>x</answer> thanks"),
      ("eos_after_answer", "<answer>x</answer><|im_end|>"),
      ("two_answers", "<answer>x</answer><answer>y</answer>"),
      ("empty_answer", "<answer> </answer>"),
      ("empty_query", "<search>  </search><information>d</information><answer>x</answer>"),
      ("search_without_information", "<search>q</search><answer>x</answer>"),
      ("information_without_search", "<information>d</information><answer>x</answer>"),
      ("nested", "<answer>a <think>b</think></answer>"),
      ("nested_same", "<think><think>a</think></think><answer>x</answer>"),
      ("unclosed", "<think>a <answer>x</answer>"),
      ("stray_close", "</think><answer>x</answer>"),
      ("mismatched", "<think>a</search><answer>x</answer>"),
      ("text_between", "<think>a</think> so <answer>x</answer>"),
      ("text_before", "Sure. <answer>x</answer>"),
      ("two_thinks", "<think>a</think><think>b</think><answer>x</answer>"),
      ("think_after_search", "<search>q</search><think>t</think>"
       "<information>d</information><answer>x</answer>"),
  )
  def test_malformed(self, text):
    self.assertEqual(qa.format_score(text), 0.0)


class RegistryTest(parameterized.TestCase):

  def test_names(self):
    self.assertContainsSubset({"exact_match", "f1", "format"}, set(qa.REWARDS.names()))

  def test_uniform_signature_values(self):
    completions = ["<answer>Paris</answer>", "<answer>Paris France</answer>", "Paris",
                   "<think>t</think><answer>the paris</answer> x"]
    golds = [["paris"], ["Paris"], ["paris"], ["Paris"]]
    expected = {"exact_match": [1, 0, 0, 1], "f1": [1, 2 / 3, 0, 1], "format": [1, 1, 0, 0]}
    for name, want in expected.items():
      got = qa.REWARDS.get(name)(completions, golds)
      self.assertEqual(got.dtype, np.float32, name)
      self.assertEqual(got.shape, (4,), name)
      np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)

  @parameterized.named_parameters(("em", "exact_match"), ("f1", "f1"), ("format", "format"))
  def test_length_mismatch_raises(self, name):
    with self.assertRaisesRegex(ValueError, "2 completions but 1"):
      qa.REWARDS.get(name)(["a", "b"], [["a"]])

  def test_empty_batch(self):
    self.assertEqual(qa.REWARDS.get("f1")([], []).shape, (0,))


if __name__ == "__main__":
  absltest.main()
