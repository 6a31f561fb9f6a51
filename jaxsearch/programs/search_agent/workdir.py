"""Open a run's workdir: its configuration, tokenizer, agent and checkpointed parameters.

`loop.run` writes `run_config.json` (the resolved `RunConfig`, every field) next to the gin
files, so a notebook or an inspection tool rebuilds exactly the trained agent without gin.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jaxsearch.checkpoint import Checkpointer
from jaxsearch.train.config_files import config_from_dict, config_to_json, read_config  # noqa: F401
from jaxsearch.data.tokenizer import load_tokenizer
from jaxsearch.programs.search_agent.experiment import Experiment, RunConfig, setup
from jaxsearch.types import PyTree

CONFIG_FILE = "run_config.json"
PHASES = ("sft", "rl")


def load_config(workdir: str) -> RunConfig:
  return read_config(workdir, CONFIG_FILE, RunConfig, "the workdir of a jaxsearch run")


def load_experiment(workdir: str) -> Experiment:
  """The agent of a workdir (world, tokenizer, search tool, model), without parameters."""
  config = load_config(workdir)
  tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer.model"))
  return setup(config, tokenizer=tokenizer)


def load_params(exp: Experiment, workdir: str, phase: str = "rl", step: int | None = None) -> PyTree:
  """Parameters from the `phase` ("sft" or "rl") checkpoint at `step` (default: the latest)."""
  if phase not in PHASES:
    raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", phase))
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no {phase} checkpoint in {workdir}")
  params, _ = exp.init_params(jax.random.key(0))
  phase_config = exp.config.sft if phase == "sft" else exp.config.rl
  tx = exp.optimizer(phase_config.optimizer, phase_config.steps)
  target = {"params": params, "opt_state": tx.init(params),
            "step": jnp.zeros([], jnp.int32)}
  tree, _ = ckpt.restore(step, jax.eval_shape(lambda: target))
  ckpt.close()
  return tree["params"]
