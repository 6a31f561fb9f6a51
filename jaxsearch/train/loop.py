"""The host loop: warm start (SFT), evaluation, GRPO, evaluation. It only calls pure pieces.

Workdir layout:
  tokenizer.model          the tokenizer (trained on the world or the pretrained model's; reused
                           on resume)
  checkpoints/sft, /rl     orbax checkpoints (state + JSON metadata)
  eval_*.json              evaluation results as they are produced (closed book, SFT, RL)
  summary.json             final metrics: closed_book_em, sft_em, rl_em (+ F1, search stats)
  events.out.tfevents.*    TensorBoard scalars (clu)
A second run with the same workdir resumes from the latest checkpoint of the latest phase.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from jaxsearch import losses, metrics as metrics_lib
from jaxsearch.checkpoint import Checkpointer
from jaxsearch.data import demos
from jaxsearch.data.tokenizer import load_tokenizer, save_tokenizer
from jaxsearch.train import evaluate as eval_lib
from jaxsearch.train.experiment import Experiment, RunConfig, setup
from jaxsearch.train import sharding
from jaxsearch.train.optim import make_optimizer
from jaxsearch.train.state import TrainState
from jaxsearch.train.steps import (PolicyGradientBatch, make_grpo_update_fn, make_sft_update_fn,
                                   sequence_logprobs)
from jaxsearch.types import SequenceBatch

PROGRESS_KEYS = ("reward", "em", "searches", "loss", "kl", "tokens_per_s", "s_per_step")
SFT_LOG_EVERY = 25   # SFT steps take ~0.2 s on CPU: a line per 25 of them


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
  tok_path = os.path.join(workdir, "tokenizer.model")
  tokenizer = load_tokenizer(tok_path) if os.path.exists(tok_path) else None
  exp = setup(config, tokenizer=tokenizer)
  if tokenizer is None and jax.process_index() == 0:
    save_tokenizer(exp.tokenizer, tok_path)
  if jax.process_index() == 0:
    from jaxsearch.train.workdir import CONFIG_FILE, config_to_json  # noqa: PLC0415
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
    return _run(exp, config, workdir, mesh, params, t_start, after_first_step)


def _run(exp, config, workdir, mesh, params, t_start, after_first_step):
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
  sft_params = warm_start(exp, params, workdir, writer, first_step_done, mesh)
  # 2. Baselines on the held-out split, with the warm-started policy.
  questions = exp.world.splits[config.eval_split]
  eval_rng = jax.random.fold_in(rng, 2)
  summary = {}
  for name, kwargs in (("closed_book", dict(closed_book=True)), ("sft", {})):
    summary.update(_cached_eval(exp, sft_params, questions, eval_rng, workdir, name, writer,
                                step=config.sft.steps, **kwargs))
  # 3. GRPO from the warm start, with the warm start as the KL reference.
  rl_params = train_rl(exp, sft_params, workdir, writer, first_step_done, mesh)
  summary.update(_cached_eval(exp, rl_params, questions, eval_rng, workdir, "rl", writer,
                              step=config.sft.steps + config.rl.steps))
  summary["wall_seconds"] = time.time() - t_start   # of this invocation (a resume is shorter)
  summary["eval_split"] = config.eval_split
  summary["num_eval_questions"] = len(questions)
  metrics_lib.write_json(os.path.join(workdir, "summary.json"), summary)
  writer.flush()
  logging.info("summary: %s", summary)
  return summary


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
  print(f"[eval {name}] " + " ".join(f"{k}={v:.3f}" for k, v in sorted(cached.items())), flush=True)
  return cached


def _checkpointed(state: TrainState) -> dict:
  """What a checkpoint holds of a train state (the static apply_fn / tx are rebuilt)."""
  return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def _restore_or(ckpt: Checkpointer, state: TrainState):
  step = ckpt.latest_step()
  if step is None:
    return state, None
  tree, meta = ckpt.restore(step, _checkpointed(state))
  logging.info("resumed from %s step %d", meta.get("phase"), step)
  return state.replace(**tree), meta


def warm_start(exp: Experiment, params, workdir, writer, first_step_done, mesh):
  """Supervised fine-tuning on the noisy teacher's demonstrations; returns the final params."""
  cfg = exp.config.sft
  state = TrainState.create(apply_fn=exp.apply_fn, params=params,
                            tx=make_optimizer(cfg.optimizer, cfg.steps))
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
  update = jax.jit(make_sft_update_fn(exp.apply_fn), donate_argnums=0)
  n = data.tokens.shape[0]
  t_last, step_last, tokens_seen = time.time(), start, 0
  for step in range(start, cfg.steps):
    epoch, pos = divmod(step * cfg.batch_size, n)
    order = np.random.default_rng([exp.config.seed, 1, epoch]).permutation(n)
    idx = np.take(order, np.arange(pos, pos + cfg.batch_size), mode="wrap")
    width = bucket_width(int(lengths[idx].max()), data.tokens.shape[1])
    batch = sharding.shard_batch(
        SequenceBatch(data.tokens[idx, :width], data.loss_mask[idx, :width]), mesh)
    state, m = update(state, batch)
    tokens_seen += batch.tokens.size
    if step == start:
      first_step_done()
    if (step + 1) % SFT_LOG_EVERY == 0 or step + 1 == cfg.steps:
      m = metrics_lib.to_python(m)   # waits for the step: the timing below is honest
      dt = time.time() - t_last
      m["s_per_step"] = dt / (step + 1 - step_last)
      m["tokens_per_s"] = tokens_seen / dt
      t_last, step_last, tokens_seen = time.time(), step + 1, 0
      writer.write_scalars(step + 1, {f"sft/{k}": v for k, v in m.items()})
      print(metrics_lib.progress_line("sft", step + 1, cfg.steps, m,
                                      ("loss", "token_accuracy", "tokens_per_s", "s_per_step")),
            flush=True)
    if (step + 1) % exp.config.checkpoint_every == 0 or step + 1 == cfg.steps:
      ckpt.save(step + 1, _checkpointed(state), {"phase": "sft"})
  ckpt.close()
  return state.params


