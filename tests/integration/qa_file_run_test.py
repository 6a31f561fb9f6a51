"""gin/experiments/qa_file.gin through the launcher, on QA files and a corpus the test writes:
a Search-R1 parquet train split, a gzipped FlashRAG test split, a Search-R1 corpus; and a
malformed file's error, which must name the file and the line."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from absl.testing import absltest

from jaxsearch.data.world import WorldConfig, build_world
from tests.xla_env import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "SFT_STEPS = 3", "RL_STEPS = 2", "MAX_PASSAGE_TOKENS = 24",
    "experiment.SFTConfig.num_demos = 32", "experiment.SFTConfig.batch_size = 8",
    "steps.PolicyGradientConfig.prompts_per_step = 2", "steps.PolicyGradientConfig.num_generations = 2",
    "experiment.RunConfig.eval_batch_size = 8", "experiment.RunConfig.checkpoint_every = 2",
    "experiment.RunConfig.tokenizer_vocab_size = 512",
    "search_env.RolloutConfig.max_len = 128",
    "transformer.TransformerConfig.d_model = 32", "transformer.TransformerConfig.num_layers = 1",
    "transformer.TransformerConfig.mlp_dim = 64",
]


def write_dataset(directory: str) -> dict[str, str]:
  """A small world exported as files: parquet train (Search-R1 rows), gzipped JSONL test."""
  world = build_world(WorldConfig(num_people=24, num_cities=6, num_countries=3, num_companies=5,
                                  num_distractors=10, train_size=40, validation_size=4,
                                  test_size=12))
  world.write_jsonl(directory)   # corpus.jsonl and {split}.jsonl
  rows = [{"data_source": "world", "ability": "fact-reasoning",
           "prompt": [{"role": "user", "content": f"Answer the given question. Question: {q.question}\n"}],
           "reward_model": {"style": "rule", "ground_truth": {"target": list(q.answers)}},
           "extra_info": {"split": "train", "index": i}}
          for i, q in enumerate(world.splits["train"])]
  paths = {"QA_TRAIN": os.path.join(directory, "train.parquet"),
           "QA_TEST": os.path.join(directory, "test.jsonl.gz"),
           "CORPUS": os.path.join(directory, "corpus.jsonl")}
  pq.write_table(pa.Table.from_pylist(rows), paths["QA_TRAIN"])
  with open(os.path.join(directory, "test.jsonl"), "rb") as f, gzip.open(paths["QA_TEST"], "wb") as g:
    g.write(f.read())
  return paths


def launch(workdir: str, files: dict[str, str], *extra: str):
  bindings = [*TINY, *(f"{k} = '{v}'" for k, v in files.items()), "QA_VALIDATION = ''", *extra]
  cmd = [sys.executable, "-m", "experiments.run", "--gin_file=gin/experiments/qa_file.gin",
         f"--workdir={workdir}", *(f"--gin_bindings={b}" for b in bindings)]
  env = subprocess_env()
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                        stdin=subprocess.DEVNULL)


class QAGinFilesTest(absltest.TestCase):
  """Fast: the gin files parse, the example dataset is valid and its answers are findable."""

  def tearDown(self):
    import gin  # noqa: PLC0415
    gin.clear_config()
    super().tearDown()

  def test_qa_file_requires_the_paths(self):
    from experiments import run as launcher  # noqa: PLC0415
    with self.assertRaises(ValueError) as ctx:
      launcher.parse_gin(["gin/experiments/qa_file.gin"], ["QA_TEST = 't'", "CORPUS = 'c'"])
    self.assertIn("the macro %QA_TRAIN is used but never defined", str(ctx.exception))

  def test_example_dataset(self):
    import gin  # noqa: PLC0415
    from experiments import run as launcher  # noqa: PLC0415
    from jaxsearch.programs.search_agent.evaluate import answer_in_passages  # noqa: PLC0415
    from jaxsearch.programs.search_agent.experiment import RunConfig, load_world  # noqa: PLC0415
    launcher.parse_gin(["gin/experiments/qa_example.gin"], [])
    data = gin.get_configurable("jaxsearch.programs.search_agent.experiment.DataConfig")()
    cwd = os.getcwd()
    try:
      os.chdir(REPO)   # the example paths are relative to the repository root
      world = load_world(RunConfig(data=data))
    finally:
      os.chdir(cwd)
    self.assertEqual({s: len(q) for s, q in world.splits.items()},
                     {"train": 480, "validation": 32, "test": 64})
    self.assertLen(world.documents, 1200)
    by_title = {}
    for d in world.documents:
      by_title.setdefault(d.title, []).append(d.text)
    train_subjects = set()
    for split, questions in world.splits.items():
      for q in questions:
        subject = q.question.removeprefix("What is ").removesuffix(" located in?")
        # The subject's passage names the first golden answer: one search finds it.
        self.assertLen(by_title[subject], 1)   # unambiguous subjects
        self.assertTrue(answer_in_passages(q.answers[:1], by_title[subject]), q)
        if split == "train":
          train_subjects.add(subject)
        else:
          self.assertNotIn(subject, train_subjects)


@pytest.mark.slow
class QAFileRunTest(absltest.TestCase):

  def test_trains_and_evaluates_on_files(self):
    data_dir, workdir = tempfile.mkdtemp(), tempfile.mkdtemp()
    files = write_dataset(data_dir)
    out = launch(workdir, files)
    self.assertEqual(out.returncode, 0, out.stderr[-4000:])
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    for phase in ("closed_book", "sft", "rl"):
      for metric in ("em", "f1", "format", "searches", "support_recall"):
        value = summary[f"{phase}_{metric}"]
        self.assertTrue(0.0 <= value <= 3.0, (phase, metric, value))
    self.assertEqual(summary["closed_book_searches"], 0.0)
    self.assertEqual(summary["eval_split"], "test")
    self.assertEqual(summary["num_eval_questions"], 12)
    # The run recorded where its data came from.
    with open(os.path.join(workdir, "run_config.json")) as f:
      data = json.load(f)["data"]
    self.assertEqual((data["qa_train"], data["qa_test"], data["corpus"], data["qa_validation"]),
                     (files["QA_TRAIN"], files["QA_TEST"], files["CORPUS"], ""))
    self.assertIn("[rl 2/2]", out.stdout)

  def test_malformed_file_names_the_line(self):
    data_dir = tempfile.mkdtemp()
    files = write_dataset(data_dir)
    bad = os.path.join(data_dir, "bad_train.jsonl")
    with open(bad, "w") as f:
      f.write(json.dumps({"id": "a", "question": "fine?", "golden_answers": ["yes"]}) + "\n")
      f.write(json.dumps({"id": "b", "question": "no answers here?"}) + "\n")
    out = launch(tempfile.mkdtemp(), dict(files, QA_TRAIN=bad))
    self.assertNotEqual(out.returncode, 0)
    self.assertIn(f"{bad}:2: missing answers: no field 'golden_answers'", out.stderr)


if __name__ == "__main__":
  absltest.main()
