"""Look at what an agent does: run it on questions and print each episode turn by turn.

An episode is a token stream (`Rollout`): the prompt (turn 0), then turns s = 1, 2, ...; turn s
is the policy's tokens followed by what the environment inserted after them. When the turn's
`<search>` was answered, the inserted block is `<information> p_1 ... p_K </information>` and
`rollout.retrieved[i, k]` holds the K document indices of the k-th answered search; an empty or
over-budget query gets a fixed message block instead (and uses no slot of `retrieved`).
`episode_turns` splits a row along those lines; `format_trajectory` renders it with the query,
the retrieved passages (titles and shortened text, `*` marking the question's supporting
documents), the information block, the final answer against the gold answers, and the reward
with its parts.

Example:
  >>> exp, params, where = load_agent("runs/quickstart")
  >>> questions = exp.world.splits["test"][:2]
  >>> scored = run_agent(exp, params, questions)
  >>> print(format_trajectory(exp, scored, 0, questions[0]))
  question  In which country was Mira Tolven born?  [test-00000, 2-hop]
  gold      Elvaria
  turn 1    <search> Mira Tolven </search>
    query   Mira Tolven
    passage * Mira Tolven (person-0007): Mira Tolven was born in Brindel...
  ...
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import NamedTuple, Sequence

import jax
import numpy as np

from jaxsearch.data.world import Question
from jaxsearch.rewards.qa import exact_match, extract_answer
from jaxsearch.rollout.search_env import EpisodeStatus
from jaxsearch.programs.search_agent import evaluate as eval_lib
from jaxsearch.programs.search_agent.experiment import Experiment
from jaxsearch.types import PyTree

_QUERY_RE = re.compile(r"<search>(.*?)</search>", re.S)


class Turn(NamedTuple):
  """One turn of an episode, as text."""

  generated: str            # the policy's tokens of this turn, decoded
  query: str | None         # the last complete `<search>` query of the turn, stripped
  inserted: str             # what the environment inserted after it, decoded ("" if nothing)
  doc_indices: tuple[int, ...]  # the documents retrieved for the query (() if none answered)
  kind: str                 # "search" (answered), "invalid" / "budget" (message), or "final"


def typed_question(text: str, answers: Sequence[str] = ()) -> Question:
  """A question typed by a person (no supporting documents; gold answers optional).

  Example:
    >>> typed_question("Where was Mira Tolven born?", ["Brindel"]).answers
    ('Brindel',)
  """
  text = text.strip()
  if not text:
    raise ValueError("a typed question must not be empty")
  return Question(qid="typed", question=text, answers=tuple(a.strip() for a in answers),
                  supporting_doc_ids=(), hops=0, search_queries=(), bridge_answers=(),
                  kind="typed")


def load_agent(workdir: str, phase: str | None = None,
               step: int | None = None) -> tuple[Experiment, PyTree, str]:
  """Rebuilds a run's agent from its workdir: saved config, tokenizer and a checkpoint.

  Args:
    workdir: a `loop.run` workdir (it has `run_config.json`, `tokenizer.model`, checkpoints).
    phase: "rl" or "sft"; None takes RL if it has a checkpoint, else SFT.
    step: the checkpoint step; None takes the latest.

  Returns:
    `(exp, params, where)`, `where` naming the checkpoint, e.g. "rl step 150".

  Raises:
    FileNotFoundError: not a run's workdir, or it has no checkpoint of the phase.
  """
  from jaxsearch.checkpoint import Checkpointer  # noqa: PLC0415
  from jaxsearch.programs.search_agent import workdir as workdir_lib  # noqa: PLC0415
  if phase is None:
    phases = [p for p in ("rl", "sft")
              if Checkpointer(os.path.join(workdir, "checkpoints", p)).latest_step() is not None]
    if not phases:
      raise FileNotFoundError(f"{workdir} has no checkpoint yet (checkpoints/rl, "
                              "checkpoints/sft): train it first, or wait for its first save")
    phase = phases[0]
  if step is None:
    step = Checkpointer(os.path.join(workdir, "checkpoints", phase)).latest_step()
  exp = workdir_lib.load_experiment(workdir)
  params = workdir_lib.load_params(exp, workdir, phase, step)
  return exp, params, f"{phase} step {step}"


def load_pretrained_agent(config) -> tuple[Experiment, PyTree, str]:
  """The agent of a `RunConfig` whose policy is a pretrained checkpoint, untrained: its
  parameters are the checkpoint's (`RunConfig.pretrained`: "hf:DIR", "gguf:PATH" or a
  registered name; with LoRA, fresh adapters that change nothing). Nothing is trained and no
  workdir is read or written: the zero-shot baseline, for `evaluate` and `inspect_agent`.

  Returns:
    `(exp, params, where)`, `where` naming the checkpoint, e.g. "hf:/ckpt/Qwen2.5-3B
    (pretrained, no training)".

  Raises:
    ValueError: the config names no pretrained checkpoint (a from-scratch policy has nothing
      to evaluate before training: evaluate its workdir).

  Example:
    >>> exp, params, where = load_pretrained_agent(config)  # doctest: +SKIP
  """
  from jaxsearch.programs.search_agent.experiment import setup  # noqa: PLC0415
  if not config.pretrained:
    raise ValueError("RunConfig.pretrained is '': a policy trained from scratch has no "
                     "parameters before training; evaluate a training run's workdir instead, "
                     "or name a checkpoint (e.g. RunConfig.pretrained = 'hf:DIR')")
  exp = setup(config)
  params, _ = exp.init_params(jax.random.fold_in(jax.random.key(config.seed), 0))
  return exp, params, f"{config.pretrained} (pretrained, no training)"


def run_agent(exp: Experiment, params: PyTree, questions: Sequence[Question], *,
              rng: jax.Array | None = None, closed_book: bool = False) -> eval_lib.ScoredBatch:
  """Runs the evaluation rollout on `questions` (in batches of at most `eval_batch_size`).

  Args:
    exp: the agent.
    params: its parameters.
    questions: what to ask.
    rng: sampling key (used only with a non-zero `eval_temperature`); default: the training
      run's evaluation key.
    closed_book: prompts end with `<answer>` (no search possible).

  Returns:
    The scored episodes, one row per question, in order.
  """
  if rng is None:
    rng = jax.random.fold_in(jax.random.key(exp.config.seed), 2)
  bs = max(1, min(len(questions), exp.config.eval_batch_size))
  small = dataclasses.replace(exp, config=dataclasses.replace(exp.config, eval_batch_size=bs))
  _, scored = eval_lib.evaluate(small, params, list(questions), rng, closed_book=closed_book)
  return scored


def episode_turns(exp: Experiment, scored: eval_lib.ScoredBatch, i: int) -> tuple[str, list[Turn]]:
  """Splits row `i` of a scored rollout into its prompt and turns.

  Returns:
    `(prompt text, turns)`.
  """
  r = scored.rollout
  n = int(r.lengths[i])
  tokens, turn_ids = np.asarray(r.tokens[i, :n]), np.asarray(r.turn_ids[i, :n])
  policy, env_mask = np.asarray(r.policy_mask[i, :n]), np.asarray(r.env_mask[i, :n])
  decode = exp.tokenizer.decode
  prompt = decode(tokens[turn_ids == 0].tolist())
  invalid, budget = tuple(exp.env.invalid_block), tuple(exp.env.budget_block)
  slot, turns = 0, []
  for s in range(1, int(turn_ids.max(initial=0)) + 1):
    generated = decode(tokens[(turn_ids == s) & policy].tolist())
    inserted_ids = tuple(int(t) for t in tokens[(turn_ids == s) & env_mask])
    queries = _QUERY_RE.findall(generated)
    query = queries[-1].strip() if queries else None
    docs: tuple[int, ...] = ()
    if not inserted_ids:
      kind = "final"
    elif len(inserted_ids) > 1 and invalid[:len(inserted_ids)] == inserted_ids:
      kind = "invalid"
    elif len(inserted_ids) > 1 and budget[:len(inserted_ids)] == inserted_ids:
      kind = "budget"
    else:
      kind = "search"
      if slot < int(r.num_searches[i]):
        docs = tuple(int(d) for d in np.asarray(r.retrieved[i, slot]) if d >= 0)
      slot += 1
    turns.append(Turn(generated, query, decode(list(inserted_ids)), docs, kind))
  return prompt, turns


def shorten(text: str, limit: int) -> str:
  """`text` on one line, cut to `limit` characters with an ellipsis (no cut if limit <= 0)."""
  text = " ".join(text.split())
  return text if limit <= 0 or len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def format_trajectory(exp: Experiment, scored: eval_lib.ScoredBatch, i: int,
                      question: Question, *, passage_chars: int = 100,
                      information_chars: int = 240) -> str:
  """Renders episode `i` of `scored` (the rollout of `question`) as readable text.

  Args:
    exp: the agent that produced the episode.
    scored: scored episodes (`run_agent`, `evaluate`).
    i: the row.
    question: the question of row `i` (its gold answers and supporting documents are shown).
    passage_chars / information_chars: where passages and information blocks are cut (0: never).

  Returns:
    Lines: the question and gold answers; per turn the generated text, the query, the
    retrieved passages and the inserted block; then the answer, whether it is correct, the
    reward with its parts and the episode's status.
  """
  r = scored.rollout
  _, turns = episode_turns(exp, scored, i)
  supporting = set(question.supporting_doc_ids)
  hops = f", {question.hops}-hop" if question.hops else ""
  lines = [f"question  {question.question}  [{question.qid}{hops}]",
           "gold      " + (" | ".join(question.answers) if question.answers else "(none given)")]
  for s, turn in enumerate(turns, start=1):
    lines.append(f"turn {s:<4} {shorten(turn.generated, 0) or '(nothing)'}")
    if turn.query is not None:
      lines.append(f"  search  {turn.query}")
    for rank, d in enumerate(turn.doc_indices, start=1):
      doc = exp.world.documents[d]
      mark = "*" if doc.doc_id in supporting else " "
      text = shorten(f"{doc.title} ({doc.doc_id}): {doc.text}", passage_chars)
      lines.append(f"  {rank}. {mark} {text}")
    if turn.kind == "search" and not turn.doc_indices:
      lines.append("  (no passage retrieved)")
    if turn.inserted:
      label = {"search": "info", "invalid": "invalid", "budget": "budget"}[turn.kind]
      lines.append(f"  {label:<7} {shorten(turn.inserted, information_chars)}")
  answer = extract_answer(scored.completions[i])
  verdict = ""
  if question.answers:
    verdict = "  (correct)" if exact_match(answer, question.answers) else "  (wrong)"
  lines.append("answer    " + ("(none)" if answer is None else answer) + verdict)
  parts = " ".join(f"{k}={float(v[i]):.3f}" for k, v in sorted(scored.parts.items()))
  lines.append(f"reward    {float(scored.rewards[i]):.3f}  ({parts})")
  status = EpisodeStatus(int(r.status[i])).name.lower()
  lines.append(f"episode   {status}, {int(r.num_searches[i])} searches, "
               f"{int(r.invalid_searches[i])} invalid, {int(r.lengths[i])} tokens")
  return "\n".join(lines)
