"""Question lists drawn from a world's splits.

Example:
  >>> unique_questions(world.splits["train"])    # each question text once   # doctest: +SKIP
"""
from __future__ import annotations

from typing import Sequence

from jaxsearch.data.world import Question


def unique_questions(questions: Sequence[Question]) -> list[Question]:
  """The questions with repeated question texts dropped (splits sample with repetition)."""
  seen, out = set(), []
  for q in questions:
    if q.question not in seen:
      seen.add(q.question)
      out.append(q)
  return out
