"""Reward-model experiment: Bradley–Terry training on the world's preference pairs.

Pairs. For every question the *chosen* episode is the ideal agent's: one search per hop (the
question's `search_queries`), each answered by the environment's real `<information>` block
(the same BM25 tool and block builder as the rollout), then `<answer> gold </answer>`. The
*rejected* episode is an incorrect one for the same question, of one of these kinds:

  wrong_answer  the same searches, then another value of the answer's type (a wrong city for a
                city question): the model must check the answer against the passages;
  no_search     no search, a wrong guess of the right type;
  stop_early    (2-hop questions) stop after the first hop and answer the bridge entity, the
                classic multi-hop error: the model must know what the question asked for;
  malformed     the same searches and the gold answer, but in a broken action: without the
                closing `</answer>`, or as bare text without tags (both score 0 under the
                exact-match reward).

Every rejected episode gets 0 exact match and the chosen one 1, so a reward model that ranks
them agrees with the rule-based reward. Training pairs come from the train split; the
held-out pairs from `eval_split` (test by default), whose subjects (people, companies, cities
asked about) never occur in a train question, with every applicable kind once per question.

Training minimises `losses.preference.bradley_terry_loss` on the rewards of a `RewardModel`
(trunk + scalar head read at the last token), optionally starting the trunk from a search-agent
workdir's policy checkpoint. The easy kinds are learned in a few dozen steps; a wrong answer of
the right type is only caught by comparing the answer with the passages, which a small trunk
trained on Bradley–Terry alone learns slowly and partly by memorising the train subjects'
facts. Two options make it learnable: `lm_coef`, a next-token loss on the chosen episodes'
searches and answers (the copy-from-passage skill of a search agent), and
`extra_train_worlds`, training pairs from worlds with other seeds, whose facts cannot be
memorised.

Workdir layout (as `jaxsearch.programs.search_agent.loop`):
  tokenizer.model          the BPE tokenizer (trained on the world, or the policy's)
  rm_config.json           the resolved `RewardModelConfig`
  trunk_config.json        the trunk's `TransformerConfig` as built (vocabulary size resolved)
  checkpoints/rm           orbax checkpoints {params, opt_state, step} (+ JSON metadata)
  metrics.jsonl, events.*  training curves (`rm/loss`, `rm/bt_loss`, `rm/lm_loss`,
                           `rm/accuracy`, `validation/accuracy`)
  summary.json             heldout_accuracy (+ per kind), train_accuracy, timings
A second run with the same workdir resumes from the latest checkpoint.

Example:
  >>> summary = run(RewardModelConfig(), "/tmp/rm")     # the defaults are the gin experiment's
  >>> summary["heldout_accuracy"]
  >>> reward = load_reward_fn("/tmp/rm")          # a ModelReward for the RL loop
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from jaxsearch import metrics as metrics_lib
from jaxsearch.checkpoint import Checkpointer
from jaxsearch.data import demos
from jaxsearch.data.questions import unique_questions
from jaxsearch.data.tokenizer import SentencePieceTokenizer
from jaxsearch.data.world import SPLITS, Question, World, WorldConfig
from jaxsearch.losses.preference import bradley_terry_loss
from jaxsearch.models.heads import RewardModel, ValueHeadConfig, load_trunk
from jaxsearch.models.transformer import TransformerConfig
from jaxsearch.retrieval.bm25 import BM25Config
from jaxsearch.rewards.model_reward import ModelReward, reward_model_reward
from jaxsearch.rollout.search_env import RolloutConfig
from jaxsearch.train import sharding, trainer
from jaxsearch.programs.search_agent.experiment import Experiment, RunConfig, setup
from jaxsearch.train.optim import OptimizerConfig, make_optimizer
from jaxsearch.train.state import TrainState
from jaxsearch.types import PyTree

REJECTION_KINDS = ("wrong_answer", "no_search", "stop_early", "malformed")
CONFIG_FILE = "rm_config.json"
TRUNK_CONFIG_FILE = "trunk_config.json"
CHECKPOINT_DIR = os.path.join("checkpoints", "rm")
LOG_EVERY = 25
PROGRESS_KEYS = ("loss", "bt_loss", "lm_loss", "accuracy", "margin", "tokens_per_s", "mfu",
                 "s_per_step")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardModelConfig:
  """Everything a reward-model run needs.

  Attributes:
    seed: seeds parameters, pair sampling and data order.
    world: the embedded world the pairs come from.
    tokenizer_vocab_size: BPE pieces trained on the world (the trunk's vocabulary size).
    model: the trunk; its `vocab_size` is replaced by `tokenizer_vocab_size`.
    head: the scalar reward head (`num_bins` must be 0).
    bm25: the search tool that answers the episodes' searches.
    rollout: the environment settings (`top_k` passages per search, `max_query_tokens`,
      `max_len`: the longest episode allowed).
    steps: optimizer steps.
    batch_size: preference pairs per step (each pair is two sequences).
    pairs_per_question: rejected episodes drawn per train question (kinds without
      replacement while there are unused ones).
    rejection_weights: kind -> weight of the training pairs' rejection kinds (names from
      `REJECTION_KINDS`; a kind left out or weighted 0 is not trained on). Held-out pairs
      always cover every kind, so summaries stay comparable.
    margin: the Bradley–Terry margin.
    lm_coef: weight of an auxiliary next-token loss on the chosen episodes' agent tokens
      (search queries and answers). It teaches the trunk to copy entities from the
      retrieved passages, which is what telling a right answer from a wrong one of the same
      type needs; 0 disables it.
    optimizer: optimizer settings.
    eval_split: the held-out split reported in summary.json.
    eval_every: held-out accuracy on the validation split every this many steps (0: never).
    eval_batch_size: sequences per scoring call.
    checkpoint_every: save every this many steps (and at the end).
    extra_train_worlds: more worlds (`world` with seeds `world.seed + 1000 * k`, k = 1..n)
      whose train questions add training pairs. Their facts are drawn independently, so
      remembering which answer goes with which subject does not help there: the model must
      check the answer against the retrieved passages, which is what transfers to held-out
      subjects. Held-out pairs always come from `world`.
    init_from: optional search-agent workdir (`jaxsearch.programs.search_agent.loop.run`) whose policy
      initialises the trunk; its tokenizer and model config are then used (`model` and
      `tokenizer_vocab_size` are ignored).
    init_phase: the checkpoint phase of `init_from`: "sft" or "rl".
    mesh: the device mesh (default: data parallel over every device).
  """

  seed: int = 0
  world: WorldConfig = WorldConfig()
  tokenizer_vocab_size: int = 1024
  model: TransformerConfig = TransformerConfig(vocab_size=1024, d_model=64, num_layers=2,
                                               num_heads=2, num_kv_heads=2, mlp_dim=192,
                                               rope_theta=1e6)
  head: ValueHeadConfig = ValueHeadConfig()
  bm25: BM25Config = BM25Config()
  rollout: RolloutConfig = RolloutConfig()
  steps: int = 2500
  batch_size: int = 32
  pairs_per_question: int = 2
  rejection_weights: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: {"wrong_answer": 3.0, "no_search": 1.0, "stop_early": 1.0,
                               "malformed": 1.0})
  margin: float = 0.0
  lm_coef: float = 1.0
  optimizer: OptimizerConfig = OptimizerConfig(learning_rate=3e-3, warmup_steps=20)
  eval_split: str = "test"
  eval_every: int = 250
  eval_batch_size: int = 64
  checkpoint_every: int = 500
  extra_train_worlds: int = 3
  init_from: str = dataclasses.field(default="", metadata={"path": True})
  init_phase: str = "sft"
  mesh: sharding.MeshConfig = sharding.MeshConfig()

  def __post_init__(self):
    for name in ("batch_size", "pairs_per_question", "eval_batch_size", "checkpoint_every",
                 "tokenizer_vocab_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"RewardModelConfig.{name} must be an int >= 1, got {value!r}")
    for name in ("steps", "eval_every", "extra_train_worlds"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"RewardModelConfig.{name} must be an int >= 0, got {value!r}")
    weights = dict(self.rejection_weights)
    if any(k not in REJECTION_KINDS for k in weights) or any(
        isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0
        for w in weights.values()):
      raise ValueError(f"RewardModelConfig.rejection_weights must map names from "
                       f"{REJECTION_KINDS} to weights >= 0, got {self.rejection_weights!r}")
    if not any(w > 0 for k, w in weights.items() if k != "stop_early"):
      raise ValueError(f"RewardModelConfig.rejection_weights={self.rejection_weights!r} leaves "
                       "1-hop questions without a rejected episode: give a kind other than "
                       "stop_early a positive weight")
    if not (math.isfinite(self.lm_coef) and self.lm_coef >= 0):
      raise ValueError(f"RewardModelConfig.lm_coef must be a finite number >= 0, got "
                       f"{self.lm_coef!r}")
    if not math.isfinite(self.margin):
      raise ValueError(f"RewardModelConfig.margin must be finite, got {self.margin!r}")
    if self.eval_split not in SPLITS:
      raise ValueError(f"RewardModelConfig.eval_split must be one of {SPLITS}, got "
                       f"{self.eval_split!r}")
    if self.head.categorical:
      raise ValueError(f"RewardModelConfig.head must be a scalar head (num_bins=0), got "
                       f"num_bins={self.head.num_bins}")
    if self.init_phase not in ("sft", "rl"):
      raise ValueError(f"RewardModelConfig.init_phase must be 'sft' or 'rl', got "
                       f"{self.init_phase!r}")


class PreferenceData(NamedTuple):
  """Preference pairs over a table of unique episodes (a chosen episode serves many pairs)."""

  tokens: np.ndarray     # [S, T] int32 episodes, right-padded
  lengths: np.ndarray    # [S] int32
  agent_mask: np.ndarray  # [S, T] bool, tokens the agent wrote (searches, answers)
  chosen: np.ndarray     # [P] int32 row of `tokens` of each pair's preferred episode
  rejected: np.ndarray   # [P] int32 row of the dispreferred episode
  kind: np.ndarray       # [P] int32 index into REJECTION_KINDS
  question: np.ndarray   # [P] int32 index into the questions the pairs were built from


class PreferenceBatch(NamedTuple):
  """One Bradley–Terry step's inputs."""

  chosen: jax.Array             # [B, T] int32
  chosen_lengths: jax.Array     # [B] int32
  rejected: jax.Array           # [B, T] int32
  rejected_lengths: jax.Array   # [B] int32
  chosen_agent_mask: jax.Array  # [B, T] bool, the chosen episodes' agent tokens


