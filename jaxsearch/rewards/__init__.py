"""Host-side rewards on decoded text (SQuAD EM / F1, format) and their weighted combination.

Example:
  >>> from jaxsearch import rewards
  >>> reward_fn = rewards.weighted_rewards({"exact_match": 1.0, "format": 0.1})
  >>> total, parts = reward_fn(["<answer> Paris </answer>"], [["Paris"]])
"""
from jaxsearch.rewards.combine import weighted_rewards
from jaxsearch.rewards.qa import (REWARDS, exact_match, extract_answer, f1, format_score,
                                  normalize_answer)

__all__ = ["REWARDS", "exact_match", "extract_answer", "f1", "format_score", "normalize_answer",
           "weighted_rewards"]
