"""The host loop: warm start (SFT), evaluation, RL (GRPO family or PPO), evaluation.

It only calls pure pieces (`steps.py`). The RL algorithm is `RLConfig.grpo` (advantage
estimator, loss options); PPO (`advantage="gae"`) trains a critic alongside the policy.

Workdir layout:
  tokenizer.model          the tokenizer (trained on the world or the pretrained model's; reused
                           on resume)
  checkpoints/sft, /rl     orbax checkpoints (state + JSON metadata)
  checkpoints/critic       PPO's critic, saved at the same steps as checkpoints/rl
  eval_*.json              evaluation results as they are produced (closed book, SFT, RL)
  summary.json             final metrics: closed_book_em, sft_em, rl_em (+ F1, search stats)
  metrics.jsonl            every scalar written (sft/*, rl/*, eval/*, validation/*)
  events.out.tfevents.*    TensorBoard scalars (clu)
A second run with the same workdir resumes from the latest checkpoint of the latest phase.

Sharing a warm start: with `RLConfig.init_from = "<other workdir>"` a fresh workdir first
copies that run's tokenizer and finished SFT checkpoint (and its closed-book / SFT evaluations
when the evaluation settings match), so several RL algorithms start from the same SFT
parameters while SFT runs once. The two runs must agree on the world, tokenizer size, model,
pretrained checkpoint and SFT settings (a ValueError names the fields that differ).

RL telemetry, every step (`rl/` in metrics.jsonl and TensorBoard): entropy (mean over policy
tokens, from the loss's logits), kl (to the reference), clip_frac, ratio_min / ratio_max,
approx_kl, adv_mean / adv_std (over policy tokens), zero_var_frac (groups whose rewards are
all equal), response_length (policy tokens per episode), searches (search calls per episode),
em, reward, and for PPO value_loss, explained_variance, vf_clipfrac, critic_warmup.
"""
from __future__ import annotations

import functools
import os
import shutil
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from jaxsearch import metrics as metrics_lib
from jaxsearch.checkpoint import Checkpointer
from jaxsearch.data import demos
from jaxsearch.data.tokenizer import load_tokenizer, save_tokenizer
from jaxsearch.train import distributed
from jaxsearch.programs.search_agent import evaluate as eval_lib
from jaxsearch.programs.search_agent.experiment import Experiment, RunConfig, setup
from jaxsearch.train import sharding
from jaxsearch.train.optim import make_optimizer
from jaxsearch.train.state import TrainState
from jaxsearch.train.steps import (CriticBatch, CriticConfig, GRPOConfig, PolicyGradientBatch,
                                   batch_statistics, init_critic_params, make_critic,
                                   make_critic_update_fn, make_gae_fn, make_policy_update_fn,
                                   make_sft_update_fn, outcome_advantages, sequence_logprobs)
from jaxsearch.types import PyTree, SequenceBatch

PROGRESS_KEYS = ("reward", "em", "searches", "loss", "kl", "entropy", "value_loss",
                 "explained_variance", "tokens_per_s", "mfu", "s_per_step")
SFT_LOG_EVERY = 25   # SFT steps take ~0.2 s on CPU: a line per 25 of them


def _say(line: str) -> None:
  """A progress line on stdout, from process 0 only (every process computes the same)."""
  if distributed.is_primary():
    print(line, flush=True)


