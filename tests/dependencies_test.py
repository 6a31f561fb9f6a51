"""The package's dependency rules (DESIGN.md), checked on the import statements themselves,
and the runnable docstring examples of the modules other projects import.

The import graph is built from the AST of every module of `jaxsearch/`, counting imports inside
functions (a lazy import still makes a cycle, it only hides it until run time):
`import jaxsearch.a.b` is an edge to `jaxsearch.a.b`; `from jaxsearch.a import b` is an edge
to `jaxsearch.a.b` when that is a module, else to `jaxsearch.a`; relative imports are resolved
the same way. Rules:
  * no import cycle at all (no exceptions);
  * three layers: the library (everything but `train/` and `programs/`) imports nothing of
    `jaxsearch.train` or `jaxsearch.programs`; `jaxsearch.train` imports nothing of
    `jaxsearch.programs`;
  * per subpackage, the jaxsearch modules it may import (`ALLOWED`);
  * no package module imports gin or the launcher (`experiments`).
"""
import ast
import doctest
import importlib
import pathlib
import tempfile
import textwrap

from absl.testing import absltest, parameterized

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxsearch"

_BASE = ("jaxsearch.types", "jaxsearch.registry")
# subpackage -> jaxsearch modules it may import (a module or a package and everything under it).
ALLOWED = {
    "losses": _BASE + ("jaxsearch.losses",),
    "rewards": _BASE + ("jaxsearch.rewards",),
    "models": _BASE + ("jaxsearch.models",
                       "jaxsearch.data.bpe", "jaxsearch.data.tokenizer",  # checkpoint tokenizers
                       "jaxsearch.data.tokenizer_format", "jaxsearch.data.hf_tokenizer",
                       "jaxsearch.data.chat_template"),
    "data": _BASE + ("jaxsearch.data",),
    # Workdir readers (trained_encoder) use the checkpoint and config-file helpers.
    "retrieval": _BASE + ("jaxsearch.retrieval", "jaxsearch.models", "jaxsearch.data",
                          "jaxsearch.checkpoint", "jaxsearch.config_files"),
    "rollout": _BASE + ("jaxsearch.rollout", "jaxsearch.retrieval",
                        "jaxsearch.data.prompts"),          # the protocols' names
    # Generative retrieval builds on models, losses and the sampler; its workdir reader
    # (generative/workdir.py) uses the checkpoint and config-file helpers.
    "generative": _BASE + ("jaxsearch.generative", "jaxsearch.models", "jaxsearch.losses",
                           "jaxsearch.rollout", "jaxsearch.retrieval", "jaxsearch.data",
                           "jaxsearch.checkpoint", "jaxsearch.config_files"),
}

TRAIN = "jaxsearch.train"
PROGRAMS = "jaxsearch.programs"


def _within(module: str, prefixes) -> bool:
  """Whether `module` is one of `prefixes` or lies under one of them (dotted)."""
  if isinstance(prefixes, str):
    prefixes = (prefixes,)
  return any(module == p or module.startswith(p + ".") for p in prefixes)


