"""The trainer skeleton every training program runs on: restore -> steps with periodic hooks
-> summary.

A program supplies what is its own: its config, a `step_fn(state, step) -> (state, metrics,
work)` (build the step's batch, run its jitted update), what a checkpoint holds of its
state, and optionally an evaluation. The skeleton does the rest, the same way for every
program:

  - the workdir: the resolved config written as JSON (`write_config`), the summary written
    atomically at the end (`write_summary`);
  - resume: the latest intact checkpoint restored (`restore_latest`; corrupt steps are
    skipped by `Checkpointer`), the loop continuing from its step;
  - the loop (`run_loop`): a log line every `log_every` steps with `s_per_step`,
    `tokens_per_s` and `mfu` (model FLOPs utilisation against the device's peak,
    `peak_flops`), metrics to the writer under `<name>/`, a progress line from process 0
    only (`say`), an evaluation every `eval_every` steps, a checkpoint every
    `checkpoint_every` steps and at the end, the launcher's `after_first_step` callback
    after the first step;
  - the compile / memory report of a jitted step before the first step (`compile_report`).

Example:
  >>> loop = LoopConfig(name="sft", steps=800, log_every=25, checkpoint_every=100)
  >>> state, start = restore_latest(ckpt, state, checkpointed)
  >>> state = run_loop(loop, state, step_fn, start=start, writer=writer,
  ...                  save_fn=lambda step, s: ckpt.save(step, checkpointed(s), {"phase": "sft"}))
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np
from absl import logging

from jaxsearch import metrics as metrics_lib
from jaxsearch.checkpoint import Checkpointer
from jaxsearch.train import distributed, sharding
from jaxsearch.train.config_files import config_to_json
from jaxsearch.train.state import TrainState
from jaxsearch.types import PyTree

Metrics = Mapping[str, Any]
SUMMARY_FILE = "summary.json"


def once(fn: Callable[[], None] | None) -> Callable[[], None]:
  """`fn` called the first time the result is called, never again (the launcher's
  `after_first_step` across the several loops of one program); None: a no-op."""
  pending = [fn]

  def call() -> None:
    f, pending[0] = pending[0], None
    if f is not None:
      f()

  return call


def say(line: str) -> None:
  """A console line (progress, evaluation, compile report), from process 0 only (every
  process computes the same)."""
  if distributed.is_primary():
    print(line, flush=True)


class StepWork(NamedTuple):
  """What one step processed, for the throughput figures."""

  tokens: float = 0.0      # tokens through the model (padded batch size x width)
  flops: float = 0.0       # model FLOPs of those tokens (forward + backward)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
  """The cadence of one training loop.

  Attributes:
    name: the metrics prefix and progress-line tag ("sft", "rl", "rm", ...).
    steps: total steps (the loop runs from the restored step to here).
    log_every: steps between log lines (and metric writes).
    checkpoint_every: steps between checkpoints (one is also saved at the end).
    eval_every: steps between evaluations (0: never).
    progress_keys: the metrics shown on the console line, in order.
    eval_keys: the evaluation metrics shown on the console (all written); () shows all.
    eval_prefix: the metrics prefix (and console tag) of the evaluations.
    eval_at_end: evaluate at the last step too (False when the program evaluates fully
      after the loop anyway).
    log_first_step: also log after the first step of a run (a first point on the curves).
  """

  name: str
  steps: int
  log_every: int = 1
  checkpoint_every: int = 100
  eval_every: int = 0
  progress_keys: tuple[str, ...] = ("loss", "tokens_per_s", "mfu", "s_per_step")
  eval_keys: tuple[str, ...] = ()
  eval_prefix: str = "validation"
  eval_at_end: bool = True
  log_first_step: bool = False

  def __post_init__(self):
    if self.steps < 0:
      raise ValueError(f"LoopConfig.steps of {self.name!r} must be >= 0, got {self.steps}")
    for field in ("log_every", "checkpoint_every"):
      if getattr(self, field) < 1:
        raise ValueError(f"LoopConfig.{field} of {self.name!r} must be >= 1, got "
                         f"{getattr(self, field)}")
    if self.eval_every < 0:
      raise ValueError(f"LoopConfig.eval_every of {self.name!r} must be >= 0, got "
                       f"{self.eval_every}")


def write_config(workdir: str, filename: str, config: Any) -> None:
  """Writes the resolved config (every field, nested dataclasses as dicts) from process 0."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, filename), "w") as f:
      f.write(config_to_json(config) + "\n")


