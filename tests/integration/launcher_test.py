"""A 3-step smoke run of the quickstart config through the launcher, and its resume."""
import glob
import json
import os
import re
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from absl.testing import absltest

from jaxsearch import metrics as metrics_lib
from tests.xla_env import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "SFT_STEPS = 3", "RL_STEPS = 3",
    "world.WorldConfig.num_people = 60", "world.WorldConfig.num_distractors = 20",
    "world.WorldConfig.train_size = 100", "world.WorldConfig.validation_size = 10",
    "world.WorldConfig.test_size = 16",
    "experiment.SFTConfig.num_demos = 64", "experiment.SFTConfig.batch_size = 8",
    "steps.PolicyGradientConfig.prompts_per_step = 2", "steps.PolicyGradientConfig.num_generations = 2",
    "experiment.RunConfig.eval_batch_size = 16", "experiment.RunConfig.checkpoint_every = 2",
    "search_env.RolloutConfig.max_len = 128",
    "transformer.TransformerConfig.d_model = 32", "transformer.TransformerConfig.num_layers = 1",
    "transformer.TransformerConfig.mlp_dim = 64",
]


# The smallest launcher run: 2 dense-retriever steps on a small world, one checkpoint.
TINY_DENSE = [
    "DENSE_STEPS = 2", "world.WorldConfig.num_people = 60",
    "world.WorldConfig.num_distractors = 20",
    "world.WorldConfig.train_size = 120", "world.WorldConfig.validation_size = 16",
    "world.WorldConfig.test_size = 40", "encoder.EncoderConfig.hidden_size = 32",
    "encoder.EncoderConfig.num_layers = 1", "encoder.EncoderConfig.num_heads = 2",
    "encoder.EncoderConfig.intermediate_size = 64",
    "dense_retriever.DenseRetrieverConfig.tokenizer_vocab_size = 300",
    "dense_retriever.DenseRetrieverConfig.batch_size = 16",
    "dense_retriever.DenseRetrieverConfig.log_every = 1",
    "dense_retriever.DenseRetrieverConfig.eval_every = 100",
    "dense_retriever.DenseRetrieverConfig.checkpoint_every = 2",
    "dense_retriever.DenseRetrieverConfig.train_eval_size = 60",
    "dense_retriever.DenseRetrieverConfig.embed_batch_size = 64",
]


def _command(workdir, extra, gin_files):
  return [sys.executable, "-m", "experiments.run", "--gin_file=gin/experiments/quickstart.gin",
          *(f"--gin_file={f}" for f in gin_files),
          f"--workdir={workdir}", *(f"--gin_bindings={b}" for b in (*TINY, *extra))]


def _env(devices, **extra):
  env = subprocess_env(devices)
  for name in ("JAXSEARCH_COORDINATOR", "JAXSEARCH_NUM_PROCESSES", "JAXSEARCH_PROCESS_ID"):
    env.pop(name, None)
  env.update(extra)
  return env


