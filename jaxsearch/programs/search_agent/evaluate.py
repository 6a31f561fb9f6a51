"""Scoring rollouts on the host and evaluating an agent on a split.

Text is decoded here, and only here: to score answers and to show trajectories to people.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from jaxsearch.data.world import Question
from jaxsearch.rewards.qa import extract_answer
from jaxsearch.rollout.search_env import EpisodeStatus
from jaxsearch.train import distributed
from jaxsearch.types import PyTree, Rollout


@dataclasses.dataclass
class ScoredBatch:
  """Host-side view of a rollout with its rewards."""

  rollout: Rollout                  # numpy arrays
  completions: list[str]            # decoded text after each row's prompt
  rewards: np.ndarray               # [N] float32 total reward
  parts: dict[str, np.ndarray]      # {name: [N]} unweighted reward parts


def completions_text(rollout: Rollout, prompt_lens: np.ndarray, tokenizer: Any) -> list[str]:
  """Decodes each row's tokens after its prompt, up to its length."""
  tokens, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
  return [tokenizer.decode(tokens[i, prompt_lens[i]: lengths[i]].tolist())
          for i in range(tokens.shape[0])]


def score_rollout(rollout: Rollout, prompt_lens: np.ndarray, golds: Sequence[Sequence[str]],
                  tokenizer: Any, reward_fn) -> ScoredBatch:
  rollout = jax.tree.map(np.asarray, rollout)
  completions = completions_text(rollout, prompt_lens, tokenizer)
  total, parts = reward_fn(completions, golds)
  return ScoredBatch(rollout, completions, np.asarray(total, np.float32),
                     {k: np.asarray(v, np.float32) for k, v in parts.items()})


def episode_metrics(scored: ScoredBatch, questions: Sequence[Question], world) -> dict[str, float]:
  """EM/F1/format, search statistics and the support recall of scored episodes.

  `support_recall` is the fraction of episodes whose retrieved passages include every
  supporting document of the question; for a question without supporting documents (read from
  a QA file), whether a retrieved passage contains a gold answer (`answer_in_passages`, DPR's
  answer recall).
  """
  from jaxsearch.rewards.qa import exact_match, f1, format_score  # noqa: PLC0415
  r = scored.rollout
  answers = [extract_answer(c) for c in scored.completions]
  golds = [q.answers for q in questions]
  em = np.array([exact_match(a, g) for a, g in zip(answers, golds)])
  f1s = np.array([f1(a, g) for a, g in zip(answers, golds)])
  fmt = np.array([format_score(c) for c in scored.completions])
  hops = np.array([q.hops for q in questions])
  support = []
  for i, q in enumerate(questions):
    got = set(r.retrieved[i].reshape(-1).tolist())
    if q.supporting_doc_ids:
      support.append(all(world.doc_index(d) in got for d in q.supporting_doc_ids))
    else:
      support.append(answer_in_passages(q.answers, [world.documents[j].text for j in got if j >= 0]))
  out = {
      "em": em.mean(), "f1": f1s.mean(), "format": fmt.mean(),
      "reward": scored.rewards.mean(),
      "searches": r.num_searches.mean(), "invalid_searches": r.invalid_searches.mean(),
      "answered": (r.status == EpisodeStatus.ANSWERED).mean(),
      "truncated": (r.status == EpisodeStatus.TRUNCATED).mean(),
      "support_recall": np.mean(support),
      "length": r.lengths.mean(),
  }
  for h in (1, 2):
    if (hops == h).any():
      out[f"em_{h}hop"] = em[hops == h].mean()
      out[f"searches_{h}hop"] = r.num_searches[hops == h].mean()
  return {k: float(v) for k, v in out.items()}


def answer_in_passages(answers: Sequence[str], passages: Sequence[str]) -> bool:
  """Whether some passage contains some answer as a run of whole words, as DPR's has_answer:
  both lower-cased and split into `\\w+` words (punctuation separates words, so "Alaska's"
  contains "Alaska")."""
  import re  # noqa: PLC0415

  def words(text: str) -> str:
    return " " + " ".join(re.findall(r"\w+", text.lower())) + " "

  texts = [words(p) for p in passages]
  golds = [w for w in (words(a) for a in answers) if w.strip()]
  return any(g in t for g in golds for t in texts)


def evaluate(exp, params: PyTree, questions: Sequence[Question], rng: jax.Array, *,
             closed_book: bool = False) -> tuple[dict[str, float], ScoredBatch]:
  """Runs the evaluation rollout (greedy by default) on `questions` and scores it.

  Batches are padded to `eval_batch_size` rows so a single compiled program serves every call.

  Returns:
    `(metrics, scored)`; with `closed_book=True` the prompts end with `<answer>`, so the
    policy must answer without searching.
  """
  bs = exp.config.eval_batch_size
  scored_parts, metrics_rows = [], []
  for start in range(0, len(questions), bs):
    chunk = list(questions[start: start + bs])
    prompts, lens = exp.encode_prompts(chunk, closed_book=closed_book)
    n = len(chunk)
    if n < bs:
      prompts = np.concatenate([prompts, np.repeat(prompts[:1], bs - n, 0)])
      lens = np.concatenate([lens, np.repeat(lens[:1], bs - n)])
    rollout = exp.eval_rollout_fn(params, exp.tool, prompts, lens, jax.random.fold_in(rng, start))
    # Collective on several processes (the rollout is split over the batch axes).
    rollout = jax.tree.map(lambda x: x[:n], distributed.to_host(rollout))
    scored = score_rollout(rollout, lens[:n], [q.answers for q in chunk], exp.tokenizer,
                           exp.reward_fn)
    scored_parts.append(scored)
    metrics_rows.append((n, episode_metrics(scored, chunk, exp.world)))
  keys = set().union(*(m.keys() for _, m in metrics_rows))
  metrics = {}
  for k in keys:
    rows = [(n, m[k]) for n, m in metrics_rows if k in m]
    metrics[k] = sum(n * v for n, v in rows) / sum(n for n, _ in rows)
  merged = ScoredBatch(
      rollout=jax.tree.map(lambda *xs: np.concatenate(xs), *(s.rollout for s in scored_parts)),
      completions=[c for s in scored_parts for c in s.completions],
      rewards=np.concatenate([s.rewards for s in scored_parts]),
      parts={k: np.concatenate([s.parts[k] for s in scored_parts]) for k in scored_parts[0].parts})
  return metrics, merged


def render_trajectory(tokens: np.ndarray, policy_mask: np.ndarray, env_mask: np.ndarray,
                      length: int, tokenizer: Any) -> str:
  """A readable episode: prompt, then each policy segment and environment block on its own line."""
  lines, current, kind = [], [], None
  for t in range(int(length)):
    k = "policy" if policy_mask[t] else ("env" if env_mask[t] else "prompt")
    if k != kind and current:
      lines.append((kind, tokenizer.decode(current)))
      current = []
    kind = k
    current.append(int(tokens[t]))
  if current:
    lines.append((kind, tokenizer.decode(current)))
  prefix = {"prompt": "PROMPT ", "policy": "AGENT  ", "env": "SEARCH "}
  return "\n".join(prefix[k] + text.strip() for k, text in lines)