def _applicable(q: Question, kinds: Sequence[str]) -> list[str]:
  return [k for k in kinds if k != "stop_early" or q.hops >= 2]


def _draw_kinds(q: Question, weights: Mapping[str, float], k: int,
                rng: np.random.Generator) -> list[str]:
  """k kinds for q, by weight, without replacement while unused applicable ones remain."""
  options = [o for o in _applicable(q, list(weights)) if weights[o] > 0]
  if not options:
    raise ValueError(f"no rejection kind with a positive weight applies to the {q.hops}-hop "
                     f"question {q.qid!r}; weights: {dict(weights)}")
  p = np.array([weights[o] for o in options], np.float64)
  picked = []
  while len(picked) < k:
    order = rng.choice(len(options), size=len(options), replace=False, p=p / p.sum())
    picked += [options[i] for i in order]
  return picked[:k]


def build_preference_pairs(
    world: World,
    questions: Sequence[Question],
    tokenizer: Any,
    respond_fn: Callable[[Sequence[str]], tuple[list[list[int]], list[list[int]]]],
    *,
    kinds: Sequence[str] | Mapping[str, float] = REJECTION_KINDS,
    pairs_per_question: int | None = None,
    seed: int = 0,
    max_len: int | None = None,
) -> PreferenceData:
  """Chosen / rejected episodes for each question (see the module docstring).

  Args:
    world: the world (for wrong answers of the right type).
    questions: the questions.
    tokenizer: the tokenizer (`encode`, `tag_id`, `bos_id`, `pad_id`).
    respond_fn: the environment: query texts -> (`<information>` block ids, doc ids) per
      query, e.g. `Experiment.respond`.
    kinds: the rejection kinds to draw from, or kind -> weight.
    pairs_per_question: rejected episodes per question, kinds drawn by weight without
      replacement while unused ones remain; None: every applicable kind (positive weight)
      once (held-out evaluation).
    seed: seeds the kind order, wrong answers and malformed variants.
    max_len: the longest episode allowed (ValueError beyond); None: no limit.

  Returns:
    `PreferenceData`; the episodes are padded to the longest one.
  """
  rng = np.random.default_rng(seed)
  weights = dict(kinds) if isinstance(kinds, Mapping) else {k: 1.0 for k in kinds}
  queries = sorted({s for q in questions for s in q.search_queries})
  blocks = dict(zip(queries, respond_fn(queries)[0])) if queries else {}
  tag = tokenizer.tag_id

  def episode(q: Question, searches: Sequence[str], answer: list[int]
              ) -> tuple[list[int], list[bool]]:
    ids = demos.prompt_ids(tokenizer, q)
    mask = [False] * len(ids)
    for s in searches:
      action = [tag("<search>"), *tokenizer.encode(s), tag("</search>")]
      ids += action + blocks[s]
      mask += [True] * len(action) + [False] * len(blocks[s])
    return ids + answer, mask + [True] * len(answer)

  def wrong_value(q: Question) -> str:
    values = [v for v in world.answer_values(q.kind) if v not in q.answers]
    return str(values[rng.integers(len(values))])

  seqs, masks, chosen, rejected, kind_ids, qids = [], [], [], [], [], []
  for qi, q in enumerate(questions):
    gold = [tag("<answer>"), *tokenizer.encode(q.answers[0]), tag("</answer>")]
    c = len(seqs)
    ids, mask = episode(q, q.search_queries, gold)
    seqs.append(ids)
    masks.append(mask)
    if pairs_per_question is None:
      picked = [o for o in _applicable(q, list(weights)) if weights[o] > 0]
    else:
      picked = _draw_kinds(q, weights, pairs_per_question, rng)
    for kind in picked:
      if kind == "wrong_answer":
        ids, mask = episode(q, q.search_queries, [
            tag("<answer>"), *tokenizer.encode(wrong_value(q)), tag("</answer>")])
      elif kind == "no_search":
        ids, mask = episode(q, (), [tag("<answer>"), *tokenizer.encode(wrong_value(q)),
                                    tag("</answer>")])
      elif kind == "stop_early":
        ids, mask = episode(q, q.search_queries[:1], [
            tag("<answer>"), *tokenizer.encode(q.bridge_answers[0]), tag("</answer>")])
      else:  # malformed: the gold answer, unclosed or without tags
        answer = tokenizer.encode(q.answers[0])
        ids, mask = episode(q, q.search_queries,
                            [tag("<answer>"), *answer] if rng.random() < 0.5 else answer)
      chosen.append(c)
      rejected.append(len(seqs))
      kind_ids.append(REJECTION_KINDS.index(kind))
      qids.append(qi)
      seqs.append(ids)
      masks.append(mask)
  longest = max((len(s) for s in seqs), default=1)
  if max_len is not None and longest > max_len:
    raise ValueError(f"an episode has {longest} tokens, more than max_len={max_len}: raise "
                     "RolloutConfig.max_len or lower top_k")
  tokens, lengths = demos.pad_sequences(seqs, tokenizer.pad_id)
  agent_mask = np.zeros(tokens.shape, bool)
  for i, m in enumerate(masks):
    agent_mask[i, : len(m)] = m
  as_i32 = lambda x: np.asarray(x, np.int32).reshape(-1)  # noqa: E731
  return PreferenceData(tokens, lengths, agent_mask, as_i32(chosen), as_i32(rejected),
                        as_i32(kind_ids), as_i32(qids))


