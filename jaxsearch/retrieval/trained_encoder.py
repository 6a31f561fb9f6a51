"""Reading back the encoder of a dense-retriever workdir (`jaxsearch.programs.dense_retriever`).

The workdir files this module reads (the program writes them under these names):

  dense_config.json     the run's resolved `DenseRetrieverConfig` (read here as plain JSON:
                        `query_max_length`, `doc_max_length`)
  encoder_config.json   the encoder's `EncoderConfig` (vocabulary size resolved)
  tokenizer.json        the WordPiece tokenizer (HF `tokenizers` format)
  checkpoints/dense     orbax checkpoints {params, opt_state, step}; only `params` is used

Example:
  >>> encode = load_text_encoder("runs/dense")                               # doctest: +SKIP
  >>> retriever = build_retriever("exact", corpus, encoder=encode)           # doctest: +SKIP
"""
from __future__ import annotations

import json
import os

from jaxsearch.checkpoint import Checkpointer
from jaxsearch.config_files import config_from_dict, read_config_dict
from jaxsearch.data.wordpiece import WordPieceTokenizer
from jaxsearch.models.encoder import EncoderConfig
from jaxsearch.retrieval.text_encoder import TextEncoder, make_text_encoder
from jaxsearch.types import PyTree

CONFIG_FILE = "dense_config.json"
ENCODER_CONFIG_FILE = "encoder_config.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_DIR = os.path.join("checkpoints", "dense")
WHAT = "a dense-retriever workdir"


def load_encoder(workdir: str, step: int | None = None
                 ) -> tuple[EncoderConfig, PyTree, WordPieceTokenizer]:
  """`(encoder config, trained params, query tokenizer)` of a dense-retriever workdir.

  Args:
    workdir: the workdir of a `jaxsearch.programs.dense_retriever.run`.
    step: the checkpoint step (default: the latest).

  Raises:
    FileNotFoundError: not a dense-retriever workdir, or no checkpoint in it.
  """
  import tokenizers  # noqa: PLC0415
  config = read_config_dict(workdir, CONFIG_FILE, WHAT)
  with open(os.path.join(workdir, ENCODER_CONFIG_FILE)) as f:
    enc_config = config_from_dict(EncoderConfig, json.load(f))
  tok = WordPieceTokenizer(tokenizers.Tokenizer.from_file(os.path.join(workdir, TOKENIZER_FILE)),
                           max_length=max(config["query_max_length"], config["doc_max_length"]))
  ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR))
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no dense-retriever checkpoint in {workdir}")
  # The checkpoint also holds the optimizer state, whose structure depends on the training
  # program's optimizer; it is restored as saved (no target) and dropped.
  tree, _ = ckpt.restore(step, None)
  ckpt.close()
  return enc_config, tree["params"], tok


def load_text_encoder(workdir: str, *, batch_size: int = 64, step: int | None = None
                      ) -> TextEncoder:
  """The trained encoder as texts -> [n, D] float32 (a `TextEncoder`), for
  `build_retriever("exact", corpus, encoder=...)`.

  Example:
    >>> encode = load_text_encoder("runs/dense")                             # doctest: +SKIP
    >>> retriever = build_retriever("exact", corpus, encoder=encode)         # doctest: +SKIP
  """
  enc_config, params, tok = load_encoder(workdir, step)
  return make_text_encoder(enc_config, params, tok, batch_size=batch_size)
