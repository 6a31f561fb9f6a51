"""What every jaxsearch tokenizer shares: the search tags and the `to_bytes` headers.

`jaxsearch.data.tokenizer` (byte, sentencepiece) and `jaxsearch.data.bpe` (byte-level BPE)
both map each tag of `TAGS` to one id, and each tokenizer's `to_bytes` starts with its header
so `jaxsearch.data.tokenizer.tokenizer_from_bytes` can dispatch on it. Kept here, below both
modules, so neither imports the other for them (the tokenizer module imports bpe, never the
reverse).
"""
from __future__ import annotations

TAGS = ("<search>", "</search>", "<information>", "</information>", "<answer>", "</answer>",
        "<think>", "</think>")

BYTE_HEADER = b"jaxsearch-tokenizer:byte:v1\n"
SP_HEADER = b"jaxsearch-tokenizer:sentencepiece:v1\n"
BPE_HEADER = b"jaxsearch-tokenizer:bpe:v1\n"  # jaxsearch.data.bpe.ByteLevelBPETokenizer