def run(config: RunConfig, workdir: str, *,
        after_first_step: Callable[[], None] | None = None) -> dict[str, float]:
  """Trains and evaluates one agent; returns (and writes) the summary.

  Args:
    config: the run's configuration.
    workdir: where everything the run writes goes; an existing workdir is resumed.
    after_first_step: called once after the first optimizer step (the launcher records the
      operative gin config there).

  Returns:
    The summary dict written to `workdir/summary.json`.
  """
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  if config.rl.init_from:
    share_warm_start(config, workdir)
  tok_path = os.path.join(workdir, "tokenizer.model")
  tokenizer = load_tokenizer(tok_path) if os.path.exists(tok_path) else None
  exp = setup(config, tokenizer=tokenizer)
  if tokenizer is None and jax.process_index() == 0:
    save_tokenizer(exp.tokenizer, tok_path)
  # Every process trains the same seeded tokenizer; the barrier keeps a later resume from
  # reading a half-written file.
  distributed.sync("tokenizer_saved")
  if jax.process_index() == 0:
    from jaxsearch.programs.search_agent.workdir import CONFIG_FILE, config_to_json  # noqa: PLC0415
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config_to_json(config))
  mesh = sharding.make_mesh(config.mesh)
  for rows, what in ((config.sft.batch_size, "SFTConfig.batch_size"),
                     (config.rl.grpo.rows, "GRPOConfig.prompts_per_step * num_generations"),
                     (config.eval_batch_size, "RunConfig.eval_batch_size")):
    sharding.check_batch(rows, mesh, what)
  # Initialised outside the mesh context: the init batch of one row cannot be split.
  params, specs = exp.init_params(jax.random.fold_in(jax.random.key(config.seed), 0))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    params = jax.device_put(params, sharding.param_shardings(specs, mesh))
    return _run(exp, config, workdir, mesh, params, specs, t_start, after_first_step)


def _run(exp, config, workdir, mesh, params, specs, t_start, after_first_step):
  writer = metrics_lib.create_writer(workdir)
  rng = jax.random.key(config.seed)
  logging.info("mesh %s; policy parameters: %d", dict(mesh.shape),
               sum(x.size for x in jax.tree.leaves(params)))

  callback = [after_first_step]

  def first_step_done():
    if callback[0] is not None:
      callback[0]()
      callback[0] = None

  # 1. Warm start.
  sft_params = warm_start(exp, params, specs, workdir, writer, first_step_done, mesh)
  # 2. Baselines on the held-out split, with the warm-started policy.
  questions = exp.world.splits[config.eval_split]
  eval_rng = jax.random.fold_in(rng, 2)
  summary = {}
  for name, kwargs in (("closed_book", dict(closed_book=True)), ("sft", {})):
    summary.update(_cached_eval(exp, sft_params, questions, eval_rng, workdir, name, writer,
                                step=config.sft.steps, **kwargs))
  # 3. RL from the warm start, with the warm start as the KL reference.
  rl_params = train_rl(exp, sft_params, specs, workdir, writer, first_step_done, mesh)
  summary.update(_cached_eval(exp, rl_params, questions, eval_rng, workdir, "rl", writer,
                              step=config.sft.steps + config.rl.steps))
  summary["wall_seconds"] = time.time() - t_start   # of this invocation (a resume is shorter)
  summary["eval_split"] = config.eval_split
  summary["num_eval_questions"] = len(questions)
  metrics_lib.write_json(os.path.join(workdir, "summary.json"), summary)
  writer.flush()
  logging.info("summary: %s", summary)
  return summary


# What must agree between a run and the `init_from` run whose SFT it takes (RunConfig fields).
WARM_START_FIELDS = ("world", "data", "tokenizer_vocab_size", "model", "pretrained", "sft")
# ... and, for its closed-book / SFT evaluations to be reused too.
EVAL_FIELDS = ("seed", "bm25", "rollout", "eval_temperature", "eval_split", "eval_batch_size")
SHARED_EVALS = ("eval_closed_book.json", "eval_sft.json")


