"""Typed containers shared across jaxsearch, with shape comments.

Axis letters are fixed library-wide:
  B prompts, G generations per prompt, N = B * G rollout rows, T tokens, K retrieved docs,
  M documents in a corpus, V vocabulary, D embedding size, S search turns.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax

PyTree = Any


class Rollout(NamedTuple):
  """Multi-turn episodes, token-in / token-out, one row per sampled episode.

  Every row starts at position 0 with its prompt; the policy's tokens and the tokens the
  environment inserted (`<information>...</information>`) follow in one stream.
  """

  tokens: jax.Array         # [N, T] int32, prompt + policy + environment tokens, right-padded
  policy_mask: jax.Array    # [N, T] bool, True where the policy sampled the token (trained)
  env_mask: jax.Array       # [N, T] bool, True where the environment inserted the token
  turn_ids: jax.Array       # [N, T] int32, 0 for the prompt, s >= 1 for turn s (its info block too)
  logp: jax.Array           # [N, T] float32, behaviour log-prob of policy tokens (0 elsewhere)
  lengths: jax.Array        # [N] int32, number of valid tokens
  num_searches: jax.Array   # [N] int32, search calls answered with passages
  invalid_searches: jax.Array  # [N] int32, malformed or over-budget search calls
  retrieved: jax.Array      # [N, S, K] int32, doc indices retrieved per search turn (-1 if none)
  status: jax.Array         # [N] int32, an `EpisodeStatus` code


class SequenceBatch(NamedTuple):
  """Token sequences for teacher-forced training (SFT, policy-gradient updates)."""

  tokens: jax.Array         # [N, T] int32
  loss_mask: jax.Array      # [N, T] bool, tokens whose prediction is trained
