"""Turn-level credit assignment for multi-turn search agents (pure, jittable).

A rollout row is one episode: the prompt, then turns s = 1..K, each the policy's tokens
(reasoning, a `<search>` call, or the `<answer>`) followed by the environment's
`<information>` block. `turn_ids [N, T]` (as in `types.Rollout`) holds 0 for the prompt and
s for every token of turn s, its information block included. Per-turn quantities are
`[N, K]` arrays whose column k-1 belongs to turn k.

Pieces:
  - `turn_sums` / `broadcast_turns`: tokens -> turns (sum) and turns -> tokens (copy).
  - `turn_returns`: discounted reward-to-go over a row's turns.
  - `turn_level_advantages`: group-normalised turn returns, per token.
  - `dual_level_advantages`: trajectory (GRPO) + weight * turn-level advantages (MatchTIR's
    dual-level estimation, PORTool-style blending).
  - `information_gain_rewards`, `igpo_turn_rewards`: IGPO's turn reward, the increase of
    the policy's log-probability of the gold answer after each turn, and
    `gold_answer_logprobs`, which computes those log-probs with one teacher-forced pass.
  - `implicit_process_rewards`: beta * (log pi - log pi_ref) per token (implicit PRM /
    PRIME); sum them per turn with `turn_sums` for step rewards.

Registered in `advantages.TOKEN_ADVANTAGES`: "turn_level" and "dual_level".

Example:
  >>> turn_ids = jnp.array([[0, 1, 1, 1, 2, 2, 0]])        # prompt, turn 1, turn 2, padding
  >>> r = jnp.array([[0.0, 1.0]])                           # reward of turns 1 and 2
  >>> adv, turn_adv = turn_level_advantages(r, turn_ids, jnp.array([0]), scale="none")
  >>> print(adv)                   # a group of one row is its own baseline: 0 everywhere
  [[0. 0. 0. 0. 0. 0. 0.]]
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxsearch.losses.advantages import (SCALES, TOKEN_ADVANTAGES, grpo_advantages,
                                         group_moments)
from jaxsearch.losses.policy import token_logprobs

NORMALIZE = ("returns", "rewards")


def _turn_onehot(turn_ids: jax.Array, num_turns: int) -> jax.Array:
  """[N, T, K] bool: token t belongs to turn k+1."""
  turn_ids = jnp.asarray(turn_ids)
  if turn_ids.ndim != 2:
    raise ValueError(f"turn_ids must be [N, T], got shape {turn_ids.shape}")
  return turn_ids[..., None] == jnp.arange(1, num_turns + 1, dtype=turn_ids.dtype)


def present_turns(turn_ids: jax.Array, num_turns: int,
                  valid_mask: Optional[jax.Array] = None) -> jax.Array:
  """Which turns 1..K occur in each row.

  Args:
    turn_ids: [N, T] int, 0 for the prompt, s >= 1 for turn s.
    num_turns: K, static.
    valid_mask: Optional [N, T] bool of real (non-padding) tokens; needed when padding
      carries a turn id >= 1.

  Returns:
    [N, K] bool.

  Example:
    >>> print(present_turns(jnp.array([[0, 1, 1, 0]]), 3))
    [[ True False False]]
  """
  hot = _turn_onehot(turn_ids, num_turns)
  if valid_mask is not None:
    hot = hot & jnp.asarray(valid_mask, bool)[..., None]
  return hot.any(axis=1)


def turn_sums(token_values: jax.Array, turn_ids: jax.Array, num_turns: int,
              mask: Optional[jax.Array] = None) -> jax.Array:
  """Sums a per-token quantity over the tokens of each turn.

  Args:
    token_values: [N, T] float, e.g. `implicit_process_rewards(...)`.
    turn_ids: [N, T] int turn of each token.
    num_turns: K, static.
    mask: Optional [N, T] bool; only these tokens are summed (values elsewhere, even NaN,
      are ignored).

  Returns:
    [N, K] float32, column k-1 the sum over turn k (0 for absent turns).

  Example:
    >>> print(turn_sums(jnp.array([[9., 1., 2., 4.]]), jnp.array([[0, 1, 1, 2]]), 2))
    [[3. 4.]]
  """
  x = jnp.asarray(token_values, jnp.float32)
  hot = _turn_onehot(turn_ids, num_turns)
  if mask is not None:
    hot = hot & jnp.asarray(mask, bool)[..., None]
  return jnp.sum(jnp.where(hot, x[..., None], 0.0), axis=1)


def broadcast_turns(turn_values: jax.Array, turn_ids: jax.Array) -> jax.Array:
  """Copies each turn's value to the tokens of that turn.

  Args:
    turn_values: [N, K] float.
    turn_ids: [N, T] int; tokens of turn s in 1..K get `turn_values[:, s-1]`, the prompt
      (0) and ids > K get 0.

  Returns:
    [N, T] float32.

  Example:
    >>> print(broadcast_turns(jnp.array([[5., 7.]]), jnp.array([[0, 1, 1, 2, 3]])))
    [[0. 5. 5. 7. 0.]]
  """
  turn_values = jnp.asarray(turn_values, jnp.float32)
  turn_ids = jnp.asarray(turn_ids)
  k = turn_values.shape[1]
  idx = jnp.clip(turn_ids - 1, 0, k - 1)
  picked = jnp.take_along_axis(turn_values, idx.astype(jnp.int32), axis=1)
  return jnp.where((turn_ids >= 1) & (turn_ids <= k), picked, 0.0)


def turn_returns(turn_rewards: jax.Array, turn_mask: Optional[jax.Array] = None, *,
                 gamma: float = 1.0) -> jax.Array:
  """Discounted reward-to-go over each row's valid turns: `G_k = r_k + gamma * G_k'`.

  k' is the next valid turn (invalid turns are skipped and their rewards ignored).

  Args:
    turn_rewards: [N, K] float.
    turn_mask: Optional [N, K] bool of valid turns; None: all.
    gamma: Discount per turn.

  Returns:
    [N, K] float32, 0 at invalid turns.

  Example:
    >>> print(turn_returns(jnp.array([[1., 0., 2.]]), gamma=0.5))   # 1 + .5 * (0 + .5 * 2)
    [[1.5 1.  2. ]]
  """
  r = jnp.asarray(turn_rewards, jnp.float32)
  m = jnp.ones(r.shape, bool) if turn_mask is None else jnp.asarray(turn_mask, bool)
  r = jnp.where(m, r, 0.0)

  def step(next_g, x):
    rk, mk = x
    g = rk + gamma * next_g
    return jnp.where(mk, g, next_g), jnp.where(mk, g, 0.0)

  _, g = jax.lax.scan(step, jnp.zeros([r.shape[0]], jnp.float32), (r.T, m.T), reverse=True)
  return g.T


def _normalize_entries(x, valid, group_ids, scale, eps):
  """(x - mean) / (std + eps) over the valid [N, K] entries of each group (or the batch)."""
  group_ids = jnp.asarray(group_ids)
  if scale == "batch":
    same = jnp.ones([x.shape[0], x.shape[0]], bool)
  else:
    same = group_ids[:, None] == group_ids[None, :]
  mean, var, _ = group_moments(x, same, valid)
  centered = x - mean[:, None]
  if scale != "none":
    centered = centered / (jnp.sqrt(var)[:, None] + eps)
  return jnp.where(valid, centered, 0.0)


@TOKEN_ADVANTAGES.register("turn_level")
def turn_level_advantages(turn_rewards: jax.Array, turn_ids: jax.Array, group_ids: jax.Array,
                          *, turn_mask: Optional[jax.Array] = None, gamma: float = 1.0,
                          scale: str = "group", normalize: str = "returns",
                          eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """Turn-level advantages from per-turn rewards, normalised over each prompt's group.

  With normalize="returns" (default): each turn's discounted reward-to-go `G_k`
  (`turn_returns`) is normalised against all valid turns of all rows in the same group:
  `A_k = (G_k - mean) / (std + eps)` (ddof=1; scale="batch" uses every valid turn of the
  batch, scale="none" only subtracts the group mean). With normalize="rewards" (IGPO's
  order): the turn *rewards* are normalised that way first, then
  `A_k = sum_{j >= k} gamma^(j-k) * rnorm_j`. Every token of turn k gets A_k (its
  environment tokens too; the policy mask removes them in the loss); the prompt gets 0.

  Args:
    turn_rewards: [N, K] float, column k-1 the reward of turn k.
    turn_ids: [N, T] int, 0 for the prompt, s >= 1 for turn s.
    group_ids: [N] int prompt group of each row.
    turn_mask: Optional [N, K] bool of valid turns; None: turns that occur in turn_ids.
    gamma: Discount per turn.
    scale: One of `advantages.SCALES` (static).
    normalize: "returns" or "rewards" (static).
    eps: Added to the std.

  Returns:
    (token advantages [N, T], turn advantages [N, K]) float32; 0 at invalid turns.

  Example:
    >>> turn_ids = jnp.array([[0, 1, 1, 2], [0, 1, 2, 2]])
    >>> r = jnp.array([[0., 1.], [0., 0.]])
    >>> adv, ta = turn_level_advantages(r, turn_ids, jnp.array([0, 0]), scale="none")
    >>> print(ta)                  # returns [[1, 1], [0, 0]] minus the group mean .5
    [[ 0.5  0.5]
     [-0.5 -0.5]]
    >>> print(adv)
    [[ 0.   0.5  0.5  0.5]
     [ 0.  -0.5 -0.5 -0.5]]
  """
  if scale not in SCALES:
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
  if normalize not in NORMALIZE:
    raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
  r = jnp.asarray(turn_rewards, jnp.float32)
  if r.ndim != 2:
    raise ValueError(f"turn_rewards must be [N, K], got shape {r.shape}")
  k = r.shape[1]
  valid = present_turns(turn_ids, k) if turn_mask is None else jnp.asarray(turn_mask, bool)
  if valid.shape != r.shape:
    raise ValueError(f"turn_mask must be [N, K] = {r.shape}, got {valid.shape}")
  if normalize == "returns":
    turn_adv = _normalize_entries(turn_returns(r, valid, gamma=gamma), valid, group_ids,
                                  scale, eps)
  else:
    turn_adv = turn_returns(_normalize_entries(r, valid, group_ids, scale, eps), valid,
                            gamma=gamma)
  return broadcast_turns(turn_adv, turn_ids), turn_adv


@TOKEN_ADVANTAGES.register("dual_level")
def dual_level_advantages(turn_rewards: jax.Array, turn_ids: jax.Array,
                          outcome_rewards: jax.Array, group_ids: jax.Array, *,
                          turn_weight: float = 1.0, turn_mask: Optional[jax.Array] = None,
                          gamma: float = 1.0, scale: str = "group",
                          normalize: str = "returns", eps: float = 1e-6,
                          ) -> tuple[jax.Array, jax.Array]:
  """Dual-level advantages: trajectory-level GRPO plus weighted turn-level advantages.

  `A[n, t] = grpo_advantages(outcome_rewards, group_ids, scale)[n]
             + turn_weight * turn_level_advantages(turn_rewards, ...)[n, t]`
  Every token shares its trajectory's outcome advantage, and turns that earned more than
  the group's other turns get extra credit (MatchTIR's dual-level estimation; PORTool
  blends fork- and trajectory-relative advantages the same way). turn_weight = 0 is GRPO.

  Args:
    turn_rewards: [N, K] float per-turn rewards.
    turn_ids: [N, T] int turn of each token.
    outcome_rewards: [N] float trajectory rewards.
    group_ids: [N] int prompt group.
    turn_weight: Weight of the turn-level term (Python or traced scalar).
    turn_mask, gamma, scale, normalize, eps: as `turn_level_advantages` (scale is used
      for both levels).

  Returns:
    (advantages [N, T], trajectory advantages [N]) float32.

  Example:
    >>> turn_ids = jnp.array([[0, 1, 2], [0, 1, 2]])
    >>> adv, traj = dual_level_advantages(jnp.array([[1., 0.], [0., 0.]]), turn_ids,
    ...     jnp.array([1., 0.]), jnp.array([0, 0]), turn_weight=0.5, scale="none")
    >>> print(traj)
    [ 0.5 -0.5]
    >>> print(adv)      # traj + .5 * (turn returns [[1, 0], [0, 0]] - their mean .25)
    [[ 0.5    0.875  0.375]
     [-0.5   -0.625 -0.625]]
  """
  traj = grpo_advantages(outcome_rewards, group_ids, scale=scale, eps=eps)
  turn_adv, _ = turn_level_advantages(turn_rewards, turn_ids, group_ids, turn_mask=turn_mask,
                                      gamma=gamma, scale=scale, normalize=normalize, eps=eps)
  return traj[:, None] + turn_weight * turn_adv, traj


def information_gain_rewards(gold_logp: jax.Array, turn_mask: Optional[jax.Array] = None, *,
                             space: str = "log") -> jax.Array:
  """IGPO turn rewards: how much each turn raised the policy's belief in the gold answer.

  `IG_k = f(gold_logp[:, k]) - f(gold_logp[:, k-1])` for k = 1..K, where gold_logp[:, k] is
  log p(gold answer | prompt + turns 1..k) (column 0: the prompt alone; compute it with
  `gold_answer_logprobs`) and f is the identity (space="log", the log-likelihood gain) or
  exp (space="prob", the probability gain of the IGPO abstract, in [-1, 1]). Turns outside
  `turn_mask` get 0; an absent turn leaves the prefix unchanged, so its gain would be 0
  anyway when gold_logp comes from `gold_answer_logprobs`.

  Args:
    gold_logp: [N, K+1] float gold-answer log-probs after 0..K turns.
    turn_mask: Optional [N, K] bool of valid turns.
    space: "log" or "prob" (static).

  Returns:
    [N, K] float32 rewards; the sum over a row's turns telescopes to
    f(after the last turn) - f(prompt only).

  Example:
    >>> ig = information_gain_rewards(jnp.log(jnp.array([[.1, .4, .8]])))
    >>> import numpy as np
    >>> print(np.asarray(ig).round(4))    # [[log 4, log 2]]
    [[1.3863 0.6931]]
  """
  if space not in ("log", "prob"):
    raise ValueError(f"space must be 'log' or 'prob', got {space!r}")
  g = jnp.asarray(gold_logp, jnp.float32)
  if g.ndim != 2 or g.shape[1] < 2:
    raise ValueError(f"gold_logp must be [N, K+1] with K >= 1, got shape {g.shape}")
  if space == "prob":
    g = jnp.exp(g)
  ig = g[:, 1:] - g[:, :-1]
  if turn_mask is not None:
    ig = jnp.where(jnp.asarray(turn_mask, bool), ig, 0.0)
  return ig


def igpo_turn_rewards(gold_logp: jax.Array, outcome_rewards: jax.Array,
                      turn_mask: jax.Array, *, space: str = "log") -> jax.Array:
  """IGPO's dense turn rewards: information gain, and the outcome reward on the last turn.

  The final (answer) turn is rewarded by the outcome (EM / F1), every earlier valid turn by
  its information gain (`information_gain_rewards`). Feed the result to
  `turn_level_advantages(..., normalize="rewards")` for IGPO's group-normalised,
  discounted turn advantages.

  Args:
    gold_logp: [N, K+1] float gold-answer log-probs after 0..K turns.
    outcome_rewards: [N] float.
    turn_mask: [N, K] bool valid turns (each row's turns a prefix 1..K_n).
    space: "log" or "prob".

  Returns:
    [N, K] float32; rows without valid turns are all 0.

  Example:
    >>> g = jnp.log(jnp.array([[.1, .4, .8, .8]]))
    >>> r = igpo_turn_rewards(g, jnp.array([1.]), jnp.array([[True, True, False]]))
    >>> import numpy as np
    >>> print(np.asarray(r).round(4))     # [[log 4, 1, 0]]: turn 2 is the last valid turn
    [[1.3863 1.     0.    ]]
  """
  turn_mask = jnp.asarray(turn_mask, bool)
  ig = information_gain_rewards(gold_logp, turn_mask, space=space)
  k = turn_mask.shape[1]
  last = k - 1 - jnp.argmax(turn_mask[:, ::-1], axis=1)                     # [N]
  is_last = (jnp.arange(k)[None, :] == last[:, None]) & turn_mask
  return jnp.where(is_last, jnp.asarray(outcome_rewards, jnp.float32)[:, None], ig)


class GoldScoringBatch(NamedTuple):
  """The teacher-forced batch of `build_gold_scoring_batch`: M = N * (K+1) rows."""

  tokens: jax.Array       # [M, T + L] int32, prefix through turn k, then the gold answer, pad
  gold_start: jax.Array   # [M] int32, position of the first gold token (= prefix length)
  gold_mask: jax.Array    # [M, L] bool, real gold tokens (row n's gold_mask, repeated)


def build_gold_scoring_batch(tokens: jax.Array, turn_ids: jax.Array, valid_mask: jax.Array,
                             gold_tokens: jax.Array, gold_mask: jax.Array, *,
                             num_turns: int, pad_id: int = 0) -> GoldScoringBatch:
  """Builds, for every row and every turn boundary k = 0..K, prefix(k) + gold answer.

  prefix(k) is the row's tokens with turn id <= k (the prompt, then turns 1..k with their
  information blocks). Valid tokens must form a prefix of the row and turn ids must not
  decrease along it (as in `types.Rollout`), so prefix(k) = tokens[:end_k]. Row n*(K+1)+k
  of the result is prefix(k) followed by the gold answer tokens, right-padded with pad_id.
  The prompt must be non-empty (end_0 >= 1: something predicts the first gold token).

  Args:
    tokens: [N, T] int token ids.
    turn_ids: [N, T] int turn of each token.
    valid_mask: [N, T] bool real tokens (e.g. `arange(T) < lengths[:, None]`).
    gold_tokens: [N, L] int gold answer tokens (as the policy would write them, e.g.
      "<answer> Paris </answer>"), right-padded.
    gold_mask: [N, L] bool real gold tokens.
    num_turns: K, static.
    pad_id: Token written after the gold answer.

  Returns:
    A `GoldScoringBatch` with M = N * (K+1) rows of width T + L.

  Example:
    >>> b = build_gold_scoring_batch(jnp.array([[5, 6, 7]]), jnp.array([[0, 1, 1]]),
    ...     jnp.ones([1, 3], bool), jnp.array([[9]]), jnp.ones([1, 1], bool), num_turns=1)
    >>> print(b.tokens)
    [[5 9 0 0]
     [5 6 7 9]]
    >>> print(b.gold_start)
    [1 3]
  """
  tokens = jnp.asarray(tokens)
  turn_ids = jnp.asarray(turn_ids)
  valid_mask = jnp.asarray(valid_mask, bool)
  gold_tokens = jnp.asarray(gold_tokens)
  gold_mask = jnp.asarray(gold_mask, bool)
  n, t = tokens.shape
  length = gold_tokens.shape[1]
  if turn_ids.shape != (n, t) or valid_mask.shape != (n, t):
    raise ValueError(f"turn_ids and valid_mask must be [N, T] = {(n, t)}, got "
                     f"{turn_ids.shape} and {valid_mask.shape}")
  if gold_tokens.shape[0] != n or gold_mask.shape != gold_tokens.shape:
    raise ValueError(f"gold_tokens and gold_mask must be [N={n}, L] alike, got "
                     f"{gold_tokens.shape} and {gold_mask.shape}")
  ks = jnp.arange(num_turns + 1, dtype=turn_ids.dtype)
  end = jnp.sum(valid_mask[:, None, :] & (turn_ids[:, None, :] <= ks[None, :, None]),
                axis=-1).astype(jnp.int32)                                   # [N, K+1]
  pos = jnp.arange(t + length, dtype=jnp.int32)                              # [W]
  rel = pos[None, None, :] - end[..., None]                                  # [N, K+1, W]
  from_prefix = jnp.take_along_axis(
      tokens, jnp.clip(pos, 0, t - 1)[None, :].repeat(n, 0), axis=1)        # [N, W]
  from_gold = jnp.take_along_axis(
      jnp.broadcast_to(gold_tokens[:, None, :], (n, num_turns + 1, length)),
      jnp.clip(rel, 0, length - 1), axis=2)                                  # [N, K+1, W]
  gold_ok = jnp.take_along_axis(
      jnp.broadcast_to(gold_mask[:, None, :], (n, num_turns + 1, length)),
      jnp.clip(rel, 0, length - 1), axis=2) & (rel >= 0) & (rel < length)
  seq = jnp.where(rel < 0, from_prefix[:, None, :], jnp.where(gold_ok, from_gold, pad_id))
  m = n * (num_turns + 1)
  return GoldScoringBatch(
      tokens=seq.reshape(m, t + length).astype(jnp.int32),
      gold_start=end.reshape(m),
      gold_mask=jnp.repeat(gold_mask, num_turns + 1, axis=0))


def gold_answer_logprobs(apply_fn: Callable, variables, tokens: jax.Array,
                         turn_ids: jax.Array, valid_mask: jax.Array, gold_tokens: jax.Array,
                         gold_mask: jax.Array, *, num_turns: int, pad_id: int = 0,
                         length_normalize: bool = False) -> jax.Array:
  """log p(gold answer | prefix through turn k) for k = 0..K, in one teacher-forced pass.

  Builds `build_gold_scoring_batch` (N * (K+1) rows of width T + L), runs
  `apply_fn(variables, tokens[:, :-1]) -> logits` once, and sums the log-probs of the gold
  tokens (or averages them with length_normalize=True, a per-token geometric mean). The
  model must be causal (position p sees tokens <= p), so right padding is harmless.
  Memory: the logits are [N * (K+1), T + L - 1, V]; chunk N for large vocabularies.

  Args:
    apply_fn: `apply_fn(variables, tokens [M, W]) -> logits [M, W, V]`.
    variables: The model variables, e.g. `{"params": params}`.
    tokens, turn_ids, valid_mask, gold_tokens, gold_mask, num_turns, pad_id: as
      `build_gold_scoring_batch`.
    length_normalize: Mean instead of sum over the gold tokens.

  Returns:
    [N, K+1] float32; feed it to `information_gain_rewards`.

  Example:
    >>> uniform = lambda variables, t: jnp.zeros(t.shape + (10,))     # p = 1/10 per token
    >>> g = gold_answer_logprobs(uniform, {}, jnp.array([[5, 6, 7]]), jnp.array([[0, 1, 1]]),
    ...     jnp.ones([1, 3], bool), jnp.array([[8, 9]]), jnp.ones([1, 2], bool), num_turns=1)
    >>> import numpy as np
    >>> print(np.asarray(g).round(4))     # [[-2 log 10, -2 log 10]]
    [[-4.6052 -4.6052]]
    >>> # with a real model, feed g to information_gain_rewards
  """
  batch = build_gold_scoring_batch(tokens, turn_ids, valid_mask, gold_tokens, gold_mask,
                                   num_turns=num_turns, pad_id=pad_id)
  logits = apply_fn(variables, batch.tokens[:, :-1])
  lp = token_logprobs(logits, batch.tokens[:, 1:])                          # [M, W-1]
  length = batch.gold_mask.shape[1]
  idx = batch.gold_start[:, None] - 1 + jnp.arange(length, dtype=jnp.int32)[None, :]
  picked = jnp.take_along_axis(lp, jnp.clip(idx, 0, lp.shape[1] - 1), axis=1)   # [M, L]
  total = jnp.sum(jnp.where(batch.gold_mask, picked, 0.0), axis=1)
  if length_normalize:
    total = total / jnp.maximum(batch.gold_mask.sum(axis=1), 1)
  return total.reshape(-1, num_turns + 1)


def implicit_process_rewards(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, *,
                             beta: float = 0.05) -> jax.Array:
  """Implicit process rewards: `beta * (log pi(y_t) - log pi_ref(y_t))` per policy token.

  A model trained as an outcome reward model with reward `beta * log(pi / pi_ref)` of the
  whole response ("Free Process Rewards without Process Labels", PRIME) yields these dense
  token rewards for free; a step's reward is the sum over its tokens (`turn_sums`). Treat
  the result as a constant (rewards are not differentiated).

  Args:
    logp: [N, T] float log-probs of the sampled tokens under the implicit PRM (or policy).
    ref_logp: [N, T] float log-probs under the reference model.
    mask: [N, T] bool, the policy's tokens.
    beta: Scale of the log-ratio.

  Returns:
    [N, T] float32, 0 at masked positions (whatever they hold).

  Example:
    >>> lp, ref = jnp.log(jnp.array([[.5, .9]])), jnp.log(jnp.array([[.25, .1]]))
    >>> r = implicit_process_rewards(lp, ref, jnp.array([[True, False]]), beta=.1)
    >>> import numpy as np
    >>> print(np.asarray(r).round(4))     # [[.1 * log 2, 0]]
    [[0.0693 0.    ]]
  """
  diff = jnp.asarray(logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)
  return jnp.where(jnp.asarray(mask, bool), beta * diff, 0.0)
