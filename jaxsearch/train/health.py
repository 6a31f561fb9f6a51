"""Health of an RL run: warnings that a run is collapsing before the reward shows it.

Every RL step's metrics pass through a `HealthMonitor`, which compares them with the run's
own first steps (the *baseline*: the mean of the first `baseline_steps` steps it sees) and
raises a warning when one of these conditions holds for `patience` consecutive steps:

  entropy_collapse          entropy < entropy_floor x baseline entropy: the policy has
                            become (nearly) deterministic; exploration is gone.
  likelihood_displacement   logp_change_pos < likelihood_drop (nats per token): the update
                            LOWERED the likelihood of the episodes it rewards, pushing
                            probability mass to tokens the batch never wrote (the
                            likelihood-displacement signature that precedes collapse in
                            GRPO-style training; `rl_update.likelihood_change`).
  length_drift              |length / baseline length - 1| > length_drift: episodes grow
                            (rambling, repetition) or shrink (giving up) away from the start.
  search_collapse           baseline searches >= min_searches and searches <
                            (1 - search_drift) x baseline: the agent stops searching.
  format_collapse           baseline format >= min_format and format < (1 - format_drift) x
                            baseline: answers stop being well formed.
  over_clipping             clip_frac > max_clip_frac: most of the update is clipped, the
                            step size is too large for the batch.

A warning is reported once when its condition starts (after `patience` steps) and again only
after it has cleared. `HealthMonitor.update` returns the new warning lines and metrics
(`health/<condition>` 1.0 while it holds, `health/warnings` their number) for the writer.
Metrics a step does not have are skipped (a condition without its metric never fires).

Example:
  >>> monitor = HealthMonitor(HealthConfig())
  >>> lines, scalars = monitor.update(step, {"entropy": 0.9, "length": 120.0, ...})
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping


@dataclasses.dataclass(frozen=True, kw_only=True)
class HealthConfig:
  """Thresholds of the health conditions (module docstring)."""

  baseline_steps: int = 5
  patience: int = 3
  entropy_floor: float = 0.2
  likelihood_drop: float = -0.02
  length_drift: float = 0.5
  search_drift: float = 0.5
  min_searches: float = 0.2
  format_drift: float = 0.5
  min_format: float = 0.2
  max_clip_frac: float = 0.3

  def __post_init__(self):
    for name in ("baseline_steps", "patience"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"HealthConfig.{name} must be an int >= 1, got {value!r}")
    for name in ("entropy_floor", "search_drift", "format_drift", "max_clip_frac"):
      if not 0.0 < getattr(self, name) < 1.0:
        raise ValueError(f"HealthConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")


# name -> (metric keys it reads, test(current, baseline, config) -> (holds, description)).
_Check = Callable[[Mapping[str, float], Mapping[str, float], HealthConfig], tuple[bool, str]]


def _entropy(m, base, c):
  now, ref = m["entropy"], base["entropy"]
  return ref > 0 and now < c.entropy_floor * ref, (
      f"entropy fell to {now / max(ref, 1e-12):.0%} of its start ({ref:.3g} -> {now:.3g})")


def _likelihood(m, base, c):
  del base
  now = m["logp_change_pos"]
  return now < c.likelihood_drop, (
      f"the update lowered the log-likelihood of rewarded episodes by {-now:.3g} nats/token")


def _length(m, base, c):
  now, ref = m["length"], base["length"]
  return ref > 0 and abs(now / ref - 1.0) > c.length_drift, (
      f"episode length drifted from {ref:.1f} to {now:.1f} tokens")


def _searches(m, base, c):
  now, ref = m["searches"], base["searches"]
  return ref >= c.min_searches and now < (1.0 - c.search_drift) * ref, (
      f"searches per episode fell from {ref:.2f} to {now:.2f}")


def _format(m, base, c):
  now, ref = m["format"], base["format"]
  return ref >= c.min_format and now < (1.0 - c.format_drift) * ref, (
      f"well-formed episodes fell from {ref:.0%} to {now:.0%}")


def _clipping(m, base, c):
  del base
  now = m["clip_frac"]
  return now > c.max_clip_frac, f"{now:.0%} of the policy tokens' ratios were clipped"


CHECKS: dict[str, tuple[tuple[str, ...], _Check]] = {
    "entropy_collapse": (("entropy",), _entropy),
    "likelihood_displacement": (("logp_change_pos",), _likelihood),
    "length_drift": (("length",), _length),
    "search_collapse": (("searches",), _searches),
    "format_collapse": (("format",), _format),
    "over_clipping": (("clip_frac",), _clipping),
}
_BASELINE_KEYS = ("entropy", "length", "searches", "format")


class HealthMonitor:
  """Feeds on each RL step's metrics; reports the conditions of the module docstring."""

  def __init__(self, config: HealthConfig = HealthConfig()):
    self.config = config
    self._seen: dict[str, list[float]] = {k: [] for k in _BASELINE_KEYS}
    self._streak = {name: 0 for name in CHECKS}
    self._active = {name: False for name in CHECKS}

  def baseline(self) -> dict[str, float]:
    """Mean of each baseline metric over the first `baseline_steps` steps that had it."""
    return {k: sum(v) / len(v) for k, v in self._seen.items() if v}

  def update(self, step: int, metrics: Mapping[str, float]) -> tuple[list[str], dict[str, float]]:
    """Reads one step's metrics; returns (new warning lines, `health/*` scalars)."""
    c = self.config
    ready = all(len(v) >= c.baseline_steps for k, v in self._seen.items() if k in metrics)
    for k in _BASELINE_KEYS:
      if k in metrics and len(self._seen[k]) < c.baseline_steps:
        self._seen[k].append(float(metrics[k]))
    base = self.baseline()
    lines, scalars = [], {}
    for name, (keys, check) in CHECKS.items():
      needs_base = [k for k in keys if k in _BASELINE_KEYS]
      if any(k not in metrics for k in keys):
        continue
      holds, what = False, ""
      if ready or not needs_base:
        holds, what = check({k: float(metrics[k]) for k in keys}, base, c)
      self._streak[name] = self._streak[name] + 1 if holds else 0
      now = self._streak[name] >= c.patience
      if now and not self._active[name]:
        lines.append(f"[health] step {step}: {name}: {what} ({self._streak[name]} steps in a "
                     "row)")
      self._active[name] = now
      scalars[f"health/{name}"] = float(now)
    scalars["health/warnings"] = float(sum(self._active.values()))
    return lines, scalars
