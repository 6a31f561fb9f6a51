"""How a question becomes the policy's prompt, and how the agent's tagged actions are written.

Two prompt styles:

- "plain": `<bos>Question: {question}` (the from-scratch world model's format);
- "chat": a conversation rendered by the tokenizer's own chat template (jinja2, as
  transformers renders it): an optional system message, then a user message holding the
  instruction and the question, then the template's generation prompt (the assistant turn
  the policy writes). The default instruction explains the search protocol; it is written for
  this project and set from gin (`PromptConfig.instruction`).

"auto" picks "chat" for the text-tag protocol when the tokenizer has a chat template, else
"plain". A closed-book prompt (the baseline that may not search) uses
`closed_book_instruction` and ends with the opening `<answer>` tag already written.

A RAG prompt (Search-R1's "RAG" baseline: retrieve with the question, answer once) is given
the `<information>` block the environment writes for a search of the question's text (its
ids, e.g. from `Experiment.respond`). The block goes where the environment would put it after
the policy's first search: after `<bos>Question: {question}` (plain), or right after the chat
template's generation prompt, at the start of the assistant's turn (chat; the user message is
`rag_instruction`, which says that passages follow). Then the opening `<answer>` tag, as in a
closed-book prompt:

  plain  <bos>Question: {question}<information> ... </information><answer>
  chat   [system] user: {rag_instruction} | assistant: <information> ... </information><answer>

The block stays token ids from end to end (never decoded and re-encoded), so the policy reads
exactly the passages an agent's search of the question would show it.

Tags are written per protocol (`tagged_ids`): one id per tag with the "special" protocol,
ordinary text (`<search> query </search>`) with the "text" protocol.

Example:
  >>> cfg = PromptConfig()
  >>> ids = prompt_ids(tokenizer, "Where was Mave Sima born?", cfg, protocol="text")
  >>> tagged_ids(tokenizer, "text", "search", "Mave Sima") == tokenizer.encode(
  ...     "<search> Mave Sima </search>")
  True
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

PROMPT_STYLES = ("auto", "plain", "chat")
PROTOCOLS = ("special", "text")
PLAIN_TEMPLATE = "Question: {question}"

DEFAULT_INSTRUCTION = (
    "Answer the question below. You may look things up first: write a query between "
    "<search> and </search>, and the results will be shown to you between <information> and "
    "</information>. Search as often as you need, one query at a time. When you know the "
    "answer, write it between <answer> and </answer>, as a few words only, for example "
    "<answer> Lisbon </answer>.\n\nQuestion: {question}")
DEFAULT_RAG_INSTRUCTION = (
    "Answer the question below using the passages that follow it, shown between "
    "<information> and </information>. Write only the answer, a few words, between <answer> "
    "and </answer>.\n\nQuestion: {question}")
DEFAULT_CLOSED_BOOK_INSTRUCTION = (
    "Answer the question below from what you know, without looking anything up. Write only "
    "the answer, a few words, between <answer> and </answer>.\n\nQuestion: {question}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptConfig:
  """How questions are put to the policy (see the module docstring).

  Attributes:
    style: "auto", "plain" or "chat".
    system: the system message of a chat prompt ("" sends none: the template may then add
      its own default).
    instruction: the user message of a chat prompt; `{question}` is replaced by the question.
    closed_book_instruction: the user message of the closed-book baseline's chat prompt.
    rag_instruction: the user message of the RAG baseline's chat prompt (the retrieved
      `<information>` block follows the generation prompt).
  """

  style: str = "auto"
  system: str = ""
  instruction: str = DEFAULT_INSTRUCTION
  closed_book_instruction: str = DEFAULT_CLOSED_BOOK_INSTRUCTION
  rag_instruction: str = DEFAULT_RAG_INSTRUCTION

  def __post_init__(self):
    if self.style not in PROMPT_STYLES:
      raise ValueError(f"PromptConfig.style must be one of {PROMPT_STYLES}, got {self.style!r}")
    for name in ("instruction", "closed_book_instruction", "rag_instruction"):
      if "{question}" not in getattr(self, name):
        raise ValueError(f"PromptConfig.{name} must contain '{{question}}', got "
                         f"{getattr(self, name)!r}")

  def resolved_style(self, tokenizer: Any, protocol: str) -> str:
    """"plain" or "chat" for this tokenizer and protocol."""
    if self.style != "auto":
      return self.style
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return "chat" if protocol == "text" and has_template else "plain"


def _check_protocol(protocol: str) -> None:
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def tag_ids(tokenizer: Any, protocol: str, tag: str) -> list[int]:
  """The ids of one tag (e.g. "<answer>"): its single id, or its text's ids."""
  _check_protocol(protocol)
  return [tokenizer.tag_id(tag)] if protocol == "special" else tokenizer.encode(tag)


