#!/usr/bin/env bash
# The GPU figures of the README, in one short run on one H100 / H200 (about 5 minutes):
#   1. the train step of a 0.5B-class model (Qwen2-0.5B shapes), bf16: tokens/s and MFU
#      (benchmarks/train_step.py --preset gpu_0p5b);
#   2. KV-cache decode at batch 64 (Qwen2.5-0.5B shapes, bf16 weights and cache, 512-token
#      prompts, 256 new tokens) as a fraction of the HBM-bandwidth roofline
#      (benchmarks/decode_roofline.py).
# Both need only jax, flax and optax, which the device image has. Results go to $OUT (the
# device tool's folder; default ./gpu_results) as JSON, one file each, and the log.
#
#   bash benchmarks/gpu_check.sh            # through the device tool: run it from the repo root
#
# Not here (needs gin-config, qwix, gguf and clu carried as wheels, see the device README):
# 5 RL steps of gin/experiments/search_r1.gin on a Qwen2.5-0.5B-shaped random checkpoint.
# Never part of CI.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import jax; print(jax.__version__, jax.devices())"
  timeout 240 "$PY" benchmarks/train_step.py --preset gpu_0p5b --json "$OUT/train_step.json"
  echo "train_step rc=$?"
  timeout 240 "$PY" benchmarks/decode_roofline.py --preset gpu_0p5b --batch 64 \
    --json "$OUT/decode_roofline.json"
  echo "decode_roofline rc=$?"
} 2>&1 | tee "$OUT/gpu_check.log"
