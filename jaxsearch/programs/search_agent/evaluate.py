"""Scoring rollouts on the host and evaluating an agent on a split.

Text is decoded here, and only here: to score answers and to show trajectories to people.

`evaluate` runs one of three methods on questions, the agent and the two baselines Search-R1
reports: "agent" (the agent's prompt; it may search), "direct" (the closed-book prompt, which
ends with `<answer>`: no search) and "rag" (the question's text searched once through the
agent's own tool, the `<information>` block put in the prompt, then `<answer>`). Scores per
episode (`episode_scores`): em, f1, subem (the gold answer inside the predicted answer,
Search-R1's "answer contains gold"), format, reward, searches, answered / truncated, support
recall (the question's `supporting_doc_ids` all retrieved, or without ids a gold answer in a
retrieved passage, title included) and length; `dataset_metrics` averages them per dataset and
over datasets (unweighted, as Search-R1's "Avg."). `experiments/evaluate.py` is the command.

Example:
  >>> metrics, scored = evaluate(exp, params, questions, jax.random.key(0), method="rag")  # doctest: +SKIP
  >>> scores = episode_scores(scored, questions, exp.world)  # doctest: +SKIP
  >>> dataset_metrics(scores, [q.source for q in questions])["average"]["em"]  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from jaxsearch.data import demos
from jaxsearch.data.world import Question
from jaxsearch.rewards.qa import extract_answer, normalize_answer
from jaxsearch.rollout.search_env import EpisodeStatus
from jaxsearch.train import distributed
from jaxsearch.types import PyTree, Rollout


METHODS = ("agent", "direct", "rag")


@dataclasses.dataclass
class ScoredBatch:
  """Host-side view of a rollout with its rewards."""

  rollout: Rollout                  # numpy arrays
  completions: list[str]            # decoded text after each row's prompt
  rewards: np.ndarray               # [N] float32 total reward
  parts: dict[str, np.ndarray]      # {name: [N]} unweighted reward parts
  context_doc_ids: np.ndarray | None = None   # [N, K] documents put in the prompt (RAG), -1 pad
  answers: list[str] | None = None   # the answers scored, when not `extract_answer`'s (`open_answer`)


def completions_text(rollout: Rollout, prompt_lens: np.ndarray, tokenizer: Any) -> list[str]:
  """Decodes each row's tokens after its prompt, up to its length."""
  tokens, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
  return [tokenizer.decode(tokens[i, prompt_lens[i]: lengths[i]].tolist())
          for i in range(tokens.shape[0])]


def open_answer(completion: str) -> str:
  """The answer of a completion whose prompt ended with the opening `<answer>` tag (the direct
  and RAG baselines): the text up to `</answer>`, or to the end of the turn when the model
  ended it without the tag (an instruction model often does), stripped. Only EM / F1 / subem
  read it; `format` still asks for the model's own `</answer>`.

  Example:
    >>> open_answer(" Lisbon"), open_answer(" Lisbon </answer> more")
    ('Lisbon', 'Lisbon')
  """
  return completion.split("</answer>", 1)[0].strip()


def score_rollout(rollout: Rollout, prompt_lens: np.ndarray, golds: Sequence[Sequence[str]],
                  tokenizer: Any, reward_fn, *, answer_open: bool = False) -> ScoredBatch:
  """Decodes and rewards a rollout. With `answer_open` (the prompts ended with `<answer>`)
  the tag is written back in front of each completion and `answers` holds `open_answer`'s."""
  rollout = jax.tree.map(np.asarray, rollout)
  completions = completions_text(rollout, prompt_lens, tokenizer)
  answers = None
  if answer_open:
    answers = [open_answer(c) for c in completions]
    completions = ["<answer>" + c for c in completions]
  total, parts = reward_fn(completions, golds)
  return ScoredBatch(rollout, completions, np.asarray(total, np.float32),
                     {k: np.asarray(v, np.float32) for k, v in parts.items()}, answers=answers)