def share_warm_start(config: RunConfig, workdir: str) -> bool:
  """Copies `config.rl.init_from`'s tokenizer and finished SFT checkpoint into `workdir`.

  Does nothing when `workdir` already has an SFT checkpoint (a resumed run). The evaluations
  of the SFT policy are copied too when the evaluation settings (and reward weights) match.

  Returns:
    Whether anything was copied.

  Raises:
    FileNotFoundError: `init_from` is not a run's workdir.
    ValueError: the two runs' warm-start settings differ, or `init_from` has not finished SFT.
  """
  from jaxsearch.programs.search_agent.workdir import load_config  # noqa: PLC0415
  source = config.rl.init_from
  dst = os.path.join(workdir, "checkpoints", "sft")
  if os.path.isdir(dst) and any(d.isdigit() for d in os.listdir(dst)):
    return False
  src_config = load_config(source)
  differ = [f"RunConfig.{f}" for f in WARM_START_FIELDS
            if getattr(src_config, f) != getattr(config, f)]
  if differ:
    raise ValueError(f"RLConfig.init_from={source!r} was trained with different {differ}: a "
                     "shared warm start needs the same world, tokenizer, model and SFT settings")
  src = os.path.join(source, "checkpoints", "sft")
  steps = sorted(int(d) for d in os.listdir(src) if d.isdigit()) if os.path.isdir(src) else []
  if config.sft.steps and config.sft.steps not in steps:
    raise ValueError(f"RLConfig.init_from={source!r} has no finished SFT checkpoint (step "
                     f"{config.sft.steps}); it has steps {steps}: run it first")
  same_eval = (all(getattr(src_config, f) == getattr(config, f) for f in EVAL_FIELDS)
               and dict(src_config.rl.reward_weights) == dict(config.rl.reward_weights))
  if jax.process_index() == 0:
    shutil.copy2(os.path.join(source, "tokenizer.model"), os.path.join(workdir, "tokenizer.model"))
    for name in SHARED_EVALS if same_eval else ():
      if os.path.exists(os.path.join(source, name)):
        shutil.copy2(os.path.join(source, name), os.path.join(workdir, name))
    if steps:   # SFT_STEPS = 0 has no checkpoint: only the tokenizer is shared
      tmp = dst + ".copying"
      shutil.rmtree(tmp, ignore_errors=True)
      shutil.copytree(src, tmp)
      if os.path.exists(dst):
        shutil.rmtree(dst)   # holds no step (checked above): left by an interrupted attempt
      os.replace(tmp, dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices("share_warm_start")
  logging.info("warm start (tokenizer, SFT step %d) copied from %s", config.sft.steps, source)
  return True


def bucket_width(length: int, max_len: int, multiple: int = 32) -> int:
  """Rounds a batch's longest sequence up to a multiple, so few shapes are ever compiled."""
  return min(max_len, -(-length // multiple) * multiple)


def _cached_eval(exp: Experiment, params, questions, rng, workdir, name, writer, *, step,
                 **kwargs) -> dict[str, float]:
  path = os.path.join(workdir, f"eval_{name}.json")
  cached = metrics_lib.read_json(path)
  if cached is None:
    t0 = time.time()
    m, _ = eval_lib.evaluate(exp, params, questions, rng, **kwargs)
    cached = {f"{name}_{k}": v for k, v in m.items()}
    cached[f"{name}_eval_seconds"] = time.time() - t0
    metrics_lib.write_json(path, cached)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in cached.items()})
  logging.info("%s: em=%.3f f1=%.3f searches=%.2f support_recall=%.3f", name,
               cached[f"{name}_em"], cached[f"{name}_f1"], cached[f"{name}_searches"],
               cached[f"{name}_support_recall"])
  _say(f"[eval {name}] " + " ".join(f"{k}={v:.3f}" for k, v in sorted(cached.items())))
  return cached


def _checkpointed(state: TrainState) -> dict:
  """What a checkpoint holds of a train state (the static apply_fn / tx are rebuilt)."""
  return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def _restore_or(ckpt: Checkpointer, state: TrainState):
  restored = ckpt.restore_latest(_checkpointed(state))   # falls back past corrupt steps
  if restored is None:
    return state, None
  step, tree, meta = restored
  logging.info("resumed from %s step %d", meta.get("phase"), step)
  return state.replace(**tree), meta


def _device_peak_flops(mesh) -> float | None:
  """Peak FLOP/s of the devices a step runs on (None for a device kind not in the table).

  On CPU the table's figure is per host (fake devices share its cores), so it is multiplied
  by the process count, not the device count.
  """
  device = jax.devices()[0]
  try:
    per_device = sharding.peak_flops(device.device_kind)
  except ValueError:
    logging.warning("MFU not logged: %s", "no peak FLOP/s for " + repr(device.device_kind))
    return None
  count = jax.process_count() if device.platform == "cpu" else mesh.size
  return per_device * count


def _log_compile_report(name: str, jitted, writer, *abstract_args) -> None:
  """Compiles a step ahead of time on abstract inputs; logs memory per device and FLOPs."""
  report = sharding.compile_report(jitted, *abstract_args)
  logging.info("%s step, per device: %.1f MiB (arguments %.1f, temporaries %.1f), "
               "%.3g FLOPs, compiled in %.1f s", name, report["total_bytes"] / 2**20,
               report["argument_bytes"] / 2**20, report["temp_bytes"] / 2**20,
               report["flops_per_device"], report["compile_seconds"])
  writer.write_scalars(0, {f"compile/{name}_{k}": v for k, v in report.items()})


def warm_start(exp: Experiment, params, specs, workdir, writer, first_step_done, mesh):
  """Supervised fine-tuning on the noisy teacher's demonstrations; returns the final params.

  The state is sharded by the parameters' logical specs (optimizer moments included), the
  step is jitted with those shardings and donates the state; each process loads only its own
  rows of every batch (`distributed.process_rows`). Before the first step the update is
  compiled ahead of time on the widest batch and its memory per device and FLOPs are logged
  (`compile/sft_*`); every log line carries `mfu` (model FLOPs utilisation).
  """
  cfg = exp.config.sft
  state, state_sh = sharding.sharded_train_state(
      params, specs, apply_fn=exp.apply_fn, tx=make_optimizer(cfg.optimizer, cfg.steps),
      mesh=mesh)
  sharding.assert_sharded(state.params, state_sh.params)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "sft"))
  state, _ = _restore_or(ckpt, state)
  start = int(state.step)
  if start >= cfg.steps:
    ckpt.close()
    return state.params
  train_qs = exp.world.splits["train"]
  qs = [train_qs[i % len(train_qs)] for i in range(cfg.num_demos)]
  data, stats = demos.build_demonstrations(exp.world, qs, exp.tokenizer, exp.respond, cfg.teacher,
                                           max_len=exp.config.rollout.max_len)
  logging.info("demonstrations: %s", stats)
  writer.write_scalars(0, {f"demos/{k}": v for k, v in stats.items()})
  lengths = np.sum(np.cumsum(data.tokens[:, ::-1] != exp.tokenizer.pad_id, 1) > 0, 1)
  bsh = sharding.batch_sharding(mesh)
  update = sharding.jit_sharded(make_sft_update_fn(exp.apply_fn), (state_sh, bsh),
                                sharding.state_and_metrics_shardings(state_sh, mesh),
                                donate_argnums=0)
  widest = jax.ShapeDtypeStruct((cfg.batch_size, data.tokens.shape[1]), data.tokens.dtype)
  _log_compile_report("sft", update, writer, sharding.abstract_like(state),
                      sharding.abstract_like(SequenceBatch(widest, widest), bsh))
  peak = _device_peak_flops(mesh)
  n = data.tokens.shape[0]
  t_last, step_last, tokens_seen, flops_seen = time.time(), start, 0, 0.0
  for step in range(start, cfg.steps):
    epoch, pos = divmod(step * cfg.batch_size, n)
    order = np.random.default_rng([exp.config.seed, 1, epoch]).permutation(n)
    idx = np.take(order, np.arange(pos, pos + cfg.batch_size), mode="wrap")
    width = bucket_width(int(lengths[idx].max()), data.tokens.shape[1])
    mine = idx[distributed.process_rows(len(idx), mesh)]   # this process's rows only
    batch = distributed.global_batch(
        SequenceBatch(data.tokens[mine, :width], data.loss_mask[mine, :width]), mesh, len(idx))
    state, m = update(state, batch)
    tokens_seen += batch.tokens.size
    flops_seen += batch.tokens.size * sharding.transformer_flops_per_token(exp.model.config, width)
    if step == start:
      first_step_done()
    if (step + 1) % SFT_LOG_EVERY == 0 or step + 1 == cfg.steps:
      m = metrics_lib.to_python(m)   # waits for the step: the timing below is honest
      dt = time.time() - t_last
      m["s_per_step"] = dt / (step + 1 - step_last)
      m["tokens_per_s"] = tokens_seen / dt
      if peak:
        m["mfu"] = flops_seen / dt / peak
      t_last, step_last, tokens_seen, flops_seen = time.time(), step + 1, 0, 0.0
      writer.write_scalars(step + 1, {f"sft/{k}": v for k, v in m.items()})
      _say(metrics_lib.progress_line("sft", step + 1, cfg.steps, m,
                                     ("loss", "token_accuracy", "tokens_per_s", "mfu",
                                      "s_per_step")))
    if (step + 1) % exp.config.checkpoint_every == 0 or step + 1 == cfg.steps:
      ckpt.save(step + 1, _checkpointed(state), {"phase": "sft"})
  ckpt.close()
  return state.params


