"""The search agent's `RunConfig` as gin files give it, without running it (for the commands
that load an untrained pretrained policy: `experiments.evaluate`, `experiments.inspect_agent`).

Gin stays out of the library: this module is the commands' side.
"""
from __future__ import annotations

import os
from typing import Sequence

LOOP_CONFIG = "jaxsearch.programs.search_agent.loop.run.config"


def run_config_from_gin(gin_files: Sequence[str], bindings: Sequence[str] = (),
                        search_paths: Sequence[str] = ()):
  """The `RunConfig` that gin files (and bindings) give `loop.run`, without running it.

  Clears gin's global configuration first (a command line's one-off parse). Includes are
  looked up in `search_paths` and the current directory.

  Raises:
    ValueError: the files bind no `loop.run.config` (e.g. another entry point's files).

  Example:
    >>> config = run_config_from_gin(["gin/experiments/qa_example.gin",
    ...                               "gin/models/smollm2_135m.gin"])  # doctest: +SKIP
    >>> config.pretrained  # doctest: +SKIP
    'smollm2-135m-instruct'
  """
  import gin  # noqa: PLC0415
  from jaxsearch.programs.search_agent import loop  # noqa: F401, PLC0415 (the configurable)
  gin.clear_config()
  for path in (*search_paths, os.getcwd()):
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
  try:
    value = gin.query_parameter(LOOP_CONFIG)
  except ValueError:
    raise ValueError(f"the gin files {list(gin_files)} bind no `loop.run.config` (a search "
                     "agent's RunConfig, e.g. gin/experiments/search_r1.gin)") from None
  if isinstance(value, gin.config.ConfigurableReference):
    value = value.scoped_configurable_fn()
  return value