def answer_contains_gold(prediction: str | None, golds: Sequence[str]) -> float:
  """1.0 if some normalised gold answer is a substring of the normalised prediction (Search-R1's
  `subem`, "answer contains gold"; `normalize_answer`: lower case, no punctuation or
  articles). A gold answer that normalises to "" counts for nothing; no prediction scores 0.

  Example:
    >>> answer_contains_gold("It is in Paris, France.", ["paris"])
    1.0
    >>> answer_contains_gold("Par", ["Paris"])
    0.0
  """
  if prediction is None:
    return 0.0
  pred = normalize_answer(prediction)
  golds = [golds] if isinstance(golds, str) else golds
  return float(any(g and g in pred for g in (normalize_answer(a) for a in golds)))


def support_found(question: Question, retrieved: Sequence[int], world) -> bool:
  """Whether an episode's retrieved documents (indices into `world.documents`, -1 ignored)
  support `question`: every one of its `supporting_doc_ids` when it names some; otherwise a
  gold answer appears, as whole words, in a retrieved passage read as the policy reads it,
  title included (`passage_text`: "title: text"; `answer_in_passages`).

  Example:
    >>> support_found(q, [3, 7, -1], world)  # doctest: +SKIP
  """
  from jaxsearch.programs.search_agent.experiment import passage_text  # noqa: PLC0415
  got = {int(j) for j in retrieved if int(j) >= 0}
  if question.supporting_doc_ids:
    return all(world.doc_index(d) in got for d in question.supporting_doc_ids)
  return answer_in_passages(question.answers,
                            [passage_text(world.documents[j]) for j in sorted(got)])


# Per-episode columns of `episode_scores` (each a [N] float array).
SCORE_COLUMNS = ("em", "f1", "subem", "format", "reward", "searches", "invalid_searches",
                 "answered", "truncated", "support_recall", "length")


def episode_scores(scored: ScoredBatch, questions: Sequence[Question], world
                   ) -> dict[str, np.ndarray]:
  """Per-episode scores, `{column: [N] float64}` for every name of `SCORE_COLUMNS`.

  em / f1 / subem compare the extracted answer (`scored.answers` when set: the direct and
  RAG baselines' `open_answer`) with the gold answers (`exact_match`, `f1`,
  `answer_contains_gold`); format is `format_score` of the completion; searches and
  invalid_searches count the policy's search calls; answered / truncated are 0/1 by the
  episode's status; support_recall is `support_found` of the documents the policy retrieved
  plus those put in its prompt (`context_doc_ids`, the RAG baseline); length counts tokens.
  """
  from jaxsearch.rewards.qa import exact_match, f1, format_score  # noqa: PLC0415
  if len(questions) != len(scored.completions):
    raise ValueError(f"{len(scored.completions)} episodes but {len(questions)} questions")
  r = scored.rollout
  answers = (scored.answers if scored.answers is not None
             else [extract_answer(c) for c in scored.completions])
  golds = [q.answers for q in questions]
  n = len(questions)
  retrieved = np.asarray(r.retrieved).reshape(n, -1)
  if scored.context_doc_ids is not None:
    retrieved = np.concatenate([retrieved, np.asarray(scored.context_doc_ids).reshape(n, -1)], 1)
  cols = {
      "em": [exact_match(a, g) for a, g in zip(answers, golds)],
      "f1": [f1(a, g) for a, g in zip(answers, golds)],
      "subem": [answer_contains_gold(a, g) for a, g in zip(answers, golds)],
      "format": [format_score(c) for c in scored.completions],
      "reward": scored.rewards,
      "searches": r.num_searches, "invalid_searches": r.invalid_searches,
      "answered": np.asarray(r.status) == EpisodeStatus.ANSWERED,
      "truncated": np.asarray(r.status) == EpisodeStatus.TRUNCATED,
      "support_recall": [support_found(q, retrieved[i], world) for i, q in enumerate(questions)],
      "length": r.lengths,
  }
  return {k: np.asarray(cols[k], np.float64).reshape(n) for k in SCORE_COLUMNS}


