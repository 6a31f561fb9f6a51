"""Tokenizers that need no download: raw bytes, or a BPE trained in memory.

Both map each tag of `TAGS` to one id, so a policy emits `<search>` as a single token and
the rollout can find it with one comparison.

`ByteTokenizer` (267 ids) is lossless on any UTF-8 text. `SentencePieceTokenizer` is a
sentencepiece BPE trained on the caller's texts in a fraction of a second (byte fallback,
so it is lossless too), about 4x shorter sequences than bytes on the embedded world.

Whitespace with `SentencePieceTokenizer` (sentencepiece's "▁" marks a space before a word):
  * `encode(s)` prepends one space to `s` before segmenting it ("dummy prefix") and
    `decode` removes it again, so `decode(encode(s)) == s` for every string, including
    `decode(encode(" x")) == " x"` (pieces "▁", "▁", "x") and repeated spaces.
  * Segmentation never crosses a space and punctuation never merges with letters, so an
    entity name encodes alone to exactly the ids it has inside a sentence after a space
    (or at the very start): `encode("Mira Tolven")` is a contiguous run of
    `encode("... born in Mira Tolven.")`. After a newline, a quote or a tag there is no
    "▁" and the first word's ids differ: `encode("<search>Mira Tolven</search>")` gives
    "▁", "<search>", "Mira", "▁Tolven", "</search>". To build a search call whose query
    ids match the corpus, concatenate `[tag_id("<search>")] + encode(query) +
    [tag_id("</search>")]`; to index passages, encode `Document.text` (not the Search-R1
    `contents`, whose text starts after a newline).
  * Concatenated encodings decode with a space between them:
    `decode(encode("a") + encode("b")) == "a b"`.

Example:
  >>> tok = SentencePieceTokenizer.train(["Mira Tolven is a baker."] * 10, vocab_size=300)
  >>> tok.decode(tok.encode("<search>Mira Tolven</search>"))
  '<search>Mira Tolven</search>'
  >>> tokenizer_from_bytes(tok.to_bytes()).encode("baker") == tok.encode("baker")
  True
"""
from __future__ import annotations

import io
import os
import re
from typing import Iterable, Protocol, Sequence, runtime_checkable

import sentencepiece as spm

from jaxsearch.data.tokenizer_format import BPE_HEADER as _BPE_HEADER
from jaxsearch.data.tokenizer_format import BYTE_HEADER as _BYTE_HEADER
from jaxsearch.data.tokenizer_format import SP_HEADER as _SP_HEADER
from jaxsearch.data.tokenizer_format import TAGS

_TAG_RE = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")


def _unknown_tag(tag: str) -> ValueError:
  return ValueError(f"unknown tag {tag!r}; known tags: {list(TAGS)}")


@runtime_checkable
class Tokenizer(Protocol):
  """Text <-> token ids. Ids are plain Python ints; no bos/eos is added by `encode`."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    """Ids of `text`; every tag of `TAGS` in it becomes its single id."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, skipping pad/bos/eos; tag ids decode to the tag text."""

  def tag_id(self, tag: str) -> int:
    """The single id of a tag of `TAGS`; ValueError for anything else."""

  def to_bytes(self) -> bytes:
    """A serialization that `tokenizer_from_bytes` reads back."""


class ByteTokenizer:
  """UTF-8 bytes as tokens: pad=0, bos=1, eos=2, the 8 `TAGS` (3..10), then bytes 11..266.

  Lossless on any text. Invalid UTF-8 (e.g. a sampled partial character) decodes to U+FFFD.

  Example:
    >>> tok = ByteTokenizer()
    >>> tok.encode("<answer>A</answer>")
    [7, 76, 8]
  """

  pad_id = 0
  bos_id = 1
  eos_id = 2
  _offset = 3 + len(TAGS)
  vocab_size = _offset + 256

  def encode(self, text: str) -> list[int]:
    ids = []
    for i, part in enumerate(_TAG_RE.split(text)):
      if i % 2:
        ids.append(3 + TAGS.index(part))
      else:
        ids.extend(b + self._offset for b in part.encode("utf-8"))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    out, buf = [], bytearray()
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
      if i >= self._offset:
        buf.append(i - self._offset)
      elif i >= 3:
        out.append(buf.decode("utf-8", errors="replace"))
        buf.clear()
        out.append(TAGS[i - 3])
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)

  def tag_id(self, tag: str) -> int:
    if tag not in TAGS:
      raise _unknown_tag(tag)
    return 3 + TAGS.index(tag)

  def to_bytes(self) -> bytes:
    return _BYTE_HEADER

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "wb") as f:
      f.write(self.to_bytes())

  @classmethod
  def load(cls, path: str | os.PathLike) -> ByteTokenizer:
    tok = load_tokenizer(path)
    if not isinstance(tok, cls):
      raise ValueError(f"{path} holds a {type(tok).__name__}, not a ByteTokenizer")
    return tok

  def __eq__(self, other) -> bool:
    return isinstance(other, ByteTokenizer)

  def __hash__(self) -> int:
    return hash(ByteTokenizer)


