"""A 3-step smoke run of the quickstart config through the launcher, and its resume."""
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from absl.testing import absltest

from jaxsearch import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "SFT_STEPS = 3", "RL_STEPS = 3",
    "world.WorldConfig.num_people = 60", "world.WorldConfig.num_distractors = 20",
    "world.WorldConfig.train_size = 100", "world.WorldConfig.validation_size = 10",
    "world.WorldConfig.test_size = 16",
    "experiment.SFTConfig.num_demos = 64", "experiment.SFTConfig.batch_size = 8",
    "steps.GRPOConfig.prompts_per_step = 2", "steps.GRPOConfig.num_generations = 2",
    "experiment.RunConfig.eval_batch_size = 16", "experiment.RunConfig.checkpoint_every = 2",
    "search_env.RolloutConfig.max_len = 128",
    "transformer.TransformerConfig.d_model = 32", "transformer.TransformerConfig.num_layers = 1",
    "transformer.TransformerConfig.mlp_dim = 64",
]


def launch(workdir, *extra, gin_files=(), devices=1):
  cmd = [sys.executable, "-m", "experiments.run", "--gin_file=gin/experiments/quickstart.gin",
         *(f"--gin_file={f}" for f in gin_files),
         f"--workdir={workdir}", *(f"--gin_bindings={b}" for b in (*TINY, *extra))]
  flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                        stdin=subprocess.DEVNULL)


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
    self.assertIn("GRPOConfig.num_generations = 2", config)
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
    wall = (summary.pop("wall_seconds"), resumed.pop("wall_seconds"))
    self.assertEqual(resumed, summary)
    self.assertLess(wall[1], wall[0])

  def test_run_on_a_2x2x2_mesh_matches_one_device(self):
    one, eight = tempfile.mkdtemp(), tempfile.mkdtemp()
    for workdir, kwargs in ((one, {}), (eight, dict(gin_files=["gin/mesh/cpu8_2x2x2.gin"],
                                                     devices=8))):
      out = launch(workdir, "RL_STEPS = 1", **kwargs)
      self.assertEqual(out.returncode, 0, out.stderr[-4000:])
    # The loop logs the mesh it built: 8 devices as 2 x 2 x 2.
    self.assertIn("mesh {'data': 2, 'fsdp': 2, 'tensor': 2}", out.stderr)
    losses = [[r["sft/loss"] for r in metrics_lib.read_metrics(w) if "sft/loss" in r]
              for w in (one, eight)]
    self.assertNotEmpty(losses[0])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)

  def test_unknown_binding_is_a_clear_error(self):
    out = launch(tempfile.mkdtemp(), "steps.GRPOConfig.num_generatons = 4")
    self.assertNotEqual(out.returncode, 0)
    self.assertIn("num_generatons", out.stderr)


if __name__ == "__main__":
  absltest.main()