def drop_long_pairs(data: PreferenceData, max_len: int) -> PreferenceData:
  """The pairs whose two episodes both have at most `max_len` tokens."""
  keep = (data.lengths[data.chosen] <= max_len) & (data.lengths[data.rejected] <= max_len)
  return data._replace(chosen=data.chosen[keep], rejected=data.rejected[keep],
                       kind=data.kind[keep], question=data.question[keep])


def concatenate_pairs(parts: Sequence[PreferenceData], pad_id: int) -> PreferenceData:
  """One `PreferenceData` holding every part's pairs (episodes padded to the widest)."""
  width = max(p.tokens.shape[1] for p in parts)
  offsets = np.cumsum([0] + [p.tokens.shape[0] for p in parts])
  qoff = np.cumsum([0] + [int(p.question.max(initial=-1)) + 1 for p in parts])
  def pad(t, value):
    return np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=value)

  return PreferenceData(
      tokens=np.concatenate([pad(p.tokens, pad_id) for p in parts]),
      lengths=np.concatenate([p.lengths for p in parts]),
      agent_mask=np.concatenate([pad(p.agent_mask, False) for p in parts]),
      chosen=np.concatenate([p.chosen + o for p, o in zip(parts, offsets)]).astype(np.int32),
      rejected=np.concatenate([p.rejected + o for p, o in zip(parts, offsets)]).astype(np.int32),
      kind=np.concatenate([p.kind for p in parts]),
      question=np.concatenate([p.question + o for p, o in zip(parts, qoff)]).astype(np.int32))


