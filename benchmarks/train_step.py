"""Benchmark: tokens/s and MFU of the jitted GRPO policy update and the SFT update.

For each model size the step is built exactly as training builds it: parameters and optimizer
state born sharded (`sharding.sharded_init`, AdamW), the step compiled with
`sharding.jit_sharded` (in/out shardings, the state donated) over a mesh of every device
(`MeshConfig(data=-1)`), inside `jax.set_mesh` + the logical-axis rules. Then

  - `compile_report` (ahead-of-time compile on abstract inputs) gives XLA's FLOP count of the
    step; `xla_flops_per_token` = that count x devices / (batch x seq_len);
  - `flops_per_token` = `sharding.transformer_flops_per_token(config, seq_len)` (PaLM's model
    FLOPs: 6N + 12 L H hd T); the two should agree within the elementwise work, the loss and
    the optimizer XLA also counts (the ratio is reported);
  - the step runs `--warmup` times, then `--repeats` times; seconds = median;
    `tokens_per_s = batch x seq_len / seconds`;
  - `mfu = flops_per_token x tokens_per_s / (peak x devices)`. Peak: `sharding.PEAK_FLOPS`
    for accelerators; on CPU, `sharding.measure_cpu_peak_flops()` measured in this run (a
    float32 matmul: the achievable peak of this host, counted once per host since fake CPU
    devices share its cores); the table's CPU figure is reported beside it.

The GRPO batch is B x G episodes of `seq_len` tokens with a policy mask over the last 3/4,
group-normalised advantages, reference log-probs (KL on) and on-policy ratios, as the
quickstart's update; the SFT batch is the same tokens with a loss mask.

Presets (`--preset`):
  cpu       (default) the quickstart's tiny policy (d=128, 2 layers, ~0.4M parameters) and a
            ~22M-parameter one (d=512, 6 layers), float32, on this CPU;
  gpu_0p5b  a 0.5B-class model with Qwen2-0.5B's shapes (d=896, 24 layers, 14 heads / 2 KV
            heads, MLP 4864, vocabulary 151,936, tied embeddings, q/k/v bias) in bf16 compute
            with float32 parameters and AdamW state, batch 8 x 1024: meant for one H100 / H200
            (target >= 40% MFU); `--compile_only` reports its XLA FLOPs and memory per device
            without running it (works on CPU).

Prints (and with `--json OUT` writes) a JSON list of rows:
  {"model", "step", "params", "batch", "seq_len", "dtype", "tokens_per_s", "mfu", "device",
   "num_devices", "flops_per_token", "xla_flops_per_token", "xla_over_model", "seconds",
   "compile_s", "peak_flops", "peak_source", "memory_per_device_gb", and on CPU
   "mfu_table_peak" (against `sharding.CPU_MEASURED_PEAK_FLOPS`)}

Usage:
  python benchmarks/train_step.py [--json OUT] [--smoke] [--preset cpu|gpu_0p5b]
                                  [--steps grpo,sft] [--repeats 3] [--compile_only]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (TransformerConfig kwargs, batch rows (B x G for GRPO), seq_len)
PRESETS = {
    "cpu": {
        "tiny": (dict(vocab_size=1024, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=384, max_len=256), 32, 256),
        "small_22m": (dict(vocab_size=8192, d_model=512, num_layers=6, num_heads=8,
                           num_kv_heads=4, mlp_dim=1408, max_len=256), 8, 256),
    },
    "gpu_0p5b": {
        "qwen2_0p5b_shapes": (dict(vocab_size=151936, d_model=896, num_layers=24, num_heads=14,
                                   num_kv_heads=2, mlp_dim=4864, max_len=1024, qkv_bias=True,
                                   rope_theta=1e6, tie_embeddings=True, dtype="bfloat16",
                                   param_dtype="float32"), 8, 1024),
    },
    "smoke": {
        "smoke": (dict(vocab_size=128, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                       mlp_dim=64, max_len=32), 8, 32),
    },
}
GROUP = 8   # GRPO's num_generations (rows per question) when the batch allows it


def _batches(config, rows: int, seq_len: int, seed: int = 0):
  """Host arrays: a GRPO PolicyGradientBatch and an SFT SequenceBatch over the same tokens."""
  from jaxsearch import losses  # noqa: PLC0415
  from jaxsearch.train.steps import PolicyGradientBatch  # noqa: PLC0415
  from jaxsearch.types import SequenceBatch  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, config.vocab_size, (rows, seq_len)).astype(np.int32)
  mask = np.broadcast_to(np.arange(seq_len)[None] >= seq_len // 4, (rows, seq_len)).copy()
  group = GROUP if rows % GROUP == 0 else rows
  rewards = rng.random(rows).astype(np.float32)
  adv = np.asarray(losses.grpo_advantages(rewards, np.arange(rows) // group), np.float32)
  ref_logp = np.log(rng.uniform(0.01, 0.5, (rows, seq_len))).astype(np.float32)
  return (PolicyGradientBatch(tokens, mask, adv, None, ref_logp),
          SequenceBatch(tokens, mask), group)


def bench_one(name: str, kwargs: dict, rows: int, seq_len: int, steps: list[str], *,
              repeats: int, warmup: int, compile_only: bool, cpu_peak: float | None) -> list[dict]:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from flax import linen as nn  # noqa: PLC0415

  from jaxsearch.models.transformer import Transformer, TransformerConfig  # noqa: PLC0415
  from jaxsearch.train import sharding  # noqa: PLC0415
  from jaxsearch.train.state import TrainState  # noqa: PLC0415
  from jaxsearch.train.steps import (PolicyGradientConfig, make_policy_update_fn,  # noqa: PLC0415
                                     make_sft_update_fn)

  config = TransformerConfig(**kwargs)
  model = Transformer(config)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
  sharding.check_batch(rows, mesh, f"{name}'s batch")
  device = jax.devices()[0]
  kind = device.device_kind
  n_dev = jax.device_count()
  if device.platform == "cpu":
    peak, source, peak_devices = cpu_peak, "measured float32 matmul, whole host", 1
  else:
    peak, source, peak_devices = sharding.peak_flops(kind), "PEAK_FLOPS table (bf16 dense)", n_dev

  def apply_fn(variables, tokens):
    return model.apply(variables, tokens)

  init_rows = mesh.shape["data"] * mesh.shape["fsdp"]
  tx = optax.adamw(1e-5)   # one object: the state's static metadata must be the same each time

  def init_fn(rng):
    params = model.init(rng, jnp.zeros((init_rows, 8), jnp.int32))["params"]
    return TrainState.create(apply_fn=apply_fn, params=params, tx=tx)

  pg_batch, sft_batch, group = _batches(config, rows, seq_len)
  grpo = PolicyGradientConfig(prompts_per_step=rows // group, num_generations=group, kl_coef=0.01,
                    kl_kind="low_var_kl")
  fns = {"grpo": (make_policy_update_fn(apply_fn, grpo), pg_batch),
         "sft": (make_sft_update_fn(apply_fn), sft_batch)}
  out = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    abstract, state_sh = sharding.sharded_abstract(init_fn, jax.random.key(0), mesh)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract.params)))
    for step_name in steps:
      fn, host_batch = fns[step_name]
      bsh = sharding.batch_sharding(mesh)
      update = sharding.jit_sharded(fn, (state_sh, bsh),
                                    sharding.state_and_metrics_shardings(state_sh, mesh),
                                    donate_argnums=0)
      report = sharding.compile_report(update, abstract, sharding.abstract_like(host_batch, bsh))
      tokens = rows * seq_len
      model_fpt = sharding.transformer_flops_per_token(config, seq_len)
      xla_fpt = report["flops_per_device"] * report["num_devices"] / tokens
      row = dict(model=name, step=step_name, params=n_params, batch=rows, seq_len=seq_len,
                 dtype=config.dtype, param_dtype=config.param_dtype, device=kind,
                 num_devices=n_dev, flops_per_token=model_fpt, xla_flops_per_token=xla_fpt,
                 xla_over_model=xla_fpt / model_fpt, compile_s=report["compile_seconds"],
                 memory_per_device_gb=report["total_bytes"] / 2**30,
                 peak_flops=peak, peak_source=source, tokens_per_s=None, mfu=None, seconds=None)
      if not compile_only:
        state, _ = sharding.sharded_init(init_fn, jax.random.key(0), mesh)
        batch = sharding.shard_batch(host_batch, mesh)
        times = []
        for i in range(warmup + repeats):
          t0 = time.perf_counter()
          state, metrics = update(state, batch)
          jax.block_until_ready((state, metrics))
          if i >= warmup:
            times.append(time.perf_counter() - t0)
        if not np.isfinite(float(metrics["loss"])):
          raise FloatingPointError(f"{name} {step_name}: non-finite loss {metrics['loss']}")
        seconds = statistics.median(times)
        tps = tokens / seconds
        row.update(seconds=seconds, seconds_all=times, tokens_per_s=tps,
                   mfu=sharding.mfu(model_fpt, tps, kind, peak_devices, peak=peak))
        if device.platform == "cpu":   # against the table's CPU figure (an unloaded host)
          row["mfu_table_peak"] = sharding.mfu(model_fpt, tps, kind, 1,
                                               peak=sharding.CPU_MEASURED_PEAK_FLOPS)
        del state
      out.append(row)
      print(json.dumps({k: row[k] for k in ("model", "step", "params", "tokens_per_s", "mfu",
                                             "xla_over_model")}), file=sys.stderr, flush=True)
  return out


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None, help="write the rows to this file too")
  parser.add_argument("--preset", default="cpu", choices=("cpu", "gpu_0p5b"))
  parser.add_argument("--steps", default="grpo,sft")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--compile_only", action="store_true",
                      help="XLA FLOPs and memory from the AOT compile; nothing runs")
  parser.add_argument("--smoke", action="store_true", help="one tiny model, 1 repeat (tests)")
  args = parser.parse_args(argv)
  steps = [s for s in args.steps.split(",") if s]
  for s in steps:
    if s not in ("grpo", "sft"):
      parser.error(f"--steps takes grpo and/or sft, got {s!r}")
  preset = "smoke" if args.smoke else args.preset
  repeats = 1 if args.smoke else args.repeats
  import jax  # noqa: PLC0415
  from jaxsearch.train import sharding  # noqa: PLC0415
  cpu_peak = None
  if jax.devices()[0].platform == "cpu":
    cpu_peak = sharding.measure_cpu_peak_flops(n=256 if args.smoke else 1024)
  rows = []
  for name, (kwargs, batch, seq_len) in PRESETS[preset].items():
    rows += bench_one(name, kwargs, batch, seq_len, steps, repeats=repeats,
                      warmup=0 if args.smoke else args.warmup, compile_only=args.compile_only,
                      cpu_peak=cpu_peak)
  for r in rows:
    r.update(smoke=args.smoke, preset=preset, jax_version=jax.__version__,
             cpu_table_peak_flops=sharding.CPU_MEASURED_PEAK_FLOPS)
  text = json.dumps(rows, indent=1)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text + "\n")
  print(text)
  return rows


if __name__ == "__main__":
  main()
