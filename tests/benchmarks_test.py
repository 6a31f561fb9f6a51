"""The benchmarks in smoke mode: their JSON, and the parity each one reports.

`benchmarks/rollout.py`: greedy parity of the two rollouts; `benchmarks/sampler.py`: jaxsearch's
sampler and transformers' `generate` produce the same greedy tokens from the same weights;
`benchmarks/encoder.py`: the same MiniLM embeddings from both; `benchmarks/ann.py`: its rows,
sweeps and the summary rule comparing ScaNN with exact search and faiss at equal recall;
`benchmarks/train_step.py`: FLOPs and MFU arithmetic; `benchmarks/memory_table.py`: per-device
bytes of the sharded GRPO step against a hand count of parameters, moments and reference;
`benchmarks/rollout_engines.py`: the chunked and token engines and a Search-R1 transformers loop
write the same scripted episodes, the chunked engine in fewer sequential model calls;
`benchmarks/bm25_search.py`: the sparse in-graph BM25, bm25s and the dense index return the same
top-3 scores on the same SmolLM2 token ids.
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
from tests.xla_env import subprocess_env

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
    env = subprocess_env()
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
    env = subprocess_env()
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
    env = subprocess_env()
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


ANN_SCRIPT = os.path.join(REPO, "benchmarks", "ann.py")
ANN_KEYS = ("backend", "n_docs", "recall@10", "qps", "build_s", "params", "data")


def _load_ann():
  spec = importlib.util.spec_from_file_location("ann_benchmark", ANN_SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _have_faiss() -> bool:
  return importlib.util.find_spec("faiss") is not None


class AnnBenchmarkSmokeTest(absltest.TestCase):
  """`benchmarks/ann.py --smoke` on a synthetic set and on embeddings read from an npz."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmpdir = tempfile.mkdtemp()
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((20, 24))
    def unit(m):
      x = centres[rng.integers(0, 20, m)] + 0.5 * rng.standard_normal((m, 24))
      return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    cls.npz = os.path.join(cls.tmpdir, "emb.npz")
    np.savez(cls.npz, docs=unit(2500), queries=unit(40))
    cls.json_path = os.path.join(cls.tmpdir, "ann.json")
    env = subprocess_env()
    cls.proc = subprocess.run(
        [sys.executable, ANN_SCRIPT, "--smoke", "--hnsw", "--data", "clustered", "embeddings",
         "--embeddings", cls.npz, "--embeddings_name", "test_npz", "--json", cls.json_path],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmpdir, ignore_errors=True)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.assertEqual(self.proc.returncode, 0, self.proc.stderr[-4000:])
    self.rows = json.loads(self.proc.stdout)

  def _rows(self, data, backend):
    return [r for r in self.rows if r["data"] == data and r["backend"] == backend]

  def test_rows_have_the_acceptance_keys_and_valid_recall(self):
    with open(self.json_path) as f:
      self.assertEqual(json.load(f), self.rows)
    self.assertEqual({r["data"] for r in self.rows}, {"clustered", "test_npz"})
    backends = {"exact_jax", "scann", "summary"}
    if _have_faiss():
      backends |= {"faiss_flat", "faiss_ivf", "faiss_hnsw"}
    for data, n, q in (("clustered", 3000, 50), ("test_npz", 2500, 40)):
      mine = [r for r in self.rows if r["data"] == data]
      self.assertEqual({r["backend"] for r in mine}, backends)
      for r in mine:
        for key in ANN_KEYS:
          self.assertIn(key, r)
        self.assertEqual(r["n_docs"], n)
        self.assertEqual(r["num_queries"], q)
        self.assertBetween(r["recall@10"], 0.0, 1.0)
        self.assertGreater(r["qps"], 0.0)
        self.assertGreaterEqual(r["build_s"], 0.0)
      self.assertEqual([r["recall@10"] for r in self._rows(data, "exact_jax")], [1.0])
      if _have_faiss():
        self.assertEqual([r["recall@10"] for r in self._rows(data, "faiss_flat")], [1.0])

  def test_one_row_per_swept_setting(self):
    for data in ("clustered", "test_npz"):
      scann = self._rows(data, "scann")
      settings = [(r["params"]["leaves_to_search"], r["params"]["reorder"]) for r in scann]
      self.assertLen(set(settings), len(settings))
      # --smoke sweeps leaves {2, 8, 55} (55 = all leaves at n=3000; clipped to 50 at 2500)
      # x reorder {20, 100}.
      leaves = scann[0]["params"]["num_leaves"]
      self.assertEqual(sorted(set(settings)),
                       sorted((lv, o) for lv in (2, 8, min(55, leaves)) for o in (20, 100)))
      if not _have_faiss():
        continue
      ivf = self._rows(data, "faiss_ivf")
      nlist = ivf[0]["params"]["nlist"]
      self.assertEqual([r["params"]["nprobe"] for r in ivf], [1, 4, 16, min(55, nlist)])
      # IVF-Flat ranks the probed lists exactly: more probes can only add true neighbours,
      # and probing every list is exact search.
      recalls = [r["recall@10"] for r in ivf]
      self.assertEqual(recalls, sorted(recalls))
      if nlist <= 55:
        self.assertEqual(recalls[-1], 1.0)
      self.assertEqual([r["params"]["efSearch"] for r in self._rows(data, "faiss_hnsw")],
                       [16, 64])

  def test_summary_follows_the_rule_and_its_ratios_match_the_rows_it_names(self):
    for data in ("clustered", "test_npz"):
      [summary] = self._rows(data, "summary")
      scann = self._rows(data, "scann")
      reaching = [r for r in scann if r["recall@10"] >= 0.95]
      self.assertNotEmpty(reaching)          # all leaves + reorder 100 reach it on 3k docs
      best_qps = max(r["qps"] for r in reaching)
      chosen = [r for r in reaching if r["params"] == summary["scann"]["params"]]
      self.assertLen(chosen, 1)
      chosen = chosen[0]
      self.assertEqual(chosen["qps"], best_qps)
      self.assertTrue(summary["recall_target_met"])
      self.assertEqual(summary["recall@10"], chosen["recall@10"])
      self.assertEqual(summary["qps"], chosen["qps"])
      self.assertEqual(summary["build_s"], chosen["build_s"])
      [exact] = self._rows(data, "exact_jax")
      self.assertEqual(summary["exact"]["qps"], exact["qps"])
      np.testing.assert_allclose(summary["scann_over_exact_qps"], chosen["qps"] / exact["qps"],
                                 rtol=1e-3, atol=1e-3)
      self.assertEqual(summary["targets"]["qps_vs_exact_5x"],
                       summary["scann_over_exact_qps"] >= 5.0)
      if not _have_faiss():
        continue
      self.assertEqual(set(summary["faiss"]), {"faiss_ivf", "faiss_hnsw"})
      for name, entry in summary["faiss"].items():
        mine = self._rows(data, name)
        matching = [r for r in mine if r["recall@10"] >= chosen["recall@10"]]
        if not matching:
          self.assertIsNone(entry["params"])
          self.assertIsNone(entry["scann_over_faiss_qps"])
          continue
        [pick] = [r for r in mine if r["params"] == entry["params"]]
        self.assertGreaterEqual(pick["recall@10"], chosen["recall@10"])
        self.assertEqual(pick["qps"], max(r["qps"] for r in matching))
        self.assertEqual(entry["qps"], pick["qps"])
        np.testing.assert_allclose(entry["scann_over_faiss_qps"], chosen["qps"] / pick["qps"],
                                   rtol=1e-3, atol=1e-3)


class AnnBenchmarkPartsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.ann = _load_ann()

  def test_chunked_exact_top_k_matches_a_full_float64_sort(self):
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((53, 8)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    docs[40] = docs[3]                                 # an exact tie: lower id ranks first
    queries = rng.standard_normal((11, 8)).astype(np.float32)
    queries[0] = docs[3]
    scores = queries.astype(np.float64) @ docs.T.astype(np.float64)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    got = self.ann.exact_top_k(queries, docs, 5, doc_chunk=7, query_chunk=3)
    np.testing.assert_array_equal(got, expected)
    self.assertEqual(list(got[0, :2]), [3, 40])
    np.testing.assert_array_equal(self.ann.exact_top_k(queries, docs[:3], 10),
                                  np.argsort(-scores[:, :3], axis=1, kind="stable"))

  def test_make_data_is_float32_unit_norm_across_chunks(self):
    old = self.ann._CHUNK
    self.ann._CHUNK = 64                               # several chunks and a ragged tail
    try:
      for kind in ("clustered", "isotropic"):
        docs, queries = self.ann.make_data(kind, 300, 7, 16, seed=3)
        self.assertEqual((docs.shape, queries.shape), ((300, 16), (7, 16)))
        self.assertEqual((docs.dtype, queries.dtype), (np.float32, np.float32))
        np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)
        again, _ = self.ann.make_data(kind, 300, 7, 16, seed=3)
        np.testing.assert_array_equal(docs, again)
        self.assertFalse(np.allclose(docs[:64], docs[64:128]))
    finally:
      self.ann._CHUNK = old
    # Clustered vectors sit near one of 100 centres: far more similar to their nearest
    # neighbour than isotropic ones.
    c, _ = self.ann.make_data("clustered", 2000, 1, 64, seed=0)
    i, _ = self.ann.make_data("isotropic", 2000, 1, 64, seed=0)
    nn = lambda x: np.sort(x[:200] @ x.T, axis=1)[:, -2].mean()
    self.assertGreater(nn(c), nn(i) + 0.2)

  def test_load_embeddings_checks_the_file(self):
    tmpdir = tempfile.mkdtemp()
    try:
      unit = np.eye(4, dtype=np.float32)
      good = os.path.join(tmpdir, "good.npz")
      np.savez(good, docs=unit, queries=unit[:3])
      docs, queries = self.ann.load_embeddings(good, num_queries=2)
      np.testing.assert_array_equal(docs, unit)
      np.testing.assert_array_equal(queries, unit[:2])
      for name, arrays, message in (
          ("missing", dict(docs=unit), "queries"),
          ("dims", dict(docs=unit, queries=np.eye(3, dtype=np.float32)), "must be"),
          ("norm", dict(docs=2 * unit, queries=unit), "unit-norm")):
        path = os.path.join(tmpdir, f"{name}.npz")
        np.savez(path, **arrays)
        with self.assertRaisesRegex(ValueError, message):
          self.ann.load_embeddings(path)
    finally:
      shutil.rmtree(tmpdir, ignore_errors=True)

  def _row(self, backend, recall, qps, **params):
    return {"backend": backend, "data": "d", "n_docs": 100, "dim": 4, "recall@10": recall,
            "qps": qps, "build_s": 1.0, "params": params}

  def test_summary_rule_on_hand_made_rows(self):
    rows = [self._row("exact_jax", 1.0, 100.0),
            self._row("scann", 0.90, 2000.0, leaves=1),
            self._row("scann", 0.96, 1000.0, leaves=2),     # chosen: fastest >= 0.95
            self._row("scann", 0.99, 500.0, leaves=4),
            self._row("faiss_ivf", 0.95, 900.0, nprobe=2),  # below 0.96: not comparable
            self._row("faiss_ivf", 0.96, 400.0, nprobe=4),  # picked: fastest >= 0.96
            self._row("faiss_ivf", 0.99, 250.0, nprobe=8),
            self._row("faiss_hnsw", 0.93, 3000.0, ef=16)]   # never reaches 0.96
    s = self.ann.summarize(rows)
    self.assertEqual(s["scann"]["params"], {"leaves": 2})
    self.assertEqual((s["recall@10"], s["qps"], s["backend"]), (0.96, 1000.0, "summary"))
    self.assertEqual(s["scann_over_exact_qps"], 10.0)
    self.assertEqual(s["faiss"]["faiss_ivf"]["params"], {"nprobe": 4})
    self.assertEqual(s["faiss"]["faiss_ivf"]["scann_over_faiss_qps"], 2.5)
    self.assertIsNone(s["faiss"]["faiss_hnsw"]["params"])
    self.assertEqual(s["faiss"]["faiss_hnsw"]["best_recall@10"], 0.93)
    self.assertEqual(s["targets"], {"recall": True, "qps_vs_exact_5x": True,
                                    "qps_vs_faiss_ivf_2x": True, "qps_vs_faiss_hnsw_2x": None})
    # No ScaNN setting reaches the target: the highest-recall one is reported, flagged.
    s = self.ann.summarize(rows, recall_target=0.995)
    self.assertEqual(s["scann"]["params"], {"leaves": 4})
    self.assertFalse(s["recall_target_met"])
    self.assertEqual(s["faiss"]["faiss_ivf"]["params"], {"nprobe": 8})
    self.assertEqual(s["faiss"]["faiss_ivf"]["scann_over_faiss_qps"], 2.0)
    self.assertIsNone(self.ann.summarize(rows[:1]))


