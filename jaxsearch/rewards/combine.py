"""Weighted combinations of registered host rewards, returning the total and every part.

The parts are looked up by name in `jaxsearch.rewards.qa.REWARDS`, so a gin file or config
can name them; the per-part values come back with the total for logging.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxsearch.rewards.qa import REWARDS

RewardFn = Callable[[Sequence[str], Sequence[Sequence[str]]],
                    tuple[np.ndarray, dict[str, np.ndarray]]]


def weighted_rewards(weights: Mapping[str, float]) -> RewardFn:
  """Builds `reward_fn` computing sum_k weights[k] * REWARDS[k](completions, golds).

  Names are resolved now, so a typo fails at construction, not at the first step. Zero
  weights are allowed: the part is still computed and reported (useful to log EM while
  training on F1).

  Args:
    weights: Non-empty mapping from a registered reward name to a finite weight.

  Returns:
    `reward_fn(completions, golds) -> (total [N] float32, parts {name: [N] float32})`;
    `parts` has one entry per name in `weights`, unweighted.

  Raises:
    LookupError: A name is not registered (the message lists the known names).
    ValueError: `weights` is empty or a weight is not a finite number.

  Example:
    >>> fn = weighted_rewards({"exact_match": 1.0, "format": 0.2})
    >>> total, parts = fn(["<answer>Paris</answer>"], [["paris"]])   # total [1.2]
  """
  if not weights:
    raise ValueError("weights must name at least one reward, got an empty mapping; known: "
                     f"{REWARDS.names()}")
  fns = {}
  ws = {}
  for name, w in weights.items():
    fns[name] = REWARDS.get(name)
    if isinstance(w, bool) or not isinstance(w, (int, float, np.number)) or not math.isfinite(w):
      raise ValueError(f"weight for reward {name!r} must be a finite number, got {w!r}")
    ws[name] = float(w)

  def reward_fn(completions, golds):
    if len(completions) != len(golds):
      raise ValueError(f"got {len(completions)} completions but {len(golds)} gold lists; "
                       "expected one gold list per completion")
    n = len(completions)
    parts = {}
    total = np.zeros([n], np.float32)
    for name, fn in fns.items():
      value = np.asarray(fn(completions, golds), np.float32)
      if value.shape != (n,):
        raise ValueError(f"reward {name!r} returned shape {value.shape}, expected ({n},)")
      parts[name] = value
      total = total + np.float32(ws[name]) * value
    return total.astype(np.float32), parts

  return reward_fn
