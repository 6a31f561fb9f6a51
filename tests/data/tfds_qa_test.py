"""Tests for jaxsearch.data.tfds_qa: record conversion, the not-prepared error, and reading a
natural_questions_open dataset that the test prepares itself from a few fake NQ-open lines."""
from __future__ import annotations

import importlib.resources
import json
import os
import sys
import tempfile
from unittest import mock

import numpy as np
from absl.testing import absltest

from jaxsearch.data import tfds_qa
from jaxsearch.data.qa_files import QAExample

NQ_LINES = {
    "train": [{"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]},
              {"question": "capital of france", "answer": ["Paris"]},
              {"question": "largest ocean", "answer": ["Pacific", "", "Pacific"]}],
    "dev": [{"question": "when did the berlin wall fall", "answer": ["1989"]}],
}


def prepare_fake_nq_open(data_dir: str) -> None:
  """Runs the real TFDS builder of natural_questions_open on local fake NQ-open files."""
  import tensorflow_datasets as tfds  # noqa: PLC0415
  src = tempfile.mkdtemp()
  files = {}
  for split, lines in NQ_LINES.items():
    files[split] = os.path.join(src, f"NQ-open.{split}.jsonl")
    with open(files[split], "w") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines)

  def download(self, urls):   # the builder asks for the train and dev files of NQ-open
    return {k: files["dev" if url.endswith("dev.jsonl") else "train"] for k, url in urls.items()}

  # etils' resource helper wants the `importlib_resources` backport, which Python 3.11's
  # importlib.resources replaces; only preparing needs it, reading does not. (Not
  # mock.patch.dict: on exit it would drop every module imported inside, TensorFlow's too.)
  added = sys.modules.setdefault("importlib_resources", importlib.resources) is importlib.resources
  try:
    with mock.patch.object(tfds.download.DownloadManager, "download", download):
      tfds.builder(tfds_qa.NQ_OPEN, data_dir=data_dir).download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  finally:
    if added:
      del sys.modules["importlib_resources"]


class RecordTest(absltest.TestCase):

  def test_nq_open_record(self):
    record = {"question": b"who wrote hamlet",
              "answer": np.array([b"Shakespeare", b"", b"W. Shakespeare", b"Shakespeare"],
                                 dtype=object)}
    self.assertEqual(tfds_qa.record_to_example(record, default_id="nq-3"),
                     QAExample("nq-3", "who wrote hamlet", ("Shakespeare", "W. Shakespeare")))

  def test_trivia_qa_record(self):
    record = {"question": b"Which city hosts the Louvre?", "question_id": b"tc_42",
              "question_source": b"http://x",
              "answer": {"value": b"Paris", "aliases": np.array([b"Paris", b"Paree", b"City of Light"]),
                         "normalized_aliases": np.array([b"paris"]), "type": b"WikipediaEntity",
                         "normalized_value": b"paris", "matched_wiki_entity_name": b"",
                         "normalized_matched_wiki_entity_name": b""}}
    self.assertEqual(tfds_qa.record_to_example(record, default_id="x"),
                     QAExample("tc_42", "Which city hosts the Louvre?",
                               ("Paris", "Paree", "City of Light")))

  def test_web_questions_record(self):
    record = {"question": b"what is x?", "answers": np.array([b"y"]), "url": b"u"}
    self.assertEqual(tfds_qa.record_to_example(record, default_id="w").answers, ("y",))

  def test_records_without_answers_raise(self):
    with self.assertRaisesRegex(ValueError, "has no answer"):   # TriviaQA's test split
      tfds_qa.record_to_example({"question": b"q", "answer": {"value": b"", "aliases": []}},
                                default_id="x")
    with self.assertRaisesRegex(ValueError, "no 'answer' or 'answers'"):
      tfds_qa.record_to_example({"question": b"q"}, default_id="x")
    with self.assertRaisesRegex(ValueError, "no 'question'"):
      tfds_qa.record_to_example({"answer": [b"a"]}, default_id="x")


class LoadTest(absltest.TestCase):

  def test_not_prepared_names_the_directory_and_the_fix(self):
    data_dir = tempfile.mkdtemp()
    for name in (tfds_qa.NQ_OPEN, tfds_qa.TRIVIA_QA):
      with self.assertRaises(tfds_qa.TFDSNotPreparedError) as ctx:
        tfds_qa.load_tfds_qa(name, "train", data_dir)
      message = str(ctx.exception)
      self.assertIn(f"data_dir={data_dir!r}", message)
      self.assertIn(f"tfds build {name} --data_dir=DIR", message)
      self.assertIn(os.path.join(data_dir, name.split("/")[0]), message)

  def test_unknown_dataset(self):
    with self.assertRaisesRegex(ValueError, "unknown TFDS dataset 'no_such_qa'"):
      tfds_qa.load_tfds_qa("no_such_qa", "train", tempfile.mkdtemp())

  def test_reads_a_prepared_dataset(self):
    data_dir = tempfile.mkdtemp()
    prepare_fake_nq_open(data_dir)
    train = tfds_qa.load_tfds_qa(tfds_qa.NQ_OPEN, "train", data_dir)
    # TFDS shuffles examples when it prepares them: compare as sets.
    expected = {("who wrote hamlet", ("Shakespeare", "William Shakespeare")),
                ("capital of france", ("Paris",)), ("largest ocean", ("Pacific",))}
    self.assertEqual({(e.question, e.answers) for e in train}, expected)
    self.assertEqual(sorted(e.qid for e in train),
                     [f"{tfds_qa.NQ_OPEN}-train-{i}" for i in range(3)])
    dev = tfds_qa.load_tfds_qa(tfds_qa.NQ_OPEN, "validation", data_dir)
    self.assertEqual(dev, (QAExample(f"{tfds_qa.NQ_OPEN}-validation-0",
                                     "when did the berlin wall fall", ("1989",)),))
    self.assertLen(tfds_qa.load_tfds_qa(tfds_qa.NQ_OPEN, "train", data_dir, max_questions=2), 2)
    # What DataConfig.qa_* = "tfds:NAME:SPLIT" reads.
    from jaxsearch.programs.search_agent.experiment import load_split  # noqa: PLC0415
    self.assertEqual(load_split(f"tfds:{tfds_qa.NQ_OPEN}:validation", tfds_data_dir=data_dir), dev)
    with self.assertRaisesRegex(ValueError, r"has no split 'test'; it has \['train', 'validation'\]"):
      tfds_qa.load_tfds_qa(tfds_qa.NQ_OPEN, "test", data_dir)


if __name__ == "__main__":
  absltest.main()