class TrainStepBenchmarkTest(absltest.TestCase):
  """`benchmarks/train_step.py --smoke`: its rows, and arithmetic a reader can redo."""

  def test_smoke_rows_flops_and_mfu(self):
    tmpdir = tempfile.mkdtemp()
    out = os.path.join(tmpdir, "train_step.json")
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"), "--smoke", "--json",
         out], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    rows = json.loads(proc.stdout)
    with open(out) as f:
      self.assertEqual(json.load(f), rows)
    self.assertEqual([(r["model"], r["step"]) for r in rows], [("smoke", "grpo"), ("smoke", "sft")])
    # The smoke model: vocab 128, d 32, 1 layer, 2 heads / 1 KV head (hd 16), MLP 64, T 32.
    d, v, h, hkv, hd, f, t = 32, 128, 2, 1, 16, 64, 32
    matmul_weights = d * h * hd + 2 * d * hkv * hd + h * hd * d + 3 * d * f + d * v
    params = matmul_weights + 2 * d + d       # + 2 RMSNorm scales per layer + the final one
    for r in rows:
      for key in ("model", "params", "batch", "seq_len", "dtype", "tokens_per_s", "mfu",
                  "device", "flops_per_token", "xla_flops_per_token"):
        self.assertIn(key, r)
      self.assertEqual((r["batch"], r["seq_len"], r["dtype"], r["device"]), (8, 32, "float32",
                                                                             "cpu"))
      self.assertEqual(r["params"], params)
      self.assertEqual(r["flops_per_token"], 6 * matmul_weights + 12 * 1 * h * hd * t)
      # XLA's count of the compiled step includes the model's matmuls plus elementwise work,
      # the loss and AdamW: a little above the model FLOPs, never below.
      self.assertBetween(r["xla_flops_per_token"] / r["flops_per_token"], 0.95, 1.6)
      np.testing.assert_allclose(r["tokens_per_s"], 8 * 32 / r["seconds"], rtol=1e-6)
      np.testing.assert_allclose(r["mfu"], r["flops_per_token"] * r["tokens_per_s"]
                                 / r["peak_flops"], rtol=1e-6)
      self.assertGreater(r["peak_flops"], 1e8)
      self.assertLess(r["mfu"], 1.0)
    shutil.rmtree(tmpdir, ignore_errors=True)