def make_rm_update_fn(apply_fn: Callable, *, margin: float = 0.0, lm_coef: float = 0.0):
  """One Bradley–Terry step, plus an optional next-token loss on the chosen agent tokens.

  The objective is `bradley_terry_loss(r_chosen, r_rejected) + lm_coef * CE`, where CE is the
  mean next-token cross-entropy of the chosen episodes' agent tokens.

  Args:
    apply_fn: `apply_fn({"params": p}, tokens [B, T], lengths [B], return_lm_logits=...)`
      -> rewards [B] (and logits [B, T, V] with `return_lm_logits=True`), as `RewardModel`.
    margin: the Bradley–Terry margin.
    lm_coef: weight of the next-token loss (0: rewards only, no logits computed).

  Returns:
    `update_fn(state, batch: PreferenceBatch) -> (state, metrics)`, pure; metrics hold
    `loss` (the total), `bt_loss`, `accuracy`, `margin`, `grad_norm` and, with `lm_coef`,
    `lm_loss`.
  """

  def loss_fn(params, batch: PreferenceBatch):
    if not lm_coef:
      b = batch.chosen.shape[0]
      rewards = apply_fn({"params": params}, jnp.concatenate([batch.chosen, batch.rejected]),
                         jnp.concatenate([batch.chosen_lengths, batch.rejected_lengths]))
      loss, metrics = bradley_terry_loss(rewards[:b], rewards[b:], margin=margin)
      return loss, {"bt_loss": loss, **metrics}
    # Two passes, so the output head runs on the chosen rows only.
    chosen, logits = apply_fn({"params": params}, batch.chosen, batch.chosen_lengths,
                              return_lm_logits=True)
    rejected = apply_fn({"params": params}, batch.rejected, batch.rejected_lengths)
    bt, metrics = bradley_terry_loss(chosen, rejected, margin=margin)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch.chosen[:, 1:, None], axis=-1)[..., 0]
    mask = batch.chosen_agent_mask[:, 1:]
    lm = jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
    return bt + lm_coef * lm, {"bt_loss": bt, "lm_loss": lm, **metrics}

  def update_fn(state: TrainState, batch: PreferenceBatch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    return state.apply_gradients(grads), {"loss": loss, "grad_norm": optax.tree.norm(grads),
                                          **aux}

  return update_fn


def pairwise_metrics(data: PreferenceData, scores: np.ndarray, prefix: str = "") -> dict:
  """Accuracy (ties count 1/2) and mean margin of the pairs, overall and per rejection kind."""
  diff = scores[data.chosen] - scores[data.rejected]
  wins = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))
  out = {f"{prefix}accuracy": float(wins.mean()), f"{prefix}margin": float(diff.mean()),
         f"{prefix}pairs": int(diff.size)}
  for i, kind in enumerate(REJECTION_KINDS):
    sel = data.kind == i
    if sel.any():
      out[f"{prefix}accuracy_{kind}"] = float(wins[sel].mean())
  return out


