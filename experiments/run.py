r"""The one launcher: `python -m experiments.run --gin_file=... [--gin_bindings=...] --workdir=...`.

Gin files bind the library's config dataclasses and `loop.run.config` (see gin/); the launcher
parses them (finalized: an unknown binding is an error), records the operative config in the
workdir after the first optimizer step, and calls `jaxsearch.train.loop.run`.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

flags.DEFINE_multi_string("gin_file", [], "Gin config files, applied in order.")
flags.DEFINE_multi_string("gin_bindings", [], "Individual gin bindings, applied after the files.")
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and summary.json go; resumed if it exists.")
flags.DEFINE_multi_string("gin_search_path", [], "Extra directories to resolve gin includes.")
FLAGS = flags.FLAGS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_gin(files, bindings, search_paths=()):
  """Parses gin files and bindings (finalized); gin/ of the repository is on the search path."""
  import gin  # noqa: PLC0415
  for path in (*search_paths, REPO_ROOT, os.getcwd()):
    gin.add_config_file_search_path(path)
  for f in files:
    if not any(os.path.exists(os.path.join(p, f)) for p in (*search_paths, REPO_ROOT, os.getcwd(), "")):
      raise FileNotFoundError(f"gin file {f!r} not found (looked in the current directory and "
                              f"{REPO_ROOT}); pass a path like gin/experiments/quickstart.gin")
  gin.parse_config_files_and_bindings(files, bindings, finalize_config=True)


def record_config(workdir: str) -> None:
  import gin  # noqa: PLC0415
  import jax  # noqa: PLC0415
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "operative_config.gin"), "w") as f:
      f.write(gin.operative_config_str())


def main(argv):
  del argv
  if not FLAGS.gin_file:
    raise app.UsageError("pass at least one --gin_file, e.g. gin/experiments/quickstart.gin")
  if not FLAGS.workdir:
    raise app.UsageError("pass --workdir=DIR (created if missing; resumed if it holds a run)")
  import gin  # noqa: PLC0415
  from jaxsearch.train import loop  # noqa: PLC0415
  parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_path)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "config.gin"), "w") as f:
    f.write(gin.config_str())
  summary = gin.get_configurable(loop.run)(
      workdir=FLAGS.workdir, after_first_step=lambda: record_config(FLAGS.workdir))
  record_config(FLAGS.workdir)
  logging.info("wrote %s", os.path.join(FLAGS.workdir, "summary.json"))
  keys = ("closed_book_em", "sft_em", "rl_em", "rl_f1", "rl_searches", "rl_support_recall")
  print("summary: " + " ".join(f"{k}={summary[k]:.3f}" for k in keys if k in summary), flush=True)


if __name__ == "__main__":
  sys.exit(app.run(main))