class MemoryTableBenchmarkTest(absltest.TestCase):
  """`benchmarks/memory_table.py --smoke`: AOT per-device bytes of the sharded GRPO step."""

  def test_smoke_rows_parameter_counts_and_lora_holds_less(self):
    tmpdir = tempfile.mkdtemp()
    out = os.path.join(tmpdir, "memory.json")
    env = subprocess_env()
    script = os.path.join(REPO, "benchmarks", "memory_table.py")
    proc = subprocess.run(
        [sys.executable, script, "--smoke", "--steps", "grpo", "--json", out], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    rows = json.loads(proc.stdout)
    with open(out) as f:
      self.assertEqual(json.load(f), rows)
    self.assertEqual([(r["mode"], r["step"], r["mesh"]) for r in rows],
                     [("full", "grpo", "gpu8"), ("lora", "grpo", "gpu8")])
    # The smoke model: d 128, MLP 512, 2 layers, 4 heads / 2 KV heads (hd 32), vocab 512,
    # tied embeddings, q/k/v biases; LoRA rank 16 on q, k, v, o, gate, up, down.
    d, f, layers, hd, kv, v, r16 = 128, 512, 2, 32, 2, 512, 16
    per_layer = (d * d + d) + 2 * (d * kv * hd + kv * hd) + d * d + 3 * d * f + 2 * d
    self.assertEqual(rows[0]["params"], v * d + layers * per_layer + d)
    adapters = r16 * ((d + d) + 2 * (d + kv * hd) + (d + d) + 2 * (d + f) + (f + d))
    self.assertEqual(rows[1]["trainable_params"], layers * adapters)
    self.assertEqual(rows[0]["trainable_params"], rows[0]["params"])
    full, lora = rows
    for r in rows:
      self.assertIsNone(r["error"])
      self.assertEqual((r["devices"], r["batch"], r["micro_batch_size"], r["seq_len"],
                        r["logits_chunk"]), (8, 16, 8, 64, 512))
      self.assertEqual(r["mesh_shape"]["fsdp"], 8)
      self.assertGreaterEqual(r["total_gib"] + 1e-12,
                              r["argument_gib"] + r["output_gib"] - r["alias_gib"]
                              + r["temp_gib"])
    # Full fine-tuning holds, sharded over the 8 devices: bf16 weights (2 bytes each), fp32
    # AdamW moments (8) and the bf16 KL reference copy (2); beyond that only the batch shard
    # and a few replicated scalars and vectors.
    by_hand = 12 * full["params"] / 8 / 2 ** 30
    self.assertBetween(full["argument_gib"] / by_hand, 1.0, 1.1)
    self.assertLess(lora["trainable_params"], full["params"] / 4)
    rendered = subprocess.run([sys.executable, script, "--from_json", out, "--markdown"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
    self.assertEqual(rendered.returncode, 0, rendered.stderr[-2000:])
    self.assertEqual(rendered.stdout.count("\n| smoke |"), 2)
    shutil.rmtree(tmpdir, ignore_errors=True)


class RolloutEnginesBenchmarkTest(absltest.TestCase):
  """`benchmarks/rollout_engines.py --smoke`: rows for the chunked engine (a), the token engine
  (b), the Search-R1 transformers loop (c) and Tunix (d, skipped with a reason when it cannot be
  installed), the same episodes from all, and arithmetic a reader can redo."""

  def test_smoke_rows_identical_episodes_and_fewer_model_calls(self):
    tmpdir = tempfile.mkdtemp()
    out = os.path.join(tmpdir, "rollout_engines.json")
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "rollout_engines.py"), "--smoke",
         "--json", out], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    result = json.loads(proc.stdout)
    with open(out) as f:
      self.assertEqual(json.load(f), result)
    for key in ("device", "jax_version", "batch", "token_mix", "mean_episode_length",
                "env_token_fraction", "ratios", "rows"):
      self.assertIn(key, result)
    self.assertEqual((result["batch"], result["repeats"], result["model"]), (4, 1, "tiny"))
    # The episodes are exactly the scripted ones (prompt, actions, passages in place).
    self.assertEqual(result["script_followed_fraction"], 1.0)
    self.assertBetween(result["env_token_fraction"], 0.0, 1.0)
    rows = {r["impl"]: r for r in result["rows"]}
    self.assertEqual(list(rows), ["chunked", "token", "transformers_search_r1", "tunix"])
    tunix = rows.pop("tunix")
    if "skipped" in tunix:
      self.assertIsInstance(tunix["skipped"], str)
      self.assertNotEmpty(tunix["skipped"])
    a, b, c = rows["chunked"], rows["token"], rows["transformers_search_r1"]
    self.assertEqual(a["identical_to_chunked_fraction"], 1.0)
    self.assertEqual(b["identical_to_chunked_fraction"], 1.0)
    # The same weights and scripted actions through transformers give the same policy ids and
    # the same episode text (its ids are re-tokenized each turn, so text is what is compared).
    self.assertEqual(c["identical_to_chunked_fraction"], 1.0)
    self.assertIn("text", c["identical_compares"])
    self.assertLess(a["model_calls"], b["model_calls"])
    self.assertGreater(a["chunk_calls"], 0)
    self.assertEqual(b["chunk_calls"], 0)
    self.assertEqual(a["tokens"], b["tokens"])
    self.assertEqual(a["policy_tokens"], b["policy_tokens"])
    self.assertEqual(c["policy_tokens"], a["policy_tokens"])
    np.testing.assert_allclose(a["tokens"], 4 * result["mean_episode_length"], rtol=1e-9)
    for r in rows.values():
      self.assertLen(r["steady_all_s"], 1)
      self.assertGreater(r["steady_s"], 0.0)
      self.assertGreater(r["model_calls"], 0)
      self.assertGreaterEqual(r["compile_s"], 0.0)
      np.testing.assert_allclose(r["tokens_per_s"], r["tokens"] / r["steady_s"], rtol=1e-6)
      np.testing.assert_allclose(r["policy_tokens_per_s"], r["policy_tokens"] / r["steady_s"],
                                 rtol=1e-6)
      np.testing.assert_allclose(r["episodes_per_s"], 4 / r["steady_s"], rtol=1e-6)
    np.testing.assert_allclose(result["ratios"]["chunked_over_token_tokens_per_s"],
                               a["tokens_per_s"] / b["tokens_per_s"], rtol=1e-6)
    np.testing.assert_allclose(result["ratios"]["chunked_over_transformers_tokens_per_s"],
                               a["tokens_per_s"] / c["tokens_per_s"], rtol=1e-6)
    shutil.rmtree(tmpdir, ignore_errors=True)


class BM25SearchBenchmarkTest(absltest.TestCase):
  """`benchmarks/bm25_search.py --smoke`: a row per (size, system, block), the sparse search and
  the dense index agreeing with bm25s, and ratios a reader can redo from the rows."""

  def test_smoke_rows_agreement_with_bm25s_and_ratios(self):
    tmpdir = tempfile.mkdtemp()
    out = os.path.join(tmpdir, "bm25_search.json")
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "bm25_search.py"), "--smoke",
         "--json", out], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    result = json.loads(proc.stdout)
    with open(out) as f:
      self.assertEqual(json.load(f), result)
    for key in ("device", "jax_version", "bm25s_version", "vocab_size", "ignore_ids", "k",
                "rows", "ratios"):
      self.assertIn(key, result)
    self.assertTrue(result["smoke"])
    self.assertEqual((result["sizes"], result["num_queries"], result["repeats"],
                      result["blocks"], result["k"]), ([200, 1000], 32, 1, [1024], 3))
    self.assertEqual(result["vocab_size"], 49152)
    rows = result["rows"]
    self.assertEqual([(r["num_docs"], r["system"], r["block"]) for r in rows],
                     [(m, s, b) for m in (200, 1000) for s, b in (
                         ("jaxsearch_sparse", 1024), ("bm25s", None), ("jaxsearch_dense", None))])
    for r in rows:
      self.assertEqual(r["num_queries"], 32)
      self.assertGreater(r["mean_doc_tokens"], 0.0)
      self.assertGreater(r["mean_query_tokens"], 0.0)
      self.assertGreater(r["index_bytes"], 0)      # the dense index fits at these sizes
      self.assertGreater(r["index_build_s"], 0.0)
      self.assertGreater(r["qps"], 0.0)
      self.assertLen(r["search_all_s"], 1)
      np.testing.assert_allclose(r["qps"], 32 / r["search_s"], rtol=1e-6)
      if r["system"] != "bm25s":
        self.assertGreaterEqual(r["compile_s"], 0.0)
        self.assertGreaterEqual(r["top3_set_equal_fraction"], 0.9, r)
        self.assertTrue(r["scores_agree"], r)
        self.assertLessEqual(r["max_rel_score_diff"], 1e-4)
    for m in (200, 1000):
      sparse, ref, dense = [r for r in rows if r["num_docs"] == m]
      # One (term, document) pair per posting or dense-row entry, as bm25s's non-zeros: 8
      # bytes per posting, 4 M per dense row, + 12 V + 4 M.
      self.assertGreater(sparse["dense_rows"], 0)     # the subword stop-words
      self.assertEqual(sparse["nnz"] + sparse["dense_postings"], ref["nnz"])
      self.assertEqual(sparse["index_bytes"],
                       8 * (sparse["nnz"] + 1) + 4 * (result["vocab_size"] + 1)
                       + 8 * result["vocab_size"] + 4 * m + 4 * sparse["dense_rows"] * m)
      self.assertEqual(dense["index_bytes"], 4 * result["vocab_size"] * m)
      self.assertBetween(sparse["live_posting_fraction"], 0.0, 1.0)
      self.assertGreater(sparse["loop_steps_per_batch"], 0.0)
    self.assertEqual([x["num_docs"] for x in result["ratios"]], [200, 1000])
    for x in result["ratios"]:
      sparse, ref, dense = [r for r in rows if r["num_docs"] == x["num_docs"]]
      self.assertEqual(x["sparse_best_block"], 1024)
      np.testing.assert_allclose(x["sparse_over_bm25s_qps"], sparse["qps"] / ref["qps"],
                                 rtol=1e-6)
      np.testing.assert_allclose(x["sparse_over_bm25s_bytes"],
                                 sparse["index_bytes"] / ref["index_bytes"], rtol=1e-6)
      np.testing.assert_allclose(x["dense_over_bm25s_qps"], dense["qps"] / ref["qps"],
                                 rtol=1e-6)
    shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
  absltest.main()


