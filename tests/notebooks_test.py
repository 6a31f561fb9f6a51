"""Executes every notebook of notebooks/ with a tiny config and checks what it shows.

Each notebook is run in a fresh python3 kernel on CPU (`execute_notebook`), parameterised by
environment variables, and its outputs are checked against numbers the test recomputes or
writes itself; the committed files must be valid and stripped of outputs. Wall times on the
2-core development machine while other jobs loaded it (load average ~10; CPU time is a
third to a fifth of that): quickstart 200 s (twice executed), losses 90 s, sharding
90-145 s, retrieval 60-75 s, results explorer 15 s on given workdirs and 175-195 s training
its two demo runs (twice executed), generative retrieval 130-145 s (at load average ~4).
Everything but the committed-file checks and the explorer on given workdirs is `slow`.
"""
from __future__ import annotations

import ast
import base64
import glob
import json
import math
import os
import re
import shutil
import tempfile
import time
from unittest import mock

import nbclient
import nbformat
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from tests.xla_env import subprocess_env

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO_ROOT, "notebooks")
NOTEBOOK = os.path.join(NOTEBOOK_DIR, "quickstart.ipynb")
# Every notebook and the test class that executes it; `test_every_notebook_is_executed`
# fails for a notebook without both.
EXECUTED_BY = {
    "quickstart.ipynb": "QuickstartNotebookTest",
    "losses_walkthrough.ipynb": "LossesNotebookTest",
    "sharding_8_devices.ipynb": "ShardingNotebookTest",
    "retrieval_scann.ipynb": "RetrievalNotebookTest",
    "results_explorer.ipynb": "ResultsExplorerNotebookTest",
    "generative_retrieval.ipynb": "GenerativeRetrievalNotebookTest",
}
# One CPU device: a kernel must not inherit conftest's 8 fake devices.
BASE_ENV = {name: value for name, value in subprocess_env().items()
            if name in ("JAX_PLATFORMS", "XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")}
# The launcher smoke test's bindings (tests/integration/launcher_test.py), with a warm start
# long enough (150 cheap SFT steps, no warm-up) for the tiny policy to issue real searches.
TINY_BINDINGS = ";".join([
    "SFT_STEPS = 150", "RL_STEPS = 3", "sft/optim.OptimizerConfig.warmup_steps = 1",
    "world.WorldConfig.num_people = 60", "world.WorldConfig.num_distractors = 20",
    "world.WorldConfig.train_size = 100", "world.WorldConfig.validation_size = 10",
    "world.WorldConfig.test_size = 16",
    "experiment.SFTConfig.num_demos = 64", "experiment.SFTConfig.batch_size = 8",
    "steps.PolicyGradientConfig.prompts_per_step = 2", "steps.PolicyGradientConfig.num_generations = 2",
    "experiment.RunConfig.eval_batch_size = 16",
    "search_env.RolloutConfig.max_len = 128",
    "transformer.TransformerConfig.d_model = 32", "transformer.TransformerConfig.num_layers = 1",
    "transformer.TransformerConfig.mlp_dim = 64",
])
# "  search 1: * Title  (doc-id)", as the notebook lists retrieved documents.
RETRIEVED_LINE = re.compile(r"^\s+search (\d+): [* ] (.+?)  \((\S+)\)$", re.M)


def read_notebook(path: str = NOTEBOOK) -> nbformat.NotebookNode:
  return nbformat.read(path, as_version=4)


def execute_notebook(name: str, env: dict[str, str], timeout: int = 600
                     ) -> tuple[nbformat.NotebookNode, float]:
  """Runs notebooks/`name` in a fresh python3 kernel from the repository root.

  The kernel (and anything it launches) inherits `BASE_ENV` and `env`. Returns the executed
  notebook and the wall seconds it took.
  """
  nb = read_notebook(os.path.join(NOTEBOOK_DIR, name))
  start = time.perf_counter()
  with mock.patch.dict(os.environ, {**BASE_ENV, **env}):
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": REPO_ROOT}}).execute()
  seconds = time.perf_counter() - start
  print(f"{name} executed in {seconds:.1f} s")
  return nb, seconds


def execute(workdir: str) -> nbformat.NotebookNode:
  """Runs the quickstart notebook, training into `workdir` if needed."""
  return execute_notebook("quickstart.ipynb", {"JAXSEARCH_WORKDIR": workdir,
                                               "JAXSEARCH_GIN_BINDINGS": TINY_BINDINGS})[0]


def cell_texts(nb: nbformat.NotebookNode) -> list[str]:
  """The printed (stream) text of each code cell."""
  return ["".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")
          for c in nb.cells if c.cell_type == "code"]


ANSI = re.compile(r"\x1b\[[0-9;]*m")   # rich colours numbers in a kernel


def cell_stdouts(nb: nbformat.NotebookNode) -> list[str]:
  """Per code cell: what it printed to stdout and the text/plain of the data it displayed
  (not figures), without terminal colour codes."""
  out = []
  for c in nb.cells:
    if c.cell_type != "code":
      continue
    parts = []
    for o in c.outputs:
      if o.output_type == "stream" and o.name == "stdout":
        parts.append(o.text)
      elif o.output_type in ("display_data", "execute_result") and "image/png" not in o.data:
        parts.append(o.data.get("text/plain", "") + "\n")
    out.append(ANSI.sub("", "".join(parts)))
  return out


def error_outputs(nb: nbformat.NotebookNode) -> list:
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if o.output_type == "error"]