def episode_metrics(scored: ScoredBatch, questions: Sequence[Question], world) -> dict[str, float]:
  """EM/F1/subem/format, search statistics and the support recall of scored episodes: the
  means of `episode_scores`, and em / searches of 1-hop and 2-hop questions (`em_1hop`, ...).

  `support_recall` is the fraction of episodes whose retrieved passages include every
  supporting document of the question; for a question without supporting documents (a QA
  file without `supporting_doc_ids`), whether a retrieved passage, title included, contains a
  gold answer (`answer_in_passages`, DPR's answer recall).
  """
  scores = episode_scores(scored, questions, world)
  out = {k: v.mean() for k, v in scores.items()}
  hops = np.array([q.hops for q in questions])
  for h in (1, 2):
    if (hops == h).any():
      out[f"em_{h}hop"] = scores["em"][hops == h].mean()
      out[f"searches_{h}hop"] = scores["searches"][hops == h].mean()
  return {k: float(v) for k, v in out.items()}


def dataset_metrics(scores: dict[str, np.ndarray], datasets: Sequence[str]) -> dict[str, Any]:
  """Metrics per dataset and their unweighted average, as Search-R1 reports them.

  Args:
    scores: `episode_scores` columns, one row per episode.
    datasets: each episode's dataset name (e.g. its question's `source`).

  Returns:
    `{"per_dataset": {name: {column: mean, "n": episodes}}, "average": {column: mean over
    datasets, each dataset weighing the same, "n": datasets}, "overall": {column: mean over
    episodes, "n": episodes}}`; datasets in order of first appearance.

  Example:
    >>> m = dataset_metrics({"em": np.array([1., 0., 0.])}, ["nq", "nq", "hotpotqa"])
    >>> m["per_dataset"]["nq"]["em"], m["average"]["em"], round(m["overall"]["em"], 3)
    (0.5, 0.25, 0.333)
  """
  datasets = list(datasets)
  n = len(datasets)
  for k, v in scores.items():
    if len(v) != n:
      raise ValueError(f"scores[{k!r}] has {len(v)} rows but there are {n} dataset names")
  if not n:
    raise ValueError("dataset_metrics needs at least one episode")
  names = list(dict.fromkeys(datasets))
  labels = np.array(datasets, dtype=object)
  per = {}
  for name in names:
    rows = labels == name
    per[name] = {k: float(np.asarray(v)[rows].mean()) for k, v in scores.items()}
    per[name]["n"] = int(rows.sum())
  average = {k: float(np.mean([per[d][k] for d in names])) for k in scores}
  average["n"] = len(names)
  overall = {k: float(np.asarray(v).mean()) for k, v in scores.items()}
  overall["n"] = n
  return {"per_dataset": per, "average": average, "overall": overall}


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


def retrieve_for_questions(exp, questions: Sequence[Question]
                           ) -> tuple[list[list[int]], np.ndarray]:
  """The RAG baseline's retrieval: each question's text searched through the agent's own
  tool (`Experiment.respond`, in batches of `eval_batch_size` so one shape is compiled).

  Returns:
    `(blocks, doc_ids)`: per question the `<information>` block's ids, and `[N, K]` retrieved
    document indices (-1 where fewer than K were returned).
  """
  bs = exp.config.eval_batch_size
  blocks, ids = [], []
  for start in range(0, len(questions), bs):
    queries = [q.question for q in questions[start: start + bs]]
    n = len(queries)
    b, d = exp.respond(queries + [queries[0]] * (bs - n))
    blocks += b[:n]
    ids += d[:n]
  k = max((len(row) for row in ids), default=0)
  doc_ids = np.full((len(ids), k), -1, np.int64)
  for i, row in enumerate(ids):
    doc_ids[i, : len(row)] = row
  return blocks, doc_ids


