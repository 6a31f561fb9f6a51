"""Tiny Hugging Face tokenizer directories in the style of three chat model families.

Test helper of `chat_template_test.py` and `hf_tokenizer_test.py`. `write_tokenizer_dir`
trains a small byte-level BPE with `tokenizers` on the sentences below, adds the family's
special tokens after the learned vocabulary, and writes what a checkpoint ships:
`tokenizer.json`, `tokenizer_config.json` (special tokens, chat template) and
`generation_config.json`. transformers' `AutoTokenizer.from_pretrained(directory)` loads it
as a `PreTrainedTokenizerFast`, which is the reference the tests compare jaxsearch against.

The chat templates are written here for these tests, in the layout of each family (ChatML
with a default system message and tools; ChatML with `<think>` reasoning blocks and
`enable_thinking`; Llama-3-style headers with a date line and a bos token).

Example:
  >>> directory = write_tokenizer_dir(tempfile.mkdtemp(), "qwen3")
  >>> sorted(os.listdir(directory))
  ['generation_config.json', 'tokenizer.json', 'tokenizer_config.json']
"""
from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

STYLES = ("chatml", "qwen3", "llama3")

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A search agent reads the question, then decides what to look up.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "In 2024 the river rose by 3.5 metres after 12 days of rain.",
    "She asked whether the museum opens at 9 or at 10 on Sundays.",
    "Retrieval helps a small model answer questions about rare facts.",
    "The answer should be short: one name, one number, or one place.",
    "We tokenize text into pieces, then map every piece to an id.",
    "Hello there! How are you doing today?",
    "I'm fine, thanks; they'll arrive soon and we've got time.",
    "The train leaves the station at half past seven every morning.",
    "Numbers like 1,000,000 and 3.14159 appear in many documents.",
    "Who wrote the novel, and in which year was it first printed?",
    "The weather in the mountains changes quickly in the afternoon.",
    "Please summarise the following paragraph in two sentences.",
    "Tools return results as plain text that the assistant can read.",
    "A careful assistant checks each fact before it answers.",
    "The library holds old maps, letters, and photographs of the town.",
    "Thinking step by step often leads to better answers.",
    "The old bridge was rebuilt in 1987 after the flood.",
    "Cats sleep for most of the day and hunt at night.",
    "The system message sets the tone of the whole conversation.",
    "Users ask questions; the assistant replies with useful answers.",
    "Mount Everest is the highest mountain above sea level.",
    "Water boils at 100 degrees at sea level.",
    "The committee met on Tuesday to discuss the new budget.",
    "He searched for the name of the first person to cross the desert.",
    "Small vocabularies make tests fast and easy to read.",
    "What is the population of the largest city in the region?",
    "The museum, the park, and the harbour are all close to the hotel.",
    "Every good answer starts with a good question.",
    "The café on the corner serves coffee and fresh bread.",
)

