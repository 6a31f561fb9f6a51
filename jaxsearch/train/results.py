"""Reading finished (or running) workdirs for notebooks and reports: curves and final numbers.

A workdir written by `experiments.run` holds, among others,
  metrics.jsonl    one JSON object per logged step, `{"step": s, "rl/reward": ..., ...}`
                   (`jaxsearch.metrics`); SFT rows carry `sft/*` keys, RL rows `rl/*` keys
                   (their steps restart at 1), evaluation rows `eval/*` keys;
  summary.json     the final metrics of the run (`rl_em`, `sft_em`, `closed_book_em`, ...),
                   written when the run finishes;
  run_config.json  the resolved configuration (`RunConfig` as nested dicts).

`load_runs` reads them into `RunResult`s (`jaxsearch.metrics.read_metrics`: a step that a
resumed run logged again appears once, with the later values); `curves` gives one metric
against the step (a step logged twice keeps its last value); `final_value` gives one number
per run, looked up in the summary, then as the last point of the curve, then as a dotted
path of the config (`"rl.algorithm.advantage"`); `summary_table` lays those out as plain text.

Example:
  >>> runs = load_runs(["runs/compare/runs/grpo/seed0", "runs/compare/runs/ppo/seed0"])
  >>> [r.name for r in runs]
  ['grpo/seed0', 'ppo/seed0']
  >>> steps, em = curves(runs[0], "rl/em")                    # [n] int64, [n] float64
  >>> print(summary_table(runs, ["rl_em", "rl/kl", "rl.algorithm.advantage"]))
  run         rl_em  rl/kl  rl.algorithm.advantage
  ----------  -----  -----  -----------------
  grpo/seed0  0.615  0.084               grpo
  ppo/seed0   0.575  0.106                gae
"""
from __future__ import annotations

import difflib
import json
import math
import os
from typing import Any, NamedTuple, Sequence

import numpy as np

from jaxsearch.metrics import METRICS_FILE, read_metrics

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "run_config.json"


class RunResult(NamedTuple):
  """What one workdir holds."""

  name: str                           # short unique label (see `load_runs`)
  path: str                           # the workdir, absolute
  rows: tuple[dict[str, Any], ...]    # metrics.jsonl rows (`read_metrics`), in file order
  summary: dict[str, Any]             # summary.json ({} while the run is unfinished)
  config: dict[str, Any]              # run_config.json ({} if absent)

  @property
  def finished(self) -> bool:
    """Whether the run wrote its summary.json."""
    return bool(self.summary)


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def _read_rows(workdir: str) -> tuple[dict[str, Any], ...]:
  rows = read_metrics(workdir)   # a resumed run's repeated steps once; a cut-short line skipped
  for i, row in enumerate(rows, start=1):
    if not isinstance(row, dict) or "step" not in row:
      raise ValueError(f"{os.path.join(workdir, METRICS_FILE)}: row {i} is not an object with "
                       f"a 'step': {str(row)[:80]}")
  return tuple(rows)


