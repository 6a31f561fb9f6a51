r"""Run a trained agent on questions and print each episode: searches, passages, answer, reward.

  python -m experiments.inspect_agent --workdir=runs/quickstart [--split=test --num=3 --start=0]
  python -m experiments.inspect_agent --workdir=runs/quickstart --question="Where was Mira Tolven born?"
  python -m experiments.inspect_agent --workdir=runs/quickstart --interactive
  python -m experiments.inspect_agent --gin_file=gin/experiments/qa_example.gin \
    --gin_file=gin/models/smollm2_135m.gin --num=2        # a pretrained policy, untrained

The agent is rebuilt from the workdir alone (`run_config.json`, `tokenizer.model` and the
latest checkpoint: RL if there is one, else SFT; `--phase` / `--step` pick another) and runs
the training run's evaluation rollout (greedy unless the run set `eval_temperature`).
Instead of a workdir, `--gin_file` (+ `--gin_param`) names a RunConfig whose policy is a
pretrained checkpoint (`RunConfig.pretrained`: "hf:DIR", "gguf:PATH" or a registered name):
its world is built and the checkpoint's parameters run as they are, untrained
(`inspect_lib.load_pretrained_agent`). `--interactive` reads one question per line from stdin until an empty line or end of input;
`QUESTION || ANSWER[|ANSWER...]` also gives gold answers, so the line is scored. The rendering
is `jaxsearch.programs.search_agent.inspect_lib.format_trajectory`, which notebooks call directly.

(Not `experiments/inspect.py`: with that name, running any script of experiments/ by its path
would put this directory first on `sys.path` and the file would hide the standard library's
`inspect`, which absl and dataclasses import.)
"""
from __future__ import annotations

import os
import sys
from typing import IO

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined when run as a program, so that importing this module
  next to another launcher, e.g. in the tests, does not define `--workdir` twice)."""
  flags.DEFINE_string("workdir", None, "A training run's workdir (loop.run).")
  flags.DEFINE_multi_string("gin_file", [], "Instead of --workdir: gin files of a RunConfig "
                            "with a pretrained policy, run untrained.")
  flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied after --gin_file.")
  flags.DEFINE_alias("gin_param", "gin_bindings")
  flags.DEFINE_string("split", "test", "Split whose questions are shown: train, validation or test.")
  flags.DEFINE_integer("num", 3, "How many questions of the split.")
  flags.DEFINE_integer("start", 0, "Index of the first question of the split.")
  flags.DEFINE_string("question", None, "A question to ask instead of the split's.")
  flags.DEFINE_multi_string("answer", [], "Gold answer(s) of --question (optional).")
  flags.DEFINE_bool("interactive", False, "Read questions from stdin, one per line.")
  flags.DEFINE_enum("phase", None, ["rl", "sft"], "Checkpoint phase (default: RL if saved, else SFT).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_bool("closed_book", False, "Prompts end with <answer>: no search possible.")
  flags.DEFINE_integer("passage_chars", 100, "Passages are cut to this many characters (0: never).")


SEPARATOR = "=" * 78


def show(exp, params, questions, out: IO[str], **kwargs) -> None:
  """Runs the agent on `questions` and writes one rendered episode per question to `out`."""
  from jaxsearch.programs.search_agent import inspect_lib  # noqa: PLC0415
  closed_book = kwargs.pop("closed_book", False)
  scored = inspect_lib.run_agent(exp, params, questions, closed_book=closed_book)
  for i, q in enumerate(questions):
    print(SEPARATOR, file=out)
    print(inspect_lib.format_trajectory(exp, scored, i, q, **kwargs), file=out, flush=True)


def parse_line(line: str):
  """`QUESTION` or `QUESTION || ANSWER[|ANSWER...]` -> a typed question."""
  from jaxsearch.programs.search_agent import inspect_lib  # noqa: PLC0415
  text, _, answers = line.partition("||")
  return inspect_lib.typed_question(text, [a for a in answers.split("|") if a.strip()])


def interact(exp, params, stdin: IO[str], out: IO[str], **kwargs) -> int:
  """Answers questions read from `stdin` until an empty line or EOF; returns how many."""
  count = 0
  prompt = stdin.isatty()
  while True:
    if prompt:
      print("question> ", end="", file=out, flush=True)
    line = stdin.readline()
    if not line.strip():
      return count
    try:
      question = parse_line(line)
      show(exp, params, [question], out, **kwargs)
    except ValueError as e:   # e.g. a question longer than the prompts the agent was built for
      print(f"error: {e}", file=out, flush=True)
    count += 1


def main(argv):
  del argv
  if bool(FLAGS.workdir) == bool(FLAGS.gin_file):
    raise app.UsageError("pass --workdir=DIR (the workdir of a training run) or --gin_file=... "
                         "(a RunConfig with a pretrained policy), not both")
  from jaxsearch.programs.search_agent import inspect_lib  # noqa: PLC0415
  if FLAGS.workdir:
    exp, params, where = inspect_lib.load_agent(FLAGS.workdir, FLAGS.phase, FLAGS.step)
  else:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from experiments.gin_agent import run_config_from_gin  # noqa: PLC0415
    config = run_config_from_gin(FLAGS.gin_file, FLAGS.gin_bindings, (repo,))
    exp, params, where = inspect_lib.load_pretrained_agent(config)
  print(f"agent: {FLAGS.workdir or ', '.join(FLAGS.gin_file)} ({where})", flush=True)
  kwargs = dict(passage_chars=FLAGS.passage_chars, closed_book=FLAGS.closed_book)
  if FLAGS.interactive:
    interact(exp, params, sys.stdin, sys.stdout, **kwargs)
    return
  if FLAGS.question:
    questions = [inspect_lib.typed_question(FLAGS.question, FLAGS.answer)]
  else:
    if FLAGS.split not in exp.world.splits:
      raise app.UsageError(f"--split must be one of {sorted(exp.world.splits)}, got {FLAGS.split!r}")
    questions = list(exp.world.splits[FLAGS.split][FLAGS.start: FLAGS.start + FLAGS.num])
    if not questions:
      raise app.UsageError(f"--start={FLAGS.start} is past the {FLAGS.split} split's "
                           f"{len(exp.world.splits[FLAGS.split])} questions")
  show(exp, params, questions, sys.stdout, **kwargs)


if __name__ == "__main__":
  define_flags()
  app.run(main)