class DecodeRooflineBenchmarkTest(absltest.TestCase):
  """`benchmarks/decode_roofline.py --smoke`: decode throughput against the bandwidth bound."""

  def test_smoke_bytes_by_hand_and_roofline_arithmetic(self):
    tmpdir = tempfile.mkdtemp()
    out = os.path.join(tmpdir, "roofline.json")
    script = os.path.join(REPO, "benchmarks", "decode_roofline.py")
    proc = subprocess.run([sys.executable, script, "--smoke", "--hbm_gbps", "100", "--json", out],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
    r = json.loads(proc.stdout)
    with open(out) as f:
      self.assertEqual(json.load(f), r)
    # The smoke model: vocab 256, d 64, 2 layers, 4 heads / 2 KV heads (hd 16), MLP 128,
    # tied embeddings (the default), fp32; batch 4, prompt 16, timed steps between 4 and 12
    # new tokens.
    v, d, layers, kv, hd, f = 256, 64, 2, 2, 16, 128
    per_layer = d * d + 2 * d * kv * hd + d * d + 3 * d * f + 2 * d
    self.assertEqual(r["params"], v * d + layers * per_layer + d)
    self.assertEqual(r["param_bytes"], 4 * r["params"])
    self.assertEqual(r["kv_bytes_per_step"], 2 * layers * 4 * kv * hd * 4 * (16 + (4 + 12) / 2))
    self.assertEqual(r["bytes_per_step_allocated"] - r["param_bytes"],
                     2 * layers * 4 * kv * hd * 4 * (16 + 12))
    self.assertAlmostEqual(r["s_per_step"], (r["seconds"]["12"] - r["seconds"]["4"]) / 8)
    self.assertAlmostEqual(r["roofline_tokens_per_s"], 4 * 100e9 / r["bytes_per_step"])
    if r["s_per_step"] > 0:
      self.assertAlmostEqual(r["decode_tokens_per_s"], 4 / r["s_per_step"])
      self.assertAlmostEqual(r["roofline_fraction"],
                             r["decode_tokens_per_s"] / r["roofline_tokens_per_s"])
    else:   # a loaded machine can time the longer decode as fast as the shorter one
      self.assertIsNone(r["decode_tokens_per_s"])
      self.assertIsNone(r["roofline_fraction"])
    self.assertEqual(r["device"], "cpu: cpu")
    shutil.rmtree(tmpdir, ignore_errors=True)

  def test_bandwidth_by_device_kind(self):
    spec = importlib.util.spec_from_file_location(
        "decode_roofline", os.path.join(REPO, "benchmarks", "decode_roofline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    self.assertEqual(module.device_bandwidth("NVIDIA H200"), 4800.0)
    self.assertEqual(module.device_bandwidth("NVIDIA H100 80GB HBM3"), 3350.0)
    self.assertEqual(module.device_bandwidth("NVIDIA H100 PCIe"), 2000.0)
    self.assertEqual(module.device_bandwidth("TPU v5 lite"), 819.0)
    self.assertIsNone(module.device_bandwidth("cpu"))
