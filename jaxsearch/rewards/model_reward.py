"""A trained reward model as a host reward function for the RL loop.

`reward_model_reward(apply_fn, params, tokenizer)` returns a `ModelReward`, which scores
episodes in two ways:

- `score_tokens(tokens [N, T], lengths [N]) -> [N]`: on the token ids of whole episodes
  (prompt + policy + environment tokens, right-padded), exactly as a `Rollout` holds them.
  This is the token-in, token-out path: no text is decoded or re-tokenized.
- `__call__(completions, golds, prompts=None) -> [N]`: the signature of the `REWARDS` entries
  (`jaxsearch.rewards.qa`), on decoded text. A reward model judges an answer against its
  question, so it needs the prompt: pass `prompts[i]`, the decoded prompt of episode i (e.g.
  "Question: In which city ..."), or completions that already start with the prompt. `golds`
  is ignored (the model does not see the answer key).

Text is turned back into the ids a rollout would hold: `[bos]`, then each tag of the search
protocol as its single id and each stretch of text between tags, stripped, encoded on its
own (`encode_episode`). With the SentencePiece tokenizer this reproduces the rollout's ids
exactly for episodes built from search calls, `<information>` blocks and answers (a test
checks it on teacher demonstrations), because segmentation never crosses a space.

Scoring runs one jitted program per (batch size, width bucket): rows are padded to a multiple
of `batch_size`, widths rounded up to a multiple of `width_multiple`.

Load a trained model from a reward-model workdir with
`jaxsearch.programs.reward_model.load_reward_fn(workdir)`.

Example:
  >>> reward = reward_model_reward(model.apply, params, tokenizer)
  >>> reward.score_tokens(rollout.tokens, rollout.lengths)             # [N] float32
  >>> reward(["<answer> Paris</answer>"], [["Paris"]],
  ...        prompts=["Question: What is the capital of France?"])    # [1] float32
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.types import PyTree

# The search protocol's tags (as `jaxsearch.data.tokenizer.TAGS`), each a single token id.
PROTOCOL_TAGS = ("<search>", "</search>", "<information>", "</information>", "<answer>",
                 "</answer>", "<think>", "</think>")
_TAG_RE = re.compile("(" + "|".join(re.escape(t) for t in PROTOCOL_TAGS) + ")")

# apply_fn({"params": params}, tokens [B, T] int32, lengths [B] int32) -> rewards [B] float32
RewardApplyFn = Callable[[dict, jax.Array, jax.Array], jax.Array]


def encode_episode(tokenizer: Any, text: str, *, bos: bool = True) -> list[int]:
  """Token ids of an episode's text as a rollout holds them.

  Each protocol tag becomes its single id (`tokenizer.tag_id`); the text between tags is
  stripped and encoded on its own (nothing is emitted for blank stretches).

  Args:
    tokenizer: has `encode`, `tag_id` and `bos_id`.
    text: decoded prompt and/or completion.
    bos: start with `tokenizer.bos_id` (rollouts and reward-model data do).

  Returns:
    The ids.

  Example:
    >>> encode_episode(tok, "Question: Who?<answer> Mira</answer>")
    [bos, *encode("Question: Who?"), tag("<answer>"), *encode("Mira"), tag("</answer>")]
  """
  ids = [tokenizer.bos_id] if bos else []
  for i, part in enumerate(_TAG_RE.split(text)):
    if i % 2:
      ids.append(tokenizer.tag_id(part))
    elif part.strip():
      ids.extend(tokenizer.encode(part.strip()))
  return ids


class ModelReward:
  """A reward model's scores as a host reward (see the module docstring).

  Attributes:
    batch_size: rows per compiled call.
    width_multiple: widths are rounded up to a multiple of this.
  """

  def __init__(self, apply_fn: RewardApplyFn, params: PyTree, tokenizer: Any, *,
               batch_size: int = 64, width_multiple: int = 32):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if width_multiple < 1:
      raise ValueError(f"width_multiple must be >= 1, got {width_multiple}")
    self.params = params
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self.width_multiple = width_multiple
    self._apply = jax.jit(lambda p, t, n: apply_fn({"params": p}, t, n))

  def score_tokens(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Rewards of right-padded token sequences.

    Args:
      tokens: [N, T] int ids; positions at or after a row's length are ignored.
      lengths: [N] int valid tokens per row (>= 1).

    Returns:
      [N] float32.
    """
    tokens, lengths = np.asarray(tokens), np.asarray(lengths, np.int32)
    if tokens.ndim != 2 or lengths.shape != (tokens.shape[0],):
      raise ValueError(f"tokens must be [N, T] and lengths [N], got {tokens.shape} and "
                       f"{lengths.shape}")
    n = tokens.shape[0]
    if n == 0:
      return np.zeros([0], np.float32)
    if lengths.min() < 1 or lengths.max() > tokens.shape[1]:
      raise ValueError(f"lengths must be in [1, T={tokens.shape[1]}], got "
                       f"[{lengths.min()}, {lengths.max()}]")
    pad = self.tokenizer.pad_id
    width = -(-int(lengths.max()) // self.width_multiple) * self.width_multiple
    rows = -(-n // self.batch_size) * self.batch_size
    padded = np.full((rows, width), pad, np.int32)
    cols = min(width, tokens.shape[1])
    padded[:n, :cols] = tokens[:, :cols]
    padded[:n] = np.where(np.arange(width)[None, :] < lengths[:, None], padded[:n], pad)
    lens = np.ones([rows], np.int32)
    lens[:n] = lengths
    out = []
    for start in range(0, rows, self.batch_size):
      sl = slice(start, start + self.batch_size)
      out.append(np.asarray(self._apply(self.params, jnp.asarray(padded[sl]),
                                        jnp.asarray(lens[sl]))))
    return np.concatenate(out)[:n].astype(np.float32)

  def score_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Rewards of whole episode texts (prompt and completion), re-encoded by `encode_episode`."""
    seqs = [encode_episode(self.tokenizer, t) for t in texts]
    width = max([len(s) for s in seqs], default=1)
    tokens = np.full((len(seqs), width), self.tokenizer.pad_id, np.int32)
    for i, s in enumerate(seqs):
      tokens[i, : len(s)] = s
    return self.score_tokens(tokens, np.array([len(s) for s in seqs], np.int32))

  def __call__(self, completions: Sequence[str], golds: Sequence[Sequence[str]] | None = None,
               prompts: Sequence[str] | None = None) -> np.ndarray:
    """Rewards of decoded completions, with the `REWARDS` signature.

    Args:
      completions: N decoded completions (what follows each prompt), or whole episodes when
        `prompts` is None.
      golds: ignored (kept for the uniform signature); if given, must have N entries.
      prompts: N decoded prompts, prepended to the completions.

    Returns:
      [N] float32.
    """
    if golds is not None and len(golds) != len(completions):
      raise ValueError(f"got {len(completions)} completions but {len(golds)} gold lists; "
                       "expected one gold list per completion")
    if prompts is None:
      texts = list(completions)
    else:
      if len(prompts) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(prompts)} prompts")
      texts = [p + c for p, c in zip(prompts, completions)]
    return self.score_texts(texts)


def reward_model_reward(apply_fn: RewardApplyFn, params: PyTree, tokenizer: Any, *,
                        batch_size: int = 64, width_multiple: int = 32) -> ModelReward:
  """Wraps a trained reward model into a host reward function.

  Args:
    apply_fn: `apply_fn({"params": params}, tokens [B, T], lengths [B]) -> [B]`, e.g.
      `RewardModel(cfg).apply`.
    params: the reward model's parameters.
    tokenizer: the tokenizer the reward model was trained with (the policy's, for token ids
      to mean the same thing); needs `encode`, `tag_id`, `bos_id`, `pad_id`.
    batch_size: rows per compiled call.
    width_multiple: sequence widths are rounded up to a multiple of this.

  Returns:
    A `ModelReward`: `reward(completions, golds, prompts=None) -> [N]` and
    `reward.score_tokens(tokens, lengths) -> [N]`.

  Example:
    >>> reward = reward_model_reward(RewardModel(cfg).apply, params, tokenizer)
  """
  return ModelReward(apply_fn, params, tokenizer, batch_size=batch_size,
                     width_multiple=width_multiple)