def png_outputs(nb: nbformat.NotebookNode) -> list[bytes]:
  return [base64.b64decode(o.data["image/png"]) for c in nb.cells if c.cell_type == "code"
          for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]


def notebook_files() -> list[str]:
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))


def table_rows(cells: list[str], header: str) -> list[list[str]]:
  """The whitespace-split rows under the first line that starts with `header`, in the cell
  that printed it, up to a blank line or the end of the cell (dashed lines are skipped)."""
  for text in cells:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    if start is None:
      continue
    rows = []
    for line in lines[start + 1:]:
      if not line.strip():
        break
      if not set(line.strip()) <= {"-", " "}:
        rows.append(line.split())
    return rows
  raise AssertionError(f"no cell printed a line starting with {header!r}")


class CommittedNotebookTest(parameterized.TestCase):
  """Cheap checks of the files as committed."""

  def test_every_notebook_is_executed(self):
    self.assertEqual(notebook_files(), sorted(EXECUTED_BY))
    for name, test_class in EXECUTED_BY.items():
      self.assertIn(test_class, globals(), name)

  @parameterized.parameters(*sorted(EXECUTED_BY))
  def test_is_valid_and_has_no_outputs(self, name):
    nb = read_notebook(os.path.join(NOTEBOOK_DIR, name))
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    self.assertNotEmpty(code)
    for c in code:
      self.assertEqual(c.outputs, [], c.source[:80])
      self.assertIsNone(c.execution_count, c.source[:80])
    self.assertEqual(nb.metadata.kernelspec.name, "python3")

  @parameterized.parameters(*sorted(EXECUTED_BY))
  def test_install_cell_only_runs_in_colab(self, name):
    first = next(c for c in read_notebook(os.path.join(NOTEBOOK_DIR, name)).cells
                 if c.cell_type == "code")
    self.assertIn('if "google.colab" in sys.modules:', first.source)
    # Every statement that installs or clones is inside that `if` block.
    lines = first.source.splitlines()
    guard = next(i for i, l in enumerate(lines) if l.startswith('if "google.colab"'))
    for i, line in enumerate(lines):
      if "pip" in line or "git" in line:
        self.assertGreater(i, guard, line)
        self.assertTrue(line.startswith("  "), line)


@pytest.mark.slow
class QuickstartNotebookTest(absltest.TestCase):

  def test_trains_plots_and_shows_a_trajectory_then_reuses_the_run(self):
    tmp = tempfile.mkdtemp()  # (absltest's create_tempdir needs parsed flags, not under pytest)
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    workdir = os.path.join(tmp, "run")
    nb = execute(workdir)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    self.assertEmpty(errors)
    texts = cell_texts(nb)
    everything = "\n".join(texts)

    # It trained through the launcher into the requested workdir.
    self.assertTrue(os.path.exists(os.path.join(workdir, "summary.json")))
    self.assertIn("[rl 3/3]", everything)
    self.assertIn("[sft 150/150]", everything)

    # At least one figure came back as a PNG.
    pngs = png_outputs(nb)
    self.assertNotEmpty(pngs)
    self.assertTrue(all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs))

    # The results table shows summary.json's numbers on the right rows.
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    table = next(t for t in texts if "SFT + GRPO" in t)
    self.assertRegex(table, r"policy\s+EM\s+F1\s+searches")
    rows = {line.split("  ")[0]: line for line in table.splitlines()}
    for label, prefix in (("closed book (no search)", "closed_book"), ("warm start (SFT)", "sft"),
                          ("SFT + GRPO", "rl")):
      values = [f"{summary[f'{prefix}_{k}']:.3f}"
                for k in ("em", "f1", "searches", "support_recall", "format")]
      self.assertEqual(rows[label].split()[-5:], values, rows[label])
    self.assertIn(f"test split: {summary['num_eval_questions']} questions", table)

    # One test episode with its search calls and the environment's passages.
    episode = next(t for t in texts if "gold answer:" in t)
    self.assertIn("question:", episode)
    self.assertRegex(episode, r"correct:\s+(yes|no)\n")
    self.assertIn("<search>", episode)
    self.assertIn("<information>", episode)
    self.assertRegex(episode, r"\nAGENT  <search>")
    self.assertRegex(episode, r"\nSEARCH <information>")
    # The listed documents are the ones whose passages ("title: text") the agent was shown.
    listing = next(t for t in texts if "retrieved documents:" in t)
    retrieved = RETRIEVED_LINE.findall(listing)
    self.assertNotEmpty(retrieved, listing)
    for _, title, _ in retrieved:
      self.assertIn(f"{title}:", episode)

    # A second execution finds the finished run and does not retrain.
    mtime = os.path.getmtime(os.path.join(workdir, "summary.json"))
    again = "\n".join(cell_texts(execute(workdir)))
    self.assertIn("holds a finished run: not retraining", again)
    self.assertNotIn("[sft", again)
    self.assertEqual(os.path.getmtime(os.path.join(workdir, "summary.json")), mtime)
    self.assertIn(table, again)


# "name\n  library: [...]\n  by hand: [...]", as the losses notebook's `check` prints.
CHECK = re.compile(r"^(\S[^\n]*)\n  library: ([^\n]+)\n  by hand: ([^\n]+)$", re.M)