class RLBatch(NamedTuple):
  """What one RL update needs of a scored rollout (host or device arrays)."""

  tokens: jax.Array        # [N, T] int32, whole episodes
  policy_mask: jax.Array   # [N, T] bool, the policy's tokens
  rewards: jax.Array       # [N] float32 episode rewards
  group_ids: jax.Array     # [N] int32, rows of one question share an id
  num_searches: jax.Array  # [N] int32 search calls per episode (strata of "stratified")


class RLUpdater:
  """The jitted pieces of one RL update, wired for the configured algorithm.

  `__call__` computes the reference / behaviour log-probs it needs, the advantages (an outcome
  estimator, or the critic's GAE for PPO), updates the critic (PPO) and then the policy
  (`updates_per_batch` steps each; the policy is left untouched when `train_policy` is False,
  the critic warm-up). States are donated.

  Example:
    >>> updater = RLUpdater(apply_fn, GRPOConfig(advantage="rloo"))
    >>> policy_state, _, metrics = updater(policy_state, None, ref_params, batch)
  """

  def __init__(self, apply_fn: Callable, config: GRPOConfig, *,
               critic: CriticConfig | None = None, value_apply_fn: Callable | None = None,
               norm_length: int | None = None, mesh=None, state_shardings=None,
               critic_shardings=None):
    """See the class docstring.

    Args:
      apply_fn / config / critic / value_apply_fn / norm_length: the algorithm's pieces.
      mesh: with `state_shardings` (and `critic_shardings` for PPO), the update steps are
        jitted with those in/out shardings (`sharding.jit_sharded`: the state keeps its
        layout, the batch is split over the batch axes, metrics replicated); None leaves
        the layout to XLA's propagation (single-device tests).
    """
    if config.uses_critic and (critic is None or value_apply_fn is None):
      raise ValueError("GRPOConfig.advantage='gae' (PPO) needs a critic config and a value "
                       "apply function")
    self.config = config
    self.uses_critic = config.uses_critic

    def jit_update(fn, shardings):
      if mesh is None or shardings is None:
        return jax.jit(fn, donate_argnums=0)
      return sharding.jit_sharded(fn, (shardings, sharding.batch_sharding(mesh)),
                                  sharding.state_and_metrics_shardings(shardings, mesh),
                                  donate_argnums=0)

    self.policy_update = jit_update(
        make_policy_update_fn(apply_fn, config, norm_length=norm_length), state_shardings)
    self.logprob_fn = jax.jit(functools.partial(sequence_logprobs, apply_fn))
    self.adv_fn = jax.jit(functools.partial(outcome_advantages, config))
    self.stats_fn = jax.jit(batch_statistics)
    if self.uses_critic:
      self.gae_fn = jax.jit(make_gae_fn(value_apply_fn, critic))
      self.critic_update = jit_update(make_critic_update_fn(value_apply_fn, critic),
                                      critic_shardings)

  def flops_per_token(self, model_config, width: int, *, train_policy: bool = True) -> float:
    """Model FLOPs per episode token of one `__call__` plus the rollout that produced it.

    Forward passes: the rollout's decode, the reference and behaviour log-probs when the
    loss needs them, PPO's value pass; forward + backward: each policy (and critic) update.
    The critic is counted as the policy's size (same trunk). `width` is the padded length
    the attention term uses.
    """
    g = self.config
    fwd = sharding.transformer_flops_per_token(model_config, width, backward=False)
    train = sharding.transformer_flops_per_token(model_config, width)
    forwards = 1 + (train_policy and bool(g.kl_coef)) + (train_policy and g.needs_old_logp)
    updates = g.updates_per_batch if train_policy else 0
    if self.uses_critic:
      forwards += 1
      updates += g.updates_per_batch
    return forwards * fwd + updates * train

  def __call__(self, policy_state: TrainState, critic_state: TrainState | None, ref_params,
               batch: RLBatch, *, train_policy: bool = True):
    g = self.config
    metrics = dict(self.stats_fn(batch.rewards, batch.group_ids, batch.policy_mask))
    if self.uses_critic:
      adv, returns, values = self.gae_fn(critic_state.params, batch.tokens, batch.policy_mask,
                                         batch.rewards)
      critic_batch = CriticBatch(batch.tokens, batch.policy_mask, values, returns)
      for i in range(g.updates_per_batch):
        critic_state, cm = self.critic_update(critic_state, critic_batch)
        if i == 0:   # measured on the values the advantages were computed with
          metrics.update(cm)
    else:
      adv = self.adv_fn(batch.rewards, batch.group_ids, batch.num_searches)
    metrics["critic_warmup"] = jnp.asarray(0.0 if train_policy else 1.0)
    if train_policy:
      ref_logp = self.logprob_fn(ref_params, batch.tokens) if g.kl_coef else None
      old_logp = self.logprob_fn(policy_state.params, batch.tokens) if g.needs_old_logp else None
      pg_batch = PolicyGradientBatch(batch.tokens, batch.policy_mask, adv, old_logp, ref_logp)
      for _ in range(g.updates_per_batch):
        policy_state, m = self.policy_update(policy_state, pg_batch)
      metrics.update(m)
    return policy_state, critic_state, metrics


