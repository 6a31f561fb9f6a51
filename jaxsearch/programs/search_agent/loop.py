"""The host loop: warm start (SFT), evaluation, RL (GRPO family or PPO), evaluation.

It only calls pure pieces (`steps.py`). The RL algorithm is `RLConfig.algorithm` (advantage
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

import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from jaxsearch import metrics as metrics_lib
from jaxsearch.checkpoint import Checkpointer
from jaxsearch.config_files import absolute_paths
from jaxsearch.data import demos
from jaxsearch.data.tokenizer import load_tokenizer, save_tokenizer
from jaxsearch.programs.search_agent import evaluate as eval_lib
from jaxsearch.programs.search_agent.experiment import BASELINES, Experiment, RunConfig, setup
from jaxsearch.programs.search_agent.workdir import CONFIG_FILE, load_config
from jaxsearch.train import distributed, sharding, trainer
from jaxsearch.models import lora
from jaxsearch.models.transformer import kv_cache_bytes
from jaxsearch.train.health import HealthMonitor
from jaxsearch.train.optim import make_optimizer
from jaxsearch.train.rl_update import (RLBatch, RLState, jit_rl_update, make_rl_update_fn,
                                       rl_flops_per_token)
from jaxsearch.train.state import TrainState
from jaxsearch.train.steps import init_critic_params, make_critic, make_sft_update_fn
from jaxsearch.types import PyTree, SequenceBatch

PROGRESS_KEYS = ("reward", "em", "searches", "loss", "kl", "entropy", "value_loss",
                 "explained_variance", "tokens_per_s", "mfu", "s_per_step")
SFT_LOG_EVERY = 25   # SFT steps take ~0.2 s on CPU: a line per 25 of them
say = trainer.say


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
  trainer.write_config(workdir, CONFIG_FILE, config)
  mesh = sharding.make_mesh(config.mesh)
  for rows, what in ((config.sft.batch_size, "SFTConfig.batch_size"),
                     (config.rl.algorithm.rows,
                      "PolicyGradientConfig.prompts_per_step * num_generations"),
                     (config.eval_batch_size, "RunConfig.eval_batch_size")):
    sharding.check_batch(rows, mesh, what)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    # Born sharded: abstract shapes -> shardings -> a jitted init that writes each
    # device's shard only (a pretrained policy's weights are placed shard by shard).
    params, specs = exp.init_sharded_params(
        jax.random.fold_in(jax.random.key(config.seed), 0), mesh)
    return _run(exp, config, workdir, mesh, params, specs, t_start, after_first_step)


def _run(exp, config, workdir, mesh, params, specs, t_start, after_first_step):
  writer = metrics_lib.create_writer(workdir)
  rng = jax.random.key(config.seed)
  logging.info("mesh %s; policy parameters: %d", dict(mesh.shape),
               sum(x.size for x in jax.tree.leaves(params)))
  first_step_done = trainer.once(after_first_step)
  questions = exp.world.splits[config.eval_split]
  eval_rng = jax.random.fold_in(rng, 2)
  summary = {}
  # Evaluations of the same parameters with the same method are done once (e.g. with
  # sft.steps = 0 the SFT evaluation is the zero-shot one; with rl.steps = 0, RL's is SFT's).
  done: dict[tuple[str, str], str] = {}
  sft_phase = "sft" if config.sft.steps else "initial"
  rl_phase = "rl" if config.rl.steps else sft_phase

  def evaluate_once(name, p, phase, step, method):
    source = done.setdefault((phase, method), name)
    if source != name:
      return _copied_eval(summary, source, name, workdir, writer, step=step)
    return _cached_eval(exp, p, questions, eval_rng, workdir, name, writer, step=step,
                        method=method)

  # 0. Baselines of the initial (pretrained) policy, before any training.
  for name in config.baselines:
    summary.update(evaluate_once(name, params, "initial", 0, BASELINES[name]))
  # 1. Warm start.
  sft_params = warm_start(exp, params, specs, workdir, writer, first_step_done, mesh)
  # 2. Baselines on the held-out split, with the warm-started policy.
  for name, method in (("closed_book", "direct"), ("sft", "agent")):
    summary.update(evaluate_once(name, sft_params, sft_phase, config.sft.steps, method))
  # 3. RL from the warm start, with the warm start as the KL reference.
  rl_params = train_rl(exp, sft_params, specs, workdir, writer, first_step_done, mesh)
  summary.update(evaluate_once("rl", rl_params, rl_phase, config.sft.steps + config.rl.steps,
                               "agent"))
  summary["wall_seconds"] = time.time() - t_start   # of this invocation (a resume is shorter)
  summary["eval_split"] = config.eval_split
  summary["num_eval_questions"] = len(questions)
  trainer.write_summary(workdir, summary, writer)
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
  source = config.rl.init_from
  dst = os.path.join(workdir, "checkpoints", "sft")
  if os.path.isdir(dst) and any(d.isdigit() for d in os.listdir(dst)):
    return False
  src_config = load_config(source)
  # The saved config records absolute paths: compare with this run's, resolved the same way.
  resolved = absolute_paths(config)
  differ = [f"RunConfig.{f}" for f in WARM_START_FIELDS
            if getattr(src_config, f) != getattr(resolved, f)]
  if differ:
    raise ValueError(f"RLConfig.init_from={source!r} was trained with different {differ}: a "
                     "shared warm start needs the same world, tokenizer, model and SFT settings")
  src = os.path.join(source, "checkpoints", "sft")
  steps = sorted(int(d) for d in os.listdir(src) if d.isdigit()) if os.path.isdir(src) else []
  if config.sft.steps and config.sft.steps not in steps:
    raise ValueError(f"RLConfig.init_from={source!r} has no finished SFT checkpoint (step "
                     f"{config.sft.steps}); it has steps {steps}: run it first")
  same_eval = (all(getattr(src_config, f) == getattr(resolved, f) for f in EVAL_FIELDS)
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
  say(f"[eval {name}] " + " ".join(f"{k}={v:.3f}" for k, v in sorted(cached.items())))
  return cached


def _copied_eval(summary: dict[str, float], source: str, name: str, workdir, writer, *,
                 step) -> dict[str, float]:
  """Evaluation `source`'s figures under `name` (the same parameters, prompts and rng: nothing
  was trained in between), written to `eval_{name}.json` like an evaluation of its own."""
  prefix = f"{source}_"
  copied = {f"{name}_{k[len(prefix):]}": v for k, v in summary.items() if k.startswith(prefix)}
  copied[f"{name}_eval_seconds"] = 0.0
  metrics_lib.write_json(os.path.join(workdir, f"eval_{name}.json"), copied)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in copied.items()})
  say(f"[eval {name}] the same parameters and prompts as '{source}': its figures")
  return copied


def warm_start(exp: Experiment, params, specs, workdir, writer, first_step_done, mesh):
  """Supervised fine-tuning on the noisy teacher's demonstrations; returns the final params.

  The state is sharded by the parameters' logical specs (optimizer moments included), the
  step is jitted with those shardings and donates the state; each process loads only its own
  rows of every batch (`distributed.process_rows`). Before the first step the update is
  compiled ahead of time on the widest batch and its memory per device and FLOPs are
  reported (`compile/sft_*`); every log line carries `mfu` (model FLOPs utilisation).
  """
  cfg = exp.config.sft
  state, state_sh = sharding.sharded_train_state(
      params, specs, apply_fn=exp.apply_fn, tx=exp.optimizer(cfg.optimizer, cfg.steps),
      mesh=mesh)
  sharding.assert_sharded(state.params, state_sh.params)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "sft"))
  state, _, _ = trainer.restore_latest(ckpt, state)
  start = int(state.step)
  if start >= cfg.steps:
    ckpt.close()
    return state.params
  train_qs = exp.world.splits["train"]
  qs = [train_qs[i % len(train_qs)] for i in range(cfg.num_demos)]
  data, stats = demos.build_demonstrations(exp.world, qs, exp.tokenizer, exp.respond, cfg.teacher,
                                           max_len=exp.config.rollout.max_len,
                                           prompt=exp.config.prompt, protocol=exp.env.protocol)
  logging.info("demonstrations: %s", stats)
  writer.write_scalars(0, {f"demos/{k}": v for k, v in stats.items()})
  lengths = np.sum(np.cumsum(data.tokens[:, ::-1] != exp.tokenizer.pad_id, 1) > 0, 1)
  bsh = sharding.batch_sharding(mesh)
  update = sharding.jit_sharded(
      make_sft_update_fn(exp.apply_fn, micro_batch_size=cfg.micro_batch_size,
                         score_fn=exp.score_fn, trainable=exp.trainable),
      (state_sh, bsh), sharding.state_and_metrics_shardings(state_sh, mesh), donate_argnums=0)
  widest = jax.ShapeDtypeStruct((cfg.batch_size, data.tokens.shape[1]), data.tokens.dtype)
  trainer.compile_report("sft", update, writer, sharding.abstract_like(state),
                         sharding.abstract_like(SequenceBatch(widest, widest), bsh),
                         settings=memory_settings(exp, "sft"))

  def step_fn(state, step):
    idx = trainer.epoch_batch((exp.config.seed, 1), step, cfg.batch_size, data.tokens.shape[0])
    width = bucket_width(int(lengths[idx].max()), data.tokens.shape[1])
    mine = idx[distributed.process_rows(len(idx), mesh)]   # this process's rows only
    batch = distributed.global_batch(
        SequenceBatch(data.tokens[mine, :width], data.loss_mask[mine, :width]), mesh, len(idx))
    state, m = update(state, batch)
    tokens = batch.tokens.size
    return state, m, trainer.StepWork(
        tokens, tokens * sharding.transformer_flops_per_token(exp.model.config, width))

  loop = trainer.LoopConfig(name="sft", steps=cfg.steps, log_every=SFT_LOG_EVERY,
                            checkpoint_every=exp.config.checkpoint_every,
                            progress_keys=("loss", "token_accuracy", "tokens_per_s", "mfu",
                                           "s_per_step"))
  state = trainer.run_loop(
      loop, state, step_fn, start=start, writer=writer,
      save_fn=lambda step, s: ckpt.save(step, trainer.train_state_checkpoint(s),
                                        {"phase": "sft"}),
      peak_flops=trainer.device_peak_flops(mesh), after_first_step=first_step_done)
  ckpt.close()
  return state.params


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


def _restore_critic_at(ckpt: Checkpointer, step: int, state: TrainState) -> TrainState:
  if not os.path.isdir(ckpt.step_dir(step)):
    raise FileNotFoundError(f"the critic checkpoint of step {step} is missing from "
                            f"{ckpt.directory}: the policy was saved at that step, so the "
                            "workdir is damaged")
  tree, _ = ckpt.restore(step, trainer.train_state_checkpoint(state))
  return state.replace(**tree)


def report_kv_cache(exp: Experiment, episodes: int, mesh, writer) -> int:
  """Logs the rollout's KV-cache bytes (all episodes, and per device with the batch split over
  the mesh's batch axes) beside the compile report; returns the total."""
  r = exp.config.rollout
  config = (exp.base_model or exp.model).config
  total = kv_cache_bytes(config, episodes, r.max_len, r.cache_dtype or None)
  shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1) if mesh is not None else 1
  line = (f"[rollout] KV cache: {total / 2**20:.1f} MiB for {episodes} episodes x {r.max_len} "
          f"tokens ({r.cache_dtype or jnp.dtype(config.compute_dtype).name}), "
          f"{total / shards / 2**20:.1f} MiB per device; engine {r.engine}, prefill chunk "
          f"{r.prefill_chunk}")
  logging.info("%s", line)
  trainer.say(line)
  writer.write_scalars(0, {"compile/rollout_kv_cache_bytes": total,
                           "compile/rollout_kv_cache_bytes_per_device": total / shards})
  return total