def prompt_width_for(exp, longest: int, *, what: str = "agent") -> int:
  """The prompt width an evaluation uses: `exp.prompt_width` (the training run's, so its
  compiled rollout is reused) unless a prompt is longer, then that prompt's length.

  Raises:
    ValueError: the prompt leaves no room to generate within `RolloutConfig.max_len`.
  """
  width = max(exp.prompt_width, int(longest))
  max_len = exp.config.rollout.max_len
  if width >= max_len:
    raise ValueError(f"the {what} prompts need {width} tokens but RolloutConfig.max_len is "
                     f"{max_len}: raise RolloutConfig.max_len (and TransformerConfig.max_len), "
                     "or shorten the passages (DataConfig.max_passage_tokens)")
  return width


def evaluate(exp, params: PyTree, questions: Sequence[Question], rng: jax.Array, *,
             closed_book: bool = False, method: str | None = None
             ) -> tuple[dict[str, float], ScoredBatch]:
  """Runs the evaluation rollout (greedy by default) on `questions` and scores it.

  Batches are padded to `eval_batch_size` rows so a single compiled program serves every call.

  Args:
    exp: the agent.
    params: its parameters.
    questions: the questions, one episode each.
    rng: sampling key (used with a non-zero `eval_temperature`).
    closed_book: the same as `method="direct"`.
    method: "agent" (the agent's prompt: it may search), "direct" (the closed-book prompt,
      ending with `<answer>`: answer without searching) or "rag" (retrieve with the question
      through the agent's tool, put the `<information>` block in the prompt, answer once;
      `jaxsearch.data.prompts`). Default: "direct" if `closed_book` else "agent".

  Returns:
    `(metrics, scored)`: `episode_metrics` of all episodes and the scored episodes in order
    (with the RAG baseline's retrieved documents in `scored.context_doc_ids`).
  """
  method = method or ("direct" if closed_book else "agent")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if closed_book and method != "direct":
    raise ValueError(f"closed_book=True is method 'direct', got method={method!r}")
  questions = list(questions)
  if not questions:
    raise ValueError("evaluate needs at least one question")
  information, context = None, None
  if method == "rag":
    information, context = retrieve_for_questions(exp, questions)
  prompts_all, lens_all = demos.encode_prompts(
      exp.tokenizer, questions, closed_book=method == "direct", prompt=exp.config.prompt,
      protocol=exp.env.protocol, information=information)
  width = prompt_width_for(exp, prompts_all.shape[1], what=method)
  prompts_all = np.pad(prompts_all, ((0, 0), (0, width - prompts_all.shape[1])),
                       constant_values=exp.tokenizer.pad_id)
  bs = exp.config.eval_batch_size
  scored_parts = []
  for start in range(0, len(questions), bs):
    chunk = questions[start: start + bs]
    prompts, lens = prompts_all[start: start + bs], lens_all[start: start + bs]
    n = len(chunk)
    if n < bs:
      prompts = np.concatenate([prompts, np.repeat(prompts[:1], bs - n, 0)])
      lens = np.concatenate([lens, np.repeat(lens[:1], bs - n)])
    rollout = exp.eval_rollout_fn(params, exp.tool, prompts, lens, jax.random.fold_in(rng, start))
    # Collective on several processes (the rollout is split over the batch axes).
    rollout = jax.tree.map(lambda x: x[:n], distributed.to_host(rollout))
    scored_parts.append(score_rollout(rollout, lens[:n], [q.answers for q in chunk],
                                      exp.tokenizer, exp.reward_fn,
                                      answer_open=method != "agent"))
  merged = ScoredBatch(
      rollout=jax.tree.map(lambda *xs: np.concatenate(xs), *(s.rollout for s in scored_parts)),
      completions=[c for s in scored_parts for c in s.completions],
      rewards=np.concatenate([s.rewards for s in scored_parts]),
      parts={k: np.concatenate([s.parts[k] for s in scored_parts]) for k in scored_parts[0].parts},
      context_doc_ids=context,
      answers=(None if method == "agent" else [a for s in scored_parts for a in s.answers]))
  return episode_metrics(merged, questions, exp.world), merged


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
