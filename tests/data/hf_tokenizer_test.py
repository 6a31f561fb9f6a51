"""Tests of jaxsearch.data.hf_tokenizer.load_hf_tokenizer against transformers' AutoTokenizer.

Each tiny directory of `hf_tokenizer_fixtures` (ChatML, Qwen3-style, Llama-3-style) is loaded
by jaxsearch and by `transformers.AutoTokenizer.from_pretrained`; chat ids, encodings and
decodings must agree.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import transformers
from absl.testing import absltest, parameterized

from jaxsearch.data import tokenizer as tokenizer_lib
from jaxsearch.data.bpe import HEADER, ByteLevelBPETokenizer
from jaxsearch.data.hf_tokenizer import load_hf_tokenizer
from jaxsearch.data.tokenizer_format import TAGS
from tests.data import hf_tokenizer_fixtures as fx

TEXTS = (
    "",
    "Hello world",
    "  leading and trailing  ",
    "digits 2024 and 3.14159 and 1,000,000",
    "naïve café, 東京タワー, emoji 🤖🚀 and ½ ²",
    "cafe\u0301 decomposed",                       # NFD: the qwen3 style normalizes it
    "tabs\tand\nnewlines\n\n   x!!!\n",
    "<|im_start|>user\nhi<|im_end|>\n",            # special tokens in the text
    "<|begin_of_text|><|start_header_id|>x<|end_header_id|><|eot_id|><|end_of_text|>",
    "<think>\nok\n</think>",
    "<|endoftext|>",
)

# style -> (bos, eos, pad) token strings (None: none), generation eos tokens
EXPECTED = {
    "chatml": ((None, "<|im_end|>", "<|endoftext|>"), ["<|im_end|>", "<|endoftext|>"]),
    "qwen3": ((None, "<|im_end|>", "<|endoftext|>"), ["<|im_end|>", "<|endoftext|>"]),
    "llama3": (("<|begin_of_text|>", "<|eot_id|>", None), ["<|eot_id|>", "<|end_of_text|>"]),
}


def hf_chat_ids(hf, messages, gen, **extra) -> list[int]:
  out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, **extra)
  ids = out["input_ids"] if hasattr(out, "keys") else out   # transformers 5: a BatchEncoding
  return [int(i) for i in ids]


def edit_json(path: str, **changes) -> None:
  with open(path, encoding="utf-8") as f:
    value = json.load(f)
  value.update(changes)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f)


def _chat_cases():
  for style in fx.STYLES:
    for name in fx.CONVERSATIONS:
      yield (f"{style}_{name}", style, name)


class MatchesTransformersTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dirs = {s: fx.write_tokenizer_dir(tempfile.mkdtemp(), s) for s in fx.STYLES}
    cls.hf = {s: transformers.AutoTokenizer.from_pretrained(d) for s, d in cls.dirs.items()}
    cls.ours = {s: load_hf_tokenizer(d) for s, d in cls.dirs.items()}

  @parameterized.named_parameters(*_chat_cases())
  def test_chat_ids(self, style, name):
    extra = {"date_string": "26 Jul 2024"} if style == "llama3" else {}
    messages = fx.CONVERSATIONS[name]
    for gen in (True, False):
      want = hf_chat_ids(self.hf[style], messages, gen, **extra)
      got = self.ours[style].apply_chat_template(messages, add_generation_prompt=gen, **extra)
      self.assertEqual(got, want)
      self.assertEqual(got, self.ours[style].encode(
          self.ours[style].chat_text(messages, add_generation_prompt=gen, **extra)))

  def test_chat_ids_with_template_variables(self):
    hf, ours = self.hf["qwen3"], self.ours["qwen3"]
    messages = fx.CONVERSATIONS["multi_turn"]
    for thinking in (False, True):
      self.assertEqual(ours.apply_chat_template(messages, enable_thinking=thinking),
                       hf_chat_ids(hf, messages, True, enable_thinking=thinking))
    self.assertEqual(
        self.ours["chatml"].apply_chat_template(fx.TOOL_CONVERSATION, tools=fx.TOOLS),
        hf_chat_ids(self.hf["chatml"], fx.TOOL_CONVERSATION, True, tools=fx.TOOLS))

  def test_chat_ids_hold_special_tokens_once(self):
    ids = self.ours["llama3"].apply_chat_template(fx.CONVERSATIONS["user"],
                                                  date_string="1 Jan 2025")
    tok = self.ours["llama3"]
    self.assertEqual(ids[0], tok.bos_id)                      # the template writes the bos
    self.assertEqual(ids.count(tok.bos_id), 1)               # and encode adds none
    self.assertEqual(ids.count(tok.eos_id), 2)               # system and user turns
    chatml = self.ours["chatml"]
    ids = chatml.apply_chat_template(fx.CONVERSATIONS["user"])
    start, end = chatml.token_to_id("<|im_start|>"), chatml.token_to_id("<|im_end|>")
    self.assertEqual([i for i in ids if i in (start, end)], [start, end, start, end, start])

  @parameterized.parameters(*fx.STYLES)
  def test_encode_decode(self, style):
    hf, ours = self.hf[style], self.ours[style]
    for text in TEXTS:
      ids = ours.encode(text)
      self.assertEqual(ids, hf.encode(text, add_special_tokens=False), text)
      self.assertEqual(ours.decode(ids, skip_special=False), hf.decode(ids), text)
    if style == "llama3":  # its post-processor adds a bos when asked to: `encode` never does
      self.assertEqual(hf.encode("Hello"), [ours.bos_id] + ours.encode("Hello"))

  def test_normalizer_and_pre_tokenizer_are_the_declared_ones(self):
    # qwen3 declares NFC: the decomposed "é" encodes like the composed one; chatml does not.
    qwen3, chatml = self.ours["qwen3"], self.ours["chatml"]
    self.assertEqual(qwen3.encode("cafe\u0301"), qwen3.encode("caf\u00e9"))
    self.assertNotEqual(chatml.encode("cafe\u0301"), chatml.encode("caf\u00e9"))
    self.assertEqual(qwen3.decode(qwen3.encode("cafe\u0301")), "caf\u00e9")
    for style in fx.STYLES:
      with open(os.path.join(self.dirs[style], "tokenizer.json"), encoding="utf-8") as f:
        declared = json.load(f)
      used = json.loads(self.ours[style].backend.to_str())
      for part in ("normalizer", "pre_tokenizer", "decoder", "model"):
        self.assertEqual(used[part], declared[part], (style, part))
    self.assertEqual(declared["pre_tokenizer"]["type"], "Sequence")   # llama3: regex split

  @parameterized.parameters(*fx.STYLES)
  def test_special_ids(self, style):
    (bos, eos, pad), stops = EXPECTED[style]
    hf, ours = self.hf[style], self.ours[style]
    self.assertEqual((ours.bos_token, ours.eos_token), (bos, eos))
    self.assertEqual(ours.eos_id, hf.convert_tokens_to_ids(eos))
    self.assertEqual(ours.eos_ids, tuple(hf.convert_tokens_to_ids(t) for t in stops))
    self.assertEqual(ours.eos_ids[0], ours.eos_id)
    self.assertEqual(ours.pad_id, hf.convert_tokens_to_ids(pad or eos))   # pad, else eos
    self.assertEqual(ours.bos_id, hf.convert_tokens_to_ids(bos) if bos else ours.pad_id)
    self.assertEqual(ours.vocab_size, len(hf))
    self.assertEqual(ours.base_vocab_size, len(hf))

  def test_decode_skips_pad_bos_eos_only(self):
    tok = self.ours["chatml"]
    ids = tok.encode("<|im_start|>a<|im_end|><|endoftext|>")
    self.assertEqual(tok.decode(ids), "<|im_start|>a")
    self.assertEqual(tok.decode(ids, skip_special=False), "<|im_start|>a<|im_end|><|endoftext|>")


class LoadTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()

  def test_generation_config_order_and_absence(self):
    fx.write_tokenizer_dir(self.dir, "llama3")
    tok = load_hf_tokenizer(self.dir)
    eot, end = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")
    self.assertEqual(tok.eos_ids, (eot, end))
    path = os.path.join(self.dir, "generation_config.json")
    edit_json(path, eos_token_id=[end, 7, eot])               # eos_id comes first anyway
    self.assertEqual(load_hf_tokenizer(self.dir).eos_ids, (eot, end, 7))
    edit_json(path, eos_token_id=end)
    self.assertEqual(load_hf_tokenizer(self.dir).eos_ids, (eot, end))
    os.remove(path)
    self.assertEqual(load_hf_tokenizer(self.dir).eos_ids, (eot,))

  def test_special_token_forms(self):
    fx.write_tokenizer_dir(self.dir, "chatml")
    config = os.path.join(self.dir, "tokenizer_config.json")
    edit_json(config, pad_token={"content": "<|im_start|>", "special": True},
              bos_token={"content": "<|endoftext|>"})
    tok = load_hf_tokenizer(self.dir)
    self.assertEqual(tok.pad_id, tok.token_to_id("<|im_start|>"))
    self.assertEqual((tok.bos_id, tok.bos_token), (tok.token_to_id("<|endoftext|>"),
                                                   "<|endoftext|>"))
    edit_json(config, pad_token=None)
    self.assertEqual(load_hf_tokenizer(self.dir).pad_id, tok.eos_id)   # null pad: eos

  def test_round_trip_keeps_template_and_ids(self):
    for style in fx.STYLES:
      tok = load_hf_tokenizer(fx.write_tokenizer_dir(tempfile.mkdtemp(), style),
                              add_tags=style == "qwen3")
      back = tokenizer_lib.tokenizer_from_bytes(tok.to_bytes())
      self.assertIsInstance(back, ByteLevelBPETokenizer)
      self.assertEqual(back, tok)
      for attr in ("chat_template", "eos_ids", "bos_token", "eos_token", "bos_id", "eos_id",
                   "pad_id", "base_vocab_size", "vocab_size"):
        self.assertEqual(getattr(back, attr), getattr(tok, attr), (style, attr))
      messages = fx.CONVERSATIONS["multi_turn"]
      extra = {"date_string": "2 Feb 2022"} if style == "llama3" else {}
      self.assertEqual(back.apply_chat_template(messages, **extra),
                       tok.apply_chat_template(messages, **extra))
      self.assertEqual(back.chat_text(messages, False, **extra),
                       tok.chat_text(messages, False, **extra))

  def test_old_payload_without_new_keys_loads(self):
    tok = load_hf_tokenizer(fx.write_tokenizer_dir(self.dir, "llama3"))
    payload = json.loads(tok.to_bytes()[len(HEADER):].decode("utf-8"))
    for key in ("eos_ids", "bos_token", "eos_token"):
      del payload[key]
    old = ByteLevelBPETokenizer.from_bytes(HEADER + json.dumps(payload).encode("utf-8"))
    self.assertEqual(old.eos_ids, (tok.eos_id,))
    self.assertEqual((old.bos_token, old.eos_token), (None, None))
    self.assertEqual(old.encode("Hello <|eot_id|>"), tok.encode("Hello <|eot_id|>"))

  def test_add_tags(self):
    fx.write_tokenizer_dir(self.dir, "qwen3")
    plain, tagged = load_hf_tokenizer(self.dir), load_hf_tokenizer(self.dir, add_tags=True)
    v = plain.vocab_size
    # <think> and </think> are already tokens of the qwen3 vocabulary: they keep their ids.
    self.assertEqual(tagged.tag_id("<think>"), plain.token_to_id("<think>"))
    self.assertEqual(tagged.tag_id("</think>"), plain.token_to_id("</think>"))
    new = [t for t in TAGS if t not in ("<think>", "</think>")]
    self.assertEqual([tagged.tag_id(t) for t in new], list(range(v, v + len(new))))
    self.assertEqual((tagged.vocab_size, tagged.base_vocab_size), (v + len(new), v))
    text = "<search>capital of France</search><answer>Paris</answer>"
    ids = tagged.encode(text)
    self.assertEqual(ids[0], tagged.tag_id("<search>"))
    self.assertEqual(ids[-1], tagged.tag_id("</answer>"))
    self.assertEqual(tagged.decode(ids), text)
    with self.assertRaisesRegex(ValueError, "add_tags=True"):
      plain.tag_id("<search>")
    messages = fx.CONVERSATIONS["multi_turn"]
    self.assertEqual(tagged.apply_chat_template(messages), plain.apply_chat_template(messages))

  def test_no_template_falls_back_to_chatml(self):
    fx.write_tokenizer_dir(self.dir, "chatml")
    edit_json(os.path.join(self.dir, "tokenizer_config.json"), chat_template=None)
    tok = load_hf_tokenizer(self.dir)
    self.assertIsNone(tok.chat_template)
    self.assertEqual(tok.chat_text([{"role": "user", "content": "Hi"}]),
                     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    with self.assertRaisesRegex(ValueError, r"\['enable_thinking'\] need a chat template"):
      tok.chat_text([{"role": "user", "content": "Hi"}], enable_thinking=False)


class LoadErrorTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = fx.write_tokenizer_dir(tempfile.mkdtemp(), "llama3")

  def test_missing_files(self):
    with self.assertRaisesRegex(FileNotFoundError, "is not a directory"):
      load_hf_tokenizer(os.path.join(self.dir, "nowhere"))
    shutil.move(os.path.join(self.dir, "tokenizer_config.json"), self.dir + "-config")
    with self.assertRaisesRegex(FileNotFoundError, "has no tokenizer_config.json"):
      load_hf_tokenizer(self.dir)
    os.remove(os.path.join(self.dir, "tokenizer.json"))
    with self.assertRaisesRegex(FileNotFoundError,
                                f"{os.path.basename(self.dir)}' has no tokenizer.json"):
      load_hf_tokenizer(self.dir)

  def test_special_token_not_in_vocabulary(self):
    config = os.path.join(self.dir, "tokenizer_config.json")
    edit_json(config, bos_token="<s>")
    with self.assertRaisesRegex(ValueError, "tokenizer_config.json: bos_token '<s>' is not "
                                "in the vocabulary of tokenizer.json"):
      load_hf_tokenizer(self.dir)
    edit_json(config, bos_token="<|begin_of_text|>", pad_token={"content": "<pad>"})
    with self.assertRaisesRegex(ValueError, "pad_token '<pad>' is not in the vocabulary"):
      load_hf_tokenizer(self.dir)
    edit_json(config, pad_token={"special": True})
    with self.assertRaisesRegex(ValueError, "pad_token must be a string or a dict with a "
                                "string 'content'"):
      load_hf_tokenizer(self.dir)
    edit_json(config, pad_token=None, eos_token=None)
    os.remove(os.path.join(self.dir, "generation_config.json"))
    with self.assertRaisesRegex(ValueError, "tokenizer_config.json: no eos_token"):
      load_hf_tokenizer(self.dir)

  def test_bad_generation_config(self):
    path = os.path.join(self.dir, "generation_config.json")
    edit_json(path, eos_token_id="<|eot_id|>")
    with self.assertRaisesRegex(ValueError, "generation_config.json: eos_token_id must be an "
                                "int or a list of ints, got '<|eot_id|>'"):
      load_hf_tokenizer(self.dir)
    edit_json(path, eos_token_id=[4000])
    with self.assertRaisesRegex(ValueError, "eos_token_id 4000 is not an id"):
      load_hf_tokenizer(self.dir)

  def test_bad_json_files(self):
    with open(os.path.join(self.dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      f.write("{not json")
    with self.assertRaisesRegex(ValueError, "tokenizer_config.json is not valid JSON"):
      load_hf_tokenizer(self.dir)
    with open(os.path.join(self.dir, "tokenizer.json"), "w", encoding="utf-8") as f:
      f.write("{}")
    with self.assertRaisesRegex(ValueError, "tokenizer.json is not a valid `tokenizers` file"):
      load_hf_tokenizer(self.dir)

  def test_template_errors_surface_at_chat_time(self):
    config = os.path.join(self.dir, "tokenizer_config.json")
    edit_json(config, chat_template="{% for m in messages %}{{ m.content }")
    tok = load_hf_tokenizer(self.dir)
    with self.assertRaisesRegex(ValueError, "chat template syntax error at line 1: "
                                "unexpected '}'"):
      tok.chat_text([{"role": "user", "content": "Hi"}])
    edit_json(config, chat_template="{{ raise_exception('no chat for ' + bos_token) }}")
    with self.assertRaisesRegex(ValueError, "raised an exception: no chat for "
                                "<\\|begin_of_text\\|>"):
      load_hf_tokenizer(self.dir).apply_chat_template([{"role": "user", "content": "Hi"}])

  def test_message_without_content(self):
    tok = load_hf_tokenizer(self.dir)
    with self.assertRaisesRegex(ValueError, "message 1 has no 'content'"):
      tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant"}],
                              date_string="1 Jan 2025")


if __name__ == "__main__":
  absltest.main()
