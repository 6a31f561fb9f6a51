"""The package's dependency rules (DESIGN.md), checked on the import statements themselves,
and the runnable docstring examples of the modules other projects import."""
import ast
import doctest
import importlib
import pathlib

from absl.testing import absltest, parameterized

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxsearch"

# subpackage or module -> jaxsearch modules it may import (prefix match).
ALLOWED = {
    "losses": ("jaxsearch.types", "jaxsearch.registry", "jaxsearch.losses"),
    "rewards": ("jaxsearch.types", "jaxsearch.registry", "jaxsearch.rewards"),
    "models": ("jaxsearch.types", "jaxsearch.registry", "jaxsearch.models",
               "jaxsearch.data.bpe", "jaxsearch.data.tokenizer"),  # checkpoint tokenizers
    "data": ("jaxsearch.types", "jaxsearch.registry", "jaxsearch.data"),
    "retrieval": ("jaxsearch.types", "jaxsearch.registry", "jaxsearch.retrieval",
                  "jaxsearch.models", "jaxsearch.data"),
    "rollout": ("jaxsearch.types", "jaxsearch.registry", "jaxsearch.rollout",
                "jaxsearch.retrieval"),
    # Generative retrieval builds on models, losses and the sampler; train/ builds on it. The
    # one exception is `GenerativeSearchClient.from_workdir`'s lazy import of train.dsi (the
    # loader of a DSI workdir).
    "generative": ("jaxsearch.types", "jaxsearch.registry", "jaxsearch.generative",
                   "jaxsearch.models", "jaxsearch.losses", "jaxsearch.rollout",
                   "jaxsearch.retrieval", "jaxsearch.data", "jaxsearch.programs.generative_retrieval"),
}


def jaxsearch_imports(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text())
  mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
  mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  return mods


class DependenciesTest(parameterized.TestCase):

  @parameterized.named_parameters(*((name, name) for name in ALLOWED))
  def test_subpackage_imports_only_what_it_may(self, name):
    for path in (PACKAGE / name).rglob("*.py"):
      ours = {m for m in jaxsearch_imports(path) if m.startswith("jaxsearch")}
      bad = {m for m in ours if not m.startswith(ALLOWED[name])}
      self.assertEmpty(bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}")

  def test_no_library_module_imports_gin_or_experiments(self):
    for path in PACKAGE.rglob("*.py"):
      mods = jaxsearch_imports(path)
      self.assertFalse(any(m == "gin" or m.startswith(("gin.", "experiments")) for m in mods),
                       path)

  @parameterized.named_parameters(
      ("advantages", "jaxsearch.losses.advantages"), ("policy", "jaxsearch.losses.policy"),
      ("qa", "jaxsearch.rewards.qa"), ("combine", "jaxsearch.rewards.combine"))
  def test_docstring_examples_run(self, module):
    result = doctest.testmod(importlib.import_module(module))
    self.assertGreater(result.attempted, 0)
    self.assertEqual(result.failed, 0)


if __name__ == "__main__":
  absltest.main()
