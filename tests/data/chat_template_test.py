"""Tests of jaxsearch.data.chat_template: rendering by hand, against transformers, and lookup.

The transformers comparisons use the tiny tokenizer directories of `hf_tokenizer_fixtures`
(ChatML, Qwen3-style thinking, Llama-3-style headers) and
`AutoTokenizer.from_pretrained(directory).apply_chat_template(..., tokenize=False)`.
"""
from __future__ import annotations

import datetime
import json
import os
import tempfile

import jinja2
import transformers
from absl.testing import absltest, parameterized

from jaxsearch.data import chat_template as ct
from jaxsearch.data.chat_template import chat_template_from_config, render_chat_template
from jaxsearch.data.hf_tokenizer import load_hf_tokenizer
from tests.data import hf_tokenizer_fixtures as fx

# Two lines: the newline after `{% endfor %}` is dropped (trim_blocks) and so are the
# spaces before `{% if %}` (lstrip_blocks); the newline after `}}` stays.
TWO_LINES = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: "
             "{{ m['content'] | trim }}\n{% endfor %}\n"
             "    {% if add_generation_prompt %}ASSISTANT:{% endif %}")
USER_BOT = [{"role": "user", "content": "  Hi there \n"}, {"role": "assistant", "content": "Yo"}]


def render(template: str, messages=(), **kw) -> str:
  return render_chat_template(template, list(messages), **kw)


class RenderByHandTest(parameterized.TestCase):
  """Expected strings written by hand for small templates."""

  def test_two_line_template(self):
    self.assertEqual(render(TWO_LINES, USER_BOT, bos_token="<s>"),
                     "<s>USER: Hi there\nASSISTANT: Yo\nASSISTANT:")
    self.assertEqual(render(TWO_LINES, USER_BOT, add_generation_prompt=False),
                     "USER: Hi there\nASSISTANT: Yo\n")
    self.assertEqual(render(TWO_LINES, []), "ASSISTANT:")

  def test_whitespace_control_differs_from_plain_jinja(self):
    # Guards the test above: plain Jinja keeps the newline and the indentation.
    plain = jinja2.Environment().from_string(TWO_LINES).render(
        messages=USER_BOT, add_generation_prompt=True, bos_token="")
    self.assertEqual(plain, "USER: Hi there\nASSISTANT: Yo\n\n    ASSISTANT:")

  def test_tojson_has_transformers_signature(self):
    value = {"b": "é<&>", "a": [1, 2]}
    self.assertEqual(render("{{ x | tojson }}", x=value), '{"b": "é<&>", "a": [1, 2]}')
    self.assertEqual(render("{{ x | tojson(indent=2) }}", x={"a": 1}), '{\n  "a": 1\n}')
    self.assertEqual(render("{{ x | tojson(separators=(',', ':'), sort_keys=true) }}",
                            x=value), '{"a":[1,2],"b":"é<&>"}')
    self.assertEqual(render("{{ x | tojson(ensure_ascii=true) }}", x="é"), '"\\u00e9"')

  def test_globals(self):
    self.assertEqual(render("{{ strftime_now('%Y') }}"),
                     str(datetime.datetime.now().year))
    self.assertEqual(render("{{ dict(a=1)['a'] }}{% set ns = namespace(n=1) %}"
                            "{% set ns.n = ns.n + 1 %}{{ ns.n }}"), "12")
    self.assertEqual(render("{% for m in messages %}{% if loop.index0 == 1 %}{% break %}"
                            "{% endif %}{{ m.content }}{% endfor %}", USER_BOT),
                     "  Hi there \n")
    self.assertEqual(render("a{% generation %}b{% endgeneration %}c"), "abc")

  def test_variables(self):
    probe = ("{{ bos_token is defined }} {{ eos_token is defined }} {{ tools is none }} "
             "{{ documents is none }} {{ add_generation_prompt }} {{ enable_thinking }}")
    self.assertEqual(render(probe, enable_thinking=False), "False False True True True False")
    self.assertEqual(render(probe, bos_token="<s>", eos_token="</s>", tools=[{"a": 1}],
                            add_generation_prompt=False, enable_thinking=True),
                     "True True False True False True")

  def test_messages_are_normalized_like_transformers(self):
    message = {"role": "assistant", "content": "x", "tool_calls": None, "reasoning": "r"}
    self.assertEqual(render("{% set m = messages[0] %}{{ m.tool_calls is defined }} "
                            "{{ m.reasoning_content }} {{ m.thinking }}", [message]),
                     "False r r")
    self.assertEqual(message["tool_calls"], None)   # the caller's message is not changed
    self.assertNotIn("thinking", message)

  def test_compiled_templates_are_cached(self):
    template = "{{ messages | length }} cached"
    render(template)
    hits = ct._compile.cache_info().hits
    self.assertEqual(render(template, USER_BOT), "2 cached")
    self.assertEqual(ct._compile.cache_info().hits, hits + 1)


class RenderErrorTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("unclosed_expression", "{% for m in messages %}{{ m }"),
      ("unclosed_if", "{% if add_generation_prompt %}x"),
      ("bad_expression", "{{ 1 + }}"))
  def test_syntax_error_carries_jinja_message(self, template):
    with self.assertRaises(jinja2.TemplateSyntaxError) as jinja_error:
      jinja2.Environment().from_string(template)
    with self.assertRaises(ValueError) as ours:
      render(template)
    self.assertIn("syntax error", str(ours.exception))
    self.assertIn(jinja_error.exception.message, str(ours.exception))

  def test_raise_exception_becomes_value_error(self):
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('first role must be user, got ' + messages[0]['role']) }}"
                "{% endif %}ok")
    self.assertEqual(render(template, USER_BOT), "ok")
    with self.assertRaisesRegex(ValueError, "raised an exception: first role must be user, "
                                "got tool"):
      render(template, [{"role": "tool", "content": "x"}])

  def test_bad_messages_name_the_index(self):
    with self.assertRaisesRegex(ValueError, r"message 1 has no 'content'.*\['role'\]"):
      render(TWO_LINES, [USER_BOT[0], {"role": "user"}])
    with self.assertRaisesRegex(ValueError, "message 0 has no 'role'"):
      render(TWO_LINES, [{"content": "x"}])
    with self.assertRaisesRegex(ValueError, "message 2 must be a mapping.*str: 'hi'"):
      render(TWO_LINES, [*USER_BOT, "hi"])
    with self.assertRaisesRegex(ValueError, "messages must be a sequence.*str"):
      render_chat_template(TWO_LINES, "hello")

  def test_bad_template_and_sandbox(self):
    with self.assertRaisesRegex(ValueError, r"template must be a non-empty string \(a Jinja chat template\), got None"):
      render_chat_template(None, [])
    with self.assertRaisesRegex(ValueError, "rendering the chat template failed: "
                                "SecurityError"):   # immutable sandbox
      render("{{ messages.append(1) }}")
    with self.assertRaisesRegex(ValueError, "underscore-prefixed.*'_x'"):
      render("{% set ns = namespace(_x=1) %}")
    with self.assertRaisesRegex(ValueError, "UndefinedError"):
      render("{{ messages[0]['content'].missing.deeper }}", USER_BOT)


class TemplateFromConfigTest(absltest.TestCase):

  def test_string_list_and_none(self):
    self.assertEqual(chat_template_from_config({"chat_template": "T"}, None), "T")
    self.assertIsNone(chat_template_from_config({}, None))
    self.assertIsNone(chat_template_from_config({"chat_template": None}, None))
    listed = {"chat_template": [{"name": "tool_use", "template": "TOOLS"},
                                {"name": "default", "template": "DEFAULT"}]}
    self.assertEqual(chat_template_from_config(listed, None), "DEFAULT")

  def test_jinja_file_wins(self):
    directory = tempfile.mkdtemp()
    self.assertEqual(chat_template_from_config({"chat_template": "config"}, directory),
                     "config")
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
      f.write("file {{ messages | length }}")
    self.assertEqual(chat_template_from_config({"chat_template": "config"}, directory),
                     "file {{ messages | length }}")
    self.assertEqual(chat_template_from_config({}, directory), "file {{ messages | length }}")

  def test_bad_config_values(self):
    with self.assertRaisesRegex(ValueError, r"none named 'default'.*\['a', 'b'\]|"
                                r"\['a', 'b'\].*none named 'default'"):
      chat_template_from_config({"chat_template": [{"name": "a", "template": "A"},
                                                   {"name": "b", "template": "B"}]}, None)
    with self.assertRaisesRegex(ValueError, "'chat_template' must be a string.*42"):
      chat_template_from_config({"chat_template": 42}, None)
    with self.assertRaisesRegex(ValueError, "'chat_template' must be a string"):
      chat_template_from_config({"chat_template": [{"template": "no name"}]}, None)


def _cases():
  for style in fx.STYLES:
    for name in fx.CONVERSATIONS:
      for gen in (True, False):
        yield (f"{style}_{name}_{'gen' if gen else 'nogen'}", style, name, gen)


