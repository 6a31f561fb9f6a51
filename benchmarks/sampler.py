"""Benchmark: jaxsearch's sampler against transformers' `generate`, same weights, same run.

A tiny random Llama (transformers `LlamaForCausalLM`, weights redrawn at unit scale so that
greedy decoding is not decided by float noise between near-equal logits) is saved as a
Hugging Face checkpoint, loaded into jaxsearch with `jaxsearch.models.load_hf_checkpoint`, and
both generate `--new_tokens` tokens greedily from the same random prompts (no stop token, so
every row generates exactly that many) at batch sizes 1, 8 and 64:

  - jaxsearch: `jaxsearch.rollout.sampler.make_sampler` under `jax.jit` (prefill + one
    `lax.while_loop` of KV-cache decode steps), fp32;
  - transformers: `model.generate(do_sample=False, min_new_tokens=max_new_tokens=...)` with its
    KV cache, fp32, under `torch.inference_mode()`, on the same CPU threads.

Each is called once to warm up (jaxsearch's compilation is reported as `compile_s`), then
`--repeats` times; `tokens_per_s = batch * new_tokens / median seconds`. `greedy_match` is true
when every generated token of every row is the same in both.

Prints (and with `--json OUT` writes) a JSON list of rows:
  {"impl": "jaxsearch" | "transformers", "batch": B, "new_tokens": 128, "tokens_per_s": x,
   "greedy_match": bool, "seconds": median, "compile_s": ..., "device": ..., "model": {...}}

Usage:
  python benchmarks/sampler.py [--json OUT] [--batches 1,8,64] [--new_tokens 128] [--smoke]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
SMOKE_MODEL = dict(MODEL, vocab_size=256, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build_checkpoint(model_kwargs: dict, path: str, seed: int = 0) -> None:
  """Saves a random Llama with unit-scale weights (kernels ~ N(0, 1/fan_in)) to `path`."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model_kwargs)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif p.ndim == 2 and "embed_tokens" not in name:
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
      else:
        p.copy_(torch.randn_like(p))
  model.save_pretrained(path)


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None, help="write the rows to this file too")
  parser.add_argument("--batches", default="1,8,64")
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (for tests)")
  args = parser.parse_args(argv)
  if args.smoke:
    args.batches, args.new_tokens, args.repeats = "1,4", 16, 1
  model_kwargs = SMOKE_MODEL if args.smoke else MODEL
  batches = [int(b) for b in args.batches.split(",")]

  import jax  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from jaxsearch.models import load_hf_checkpoint  # noqa: PLC0415
  from jaxsearch.models.transformer import init_cache, make_decode_fn  # noqa: PLC0415
  from jaxsearch.rollout.sampler import SamplerConfig, make_sampler  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count() or 1)
  path = tempfile.mkdtemp(prefix="sampler_bench_")
  build_checkpoint(model_kwargs, path)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  model, params = load_hf_checkpoint(path, max_len=args.prompt_len + args.new_tokens)
  sample = jax.jit(make_sampler(
      make_decode_fn(model), functools.partial(init_cache, model.config),
      SamplerConfig(max_new_tokens=args.new_tokens, temperature=0.0)))
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} cpus)"
  rows = []
  for b in batches:
    prompts = np.random.default_rng(b).integers(
        3, model_kwargs["vocab_size"], (b, args.prompt_len)).astype(np.int32)
    mask = np.ones_like(prompts, bool)

    def run_jax():
      return np.asarray(sample(params, prompts, mask, jax.random.key(0)).tokens)

    t0 = time.perf_counter()
    jax_tokens = run_jax()
    first = time.perf_counter() - t0
    jax_s = _median_time(run_jax, args.repeats)

    ids = torch.from_numpy(prompts.astype(np.int64))

    def run_hf():
      with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                eos_token_id=None, pad_token_id=0)
      return out[:, args.prompt_len:].numpy()

    hf_tokens = run_hf()
    hf_s = _median_time(run_hf, args.repeats)
    match = bool(np.array_equal(jax_tokens, hf_tokens))
    rows_equal = float(np.mean(np.all(jax_tokens == hf_tokens, axis=1)))
    common = dict(batch=b, new_tokens=args.new_tokens, greedy_match=match,
                  rows_identical_fraction=rows_equal, device=device,
                  prompt_len=args.prompt_len, repeats=args.repeats, model=model_kwargs)
    rows.append(dict(impl="jaxsearch", tokens_per_s=b * args.new_tokens / jax_s,
                     seconds=jax_s, compile_s=max(first - jax_s, 0.0), **common))
    rows.append(dict(impl="transformers", tokens_per_s=b * args.new_tokens / hf_s,
                     seconds=hf_s, compile_s=0.0, **common))
    print(f"batch {b}: jaxsearch {rows[-2]['tokens_per_s']:.0f} tok/s, transformers "
          f"{rows[-1]['tokens_per_s']:.0f} tok/s, greedy_match={match}", file=sys.stderr)
  text = json.dumps(rows, indent=1)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text)
  return rows


if __name__ == "__main__":
  main()