def write_summary(workdir: str, summary: Mapping[str, Any], writer=None) -> None:
  """Writes `summary.json` (atomically, process 0) and flushes the writer."""
  if jax.process_index() == 0:
    metrics_lib.write_json(os.path.join(workdir, SUMMARY_FILE), dict(summary))
  if writer is not None:
    writer.flush()
  logging.info("summary: %s", dict(summary))


def train_state_checkpoint(state: TrainState) -> dict:
  """What a checkpoint holds of a `TrainState` (the static apply_fn / tx are rebuilt)."""
  return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def restore_latest(ckpt: Checkpointer, state: Any,
                   checkpointed: Callable[[Any], PyTree] = train_state_checkpoint,
                   restored: Callable[[Any, PyTree], Any] | None = None,
                   ) -> tuple[Any, int, dict[str, Any]]:
  """The state at the latest intact checkpoint of `ckpt` (or `state` as is, step 0).

  Args:
    ckpt: the checkpoints of this loop.
    state: the freshly initialised state (its layout is the restore target).
    checkpointed: what a checkpoint holds of a state.
    restored: `(state, tree) -> state` (default: `state.replace(**tree)`).

  Returns:
    `(state, step, meta)`: the step the loop resumes from (the checkpoint's) and its JSON
    metadata ({} when nothing was restored).
  """
  found = ckpt.restore_latest(checkpointed(state))
  if found is None:
    return state, 0, {}
  step, tree, meta = found
  logging.info("resumed %s from step %d", meta.get("phase", ckpt.directory), step)
  state = restored(state, tree) if restored is not None else state.replace(**tree)
  return state, step, meta


def device_peak_flops(mesh) -> float | None:
  """Peak FLOP/s of the devices a step runs on (None for a device kind not in the table).

  On CPU the figure is per host (fake devices share its cores), so it is multiplied by the
  process count, not the device count.
  """
  device = jax.devices()[0]
  try:
    per_device = sharding.peak_flops(device.device_kind)
  except ValueError:
    logging.warning("MFU not logged: no peak FLOP/s for %r", device.device_kind)
    return None
  count = jax.process_count() if device.platform == "cpu" else mesh.size
  return per_device * count


class StepDoesNotFit(MemoryError):
  """A training step's compiled program needs more memory than a device has."""


ENV_DEVICE_MEMORY = "JAXSEARCH_DEVICE_MEMORY_BYTES"


def device_memory_bytes() -> float | None:
  """Memory one local device can hold: `$JAXSEARCH_DEVICE_MEMORY_BYTES` when set (e.g. to
  leave room for another job), else the accelerator's `bytes_limit`, else on CPU the host's
  available memory shared by its (possibly fake) devices. None where none is known."""
  if os.environ.get(ENV_DEVICE_MEMORY):
    return float(os.environ[ENV_DEVICE_MEMORY])
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (backends without memory statistics raise)
    stats = None
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"])
  if device.platform != "cpu":
    return None
  try:
    with open("/proc/meminfo") as f:
      info = {line.split(":")[0]: line.split()[1] for line in f}
    available = float(info["MemAvailable"]) * 1024
  except (OSError, KeyError, IndexError, ValueError):
    return None
  return available / jax.local_device_count()


def check_fits(name: str, report: Mapping[str, float], settings: Mapping[str, Any],
               limit: float | None = None) -> None:
  """Raises `StepDoesNotFit` when `report` (`sharding.compile_report`) asks for more than
  `limit` bytes per device (default `device_memory_bytes()`; None: no check), naming
  `settings` (gin binding -> current value), the ones to change."""
  limit = device_memory_bytes() if limit is None else limit
  need = report.get("total_bytes", -1.0)
  if limit is None or need <= limit:
    return
  knobs = "; ".join(f"{k} (now {v!r})" for k, v in settings.items())
  size = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
  raise StepDoesNotFit(
      f"the {name} step needs {size(need)} per device (arguments "
      f"{size(report['argument_bytes'])}, temporaries {size(report['temp_bytes'])}) but a "
      f"device has {size(limit)}; no {name} step has run. Lower its memory with one of: "
      f"{knobs}")