class SentencePieceTokenizer:
  """A sentencepiece BPE model: pad=0, unk=1 (never produced), bos=2, eos=3, tags 4..11.

  Build one with `train`, or read a serialized model with `from_bytes` / `load`.
  See the module docstring for how spaces and entity names are segmented.
  """

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.vocab_size = int(self._sp.get_piece_size())
    self.pad_id = int(self._sp.pad_id())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    if min(self.pad_id, self.bos_id, self.eos_id) < 0:
      raise ValueError("the sentencepiece model must define pad, bos and eos ids, got "
                       f"pad={self.pad_id} bos={self.bos_id} eos={self.eos_id}")
    self._tag_ids = {t: int(self._sp.piece_to_id(t)) for t in TAGS}
    missing = [t for t, i in self._tag_ids.items()
               if i == self._sp.unk_id() or self._sp.id_to_piece(i) != t]
    if missing:
      raise ValueError(f"the sentencepiece model lacks the tags {missing} as pieces; train "
                       "it with SentencePieceTokenizer.train")
    self._special = frozenset((self.pad_id, self.bos_id, self.eos_id))

  @classmethod
  def train(cls, texts: Iterable[str], *, vocab_size: int = 1024,
            seed: int = 0) -> SentencePieceTokenizer:
    """Trains a BPE model in memory.

    Training is deterministic: the same texts in the same order give byte-identical models
    (one thread, no sentence sampling or shuffling).

    Args:
      texts: Training sentences (e.g. `World.texts()`); newlines inside a text are kept.
      vocab_size: Target vocabulary size, counting the 4 specials, the 8 tags and the 256
        byte-fallback pieces. It is an upper bound: a small corpus runs out of merges
        earlier (`hard_vocab_limit=False`), and `vocab_size` then reports the real size.
      seed: Seeds sentencepiece's (process-global) random generator; BPE training with
        these options draws nothing from it, so it is there for reproducibility only.

    Returns:
      The trained tokenizer.
    """
    min_size = 4 + len(TAGS) + 256 + 1
    if vocab_size < min_size:
      raise ValueError(f"vocab_size must be >= {min_size} (specials, tags, 256 byte pieces "
                       f"and at least one merge), got {vocab_size}")
    texts = [str(t) for t in texts if t]
    if not texts:
      raise ValueError("texts must contain at least one non-empty string")
    spm.set_random_generator_seed(int(seed))
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=writer,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        byte_fallback=True, user_defined_symbols=list(TAGS),
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, max_sentence_length=1 << 16, minloglevel=2)
    return cls(writer.getvalue())

  @classmethod
  def from_bytes(cls, model_proto: bytes) -> SentencePieceTokenizer:
    """Reads a serialized sentencepiece ModelProto (with or without the `to_bytes` header)."""
    model_proto = bytes(model_proto)
    if model_proto.startswith(_SP_HEADER):
      model_proto = model_proto[len(_SP_HEADER):]
    return cls(model_proto)

  @property
  def model_proto(self) -> bytes:
    """The raw sentencepiece model (what `spm.SentencePieceProcessor` reads)."""
    return self._proto

  def to_bytes(self) -> bytes:
    return _SP_HEADER + self._proto

  def save(self, path: str | os.PathLike) -> None:
    """Writes the raw sentencepiece `.model` file (readable by sentencepiece itself)."""
    with open(path, "wb") as f:
      f.write(self._proto)

  @classmethod
  def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
    with open(path, "rb") as f:
      return cls.from_bytes(f.read())

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    kept = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
      if i not in self._special:
        kept.append(i)
    return self._sp.decode(kept)

  def tag_id(self, tag: str) -> int:
    if tag not in self._tag_ids:
      raise _unknown_tag(tag)
    return self._tag_ids[tag]

  def id_to_piece(self, i: int) -> str:
    """The piece of id `i` (e.g. "▁Tol"), for debugging."""
    return self._sp.id_to_piece(int(i))

  def __eq__(self, other) -> bool:
    return isinstance(other, SentencePieceTokenizer) and other._proto == self._proto

  def __hash__(self) -> int:
    return hash(self._proto)


def tokenizer_from_bytes(data: bytes) -> Tokenizer:
  """Reads back the output of any tokenizer's `to_bytes`, dispatching on its header."""
  data = bytes(data)
  if data == _BYTE_HEADER:
    return ByteTokenizer()
  if data.startswith(_SP_HEADER):
    return SentencePieceTokenizer.from_bytes(data)
  if data.startswith(_BPE_HEADER):
    from jaxsearch.data.bpe import ByteLevelBPETokenizer  # noqa: PLC0415 (HF tokenizers)
    return ByteLevelBPETokenizer.from_bytes(data)
  raise ValueError(f"unrecognised tokenizer bytes starting with {data[:40]!r}; expected a "
                   f"header {_BYTE_HEADER!r} or {_SP_HEADER!r}")


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
  """Writes `tokenizer.to_bytes()` to `path` (read it back with `load_tokenizer`)."""
  with open(path, "wb") as f:
    f.write(tokenizer.to_bytes())


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Reads a file written by `save_tokenizer` (or a raw sentencepiece `.model` file)."""
  with open(path, "rb") as f:
    data = f.read()
  if data.startswith((_BYTE_HEADER, _SP_HEADER, _BPE_HEADER)):
    return tokenizer_from_bytes(data)
  return SentencePieceTokenizer.from_bytes(data)
