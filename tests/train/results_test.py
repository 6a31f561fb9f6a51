"""Tests of jaxsearch.train.results on workdirs written by hand (metrics.jsonl, summary.json)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from absl.testing import absltest

from jaxsearch.train import results


def write_workdir(path: str, rows=None, summary=None, config=None, raw_metrics: str | None = None):
  os.makedirs(path, exist_ok=True)
  if raw_metrics is not None:
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
      f.write(raw_metrics)
  elif rows is not None:
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  if summary is not None:
    with open(os.path.join(path, "summary.json"), "w") as f:
      json.dump(summary, f)
  if config is not None:
    with open(os.path.join(path, "run_config.json"), "w") as f:
      json.dump(config, f)
  return path


# A run as the launcher logs it: SFT rows, then RL rows whose steps restart at 1; the run was
# killed after RL step 3 and resumed from its step-2 checkpoint, so step 3 is logged twice.
GRPO_ROWS = [
    {"step": 1, "sft/loss": 4.0}, {"step": 2, "sft/loss": 3.0},
    {"step": 1, "rl/reward": 0.1, "rl/em": 0.0, "rl/kl": 0.0},
    {"step": 2, "rl/reward": 0.3, "rl/em": 0.25, "rl/kl": 0.01},
    {"step": 3, "rl/reward": 0.9, "rl/em": 0.5, "rl/kl": 0.02},     # lost with the kill
    {"step": 3, "rl/reward": 0.5, "rl/em": 0.5, "rl/kl": 0.03},     # logged again on resume
    {"step": 4, "rl/reward": 0.7, "rl/em": 0.75, "rl/kl": 0.04},
    {"step": 6, "eval/rl_em": 0.6},
]
GRPO_SUMMARY = {"rl_em": 0.625, "sft_em": 0.125, "num_eval_questions": 16, "eval_split": "test"}
GRPO_CONFIG = {"seed": 0, "rl": {"steps": 4, "grpo": {"advantage": "grpo"}}}
RLOO_ROWS = [{"step": 2, "rl/reward": 0.2, "rl/em": 0.5}, {"step": 1, "rl/reward": 0.4,
                                                            "rl/em": 0.25}]
RLOO_SUMMARY = {"rl_em": 0.5, "sft_em": 0.125}


class ResultsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
    self.grpo = write_workdir(os.path.join(self.root, "compare", "grpo", "seed0"), GRPO_ROWS,
                              GRPO_SUMMARY, GRPO_CONFIG)
    self.rloo = write_workdir(os.path.join(self.root, "compare", "rloo", "seed0"), RLOO_ROWS,
                              RLOO_SUMMARY)

  def test_load_runs_reads_every_file_and_names_runs_by_distinct_suffixes(self):
    runs = results.load_runs([self.grpo, self.rloo])
    self.assertEqual([r.name for r in runs], ["grpo/seed0", "rloo/seed0"])
    grpo, rloo = runs
    self.assertEqual(grpo.path, os.path.abspath(self.grpo))
    # read_metrics keeps one row per (step, keys): the resumed run's step 3, in its place.
    self.assertEqual(list(grpo.rows), GRPO_ROWS[:4] + GRPO_ROWS[5:])
    self.assertEqual(grpo.summary, GRPO_SUMMARY)
    self.assertEqual(grpo.config, GRPO_CONFIG)
    self.assertEqual(rloo.config, {})
    self.assertTrue(grpo.finished)
    # Different last components need only one component each.
    other = write_workdir(os.path.join(self.root, "b"), [{"step": 1, "rl/em": 1.0}])
    self.assertEqual([r.name for r in results.load_runs([self.grpo, other])], ["seed0", "b"])
    # Explicit names.
    runs = results.load_runs([self.grpo, self.rloo], names=["A", "B"])
    self.assertEqual([r.name for r in runs], ["A", "B"])

  def test_unfinished_run_has_an_empty_summary(self):
    path = write_workdir(os.path.join(self.root, "running"), [{"step": 1, "sft/loss": 2.0}])
    (run,) = results.load_runs([path])
    self.assertEqual(run.summary, {})
    self.assertFalse(run.finished)
    only_summary = write_workdir(os.path.join(self.root, "only_summary"), summary={"rl_em": 1.0})
    (run,) = results.load_runs([only_summary])
    self.assertEqual(run.rows, ())
    self.assertEqual(run.summary, {"rl_em": 1.0})

  def test_curves_sort_by_step_and_keep_the_last_write_of_a_step(self):
    grpo, rloo = results.load_runs([self.grpo, self.rloo])
    steps, reward = results.curves(grpo, "rl/reward")
    np.testing.assert_array_equal(steps, [1, 2, 3, 4])
    np.testing.assert_allclose(reward, [0.1, 0.3, 0.5, 0.7])   # step 3: 0.5, not 0.9
    self.assertEqual(steps.dtype, np.int64)
    self.assertEqual(reward.dtype, np.float64)
    # SFT rows share step numbers with RL rows but not keys: they stay apart.
    steps, loss = results.curves(grpo, "sft/loss")
    np.testing.assert_array_equal(steps, [1, 2])
    np.testing.assert_allclose(loss, [4.0, 3.0])
    steps, em = results.curves(rloo, "rl/em")                   # written out of order
    np.testing.assert_array_equal(steps, [1, 2])
    np.testing.assert_allclose(em, [0.25, 0.5])
    self.assertEqual(results.metric_keys(grpo),
                     ["eval/rl_em", "rl/em", "rl/kl", "rl/reward", "sft/loss"])

  def test_curves_of_an_unknown_metric_name_the_run_and_close_matches(self):
    grpo, = results.load_runs([self.grpo])
    with self.assertRaisesRegex(KeyError, r"'seed0' logged no 'rl/rewards'.*'rl/reward'"):
      results.curves(grpo, "rl/rewards")

  def test_final_value_looks_in_summary_then_curve_then_config(self):
    grpo, rloo = results.load_runs([self.grpo, self.rloo])
    self.assertEqual(results.final_value(grpo, "rl_em"), 0.625)
    self.assertEqual(results.final_value(grpo, "rl/kl"), 0.04)      # last step's value
    self.assertEqual(results.final_value(rloo, "rl/reward"), 0.2)   # step 2 is the last
    self.assertEqual(results.final_value(grpo, "rl.algorithm.advantage"), "grpo")
    self.assertEqual(results.final_value(grpo, "rl.steps"), 4)
    self.assertIsNone(results.final_value(grpo, "rl.algorithm.missing"))
    self.assertIsNone(results.final_value(rloo, "rl/kl"))

  def test_summary_table_layout(self):
    runs = results.load_runs([self.grpo, self.rloo])
    table = results.summary_table(runs, ["rl_em", "rl/kl", "num_eval_questions",
                                         "rl.algorithm.advantage"], digits=2)
    expected = "\n".join([
        "run         rl_em  rl/kl  num_eval_questions  rl.algorithm.advantage",
        "----------  -----  -----  ------------------  ----------------------",
        "grpo/seed0   0.62   0.04                  16                    grpo",
        "rloo/seed0   0.50      -                   -                       -",
    ])
    self.assertEqual(table, expected)
    # Three decimals by default.
    self.assertIn("0.625", results.summary_table(runs, ["rl_em"]))

  def test_moving_average(self):
    np.testing.assert_allclose(results.moving_average([1.0, 3.0, 5.0, 7.0], 2), [1, 2, 4, 6])
    np.testing.assert_allclose(results.moving_average([2.0, 4.0, 9.0], 10), [2, 3, 5])
    np.testing.assert_allclose(results.moving_average([2.0, 4.0], 1), [2, 4])
    self.assertEqual(results.moving_average([], 3).shape, (0,))
    with self.assertRaisesRegex(ValueError, "window must be an int >= 1, got 0"):
      results.moving_average([1.0], 0)

  def test_bad_inputs_are_named(self):
    with self.assertRaisesRegex(FileNotFoundError, "nowhere"):
      results.load_runs([os.path.join(self.root, "nowhere")])
    empty = os.path.join(self.root, "empty")
    os.makedirs(empty)
    with self.assertRaisesRegex(ValueError, "holds no run"):
      results.load_runs([empty])
    # A last line cut short by a kill is skipped.
    cut = write_workdir(os.path.join(self.root, "cut"),
                        raw_metrics='{"step": 1, "rl/em": 0.5}\n\n{"step": 2, "rl/em"')
    (run,) = results.load_runs([cut])
    self.assertEqual(run.rows, ({"step": 1, "rl/em": 0.5},))
    no_step = write_workdir(os.path.join(self.root, "no_step"), [{"rl/em": 0.5}])
    with self.assertRaisesRegex(ValueError, "row 1 is not an object with a 'step'"):
      results.load_runs([no_step])
    broken_summary = write_workdir(os.path.join(self.root, "broken"), [{"step": 1}])
    with open(os.path.join(broken_summary, "summary.json"), "w") as f:
      f.write("{")
    with self.assertRaisesRegex(ValueError, "broken/summary.json: not valid JSON"):
      results.load_runs([broken_summary])
    with self.assertRaisesRegex(ValueError, "given twice"):
      results.load_runs([self.grpo, self.grpo + os.sep])
    with self.assertRaisesRegex(ValueError, "2 unique labels"):
      results.load_runs([self.grpo, self.rloo], names=["x", "x"])
    with self.assertRaisesRegex(ValueError, "one path"):
      results.load_runs(self.grpo)
    with self.assertRaisesRegex(ValueError, "one string"):
      results.summary_table([], "rl_em")


if __name__ == "__main__":
  absltest.main()