def train_rl(exp: Experiment, ref_params, workdir, writer, first_step_done, mesh):
  """GRPO from `ref_params`, which also serve as the frozen KL reference; returns final params."""
  cfg, g = exp.config.rl, exp.config.rl.grpo
  # A copy: the update donates the state's buffers, and the reference must survive it.
  state = TrainState.create(apply_fn=exp.apply_fn, params=jax.tree.map(jnp.copy, ref_params),
                            tx=make_optimizer(cfg.optimizer, cfg.steps))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", "rl"))
  state, _ = _restore_or(ckpt, state)
  start = int(state.step)
  update = jax.jit(make_grpo_update_fn(exp.apply_fn, g), donate_argnums=0)
  logprob_fn = jax.jit(lambda p, t: sequence_logprobs(exp.apply_fn, p, t))
  adv_fn = jax.jit(lambda r, gid: losses.grpo_advantages(r, gid, scale=g.advantage_scale))
  train_qs = exp.world.splits["train"]
  rng = jax.random.fold_in(jax.random.key(exp.config.seed), 3)
  group_ids = np.repeat(np.arange(g.prompts_per_step), g.num_generations)
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
    scored = eval_lib.score_rollout(rollout, lens, [q.answers for q in rows_qs], exp.tokenizer,
                                    exp.reward_fn)
    t_rollout = time.time() - t0
    width = bucket_width(int(scored.rollout.lengths.max()), scored.rollout.tokens.shape[1])
    tokens = sharding.shard_batch(scored.rollout.tokens[:, :width], mesh)
    ref_logp = logprob_fn(ref_params, tokens) if g.kl_coef else None
    old_logp = logprob_fn(state.params, tokens) if g.updates_per_batch > 1 else None
    batch = PolicyGradientBatch(
        tokens=tokens,
        policy_mask=sharding.shard_batch(scored.rollout.policy_mask[:, :width], mesh),
        advantages=adv_fn(*sharding.shard_batch((scored.rewards, group_ids), mesh)),
        old_logp=old_logp, ref_logp=ref_logp)
    for _ in range(g.updates_per_batch):
      state, m = update(state, batch)
    if step == start:
      first_step_done()
    m = metrics_lib.to_python(m)
    m.update(eval_lib.episode_metrics(scored, rows_qs, exp.world))
    dt = time.time() - t0
    m.update(s_per_step=dt, rollout_s=t_rollout,
             tokens_per_s=float(np.sum(scored.rollout.lengths)) / dt)
    writer.write_scalars(step + 1, {f"rl/{k}": v for k, v in m.items()})
    print(metrics_lib.progress_line("rl", step + 1, cfg.steps, m, PROGRESS_KEYS), flush=True)
    if exp.config.eval_every and (step + 1) % exp.config.eval_every == 0:
      vm, _ = eval_lib.evaluate(exp, state.params, exp.world.splits["validation"],
                                jax.random.fold_in(rng, 10**6 + step))
      writer.write_scalars(step + 1, {f"validation/{k}": v for k, v in vm.items()})
      print(f"[validation {step + 1}] em={vm['em']:.3f} searches={vm['searches']:.2f}", flush=True)
    if (step + 1) % exp.config.checkpoint_every == 0 or step + 1 == cfg.steps:
      ckpt.save(step + 1, _checkpointed(state), {"phase": "rl"})
  ckpt.close()
  return state.params