def memory_settings(exp: Experiment, phase: str) -> dict[str, Any]:
  """The gin bindings that lower the memory of the `phase` ("sft" | "rl") step, with their
  values: what a `trainer.StepDoesNotFit` error names."""
  model = (exp.base_model or exp.model).config
  if phase == "sft":
    rows = {"experiment.SFTConfig.micro_batch_size": exp.config.sft.micro_batch_size,
            "experiment.SFTConfig.batch_size": exp.config.sft.batch_size}
  else:
    g = exp.config.rl.algorithm
    rows = {"steps.PolicyGradientConfig.micro_batch_size": g.micro_batch_size,
            "steps.PolicyGradientConfig.prompts_per_step": g.prompts_per_step,
            "search_env.RolloutConfig.max_len": exp.config.rollout.max_len}
  return {**rows, "transformer.TransformerConfig.logits_chunk": model.logits_chunk,
          "transformer.TransformerConfig.remat": model.remat,
          "experiment.RunConfig.lora": "@lora.LoraConfig()" if exp.config.lora else None}


def rl_batch_shapes(exp: Experiment, mesh) -> RLBatch:
  """Abstract `RLBatch` of the widest RL step (every episode `rollout.max_len` tokens)."""
  g = exp.config.rl.algorithm
  n, t = g.prompts_per_step * g.num_generations, exp.config.rollout.max_len
  shapes = RLBatch(jax.ShapeDtypeStruct((n, t), jnp.int32), jax.ShapeDtypeStruct((n, t), bool),
                   jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32),
                   jax.ShapeDtypeStruct((n,), jnp.int32))
  return sharding.abstract_like(shapes, sharding.batch_sharding(mesh))