def _trunk_config(config: RewardModelConfig, vocab: int) -> TransformerConfig:
  return dataclasses.replace(config.model, vocab_size=vocab,
                             max_len=max(config.model.max_len, config.rollout.max_len))


def _environment(config: RewardModelConfig, tokenizer: Any | None, vocab: int) -> Experiment:
  """The world, tokenizer and search tool the episodes are built with (the agent's setup)."""
  run_config = RunConfig(seed=config.seed, world=config.world, tokenizer_vocab_size=vocab,
                         model=config.model, bm25=config.bm25, rollout=config.rollout,
                         mesh=config.mesh)
  return setup(run_config, tokenizer=tokenizer)


def _policy_init(config: RewardModelConfig):
  """(tokenizer, trunk config, policy params) of `config.init_from`."""
  from jaxsearch.programs.search_agent import workdir as workdir_lib  # noqa: PLC0415
  policy_exp = workdir_lib.load_experiment(config.init_from)
  params = workdir_lib.load_params(policy_exp, config.init_from, phase=config.init_phase)
  return policy_exp.tokenizer, policy_exp.model.config, params


def _init_params(model: RewardModel, rng: jax.Array, with_lm_head: bool):
  """Boxed parameters (an untied trunk gets its lm_head only when the LM loss needs it)."""
  return model.init(rng, jnp.zeros((1, 8), jnp.int32), jnp.ones([1], jnp.int32),
                    return_lm_logits=with_lm_head)["params"]