def launch(workdir, *extra, gin_files=(), devices=1):
  return subprocess.run(_command(workdir, extra, gin_files), cwd=REPO, env=_env(devices),
                        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def launch_processes(workdir, *extra, num_processes=2, devices_per_process=4):
  """The same launcher command on `num_processes` local processes (multi-controller JAX)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  procs = [subprocess.Popen(
      _command(workdir, extra, ()), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, stdin=subprocess.DEVNULL,
      env=_env(devices_per_process, JAXSEARCH_COORDINATOR=f"127.0.0.1:{port}",
               JAXSEARCH_NUM_PROCESSES=str(num_processes), JAXSEARCH_PROCESS_ID=str(i)))
      for i in range(num_processes)]
  results = []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
      proc.kill()
      out, err = proc.communicate()
    results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
  return results


@pytest.mark.slow
class LauncherTest(absltest.TestCase):

  def test_smoke_run_writes_everything_and_resumes(self):
    workdir = tempfile.mkdtemp()
    out = launch(workdir)
    self.assertEqual(out.returncode, 0, out.stderr[-4000:])
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    for key in ("closed_book_em", "sft_em", "rl_em", "rl_f1", "rl_searches",
                "rl_support_recall", "sft_f1", "closed_book_f1"):
      self.assertIn(key, summary)
      self.assertTrue(0.0 <= summary[key] <= 3.0, (key, summary[key]))
    self.assertEqual(summary["num_eval_questions"], 16)
    # Closed book means no search at all.
    self.assertEqual(summary["closed_book_searches"], 0.0)
    config = open(os.path.join(workdir, "operative_config.gin")).read()
    self.assertIn("RunConfig", config)
    self.assertIn("PolicyGradientConfig.num_generations = 2", config)
    self.assertTrue(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
    self.assertTrue(os.path.exists(os.path.join(workdir, "tokenizer.model")))
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints", "rl"))), ["2", "3"])
    self.assertIn("[rl 3/3]", out.stdout)
    self.assertIn("tokens_per_s=", out.stdout)
    # A second run in the same workdir resumes: nothing is retrained, the summary is the same.
    again = launch(workdir)
    self.assertEqual(again.returncode, 0, again.stderr[-4000:])
    self.assertNotIn("[rl 1/3]", again.stdout)
    self.assertNotIn("[sft", again.stdout)
    with open(os.path.join(workdir, "summary.json")) as f:
      resumed = json.load(f)
    summary.pop("wall_seconds"), resumed.pop("wall_seconds")
    self.assertEqual(resumed, summary)

  def test_run_on_a_2x2x2_mesh_matches_one_device(self):
    one, eight = tempfile.mkdtemp(), tempfile.mkdtemp()
    for workdir, kwargs in ((one, {}), (eight, dict(gin_files=["gin/mesh/cpu8_2x2x2.gin"],
                                                     devices=8))):
      out = launch(workdir, "RL_STEPS = 0", **kwargs)   # the warm start's losses are compared
      self.assertEqual(out.returncode, 0, out.stderr[-4000:])
    # The loop logs the mesh it built (to the workdir's log): 8 devices as 2 x 2 x 2.
    with open(os.path.join(eight, "logs", "run.log")) as f:
      self.assertIn("mesh {'data': 2, 'fsdp': 2, 'tensor': 2}", f.read())
    losses = [[r["sft/loss"] for r in metrics_lib.read_metrics(w) if "sft/loss" in r]
              for w in (one, eight)]
    self.assertNotEmpty(losses[0])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)

  def test_two_processes_train_like_one(self):
    # Issue 5: the whole launcher run (warm start, evaluations, GRPO, checkpoints) on 2
    # processes x 4 CPU devices joined by jax.distributed (gloo), against 1 process x 8.
    # 8 rows per SFT and RL step, so each process loads 4 of every SFT batch.
    rows = ("steps.PolicyGradientConfig.prompts_per_step = 4", "RL_STEPS = 2")
    one, two = tempfile.mkdtemp(), tempfile.mkdtemp()
    single = launch(one, *rows, devices=8)
    self.assertEqual(single.returncode, 0, single.stderr[-4000:])
    procs = launch_processes(two, *rows)
    for i, proc in enumerate(procs):
      self.assertEqual(proc.returncode, 0, f"process {i}:\n{proc.stderr[-4000:]}")
    # One writer: process 0 prints progress lines, both train.
    self.assertIn("[rl 2/2]", procs[0].stdout)
    self.assertNotIn("[rl 2/2]", procs[1].stdout)
    with open(os.path.join(two, "logs", "run.1.log")) as f:   # process 1's own log
      self.assertIn("mesh {'data': 8, 'fsdp': 1, 'tensor': 1}", f.read())
    read = lambda w: json.load(open(os.path.join(w, "summary.json")))
    summary_one, summary_two = read(one), read(two)
    for s in (summary_one, summary_two):
      for key in [k for k in s if k.endswith("_seconds")]:   # timings differ
        s.pop(key)
    self.assertEqual(summary_two.keys(), summary_one.keys())
    for key, value in summary_one.items():
      if isinstance(value, float):
        self.assertAlmostEqual(summary_two[key], value, places=5, msg=key)
      else:
        self.assertEqual(summary_two[key], value, key)
    curves = [[(r["step"], r[k]) for r in metrics_lib.read_metrics(w) for k in ("sft/loss",
                                                                              "rl/loss")
               if k in r] for w in (one, two)]
    self.assertNotEmpty(curves[0])
    self.assertEqual([s for s, _ in curves[1]], [s for s, _ in curves[0]])
    np.testing.assert_allclose([v for _, v in curves[1]], [v for _, v in curves[0]],
                               rtol=1e-4)
    # The checkpoints were written by both processes together and restore in one.
    self.assertEqual(sorted(os.listdir(os.path.join(two, "checkpoints", "rl"))), ["2"])

  def test_unknown_binding_is_a_clear_error(self):
    out = launch(tempfile.mkdtemp(), "steps.PolicyGradientConfig.num_generatons = 4")
    self.assertNotEqual(out.returncode, 0)
    self.assertIn("num_generatons", out.stderr)


@pytest.mark.slow
class ConsoleTest(absltest.TestCase):

  def test_console_shows_config_and_progress_and_the_log_file_the_rest(self):
    workdir = tempfile.mkdtemp()
    env = _env(1)
    env.pop("TF_CPP_MIN_LOG_LEVEL")   # the launcher sets it itself
    cmd = [sys.executable, "-m", "experiments.run",
           "--gin_file=gin/experiments/dense_retriever.gin", f"--workdir={workdir}",
           *(f"--gin_bindings={b}" for b in TINY_DENSE)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    self.assertEqual(out.returncode, 0, out.stderr[-4000:])
    console = out.stdout + out.stderr
    for noise in ("cuInit", "cudart_stub", "checkpoint_manager.py", "logging_writer.py"):
      self.assertNotIn(noise, console)
    self.assertNotRegex(out.stderr, re.compile(r"^I\d{4} ", re.M))   # no absl INFO line
    # The configuration summary, then the progress lines.
    self.assertIn("run jaxsearch.programs.dense_retriever.run", out.stdout)
    self.assertIn("gin files: gin/experiments/dense_retriever.gin (+17 bindings)", out.stdout)
    self.assertIn(f"workdir:   {workdir}", out.stdout)
    for value in ("steps=2", "batch_size=16", "corpus=world"):   # key config values
      self.assertRegex(out.stdout, rf"\s{value}(\s|$)")
    self.assertIn("[dense 1/2] loss=", out.stdout)
    self.assertIn("[dense 2/2] loss=", out.stdout)
    self.assertLess(out.stdout.index("run jaxsearch"), out.stdout.index("[dense 1/2]"))
    # The library's INFO lines are in the workdir's log.
    with open(os.path.join(workdir, "logs", "run.log")) as f:
      log = f.read()
    self.assertRegex(log, re.compile(r"^I\d{4} .*checkpoint_manager\.py", re.M))
    self.assertRegex(log, re.compile(r"^I\d{4} .*\] \[2\] .*dense/loss=", re.M))   # metric writer


if __name__ == "__main__":
  absltest.main()
