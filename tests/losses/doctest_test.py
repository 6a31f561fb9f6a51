"""The docstring examples of the critic and credit modules run and print what they claim."""
import doctest
import importlib

from absl.testing import absltest, parameterized


class DocstringExamplesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("value", "jaxsearch.losses.value"), ("credit", "jaxsearch.losses.credit"))
  def test_docstring_examples_run(self, module):
    result = doctest.testmod(importlib.import_module(module))
    self.assertGreater(result.attempted, 0)
    self.assertEqual(result.failed, 0)


if __name__ == "__main__":
  absltest.main()
