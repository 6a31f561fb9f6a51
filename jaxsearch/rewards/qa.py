"""Host-side question-answering rewards on decoded text: SQuAD EM / F1 and a format check.

These run on the host, on strings (a rollout is decoded once, after the episode ends), and
return numpy arrays that the caller turns into the `[N]` reward of a rollout.

The registry `REWARDS` lives here (not in `combine.py`) so that registering a reward and
defining it happen in the same module. Every entry has the uniform signature

  `reward_fn(completions: Sequence[str], golds: Sequence[Sequence[str]]) -> np.ndarray`

returning `[N] float32`, where `completions[i]` is the text the episode produced after the
prompt and `golds[i]` the accepted answers of its question. Registered names:
"exact_match", "f1" (both on the last `<answer>` of the completion) and "format".

Example:
  >>> REWARDS.get("exact_match")(["<answer>The Eiffel Tower</answer>"], [["eiffel tower"]])
  array([1.], dtype=float32)
"""
from __future__ import annotations

import collections
import re
import string
from typing import Callable, Sequence

import numpy as np

from jaxsearch.registry import Registry

HostRewardFn = Callable[[Sequence[str], Sequence[Sequence[str]]], np.ndarray]

REWARDS: Registry[HostRewardFn] = Registry("reward")

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
  """SQuAD v1.1 answer normalisation, exactly as the official evaluation script.

  Lower-cases, removes ASCII punctuation, removes the articles a/an/the as whole words and
  collapses whitespace (in that order: lower, punctuation, articles, whitespace).

  Args:
    s: Any answer string.

  Returns:
    The normalised string.

  Example:
    >>> normalize_answer("  The Eiffel-Tower, in   Paris! ")
    'eiffeltower in paris'
  """
  s = s.lower()
  s = "".join(ch for ch in s if ch not in _PUNCTUATION)
  s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


def _as_golds(golds: str | Sequence[str]) -> Sequence[str]:
  # A bare string is one gold answer, not a sequence of one-character answers.
  return [golds] if isinstance(golds, str) else golds


def exact_match(prediction: str | None, golds: str | Sequence[str]) -> float:
  """SQuAD exact match of `prediction` against the best of `golds`.

  Args:
    prediction: The predicted answer; None or a blank string scores 0.0.
    golds: Accepted answers (a bare string counts as one answer). No golds scores 0.0.

  Returns:
    1.0 if the normalised prediction equals some normalised gold, else 0.0.

  Example:
    >>> exact_match("the Beatles", ["Beatles", "The Fab Four"])
    1.0
  """
  if prediction is None or not prediction.strip():
    return 0.0
  pred = normalize_answer(prediction)
  return max((float(pred == normalize_answer(g)) for g in _as_golds(golds)), default=0.0)


def _f1_single(pred_tokens: list[str], gold: str) -> float:
  gold_tokens = normalize_answer(gold).split()
  common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(pred_tokens)
  recall = num_same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def f1(prediction: str | None, golds: str | Sequence[str]) -> float:
  """SQuAD token-level F1 of `prediction` against the best of `golds`.

  Tokens are the whitespace-split normalised strings; overlap counts multiplicity.

  Args:
    prediction: The predicted answer; None or a blank string scores 0.0.
    golds: Accepted answers (a bare string counts as one answer). No golds scores 0.0.

  Returns:
    max over golds of 2 * precision * recall / (precision + recall), in [0, 1].

  Example:
    >>> round(f1("Paris France", ["Paris"]), 4)   # precision 1/2, recall 1
    0.6667
  """
  if prediction is None or not prediction.strip():
    return 0.0
  pred_tokens = normalize_answer(prediction).split()
  return max((_f1_single(pred_tokens, g) for g in _as_golds(golds)), default=0.0)


# The last `<answer>` ... `</answer>` pair whose content holds no other `<answer>`.
_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
  """The content of the last complete `<answer>...</answer>` in `text`, stripped.

  An unclosed trailing `<answer>` is ignored; in `<answer>a <answer>b</answer>` the complete
  pair is the inner one.

  Args:
    text: A decoded completion.

  Returns:
    The stripped answer content (possibly ""), or None when there is no complete pair.

  Example:
    >>> extract_answer("<answer>x</answer> ... <answer> Paris </answer><answer>unfinished")
    'Paris'
  """
  matches = _ANSWER.findall(text)
  return matches[-1].strip() if matches else None


