import dataclasses
import json
import os
import shutil
import tempfile

from absl.testing import absltest, parameterized

from jaxsearch.config_files import absolute_paths

from jaxsearch.data.demos import TeacherConfig
from jaxsearch.data.world import WorldConfig
from jaxsearch.programs.search_agent.experiment import RLConfig, RunConfig, SFTConfig
from jaxsearch.train.sharding import MeshConfig
from jaxsearch.train.steps import PolicyGradientConfig
from jaxsearch.programs.search_agent.experiment import DataConfig
from jaxsearch.programs.search_agent.workdir import (CONFIG_FILE, config_from_dict,
                                                     config_to_json, load_config)
from jaxsearch.programs import dense_retriever, generative_retrieval, reward_model
from jaxsearch.train import trainer


class WorkdirConfigTest(absltest.TestCase):

  def test_json_round_trip_of_nested_non_default_config(self):
    config = RunConfig(
        seed=3, world=WorldConfig(num_people=77, split_fractions=(0.6, 0.2, 0.2)),
        sft=SFTConfig(steps=5, teacher=TeacherConfig(stop_early_prob=0.9)),
        rl=RLConfig(algorithm=PolicyGradientConfig(num_generations=4, kl_coef=0.0),
                    reward_weights={"f1": 1.0}),
        mesh=MeshConfig(data=2, tensor=4))
    again = config_from_dict(RunConfig, json.loads(config_to_json(config)))
    self.assertEqual(again, config)
    self.assertIsInstance(again.world.split_fractions, tuple)
    self.assertNotEqual(again, dataclasses.replace(config, seed=4))

  def test_unknown_fields_are_an_error(self):
    data = json.loads(config_to_json(RunConfig()))
    data["sft"]["stepz"] = 3
    with self.assertRaisesRegex(ValueError, "SFTConfig has no fields \\['stepz'\\]"):
      config_from_dict(RunConfig, data)


class TravellingWorkdirTest(parameterized.TestCase):
  """run_config.json records paths absolute: the workdir loads from any current directory."""

  def setUp(self):
    super().setUp()
    self.addCleanup(os.chdir, os.getcwd())

  def _tmp(self):
    d = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, d, ignore_errors=True)
    return d

  def test_relative_paths_written_in_one_directory_load_in_another(self):
    start = self._tmp()
    os.chdir(start)
    start = os.getcwd()   # the real path, as os.path.abspath sees it
    for rel in ("data/train.jsonl", "data/corpus.jsonl", "models/m.gguf", "runs/sft/x"):
      os.makedirs(os.path.dirname(rel), exist_ok=True)
      open(rel, "w").close()
    config = RunConfig(
        data=DataConfig(qa_train="data/train.jsonl", qa_test="tfds:natural_questions_open:test",
                        corpus="./data/corpus.jsonl"),
        pretrained="gguf:models/m.gguf", rl=RLConfig(init_from="runs/sft"))
    trainer.write_config("runs/agent", CONFIG_FILE, config)   # a relative workdir, too

    os.chdir(self._tmp())
    loaded = load_config(os.path.join(start, "runs", "agent"))
    self.assertEqual(loaded.data.qa_train, os.path.join(start, "data", "train.jsonl"))
    self.assertEqual(loaded.data.corpus, os.path.join(start, "data", "corpus.jsonl"))
    self.assertEqual(loaded.pretrained, "gguf:" + os.path.join(start, "models", "m.gguf"))
    self.assertEqual(loaded.rl.init_from, os.path.join(start, "runs", "sft"))
    for path in (loaded.data.qa_train, loaded.data.corpus, loaded.pretrained[len("gguf:"):],
                 loaded.rl.init_from):
      self.assertTrue(os.path.exists(path), path)
    # Not paths: unset fields and TFDS specs stay; everything else is the config written.
    self.assertEqual(loaded.data.qa_test, "tfds:natural_questions_open:test")
    self.assertEqual((loaded.data.qa_validation, loaded.data.tfds_data_dir), ("", ""))
    self.assertEqual(dataclasses.replace(loaded, data=config.data, pretrained=config.pretrained,
                                         rl=config.rl), config)

  @parameterized.named_parameters(
      ("registry_name_stays", "smollm2-135m-instruct", "smollm2-135m-instruct"),
      ("gguf_path", "gguf:m.gguf", "gguf:{cwd}/m.gguf"),
      ("absolute_gguf_stays", "gguf:/models/m.gguf", "gguf:/models/m.gguf"),
      ("hf_hub_id_stays", "hf:HuggingFaceTB/SmolLM2-135M", "hf:HuggingFaceTB/SmolLM2-135M"),
      ("hf_local_dir", "hf:./ckpt", "hf:{cwd}/ckpt"),
      ("unset", "", ""),
  )
  def test_pretrained_spec(self, value, want):
    os.chdir(self._tmp())
    got = absolute_paths(RunConfig(pretrained=value)).pretrained
    self.assertEqual(got, want.format(cwd=os.getcwd()))

  def test_other_programs_mark_their_paths(self):
    os.chdir(self._tmp())
    cwd = os.getcwd()
    dense = absolute_paths(dense_retriever.DenseRetrieverConfig(
        corpus="wiki.jsonl", queries_path="q.jsonl", train_qrels_path="qrels/train.tsv",
        test_qrels_path="qrels/test.tsv"))
    self.assertEqual((dense.corpus, dense.queries_path, dense.train_qrels_path,
                      dense.test_qrels_path),
                     tuple(os.path.join(cwd, p) for p in ("wiki.jsonl", "q.jsonl",
                                                          "qrels/train.tsv", "qrels/test.tsv")))
    self.assertEqual(absolute_paths(dense_retriever.DenseRetrieverConfig()).corpus, "world")
    dsi = absolute_paths(generative_retrieval.DSIConfig(embedding_cache_dir="cache"))
    self.assertEqual(dsi.embedding_cache_dir, os.path.join(cwd, "cache"))
    self.assertEqual(dsi.corpus, "world")
    rm = absolute_paths(reward_model.RewardModelConfig(init_from="runs/sft"))
    self.assertEqual(rm.init_from, os.path.join(cwd, "runs", "sft"))


if __name__ == "__main__":
  absltest.main()
