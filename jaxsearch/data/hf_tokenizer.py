"""Tokenizers of local Hugging Face checkpoint directories (`tokenizer.json` and friends).

`load_hf_tokenizer(directory)` turns the tokenizer files of a checkpoint directory into a
`jaxsearch.data.bpe.ByteLevelBPETokenizer`:

- `tokenizer.json` (required) is the backend, loaded with `tokenizers.Tokenizer.from_file`,
  so its model, normalizer, pre-tokenizer, added tokens and decoder are used as declared.
  `encode` never adds bos/eos (the template or the caller does), like transformers'
  `encode(text, add_special_tokens=False)`.
- `tokenizer_config.json` (required) gives `bos_token`, `eos_token` and `pad_token` (each a
  string, a dict with "content", or null), each resolved to its id in the backend's
  vocabulary, and the chat template (`chat_template.jinja` in the directory wins over the
  config's `chat_template`, see `jaxsearch.data.chat_template.chat_template_from_config`).
- `generation_config.json` (optional) `eos_token_id` (an int or a list) gives every stop id:
  `eos_ids` = (eos_id, then the others in order).

Ids: eos_id is `eos_token`'s id (or, without one, the first generation eos id); pad_id is
`pad_token`'s id, else eos_id. A checkpoint without a bos token (Qwen) gets bos_id = pad_id
(a jaxsearch tokenizer always has a bos id; `decode` skips it like pad) while `bos_token`
stays None, so the chat template sees no `bos_token` (as in transformers).

`add_tags=True` appends the search tags of `TAGS` missing from the vocabulary as special
tokens (ids V, V+1, ... with V the backend's size), as `ByteLevelBPETokenizer.from_vocab`
does; the model's embedding must grow to match (a checkpoint whose embedding has more rows
than its tokenizer has ids, like Qwen's, already holds rows V, V+1, ...).

Example:
  >>> tok = load_hf_tokenizer("/ckpt/Qwen2.5-0.5B-Instruct")          # doctest: +SKIP
  >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])      # doctest: +SKIP
"""
from __future__ import annotations

import json
import os

import tokenizers
from tokenizers import AddedToken

from jaxsearch.data.bpe import ByteLevelBPETokenizer
from jaxsearch.data.chat_template import chat_template_from_config
from jaxsearch.data.tokenizer_format import TAGS

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
  return value


def _special_token(config: dict, field: str, backend: tokenizers.Tokenizer,
                   config_path: str) -> tuple[str | None, int | None]:
  """(content, id) of the special token `config[field]`, or (None, None) if unset."""
  value = config.get(field)
  if isinstance(value, dict):
    value = value.get("content")
    if not isinstance(value, str):
      raise ValueError(f"{config_path}: {field} must be a string or a dict with a string "
                       f"'content', got {config.get(field)!r}")
  if value is None:
    return None, None
  if not isinstance(value, str):
    raise ValueError(f"{config_path}: {field} must be a string, a dict with 'content', or "
                     f"null, got {value!r}")
  i = backend.token_to_id(value)
  if i is None:
    raise ValueError(f"{config_path}: {field} {value!r} is not in the vocabulary of "
                     f"{TOKENIZER_FILE}")
  return value, int(i)


def _generation_eos_ids(path: str, vocab_size: int) -> list[int]:
  if not os.path.isfile(path):
    return []
  value = _read_json(path).get("eos_token_id")
  if value is None:
    return []
  ids = [value] if isinstance(value, int) else value
  if not isinstance(ids, list) or not all(
      isinstance(i, int) and not isinstance(i, bool) for i in ids):
    raise ValueError(f"{path}: eos_token_id must be an int or a list of ints, got {value!r}")
  for i in ids:
    if not 0 <= i < vocab_size:
      raise ValueError(f"{path}: eos_token_id {i} is not an id of {TOKENIZER_FILE} "
                       f"(vocabulary size {vocab_size})")
  return ids


def load_hf_tokenizer(directory: str | os.PathLike, *,
                      add_tags: bool = False) -> ByteLevelBPETokenizer:
  """The tokenizer of a local Hugging Face checkpoint directory (see the module docstring).

  Args:
    directory: a folder with `tokenizer.json` and `tokenizer_config.json` (and optionally
      `generation_config.json`, `chat_template.jinja`).
    add_tags: append the search tags of `TAGS` missing from the vocabulary as special tokens
      (ids V, V+1, ... in `TAGS` order, V = the backend's vocabulary size); a tag that is
      already an added token (Qwen3's `<think>`) keeps its id.

  Returns:
    A `ByteLevelBPETokenizer` whose `apply_chat_template` / `chat_text` match transformers'
    `AutoTokenizer.from_pretrained(directory).apply_chat_template`.

  Raises:
    FileNotFoundError: `directory` is not a folder, or has no `tokenizer.json` or no
      `tokenizer_config.json`.
    ValueError: a file is not valid; a bos/eos/pad token is not in the vocabulary; no eos
      token is declared anywhere (the message names the file and field).

  Example:
    >>> tok = load_hf_tokenizer("/ckpt/Llama-3.2-1B-Instruct")   # doctest: +SKIP
    >>> tok.eos_ids                                               # doctest: +SKIP
    (128009, 128001, 128008)
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory!r} is not a directory (expected a Hugging Face "
                            "checkpoint folder with tokenizer.json)")
  tokenizer_path = os.path.join(directory, TOKENIZER_FILE)
  config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
  if not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(f"{directory!r} has no {TOKENIZER_FILE} (the Hugging Face "
                            "`tokenizers` serialization this loader needs)")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{directory!r} has no {TOKENIZER_CONFIG_FILE} (needed for "
                            "bos_token / eos_token / pad_token and the chat template)")
  try:
    backend = tokenizers.Tokenizer.from_file(tokenizer_path)
  except Exception as e:  # tokenizers raises its own Exception type
    raise ValueError(f"{tokenizer_path} is not a valid `tokenizers` file: {e}") from e
  config = _read_json(config_path)

  bos_token, bos_id = _special_token(config, "bos_token", backend, config_path)
  eos_token, eos_id = _special_token(config, "eos_token", backend, config_path)
  _, pad_id = _special_token(config, "pad_token", backend, config_path)
  base_vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
  generation_path = os.path.join(directory, GENERATION_CONFIG_FILE)
  eos_ids = _generation_eos_ids(generation_path, base_vocab_size)
  if eos_id is None:
    if not eos_ids:
      raise ValueError(f"{config_path}: no eos_token (and no eos_token_id in "
                       f"{generation_path}); a tokenizer needs an end-of-sequence token")
    eos_id = eos_ids[0]
  if pad_id is None:
    pad_id = eos_id
  if bos_id is None:
    bos_id = pad_id  # no bos (Qwen): bos_token stays None for the template.
  chat_template = chat_template_from_config(config, directory)

  if add_tags:  # a tag already in the vocabulary keeps its id but is matched whole in text
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TAGS
                                if t not in added])
  return ByteLevelBPETokenizer(
      backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, base_vocab_size=base_vocab_size,
      system_prompt=None, chat_template=chat_template, eos_ids=eos_ids, bos_token=bos_token,
      eos_token=eos_token)