def _restore_at(ckpt: Checkpointer, directory: str, step: int, state: TrainState,
                what: str) -> TrainState:
  if not os.path.isdir(os.path.join(directory, str(step))):
    raise FileNotFoundError(f"the {what} checkpoint of step {step} is missing from "
                            f"{directory}: the policy was saved at that step, so the "
                            "workdir is damaged")
  tree, _ = ckpt.restore(step, _checkpointed(state))
  return state.replace(**tree)


def init_critic_state(exp: Experiment, policy_params, mesh) -> tuple[TrainState, PyTree]:
  """The PPO critic: a `ValueModel` whose trunk starts as `policy_params`, its own optimizer.

  Returns:
    `(state, shardings)`, sharded like the policy (`sharding.sharded_train_state`).
  """
  cfg = exp.config.rl
  critic, value_apply_fn = make_critic(exp.model.config, cfg.critic.head)
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  params, specs = init_critic_params(critic, policy_params,
                                     jax.random.fold_in(jax.random.key(exp.config.seed), 4),
                                     init_rows=rows)
  logging.info("critic parameters: %d", sum(x.size for x in jax.tree.leaves(params)))
  state, shardings = sharding.sharded_train_state(
      params, specs, apply_fn=value_apply_fn,
      tx=make_optimizer(cfg.critic.optimizer, cfg.steps), mesh=mesh)
  sharding.assert_sharded(state.params, shardings.params)
  return state, shardings


