"""Executes notebooks/quickstart.ipynb end to end (tiny run) and checks the committed file."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
from unittest import mock

import nbclient
import nbformat
import pytest
from absl.testing import absltest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "quickstart.ipynb")
# The launcher smoke test's bindings (tests/integration/launcher_test.py), with a warm start
# long enough (150 cheap SFT steps, no warm-up) for the tiny policy to issue real searches.
TINY_BINDINGS = ";".join([
    "SFT_STEPS = 150", "RL_STEPS = 3", "sft/optim.OptimizerConfig.warmup_steps = 1",
    "world.WorldConfig.num_people = 60", "world.WorldConfig.num_distractors = 20",
    "world.WorldConfig.train_size = 100", "world.WorldConfig.validation_size = 10",
    "world.WorldConfig.test_size = 16",
    "experiment.SFTConfig.num_demos = 64", "experiment.SFTConfig.batch_size = 8",
    "steps.GRPOConfig.prompts_per_step = 2", "steps.GRPOConfig.num_generations = 2",
    "experiment.RunConfig.eval_batch_size = 16",
    "search_env.RolloutConfig.max_len = 128",
    "transformer.TransformerConfig.d_model = 32", "transformer.TransformerConfig.num_layers = 1",
    "transformer.TransformerConfig.mlp_dim = 64",
])
# "  search 1: * Title  (doc-id)", as the notebook lists retrieved documents.
RETRIEVED_LINE = re.compile(r"^\s+search (\d+): [* ] (.+?)  \((\S+)\)$", re.M)


def read_notebook() -> nbformat.NotebookNode:
  return nbformat.read(NOTEBOOK, as_version=4)


def execute(workdir: str) -> nbformat.NotebookNode:
  """Runs the notebook in a fresh python3 kernel on CPU, training into `workdir` if needed."""
  nb = read_notebook()
  env = {"JAXSEARCH_WORKDIR": workdir, "JAXSEARCH_GIN_BINDINGS": TINY_BINDINGS,
         # One CPU device: the kernel must not inherit conftest's 8 fake devices.
         "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
  with mock.patch.dict(os.environ, env):  # the kernel (and the launcher) inherit this env
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": REPO_ROOT}}).execute()
  return nb


def cell_texts(nb: nbformat.NotebookNode) -> list[str]:
  """The printed (stream) text of each code cell."""
  return ["".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")
          for c in nb.cells if c.cell_type == "code"]


def png_outputs(nb: nbformat.NotebookNode) -> list[bytes]:
  return [base64.b64decode(o.data["image/png"]) for c in nb.cells if c.cell_type == "code"
          for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]


class CommittedNotebookTest(absltest.TestCase):
  """Cheap checks of the file as committed."""

  def test_is_valid_and_has_no_outputs(self):
    nb = read_notebook()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    self.assertNotEmpty(code)
    for c in code:
      self.assertEqual(c.outputs, [], c.source[:80])
      self.assertIsNone(c.execution_count, c.source[:80])
    self.assertEqual(nb.metadata.kernelspec.name, "python3")

  def test_install_cell_only_runs_in_colab(self):
    first = next(c for c in read_notebook().cells if c.cell_type == "code")
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


if __name__ == "__main__":
  absltest.main()