@pytest.mark.slow
class LossesNotebookTest(absltest.TestCase):
  """notebooks/losses_walkthrough.ipynb: every estimator, library value vs numpy by hand."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.nb, cls.seconds = execute_notebook("losses_walkthrough.ipynb", {})
    cls.cells = cell_stdouts(cls.nb)
    cls.text = "".join(cls.cells)
    cls.checks = {name: (np.array(json.loads(lib), float), np.array(json.loads(hand), float))
                  for name, lib, hand in CHECK.findall(cls.text)}

  def test_runs_without_errors_and_every_printed_pair_agrees(self):
    self.assertEmpty(error_outputs(self.nb))
    self.assertGreaterEqual(len(self.checks), 60)
    self.assertIn(f"{len(self.checks)} checks passed", self.text)
    for name, (library, by_hand) in self.checks.items():
      np.testing.assert_allclose(library, by_hand, rtol=1e-5, atol=1e-5, err_msg=name)

  def test_covers_every_estimator_family(self):
    required = [
        "grpo (scale=group)", "grpo (scale=batch)", "drgrpo", "rloo", "reinforce++",
        "reinforce++ (group baseline)", "stratified (blend=0.5)", "zero_variance_fraction",
        "masked_whiten", "gae advantages", "gae returns", "discounted_returns",
        "reinforce++ token advantages", "token_logprobs", "entropy_from_logits",
        "ppo clipped surrogate (token-mean)", "ppo dual clip (c=3)",
        "aggregate token-mean", "aggregate seq-mean-token-mean", "aggregate seq-mean-token-sum",
        "aggregate seq-mean-token-sum-norm", "gspo", "k1 (kl)", "k2 (mse)", "k3 (low_var_kl)",
        "grpo_loss = ppo + 0.1 * k3", "cross_entropy_loss", "value_loss (clip 0.5)",
        "two_hot(0.2)", "hl_gauss(0.2)", "categorical_value_loss (two-hot)", "turn_sums",
        "turn_returns (gamma=0.5)", "turn_level_advantages (per turn)", "dual_level_advantages",
        "information_gain_rewards", "igpo_turn_rewards", "gold_answer_logprobs (uniform model)",
        "implicit_process_rewards (beta=0.1)", "llds_penalty", "truncated_is_weights (token, C=2)",
        "truncated_is_weights (sequence, C=2)", "bradley_terry_loss (margin 0.5)",
        "dpo_loss on paper", "info_nce_loss", "info_nce_loss (symmetric)",
        "retriever_posterior", "marginal_nll", "jit(grpo_loss)"]
    missing = [name for name in required if name not in self.checks]
    self.assertEmpty(missing)

  def test_library_values_match_values_computed_here(self):
    library = {name: lib for name, (lib, _) in self.checks.items()}
    # The notebook's batch: groups [1, 0, 0, 1], [1, 1, 1, 0] and the singleton [2].
    # RLOO: r_i - mean of the other rows of its group; a singleton gets 0.
    np.testing.assert_allclose(library["rloo"], [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3,
                                                 1 / 3, -1, 0], atol=1e-5)
    # Dr. GRPO: r - group mean (0.5, 0.75, 2).
    np.testing.assert_allclose(library["drgrpo"], [.5, -.5, -.5, .5, .25, .25, .25, -.75, 0],
                               atol=1e-5)
    # GRPO: (r - mean) / std (ddof=1): sqrt(1/3) in group 0, 0.5 in group 1.
    a = .5 / math.sqrt(1 / 3)
    np.testing.assert_allclose(library["grpo (scale=group)"],
                               [a, -a, -a, a, .5, .5, .5, -1.5, 0], atol=1e-4)
    self.assertAlmostEqual(float(library["zero_variance_fraction"]), 1 / 3, places=5)
    # Aggregation of rows [1, 1] and [4, (masked)].
    for agg, value in (("token-mean", 2.0), ("seq-mean-token-mean", 2.5),
                       ("seq-mean-token-sum", 3.0), ("seq-mean-token-sum-norm", 1.5)):
      self.assertAlmostEqual(float(library[f"aggregate {agg}"]), value, places=5)
    self.assertAlmostEqual(float(library["k3 on paper"]), 0.5 + math.log(2) - 1, places=5)
    self.assertAlmostEqual(float(library["value_loss on paper"]), 1.125, places=5)
    self.assertAlmostEqual(float(library["dpo_loss on paper"]), math.log1p(math.exp(-1)),
                           places=5)
    self.assertAlmostEqual(float(library["llds_penalty on paper"]), math.log(2) / 6, places=5)
    np.testing.assert_allclose(library["two_hot(0.2)"], [0, 0, .6, .4, 0], atol=1e-5)
    np.testing.assert_allclose(library["information_gain_rewards"],
                               [[math.log(4), math.log(2), 0]], atol=1e-5)

  def test_kl_estimator_table(self):
    # k1 and k3 are unbiased, k3 has the smaller spread, k2 is biased low here.
    exact = float(re.search(r"exact KL\(p \|\| q\) = ([\d.]+)", self.text).group(1))
    rows = {r[0]: [float(v) for v in r[1:]] for r in table_rows(self.cells, "estimator")
            if r[0] in ("k1", "k2", "k3")}
    self.assertEqual(sorted(rows), ["k1", "k2", "k3"])
    p = np.array([.4, .25, .15, .1, .06, .04])
    q = np.array([.3, .3, .1, .1, .1, .1])
    self.assertAlmostEqual(exact, float(np.sum(p * np.log(p / q))), places=5)
    for kind in ("k1", "k3"):
      mean, std, _ = rows[kind]
      self.assertLess(abs(mean - exact), 4 * std / math.sqrt(20000), kind)
    self.assertLess(rows["k3"][1], rows["k1"][1])
    self.assertLess(rows["k2"][2], 0.0)


# The logical-axis rules (sharding.DEFAULT_RULES) for the parameter names: which mesh axis
# splits each dimension; other names stay whole.
RULES = {"vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor",
         "mlp": "tensor"}
MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]


@pytest.mark.slow
class ShardingNotebookTest(absltest.TestCase):
  """notebooks/sharding_8_devices.ipynb: placement, parity with one device, compile report."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.nb, cls.seconds = execute_notebook("sharding_8_devices.ipynb", {})
    cls.cells = cell_stdouts(cls.nb)
    cls.text = "".join(cls.cells)

  def test_runs_on_8_devices_without_errors(self):
    self.assertEmpty(error_outputs(self.nb))
    self.assertIn("devices: 8 ", self.text)

  def test_placement_tables_follow_the_rules(self):
    for mesh in MESHES:
      sizes = dict(zip(("data", "fsdp", "tensor"), mesh))
      header = f"mesh data={mesh[0]} fsdp={mesh[1]} tensor={mesh[2]}"
      start = self.text.index(header)
      block = self.text[start:self.text.index("\n\n", start)]
      rows = re.findall(r"^  (\S+)\s+(\([\d, ]+\))\s+(\(.*?\))\s*(\(.*?\))\s+(\([\d, ]+\))\s*$",
                        block, re.M)
      self.assertLen(rows, 11, block)                      # every parameter of the model
      for path, shape, logical, spec, per_device in rows:
        shape, logical = ast.literal_eval(shape), ast.literal_eval(logical)
        spec, per_device = ast.literal_eval(spec), ast.literal_eval(per_device)
        axes = tuple(RULES.get(name) for name in logical)
        self.assertEqual(spec, axes, path)
        expected = tuple(d // (sizes[a] if a else 1) for d, a in zip(shape, axes))
        self.assertEqual(per_device, expected, (mesh, path))
        if path == "embed/embedding":
          self.assertEqual(per_device, (64 // mesh[2], 32 // mesh[1]))

  def test_embedding_drawing_shows_its_devices(self):
    drawings = re.split(r"embed/embedding on mesh ", self.text)[1:]
    self.assertLen(drawings, 3)
    for mesh, drawing in zip(MESHES, drawings):
      self.assertTrue(drawing.startswith(str(mesh)), drawing[:20])
      labels = re.findall(r"CPU ([\d,]+)", drawing.split("\n\n")[0][:2000])
      groups = [tuple(int(d) for d in label.split(",")) for label in labels]
      # Each piece is held by the `data` replicas; together they cover the 8 devices once.
      self.assertLen(groups, 8 // mesh[0], drawing)
      self.assertTrue(all(len(g) == mesh[0] for g in groups), groups)
      self.assertEqual(sorted(d for g in groups for d in g), list(range(8)))

  def test_updates_match_the_single_device_update(self):
    single = re.search(r"single-device update: loss = ([\d.]+)", self.text).group(1)
    for mesh in MESHES:
      m = re.search(re.escape(f"mesh {mesh}: ") + r"initial params max \|diff\| = (\S+); after "
                    r"the update max \|param - single-device\| = (\S+); loss (\S+) "
                    r"\(single device (\S+)\)", self.text)
      self.assertIsNotNone(m, mesh)
      self.assertEqual(float(m.group(1)), 0.0)
      self.assertLess(float(m.group(2)), 1e-5)
      self.assertEqual(m.group(4), single)
      self.assertAlmostEqual(float(m.group(3)), float(single), places=5)

  def test_compile_report_splits_work_and_memory(self):
    rows = {r[0] if r[0] == "one" else ast.literal_eval(" ".join(r[:3])): r
            for r in table_rows(self.cells, "mesh         devices")}
    one = rows["one"]      # "one device 1 MFLOP ..."
    single_flops, single_args = float(one[3]), float(one[5])
    for mesh in MESHES:
      devices, flops, total_flops, args = (float(v) for v in rows[mesh][3:7])
      self.assertEqual(devices, 8)
      self.assertAlmostEqual(flops * 8, total_flops, delta=0.01 * total_flops + 1e-3)
      # The partitioned program does the single-device work, split (with some duplication).
      self.assertGreater(total_flops, 0.7 * single_flops)
      self.assertLess(total_flops, 2.0 * single_flops)
      if mesh[1] * mesh[2] > 1:       # parameters and optimizer state are split
        self.assertLess(args, 0.5 * single_args, mesh)
    mfu = {ast.literal_eval(" ".join(r[:3])): float(r[-1])
           for r in table_rows(self.cells, "mesh          step ms")}
    self.assertEqual(sorted(mfu), sorted(MESHES))
    self.assertTrue(all(0 < v < 1 for v in mfu.values()), mfu)


RETRIEVAL_ENV = {"JAXSEARCH_WORLD_PEOPLE": "60", "JAXSEARCH_WORLD_DISTRACTORS": "20",
                 "JAXSEARCH_NUM_QUERIES": "40", "JAXSEARCH_WORDNET_DOCS": "200",
                 "JAXSEARCH_WORDNET_QUERIES": "20"}


@pytest.mark.slow
class RetrievalNotebookTest(absltest.TestCase):
  """notebooks/retrieval_scann.ipynb on a small world, 40 questions, 200 WordNet glosses."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.nb, cls.seconds = execute_notebook("retrieval_scann.ipynb", RETRIEVAL_ENV)
    cls.cells = cell_stdouts(cls.nb)
    cls.text = "".join(cls.cells)

  def test_runs_and_plots(self):
    self.assertEmpty(error_outputs(self.nb))
    pngs = png_outputs(self.nb)
    self.assertLen(pngs, 1)
    self.assertTrue(pngs[0].startswith(b"\x89PNG\r\n\x1a\n"))

  def test_bm25_table_row_matches_a_recomputation(self):
    from jaxsearch.data.world import WorldConfig, build_world  # noqa: PLC0415
    from jaxsearch.retrieval import metrics  # noqa: PLC0415
    from jaxsearch.retrieval.corpus import from_world, world_queries  # noqa: PLC0415
    from jaxsearch.retrieval.retriever import build_retriever  # noqa: PLC0415
    world = build_world(WorldConfig(num_people=60, num_distractors=20))
    corpus = from_world(world)
    queries, qrels = world_queries(world, "test")
    qids = sorted(queries)[:40]
    self.assertIn(f"{len(corpus)} documents; {len(queries)} test questions, searching 40",
                  self.text)
    ids, scores = build_retriever("bm25", corpus).search([queries[q] for q in qids], 10)
    run = metrics.run_from_arrays(qids, ids, scores, corpus.ids)
    measures = ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"]
    expected = metrics.mean_measures(metrics.evaluate(run, {q: qrels[q] for q in qids},
                                                      measures))
    rows = {" ".join(r[:-5]): r[-5:] for r in table_rows(self.cells, "retriever ")}
    self.assertEqual(sorted(rows), ["bm25", "minilm exact", "minilm scann"])
    self.assertEqual(rows["bm25"], [f"{expected[m]:.3f}" for m in measures])
    # Dense retrieval works on these questions, exact at least as well as ScaNN's partial search.
    exact = [float(v) for v in rows["minilm exact"]]
    scann = [float(v) for v in rows["minilm scann"]]
    self.assertTrue(all(0 <= v <= 1 for v in exact + scann))
    self.assertGreater(exact[3], 0.5)                       # mrr@10
    self.assertGreaterEqual(exact[2], scann[2])             # recall@10

  def test_scann_sweep_reaches_exact_recall(self):
    num_leaves = round(168 ** 0.5)
    sweep = [(int(r[0]), int(r[1]), float(r[2]), float(r[3]))
             for r in table_rows(self.cells, " leaves searched")]
    self.assertEqual([s[1] for s in sweep], [num_leaves] * len(sweep))
    leaves = [s[0] for s in sweep]
    self.assertEqual(leaves, sorted(leaves))
    self.assertEqual((leaves[0], leaves[-1]), (1, num_leaves))
    recalls = [s[2] for s in sweep]
    self.assertGreaterEqual(recalls[-1], 0.95)
    self.assertLess(recalls[0], recalls[-1])
    self.assertTrue(all(s[3] > 0 for s in sweep))
    # The index's own setting (num_leaves // 4 leaves) is one point of the sweep.
    built = float(re.search(r"recall@10 of ScaNN against exact search: ([\d.]+)",
                            self.text).group(1))
    self.assertEqual(built, dict(zip(leaves, recalls))[num_leaves // 4])
    self.assertIn(f"num_leaves={num_leaves}, leaves_to_search={num_leaves // 4}", self.text)

  def test_wordnet_sample(self):
    self.assertIn("WordNet sample: 200 of 7730 documents, 20 name queries, "
                  "20 description queries", self.text)
    rows = {" ".join(r[:-5]): [float(v) for v in r[-5:]]
            for r in table_rows(self.cells, "retriever                    recall@1")}
    self.assertEqual(sorted(rows), ["bm25 / description", "bm25 / name",
                                    "minilm exact / description", "minilm exact / name"])
    self.assertGreaterEqual(rows["bm25 / description"][2], 0.9)    # recall@10


def write_workdir(path: str, rows: list[dict], summary: dict, config: dict) -> str:
  os.makedirs(path)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  for name, data in (("summary.json", summary), ("run_config.json", config)):
    with open(os.path.join(path, name), "w") as f:
      json.dump(data, f)
  return path


EXPLORER_KEYS = ["closed_book_em", "sft_em", "rl_em", "rl_f1", "rl_searches",
                 "rl_support_recall"]


class ResultsExplorerNotebookTest(absltest.TestCase):
  """notebooks/results_explorer.ipynb on workdirs written here, and (slow) on two trained."""

  def _check_table(self, cells, workdirs, names):
    rows = {r[0]: r[1:] for r in table_rows(cells, "run ")}
    self.assertEqual(sorted(rows), sorted(names))
    for name, workdir in zip(names, workdirs):
      with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
      expected = [f"{summary[k]:.3f}" for k in EXPLORER_KEYS]
      self.assertEqual(rows[name][:len(EXPLORER_KEYS)], expected, name)
    return rows

  def test_given_workdirs(self):
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    summary = lambda em: {**{k: 0.0 for k in EXPLORER_KEYS}, "rl_em": em, "sft_em": 0.25,
                          "rl_searches": 1.5, "num_eval_questions": 16}
    # GRPO logged RL step 2 twice (a resume): the second value is the one that counts.
    grpo = write_workdir(os.path.join(tmp, "grpo", "seed0"), [
        {"step": 1, "sft/loss": 3.0}, {"step": 2, "sft/loss": 2.0},
        {"step": 1, "rl/reward": 0.1, "rl/em": 0.0, "rl/kl": 0.01, "rl/entropy": 1.0},
        {"step": 2, "rl/reward": 0.2, "rl/em": 0.5, "rl/kl": 0.9, "rl/entropy": 0.9},
        {"step": 2, "rl/reward": 0.3, "rl/em": 0.5, "rl/kl": 0.02, "rl/entropy": 0.8},
    ], summary(0.625), {"rl": {"grpo": {"advantage": "grpo"}}})
    rloo = write_workdir(os.path.join(tmp, "rloo", "seed0"), [   # no entropy logged
        {"step": 1, "rl/reward": 0.4, "rl/em": 0.25, "rl/kl": 0.03},
    ], summary(0.5), {"rl": {"grpo": {"advantage": "rloo"}}})
    demo_root = os.path.join(tmp, "demo")
    nb, _ = execute_notebook("results_explorer.ipynb", {
        "JAXSEARCH_RESULTS_WORKDIRS": os.pathsep.join([grpo, rloo]),
        "JAXSEARCH_RESULTS_ROOT": demo_root})
    self.assertEmpty(error_outputs(nb))
    cells = cell_stdouts(nb)
    text = "".join(cells)
    self.assertIn("nothing to train", text)
    self.assertFalse(os.path.exists(demo_root))
    # read_metrics drops the first write of the repeated step: 4 rows.
    self.assertIn("grpo/seed0: finished, 4 metric rows (2 RL steps), advantage=grpo", text)
    self.assertIn("rloo/seed0: finished, 1 metric rows (1 RL steps), advantage=rloo", text)
    rows = self._check_table(cells, [grpo, rloo], ["grpo/seed0", "rloo/seed0"])
    # rl/kl and rl/entropy: the last logged values; rloo logged no entropy.
    self.assertEqual(rows["grpo/seed0"][-3:], ["0.020", "0.800", "grpo"])
    self.assertEqual(rows["rloo/seed0"][-3:], ["0.030", "-", "rloo"])
    self.assertIn("test-split questions per run: [16]", text)
    pngs = png_outputs(nb)
    self.assertLen(pngs, 1)
    self.assertTrue(pngs[0].startswith(b"\x89PNG\r\n\x1a\n"))

  @pytest.mark.slow
  def test_trains_two_algorithms_then_reuses_them(self):
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    env = {"JAXSEARCH_RESULTS_ROOT": tmp, "JAXSEARCH_GIN_BINDINGS": EXPLORER_BINDINGS}
    nb, _ = execute_notebook("results_explorer.ipynb", env)
    self.assertEmpty(error_outputs(nb))
    cells = cell_stdouts(nb)
    text = "".join(cells)
    workdirs = [os.path.join(tmp, "grpo"), os.path.join(tmp, "rloo")]
    for algo, workdir in zip(("grpo", "rloo"), workdirs):
      self.assertIn(f"[{algo}] [rl 3/3]", text)
      with open(os.path.join(workdir, "run_config.json")) as f:
        self.assertEqual(json.load(f)["rl"]["algorithm"]["advantage"], algo)
    rows = self._check_table(cells, workdirs, ["grpo", "rloo"])
    self.assertEqual([rows["grpo"][-1], rows["rloo"][-1]], ["grpo", "rloo"])
    self.assertLen(png_outputs(nb), 1)
    # A second execution finds both finished runs and trains nothing.
    mtimes = [os.path.getmtime(os.path.join(w, "summary.json")) for w in workdirs]
    again_cells = cell_stdouts(execute_notebook("results_explorer.ipynb", env)[0])
    again = "".join(again_cells)
    self.assertEqual(again.count("holds a finished run: not retraining"), 2)
    self.assertNotIn("[rl 1/3]", again)
    self.assertEqual([os.path.getmtime(os.path.join(w, "summary.json")) for w in workdirs],
                     mtimes)
    self._check_table(again_cells, workdirs, ["grpo", "rloo"])


# The launcher smoke test's bindings, for the explorer's two demo runs.
EXPLORER_BINDINGS = ";".join([
    "SFT_STEPS = 3", "RL_STEPS = 3",
    "world.WorldConfig.num_people = 60", "world.WorldConfig.num_distractors = 20",
    "world.WorldConfig.train_size = 100", "world.WorldConfig.validation_size = 10",
    "world.WorldConfig.test_size = 16",
    "experiment.SFTConfig.num_demos = 64", "experiment.SFTConfig.batch_size = 8",
    "steps.PolicyGradientConfig.prompts_per_step = 2", "steps.PolicyGradientConfig.num_generations = 2",
    "experiment.RunConfig.eval_batch_size = 16", "search_env.RolloutConfig.max_len = 128",
    "transformer.TransformerConfig.d_model = 32", "transformer.TransformerConfig.num_layers = 1",
    "transformer.TransformerConfig.mlp_dim = 64",
])


GENERATIVE_ENV = {"JAXSEARCH_DSI_STEPS": "200", "JAXSEARCH_DSI_BEAMS": "1,5,10",
                  "JAXSEARCH_WORDNET_DOCS": "300", "JAXSEARCH_DIFFUSION_DOCS": "64",
                  "JAXSEARCH_DIFFUSION_STEPS": "150"}
# "  1 * docID 196      log p  -3.0106  p 0.0493  person-0108: 'Narvo ...'"
DECODED_LINE = re.compile(r"^  (\d+) ([* ]) docID (\S+)\s+log p\s+(-?[\d.]+)  p ([\d.]+)  "
                          r"(\S+): (.+)$", re.M)
# "  [1] * person-0098      score  -1.9032  '...'"
HIT_LINE = re.compile(r"^  \[(\d+)\] ([* ]) (\S+)\s+score\s+(-?[\d.]+)  ", re.M)


@pytest.mark.slow
class GenerativeRetrievalNotebookTest(absltest.TestCase):
  """notebooks/generative_retrieval.ipynb: docIDs, a 200-step DSI run into a temporary workdir
  (beams 1, 5, 10), one decoded question, the search tool, a 150-step diffusion head on 64
  passages. The notebook runs in 130-145 s on the 2-core machine at load average ~4."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tmp = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, tmp, ignore_errors=True)
    cls.workdir = os.path.join(tmp, "dsi")
    cls.nb, cls.seconds = execute_notebook(
        "generative_retrieval.ipynb", {**GENERATIVE_ENV, "JAXSEARCH_DSI_WORKDIR": cls.workdir})
    cls.cells = cell_stdouts(cls.nb)
    cls.text = "".join(cls.cells)
    from jaxsearch.data.world import WorldConfig, build_world  # noqa: PLC0415
    from jaxsearch.retrieval.corpus import from_world  # noqa: PLC0415
    cls.corpus = from_world(build_world(WorldConfig()))
    with open(os.path.join(cls.workdir, "summary.json")) as f:
      cls.summary = json.load(f)

  def cell_with(self, needle: str) -> str:
    return next(t for t in self.cells if needle in t)

  def test_runs_and_plots(self):
    self.assertEmpty(error_outputs(self.nb))
    pngs = png_outputs(self.nb)
    self.assertLen(pngs, 2)              # recall / latency vs beam size; recall vs T
    self.assertTrue(all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs))

  def test_docid_table_every_docid_is_unique(self):
    n = len(self.corpus)
    rows = {r[0]: r[1:] for r in table_rows(self.cells, "kind ")}
    self.assertEqual(sorted(rows), ["atomic", "hypernym", "naive", "rq", "semantic"])
    for kind, (corpus, docs, unique, k, lo, mean, hi, states, entries) in rows.items():
      expected = 300 if kind == "hypernym" else n
      self.assertEqual(corpus, "wordnet" if kind == "hypernym" else "world")
      self.assertEqual((int(docs), int(unique)), (expected, expected), kind)
      self.assertLessEqual(int(lo), float(mean))
      self.assertLessEqual(float(mean), int(hi))
      self.assertEqual(int(entries), int(states) * (int(k) + 1), kind)
      # Root, then >= one state per docID's last code and one per END; at most a chain each.
      self.assertBetween(int(states), 1 + 2 * expected, 1 + expected * (int(hi) + 1))
    self.assertIn("every docID is unique", self.text)
    # By hand: atomic = one code per document; naive = 3 decimal digits of 448 rows, whose
    # trie has the root, 5 first digits, 45 two-digit prefixes, 448 docIDs and 448 ENDs.
    self.assertEqual(rows["atomic"], ["world", str(n), str(n), str(n), "1", "1.00", "1",
                                      str(1 + 2 * n), str((1 + 2 * n) * (n + 1))])
    self.assertEqual(n, 448)
    self.assertEqual(rows["naive"][3:8], ["10", "3", "3.00", "3", str(1 + 5 + 45 + 2 * n)])
    self.assertEqual(rows["semantic"][3], "100")                   # K = max(k=10, c=100)
    self.assertEqual(rows["rq"][4], rows["rq"][6])                 # rq: one fixed length
    self.assertIn(rows["rq"][4], ("3", "4"))
    # The listed docIDs of atomic and naive kinds are the documents' rows.
    listing = table_rows(self.cells, "document ")
    self.assertLen(listing, 6)
    for doc_id, atomic, naive, *_ in listing:
      row = self.corpus.row(doc_id)
      self.assertEqual(atomic, str(row))
      self.assertEqual(naive, f"{row // 100}-{row // 10 % 10}-{row % 10}")
    # The semantic first-level clusters partition the corpus.
    sizes = re.findall(r"^  cluster \d+:\s+(\d+) docs", self.text, re.M)
    self.assertEqual(sum(int(s) for s in sizes), n)

  def test_summary_table_shows_summary_json(self):
    s = self.summary
    self.assertEqual((s["num_docs"], s["steps"], s["docid_kind"]), (len(self.corpus), 200,
                                                                     "atomic"))
    self.assertEqual(s["beam_sizes"], [1, 5, 10])
    self.assertIn(f"seen = {s['num_seen_eval_queries']} of {s['num_seen_queries']} training "
                  f"questions, unseen = {s['num_unseen_queries']} test questions", self.text)
    rows = {r[0]: r[1:] for r in table_rows(self.cells, "system ")}
    systems = [f"dsi{f}_beam{w}" for w in (1, 5, 10) for f in ("", "_free")] + ["bm25"]
    self.assertEqual(sorted(rows), sorted(systems))
    for system in systems:
      expected = [f"{s[f'{split}_{system}_{m}']:.3f}" for split in ("seen", "unseen")
                  for m in ("recall@1", "recall@10", "mrr@10")]
      invalid = s.get(f"unseen_{system}_invalid")
      expected.append("-" if invalid is None else f"{invalid:.3f}")
      self.assertEqual(rows[system], expected, system)
      self.assertEqual(invalid is None, "free" not in system)
    for split in ("seen", "unseen"):      # one beam, one document: recall@10 = recall@1
      self.assertEqual(s[f"{split}_dsi_beam1_recall@10"], s[f"{split}_dsi_beam1_recall@1"])
    # It learned the training questions; BM25 finds the named entity's passage.
    self.assertGreater(s["seen_dsi_beam10_recall@10"], 0.5)
    self.assertGreater(s["unseen_bm25_recall@1"], 0.9)
    latency = {int(r[0]): r[1:] for r in table_rows(self.cells, " beam ")}
    self.assertEqual(sorted(latency), [1, 5, 10])
    for w, (one, batched) in latency.items():
      self.assertEqual(one, f"{s[f'latency_ms_dsi_beam{w}']:.3f}")
      self.assertEqual(batched, f"{s[f'batched_ms_per_query_dsi_beam{w}']:.3f}")

  def decoded(self):
    cell = self.cell_with("constrained search (* = relevant)")
    qid, question, relevant = re.search(r"unseen question (\S+): (.+?)   relevant: (\[.*\])$",
                                        cell, re.M).groups()
    return cell, qid, ast.literal_eval(question), ast.literal_eval(relevant)

  def test_decoded_question_lists_valid_docids_with_their_log_likelihood(self):
    import jax  # noqa: PLC0415
    from jaxsearch.generative.docids import docid_strings  # noqa: PLC0415
    from jaxsearch.generative.workdir import load_docids, load_model  # noqa: PLC0415
    cell, qid, question, relevant = self.decoded()
    self.assertTrue(qid.startswith("test-"))
    lines = DECODED_LINE.findall(cell)
    self.assertEqual([int(line[0]) for line in lines], [1, 2, 3, 4, 5])
    model, params, tokenizer, docids, layout = load_model(self.workdir)
    docids_saved, doc_ids = load_docids(self.workdir)
    strings = docid_strings(docids_saved)
    scores = [float(line[3]) for line in lines]
    self.assertEqual(scores, sorted(scores, reverse=True))
    k1 = layout.num_codes + 1
    apply = jax.jit(model.apply)
    for _, mark, docid, logp, p, doc_id, passage in lines:
      row = doc_ids.index(doc_id)                  # a document of the corpus ...
      self.assertEqual(strings[row], docid)        # ... named by its own docID
      self.assertEqual(mark == "*", doc_id in relevant)
      self.assertAlmostEqual(float(p), math.exp(float(logp)), delta=1e-4)
      self.assertEqual(ast.literal_eval(passage),
                       self.corpus.texts[self.corpus.row(doc_id)][:70])
      # Teacher-forced log p(docID | question) from the full model's logits, by hand.
      prompt = tokenizer.encode(question)[:32] + [layout.sep_id]
      target = [layout.code_offset + int(c) for c in docid.split("-")] + [layout.end_id]
      tokens = np.array([prompt + target], np.int32)
      logits = np.asarray(apply({"params": params}, tokens), np.float64)[0]
      code_logits = logits[:, layout.code_offset:layout.code_offset + k1]
      logz = np.log(np.exp(code_logits - code_logits.max(1, keepdims=True)).sum(1)) + \
          code_logits.max(1)
      by_hand = sum(code_logits[len(prompt) + i - 1, t - layout.code_offset]
                    - logz[len(prompt) + i - 1] for i, t in enumerate(target))
      self.assertAlmostEqual(float(logp), by_hand, delta=2e-4)
    gap = float(re.search(r"max \|diff\| = (\S+)", cell).group(1))
    self.assertLess(gap, 1e-4)
    best = re.search(r"exhaustive best of all (\d+) docIDs: (\S+) \(log p (\S+)\)", cell)
    self.assertEqual(int(best.group(1)), len(self.corpus))
    self.assertGreaterEqual(float(best.group(3)), scores[0] - 1e-4)   # no docID beats it

  def test_search_tool_answers_like_the_beam_search(self):
    cell = self.cell_with("  [1] ")
    blocks = re.split(r"^(?=\S+: )", cell, flags=re.M)
    blocks = [b for b in blocks if HIT_LINE.search(b)]
    self.assertLen(blocks, 2)
    seen_hits, unseen_hits = (HIT_LINE.findall(b) for b in blocks)
    self.assertTrue(blocks[0].startswith("train-"))
    for hits in (seen_hits, unseen_hits):
      self.assertLen(hits, 3)
      self.assertEqual([int(h[0]) for h in hits], [1, 2, 3])
      for _, _, doc_id, _ in hits:
        self.corpus.row(doc_id)                    # raises for an unknown document
    # The client's top 3 for the unseen question are the direct beam search's top 3.
    _, qid, _, _ = self.decoded()
    self.assertTrue(blocks[1].startswith(f"{qid}: "))
    decoded = DECODED_LINE.findall(self.cell_with("constrained search (* = relevant)"))[:3]
    self.assertEqual([h[2] for h in unseen_hits], [d[5] for d in decoded])
    self.assertEqual([h[3] for h in unseen_hits], [d[3] for d in decoded])
    self.assertIn(f'search_tool.GenerativeSearch.workdir = "{self.workdir}"', self.text)

  def test_diffusion_sweep(self):
    self.assertIn("64 passages, K = 10, L = 3 slots", self.text)   # 2 digits + END
    rows = table_rows(self.cells, "split ")
    got = sorted((r[0], int(r[2]), int(r[1])) for r in rows)
    self.assertEqual(got, sorted((split, s, t) for split in ("seen", "unseen") for s in (1, 8)
                                 for t in (1, 2, 3)))
    for split, t, s, r1, r10, valid, ms in rows:
      self.assertTrue(all(0 <= float(v) <= 1 for v in (r1, r10, valid)))
      self.assertGreater(float(ms), 0)
      if s == "1":                          # one decode per query: recall@10 = recall@1
        self.assertEqual(r1, r10)
    seen = {(int(r[1]), int(r[2])): float(r[3]) for r in rows if r[0] == "seen"}
    self.assertGreater(seen[(3, 1)], 0.5)    # the head fit the seen questions


if __name__ == "__main__":
  absltest.main()