def train_rl(exp: Experiment, ref_params, specs, workdir, writer, first_step_done, mesh):
  """RL from `ref_params`, which also serve as the frozen KL reference; returns final params.

  The algorithm is `RLConfig.algorithm` (the advantage estimator, the loss options); with
  `advantage="gae"` (PPO) a critic is trained alongside, checkpointed in `checkpoints/critic`
  at the same steps as the policy, and the first `critic.warmup_steps` steps train only it.
  Each step's update is one jitted call of `rl_update.make_rl_update_fn` (advantages,
  reference / behaviour log-probs, critic and policy updates). Every step writes `rl/*`
  telemetry (listed in the module docstring), `rl/mfu` included.

  Multi-host: the rollout runs sharded over the batch axes on every process; `to_host`
  gathers it (a collective) so every process scores the same episodes and builds the same
  update batch.
  """
  cfg, g = exp.config.rl, exp.config.rl.algorithm
  warmup = cfg.critic.warmup_steps if g.uses_critic else 0
  # A copy: the update donates the state's buffers, and the reference must survive it. The
  # policy's schedule starts after the critic warm-up (its optimizer sees no step before).
  policy, policy_sh = sharding.sharded_train_state(
      jax.tree.map(jnp.copy, ref_params), specs, apply_fn=exp.apply_fn,
      tx=exp.optimizer(cfg.optimizer, max(cfg.steps - warmup, 1)), mesh=mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "rl"))
  critic = critic_ckpt = critic_sh = None
  if g.uses_critic:
    critic, critic_sh = init_critic_state(exp, ref_params, mesh)
    critic_ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "critic"))
  # The RL step is the checkpoint's step (the optimizer's count differs with several updates
  # per batch or a critic warm-up).
  policy, start, _ = trainer.restore_latest(ckpt, policy)
  if critic is not None and start:
    critic = _restore_critic_at(critic_ckpt, start, critic)
  ref, ref_sh, reference_params = ref_params, policy_sh.params, None
  if exp.config.lora is not None:
    # The reference is the frozen base (shared with the policy) and its own adapters.
    ref, ref_sh = lora.split_params(ref_params)[1], lora.split_params(policy_sh.params)[1]
    reference_params = lambda p, adapters: lora.join_params(lora.split_params(p)[0], adapters)
  state = RLState(policy=policy, critic=critic, ref_params=ref if g.kl_coef else None)
  state_sh = RLState(policy=policy_sh, critic=critic_sh,
                     ref_params=ref_sh if g.kl_coef else None)
  update = jit_rl_update(make_rl_update_fn(
      exp.apply_fn, g, critic=cfg.critic if g.uses_critic else None,
      value_apply_fn=critic.apply_fn if g.uses_critic else None,
      norm_length=exp.config.rollout.max_len, reference_params=reference_params,
      score_fn=exp.score_fn, trainable=exp.trainable),
      mesh, state_sh)
  if start < cfg.steps and jax.process_index() == 0:
    # The final evaluation of an earlier, shorter run of this workdir no longer holds.
    stale = os.path.join(workdir, "eval_rl.json")
    if os.path.exists(stale):
      os.remove(stale)
  if start < cfg.steps:
    # Before the first rollout: the widest update compiled, and a clear stop if it won't fit.
    trainer.compile_report("rl", update, writer, sharding.abstract_like(state),
                           rl_batch_shapes(exp, mesh), True,
                           settings=memory_settings(exp, "rl"))
  report_kv_cache(exp, g.prompts_per_step * g.num_generations, mesh, writer)
  train_qs = exp.world.splits["train"]
  rng = jax.random.fold_in(jax.random.key(exp.config.seed), 3)
  group_ids = np.repeat(np.arange(g.prompts_per_step, dtype=np.int32), g.num_generations)
  monitor = HealthMonitor(cfg.health)

  def step_fn(state: RLState, step: int):
    t0 = time.time()
    pick = np.random.default_rng([exp.config.seed, 2, step]).choice(
        len(train_qs), g.prompts_per_step, replace=False)
    qs = [train_qs[i] for i in pick]
    prompts, lens = exp.encode_prompts(qs)
    prompts, lens = np.repeat(prompts, g.num_generations, 0), np.repeat(lens, g.num_generations)
    rows_qs = [q for q in qs for _ in range(g.num_generations)]
    rollout = exp.train_rollout_fn(state.policy.params, exp.tool,
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
    train_policy = step >= warmup
    state, m = update(state, batch, train_policy)
    m = metrics_lib.to_python(m)
    m.update(eval_lib.episode_metrics(scored, rows_qs, exp.world))
    m["rollout_s"] = t_rollout
    warnings, scalars = monitor.update(step + 1, m)
    m.update(scalars)
    for line in warnings:
      logging.warning("%s", line)
      say(line)
    tokens = float(np.sum(r.lengths))
    flops = tokens * rl_flops_per_token(g, exp.model.config, width, train_policy=train_policy)
    return state, m, trainer.StepWork(tokens, flops)

  def eval_fn(state: RLState, step: int):
    vm, _ = eval_lib.evaluate(exp, state.policy.params, exp.world.splits["validation"],
                              jax.random.fold_in(rng, 10**6 + step - 1))
    return vm

  def save_fn(step: int, state: RLState):
    if state.critic is not None:   # first: a policy checkpoint always has its critic
      critic_ckpt.save(step, trainer.train_state_checkpoint(state.critic), {"phase": "critic"})
    ckpt.save(step, trainer.train_state_checkpoint(state.policy), {"phase": "rl"})

  loop = trainer.LoopConfig(name="rl", steps=cfg.steps, log_every=1,
                            checkpoint_every=exp.config.checkpoint_every,
                            eval_every=exp.config.eval_every, progress_keys=PROGRESS_KEYS,
                            eval_keys=("em", "searches"))
  state = trainer.run_loop(loop, state, step_fn, start=start, writer=writer, save_fn=save_fn,
                           eval_fn=eval_fn, peak_flops=trainer.device_peak_flops(mesh),
                           after_first_step=first_step_done)
  ckpt.close()
  if critic_ckpt is not None:
    critic_ckpt.close()
  return state.policy.params
