"""Bad input names the problem and the fix: gin bindings, gin files, data files, corpus lines,
meshes that do not divide the batch; in the library and through the launcher."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import gin
import jax
import pytest
from absl.testing import absltest, parameterized

from experiments import run as launcher
from jaxsearch.retrieval import corpus as corpus_lib
from jaxsearch.train import sharding
from tests.integration.launcher_test import REPO, TINY
from tests.xla_env import subprocess_env


def bad_corpus() -> str:
  """A Search-R1 corpus whose second line is cut off."""
  path = os.path.join(tempfile.mkdtemp(), "corpus.jsonl")
  with open(path, "w") as f:
    f.write('{"id": "d1", "contents": "\\"Paris\\"\\nThe capital."}\n'
            '{"id": "d2", "contents": \n'
            '{"id": "d3", "contents": "\\"Rome\\"\\nAnother capital."}\n')
  return path


class GinErrorTest(parameterized.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def parse_error(self, bindings, files=("gin/experiments/quickstart.gin",)):
    with self.assertRaises((ValueError, OSError)) as ctx:
      launcher.parse_gin(list(files), list(bindings))
    return str(ctx.exception)

  def test_misspelt_parameter_names_the_right_one(self):
    msg = self.parse_error(["steps.PolicyGradientConfig.num_generatons = 4"])
    self.assertIn("Configurable 'steps.PolicyGradientConfig' doesn't have a parameter named "
                  "'num_generatons'", msg)
    self.assertIn("Fix: did you mean 'num_generations'?", msg)
    self.assertIn("'prompts_per_step', 'num_generations'", msg)   # the valid names, listed

  def test_misspelt_parameter_of_a_scoped_configurable(self):
    msg = self.parse_error(["sft/optim.OptimizerConfig.learning_rat = 1e-3"])
    self.assertIn("did you mean 'learning_rate'?", msg)

  @parameterized.parameters("steps.PolicyGradientConfg", "stepz.PolicyGradientConfig")
  def test_misspelt_configurable_names_the_right_one(self, name):
    msg = self.parse_error([f"{name}.num_generations = 4"])
    self.assertIn(f"No configurable matching '{name}'", msg)
    self.assertRegex(msg, r"Fix: did you mean steps\.PolicyGradientConfig\b")
    self.assertIn("from jaxsearch.train import steps", msg)

  def test_undefined_macro_names_the_defined_one(self):
    msg = self.parse_error(["experiment.RLConfig.steps = %RL_STEPZ"])
    self.assertIn("the macro %RL_STEPZ is used but never defined", msg)
    self.assertIn("did you mean %RL_STEPS?", msg)

  def test_missing_gin_file(self):
    msg = self.parse_error([], files=["gin/experiments/quickstrat.gin"])
    self.assertIn("gin file 'gin/experiments/quickstrat.gin' not found", msg)
    self.assertIn("pass a path like gin/experiments/quickstart.gin", msg)

  def test_missing_include(self):
    path = os.path.join(tempfile.mkdtemp(), "exp.gin")
    with open(path, "w") as f:
      f.write("include 'gin/models/tiniest.gin'\n")
    msg = self.parse_error([], files=[path])
    self.assertIn("gin/models/tiniest.gin", msg)
    self.assertIn("Fix: correct the include's path", msg)

  def test_other_errors_are_left_alone(self):
    self.assertEqual(launcher.explain_gin_error(ValueError("something else")), "")

  @parameterized.parameters(("jaxsearch.train", "loop", "jaxsearch.programs.search_agent import loop"),
                            ("jaxsearch.train", "dsi", "jaxsearch.programs import generative_retrieval"),
                            ("jaxsearch.retrieval", "dense", "jaxsearch.retrieval import mips"))
  def test_a_moved_module_names_its_new_place(self, package, module, new):
    path = os.path.join(tempfile.mkdtemp(), "old.gin")
    with open(path, "w") as f:
      f.write(f"from __gin__ import dynamic_registration\nfrom {package} import {module}\n")
    with self.assertRaises(ImportError) as ctx:
      launcher.parse_gin([path], [])
    self.assertIn(f"Fix: {package}.{module} moved: write `from {new}", str(ctx.exception))
    self.assertEqual(launcher.explain_moved_module(ImportError("No module named 'numpyy'")), "")


class DataErrorTest(absltest.TestCase):

  def test_missing_corpus_file(self):
    with self.assertRaises(FileNotFoundError) as ctx:
      corpus_lib.load_search_r1_corpus("no/such/corpus.jsonl")
    msg = str(ctx.exception)
    self.assertIn("no such file: no/such/corpus.jsonl", msg)
    self.assertIn(f"relative paths start at {os.getcwd()}", msg)
    self.assertIn("correct the path", msg)

  def test_malformed_corpus_line_names_file_line_and_expected_format(self):
    path = bad_corpus()
    with self.assertRaises(corpus_lib.CorpusFormatError) as ctx:
      corpus_lib.load_search_r1_corpus(path)
    msg = str(ctx.exception)
    self.assertTrue(msg.startswith(f"{path}:2: invalid JSON"), msg)
    self.assertIn('such as {"id": "d1", "contents": "\\"Title\\"\\nText."}', msg)
    self.assertIn("fix or delete this line", msg)
    self.assertEqual((ctx.exception.path, ctx.exception.line), (path, 2))

  def test_beir_lines_show_the_beir_format(self):
    path = os.path.join(tempfile.mkdtemp(), "queries.jsonl")
    with open(path, "w") as f:
      f.write('["q1", "text"]\n')
    with self.assertRaisesRegex(corpus_lib.CorpusFormatError,
                                re.escape(f"{path}:1: expected a JSON object, got list; every "
                                          'line must be one JSON object such as {"_id": "q1"')):
      corpus_lib.load_beir_queries(path)


class MeshErrorTest(absltest.TestCase):

  def test_batch_that_the_mesh_cannot_split(self):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2, tensor=1))
    sharding.check_batch(16, mesh, "SFTConfig.batch_size")   # 16 rows over 8 shards: fine
    with self.assertRaises(ValueError) as ctx:
      sharding.check_batch(12, mesh, "SFTConfig.batch_size")
    msg = str(ctx.exception)
    self.assertIn("SFTConfig.batch_size has 12 rows", msg)
    self.assertIn("data x fsdp = 8 shards", msg)
    self.assertIn("make it a multiple of 8", msg)
    self.assertIn("MeshConfig.data / MeshConfig.fsdp", msg)

  def test_mesh_that_does_not_fit_the_devices(self):
    n = len(jax.devices())
    with self.assertRaisesRegex(ValueError, f"has {3 * n} devices but {n} are available: make "
                                "the product equal the count, or use -1"):
      sharding.MeshConfig(data=3 * n, fsdp=1, tensor=1).shape(n)
    with self.assertRaisesRegex(ValueError, "MeshConfig sizes must be positive"):
      sharding.MeshConfig(data=0)


def launch(*args, devices=1):
  env = subprocess_env(devices)
  out = subprocess.run([sys.executable, "-m", "experiments.run",
                        f"--workdir={tempfile.mkdtemp()}", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
  return out.returncode, out.stderr


@pytest.mark.slow
class LauncherErrorTest(absltest.TestCase):
  """The same messages reach a user of the command line (the last lines of stderr)."""

  def test_unknown_binding(self):
    rc, err = launch("--gin_file=gin/experiments/quickstart.gin",
                     "--gin_bindings=steps.PolicyGradientConfig.num_generatons = 4")
    self.assertNotEqual(rc, 0)
    self.assertIn("doesn't have a parameter named 'num_generatons'", err)
    self.assertIn("Fix: did you mean 'num_generations'?", err)

  def test_missing_gin_file(self):
    rc, err = launch("--gin_file=gin/experiments/quickstrat.gin")
    self.assertNotEqual(rc, 0)
    self.assertIn("gin file 'gin/experiments/quickstrat.gin' not found", err)

  def test_missing_and_malformed_data_files(self):
    d = tempfile.mkdtemp()
    paths = [f"dense_retriever.DenseRetrieverConfig.{k} = '{os.path.join(d, k)}.jsonl'"
             for k in ("queries_path", "train_qrels_path", "test_qrels_path")]
    missing = os.path.join(d, "missing.jsonl")
    rc, err = launch("--gin_file=gin/experiments/dense_retriever.gin",
                     f"--gin_bindings=dense_retriever.DenseRetrieverConfig.corpus = '{missing}'",
                     *(f"--gin_bindings={p}" for p in paths))
    self.assertNotEqual(rc, 0)
    self.assertIn(f"no such file: {missing}", err)
    self.assertIn("correct the path", err)
    corpus = bad_corpus()
    rc, err = launch("--gin_file=gin/experiments/dense_retriever.gin",
                     f"--gin_bindings=dense_retriever.DenseRetrieverConfig.corpus = '{corpus}'",
                     *(f"--gin_bindings={p}" for p in paths))
    self.assertNotEqual(rc, 0)
    self.assertIn(f"{corpus}:2: invalid JSON", err)
    self.assertIn("every line must be one JSON object such as", err)

  def test_batch_the_mesh_cannot_split(self):
    rc, err = launch("--gin_file=gin/experiments/quickstart.gin",
                     *(f"--gin_bindings={b}" for b in TINY),
                     "--gin_bindings=experiment.SFTConfig.batch_size = 6", devices=8)
    self.assertNotEqual(rc, 0)
    self.assertIn("SFTConfig.batch_size has 6 rows, which the mesh's data x fsdp = 8 shards "
                  "cannot split evenly: make it a multiple of 8", err)


  def test_a_step_that_will_not_fit_stops_before_any_rollout(self):
    env = subprocess_env(JAXSEARCH_DEVICE_MEMORY_BYTES=str(1 << 20))    # pretend 1 MiB
    out = subprocess.run([sys.executable, "-m", "experiments.run",
                          f"--workdir={tempfile.mkdtemp()}",
                          "--gin_file=gin/experiments/quickstart.gin",
                          *(f"--gin_bindings={b}" for b in TINY), "--gin_bindings=SFT_STEPS = 0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    self.assertNotEqual(out.returncode, 0)
    self.assertIn("StepDoesNotFit: the rl step needs", out.stderr)
    self.assertIn("but a device has 1.0 MiB; no rl step has run. Lower its memory with one of: "
                  "steps.PolicyGradientConfig.micro_batch_size (now 0)", out.stderr)
    self.assertIn("search_env.RolloutConfig.max_len (now 128)", out.stderr)
    self.assertNotIn("[rollout]", out.stdout)
    self.assertNotIn("[rl ", out.stdout)


if __name__ == "__main__":
  absltest.main()
