"""The benchmarks in smoke mode: their JSON, and the parity each one reports.

`benchmarks/rollout.py`: greedy parity of the two rollouts; `benchmarks/sampler.py`: jaxsearch's
sampler and transformers' `generate` produce the same greedy tokens from the same weights;
`benchmarks/encoder.py`: the same MiniLM embeddings from both.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "rollout.py")
SPEED_KEYS = ("first_call_s", "compile_s", "steady_s", "steady_all_s", "episodes_per_s",
              "tokens_per_s", "generated_tokens_per_s", "sequential_decode_steps")
TOP_KEYS = ("device", "jax_version", "batch_size", "repeats", "mean_episode_length",
            "mean_searches_per_episode", "in_graph", "host_loop", "identical_fraction",
            "identical_fraction_same_retriever", "max_logp_diff_same_retriever",
            "retrieval_agreement", "config")


def _load_module():
  spec = importlib.util.spec_from_file_location("rollout_benchmark", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class RolloutBenchmarkTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmpdir = tempfile.mkdtemp()
    cls.json_path = os.path.join(cls.tmpdir, "rollout_smoke.json")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
    cls.proc = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--json", cls.json_path], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmpdir, ignore_errors=True)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.assertEqual(self.proc.returncode, 0, self.proc.stderr[-4000:])
    self.result = json.loads(self.proc.stdout)

  def test_stdout_and_file_hold_the_same_json_with_every_field(self):
    with open(self.json_path) as f:
      self.assertEqual(json.load(f), self.result)
    r = self.result
    for key in TOP_KEYS:
      self.assertIn(key, r)
    self.assertTrue(r["smoke"])
    self.assertEqual(r["batch_size"], 16)
    self.assertEqual(r["repeats"], 1)
    for impl in ("in_graph", "host_loop"):
      for key in SPEED_KEYS:
        self.assertIn(key, r[impl], impl)
      speed = r[impl]
      self.assertLen(speed["steady_all_s"], 1)
      self.assertGreater(speed["steady_s"], 0.0)
      self.assertGreaterEqual(speed["compile_s"], 0.0)
      np.testing.assert_allclose(speed["episodes_per_s"], 16 / speed["steady_s"], rtol=1e-6)
      np.testing.assert_allclose(speed["tokens_per_s"],
                                 16 * speed["mean_episode_length"] / speed["steady_s"], rtol=1e-6)
    np.testing.assert_allclose(r["host_loop_over_in_graph_time"],
                               r["host_loop"]["steady_s"] / r["in_graph"]["steady_s"], rtol=1e-6)
    self.assertBetween(r["identical_fraction"], 0.0, 1.0)
    self.assertBetween(r["retrieval_agreement"], 0.0, 1.0)

  def test_episodes_search_so_parity_covers_retrieval(self):
    r = self.result
    self.assertGreater(r["mean_searches_per_episode"], 0.0)
    self.assertGreater(r["num_host_searches"], 0)
    self.assertGreater(r["host_loop"]["generate_calls_per_batch"], 1)
    self.assertGreater(r["in_graph"]["mean_env_tokens_per_episode"], 0.0)

  def test_greedy_episodes_are_identical_with_the_same_retriever(self):
    r = self.result
    self.assertEqual(r["identical_fraction_same_retriever"], 1.0)
    self.assertLess(r["max_logp_diff_same_retriever"], 1e-4)


class IdenticalRowsTest(absltest.TestCase):

  def test_a_changed_token_or_counter_makes_that_row_differ(self):
    module = _load_module()
    rng = np.random.default_rng(0)
    n, t, s, k = 4, 6, 2, 2
    a = module.Rollout(
        tokens=rng.integers(0, 9, (n, t)).astype(np.int32),
        policy_mask=rng.random((n, t)) < 0.5, env_mask=rng.random((n, t)) < 0.5,
        turn_ids=rng.integers(0, 3, (n, t)).astype(np.int32), logp=rng.random((n, t)),
        lengths=np.full((n,), t, np.int32), num_searches=np.ones((n,), np.int32),
        invalid_searches=np.zeros((n,), np.int32),
        retrieved=rng.integers(0, 5, (n, s, k)).astype(np.int32),
        status=np.ones((n,), np.int32))
    b = a._replace(tokens=a.tokens.copy(), retrieved=a.retrieved.copy(),
                   logp=a.logp + 0.5)       # log-probs are not part of the comparison
    b.tokens[1, 3] += 1
    b.retrieved[2, 1, 0] += 1
    np.testing.assert_array_equal(module.identical_rows(a, b), [True, False, False, True])
    np.testing.assert_array_equal(module.identical_rows(a, a._replace(status=a.status * 2)),
                                  [False] * n)


class SamplerBenchmarkTest(absltest.TestCase):

  def test_smoke_rows_and_greedy_parity_with_transformers(self):
    tmpdir = tempfile.mkdtemp()
    out = os.path.join(tmpdir, "sampler.json")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "sampler.py"), "--smoke", "--json", out],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    rows = json.loads(proc.stdout)
    with open(out) as f:
      self.assertEqual(json.load(f), rows)
    self.assertEqual([(r["impl"], r["batch"]) for r in rows],
                     [("jaxsearch", 1), ("transformers", 1), ("jaxsearch", 4),
                      ("transformers", 4)])
    for r in rows:
      self.assertEqual(r["new_tokens"], 16)
      self.assertTrue(r["greedy_match"], r)
      self.assertEqual(r["rows_identical_fraction"], 1.0)
      np.testing.assert_allclose(r["tokens_per_s"], r["batch"] * 16 / r["seconds"], rtol=1e-6)
    shutil.rmtree(tmpdir, ignore_errors=True)


class EncoderBenchmarkTest(absltest.TestCase):

  def test_smoke_rows_and_embedding_parity_with_transformers(self):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "encoder.py"), "--smoke"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    rows = json.loads(proc.stdout)
    self.assertEqual([r["impl"] for r in rows], ["jaxsearch", "transformers"])
    for r in rows:
      self.assertEqual(r["passages"], 16)
      self.assertLess(r["max_abs_diff"], 1e-5)
      np.testing.assert_allclose(r["passages_per_s"], 16 / r["seconds"], rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
