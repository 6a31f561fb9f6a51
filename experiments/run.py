r"""The one launcher: `python -m experiments.run --gin_file=... [--gin_bindings=...] --workdir=...`.

Gin files bind the library's config dataclasses and the `config` of exactly one entry point
(see gin/ and `ENTRY_POINTS`): `loop.run` trains a search agent, `reward_model.run` a reward
model. The launcher parses the files (finalized: an unknown binding is an error), records the
operative config in the workdir after the first optimizer step, and calls the entry point.

The console shows the run's configuration summary, the compile / memory reports, the progress
lines and the summary (all `print`ed by process 0), and warnings and errors. Library chatter
(absl / JAX / orbax INFO lines) goes to `WORKDIR/logs/run.log` (`run.<i>.log` on process
i > 0 of a multi-process run); `--logtostderr` puts it back on the console, `--verbosity`
and `--stderrthreshold` work as in any absl program. TensorFlow's C++ logging (which
`TF_CPP_MIN_LOG_LEVEL` governs, e.g. "failed call to cuInit" on a machine without a GPU) is
silenced here, once, before anything imports TensorFlow; set the variable to override.
"""
from __future__ import annotations

import os
import sys

# Before anything imports TensorFlow (tensorboard writers, tfds): its C++ start-up lines
# (cuInit failures, cuda stubs) are noise for a JAX program.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_multi_string("gin_file", [], "Gin config files, applied in order.")
flags.DEFINE_multi_string("gin_bindings", [], "Individual gin bindings, applied after the files.")
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and summary.json go; resumed if it exists.")
flags.DEFINE_multi_string("gin_search_path", [], "Extra directories to resolve gin includes.")
FLAGS = flags.FLAGS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Entry points a gin file can bind (`<module>.run.config = ...`); each is
# `run(config, workdir, *, after_first_step=None) -> summary dict`.
ENTRY_POINTS = ("jaxsearch.programs.search_agent.loop.run", "jaxsearch.programs.reward_model.run",
                "jaxsearch.programs.dense_retriever.run", "jaxsearch.programs.realm.run",
                "jaxsearch.programs.generative_retrieval.run")


def parse_gin(files, bindings, search_paths=()):
  """Parses gin files and bindings (finalized); gin/ of the repository is on the search path."""
  import gin  # noqa: PLC0415
  for path in (*search_paths, REPO_ROOT, os.getcwd()):
    gin.add_config_file_search_path(path)
  for f in files:
    if not any(os.path.exists(os.path.join(p, f)) for p in (*search_paths, REPO_ROOT, os.getcwd(), "")):
      raise FileNotFoundError(f"gin file {f!r} not found (looked in the current directory and "
                              f"{REPO_ROOT}); pass a path like gin/experiments/quickstart.gin")
  try:
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=True)
  except ImportError as e:
    fix = explain_moved_module(e)
    if not fix:
      raise
    raise ImportError(f"{e}\n  Fix: {fix}") from e
  except (ValueError, OSError) as e:
    fix = explain_gin_error(e)
    if not fix:
      raise
    raise (ValueError if isinstance(e, ValueError) else OSError)(f"{e}\n  Fix: {fix}") from e


# Modules a gin file may still import under their names before the layers were reshaped.
MOVED_MODULES = {
    "jaxsearch.train.loop": "from jaxsearch.programs.search_agent import loop",
    "jaxsearch.train.experiment": "from jaxsearch.programs.search_agent import experiment",
    "jaxsearch.train.evaluate": "from jaxsearch.programs.search_agent import evaluate",
    "jaxsearch.train.workdir": "from jaxsearch.programs.search_agent import workdir",
    "jaxsearch.train.inspect_lib": "from jaxsearch.programs.search_agent import inspect_lib",
    "jaxsearch.train.reward_model": "from jaxsearch.programs import reward_model",
    "jaxsearch.train.dense_retriever": "from jaxsearch.programs import dense_retriever",
    "jaxsearch.train.realm": "from jaxsearch.programs import realm",
    "jaxsearch.train.dsi": "from jaxsearch.programs import generative_retrieval (and bind "
                           "generative_retrieval.DSIConfig / generative_retrieval.run)",
    "jaxsearch.train.dense": "from jaxsearch.train import dual_encoder",
    "jaxsearch.retrieval.dense": "from jaxsearch.retrieval import mips",
}


def explain_moved_module(error: ImportError) -> str:
  """How to import a module that moved (`MOVED_MODULES`); "" for any other import error."""
  name = getattr(error, "name", None) or ""
  for old, new in MOVED_MODULES.items():
    if name == old or f"'{old}'" in str(error):
      return f"{old} moved: write `{new}` in the gin file (see the README's Layout)"
  return ""