def _short_names(paths: Sequence[str]) -> list[str]:
  """The fewest trailing path components that tell the paths apart."""
  parts = [p.strip(os.sep).split(os.sep) for p in paths]
  depth = max((len(p) for p in parts), default=1)
  for d in range(1, depth + 1):
    names = ["/".join(p[-d:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  return ["/".join(p) for p in parts]


def load_runs(paths: Sequence[str | os.PathLike], names: Sequence[str] | None = None,
              ) -> list[RunResult]:
  """Reads each workdir's metrics.jsonl, summary.json and run_config.json.

  Args:
    paths: workdirs (relative paths are taken from the current directory).
    names: labels, one per path; default: the fewest trailing path components that tell
      the paths apart (`.../grpo/seed0`, `.../ppo/seed0` -> "grpo/seed0", "ppo/seed0").

  Returns:
    One `RunResult` per path, in order. A workdir whose run has not finished has
    `summary == {}`.

  Raises:
    FileNotFoundError: a path that is not a directory.
    ValueError: a directory with neither metrics.jsonl nor summary.json, a metrics row
      without a step or a summary.json / run_config.json that is not a JSON object (the file
      is named), the same workdir twice, or names that are not one unique label per path.
      (`read_metrics` skips a metrics line a kill cut short.)

  Example:
    >>> runs = load_runs(["runs/a", "runs/b"])
    >>> runs[0].summary["rl_em"], len(runs[0].rows)
  """
  if isinstance(paths, (str, os.PathLike)):
    raise ValueError(f"paths must be a sequence of workdirs, got one path {os.fspath(paths)!r}")
  full = [os.path.abspath(os.fspath(p)) for p in paths]
  for given, path in zip(paths, full):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"workdir {os.fspath(given)!r} is not a directory")
    if not any(os.path.exists(os.path.join(path, f)) for f in (METRICS_FILE, SUMMARY_FILE)):
      raise ValueError(f"workdir {os.fspath(given)!r} holds no run: no {METRICS_FILE} or "
                       f"{SUMMARY_FILE}")
  if len(set(full)) != len(full):
    dup = next(p for p in full if full.count(p) > 1)
    raise ValueError(f"workdir {dup!r} is given twice")
  if names is None:
    names = _short_names(full)
  else:
    names = list(names)
    if len(names) != len(full) or len(set(names)) != len(names):
      raise ValueError(f"names must be {len(full)} unique labels (one per path), got {names}")
  return [RunResult(name=name, path=path, rows=_read_rows(path),
                    summary=_read_json(os.path.join(path, SUMMARY_FILE)),
                    config=_read_json(os.path.join(path, CONFIG_FILE)))
          for name, path in zip(names, full)]


def metric_keys(run: RunResult) -> list[str]:
  """Sorted metric names of `run`'s metrics.jsonl (every key but "step")."""
  return sorted({k for row in run.rows for k in row if k != "step"})


def curves(run: RunResult, key: str) -> tuple[np.ndarray, np.ndarray]:
  """One metric against the step, e.g. `curves(run, "rl/reward")`.

  Only rows that hold `key` count, sorted by step; a step logged more than once (a resumed
  run logs again the steps after its last checkpoint) keeps the value written last.

  Args:
    run: a `RunResult`.
    key: a metric name as written in metrics.jsonl ("rl/em", "sft/loss", "eval/rl_em").

  Returns:
    (steps [n] int64, values [n] float64).

  Raises:
    KeyError: `key` is in no row of the run (the message lists the closest names).

  Example:
    >>> steps, reward = curves(run, "rl/reward")
  """
  by_step: dict[int, float] = {}
  for row in run.rows:
    if key in row:
      by_step[int(row["step"])] = float(row[key])
  if not by_step:
    keys = metric_keys(run)
    close = difflib.get_close_matches(key, keys, n=5, cutoff=0.5) or keys[:10]
    raise KeyError(f"run {run.name!r} logged no {key!r}; closest metrics: {close}")
  steps = np.array(sorted(by_step), np.int64)
  return steps, np.array([by_step[s] for s in steps.tolist()], np.float64)


def moving_average(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
  """Trailing mean: entry i is the mean of `values[max(0, i - window + 1): i + 1]`.

  Example:
    >>> moving_average([1., 3., 5., 7.], 2)   # [1, 2, 4, 6]
  """
  if isinstance(window, bool) or not isinstance(window, int) or window < 1:
    raise ValueError(f"window must be an int >= 1, got {window!r}")
  x = np.asarray(values, np.float64)
  if x.ndim != 1:
    raise ValueError(f"values must be 1-D, got shape {x.shape}")
  csum = np.concatenate([[0.0], np.cumsum(x)])
  i = np.arange(1, len(x) + 1)
  lo = np.maximum(i - window, 0)
  return (csum[i] - csum[lo]) / (i - lo)


# Config fields renamed since older workdirs were written: today's name -> the old one.
_RENAMED_CONFIG_KEYS = {"algorithm": "grpo"}


def _config_value(config: dict[str, Any], dotted: str) -> Any:
  node: Any = config
  for part in dotted.split("."):
    if isinstance(node, dict) and part not in node and _RENAMED_CONFIG_KEYS.get(part) in node:
      part = _RENAMED_CONFIG_KEYS[part]   # a run written before the rename
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def final_value(run: RunResult, key: str) -> Any:
  """One number (or setting) of a run: the summary's `key`, else the last point of the
  metric `key` (`curves`), else the config value at the dotted path `key`; None if none.

  Example:
    >>> final_value(run, "rl_em"), final_value(run, "rl/kl"), final_value(run, "rl.steps")
  """
  if key in run.summary:
    return run.summary[key]
  if any(key in row for row in run.rows):
    return float(curves(run, key)[1][-1])
  return _config_value(run.config, key)


def _format(value: Any, digits: int) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
  if isinstance(value, (dict, list)):
    return json.dumps(value, sort_keys=True)
  return str(value)


def summary_table(runs: Sequence[RunResult], keys: Sequence[str], *, digits: int = 3) -> str:
  """A plain-text table: one row per run, one column per key (`final_value`).

  Floats are printed with `digits` decimals, a value a run lacks as "-"; the run column is
  left-aligned, the others right-aligned; a dashed line separates the header.

  Args:
    runs: from `load_runs`.
    keys: summary keys ("rl_em"), metric names ("rl/kl", last value) or config paths
      ("rl.algorithm.advantage").
    digits: decimals of floats.

  Returns:
    The table, lines joined by "\\n" (no trailing newline).

  Example:
    >>> print(summary_table(runs, ["rl_em", "rl/kl"]))
    run   rl_em  rl/kl
    ----  -----  -----
    grpo  0.720  0.240
  """
  if isinstance(keys, str):
    raise ValueError(f"keys must be a sequence of names, got one string {keys!r}")
  if isinstance(digits, bool) or not isinstance(digits, int) or digits < 0:
    raise ValueError(f"digits must be an int >= 0, got {digits!r}")
  header = ["run", *keys]
  body = [[run.name, *(_format(final_value(run, k), digits) for k in keys)] for run in runs]
  widths = [max(len(row[j]) for row in [header, *body]) for j in range(len(header))]

  def line(cells):
    out = [cells[0].ljust(widths[0])]
    out += [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
    return "  ".join(out).rstrip()

  return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])
