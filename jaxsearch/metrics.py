"""Metric writers (clu: TensorBoard event files + logging) and run summaries."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np


def create_writer(workdir: str):
  """A clu writer: TensorBoard events in `workdir` on process 0, logging only elsewhere."""
  from clu import metric_writers  # noqa: PLC0415  (imports TensorFlow: keep it off import paths)
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                              asynchronous=False)


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Device scalars -> Python floats (for JSON, progress lines and writers)."""
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def write_json(path: str, data: Mapping[str, Any]) -> None:
  """Writes JSON atomically (temp file + rename), from process 0 only."""
  if jax.process_index() > 0:
    return
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def progress_line(phase: str, step: int, total: int, metrics: Mapping[str, float],
                  keys: tuple[str, ...]) -> str:
  parts = [f"[{phase} {step}/{total}]"]
  parts += [f"{k}={metrics[k]:.4g}" for k in keys if k in metrics]
  return " ".join(parts)