class MatchesTransformersTest(parameterized.TestCase):
  """`chat_text` == transformers' `apply_chat_template(tokenize=False)`."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dirs = {s: fx.write_tokenizer_dir(tempfile.mkdtemp(), s) for s in fx.STYLES}
    cls.hf = {s: transformers.AutoTokenizer.from_pretrained(d) for s, d in cls.dirs.items()}
    cls.ours = {s: load_hf_tokenizer(d) for s, d in cls.dirs.items()}

  def check(self, style, messages, gen, **extra):
    want = self.hf[style].apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=gen, **extra)
    got = self.ours[style].chat_text(messages, add_generation_prompt=gen, **extra)
    self.assertEqual(got, want)
    return got

  @parameterized.named_parameters(*_cases())
  def test_conversation(self, style, name, gen):
    extra = {"date_string": "26 Jul 2024"} if style == "llama3" else {}
    text = self.check(style, fx.CONVERSATIONS[name], gen, **extra)
    self.assertIn(fx.CONVERSATIONS[name][-1]["content"].strip(), text)

  def test_chatml_default_system_and_tools(self):
    text = self.check("chatml", fx.CONVERSATIONS["user"], True)
    self.assertTrue(text.startswith("<|im_start|>system\nYou are a careful assistant."))
    text = self.check("chatml", fx.TOOL_CONVERSATION, True, tools=fx.TOOLS)
    self.assertIn(json.dumps(fx.TOOLS[0], ensure_ascii=False), text)
    self.assertEqual(text.count("<tool_response>"), 2)
    self.assertEqual(text.count("<|im_start|>user"), 2)  # the two responses share a turn

  def test_qwen3_thinking_switch(self):
    messages = fx.CONVERSATIONS["thinking"][:3]
    off = self.check("qwen3", messages, True, enable_thinking=False)
    self.assertTrue(off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n"))
    on = self.check("qwen3", messages, True, enable_thinking=True)
    self.assertTrue(on.endswith("<|im_start|>assistant\n"))
    # Reasoning before the last user turn is dropped, after it kept.
    full = self.check("qwen3", fx.CONVERSATIONS["thinking"], False)
    self.assertNotIn("It is Paris.", full)
    self.assertIn("<think>\nYes, sure.\n</think>\n\nYes.", full)

  def test_llama3_date_from_strftime_now(self):
    today = {datetime.datetime.now().strftime("%d %b %Y")}
    text = self.check("llama3", fx.CONVERSATIONS["user"], True)
    today.add(datetime.datetime.now().strftime("%d %b %Y"))   # midnight in between
    self.assertTrue(any(f"Date: {d}\n" in text for d in today), text)
    self.assertTrue(text.startswith("<|begin_of_text|><|start_header_id|>system"))

  def test_llama3_raise_exception_like_transformers(self):
    messages = [{"role": "assistant", "content": "Hi"}]
    with self.assertRaisesRegex(Exception, "must start with a user message"):
      self.hf["llama3"].apply_chat_template(messages, tokenize=False)
    with self.assertRaisesRegex(ValueError, "raised an exception: the conversation must "
                                "start with a user message"):
      self.ours["llama3"].chat_text(messages)
    with self.assertRaisesRegex(ValueError, "unsupported role narrator"):
      self.ours["llama3"].chat_text([{"role": "narrator", "content": "x"}])

  def test_jinja_file_and_template_list_like_transformers(self):
    directory = fx.write_tokenizer_dir(tempfile.mkdtemp(), "chatml")
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS {{ tools }}"},
                               {"name": "default", "template": config["chat_template"]}]
    with open(path, "w", encoding="utf-8") as f:
      json.dump(config, f)
    messages = fx.CONVERSATIONS["system_user"]
    want = transformers.AutoTokenizer.from_pretrained(directory).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    self.assertEqual(load_hf_tokenizer(directory).chat_text(messages), want)
    self.assertTrue(want.startswith("<|im_start|>system\nAnswer in one word."))
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
      f.write("FILE{% for m in messages %}|{{ m.content }}{% endfor %}")
    want = transformers.AutoTokenizer.from_pretrained(directory).apply_chat_template(
        messages, tokenize=False)
    self.assertEqual(want, "FILE|Answer in one word.|What is the capital of France?")
    self.assertEqual(load_hf_tokenizer(directory).chat_text(messages), want)


if __name__ == "__main__":
  absltest.main()