def module_name(path: pathlib.Path, package_dir: pathlib.Path) -> str:
  """`jaxsearch/a/b.py` -> "jaxsearch.a.b"; `jaxsearch/a/__init__.py` -> "jaxsearch.a"."""
  parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def package_modules(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  return {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}


def imported_names(tree: ast.AST, module: str, is_package: bool
                   ) -> list[tuple[str, str | None]]:
  """Every import in `tree` (at any depth) as (module, imported name or None), relative
  imports made absolute."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(alias.name, None) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
      out += [(base, alias.name) for alias in node.names]
  return out


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
  """module -> the package's modules it imports (anywhere in its body), self-imports dropped."""
  modules = package_modules(package_dir)
  root = package_dir.name

  def resolve(name: str) -> str | None:
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name or None

  graph = {}
  for name, path in modules.items():
    tree = ast.parse(path.read_text(), str(path))
    edges = set()
    for mod, imported in imported_names(tree, name, path.name == "__init__.py"):
      if not _within(mod, root):
        continue
      sub = f"{mod}.{imported}" if imported and imported != "*" else None
      target = sub if sub in modules else resolve(mod)
      if target is not None and target != name:
        edges.add(target)
    graph[name] = edges
  return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (as a closed path [a, b, ..., a]) per strongly connected component that has one;
  [] for an acyclic graph."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def strongconnect(v):  # Tarjan; the package is small enough for recursion
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        strongconnect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(set(component))

  for v in sorted(graph):
    if v not in index:
      strongconnect(v)
  cycles = []
  for component in components:
    start = min(component)
    # Shortest path start -> ... -> start inside the component (breadth first).
    parent, frontier, found = {start: None}, [start], None
    while frontier and found is None:
      nxt = []
      for v in frontier:
        for w in sorted(graph[v] & component):
          if w == start:
            found = v
            break
          if w not in parent:
            parent[w] = v
            nxt.append(w)
        if found is not None:
          break
      frontier = nxt
    path, v = [start], found
    while v is not None and v != start:
      path.append(v)
      v = parent[v]
    cycles.append([start] + path[1:][::-1] + [start])
  return sorted(cycles)


def layer(module: str) -> str:
  if _within(module, PROGRAMS):
    return "programs"
  if _within(module, TRAIN):
    return "train"
  return "library"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
  """'a -> b' for every import that points up the layers library < train < programs."""
  rank = {"library": 0, "train": 1, "programs": 2}
  return sorted(f"{a} ({layer(a)}) -> {b} ({layer(b)})" for a, targets in graph.items()
                for b in targets if rank[layer(b)] > rank[layer(a)])


def all_imported_modules(path: pathlib.Path) -> set[str]:
  """The module names of every import statement of a file, unresolved (for non-jaxsearch rules)."""
  tree = ast.parse(path.read_text())
  return {m for m, _ in imported_names(tree, "", False) if m}


def _format_cycles(cycles: list[list[str]]) -> str:
  return "\n".join(" -> ".join(c) for c in cycles)


class DependenciesTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.graph = import_graph(PACKAGE)

  def test_graph_sees_the_package(self):
    # The graph is built from the files: a sanity check that it found modules and edges,
    # including an import made inside a function.
    self.assertIn("jaxsearch.retrieval.retriever", self.graph)
    self.assertIn("jaxsearch.retrieval.mips", self.graph["jaxsearch.retrieval.retriever"])
    self.assertIn("jaxsearch.data.bpe", self.graph["jaxsearch.data.tokenizer"])

  def test_no_import_cycles(self):
    cycles = find_cycles(self.graph)
    self.assertEmpty(cycles, "import cycles (imports inside functions count):\n"
                     + _format_cycles(cycles))

  def test_layers(self):
    bad = layer_violations(self.graph)
    self.assertEmpty(bad, "the library must not import jaxsearch.train or jaxsearch.programs, "
                     "and jaxsearch.train must not import jaxsearch.programs:\n" + "\n".join(bad))

  @parameterized.named_parameters(*((name, name) for name in ALLOWED))
  def test_subpackage_imports_only_what_it_may(self, name):
    prefix = f"jaxsearch.{name}"
    modules = [m for m in self.graph if _within(m, prefix)]
    self.assertNotEmpty(modules)
    for module in modules:
      bad = sorted(t for t in self.graph[module] if not _within(t, ALLOWED[name]))
      self.assertEmpty(bad, f"{module} imports {bad}")

  def test_no_library_module_imports_gin_or_experiments(self):
    for path in PACKAGE.rglob("*.py"):
      mods = all_imported_modules(path)
      self.assertFalse(any(_within(m, ("gin", "experiments")) for m in mods), path)

  @parameterized.named_parameters(
      ("advantages", "jaxsearch.losses.advantages"), ("policy", "jaxsearch.losses.policy"),
      ("qa", "jaxsearch.rewards.qa"), ("combine", "jaxsearch.rewards.combine"))
  def test_docstring_examples_run(self, module):
    result = doctest.testmod(importlib.import_module(module))
    self.assertGreater(result.attempted, 0)
    self.assertEqual(result.failed, 0)


# A tiny package: data/a.py and data/b.py import each other (b only inside a function), b
# imports train/ inside a function, train/t.py imports programs/, programs/p.py imports all.
_FAKE = {
    "__init__.py": "",
    "data/__init__.py": "",
    "data/a.py": "from jaxsearch.data import b\nX = 1\n",
    "data/b.py": textwrap.dedent("""\
        import os

        def f():
          from . import a
          from jaxsearch.train.t import run
          return a.X, run
        """),
    "data/c.py": "from jaxsearch.data.a import X\nfrom jaxsearch import data\n",
    "train/__init__.py": "",
    "train/t.py": "def run():\n  import jaxsearch.programs.p\n",
    "programs/__init__.py": "",
    "programs/p.py": "from jaxsearch.data import a, c\nfrom jaxsearch.train import t\n",
}


class CheckerSelfTest(absltest.TestCase):
  """The checker itself, on a temporary package with an injected cycle and layer breaks."""

  def _package(self, files: dict[str, str]) -> pathlib.Path:
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    root = pathlib.Path(tmp.name) / "jaxsearch"
    for rel, text in files.items():
      (root / rel).parent.mkdir(parents=True, exist_ok=True)
      (root / rel).write_text(text)
    return root

  def test_graph_resolves_submodules_names_and_relative_imports(self):
    graph = import_graph(self._package(_FAKE))
    self.assertEqual(graph["jaxsearch.data.a"], {"jaxsearch.data.b"})       # a submodule
    self.assertEqual(graph["jaxsearch.data.b"], {"jaxsearch.data.a",         # relative, lazy
                                                 "jaxsearch.train.t"})       # lazy
    self.assertEqual(graph["jaxsearch.data.c"], {"jaxsearch.data.a",         # a name in a
                                                 "jaxsearch.data"})          # a package
    self.assertEqual(graph["jaxsearch.train.t"], {"jaxsearch.programs.p"})

  def test_reports_the_injected_cycle_and_layer_breaks(self):
    graph = import_graph(self._package(_FAKE))
    self.assertEqual(find_cycles(graph), [["jaxsearch.data.a", "jaxsearch.data.b",
                                           "jaxsearch.data.a"]])
    self.assertEqual(layer_violations(graph), [
        "jaxsearch.data.b (library) -> jaxsearch.train.t (train)",
        "jaxsearch.train.t (train) -> jaxsearch.programs.p (programs)"])

  def test_clean_package_passes(self):
    clean = dict(_FAKE)
    clean["data/b.py"] = "import os\n"
    clean["train/t.py"] = "from jaxsearch.data import a\n"
    graph = import_graph(self._package(clean))
    self.assertEqual(find_cycles(graph), [])
    self.assertEqual(layer_violations(graph), [])

  def test_longer_cycles_are_listed_as_paths(self):
    graph = {"x": {"y"}, "y": {"z"}, "z": {"x", "w"}, "w": set(), "p": {"q"}, "q": {"p"}}
    self.assertEqual(find_cycles(graph), [["p", "q", "p"], ["x", "y", "z", "x"]])


if __name__ == "__main__":
  absltest.main()