class PairSets(NamedTuple):
  """The preference pairs of one run."""

  train: PreferenceData                # the train split of `world` + `extra_train_worlds`
  heldout: PreferenceData              # `eval_split`, every applicable kind once
  validation: PreferenceData | None    # the validation split (None when `eval_every` is 0)


def build_pair_sets(config: RewardModelConfig, exp: Experiment, vocab: int) -> PairSets:
  """The run's training, held-out and validation pairs (see the module docstring).

  Args:
    config: the run's configuration (seeds, kinds, extra worlds, splits, `rollout.max_len`).
    exp: the environment of `config.world` (`_environment`); its tokenizer and search tool
      build the episodes of every world.
    vocab: the trunk's vocabulary size (the other worlds' environments are built with it).
  """
  tokenizer = exp.tokenizer
  weights = dict(config.rejection_weights)
  parts = []
  for k in range(config.extra_train_worlds + 1):
    env = exp if k == 0 else _environment(
        dataclasses.replace(config, world=dataclasses.replace(
            config.world, seed=config.world.seed + 1000 * k)), tokenizer, vocab)
    part = build_preference_pairs(
        env.world, unique_questions(env.world.splits["train"]), tokenizer, env.respond,
        kinds=weights, pairs_per_question=config.pairs_per_question, seed=config.seed + 10 * k,
        max_len=config.rollout.max_len if k == 0 else None)
    # Names of other worlds may tokenize longer: drop their episodes that would not fit.
    parts.append(part if k == 0 else drop_long_pairs(part, config.rollout.max_len))
  train = concatenate_pairs(parts, tokenizer.pad_id)
  heldout = build_preference_pairs(exp.world, unique_questions(exp.world.splits[config.eval_split]),
                                   tokenizer, exp.respond,
                                   seed=config.seed + 1, max_len=config.rollout.max_len)
  validation = None
  if config.eval_every:
    validation = build_preference_pairs(
        exp.world, unique_questions(exp.world.splits["validation"]), tokenizer, exp.respond,
        seed=config.seed + 2, max_len=config.rollout.max_len)
  return PairSets(train, heldout, validation)


def batch_pairs(config: RewardModelConfig, step: int, num_pairs: int) -> np.ndarray:
  """The pair indices of step `step`: seeded epochs over the pairs (`trainer.epoch_batch`
  with seed `(config.seed, 1)`), so a resumed run sees the batches it would have seen."""
  return trainer.epoch_batch((config.seed, 1), step, config.batch_size, num_pairs)