def tagged_ids(tokenizer: Any, protocol: str, name: str, text: str) -> list[int]:
  """`<name> text </name>` as the protocol writes it.

  Args:
    tokenizer: the policy's tokenizer.
    protocol: "special" (tag ids around `encode(text)`) or "text" (the encoded string
      `"<name> text </name>"`).
    name: "search", "answer", ...
    text: the content.
  """
  _check_protocol(protocol)
  if protocol == "special":
    return [tokenizer.tag_id(f"<{name}>"), *tokenizer.encode(text), tokenizer.tag_id(f"</{name}>")]
  return tokenizer.encode(f"<{name}> {text} </{name}>")


def prompt_ids(tokenizer: Any, question: str, config: PromptConfig | None = None, *,
               protocol: str = "special", closed_book: bool = False,
               information: Sequence[int] | None = None) -> list[int]:
  """The prompt of one question: the agent's, the closed-book baseline's or the RAG
  baseline's (see the module docstring).

  Args:
    tokenizer: the policy's tokenizer (`apply_chat_template` for the chat style).
    question: the question's text.
    config: the prompt settings (default `PromptConfig()`).
    protocol: "special" or "text" (how the closed-book prompt's `<answer>` is written, and
      what "auto" picks).
    closed_book: the closed-book baseline's prompt, ending with the `<answer>` tag.
    information: the RAG baseline's prompt: these ids (the `<information>` block retrieved
      for the question) follow the question, then the `<answer>` tag.

  Returns:
    The ids.

  Raises:
    ValueError: both `closed_book` and `information`; an empty `information`; a chat style
      without a chat template.

  Example:
    >>> block = exp.respond([question])[0][0]          # doctest: +SKIP
    >>> ids = prompt_ids(tok, question, protocol="text", information=block)  # doctest: +SKIP
    >>> tok.decode(ids).endswith("</information><answer>")  # doctest: +SKIP
    True
  """
  config = PromptConfig() if config is None else config
  _check_protocol(protocol)
  if information is not None:
    if closed_book:
      raise ValueError("a prompt is closed-book or RAG (given `information`), not both")
    information = [int(i) for i in information]
    if not information:
      raise ValueError("information must hold the ids of a retrieved <information> block, got "
                       "an empty list")
  style = config.resolved_style(tokenizer, protocol)
  if style == "plain":
    ids = [tokenizer.bos_id, *tokenizer.encode(PLAIN_TEMPLATE.format(question=question))]
  else:
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError("PromptConfig.style='chat' needs a tokenizer with a chat template (a "
                       f"Hugging Face or GGUF checkpoint's); {type(tokenizer).__name__} has none")
    template = (config.closed_book_instruction if closed_book else
                config.rag_instruction if information is not None else config.instruction)
    messages = ([{"role": "system", "content": config.system}] if config.system else [])
    messages.append({"role": "user", "content": template.format(question=question)})
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
  if information is not None:
    ids += information
  if closed_book or information is not None:
    ids += tag_ids(tokenizer, protocol, "<answer>")
  return ids


def search_query_ids(tokenizer: Any, protocol: str, query: str) -> list[int]:
  """The ids the rollout's environment takes as the query when the policy writes
  `tagged_ids(tokenizer, protocol, "search", query)`.

  "special": `encode(query)`. "text": the tokens that start at or after the end of
  `<search>` and end at or before the start of `</search>` in the action's bytes (so a
  leading " " that BPE merged into the query's first word stays, and a token straddling a
  tag is left out), as `jaxsearch.rollout.search_env` does while decoding.

  Example:
    >>> search_query_ids(tok, "text", "capital of France")   # " capital", " of", " France"
  """
  _check_protocol(protocol)
  if protocol == "special":
    return tokenizer.encode(query)
  action = tagged_ids(tokenizer, protocol, "search", query)
  table = tokenizer.token_bytes()
  ends, total = [], 0
  for i in action:
    total += len(table[i])
    ends.append(total)
  text = b"".join(table[i] for i in action)
  opening = text.find(b"<search>") + len(b"<search>")
  closing = text.rfind(b"</search>")
  out = []
  for i, end in zip(action, ends):
    start = end - len(table[i])
    if start >= opening and end <= closing:
      out.append(i)
  return out
