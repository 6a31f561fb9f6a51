"""gin/experiments/search_r1.gin end to end: a tiny random Qwen2 checkpoint (`hf:`), Search-R1
parquet QA files, a corpus served by a `/retrieve` server, text tags, 2 GRPO steps with the
recipe's own settings (lengths and batch shrunk to fit a test)."""
import json
import os
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from absl.testing import absltest

from jaxsearch import metrics as metrics_lib
from jaxsearch.programs.search_agent import workdir as workdir_lib
from jaxsearch.retrieval.corpus import load_search_r1_corpus
from jaxsearch.retrieval.retriever import build_retriever
from jaxsearch.retrieval.server import serve_in_thread
from tests.data.hf_tokenizer_fixtures import write_tokenizer_dir
from tests.integration.launcher_test import REPO
from tests.models import hf_fixtures as fx
from tests.xla_env import subprocess_env

CITIES = [("Paris", "France"), ("Rome", "Italy"), ("Lima", "Peru"), ("Oslo", "Norway"),
          ("Cairo", "Egypt"), ("Quito", "Ecuador"), ("Hanoi", "Vietnam"), ("Dakar", "Senegal")]


def _write_data(root: str) -> tuple[str, str, str]:
  corpus = os.path.join(root, "corpus.jsonl")
  with open(corpus, "w") as f:
    for i, (city, country) in enumerate(CITIES):
      f.write(json.dumps({"id": f"doc{i}", "contents": f'"{city}"\n{city} is the capital of '
                                                       f"{country}."}) + "\n")
  paths = []
  for split, rows in (("train", CITIES[:6]), ("test", CITIES[6:])):
    # Search-R1's parquet layout (scripts/data_process/nq_search.py): a chat prompt whose
    # user message ends with "Question: ...", the answers under reward_model.ground_truth.
    table = pa.table({
        "id": [f"{split}_{i}" for i in range(len(rows))],
        "data_source": ["nq" if i % 2 else "hotpotqa" for i in range(len(rows))],
        "prompt": [[{"role": "user", "content": f"Answer it. Question: What country has "
                                                f"{city} as its capital?\n"}]
                   for city, _ in rows],
        "reward_model": [{"style": "rule", "ground_truth": {"target": [country]}}
                         for _, country in rows],
    })
    paths.append(os.path.join(root, f"{split}.parquet"))
    pq.write_table(table, paths[-1])
  return corpus, *paths


@pytest.mark.slow
class SearchR1RecipeTest(absltest.TestCase):

  def test_two_grpo_steps_against_a_retrieval_server(self):
    root = tempfile.mkdtemp()
    corpus_path, train, test = _write_data(root)
    corpus = load_search_r1_corpus(corpus_path)
    server, _ = serve_in_thread(build_retriever("bm25", corpus), corpus)
    self.addCleanup(server.server_close)
    self.addCleanup(server.shutdown)
    ckpt = fx.save(fx.build("qwen2_bias_tied", vocab_size=320))
    write_tokenizer_dir(ckpt, "chatml")
    workdir = tempfile.mkdtemp()
    bindings = [f"MODEL = 'hf:{ckpt}'", f"QA_TRAIN = '{train}'", f"QA_TEST = '{test}'",
                f"CORPUS = '{corpus_path}'", f"RETRIEVER_URL = '{server.url}/retrieve'",
                "RL_STEPS = 2", "steps.PolicyGradientConfig.prompts_per_step = 2",
                "steps.PolicyGradientConfig.micro_batch_size = 0",
                "search_env.RolloutConfig.max_len = 448",
                "transformer.TransformerConfig.max_len = 448", "MAX_PASSAGE_TOKENS = 24",
                "experiment.RunConfig.eval_batch_size = 8"]
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--gin_file=gin/experiments/search_r1.gin",
         f"--workdir={workdir}", *(f"--gin_bindings={b}" for b in bindings)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900,
        stdin=subprocess.DEVNULL)
    self.assertEqual(out.returncode, 0, out.stderr[-4000:])
    self.assertIn("[rl 2/2]", out.stdout)
    self.assertNotIn("[sft", out.stdout)                    # no warm start, as Search-R1
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    self.assertIn("rl_em", summary)
    exp = workdir_lib.load_experiment(workdir)
    cfg = exp.config
    self.assertEqual(exp.env.protocol, "text")
    self.assertEqual(type(cfg.search_tool).__name__, "HttpSearch")
    self.assertIsNone(exp.tool.index)                       # no in-graph index was built
    self.assertEqual((cfg.rollout.top_k, cfg.rollout.max_searches), (3, 4))
    g = cfg.rl.algorithm
    self.assertEqual((g.num_generations, g.kl_coef, g.kl_kind), (5, 0.001, "low_var_kl"))
    self.assertEqual(cfg.rl.optimizer.learning_rate, 1e-6)
    self.assertEqual(dict(cfg.rl.reward_weights), {"exact_match": 1.0})
    self.assertEqual((exp.model.config.dtype, exp.model.config.remat), ("bfloat16", "full"))
    self.assertEqual(len(exp.world.splits["train"]), 6)
    rl = [r for r in metrics_lib.read_metrics(workdir) if "rl/loss" in r]
    self.assertEqual(sorted(r["step"] for r in rl), [1, 2])
    self.assertTrue(all("rl/logp_change" in r for r in rl))   # health telemetry


if __name__ == "__main__":
  absltest.main()