def compile_report(name: str, jitted, writer, *abstract_args,
                   settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Compiles a step ahead of time on abstract inputs; reports memory per device and FLOPs
  on the console and to the writer (`compile/<name>_*`). With `settings` (gin binding ->
  value: what lowers the step's memory), a step that does not fit a device stops the run
  here (`check_fits`). A later call of `jitted` on arguments like these reuses the program."""
  report = sharding.compile_report(jitted, *abstract_args)
  line = (f"[compile {name}] per device: {report['total_bytes'] / 2**20:.1f} MiB (arguments "
          f"{report['argument_bytes'] / 2**20:.1f}, temporaries "
          f"{report['temp_bytes'] / 2**20:.1f}), {report['flops_per_device']:.3g} FLOPs, "
          f"compiled in {report['compile_seconds']:.1f} s")
  logging.info("%s", line)
  say(line)
  writer.write_scalars(0, {f"compile/{name}_{k}": v for k, v in report.items()})
  if settings is not None:
    check_fits(name, report, settings)
  return report


class _Throughput:
  """Accumulates work between log lines; gives s_per_step, tokens_per_s and mfu."""

  def __init__(self, start: int, peak: float | None):
    self.peak = peak
    self.reset(start)

  def reset(self, step: int) -> None:
    self.t, self.step, self.tokens, self.flops = time.time(), step, 0.0, 0.0

  def add(self, work: StepWork) -> None:
    self.tokens += work.tokens
    self.flops += work.flops

  def rates(self, step: int) -> dict[str, float]:
    dt = max(time.time() - self.t, 1e-9)
    out = {"s_per_step": dt / max(step - self.step, 1), "tokens_per_s": self.tokens / dt}
    if self.peak and self.flops:
      out["mfu"] = self.flops / dt / self.peak
    self.reset(step)
    return out


def run_loop(loop: LoopConfig, state: Any,
             step_fn: Callable[[Any, int], tuple[Any, Metrics, StepWork]], *,
             start: int, writer, save_fn: Callable[[int, Any], None],
             eval_fn: Callable[[Any, int], Mapping[str, float] | None] | None = None,
             peak_flops: float | None = None,
             after_first_step: Callable[[], None] | None = None) -> Any:
  """Runs steps `start .. loop.steps - 1` with the periodic hooks; returns the final state.

  Args:
    loop: the cadence.
    state: the (restored) state.
    step_fn: `(state, step) -> (state, metrics, work)`: one step; metrics may be device
      arrays (fetched only on log steps, which also makes the timing honest), written as
      `<loop.name>/<key>` (a key `group/name` keeps its own group).
    start: the first step to run (the restored checkpoint's step).
    writer: the metric writer (`metrics.create_writer`).
    save_fn: `(step, state)`: writes a checkpoint of `state` after `step` steps.
    eval_fn: `(state, step) -> metrics | None`, called every `loop.eval_every` steps; its
      metrics are written under `validation/`.
    peak_flops: the devices' peak FLOP/s (`device_peak_flops`) for `mfu`; None: no mfu.
    after_first_step: called once, after the first step of this invocation.
  """
  timer = _Throughput(start, peak_flops)
  for step in range(start, loop.steps):
    state, metrics, work = step_fn(state, step)
    done = step + 1
    if step == start and after_first_step is not None:
      after_first_step()
    timer.add(work)
    if (done % loop.log_every == 0 or done == loop.steps
        or (loop.log_first_step and done == 1)):
      m = metrics_lib.to_python(metrics)   # waits for the step: the timing below is honest
      m.update(timer.rates(done))
      # A metric named `group/name` keeps its own group (e.g. REALM's `index/refreshes`).
      writer.write_scalars(done, {(k if "/" in k else f"{loop.name}/{k}"): v
                                  for k, v in m.items()})
      say(metrics_lib.progress_line(loop.name, done, loop.steps, m, loop.progress_keys))
    if (eval_fn is not None and loop.eval_every and done % loop.eval_every == 0
        and (loop.eval_at_end or done < loop.steps)):
      vm = eval_fn(state, done)
      if vm:
        writer.write_scalars(done, {f"{loop.eval_prefix}/{k}": v for k, v in vm.items()})
        keys = loop.eval_keys or sorted(vm)
        say(f"[{loop.eval_prefix} {done}] " + " ".join(
            f"{k}={vm[k]:.3f}" for k in keys if isinstance(vm.get(k), (int, float))))
    if done % loop.checkpoint_every == 0 or done == loop.steps:
      save_fn(done, state)
  return state


def epoch_batch(seed: int | tuple[int, ...], step: int, batch_size: int, n: int) -> np.ndarray:
  """The example indices of `step`: seeded epochs over `n` examples, each a fresh
  permutation, batches taken in order (a batch that runs past an epoch's end wraps around
  to that epoch's first indices).

  `np.random.default_rng([*seed, epoch])` orders epoch `epoch`; the same (seed, step) always
  gives the same batch, so a resumed run sees exactly the batches it would have seen.
  """
  seed = (seed,) if isinstance(seed, int) else tuple(seed)
  epoch, pos = divmod(step * batch_size, n)
  order = np.random.default_rng([*seed, epoch]).permutation(n)
  return np.take(order, np.arange(pos, pos + batch_size), mode="wrap")