# A GPT-4-style split: letters with an optional leading symbol, digits in groups of up to
# three, punctuation runs, newlines, other whitespace.
_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML_TEMPLATE = r"""{%- set default_system = 'You are a careful assistant. Answer briefly and check facts.' %}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_text = messages[0]['content'] %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system_text = default_system %}
    {%- set rest = messages %}
{%- endif %}
{{- '<|im_start|>system\n' + system_text }}
{%- if tools %}
    {{- '\n\n## Available functions\nCall at most one per turn, written as <tool_call>{"name": ..., "arguments": ...}</tool_call>.\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- for message in rest %}
    {%- if message['role'] == 'assistant' and message['tool_calls'] is defined %}
        {{- '<|im_start|>assistant' }}
        {%- if message['content'] %}
            {{- '\n' + message['content'] }}
        {%- endif %}
        {%- for call in message['tool_calls'] %}
            {%- set call = call['function'] if call['function'] is defined else call %}
            {{- '\n<tool_call>\n' + {'name': call['name'], 'arguments': call['arguments']} | tojson + '\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message['role'] == 'tool' %}
        {%- if loop.first or rest[loop.index0 - 1]['role'] != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}
        {%- if loop.last or rest[loop.index0 + 1]['role'] != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(searching=true, last_query=messages | length - 1) %}
{%- for message in messages | reverse %}
    {%- set index = (messages | length - 1) - loop.index0 %}
    {%- if ns.searching and message.role == 'user' and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.searching = false %}
        {%- set ns.last_query = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- '<|im_start|>system\n' + message.content + '<|im_end|>\n' }}
        {%- endif %}
    {%- elif message.role == 'assistant' %}
        {%- set body = message.content %}
        {%- set thought = '' %}
        {%- if message.reasoning_content is string %}
            {%- set thought = message.reasoning_content %}
        {%- elif '</think>' in body %}
            {%- set thought = body.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set body = body.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query and thought %}
            {{- '<|im_start|>assistant\n<think>\n' + thought.strip('\n') + '\n</think>\n\n' + body.lstrip('\n') + '<|im_end|>\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + body + '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

LLAMA3_TEMPLATE = r"""{{- bos_token }}
{%- if date_string is not defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now('%d %b %Y') %}
    {%- else %}
        {%- set date_string = '1 Jan 2000' %}
    {%- endif %}
{%- endif %}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_text = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_text = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Date: ' + date_string + '\n\n' }}
{{- system_text + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('unsupported role ' + message['role'] + ' (expected user, assistant or tool)') }}
    {%- endif %}
    {%- if loop.first and message['role'] != 'user' %}
        {{- raise_exception('the conversation must start with a user message after the system message') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# style -> special tokens (in id order after the learned vocabulary), special flag, config.
_SPECIALS = {
    "chatml": ([("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True)],
               dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"),
               CHATML_TEMPLATE, ["<|im_end|>", "<|endoftext|>"]),
    "qwen3": ([("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
               ("<think>", False), ("</think>", False)],
              dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"),
              QWEN3_TEMPLATE, ["<|im_end|>", "<|endoftext|>"]),
    "llama3": ([("<|begin_of_text|>", True), ("<|end_of_text|>", True),
                ("<|start_header_id|>", True), ("<|end_header_id|>", True),
                ("<|eot_id|>", True)],
               dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
               LLAMA3_TEMPLATE, ["<|eot_id|>", "<|end_of_text|>"]),
}


def _train(vocab_size: int) -> Tokenizer:
  tok = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(SENTENCES) * 2, trainer=trainer)
  return tok


def write_tokenizer_dir(directory: str | os.PathLike, style: str, *,
                        vocab_size: int = 300) -> str:
  """Writes a tiny HF tokenizer directory of one family's style and returns its path.

  Args:
    directory: an existing folder to write into.
    style: "chatml" (Qwen2.5-like: no bos, eos `<|im_end|>`, pad `<|endoftext|>`, default
      system message, tools), "qwen3" (ChatML with `<think>` blocks and `enable_thinking`;
      NFC normalizer and a regex split before the byte-level step), or "llama3"
      (`<|begin_of_text|>` bos, `<|eot_id|>` eos, header tokens, a bos-adding
      post-processor, generation eos ids [eot, end_of_text]).
    vocab_size: size of the trained BPE vocabulary (256 bytes plus merges).

  Returns:
    `directory` as a string.

  Example:
    >>> d = write_tokenizer_dir(tempfile.mkdtemp(), "llama3")
    >>> transformers.AutoTokenizer.from_pretrained(d).bos_token
    '<|begin_of_text|>'
  """
  if style not in _SPECIALS:
    raise ValueError(f"unknown style {style!r}; expected one of {list(STYLES)}")
  specials, names, template, eos_tokens = _SPECIALS[style]
  tok = _train(vocab_size)
  for content, special in specials:
    added = AddedToken(content, special=special, normalized=False)
    if special:
      tok.add_special_tokens([added])
    else:
      tok.add_tokens([added])
  if style in ("qwen3", "llama3"):
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  if style == "qwen3":
    tok.normalizer = normalizers.NFC()
  if style == "llama3":
    bos = names["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))])
  directory = os.fspath(directory)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
            "clean_up_tokenization_spaces": False, "chat_template": template, **names}
  if style == "llama3":
    config["model_input_names"] = ["input_ids", "attention_mask"]
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
  generation = {"eos_token_id": [tok.token_to_id(t) for t in eos_tokens],
                "pad_token_id": tok.token_to_id(names.get("pad_token") or eos_tokens[0])}
  if names["bos_token"] is not None:
    generation["bos_token_id"] = tok.token_to_id(names["bos_token"])
  with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
    json.dump(generation, f, indent=2)
  return directory


# Conversations every style renders (user first after an optional system message).
_USER = {"role": "user", "content": "What is the capital of France?"}
CONVERSATIONS = {
    "user": [_USER],
    "system_user": [{"role": "system", "content": "Answer in one word."}, _USER],
    "multi_turn": [
        {"role": "system", "content": "  Be terse.\n"}, _USER,
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Germany, in 2024?"}],
    "unicode": [{"role": "user", "content": " naïve café, 東京タワー, emoji 🤖🚀 and ½ ²\n"},
                {"role": "assistant", "content": "Ελληνικά — ok"},
                {"role": "user", "content": "tabs\tand\n\nnewlines   "}],
    "thinking": [
        _USER, {"role": "assistant", "content": "<think>\nIt is Paris.\n</think>\n\nParis."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "<think>\nYes, sure.\n</think>\n\nYes."}],
    "reasoning_field": [
        _USER, {"role": "assistant", "content": "Paris.", "reasoning_content": "Easy one."}],
}

TOOLS = [{"type": "function", "function": {
    "name": "search", "description": "Search the web for a query.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                   "required": ["query"]}}}]

# ChatML only: a tool call and two tool responses (the chatml template merges them).
TOOL_CONVERSATION = [
    _USER,
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {
         "name": "search", "arguments": {"query": "capital of France"}}}]},
    {"role": "tool", "content": "Paris is the capital of France."},
    {"role": "tool", "content": "Population: 2.1 million (2024)."},
]
