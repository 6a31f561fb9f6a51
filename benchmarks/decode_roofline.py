"""Benchmark: KV-cache decode throughput as a fraction of the memory-bandwidth roofline.

A decode step of a batch reads every weight once and every row's KV cache once; at small
batch it does little arithmetic per byte, so its floor is

  seconds per step >= (weight bytes + KV-cache bytes read) / HBM bandwidth,

and the roofline throughput is `batch / that`. This benchmark decodes greedily with
`jaxsearch.rollout.sampler.make_sampler` (prefill + one `lax.while_loop` of one-token steps,
under `jax.jit`) from random prompts with random weights, no stop token (every row decodes
`new_tokens`), and separates the decode steps from the prefill by timing two programs that
differ only in `max_new_tokens` (`short_new_tokens` and `new_tokens`):

  s_per_step = (t(new_tokens) - t(short_new_tokens)) / (new_tokens - short_new_tokens)

Bytes per step (`bytes_per_step`): the parameters (every weight is read once per step; tied
embeddings are one table, read as the output head) plus the KV cache of the live context:
2 (K and V) x layers x batch x kv_heads x head_dim x cache-dtype bytes x the mean context
over the timed steps (prompt + (short + new) / 2). `bytes_per_step_allocated` counts the whole
allocated cache instead (prompt + new_tokens slots: the decode attends over every slot,
masked), an upper bound of what the kernel reads. `roofline_fraction` =
measured tokens/s / (batch x bandwidth / bytes_per_step).

Bandwidth: `--hbm_gbps`, else from the device kind (H100 SXM 3,350 GB/s, H200 4,800 GB/s,
H100 PCIe 2,000 GB/s; TPU v5e 819, v5p 2,765); on a CPU or an unknown device the fraction is
left out (None).

Presets: `gpu_0p5b` (Qwen2.5-0.5B's shapes: d 896, 24 layers, 14 heads / 2 KV heads, vocab
151,936, tied embeddings; bf16 weights, compute and cache), `smoke` (tiny, fp32, for tests).

Prints (and with `--json OUT` writes) one JSON object:
  {"preset", "device", "device_kind", "batch", "prompt_len", "new_tokens",
   "short_new_tokens", "params", "param_bytes", "kv_bytes_per_step",
   "bytes_per_step", "bytes_per_step_allocated", "s_per_step", "decode_tokens_per_s",
   "hbm_gbps", "roofline_tokens_per_s", "roofline_fraction",
   "roofline_fraction_allocated", "compile_s", "seconds": {...}, "jax_version"}

Usage:
  python benchmarks/decode_roofline.py [--preset gpu_0p5b] [--batch 64] [--json OUT] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

PRESETS = {
    "gpu_0p5b": dict(vocab_size=151936, d_model=896, num_layers=24, num_heads=14,
                     num_kv_heads=2, mlp_dim=4864, qkv_bias=True, rope_theta=1e6,
                     tie_embeddings=True, dtype="bfloat16", param_dtype="bfloat16"),
    "smoke": dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=128),
}
# Peak HBM bandwidth, GB/s (vendor figures), by a substring of `device.device_kind`.
HBM_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100", 2039.0),
            ("v5p", 2765.0), ("v5 lite", 819.0), ("v5e", 819.0))


def device_bandwidth(kind: str) -> float | None:
  """Peak HBM GB/s of a device kind (`HBM_GBPS`), None when unknown (a CPU).

  Example:
    >>> device_bandwidth("NVIDIA H100 80GB HBM3"), device_bandwidth("cpu")
    (3350.0, None)
  """
  for name, gbps in HBM_GBPS:
    if name.lower() in kind.lower():
      return gbps
  return None


def kv_bytes(config, batch: int, context: float, dtype_bytes: int) -> float:
  """Bytes of K and V read for `batch` rows of `context` cached positions."""
  head_dim = config.d_model // config.num_heads
  return 2.0 * config.num_layers * batch * config.num_kv_heads * head_dim * dtype_bytes * context


def run(preset: str, *, batch: int, prompt_len: int, new_tokens: int, short_new_tokens: int,
        repeats: int, hbm_gbps: float | None, seed: int = 0) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from jaxsearch.models.transformer import (Transformer, TransformerConfig,  # noqa: PLC0415
                                            init_cache, make_decode_fn)
  from jaxsearch.rollout.sampler import SamplerConfig, make_sampler  # noqa: PLC0415

  if not 0 < short_new_tokens < new_tokens:
    raise ValueError(f"need 0 < short_new_tokens < new_tokens, got {short_new_tokens} and "
                     f"{new_tokens}")
  config = TransformerConfig(**PRESETS[preset], max_len=prompt_len + new_tokens)
  model = Transformer(config)
  cache_dtype = jnp.dtype(config.dtype)
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"])(
      jax.random.key(seed))
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))
  param_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
  rng = np.random.default_rng(seed)
  prompts = jnp.asarray(rng.integers(1, config.vocab_size, (batch, prompt_len)), jnp.int32)
  mask = jnp.ones((batch, prompt_len), bool)
  decode_fn = make_decode_fn(model)

  def program(m: int):
    sample = make_sampler(decode_fn, lambda b, n: init_cache(config, b, n, dtype=cache_dtype),
                          SamplerConfig(max_new_tokens=m, temperature=0.0))
    return jax.jit(lambda p, x, pm, k: sample(p, x, pm, k).tokens)

  seconds, compile_s = {}, 0.0
  fns = {m: program(m) for m in (short_new_tokens, new_tokens)}
  for m, fn in fns.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, prompts, mask, jax.random.key(0)))
    compile_s += time.perf_counter() - t0
  times = {m: [] for m in fns}
  for _ in range(repeats):          # interleaved warm calls
    for m, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, prompts, mask, jax.random.key(0)))
      times[m].append(time.perf_counter() - t0)
  for m in fns:
    seconds[str(m)] = statistics.median(times[m])
  compile_s -= sum(seconds.values())
  s_per_step = (seconds[str(new_tokens)] - seconds[str(short_new_tokens)]) / (
      new_tokens - short_new_tokens)
  context = prompt_len + (short_new_tokens + new_tokens) / 2
  kv_step = kv_bytes(config, batch, context, cache_dtype.itemsize)
  kv_allocated = kv_bytes(config, batch, prompt_len + new_tokens, cache_dtype.itemsize)
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  gbps = hbm_gbps or (device_bandwidth(kind) if device.platform != "cpu" else None)
  tokens_per_s = batch / s_per_step if s_per_step > 0 else None
  roof = batch * gbps * 1e9 / (param_bytes + kv_step) if gbps else None
  roof_alloc = batch * gbps * 1e9 / (param_bytes + kv_allocated) if gbps else None
  return {
      "preset": preset, "device": f"{device.platform}: {kind}", "device_kind": kind,
      "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
      "short_new_tokens": short_new_tokens, "params": n_params, "param_bytes": param_bytes,
      "kv_bytes_per_step": kv_step, "bytes_per_step": param_bytes + kv_step,
      "bytes_per_step_allocated": param_bytes + kv_allocated, "s_per_step": s_per_step,
      "decode_tokens_per_s": tokens_per_s, "hbm_gbps": gbps, "roofline_tokens_per_s": roof,
      "roofline_fraction": tokens_per_s / roof if roof and tokens_per_s else None,
      "roofline_fraction_allocated": (tokens_per_s / roof_alloc
                                      if roof_alloc and tokens_per_s else None),
      "compile_s": compile_s, "seconds": seconds, "repeats": repeats,
      "jax_version": jax.__version__,
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="gpu_0p5b", choices=tuple(PRESETS))
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--prompt_len", type=int, default=512)
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--short_new_tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--hbm_gbps", type=float, default=None,
                      help="peak memory bandwidth, GB/s (default: from the device kind)")
  parser.add_argument("--json", default=None, help="also write the result here")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny model and sizes, for tests (--preset smoke, batch 4)")
  args = parser.parse_args(argv)
  if args.smoke:
    args.preset, args.batch, args.prompt_len = "smoke", 4, 16
    args.new_tokens, args.short_new_tokens, args.repeats = 12, 4, 1
  result = run(args.preset, batch=args.batch, prompt_len=args.prompt_len,
               new_tokens=args.new_tokens, short_new_tokens=args.short_new_tokens,
               repeats=args.repeats, hbm_gbps=args.hbm_gbps)
  text = json.dumps(result, indent=1)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text + "\n")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
