"""SIGKILL a launcher run mid-phase, rerun the same command: it ends where an uninterrupted run
ends, bit for bit; a corrupt last checkpoint is skipped and the run still ends there.

Why exact equality holds (and is asserted): every random choice is a pure function of the seed
and the step (SFT batches: a permutation per epoch; RL prompts and rollout keys: per step),
the state saved is everything the next step reads (params, optimizer state, step), float32
arrays round-trip through orbax bit for bit, and XLA on CPU computes the same programs the
same way in a new process. Only wall-clock fields differ (`TIMING_KEYS`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from absl.testing import absltest

from jaxsearch import metrics as metrics_lib
from jaxsearch.checkpoint import MANIFEST
from tests.integration.launcher_test import REPO, TINY
from tests.xla_env import subprocess_env

RL_STEPS, SFT_STEPS, EVERY = 10, 9, 3
CONFIG = [*TINY, f"SFT_STEPS = {SFT_STEPS}", f"RL_STEPS = {RL_STEPS}",
          f"experiment.RunConfig.checkpoint_every = {EVERY}"]
# Wall-clock measurements: the only fields allowed to differ between two runs.
TIMING_KEYS = ("wall_seconds", "eval_seconds", "s_per_step", "rollout_s", "tokens_per_s", "mfu",
               "compile/")


def command(workdir: str) -> tuple[list[str], dict[str, str]]:
  cmd = [sys.executable, "-m", "experiments.run", "--gin_file=gin/experiments/quickstart.gin",
         f"--workdir={workdir}", *(f"--gin_bindings={b}" for b in CONFIG)]
  return cmd, subprocess_env()


def run_to_end(workdir: str) -> subprocess.CompletedProcess:
  cmd, env = command(workdir)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                        stdin=subprocess.DEVNULL)


def finished_steps(workdir: str, phase: str) -> list[int]:
  """Steps of `phase` whose checkpoint is complete (orbax renamed it and its manifest is in)."""
  d = os.path.join(workdir, "checkpoints", phase)
  if not os.path.isdir(d):
    return []
  return sorted(int(s) for s in os.listdir(d)
                if s.isdigit() and os.path.exists(os.path.join(d, s, MANIFEST)))


def run_and_kill(workdir: str, phase: str, step: int) -> tuple[float, str]:
  """Starts the run, SIGKILLs it as soon as `phase` has a finished checkpoint of `step`.

  Returns:
    (seconds from start to the kill, the run's stdout).
  """
  cmd, env = command(workdir)
  t0 = time.time()
  with tempfile.TemporaryFile("w+") as out:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, text=True)
    try:
      while step not in finished_steps(workdir, phase):
        if proc.poll() is not None:
          raise AssertionError(f"the run ended (rc {proc.returncode}) before {phase} step {step}")
        if time.time() - t0 > 500:
          raise AssertionError(f"no {phase} checkpoint of step {step} after 500 s")
        time.sleep(0.01)
      proc.send_signal(signal.SIGKILL)
      killed_at = time.time() - t0
    finally:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    out.seek(0)
    return killed_at, out.read()


def without_timings(row: dict) -> dict:
  return {k: v for k, v in row.items() if not any(t in k for t in TIMING_KEYS)}


def last_rows(workdir: str, prefix: str) -> dict[tuple, dict]:
  """{(step, names): the last metrics.jsonl row of that step and those names} over the rows
  with `prefix` names (a resumed run writes the steps after its checkpoint again: the last
  row is the one that counts)."""
  rows = {}
  for r in metrics_lib.read_metrics(workdir):
    if any(k.startswith(prefix) for k in r):
      r = without_timings(r)
      rows[r["step"], tuple(sorted(r))] = r
  return rows


def summary(workdir: str) -> dict:
  with open(os.path.join(workdir, "summary.json")) as f:
    return without_timings(json.load(f))


def rl_params(workdir: str):
  from jaxsearch.programs.search_agent import workdir as workdir_lib  # noqa: PLC0415
  exp = workdir_lib.load_experiment(workdir)
  return jax.tree.map(np.asarray, workdir_lib.load_params(exp, workdir, "rl"))


@pytest.mark.slow
class KillResumeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.straight = tempfile.mkdtemp()
    t0 = time.time()
    out = run_to_end(cls.straight)
    cls.straight_seconds = time.time() - t0
    assert out.returncode == 0, out.stderr[-4000:]

  def assert_same_run(self, workdir):
    self.assertEqual(summary(workdir), summary(self.straight))
    for prefix in ("sft/", "rl/", "eval/"):
      got, want = last_rows(workdir, prefix), last_rows(self.straight, prefix)
      self.assertNotEmpty(want, prefix)
      self.assertEqual(got, want, prefix)
    a, b = rl_params(workdir), rl_params(self.straight)
    self.assertEqual(jax.tree.structure(a), jax.tree.structure(b))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))

  def test_straight_run_is_not_trivial(self):
    # The comparisons below would be vacuous if RL left the policy where SFT put it.
    rl = last_rows(self.straight, "rl/")
    self.assertEqual(sorted(step for step, _ in rl), list(range(1, RL_STEPS + 1)))
    self.assertGreater(max(r["rl/kl"] for r in rl.values()), 0.0)
    self.assertGreater(len({r["rl/entropy"] for r in rl.values()}), 1)
    self.assertEqual(finished_steps(self.straight, "rl"), [9, 10])

  def test_killed_in_sft_and_in_rl_then_rerun_matches_an_uninterrupted_run(self):
    workdir = tempfile.mkdtemp()
    # Killed during SFT once it has checkpointed step 3, then during RL at step 3.
    t_sft, out_sft = run_and_kill(workdir, "sft", EVERY)
    self.assertNotIn("[rl ", out_sft)
    sft_steps = finished_steps(workdir, "sft")
    self.assertLess(max(sft_steps), SFT_STEPS)   # killed mid-phase
    t_rl, out_rl = run_and_kill(workdir, "rl", EVERY)
    self.assertFalse(os.path.exists(os.path.join(workdir, "summary.json")))
    rl_steps = finished_steps(workdir, "rl")
    self.assertLess(max(rl_steps), RL_STEPS)     # killed mid-phase
    t0 = time.time()
    out = run_to_end(workdir)
    t_resume = time.time() - t0
    self.assertEqual(out.returncode, 0, out.stderr[-4000:])
    resumed_from = max(rl_steps)
    self.assertNotIn("[sft ", out.stdout)
    self.assertNotIn(f"[rl {resumed_from}/{RL_STEPS}]", out.stdout)
    self.assertIn(f"[rl {resumed_from + 1}/{RL_STEPS}]", out.stdout)
    self.assert_same_run(workdir)
    print(json.dumps({"straight_s": round(self.straight_seconds, 1),
                      "killed_in_sft_after_s": round(t_sft, 1), "sft_resumed_from": max(sft_steps),
                      "killed_in_rl_after_s": round(t_rl, 1), "rl_resumed_from": resumed_from,
                      "rl_steps_done_when_killed": out_rl.count("[rl "),
                      "resume_to_end_s": round(t_resume, 1)}))

  def test_corrupt_last_checkpoint_is_skipped_and_the_run_ends_the_same(self):
    workdir = os.path.join(tempfile.mkdtemp(), "run")
    shutil.copytree(self.straight, workdir)
    # Garble one byte of every array file of the final RL checkpoint (step 10): the run must
    # fall back to step 9, train step 10 again and evaluate again.
    step_dir = os.path.join(workdir, "checkpoints", "rl", str(RL_STEPS))
    for root, _, names in os.walk(os.path.join(step_dir, "state")):
      for name in names:
        if os.path.basename(root) == "d":
          path = os.path.join(root, name)
          data = bytearray(open(path, "rb").read())
          data[len(data) // 2] ^= 0x10
          with open(path, "wb") as f:
            f.write(data)
    out = run_to_end(workdir)
    self.assertEqual(out.returncode, 0, out.stderr[-4000:])
    self.assertIn(f"checkpoint step {RL_STEPS} at {step_dir} is corrupt", out.stderr)
    self.assertIn(f"[rl {RL_STEPS}/{RL_STEPS}]", out.stdout)
    self.assertNotIn(f"[rl {RL_STEPS - 1}/{RL_STEPS}]", out.stdout)
    self.assertTrue(os.path.isdir(os.path.join(workdir, "checkpoints", f"rl.corrupt-{RL_STEPS}")))
    self.assert_same_run(workdir)


if __name__ == "__main__":
  absltest.main()