def make_batch(data: PreferenceData, idx: np.ndarray, multiple: int = 32) -> PreferenceBatch:
  """The pairs `idx` of `data` as a host `PreferenceBatch`, cut to the longest episode of
  the batch rounded up to a multiple of `multiple` (few shapes compile)."""
  c, r = data.chosen[idx], data.rejected[idx]
  width = -(-int(max(data.lengths[c].max(), data.lengths[r].max())) // multiple) * multiple
  width = min(width, data.tokens.shape[1])
  return PreferenceBatch(data.tokens[c, :width], data.lengths[c], data.tokens[r, :width],
                         data.lengths[r], data.agent_mask[c, :width])


def step_work(trunk: TransformerConfig, batch: PreferenceBatch, lm_coef: float
              ) -> trainer.StepWork:
  """Tokens and model FLOPs of one update: the trunk (forward + backward) on both episodes
  of every pair; the vocabulary projection only on the chosen ones, and only with the LM
  loss (the scalar head is negligible)."""
  chosen, width = batch.chosen.size, batch.chosen.shape[1]
  tokens = chosen + batch.rejected.size
  head = 6.0 * trunk.d_model * trunk.vocab_size
  per_token = sharding.transformer_flops_per_token(trunk, width) - head
  return trainer.StepWork(float(tokens), tokens * per_token + (chosen * head if lm_coef else 0))


def train_sample(data: PreferenceData, seed: int, size: int = 1000) -> PreferenceData:
  """At most `size` training pairs, a seeded sample (`train_accuracy` is measured on it)."""
  sample = np.random.default_rng([seed, 3]).permutation(data.chosen.size)[:size]
  return data._replace(chosen=data.chosen[sample], rejected=data.rejected[sample],
                       kind=data.kind[sample], question=data.question[sample])


def final_metrics(score_tokens: Callable[[np.ndarray, np.ndarray], np.ndarray],
                  heldout: PreferenceData, train: PreferenceData, seed: int) -> dict[str, Any]:
  """`heldout_*` metrics of every held-out pair and `train_*` of `train_sample(train, seed)`.

  Args:
    score_tokens: `(tokens [N, T], lengths [N]) -> rewards [N]`, e.g. a `ModelReward`'s.
    heldout: the held-out pairs (all of their episodes are scored).
    train: the training pairs (only the sample's episodes are scored).
    seed: the run's seed (picks the sample).
  """
  summary = pairwise_metrics(heldout, np.asarray(score_tokens(heldout.tokens, heldout.lengths)),
                             "heldout_")
  sub = train_sample(train, seed)
  rows = np.unique(np.concatenate([sub.chosen, sub.rejected]))
  scores = np.zeros([train.tokens.shape[0]], np.float32)
  scores[rows] = score_tokens(train.tokens[rows], train.lengths[rows])
  summary.update(pairwise_metrics(sub, scores, "train_"))
  return summary


def run(config: RewardModelConfig, workdir: str, *,
        after_first_step: Callable[[], None] | None = None) -> dict[str, Any]:
  """Trains a reward model on the world's preference pairs; returns (and writes) the summary.

  Args:
    config: the run's configuration.
    workdir: where everything the run writes goes; an existing workdir is resumed.
    after_first_step: called once after the first optimizer step (the launcher records the
      operative gin config there).

  Returns:
    The summary written to `workdir/summary.json`: `heldout_accuracy` (pairwise accuracy on
    `eval_split`) and its per-kind `heldout_accuracy_<kind>`, `heldout_margin`,
    `train_accuracy` (on the training pairs), pair counts, `num_params`, `train_seconds`
    and `wall_seconds`.
  """
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  tok_path = os.path.join(workdir, "tokenizer.model")
  policy_params = None
  if config.init_from:
    tokenizer, trunk_config, policy_params = _policy_init(config)
  else:
    tokenizer = SentencePieceTokenizer.load(tok_path) if os.path.exists(tok_path) else None
    trunk_config = _trunk_config(config, config.tokenizer_vocab_size)
  exp = _environment(config, tokenizer, trunk_config.vocab_size)
  if jax.process_index() == 0:
    exp.tokenizer.save(tok_path)
  trainer.write_config(workdir, CONFIG_FILE, config)
  trainer.write_config(workdir, TRUNK_CONFIG_FILE, trunk_config)

  t0 = time.time()
  pairs = build_pair_sets(config, exp, trunk_config.vocab_size)
  logging.info("preference pairs: %d train, %d held out; built in %.1fs",
               pairs.train.chosen.size, pairs.heldout.chosen.size, time.time() - t0)

  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.batch_size, mesh, "RewardModelConfig.batch_size")
  sharding.check_batch(config.eval_batch_size, mesh, "RewardModelConfig.eval_batch_size")
  model = RewardModel(trunk_config, config.head)
  boxed = _init_params(model, jax.random.fold_in(jax.random.key(config.seed), 0),
                       config.lm_coef > 0)
  params, specs = nn.meta.unbox(boxed), nn.get_partition_spec(boxed)
  if policy_params is not None:
    params = load_trunk(params, policy_params)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    params = jax.device_put(params, sharding.param_shardings(specs, mesh))
    return _train_and_evaluate(config, workdir, mesh, model, params, exp.tokenizer, pairs,
                               t_start, after_first_step)