def explain_gin_error(error: Exception) -> str:
  """How to fix a gin parse error (a misspelt parameter, configurable or macro, a missing
  include), with the closest valid names; "" when there is nothing to add."""
  import difflib  # noqa: PLC0415
  import re  # noqa: PLC0415
  msg = str(error)
  if m := re.search(r"Configurable '([\w./]+)' doesn't have a parameter named '(\w+)'", msg):
    name, param = m.groups()
    params = _parameters(name)
    close = difflib.get_close_matches(param, params, n=1)
    return ((f"did you mean '{close[0]}'? " if close else "") +
            (f"{name} takes {params}; " if params else "") +
            "correct or remove that binding (in the gin file or --gin_bindings)")
  if m := re.search(r"No configurable matching '([\w./]+)'", msg):
    name = m.group(1)
    name = name.split("/")[-1]
    full = name.count(".") > 1   # `jaxsearch.train.steps.PolicyGradientConfig` rather than `steps.PolicyGradientConfig`
    close = difflib.get_close_matches(name, _configurable_names(full=full), n=2)
    return ((f"did you mean {' or '.join(close)}? " if close else "") +
            "a binding is `<module>.<Name>.<parameter> = value`, where the gin file imports "
            "<module> (e.g. `from jaxsearch.train import steps`, then "
            "`steps.PolicyGradientConfig.num_generations = 8`)")
  if m := re.search(r"No bindings specified for '(\w+)/gin.macro'", msg):
    macro = m.group(1)
    defined = sorted(set(re.findall(r"^([A-Z][A-Z0-9_]*) = ", msg, re.M)))
    close = difflib.get_close_matches(macro, defined, n=1)
    return (f"the macro %{macro} is used but never defined: define it (`{macro} = ...` in a "
            "gin file or --gin_bindings) or use a defined one" +
            (f" (did you mean %{close[0]}?)" if close else f" ({defined})" if defined else ""))
  if isinstance(error, OSError) and "Unable to open file" in msg:
    return ("correct the include's path: includes are looked up relative to the repository "
            "root, the current directory and each --gin_search_path")
  return ""


def _gin_modules():
  """(alias, module) for every loaded jaxsearch / experiments module (what gin files import)."""
  for name, module in list(sys.modules.items()):
    if module is not None and name.split(".")[0] in ("jaxsearch", "experiments"):
      yield name, module


def _parameters(configurable: str) -> list[str]:
  """The parameter names of `[scope/]module.Name` (dataclass fields or the signature)."""
  import dataclasses  # noqa: PLC0415
  import inspect  # noqa: PLC0415
  path = configurable.split("/")[-1]
  module_path, _, attr = path.rpartition(".")
  for name, module in _gin_modules():
    if (name == module_path or name.endswith("." + module_path)) and hasattr(module, attr):
      fn = getattr(module, attr)
      if dataclasses.is_dataclass(fn):
        return [f.name for f in dataclasses.fields(fn) if f.init]
      try:
        return list(inspect.signature(fn).parameters)
      except (TypeError, ValueError):
        return []
  return []


def _configurable_names(*, full: bool = False) -> list[str]:
  """`alias.Name` (or `package.alias.Name`) of the public classes and functions of loaded
  jaxsearch / experiments modules."""
  import inspect  # noqa: PLC0415
  names = []
  for name, module in _gin_modules():
    for attr, value in vars(module).items():
      if (not attr.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
          and getattr(value, "__module__", None) == name):
        names.append(f"{name if full else name.split('.')[-1]}.{attr}")
  return names


def entry_point():
  """The one entry point whose `config` the parsed gin files bind, as a gin configurable."""
  import importlib  # noqa: PLC0415
  import gin  # noqa: PLC0415
  bound = []
  for name in ENTRY_POINTS:
    try:
      gin.query_parameter(f"{name}.config")
    except ValueError:
      continue
    bound.append(name)
  if len(bound) != 1:
    raise ValueError(
        f"the gin files must bind the config of exactly one entry point of {list(ENTRY_POINTS)} "
        f"(e.g. `loop.run.config = @experiment.RunConfig()`), found {bound or 'none'}")
  module, fn = bound[0].rsplit(".", 1)
  return gin.get_configurable(getattr(importlib.import_module(module), fn))


LOG_DIR = "logs"

# Config fields the console summary shows (by field name, at any depth), when set.
SUMMARY_FIELDS = ("seed", "pretrained", "init_from", "corpus", "qa_train", "encoder", "d_model",
                  "hidden_size", "num_layers", "steps", "batch_size", "learning_rate",
                  "prompts_per_step", "num_generations", "advantage", "policy_loss")


def log_to_workdir(workdir: str, process_id: int | None = None) -> str | None:
  """Sends absl / Python logging to `WORKDIR/logs/run.log` and keeps WARNING and above on
  stderr; returns the file's path (None with --logtostderr, which keeps everything on
  stderr).

  Process i > 0 of a multi-process run writes `run.<i>.log`. Absl's handler is attached to
  the root logger, so every library that logs through `logging` (JAX, orbax, clu) lands in
  the file. INFO is logged unless --verbosity says otherwise.
  """
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
  if FLAGS.logtostderr:
    return None
  if process_id is None:
    process_id = int(os.environ.get("JAXSEARCH_PROCESS_ID", "0") or 0)
  if not FLAGS["stderrthreshold"].present:
    logging.set_stderrthreshold(logging.WARNING)
  os.makedirs(os.path.join(workdir, LOG_DIR), exist_ok=True)
  path = os.path.join(workdir, LOG_DIR, "run.log" if process_id == 0 else f"run.{process_id}.log")
  handler = logging.get_absl_handler().python_handler
  old = handler.stream
  handler.stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the run)
  if old not in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__, None):
    old.close()
  return path