def train_rl(exp: Experiment, ref_params, specs, workdir, writer, first_step_done, mesh):
  """RL from `ref_params`, which also serve as the frozen KL reference; returns final params.

  The algorithm is `RLConfig.grpo` (the advantage estimator, the loss options); with
  `advantage="gae"` (PPO) a critic is trained alongside, checkpointed in `checkpoints/critic`
  at the same steps as the policy, and the first `critic.warmup_steps` steps train only it.
  Every step writes `rl/*` telemetry (listed in the module docstring), `rl/mfu` included
  (`RLUpdater.flops_per_token` x episode tokens / step time / peak).

  Multi-host: the rollout runs sharded over the batch axes on every process; `to_host`
  gathers it (a collective) so every process scores the same episodes and builds the same
  update batch.
  """
  cfg, g = exp.config.rl, exp.config.rl.grpo
  warmup = cfg.critic.warmup_steps if g.uses_critic else 0
  # A copy: the update donates the state's buffers, and the reference must survive it. The
  # policy's schedule starts after the critic warm-up (its optimizer sees no step before).
  state, state_sh = sharding.sharded_train_state(
      jax.tree.map(jnp.copy, ref_params), specs, apply_fn=exp.apply_fn,
      tx=make_optimizer(cfg.optimizer, max(cfg.steps - warmup, 1)), mesh=mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "rl"))
  critic_state = critic_ckpt = critic_sh = None
  if g.uses_critic:
    critic_state, critic_sh = init_critic_state(exp, ref_params, mesh)
    critic_dir = os.path.join(workdir, "checkpoints", "critic")
    critic_ckpt = Checkpointer(critic_dir)
  state, _ = _restore_or(ckpt, state)
  # The RL step is the checkpoint's step (the optimizer's count differs with several updates
  # per batch or a critic warm-up).
  start = ckpt.latest_step() or 0
  if critic_state is not None and start:
    critic_state = _restore_at(critic_ckpt, critic_dir, start, critic_state, "critic")
  updater = RLUpdater(exp.apply_fn, g, critic=cfg.critic if g.uses_critic else None,
                      value_apply_fn=critic_state.apply_fn if g.uses_critic else None,
                      norm_length=exp.config.rollout.max_len, mesh=mesh,
                      state_shardings=state_sh, critic_shardings=critic_sh)
  peak = _device_peak_flops(mesh)
  if start < cfg.steps and jax.process_index() == 0:
    # The final evaluation of an earlier, shorter run of this workdir no longer holds.
    stale = os.path.join(workdir, "eval_rl.json")
    if os.path.exists(stale):
      os.remove(stale)
  train_qs = exp.world.splits["train"]
  rng = jax.random.fold_in(jax.random.key(exp.config.seed), 3)
  group_ids = np.repeat(np.arange(g.prompts_per_step, dtype=np.int32), g.num_generations)
  for step in range(start, cfg.steps):
    t0 = time.time()
    pick = np.random.default_rng([exp.config.seed, 2, step]).choice(
        len(train_qs), g.prompts_per_step, replace=False)
    qs = [train_qs[i] for i in pick]
    prompts, lens = exp.encode_prompts(qs)
    prompts, lens = np.repeat(prompts, g.num_generations, 0), np.repeat(lens, g.num_generations)
    rows_qs = [q for q in qs for _ in range(g.num_generations)]
    rollout = exp.train_rollout_fn(state.params, exp.tool,
                                   *sharding.shard_batch((prompts, lens), mesh),
                                   jax.random.fold_in(rng, step))
    rollout = distributed.to_host(rollout)   # collective: every process gets every episode
    scored = eval_lib.score_rollout(rollout, lens, [q.answers for q in rows_qs], exp.tokenizer,
                                    exp.reward_fn)
    t_rollout = time.time() - t0
    r = scored.rollout
    width = bucket_width(int(r.lengths.max()), r.tokens.shape[1])
    batch = sharding.shard_batch(RLBatch(
        r.tokens[:, :width], r.policy_mask[:, :width], scored.rewards, group_ids,
        np.asarray(r.num_searches, np.int32)), mesh)
    state, critic_state, m = updater(state, critic_state, ref_params, batch,
                                     train_policy=step >= warmup)
    if step == start:
      first_step_done()
    m = metrics_lib.to_python(m)
    m.update(eval_lib.episode_metrics(scored, rows_qs, exp.world))
    dt = time.time() - t0
    m.update(s_per_step=dt, rollout_s=t_rollout,
             tokens_per_s=float(np.sum(r.lengths)) / dt)
    if peak:
      m["mfu"] = m["tokens_per_s"] * updater.flops_per_token(
          exp.model.config, width, train_policy=step >= warmup) / peak
    writer.write_scalars(step + 1, {f"rl/{k}": v for k, v in m.items()})
    _say(metrics_lib.progress_line("rl", step + 1, cfg.steps, m, PROGRESS_KEYS))
    if exp.config.eval_every and (step + 1) % exp.config.eval_every == 0:
      vm, _ = eval_lib.evaluate(exp, state.params, exp.world.splits["validation"],
                                jax.random.fold_in(rng, 10**6 + step))
      writer.write_scalars(step + 1, {f"validation/{k}": v for k, v in vm.items()})
      _say(f"[validation {step + 1}] em={vm['em']:.3f} searches={vm['searches']:.2f}")
    if (step + 1) % exp.config.checkpoint_every == 0 or step + 1 == cfg.steps:
      if critic_state is not None:   # first: a policy checkpoint always has its critic
        critic_ckpt.save(step + 1, _checkpointed(critic_state), {"phase": "critic"})
      ckpt.save(step + 1, _checkpointed(state), {"phase": "rl"})
  ckpt.close()
  if critic_ckpt is not None:
    critic_ckpt.close()
  return state.params
