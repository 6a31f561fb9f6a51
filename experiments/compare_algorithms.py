r"""The RL algorithm comparison: GRPO, Dr. GRPO, Stratified GRPO, PPO, REINFORCE++, GRPO+LLDS.

Every algorithm x seed is one launcher run (`experiments.run`) of `gin/experiments/compare.gin`
(the quickstart agent on the world's 2-hop questions) plus the algorithm's `gin/algos/*.gin`,
under the same budget: the same SFT, RL steps, questions and episodes per step, and
`updates_per_batch = 2` for everyone (GRPO+LLDS needs off-policy updates). SFT runs once per
seed: the first algorithm's run of a seed trains it, the others copy it
(`RLConfig.init_from`), so all algorithms of a seed start from identical parameters. A run whose
`summary.json` exists is not launched again; an interrupted one resumes.

Then the workdirs are read (`metrics.jsonl`, `summary.json`) and `--out_dir` gets:
  table.md        one row per algorithm (the README's table)
  results.json    every run's numbers
  em_curves.png   train EM (smoothed) vs RL step, mean over seeds with a min-max band

Columns and criteria:
  final EM            `summary.json` rl_em: greedy EM on the held-out test split after RL,
                      mean ± std over seeds (std with ddof=1; 0 for one seed).
  steps to 0.8 best   the first RL step where a run's smoothed train EM (`rl/em`, the sampled
                      episodes of each step, trailing mean over `--smooth` steps) reaches
                      0.8 x the best smoothed train EM of any run in the table; mean over the
                      seeds that reach it, with how many did.
  collapsed           a run collapsed if (a) its final smoothed train EM is below 50% of its
                      peak (peak >= 0.05), (b) its mean policy entropy over the last `--smooth`
                      policy steps fell below 10% of that over its first ones, or (c) a loss or
                      metric became NaN / inf. Reported as collapsed seeds / seeds, with reasons.

Example:
  python -m experiments.compare_algorithms --out_dir=runs/compare               # run + collect
  python -m experiments.compare_algorithms --out_dir=runs/compare --collect_only
  python -m experiments.compare_algorithms --out_dir=/tmp/compare_smoke --smoke # tiny, minutes
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_GIN = "gin/experiments/compare.gin"
# (key, display name, algorithm gin file); the first of a seed trains the shared SFT.
ALGORITHMS = (
    ("grpo", "GRPO", "gin/algos/grpo.gin"),
    ("drgrpo", "Dr. GRPO", "gin/algos/drgrpo.gin"),
    ("stratified_grpo", "Stratified GRPO", "gin/algos/stratified_grpo.gin"),
    ("ppo", "PPO", "gin/algos/ppo.gin"),
    ("reinforce_pp", "REINFORCE++", "gin/algos/reinforce_pp.gin"),
    ("grpo_llds", "GRPO+LLDS", "gin/algos/grpo_llds.gin"),
    ("rloo", "RLOO", "gin/algos/rloo.gin"),
)
DEFAULT_ALGOS = ("grpo", "drgrpo", "stratified_grpo", "ppo", "reinforce_pp", "grpo_llds")
COMMON_BINDINGS = ("steps.PolicyGradientConfig.updates_per_batch = 2",)
# Smoke mode: a tiny world and model, a few steps (as tests/integration/launcher_test.py).
SMOKE_BINDINGS = (
    "SFT_STEPS = 3", "RL_STEPS = 4",
    "world.WorldConfig.num_people = 60", "world.WorldConfig.num_distractors = 20",
    "world.WorldConfig.train_size = 100", "world.WorldConfig.validation_size = 10",
    "world.WorldConfig.test_size = 16",
    "experiment.SFTConfig.num_demos = 64", "experiment.SFTConfig.batch_size = 8",
    "steps.PolicyGradientConfig.prompts_per_step = 2", "steps.PolicyGradientConfig.num_generations = 2",
    "experiment.RunConfig.eval_batch_size = 16", "experiment.RunConfig.checkpoint_every = 2",
    "search_env.RolloutConfig.max_len = 128",
    "transformer.TransformerConfig.d_model = 32", "transformer.TransformerConfig.num_layers = 1",
    "transformer.TransformerConfig.mlp_dim = 64",
)
# ... and per algorithm (only the files that bind a configurable may set it).
SMOKE_ALGO_BINDINGS = {"ppo": ("steps.CriticConfig.warmup_steps = 1",)}
TARGET_FRACTION = 0.8
EM_DROP = 0.5          # collapsed when the final smoothed EM < EM_DROP x its peak ...
MIN_PEAK = 0.05        # ... and that peak is at least this
ENTROPY_DROP = 0.1     # collapsed when the final entropy < ENTROPY_DROP x the initial one


def algorithm(key: str) -> tuple[str, str, str]:
  for entry in ALGORITHMS:
    if entry[0] == key:
      return entry
  raise ValueError(f"unknown algorithm {key!r}; known: {[a[0] for a in ALGORITHMS]}")


def run_dir(out_dir: str, key: str, seed: int) -> str:
  return os.path.join(out_dir, "runs", key, f"seed{seed}")


# ---------------------------------------------------------------------------------- running


def launch_command(out_dir: str, key: str, seed: int, *, init_from: str = "",
                   base_gin: str = BASE_GIN, bindings: Sequence[str] = ()) -> list[str]:
  """The launcher command line of one run (bindings after the files, ours after the user's)."""
  binds = [*COMMON_BINDINGS, *bindings, f"SEED = {seed}"]
  if init_from:
    binds.append(f"experiment.RLConfig.init_from = {json.dumps(os.path.abspath(init_from))}")
  return [sys.executable, "-m", "experiments.run", f"--gin_file={base_gin}",
          f"--gin_file={algorithm(key)[2]}", *(f"--gin_bindings={b}" for b in binds),
          f"--workdir={os.path.abspath(run_dir(out_dir, key, seed))}"]


def run_all(out_dir: str, algos: Sequence[str], seeds: Sequence[int], *,
            base_gin: str = BASE_GIN, bindings: Sequence[str] = (),
            algo_bindings: dict[str, Sequence[str]] | None = None) -> None:
  """Launches every missing run, seed by seed; the first algorithm of a seed trains its SFT.

  `bindings` go to every run, `algo_bindings[key]` to that algorithm's runs only.
  """
  algo_bindings = algo_bindings or {}
  for seed in seeds:
    source = ""
    for key in algos:
      workdir = run_dir(out_dir, key, seed)
      if not os.path.exists(os.path.join(workdir, "summary.json")):
        os.makedirs(workdir, exist_ok=True)
        cmd = launch_command(out_dir, key, seed, init_from=source, base_gin=base_gin,
                             bindings=[*bindings, *algo_bindings.get(key, ())])
        t0 = time.time()
        print(f"[compare] {key} seed {seed}: {' '.join(cmd[2:])}", flush=True)
        with open(os.path.join(workdir, "launcher.log"), "a") as log:
          out = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
        if out.returncode:
          raise RuntimeError(f"{key} seed {seed} failed (exit {out.returncode}); see "
                             f"{os.path.join(workdir, 'launcher.log')}")
        print(f"[compare] {key} seed {seed} done in {time.time() - t0:.0f} s", flush=True)
      source = source or workdir


# ------------------------------------------------------------------------------- collecting


@dataclasses.dataclass
class RunResult:
  """One workdir's numbers."""

  key: str
  seed: int
  final_em: float                  # summary.json rl_em (test split, greedy)
  sft_em: float                    # summary.json sft_em
  steps: list[int]                 # RL steps with a train EM
  em: list[float]                  # rl/em per step
  smoothed: list[float]            # trailing mean of em
  entropy: list[float]             # rl/entropy of the policy steps
  finite: bool                     # every rl/* value finite
  steps_to_target: int | None = None
  collapsed: bool = False
  reasons: list[str] = dataclasses.field(default_factory=list)


def smooth(values: Sequence[float], window: int) -> list[float]:
  """Trailing moving average: entry i is the mean of values[max(0, i - window + 1): i + 1]."""
  out, total = [], 0.0
  for i, v in enumerate(values):
    total += v
    if i >= window:
      total -= values[i - window]
    out.append(total / min(i + 1, window))
  return out


def first_step_reaching(steps: Sequence[int], values: Sequence[float], target: float
                        ) -> int | None:
  """The first step whose value is >= target (None if none)."""
  for s, v in zip(steps, values):
    if v >= target - 1e-12:
      return int(s)
  return None


def collapse_reasons(smoothed: Sequence[float], entropy: Sequence[float], finite: bool,
                     window: int) -> list[str]:
  """Why a run counts as collapsed (empty: it did not); see the module docstring."""
  reasons = []
  if not finite:
    reasons.append("non-finite metric")
  if smoothed:
    peak = max(smoothed)
    if peak >= MIN_PEAK and smoothed[-1] < EM_DROP * peak:
      reasons.append(f"EM {smoothed[-1]:.2f} < {EM_DROP:.0%} of peak {peak:.2f}")
  if len(entropy) >= 2 * window:
    first, last = float(np.mean(entropy[:window])), float(np.mean(entropy[-window:]))
    if first > 0 and last < ENTROPY_DROP * first:
      reasons.append(f"entropy {last:.3f} < {ENTROPY_DROP:.0%} of initial {first:.3f}")
  return reasons


def load_run(workdir: str, key: str, seed: int, window: int) -> RunResult:
  """Reads a workdir's metrics.jsonl and summary.json."""
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  steps, em, entropy, finite = [], [], [], True
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  by_step = {}
  for row in rows:   # a resumed run may rewrite a step: the last write wins
    if "rl/em" in row:
      by_step[int(row["step"])] = row
  for step in sorted(by_step):
    row = by_step[step]
    finite &= all(math.isfinite(v) for k, v in row.items() if k.startswith("rl/"))
    steps.append(step)
    em.append(float(row["rl/em"]))
    if "rl/entropy" in row:   # absent during PPO's critic warm-up
      entropy.append(float(row["rl/entropy"]))
  return RunResult(key=key, seed=seed, final_em=float(summary["rl_em"]),
                   sft_em=float(summary.get("sft_em", float("nan"))), steps=steps, em=em,
                   smoothed=smooth(em, window), entropy=entropy, finite=finite)


def collect(out_dir: str, algos: Sequence[str], seeds: Sequence[int], *, window: int = 10
            ) -> list[RunResult]:
  """Every finished run under `out_dir`, with steps-to-target and collapse filled in.

  The target is `TARGET_FRACTION` x the best smoothed train EM over all collected runs.
  """
  results = []
  for key in algos:
    for seed in seeds:
      workdir = run_dir(out_dir, key, seed)
      if os.path.exists(os.path.join(workdir, "summary.json")):
        results.append(load_run(workdir, key, seed, window))
  best = max((max(r.smoothed) for r in results if r.smoothed), default=0.0)
  for r in results:
    r.steps_to_target = (first_step_reaching(r.steps, r.smoothed, TARGET_FRACTION * best)
                         if best > 0 else None)
    r.reasons = collapse_reasons(r.smoothed, r.entropy, r.finite, window)
    r.collapsed = bool(r.reasons)
  return results


def summarize(results: Sequence[RunResult], algos: Sequence[str]) -> list[dict]:
  """One row per algorithm (in `algos` order) aggregating its seeds."""
  rows = []
  for key in algos:
    runs = [r for r in results if r.key == key]
    if not runs:
      continue
    final = np.array([r.final_em for r in runs])
    reached = [r.steps_to_target for r in runs if r.steps_to_target is not None]
    rows.append({
        "key": key, "name": algorithm(key)[1], "seeds": len(runs),
        "final_em_mean": float(final.mean()),
        "final_em_std": float(final.std(ddof=1)) if len(runs) > 1 else 0.0,
        "sft_em_mean": float(np.mean([r.sft_em for r in runs])),
        "steps_to_target_mean": float(np.mean(reached)) if reached else None,
        "reached": len(reached),
        "collapsed": sum(r.collapsed for r in runs),
        "collapse_reasons": sorted({why for r in runs for why in r.reasons}),
        "final_train_em": float(np.mean([r.smoothed[-1] for r in runs if r.smoothed]))
                          if any(r.smoothed for r in runs) else None,
        "final_entropy": float(np.mean([r.entropy[-1] for r in runs if r.entropy]))
                         if any(r.entropy for r in runs) else None,
    })
  return rows


def markdown_table(rows: Sequence[dict], *, best: float, window: int) -> str:
  """The comparison table with its criteria as a footnote."""
  def num(x, fmt="{:.3f}"):
    return "n/a" if x is None else fmt.format(x)

  lines = [
      "| algorithm | final EM (test) | SFT EM | steps to 0.8 × best | collapsed | "
      "final train EM | final entropy |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    steps = ("never" if r["steps_to_target_mean"] is None
             else f"{r['steps_to_target_mean']:.1f} ({r['reached']}/{r['seeds']})")
    collapsed = f"{'yes' if r['collapsed'] else 'no'} ({r['collapsed']}/{r['seeds']})"
    lines.append(
        f"| {r['name']} | {r['final_em_mean']:.3f} ± {r['final_em_std']:.3f} | "
        f"{r['sft_em_mean']:.3f} | {steps} | {collapsed} | {num(r['final_train_em'])} | "
        f"{num(r['final_entropy'])} |")
  lines += [
      "",
      f"Final EM: greedy exact match on the test split after RL, mean ± std over seeds "
      f"(ddof=1). Steps to 0.8 × best: first RL step where the run's train EM (trailing mean "
      f"over {window} steps) reaches 0.8 × {best:.3f}, the best such EM of any run; mean over "
      f"the seeds that reach it (reached/seeds). Collapsed: final smoothed train EM < "
      f"{EM_DROP:.0%} of its peak (peak ≥ {MIN_PEAK}), or policy entropy over the last {window} "
      f"steps < {ENTROPY_DROP:.0%} of that over the first {window}, or a NaN/inf metric "
      f"(collapsed seeds/seeds).",
  ]
  return "\n".join(lines) + "\n"


def plot(results: Sequence[RunResult], algos: Sequence[str], path: str, *, best: float) -> None:
  """Smoothed train EM vs RL step per algorithm: mean over seeds, min-max band."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for key in algos:
    runs = [r for r in results if r.key == key and r.steps]
    if not runs:
      continue
    n = min(len(r.steps) for r in runs)
    steps = np.array(runs[0].steps[:n])
    curves = np.array([r.smoothed[:n] for r in runs])
    line, = ax.plot(steps, curves.mean(0), label=f"{algorithm(key)[1]} ({len(runs)} seeds)")
    if len(runs) > 1:
      ax.fill_between(steps, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
  if best > 0:
    ax.axhline(TARGET_FRACTION * best, color="gray", ls="--", lw=1, label="0.8 × best")
  ax.set_xlabel("RL step")
  ax.set_ylabel("train EM (smoothed)")
  ax.set_title("2-hop questions: train EM during RL")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(out_dir: str, algos: Sequence[str], seeds: Sequence[int], *, window: int) -> str:
  """Collects the runs and writes table.md, results.json and em_curves.png; returns the table."""
  results = collect(out_dir, algos, seeds, window=window)
  if not results:
    raise FileNotFoundError(f"no finished run (summary.json) under {out_dir}/runs")
  best = max((max(r.smoothed) for r in results if r.smoothed), default=0.0)
  rows = summarize(results, algos)
  table = markdown_table(rows, best=best, window=window)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump({"best_smoothed_train_em": best, "window": window, "rows": rows,
               "runs": [dataclasses.asdict(r) for r in results]}, f, indent=2)
  plot(results, algos, os.path.join(out_dir, "em_curves.png"), best=best)
  return table


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out_dir", required=True, help="runs/ and the report go here")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  parser.add_argument("--algos", default=",".join(DEFAULT_ALGOS),
                      help=f"comma-separated, from {[a[0] for a in ALGORITHMS]}")
  parser.add_argument("--collect_only", action="store_true", help="only read the workdirs")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny world/model and 4 RL steps, one seed unless --seeds is given")
  parser.add_argument("--base_gin", default=BASE_GIN)
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="extra bindings for every run (e.g. 'RL_STEPS = 100')")
  parser.add_argument("--smooth", type=int, default=None,
                      help="train-EM smoothing window (default 10; 2 with --smoke)")
  args = parser.parse_args(argv)
  algos = [a for a in args.algos.split(",") if a]
  for key in algos:
    algorithm(key)
  seeds_arg = args.seeds if not (args.smoke and args.seeds == "0,1,2") else "0"
  seeds = [int(s) for s in seeds_arg.split(",") if s]
  window = args.smooth or (2 if args.smoke else 10)
  bindings = [*(SMOKE_BINDINGS if args.smoke else ()), *args.gin_bindings]
  os.makedirs(args.out_dir, exist_ok=True)
  if not args.collect_only:
    run_all(args.out_dir, algos, seeds, base_gin=args.base_gin, bindings=bindings,
            algo_bindings=SMOKE_ALGO_BINDINGS if args.smoke else None)
  print(report(args.out_dir, algos, seeds, window=window), flush=True)
  print(f"wrote {args.out_dir}/table.md, results.json, em_curves.png", flush=True)


if __name__ == "__main__":
  main()
