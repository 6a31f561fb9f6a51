r"""Evaluate an agent and Search-R1's two baselines on QA test sets: one table per dataset.

  # A training run's agent (its latest checkpoint: RL if saved, else SFT; nothing is trained):
  python -m experiments.evaluate --workdir=runs/search_r1 \
    --qa_file=/data/test.parquet --max_questions=500 --out=results.json

  # A pretrained checkpoint, untrained (the zero-shot baseline): gin files whose RunConfig
  # names `pretrained` ("hf:DIR", "gguf:PATH" or a registered name) and the corpus to search.
  python -m experiments.evaluate --gin_file=gin/experiments/search_r1.gin \
    --gin_param="MODEL = 'hf:/ckpt/Qwen2.5-3B'" --gin_param="CORPUS = '/data/wiki-18.jsonl'" \
    --gin_param="QA_TRAIN = '/data/test.parquet'" --gin_param="QA_TEST = '/data/test.parquet'" \
    --gin_param="RETRIEVER_URL = 'http://127.0.0.1:8000/retrieve'" \
    --qa_file=/data/test.parquet --methods=agent,direct,rag --out=results.json

Methods (`--methods`, default all three): "agent" (the agent's prompt, searching as it
learned), "direct" (the closed-book prompt: answer without search) and "rag" (the question's
text searched once through the agent's own tool, its `<information>` block put in the prompt,
one answer). `--qa_file` is repeatable; a file whose rows carry `data_source` (Search-R1's
merged test parquet) is split into its datasets, other files are one dataset named after the
file (`NAME=PATH` names it). `--max_questions=N` keeps the first N questions of each dataset;
it touches nothing else. Without `--qa_file`, the run's own evaluation split (`--split`).

With `--gin_file`, the QA splits the config names are read for the world only: the corpus
(`DataConfig.corpus`) is what is searched, and with `--qa_file` the splits are cut to one
question each (`DataConfig.max_questions = 1`) so that start-up does not tokenize a training
set nobody evaluates.

It prints Search-R1's table (rows = methods, columns = datasets + Avg, exact match; the
average over datasets unweighted) with the paper's reference rows where dataset names match
(nq, triviaqa, popqa, hotpotqa, 2wikimultihopqa, musique, bamboogle), then each method's
metrics per dataset: em, f1, subem (the gold answer inside the predicted answer), format,
searches per question, support recall (supporting ids retrieved when the file names them,
else a gold answer in a retrieved passage, title included) and the answered rate. `--out`
writes all of it as JSON, per-question predictions included
(`jaxsearch.programs.search_agent.harness.to_json`).
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags() -> None:
  """The command line's flags (defined when run as a program, so that importing this module
  next to another launcher does not define `--workdir` twice)."""
  flags.DEFINE_string("workdir", None, "A training run's workdir: evaluate its checkpoint.")
  flags.DEFINE_enum("phase", None, ["rl", "sft"], "Checkpoint phase (default: RL if saved, else SFT).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_multi_string("gin_file", [], "Gin files of a RunConfig with a pretrained policy "
                            "(instead of --workdir): evaluated untrained.")
  flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied after --gin_file.")
  flags.DEFINE_alias("gin_param", "gin_bindings")
  flags.DEFINE_multi_string("qa_file", [], "QA file (PATH or NAME=PATH; repeatable): FlashRAG "
                            "JSONL, Search-R1 parquet or tfds:NAME:SPLIT.")
  flags.DEFINE_integer("max_questions", 0, "Keep the first N questions of each dataset (0: all).")
  flags.DEFINE_list("methods", ["agent", "direct", "rag"], "Methods: agent, direct, rag.")
  flags.DEFINE_string("split", None, "Without --qa_file: the world split to evaluate "
                      "(default: the run's eval_split).")
  flags.DEFINE_string("out", None, "Write the results as JSON here.")


def load(workdir=None, gin_files=(), gin_bindings=(), phase=None, step=None,
         qa_given=False):
  """`(exp, params, where)` of a workdir's checkpoint or of gin files' pretrained policy."""
  import dataclasses  # noqa: PLC0415
  from jaxsearch.programs.search_agent import inspect_lib  # noqa: PLC0415
  if bool(workdir) == bool(gin_files):
    raise app.UsageError("pass either --workdir=DIR (a training run) or --gin_file=... (a "
                         "RunConfig naming a pretrained checkpoint), not both or neither")
  if workdir:
    if gin_bindings:
      raise app.UsageError("--gin_param applies to --gin_file only; a workdir's config is "
                           "its run_config.json")
    return inspect_lib.load_agent(workdir, phase, step)
  if phase or step is not None:
    raise app.UsageError("--phase / --step name a workdir's checkpoint; pass --workdir")
  from experiments.gin_agent import run_config_from_gin  # noqa: PLC0415
  config = run_config_from_gin(gin_files, gin_bindings, (REPO_ROOT,))
  if qa_given and config.data.from_files and not config.data.max_questions:
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, max_questions=1))
  return inspect_lib.load_pretrained_agent(config)


def run_evaluation(*, workdir=None, gin_files=(), gin_bindings=(), phase=None, step=None,
                   qa_files=(), max_questions=0, methods=("agent", "direct", "rag"),
                   split=None, out=None, log=print) -> dict:
  """The command, callable in-process: loads the agent, evaluates, prints, writes JSON.

  Returns:
    The JSON object (`harness.to_json`).
  """
  import jax  # noqa: PLC0415
  from jaxsearch.programs.search_agent import harness  # noqa: PLC0415
  t0 = time.time()
  methods = [m.strip() for m in methods if m.strip()]
  exp, params, where = load(workdir, gin_files, gin_bindings, phase, step, bool(qa_files))
  log(f"agent: {workdir or ', '.join(gin_files)} ({where})")
  if qa_files:
    datasets = harness.load_datasets(qa_files, max_questions=max_questions,
                                     tfds_data_dir=exp.config.data.tfds_data_dir)
  else:
    split = split or exp.config.eval_split
    if split not in exp.world.splits or not exp.world.splits[split]:
      raise app.UsageError(f"the world's {split!r} split has no questions; pass --qa_file or "
                           f"--split (splits: {sorted(exp.world.splits)})")
    datasets = harness.split_datasets(exp.world.splits[split], split,
                                      max_questions=max_questions)
  log("datasets: " + ", ".join(f"{d.name} ({len(d.questions)})" for d in datasets))
  rng = jax.random.fold_in(jax.random.key(exp.config.seed), 2)   # loop.run's evaluation key
  results = harness.evaluate_methods(exp, params, datasets, methods, rng, log=log)
  report = harness.format_report(results, datasets)
  log("")
  log(report)
  result = harness.to_json(
      results, datasets,
      agent={"workdir": os.path.abspath(workdir) if workdir else None,
             "gin_files": list(gin_files), "gin_bindings": list(gin_bindings),
             "checkpoint": where, "pretrained": exp.config.pretrained},
      settings={"methods": methods, "max_questions": max_questions,
                "qa_files": list(qa_files), "split": split,
                "eval_temperature": exp.config.eval_temperature,
                "top_k": exp.config.rollout.top_k,
                "max_searches": exp.config.rollout.max_searches,
                "max_len": exp.config.rollout.max_len},
      report=report, wall_seconds=time.time() - t0)
  result = harness.as_float_dict(result)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(result, f, indent=1)
    log(f"wrote {out}")
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  run_evaluation(workdir=FLAGS.workdir, gin_files=FLAGS.gin_file,
                 gin_bindings=FLAGS.gin_bindings, phase=FLAGS.phase, step=FLAGS.step,
                 qa_files=FLAGS.qa_file, max_questions=FLAGS.max_questions,
                 methods=FLAGS.methods, split=FLAGS.split, out=FLAGS.out,
                 log=lambda line: print(line, flush=True))


if __name__ == "__main__":
  define_flags()
  sys.exit(app.run(main))
