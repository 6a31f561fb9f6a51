"""Chat templates: a checkpoint's own Jinja template, rendered the way transformers does.

A Hugging Face checkpoint declares how a conversation becomes text with a Jinja template
(`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`; GGUF files carry it as
`tokenizer.chat_template`). `render_chat_template` renders such a template exactly as
`transformers` (`utils/chat_template_utils.py`, `_compile_jinja_template` and
`render_jinja_template`) does, so nothing is written per model family:

- Environment: `jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
  lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])`, plus a `{% generation %}` block
  tag rendered as its body (transformers uses it to track assistant tokens).
- Filter `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)` (plain
  `json.dumps`, no HTML escaping).
- Globals `raise_exception(message)`, `strftime_now(format)` (local time now), `dict(...)`, and
  `namespace(...)` (which refuses names starting with "_").
- Variables: `messages`, `add_generation_prompt`, `tools` (None), `documents` (None),
  `bos_token` / `eos_token` (left undefined when None, as transformers leaves a missing special
  token out), and any `**extra` (`enable_thinking`, `date_string`, `tools`, ...).
- Messages are copied to plain dicts/lists, keys whose value is None are dropped, and a
  reasoning text given as "reasoning_content", "thinking" or "reasoning" is visible under
  "reasoning_content" and "thinking" (transformers' `_alias_reasoning_fields`).

Compiled templates are cached per template string. Syntax errors, `raise_exception` calls
and other failures while rendering become `ValueError`s carrying Jinja's message.

Example:
  >>> render_chat_template(
  ...     "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\\n{% endfor %}",
  ...     [{"role": "user", "content": "Hi"}])
  '<user>Hi\\n'
"""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.50 saves the template
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _RaisedByTemplate(jinja2.exceptions.TemplateError):
  """What the template's `raise_exception(message)` raises."""


def _raise_exception(message: str):
  raise _RaisedByTemplate(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 (the name templates call it with)
  return datetime.now().strftime(format)


class _TemplateDict:
  """`dict(...)` for templates, without exposing the `dict` type itself."""

  def __call__(self, *args, **kwargs) -> dict:
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs) -> dict:
    return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
  """Jinja's `namespace()`, refusing attribute names that start with "_"."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument (Jinja's signature)
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check_name(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"chat templates cannot store underscore-prefixed attributes on a namespace, got "
          f"{name!r}")


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` renders its body (no assistant-token tracking)."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller) -> str:
    return caller()


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _TemplateDict()
  env.globals["namespace"] = _TemplateNamespace
  try:
    return env.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise ValueError(f"chat template syntax error at line {e.lineno}: {e.message}") from e


def _plain(value: Any) -> Any:
  """A copy of `value` made of dicts, lists, tuples and scalars (what the template sees)."""
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  return value


def _messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
  if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
    raise ValueError(f"messages must be a sequence of mappings with 'role' and 'content', got "
                     f"{type(messages).__name__}: {messages!r:.200}")
  out = []
  for n, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ValueError(f"message {n} must be a mapping with 'role' and 'content', got "
                       f"{type(message).__name__}: {message!r:.200}")
    missing = [k for k in ("role", "content") if k not in message]
    if missing:
      raise ValueError(f"message {n} has no {' or '.join(map(repr, missing))}; each message "
                       f"needs 'role' and 'content', got keys {sorted(map(str, message))}")
    message = {k: v for k, v in _plain(message).items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    out.append(message)
  return out


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = True, bos_token: str | None = None,
                         eos_token: str | None = None, **extra: Any) -> str:
  """Renders a Jinja chat template the way transformers' `apply_chat_template` does.

  Args:
    template: the Jinja chat template (e.g. from `chat_template_from_config`).
    messages: the conversation, each a mapping with "role" and "content" (more keys, such as
      "tool_calls" or "reasoning_content", are passed through).
    add_generation_prompt: open an assistant turn at the end (if the template supports it).
    bos_token, eos_token: the special token strings the template may print; None leaves the
      variable undefined (it renders as "" and tests false), as transformers does.
    **extra: more template variables, e.g. `tools=[...]`, `documents=[...]`,
      `enable_thinking=False`, `date_string="26 Jul 2024"`. `tools` and `documents` default
      to None.

  Returns:
    The rendered text (encode it without adding special tokens).

  Raises:
    ValueError: the template is empty or not a string, has a syntax error, calls
      `raise_exception`, or fails while rendering; a message is not a mapping with "role" and
      "content" (the error names its index).

  Example:
    >>> render_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
    ...                      "{% endfor %}", [{"role": "user", "content": "Hi"}],
    ...                      bos_token="<s>")
    '<s>Hi'
  """
  if not isinstance(template, str) or not template:
    raise ValueError(f"template must be a non-empty string (a Jinja chat template), got "
                     f"{template!r:.200}")
  compiled = _compile(template)
  variables = {"tools": None, "documents": None}
  variables.update(_plain(extra))
  if bos_token is not None:
    variables["bos_token"] = bos_token
  if eos_token is not None:
    variables["eos_token"] = eos_token
  variables["messages"] = _messages(messages)
  variables["add_generation_prompt"] = bool(add_generation_prompt)
  try:
    return compiled.render(**variables)
  except _RaisedByTemplate as e:
    raise ValueError(f"the chat template raised an exception: {e.message}") from e
  except (jinja2.TemplateError, TypeError) as e:
    raise ValueError(f"rendering the chat template failed: {type(e).__name__}: {e}") from e


def chat_template_from_config(tokenizer_config: Mapping[str, Any],
                              directory: str | os.PathLike | None = None) -> str | None:
  """The default chat template a Hugging Face tokenizer directory declares.

  `directory/chat_template.jinja` (where transformers >= 4.50 saves it) wins over
  `tokenizer_config["chat_template"]`, which is a string or a list of
  `{"name": ..., "template": ...}` (the one named "default" is taken).

  Args:
    tokenizer_config: the parsed `tokenizer_config.json`.
    directory: the checkpoint directory, or None to read only the config.

  Returns:
    The template, or None if the directory declares none.

  Raises:
    ValueError: `chat_template` is neither a string nor a list of named templates, or the
      list has no "default" entry.

  Example:
    >>> chat_template_from_config({"chat_template": [
    ...     {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}, None)
    'D'
  """
  if directory is not None:
    path = os.path.join(os.fspath(directory), CHAT_TEMPLATE_FILE)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        return f.read()
  value = tokenizer_config.get("chat_template")
  if value is None or isinstance(value, str):
    return value or None
  if isinstance(value, Mapping):
    named = dict(value)
  elif isinstance(value, (list, tuple)) and all(
      isinstance(t, Mapping) and isinstance(t.get("name"), str)
      and isinstance(t.get("template"), str) for t in value):
    named = {t["name"]: t["template"] for t in value}
  else:
    raise ValueError(f"tokenizer_config 'chat_template' must be a string or a list of "
                     f"{{'name', 'template'}} dicts, got {value!r:.200}")
  if "default" not in named:
    raise ValueError(f"tokenizer_config 'chat_template' lists templates {sorted(named)} but "
                     "none named 'default'")
  return named["default"]