def import_tensorflow_quietly(log_path: str | None) -> None:
  """Imports TensorFlow (if installed) with the process's C-level stderr sent to the log file.

  The metrics writers import TensorFlow anyway; TensorFlow >= 2.19 logs its start-up lines
  ("cudart_stub.cc ... Could not find cuda drivers") through absl's C++ logging before
  TF_CPP_MIN_LOG_LEVEL applies, so they are captured here, once, at the import.
  """
  import importlib.util  # noqa: PLC0415
  if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
    return
  sys.stderr.flush()
  target = os.open(log_path or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  saved = os.dup(2)
  try:
    os.dup2(target, 2)
    import tensorflow  # noqa: F401, PLC0415
  except Exception as e:  # noqa: BLE001 (whoever needs TensorFlow reports it again)
    logging.warning("importing tensorflow failed: %s", e)
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(target)


def config_summary(name: str, files, bindings, workdir: str, log_path: str | None,
                   config=None) -> str:
  """A few console lines naming the entry point, the gin files, the workdir, the log file and
  the config's key values (`SUMMARY_FIELDS`)."""
  import dataclasses  # noqa: PLC0415
  lines = [f"run {name}",
           f"  gin files: {', '.join(files)}" +
           (f" (+{len(bindings)} binding{'s' * (len(bindings) > 1)})" if bindings else ""),
           f"  workdir:   {os.path.abspath(workdir)}" +
           (f" (library log: {os.path.abspath(log_path)})" if log_path else "")]
  items = []

  def walk(obj, prefix):
    for f in dataclasses.fields(obj):
      value = getattr(obj, f.name)
      if dataclasses.is_dataclass(value) and not isinstance(value, type):
        walk(value, f"{prefix}{f.name}.")
      elif (f.name in SUMMARY_FIELDS and value not in ("", None)
            and not (prefix and f.name == "seed")):   # nested seeds follow the top one
        items.append(f"{prefix}{f.name}={value}")

  if dataclasses.is_dataclass(config) and not isinstance(config, type):
    walk(config, "")
  line = "  config:   "
  for item in items:
    if len(line) + len(item) > 100 and line.strip() != "config:":
      lines.append(line.rstrip())
      line = "            "
    line += " " + item
  if items:
    lines.append(line.rstrip())
  return "\n".join(lines)


def bound_config(name: str):
  """The config object the gin files bind to `<name>.config` (None if it cannot be built)."""
  import gin  # noqa: PLC0415
  try:
    value = gin.query_parameter(f"{name}.config")
    if isinstance(value, gin.config.ConfigurableReference):
      value = value.scoped_configurable_fn() if value.evaluate else None
    return value
  except Exception:  # noqa: BLE001 (the summary is best effort; the run reports real errors)
    return None


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
  log_path = log_to_workdir(FLAGS.workdir)
  import_tensorflow_quietly(log_path)
  import gin  # noqa: PLC0415
  import jax  # noqa: PLC0415
  from jaxsearch.train import distributed  # noqa: PLC0415
  # Before anything touches a JAX backend. JAXSEARCH_COORDINATOR / _NUM_PROCESSES /
  # _PROCESS_ID (or JAXSEARCH_COORDINATOR=auto on a TPU pod, Slurm, Open MPI) start the
  # multi-controller runtime; with none set (one process) this does nothing.
  if distributed.initialize() and log_path and jax.process_index() != 0 and (
      os.path.basename(log_path) == "run.log"):   # the id came from the runtime ("auto")
    log_path = log_to_workdir(FLAGS.workdir, jax.process_index())
  parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_path)
  run = entry_point()
  os.makedirs(FLAGS.workdir, exist_ok=True)
  if distributed.is_primary():
    name = f"{run.__module__}.{run.__name__}"
    print(config_summary(name, FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.workdir, log_path,
                         bound_config(name)), flush=True)
    with open(os.path.join(FLAGS.workdir, "config.gin"), "w") as f:
      f.write(gin.config_str())
  summary = run(workdir=FLAGS.workdir, after_first_step=lambda: record_config(FLAGS.workdir))
  record_config(FLAGS.workdir)
  logging.info("wrote %s", os.path.join(FLAGS.workdir, "summary.json"))
  keys = ("closed_book_em", "sft_em", "rl_em", "rl_f1", "rl_searches", "rl_support_recall",
          "heldout_accuracy")
  if distributed.is_primary() and any(k in summary for k in keys):
    print("summary: " + " ".join(f"{k}={summary[k]:.3f}" for k in keys if k in summary),
          flush=True)


if __name__ == "__main__":
  sys.exit(app.run(main))
