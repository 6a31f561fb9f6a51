"""Byte-level BPE tokenizers (GPT-2 family) of pretrained checkpoints, backed by `tokenizers`.

Two sources:
  * a token list plus merge rules, e.g. the metadata of a GGUF file (`tokenizer.ggml.tokens` /
    `merges` / `token_type`): `ByteLevelBPETokenizer.from_vocab`;
  * a Hugging Face checkpoint directory's `tokenizer.json` (whatever normalizer,
    pre-tokenizer and decoder it declares) with its `tokenizer_config.json` and
    `generation_config.json`: `jaxsearch.data.hf_tokenizer.load_hf_tokenizer`.

Chat: `chat_text` / `apply_chat_template` render the checkpoint's own Jinja chat template
(GGUF `tokenizer.chat_template`, HF `chat_template.jinja` / `tokenizer_config.json`) with
`jaxsearch.data.chat_template.render_chat_template`, exactly as transformers does; only a
tokenizer without a template falls back to plain ChatML.

Encoding of a GGUF vocabulary, as llama.cpp and the model's own `tokenizer.json` do it:
  1. Added tokens (the vocabulary's control tokens such as `<|im_start|>`, and the search
     tags when `add_tags=True`) are matched in the raw text first and become one id each.
  2. The rest is pre-tokenized. For the "smollm" pre-tokenizer (llama.cpp's name; also
     StarCoder's) every digit is split off alone (`\\p{N}`, `Digits(individual_digits=True)`),
     then GPT-2's regex splits words:
     `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`.
     So "in 2024" is "in", " ", "2", "0", "2", "4": numbers never merge, and a space before
     a digit is a token of its own.
  3. Each piece's UTF-8 bytes are spelled in GPT-2's byte alphabet (space is "Ġ") and merged
     by rank. Every byte is in the vocabulary, so `decode(encode(s)) == s` for any string.

Search tags: the tags of `TAGS` (`<search>`, `</search>`, ...) are not single tokens of a
pretrained vocabulary. `add_tags=True` appends them as special tokens after the original
vocabulary (ids V, V+1, ... in `TAGS` order) so an agent emits each as one id; the model's
embedding must grow to match (see `jaxsearch.models.gguf.load_gguf(add_tags=True)`).

`decode` drops pad/bos/eos (for SmolLM2: `<|im_start|>` and `<|im_end|>`) unless
`skip_special=False`; every other id, tags, other control tokens and the extra stop ids of
`eos_ids` (e.g. Llama 3's `<|end_of_text|>`) included, decodes to its text.

Example:
  >>> tok = ByteLevelBPETokenizer.from_vocab(
  ...     ["<|im_start|>", "<|im_end|>", "a", "b", "Ġ", "1", "ab", "Ġab"],
  ...     ["a b", "Ġ ab"], token_types=[3, 3, 1, 1, 1, 1, 1, 1], bos_id=0, eos_id=1,
  ...     pad_id=1, add_tags=True)
  >>> tok.encode("ab ab11<search>")
  [6, 7, 5, 5, 8]
  >>> tok.decode([6, 7, 5, 5, 8])
  'ab ab11<search>'
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from jaxsearch.data.chat_template import render_chat_template
from jaxsearch.data.tokenizer_format import BPE_HEADER as HEADER
from jaxsearch.data.tokenizer_format import TAGS

# llama.cpp pre-tokenizer names whose regex list is ["\p{N}", GPT-2's regex] (llama-vocab.cpp).
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                    "minerva")
PRE_TOKENIZERS = ("gpt2",) + _DIGIT_SPLIT_PRE

_CONTROL = 3       # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined,
_USER_DEFINED = 4  # 5 unused, 6 byte.
_SYSTEM_RE = re.compile(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", re.DOTALL)


def _pre_tokenizer(pre: str):
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "gpt2":
    return byte_level
  if pre in _DIGIT_SPLIT_PRE:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  raise ValueError(f"unsupported pre-tokenizer {pre!r}; supported: {list(PRE_TOKENIZERS)}")


def default_system_prompt(chat_template: str | None) -> str | None:
  """The system prompt a ChatML chat template inserts when the first message is not a system one.

  Args:
    chat_template: a Jinja chat template (e.g. GGUF's `tokenizer.chat_template`) or None.

  Returns:
    The text between `<|im_start|>system\\n` and `<|im_end|>`, or None if there is none.

  Example:
    >>> default_system_prompt("{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}")
    'Be brief.'
  """
  if not chat_template:
    return None
  match = _SYSTEM_RE.search(chat_template)
  return match.group(1) if match else None


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves,
  the other 68 bytes for the characters from U+0100 on, in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  out, extra = {}, 0
  for b in range(256):
    if b in printable:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return out


class ByteLevelBPETokenizer:
  """A byte-level BPE tokenizer satisfying jaxsearch's `Tokenizer` protocol.

  Attributes:
    vocab_size: number of ids, the appended tags included.
    pad_id, bos_id, eos_id: special ids (SmolLM2: pad = eos = `<|im_end|>`, bos =
      `<|im_start|>`). A HF checkpoint without a bos token (Qwen) has bos_id = pad_id.
    eos_ids: every id that ends a generation, eos_id first (HF: `generation_config.json`'s
      `eos_token_id`, e.g. Llama 3's `<|eot_id|>` and `<|end_of_text|>`); default
      `(eos_id,)`.
    bos_token, eos_token: the special token strings a chat template sees as `bos_token` /
      `eos_token` (None: undefined in the template, e.g. Qwen's missing bos).
    base_vocab_size: V, the size of the original vocabulary (tags start at V).
    system_prompt: default system prompt of the ChatML fallback of `chat_text`, used only
      when there is no `chat_template` (None: none).
    chat_template: the checkpoint's Jinja chat template, or None.
    backend: the `tokenizers.Tokenizer` doing the work.

  Build one with `from_vocab` (or `jaxsearch.models.gguf.load_gguf`), from a HF checkpoint
  directory with `jaxsearch.data.hf_tokenizer.load_hf_tokenizer`, read one back with
  `from_bytes` / `load`.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int, eos_id: int, pad_id: int,
               base_vocab_size: int, system_prompt: str | None = None,
               chat_template: str | None = None, eos_ids: Sequence[int] | None = None,
               bos_token: str | None = None, eos_token: str | None = None):
    self.backend = backend
    self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
      if not 0 <= int(value) < self.vocab_size:
        raise ValueError(f"{name} must be in [0, {self.vocab_size}), got {value!r}")
    if not 0 < base_vocab_size <= self.vocab_size:
      raise ValueError(f"base_vocab_size must be in [1, {self.vocab_size}], got "
                       f"{base_vocab_size!r}")
    self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
    stops = [self.eos_id]
    for value in (eos_ids or ()):
      if not 0 <= int(value) < self.vocab_size:
        raise ValueError(f"eos_ids must be in [0, {self.vocab_size}), got {value!r} in "
                         f"{list(eos_ids)!r}")
      if int(value) not in stops:
        stops.append(int(value))
    self.eos_ids: tuple[int, ...] = tuple(stops)
    for name, value in (("bos_token", bos_token), ("eos_token", eos_token)):
      if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or None, got {value!r}")
    self.bos_token, self.eos_token = bos_token, eos_token
    self.base_vocab_size = int(base_vocab_size)
    self.system_prompt = system_prompt
    self.chat_template = chat_template
    self._tag_ids = {}
    for tag in TAGS:
      i = backend.token_to_id(tag)
      if i is not None and backend.id_to_token(i) == tag:
        self._tag_ids[tag] = int(i)
    self._skip = frozenset((self.pad_id, self.bos_id, self.eos_id))
    self._token_bytes: list[bytes] | None = None

  @classmethod
  def from_vocab(cls, tokens: Sequence[str], merges: Sequence[str | tuple[str, str]], *,
                 bos_id: int, eos_id: int, pad_id: int,
                 token_types: Sequence[int] | None = None, pre: str = "smollm",
                 chat_template: str | None = None,
                 add_tags: bool = False) -> ByteLevelBPETokenizer:
    """Builds the tokenizer from a token list and merge rules (llama.cpp's GGUF metadata).

    Args:
      tokens: [V] token strings in GPT-2's byte alphabet; id = position.
      merges: merge rules by rank, each "left right" or a (left, right) pair.
      bos_id, eos_id, pad_id: special ids.
      token_types: [V] llama.cpp token types; 3 (control) become special added tokens
        (matched whole in text), 4 (user-defined) plain added tokens. None: no added tokens.
      pre: the pre-tokenizer (GGUF `tokenizer.ggml.pre`), one of `PRE_TOKENIZERS`.
      chat_template: the model's Jinja chat template, rendered by `chat_text`.
      add_tags: append the `TAGS` missing from `tokens` as special tokens (ids V, V+1, ...).

    Returns:
      The tokenizer.

    Example:
      >>> tok = ByteLevelBPETokenizer.from_vocab(["a", "b", "ab"], ["a b"], bos_id=0,
      ...                                        eos_id=0, pad_id=0)
      >>> tok.encode("abab")
      [2, 2]
    """
    tokens = list(tokens)
    if not tokens:
      raise ValueError("tokens must not be empty")
    vocab = {}
    for i, t in enumerate(tokens):
      vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
      dup = next(t for i, t in enumerate(tokens) if vocab[t] != i)
      raise ValueError(f"tokens must be unique, got {dup!r} twice")
    pairs = []
    for m in merges:
      pair = tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
      if len(pair) != 2:
        raise ValueError(f"a merge must be two tokens separated by one space, got {m!r}")
      pairs.append(pair)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                              byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    if token_types is not None:
      token_types = [int(t) for t in token_types]
      if len(token_types) != len(tokens):
        raise ValueError(f"token_types must have one entry per token ({len(tokens)}), got "
                         f"{len(token_types)}")
      control = [AddedToken(t, special=True, normalized=False)
                 for t, k in zip(tokens, token_types) if k == _CONTROL]
      user = [AddedToken(t, special=False, normalized=False)
              for t, k in zip(tokens, token_types) if k == _USER_DEFINED]
      if control:
        backend.add_special_tokens(control)
      if user:
        backend.add_tokens(user)
    if add_tags:
      backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TAGS
                                  if t not in vocab])
    n = backend.get_vocab_size(with_added_tokens=True)
    bos_token, eos_token = (
        backend.decode([int(i)], skip_special_tokens=False) if 0 <= int(i) < n else None
        for i in (bos_id, eos_id))  # out of range: __init__ raises
    return cls(backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
               base_vocab_size=len(tokens), system_prompt=default_system_prompt(chat_template),
               chat_template=chat_template, bos_token=bos_token, eos_token=eos_token)

  # --- the Tokenizer protocol ---

  def encode(self, text: str) -> list[int]:
    """Ids of `text`; added tokens (control tokens, tags) in it become their single ids."""
    return list(self.backend.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
    """Text of `ids`; pad/bos/eos are dropped unless `skip_special=False`.

    Invalid UTF-8 (e.g. a sampled partial character) decodes to U+FFFD.
    """
    kept = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
      if not (skip_special and i in self._skip):
        kept.append(i)
    return self.backend.decode(kept, skip_special_tokens=False)

  def tag_id(self, tag: str) -> int:
    """The single id of a tag of `TAGS` (needs `add_tags=True` for a pretrained vocabulary)."""
    if tag not in TAGS:
      raise ValueError(f"unknown tag {tag!r}; known tags: {list(TAGS)}")
    if tag not in self._tag_ids:
      raise ValueError(f"tag {tag!r} is not a single token of this vocabulary; build the "
                       "tokenizer with add_tags=True")
    return self._tag_ids[tag]

  def to_bytes(self) -> bytes:
    """`HEADER` + JSON of the `tokenizers` serialization, special ids/tokens and template."""
    payload = {"tokenizer": json.loads(self.backend.to_str()), "bos_id": self.bos_id,
               "eos_id": self.eos_id, "pad_id": self.pad_id,
               "base_vocab_size": self.base_vocab_size, "system_prompt": self.system_prompt,
               "chat_template": self.chat_template, "eos_ids": list(self.eos_ids),
               "bos_token": self.bos_token, "eos_token": self.eos_token}
    return HEADER + json.dumps(payload, ensure_ascii=False).encode("utf-8")

  # --- extras ---

  @classmethod
  def from_bytes(cls, data: bytes) -> ByteLevelBPETokenizer:
    """Reads the output of `to_bytes` (payloads older than `eos_ids`/`bos_token`/`eos_token`
    read as `eos_ids=(eos_id,)` and no special token strings)."""
    data = bytes(data)
    if not data.startswith(HEADER):
      raise ValueError(f"not a byte-level BPE tokenizer: expected header {HEADER!r}, got "
                       f"{data[:len(HEADER)]!r}")
    payload = json.loads(data[len(HEADER):].decode("utf-8"))
    backend = tokenizers.Tokenizer.from_str(json.dumps(payload["tokenizer"]))
    return cls(backend, bos_id=payload["bos_id"], eos_id=payload["eos_id"],
               pad_id=payload["pad_id"], base_vocab_size=payload["base_vocab_size"],
               system_prompt=payload.get("system_prompt"),
               chat_template=payload.get("chat_template"), eos_ids=payload.get("eos_ids"),
               bos_token=payload.get("bos_token"), eos_token=payload.get("eos_token"))

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "wb") as f:
      f.write(self.to_bytes())

  @classmethod
  def load(cls, path: str | os.PathLike) -> ByteLevelBPETokenizer:
    with open(path, "rb") as f:
      return cls.from_bytes(f.read())

  def token_bytes(self) -> list[bytes]:
    """[vocab_size] the bytes each id stands for (the text protocol's tag detection).

    Byte-level vocabularies (GPT-2 / Llama 3 / Qwen / SmolLM2) spell bytes in GPT-2's byte
    alphabet ("Ġ" is a space); byte-fallback vocabularies (`<0x0A>`) and SentencePiece's
    "▁" are read too. An added token (`<|im_end|>`, a tag) is its UTF-8 text. Concatenating
    the bytes of a sequence's ids gives its UTF-8 text (without a normaliser's changes).

    Example:
      >>> tok = ByteLevelBPETokenizer.from_vocab(["a", "Ġ", "Ġa"], [], bos_id=0, eos_id=0,
      ...                                        pad_id=0)
      >>> tok.token_bytes()
      [b'a', b' ', b' a']
    """
    if self._token_bytes is None:
      alphabet = {c: b for b, c in _byte_alphabet().items()}
      byte_level = '"ByteLevel"' in self.backend.to_str()
      added = {t.content for t in self.backend.get_added_tokens_decoder().values()}
      out = []
      for i in range(self.vocab_size):
        token = self.backend.id_to_token(i)
        if token is None:
          out.append(b"")
        elif token in added:
          out.append(token.encode("utf-8"))
        elif byte_level and all(c in alphabet for c in token):
          out.append(bytes(alphabet[c] for c in token))
        elif _BYTE_FALLBACK.fullmatch(token):
          out.append(bytes([int(token[3:5], 16)]))
        else:
          out.append(token.replace("\u2581", " ").encode("utf-8"))
      self._token_bytes = out
    return list(self._token_bytes)

  def id_to_token(self, i: int) -> str:
    """The token string of id `i` in the byte alphabet (e.g. "Ġthe"), for debugging."""
    token = self.backend.id_to_token(int(i))
    if token is None:
      raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
    return token

  def token_to_id(self, token: str) -> int | None:
    """The id of a token string (byte alphabet), or None."""
    return self.backend.token_to_id(token)

  def chat_text(self, messages: Sequence[Mapping[str, Any]],
                add_generation_prompt: bool = True, **extra: Any) -> str:
    """Text of a conversation, rendered with the tokenizer's own chat template.

    With a `chat_template`, this is `render_chat_template(chat_template, messages,
    add_generation_prompt=..., bos_token=self.bos_token, eos_token=self.eos_token, **extra)`,
    i.e. transformers' `apply_chat_template(..., tokenize=False)`.

    Without one, plain ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message,
    preceded by `system_prompt` when the first message is not a system message (and
    `system_prompt` is set), followed by `<|im_start|>assistant\\n` if
    `add_generation_prompt`.

    Args:
      messages: mappings with "role" and "content".
      add_generation_prompt: open an assistant turn at the end.
      **extra: more template variables (`tools`, `enable_thinking`, `date_string`, ...);
        only with a chat template.

    Returns:
      The text, to be encoded without adding special tokens.

    Example:
      >>> tok.chat_text([{"role": "system", "content": "Be brief."}])  # doctest: +SKIP
      '<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>assistant\\n'
    """
    if self.chat_template:
      return render_chat_template(self.chat_template, messages,
                                  add_generation_prompt=add_generation_prompt,
                                  bos_token=self.bos_token, eos_token=self.eos_token, **extra)
    if extra:
      raise ValueError(f"template variables {sorted(extra)} need a chat template; this "
                       "tokenizer has none (chat_template is None)")
    for special in ("<|im_start|>", "<|im_end|>"):
      if self.backend.token_to_id(special) is None:
        raise ValueError(f"this vocabulary has no chat template and no ChatML token "
                         f"{special!r}")
    parts = []
    for n, m in enumerate(messages):
      if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
        raise ValueError(f"message {n} must be a mapping with 'role' and 'content', got "
                         f"{m!r:.200}")
      if n == 0 and m["role"] != "system" and self.system_prompt is not None:
        parts.append(f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n")
      parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
      parts.append("<|im_start|>assistant\n")
    return "".join(parts)

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True, **extra: Any) -> list[int]:
    """Ids of `chat_text(messages, add_generation_prompt, **extra)`.

    Like transformers, the rendered text is encoded without adding special tokens: a bos
    appears only if the template writes it (Llama 3's does, ChatML ones don't).

    Example:
      >>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
    """
    return self.encode(self.chat_text(messages, add_generation_prompt, **extra))

  def __eq__(self, other) -> bool:
    return isinstance(other, ByteLevelBPETokenizer) and other.to_bytes() == self.to_bytes()

  def __hash__(self) -> int:
    return hash(self.to_bytes())