def _train_and_evaluate(config: RewardModelConfig, workdir: str, mesh, model: RewardModel,
                        params: PyTree, tokenizer, pairs: PairSets, t_start: float,
                        after_first_step: Callable[[], None] | None) -> dict[str, Any]:
  writer = metrics_lib.create_writer(workdir)
  num_params = int(sum(x.size for x in jax.tree.leaves(params)))
  logging.info("reward model parameters: %d", num_params)
  state = TrainState.create(apply_fn=model.apply, params=params,
                            tx=make_optimizer(config.optimizer, config.steps))
  ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR))
  state, start, _ = trainer.restore_latest(ckpt, state)
  update = jax.jit(make_rm_update_fn(model.apply, margin=config.margin,
                                     lm_coef=config.lm_coef), donate_argnums=0)

  def score_tokens(params) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return reward_model_reward(model.apply, params, tokenizer,
                               batch_size=config.eval_batch_size).score_tokens

  train = pairs.train

  def step_fn(state: TrainState, step: int):
    batch = make_batch(train, batch_pairs(config, step, train.chosen.size))
    state, m = update(state, sharding.shard_batch(batch, mesh))
    return state, m, step_work(model.config, batch, config.lm_coef)

  def eval_fn(state: TrainState, step: int):
    v = pairs.validation
    return pairwise_metrics(v, score_tokens(state.params)(v.tokens, v.lengths))

  loop = trainer.LoopConfig(name="rm", steps=config.steps, log_every=LOG_EVERY,
                            checkpoint_every=config.checkpoint_every,
                            eval_every=config.eval_every, progress_keys=PROGRESS_KEYS,
                            eval_keys=("accuracy",))
  t_train = time.time()
  state = trainer.run_loop(
      loop, state, step_fn, start=start, writer=writer,
      save_fn=lambda step, s: ckpt.save(step, trainer.train_state_checkpoint(s), {"phase": "rm"}),
      eval_fn=eval_fn if pairs.validation is not None else None,
      peak_flops=trainer.device_peak_flops(mesh), after_first_step=after_first_step)
  ckpt.close()
  train_seconds = time.time() - t_train

  t_eval = time.time()
  summary = final_metrics(score_tokens(state.params), pairs.heldout, train, config.seed)
  summary.update(
      steps=config.steps, num_train_pairs=int(train.chosen.size), num_params=num_params,
      eval_split=config.eval_split, train_seconds=train_seconds,
      eval_seconds=time.time() - t_eval, wall_seconds=time.time() - t_start)
  writer.write_scalars(config.steps, {f"eval/{k}": v for k, v in summary.items()
                                      if isinstance(v, (int, float))})
  trainer.write_summary(workdir, summary, writer)
  trainer.say("[rm summary] " + " ".join(f"{k}={v:.3f}" for k, v in sorted(summary.items())
                                         if isinstance(v, float)))
  return summary


def load_config(workdir: str) -> RewardModelConfig:
  """The `RewardModelConfig` a reward-model workdir was trained with."""
  from jaxsearch.train.config_files import read_config  # noqa: PLC0415
  return read_config(workdir, CONFIG_FILE, RewardModelConfig, "a reward-model workdir")


def load_reward_model(workdir: str, step: int | None = None
                      ) -> tuple[RewardModel, PyTree, SentencePieceTokenizer]:
  """`(model, params, tokenizer)` of a reward-model workdir (latest checkpoint by default)."""
  from jaxsearch.train.config_files import config_from_dict  # noqa: PLC0415
  config = load_config(workdir)
  with open(os.path.join(workdir, TRUNK_CONFIG_FILE)) as f:
    trunk_config = config_from_dict(TransformerConfig, json.load(f))
  tokenizer = SentencePieceTokenizer.load(os.path.join(workdir, "tokenizer.model"))
  model = RewardModel(trunk_config, config.head)
  ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR))
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no reward-model checkpoint in {workdir}")
  params = nn.meta.unbox(jax.eval_shape(
      lambda: _init_params(model, jax.random.key(0), config.lm_coef > 0)))
  tx = make_optimizer(config.optimizer, config.steps)
  target = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
            "step": jax.ShapeDtypeStruct([], jnp.int32)}
  tree, _ = ckpt.restore(step, target)
  ckpt.close()
  return model, tree["params"], tokenizer


def load_reward_fn(workdir: str, *, step: int | None = None, batch_size: int = 64
                   ) -> ModelReward:
  """A trained reward model as a host reward (`jaxsearch.rewards.model_reward.ModelReward`).

  Example:
    >>> reward = load_reward_fn("runs/rm")
    >>> reward.score_tokens(rollout.tokens, rollout.lengths)     # [N]
  """
  model, params, tokenizer = load_reward_model(workdir, step)
  return reward_model_reward(model.apply, params, tokenizer, batch_size=batch_size)