# --- format check -----------------------------------------------------------------------
#
# The completion is split on the four known tags. The result alternates
#   text, tag, text, tag, ..., text
# and is accepted when:
#   1. every text between two blocks (and before the first / after the last) is whitespace;
#   2. tags come in pairs `<x>` content `</x>` with the same x; the content holds no tag, so
#      nested and unclosed tags fail;
#   3. the block names, written t(hink) s(earch) i(nformation) a(nswer), fully match
#      `(t?si)*t?a`: any number of search turns, each answered by an information block, an
#      optional think before each search and before the answer, then exactly one answer;
#   4. search queries and the answer are non-empty after stripping (think and information
#      blocks may be empty: a retriever may return nothing).
_TAG = re.compile(r"(</?(?:think|search|information|answer)>)")
_GRAMMAR = re.compile(r"(?:t?si)*t?a")


def format_score(text: str) -> float:
  """1.0 if a completion follows the search-agent format, else 0.0.

  Accepted: whitespace-separated blocks `[<think>..</think>] <search>q</search>
  <information>..</information>` repeated zero or more times, then `[<think>..</think>]
  <answer>a</answer>`, with only whitespace after the answer. Rejected: nested or unclosed
  tags, empty queries or answers, any other text between or after blocks. Decode with
  special tokens skipped (an end-of-turn token after the answer counts as text).

  Args:
    text: The completion, i.e. what follows the prompt (including inserted information).

  Returns:
    1.0 or 0.0.

  Example:
    >>> format_score("<search>q</search><information>d</information> <answer>a</answer>")
    1.0
  """
  parts = _TAG.split(text)
  texts, tags = parts[0::2], parts[1::2]
  if len(tags) % 2:
    return 0.0
  # Block k is tags[2k] texts[2k + 1] tags[2k + 1]; texts[0], texts[2], ... lie outside.
  if any(t.strip() for t in texts[0::2]):
    return 0.0
  names = []
  for i in range(0, len(tags), 2):
    opening, closing = tags[i], tags[i + 1]
    if opening.startswith("</") or closing != "</" + opening[1:]:
      return 0.0
    name = opening[1:-1]
    content = texts[i + 1]
    if name in ("search", "answer") and not content.strip():
      return 0.0
    names.append(name[0])
  return 1.0 if _GRAMMAR.fullmatch("".join(names)) else 0.0


def _check_lengths(completions: Sequence[str], golds: Sequence) -> None:
  if len(completions) != len(golds):
    raise ValueError(f"got {len(completions)} completions but {len(golds)} gold lists; "
                     "expected one gold list per completion")


@REWARDS.register("exact_match")
def exact_match_reward(completions: Sequence[str],
                       golds: Sequence[Sequence[str]]) -> np.ndarray:
  """Exact match of each completion's last `<answer>` (0 when there is none).

  Args:
    completions: N decoded completions.
    golds: N lists of accepted answers.

  Returns:
    [N] float32 in {0, 1}.

  Example:
    >>> exact_match_reward(["<answer>Paris</answer>", "Paris"], [["paris"], ["paris"]])
    array([1., 0.], dtype=float32)
  """
  _check_lengths(completions, golds)
  return np.asarray([exact_match(extract_answer(c), g) for c, g in zip(completions, golds)],
                    np.float32)


@REWARDS.register("f1")
def f1_reward(completions: Sequence[str], golds: Sequence[Sequence[str]]) -> np.ndarray:
  """Token F1 of each completion's last `<answer>` (0 when there is none).

  Args:
    completions: N decoded completions.
    golds: N lists of accepted answers.

  Returns:
    [N] float32 in [0, 1].

  Example:
    >>> f1_reward(["<answer>Paris France</answer>"], [["paris"]])
    array([0.6666667], dtype=float32)
  """
  _check_lengths(completions, golds)
  return np.asarray([f1(extract_answer(c), g) for c, g in zip(completions, golds)],
                    np.float32)


@REWARDS.register("format")
def format_reward(completions: Sequence[str],
                  golds: Sequence[Sequence[str]] | None = None) -> np.ndarray:
  """`format_score` of each completion; golds are ignored (kept for the uniform signature).

  Args:
    completions: N decoded completions.
    golds: Ignored; if given, must have N entries.

  Returns:
    [N] float32 in {0, 1}.

  Example:
    >>> format_reward(["<answer>a</answer>", "a"], [[], []])
    array([1., 0.], dtype=float32)
  """
  if golds is not None:
    _check_lengths(completions, golds)
  return np.asarray([format_score(c) for c in completions], np.float32)
