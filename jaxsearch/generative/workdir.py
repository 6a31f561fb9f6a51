"""Reading back a DSI workdir (`jaxsearch.programs.generative_retrieval`): the trained model,
its tokenizer, docIDs and vocabulary layout, without importing the training program.

The workdir files this module reads (the program writes them under these names):

  dsi_config.json       the run's resolved `DSIConfig` (read here as plain JSON)
  model_config.json     the DSI `TransformerConfig` (vocabulary size resolved)
  tokenizer.model       the sentencepiece tokenizer of queries and documents
  docids.npz            the docIDs (`save_docids` / `load_docids`) and their document ids
  checkpoints/{dsi,ddro}  orbax checkpoints {params, opt_state, step}; only `params` is used

Example:
  >>> model, params, tok, docids, layout = load_model("runs/dsi_world")     # doctest: +SKIP
  >>> _, doc_ids = load_docids("runs/dsi_world")                           # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from jaxsearch.checkpoint import Checkpointer
from jaxsearch.config_files import config_from_dict, read_config_dict
from jaxsearch.data.tokenizer import SentencePieceTokenizer
from jaxsearch.generative import docids as docids_lib
from jaxsearch.generative import dsi
from jaxsearch.models.transformer import Transformer, TransformerConfig
from jaxsearch.types import PyTree

CONFIG_FILE = "dsi_config.json"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.model"
DOCIDS_FILE = "docids.npz"
WHAT = "a DSI workdir"


def checkpoint_dir(workdir: str, phase: str) -> str:
  """The orbax directory of a training stage ("qgen", "dsi", "ddro")."""
  return os.path.join(workdir, "checkpoints", phase)


def read_config(workdir: str) -> dict[str, Any]:
  """The workdir's `DSIConfig` as the JSON object it was saved as (FileNotFoundError if the
  workdir has none)."""
  return read_config_dict(workdir, CONFIG_FILE, WHAT)


def save_docids(path: str, docids: docids_lib.DocIds, doc_ids: Sequence[str]) -> None:
  """Writes `docids` and the document id of each row to `path` (a .npz, atomically)."""
  tmp = path + ".tmp.npz"
  np.savez(tmp, codes=docids.codes, lengths=docids.lengths, num_codes=docids.num_codes,
           kind=docids.kind, doc_ids=np.array(doc_ids))
  os.replace(tmp, path)


def load_docids(workdir: str) -> tuple[docids_lib.DocIds, list[str]]:
  """`(docids, doc ids)` saved in a DSI workdir."""
  with np.load(os.path.join(workdir, DOCIDS_FILE), allow_pickle=False) as f:
    return (docids_lib.DocIds(codes=f["codes"], lengths=f["lengths"],
                              num_codes=int(f["num_codes"]), kind=str(f["kind"])),
            f["doc_ids"].tolist())


def load_model(workdir: str, phase: str | None = None
               ) -> tuple[Transformer, PyTree, SentencePieceTokenizer, docids_lib.DocIds,
                          dsi.DSILayout]:
  """`(model, params, tokenizer, docids, layout)` of a DSI workdir: the DDRO stage's latest
  parameters if it ran, else the DSI stage's (or the `phase` named: "dsi" / "ddro").

  Example:
    >>> model, params, tok, ids, layout = load_model("runs/dsi_world")      # doctest: +SKIP
    >>> prompts, mask = dsi.prompt_batch([tok.encode("Who is Mira?")], layout,
    ...                                  max_input_tokens=32)               # doctest: +SKIP
  """
  read_config(workdir)
  tokenizer = SentencePieceTokenizer.load(os.path.join(workdir, TOKENIZER_FILE))
  docids, _ = load_docids(workdir)
  with open(os.path.join(workdir, MODEL_CONFIG_FILE)) as f:
    model_config = config_from_dict(TransformerConfig, json.load(f))
  model = Transformer(model_config)
  layout = dsi.DSILayout(code_offset=tokenizer.vocab_size, num_codes=int(docids.num_codes),
                         sep_id=tokenizer.bos_id, pad_id=tokenizer.pad_id)
  phases = [phase] if phase else ["ddro", "dsi"]
  for name in phases:
    ckpt = Checkpointer(checkpoint_dir(workdir, name))
    step = ckpt.latest_step()
    if step is None:
      ckpt.close()
      continue
    # The checkpoint also holds the optimizer state, whose structure depends on the training
    # program's optimizer; it is restored as saved (no target) and dropped.
    tree, _ = ckpt.restore(step, None)
    ckpt.close()
    return model, tree["params"], tokenizer, docids, layout
  raise FileNotFoundError(f"no {' or '.join(phases)} checkpoint in {workdir}")


def load_max_input_tokens(workdir: str) -> int:
  """The `DSIConfig.max_input_tokens` the workdir's model was trained with."""
  return int(read_config(workdir)["max_input_tokens"])
