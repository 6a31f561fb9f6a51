"""What fits: per-device memory of the search agent's GRPO and SFT updates, on paper.

Every figure comes from ahead-of-time compilation only: the parameters, the optimizer state,
the KL reference and the batch are `jax.ShapeDtypeStruct`s with their shardings, the step is
lowered and compiled (`sharding.compile_report`), and XLA's `memory_analysis()` of the
SPMD-partitioned program gives the bytes ONE device needs. Nothing is allocated and nothing
runs, so a 7B model's table is made on a laptop.

  THESE ARE XLA's CPU-BACKEND MEMORY ANALYSES of the same sharded program, compiled for fake
  CPU devices (`--xla_force_host_platform_device_count`) arranged as the accelerator mesh. They
  are a proxy, not measurements on the accelerators: the GPU and TPU compilers fuse, schedule
  and reuse buffers differently (the TPU compiler in particular rematerialises and overlaps
  more), the CPU backend may widen bfloat16 matmuls to float32 internally, and the runtime
  adds its own reserve (a framework / NCCL workspace on GPU; JAX preallocates 75% of HBM by
  default but can use nearly all of it). Expect the same order of magnitude, and treat a row
  within ~20% of a device's HBM as "try it", not "fits". gpu8 and v5e8 have the same mesh
  shape (fsdp=8), so on this backend they are ONE program: it is compiled once and its row is
  repeated for the second mesh (`same_program_as`).

The steps are the ones training runs:
  grpo: `rl_update.make_rl_update_fn` jitted by `rl_update.jit_rl_update` (state donated,
        batch split over the batch axes): batch telemetry, GRPO advantages, the KL reference's
        log-probs (kl_coef > 0, `low_var_kl`), one policy update over micro-batches with
        gradient accumulation (`PolicyGradientConfig.micro_batch_size`);
  sft:  `steps.make_sft_update_fn` (same micro-batches) jitted by `sharding.jit_sharded`,
        as `programs.search_agent.loop.warm_start` does.

The state is the one `loop.train_rl` builds: bfloat16 parameters and compute, AdamW
(`optim.make_optimizer`) with float32 moments (`OptimizerConfig(state_dtype="float32")`),
`remat="full"`, `scan_layers=True`, log-probs from `Transformer.token_scores` with the output
head over 512 positions at a time (`logits_chunk`; `--logits_chunk 0` gives the whole
sequence's `[T, V]` logits at once, the table before chunking); parameters and optimizer
state sharded by their logical axis names (`sharding.DEFAULT_RULES`). Modes:
  full: every weight trained; the KL reference is a second (frozen, bfloat16) copy of the
        weights in `RLState.ref_params`;
  lora: rank-16 adapters (alpha 32) on all seven projections (q, k, v, o, gate, up, down;
        `models.lora`), only the adapters in the optimizer state (`optim.train_only`); the
        KL reference is the same frozen base plus the reference's own adapters
        (`make_rl_update_fn(..., reference_params=...)`, as `loop.train_rl`), so the base
        weights are held once.

Lengths and batch (Search-R1's, Jin et al. 2025: episodes of up to 4,096 tokens, prompt +
interleaved searches and retrieved passages + answer): every row is 4,096 tokens; a step
is 64 episodes (8 questions x 8 generations) in micro-batches of 8 episodes (1 episode per
device per micro-batch on an 8-device mesh). On a mesh with more batch shards than the
micro-batch has rows, the micro-batch is raised to one episode per shard (recorded in
`micro_batch_size`). `--batch`, `--micro_batch_size` and `--seq_len` change them.

Meshes (read from the gin files, so they stay in step with what training uses):
  gpu8   gin/mesh/gpu8_node.gin   8 devices, data=1 fsdp=8 (one 8-GPU node, H100 80 GB);
  v5e8   gin/mesh/tpu_v5e_8.gin   8 devices, data=1 fsdp=8 (TPU v5e-8, 16 GB HBM per chip);
  v5p64  gin/mesh/tpu_v5p_64.gin  32 devices (v5p-64 counts TensorCores: 32 chips), data=2
         fsdp=16; off by default (`--meshes v5p64` to add it).

Models: Qwen2.5-0.5B / 1.5B / 3B / 7B as their Hugging Face config.json give them (`MODELS`).

Rows (`--json OUT` writes them; stdout prints them, or a markdown table with `--markdown`):
  {"model", "params", "trainable_params", "mode", "step", "mesh", "devices", "mesh_shape",
   "batch", "micro_batch_size", "seq_len", "logits_chunk", "argument_gib", "temp_gib", "output_gib",
   "alias_gib", "total_gib", "fits_80gb_h100", "fits_16gb_v5e", "compile_s",
   "same_program_as", "error"}
  Bytes are per device, GiB (2^30): arguments (state + batch shards), temporaries, outputs,
  outputs aliased into donated arguments, and total = arguments + outputs - aliased +
  temporaries + generated code (`compile_report["total_bytes"]`). fits_80gb_h100: total <=
  80 GiB; fits_16gb_v5e: total <= 16 GiB. A configuration that fails or takes longer than
  `--timeout_s` to compile gets a row with `error` set and no bytes.

Usage:
  python benchmarks/memory_table.py [--json OUT] [--models 0.5b,1.5b,3b,7b]
      [--meshes gpu8,v5e8] [--modes full,lora] [--steps grpo,sft] [--batch 64]
      [--micro_batch_size 8] [--seq_len 4096] [--timeout_s 300] [--markdown] [--smoke]
  python benchmarks/memory_table.py --from_json OUT --markdown     # re-render a table
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GIB = 2.0 ** 30
H100_GIB = 80.0
V5E_GIB = 16.0

# Qwen2.5 base models, from each model card's config.json on the Hugging Face Hub
# (https://huggingface.co/Qwen/Qwen2.5-0.5B, .../Qwen2.5-1.5B, .../Qwen2.5-3B,
# .../Qwen2.5-7B): hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, vocab_size, tie_word_embeddings. All have q/k/v bias, rope_theta 1e6
# and rms_norm_eps 1e-6. The 7B's vocab_size is 152,064 (its embedding matrix is padded
# further than the small models' 151,936) and it has a separate lm_head.
#        name    hidden  interm. layers heads kv  vocab   tied
MODELS = {
    "0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "3b": (2048, 11008, 36, 16, 2, 151936, True),
    "7b": (3584, 18944, 28, 28, 4, 152064, False),
}
SMOKE_MODEL = (128, 512, 2, 4, 2, 512, True)

# name -> (gin file, the device it stands for)
MESHES = {
    "gpu8": ("gin/mesh/gpu8_node.gin", "8x H100 80GB"),
    "v5e8": ("gin/mesh/tpu_v5e_8.gin", "TPU v5e-8"),
    "v5p64": ("gin/mesh/tpu_v5p_64.gin", "TPU v5p-64"),
}
MODES = ("full", "lora")
STEPS = ("grpo", "sft")
LORA_RANK, LORA_ALPHA = 16, 32.0
NUM_GENERATIONS = 8   # G; questions per step = batch / G
KL_COEF = 0.001       # Search-R1's KL weight (any value > 0 gives the same program)
LOGITS_CHUNK = 512    # positions per output-head chunk (TransformerConfig.logits_chunk)


def mesh_spec(name: str) -> dict:
  """`{"data", "fsdp", "tensor", "devices", "gin", "device"}` of a mesh name, read from its
  gin file (`sharding.MeshConfig.<axis> = N` bindings and the `# Devices: N` header)."""
  gin_file, device = MESHES[name]
  with open(os.path.join(REPO, gin_file)) as f:
    text = f.read()
  spec = {"data": -1, "fsdp": 1, "tensor": 1, "gin": gin_file, "device": device}
  for axis, value in re.findall(r"^sharding\.MeshConfig\.(data|fsdp|tensor)\s*=\s*(-?\d+)",
                                text, re.M):
    spec[axis] = int(value)
  found = re.search(r"^#\s*Devices:\s*(\d+)", text, re.M)
  if not found:
    raise ValueError(f"{gin_file} has no '# Devices: N' line")
  spec["devices"] = int(found.group(1))
  return spec


def transformer_kwargs(name: str, seq_len: int, logits_chunk: int = 0) -> dict:
  """`TransformerConfig` kwargs of a `MODELS` entry (or "smoke"): bf16 params and compute,
  full remat, scanned layers, the output head over `logits_chunk` positions at a time (0:
  the whole sequence's logits at once)."""
  d, f, layers, heads, kv, vocab, tied = SMOKE_MODEL if name == "smoke" else MODELS[name]
  return dict(vocab_size=vocab, d_model=d, mlp_dim=f, num_layers=layers, num_heads=heads,
              num_kv_heads=kv, tie_embeddings=tied, qkv_bias=True, rope_theta=1e6,
              norm_eps=1e-6, max_len=seq_len, dtype="bfloat16", param_dtype="bfloat16",
              remat="full", scan_layers=True, logits_chunk=logits_chunk)


def _abstract_train_state(abstract_params, specs, *, apply_fn, tx, mesh, rules):
  """`sharding.sharded_train_state` without arrays: the `TrainState` of `abstract_params`
  as `ShapeDtypeStruct`s with shardings (optimizer moments sharded like their parameters),
  and its NamedSharding tree."""
  import jax  # noqa: PLC0415
  from flax import linen as nn  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  from jaxsearch.train import sharding  # noqa: PLC0415
  from jaxsearch.train.state import TrainState  # noqa: PLC0415

  def create(p):
    boxed = jax.tree.map(lambda s, x: nn.Partitioned(x, names=tuple(s)), specs, p,
                         is_leaf=lambda s: isinstance(s, P))
    return TrainState.create(apply_fn=apply_fn, params=boxed, tx=tx)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed_state = jax.eval_shape(create, abstract_params)
    shardings = sharding.tree_shardings(boxed_state, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          sharding.unbox(boxed_state), shardings)
  return abstract, shardings


def compile_one(model_name: str, mode: str, step: str, mesh_name: str, *, batch: int,
                micro_batch_size: int, seq_len: int, logits_chunk: int = LOGITS_CHUNK) -> dict:
  """AOT-compiles one (model, mode, step, mesh) and returns its row (bytes per device)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import linen as nn  # noqa: PLC0415

  from jaxsearch.models import lora  # noqa: PLC0415
  from jaxsearch.models.transformer import Transformer, TransformerConfig  # noqa: PLC0415
  from jaxsearch.train import sharding  # noqa: PLC0415
  from jaxsearch.train.optim import OptimizerConfig, make_optimizer, train_only  # noqa: PLC0415
  from jaxsearch.train.rl_update import (RLBatch, RLState, jit_rl_update,  # noqa: PLC0415
                                         make_rl_update_fn)
  from jaxsearch.train.steps import PolicyGradientConfig, make_sft_update_fn  # noqa: PLC0415
  from jaxsearch.types import SequenceBatch  # noqa: PLC0415

  spec = mesh_spec(mesh_name)
  if jax.device_count() < spec["devices"]:
    raise RuntimeError(f"mesh {mesh_name} needs {spec['devices']} devices, jax has "
                       f"{jax.device_count()}: set XLA_FLAGS before jax is imported")
  mesh = sharding.make_mesh(
      sharding.MeshConfig(data=spec["data"], fsdp=spec["fsdp"], tensor=spec["tensor"]),
      jax.devices()[:spec["devices"]])
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  sharding.check_batch(batch, mesh, f"the {mesh_name} batch")
  micro = max(micro_batch_size, shards) if micro_batch_size else 0
  if micro and batch % micro:
    raise ValueError(f"micro-batch {micro} does not divide the batch {batch}")

  config = TransformerConfig(**transformer_kwargs(model_name, seq_len, logits_chunk))
  base_model = Transformer(config)
  model = (base_model if mode == "full" else
           lora.lora_model(base_model, lora.LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA)))

  def apply_fn(variables, tokens):
    return model.apply(variables, tokens)

  # What the runs use (`Experiment.score_fn`): log-probs from `Transformer.token_scores`,
  # chunked over positions when `logits_chunk` > 0 (no [N, T, V] logits).
  def score_fn(variables, tokens, targets):
    return model.apply(variables, tokens, targets, method="token_scores")

  # Abstract init without the rules (as `Experiment._init_context` does for LoRA): only the
  # shapes and logical names are wanted.
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  specs = nn.get_partition_spec(boxed)
  params = sharding.unbox(boxed)
  n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  tx = make_optimizer(OptimizerConfig(learning_rate=1e-6, state_dtype="float32"))
  trainable, trainable_fn = n_params, None
  if mode == "lora":
    trainable_fn = lora.is_adapter_path   # differentiated and optimised: the adapters only
    tx = train_only(tx, trainable_fn)
    trainable = int(sum(np.prod(x.shape) for x in jax.tree.leaves(lora.split_params(params)[1])))
  rules = sharding.DEFAULT_RULES
  state, state_sh = _abstract_train_state(params, specs, apply_fn=apply_fn, tx=tx, mesh=mesh,
                                          rules=rules)
  bsh = sharding.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  mask = jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_)
  if step == "grpo":
    pg = PolicyGradientConfig(prompts_per_step=batch // NUM_GENERATIONS,
                              num_generations=NUM_GENERATIONS, kl_coef=KL_COEF,
                              kl_kind="low_var_kl", micro_batch_size=micro)
    ref, ref_sh, reference_params = state.params, state_sh.params, None
    if mode == "lora":   # the reference: the policy's frozen base + the reference's adapters
      ref, ref_sh = lora.split_params(state.params)[1], lora.split_params(state_sh.params)[1]
      reference_params = lambda p, adapters: lora.join_params(lora.split_params(p)[0], adapters)
    rl_state = RLState(policy=state, critic=None, ref_params=ref)
    rl_sh = RLState(policy=state_sh, critic=None, ref_params=ref_sh)
    update = jit_rl_update(make_rl_update_fn(apply_fn, pg, norm_length=seq_len,
                                             reference_params=reference_params,
                                             score_fn=score_fn, trainable=trainable_fn),
                          mesh, rl_sh)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    host_batch = RLBatch(tokens, mask, jax.ShapeDtypeStruct((batch,), jnp.float32), rows, rows)
    args = (rl_state, sharding.abstract_like(host_batch, bsh))
  else:
    update = sharding.jit_sharded(make_sft_update_fn(apply_fn, micro_batch_size=micro,
                                                     score_fn=score_fn, trainable=trainable_fn),
                                  (state_sh, bsh),
                                  sharding.state_and_metrics_shardings(state_sh, mesh),
                                  donate_argnums=0)
    args = (state, sharding.abstract_like(SequenceBatch(tokens, mask), bsh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    report = sharding.compile_report(update, *args)
  total = report["total_bytes"] / GIB
  return dict(
      model=model_name, params=n_params, trainable_params=trainable, mode=mode, step=step,
      mesh=mesh_name, devices=int(report["num_devices"]),
      mesh_shape={k: int(v) for k, v in mesh.shape.items()}, batch=batch,
      micro_batch_size=micro, seq_len=seq_len, logits_chunk=logits_chunk,
      argument_gib=report["argument_bytes"] / GIB, temp_gib=report["temp_bytes"] / GIB,
      output_gib=report["output_bytes"] / GIB, alias_gib=report["alias_bytes"] / GIB,
      total_gib=total, fits_80gb_h100=total <= H100_GIB, fits_16gb_v5e=total <= V5E_GIB,
      compile_s=report["compile_seconds"], same_program_as=None, error=None)


def _program_groups(meshes: list[str]) -> list[list[str]]:
  """Meshes grouped by identical (devices, data, fsdp, tensor): one compile per group."""
  groups: dict[tuple, list[str]] = {}
  for m in meshes:
    s = mesh_spec(m)
    groups.setdefault((s["devices"], s["data"], s["fsdp"], s["tensor"]), []).append(m)
  return list(groups.values())


def _failed_row(model, mode, step, mesh, args, error: str) -> dict:
  spec = mesh_spec(mesh)
  return dict(model=model, params=None, trainable_params=None, mode=mode, step=step, mesh=mesh,
              devices=spec["devices"], mesh_shape=None, batch=args.batch,
              micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
              logits_chunk=args.logits_chunk, argument_gib=None,
              temp_gib=None, output_gib=None, alias_gib=None, total_gib=None,
              fits_80gb_h100=None, fits_16gb_v5e=None, compile_s=None, same_program_as=None,
              error=error)


def _expand(row: dict, group: list[str]) -> list[dict]:
  """The first mesh's row, repeated for the other meshes of its program group."""
  out = [row]
  for other in group[1:]:
    out.append(dict(row, mesh=other, same_program_as=row["mesh"]))
  return out


def _configurations(models, meshes, modes, steps):
  """(model, mode, step, mesh group) in table order; one compile per mesh group."""
  groups = _program_groups(meshes)
  return itertools.product(models, modes, steps, groups)


def _report(new: list[dict]) -> list[dict]:
  """Prints each new row's summary to stderr (progress) and returns the rows."""
  for r in new:
    print(json.dumps({k: r[k] for k in ("model", "mode", "step", "mesh", "total_gib",
                                         "compile_s", "error")}), file=sys.stderr, flush=True)
  return new


def run_in_process(args, models, meshes, modes, steps) -> list[dict]:
  rows = []
  for model, mode, step, group in _configurations(models, meshes, modes, steps):
    try:
      row = compile_one(model, mode, step, group[0], batch=args.batch,
                        micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
                        logits_chunk=args.logits_chunk)
    except Exception as e:  # noqa: BLE001 (recorded in the row, the table goes on)
      if args.strict:
        raise
      row = _failed_row(model, mode, step, group[0], args, f"{type(e).__name__}: {e}")
    rows += _report(_expand(row, group))
  return rows


def run_in_children(args, models, meshes, modes, steps) -> list[dict]:
  """One child process per configuration, killed after `args.timeout_s` seconds."""
  rows = []
  for model, mode, step, group in _configurations(models, meshes, modes, steps):
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "row.json")
      cmd = [sys.executable, os.path.abspath(__file__), "--models", model, "--meshes",
             ",".join(group), "--modes", mode, "--steps", step, "--batch",
             str(args.batch), "--micro_batch_size", str(args.micro_batch_size),
             "--seq_len", str(args.seq_len), "--logits_chunk", str(args.logits_chunk),
             "--json", out, "--timeout_s", "0"]
      t0 = time.perf_counter()
      try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s,
                              stdin=subprocess.DEVNULL)
        if proc.returncode == 0:
          with open(out) as f:
            new = json.load(f)
        else:
          tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
          new = _expand(_failed_row(model, mode, step, group[0], args,
                                    f"exit {proc.returncode}: {tail[0]}"), group)
      except subprocess.TimeoutExpired:
        new = _expand(_failed_row(
            model, mode, step, group[0], args,
            f"skipped: compiling took longer than {args.timeout_s:.0f} s on this CPU "
            f"(killed after {time.perf_counter() - t0:.0f} s)"), group)
    rows += _report(new)
  return rows


def _count(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


def markdown(rows: list[dict]) -> str:
  """A markdown table of the rows (GiB per device), with a note on what the numbers are."""
  head = ("| model | params | mode | step | mesh | devices | arguments GiB | temporaries GiB | "
          "outputs GiB | total GiB | fits H100 80 GB | fits v5e 16 GB | compile s |")
  lines = [head, "|" + "---|" * 13]

  def gib(x):
    return "" if x is None else f"{x:.2f}"

  def yes(x):
    return "" if x is None else ("yes" if x else "no")

  for r in rows:
    params = "" if r["params"] is None else _count(r["params"])
    if r["mode"] == "lora" and r.get("trainable_params"):
      params += f" ({_count(r['trainable_params'])} trained)"
    if r.get("error"):
      compile_s = r["error"]
    elif r.get("same_program_as"):
      compile_s = f"= {r['same_program_as']}"
    else:
      compile_s = f"{r['compile_s']:.0f}"
    lines.append(f"| {r['model']} | {params} | {r['mode']} | {r['step']} | {r['mesh']} | "
                 f"{r['devices']} | {gib(r['argument_gib'])} | {gib(r['temp_gib'])} | "
                 f"{gib(r['output_gib'])} | {gib(r['total_gib'])} | {yes(r['fits_80gb_h100'])} | "
                 f"{yes(r['fits_16gb_v5e'])} | {compile_s} |")
  if rows:
    r = rows[0]
    lines += ["", f"Per-device bytes from XLA's CPU-backend memory analysis of the sharded "
              f"program (ahead-of-time compile on abstract inputs; a proxy for the GPU / TPU "
              f"compilers, not a measurement). Batch {r['batch']} episodes x {r['seq_len']} "
              f"tokens, micro-batch {r['micro_batch_size']}; bf16 params and compute, fp32 "
              f"AdamW state, remat=full, scan_layers; LoRA rank {LORA_RANK} on q/k/v/o/gate/up/"
              f"down. gpu8 and v5e8 are the same fsdp=8 program (`= gpu8`)."]
  return "\n".join(lines) + "\n"


def _devices_needed(meshes: list[str]) -> int:
  return max(mesh_spec(m)["devices"] for m in meshes)


def _set_device_count(n: int) -> None:
  """Fake `n` CPU devices: must run before jax is imported."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", "")).strip()
  if "xla_backend_optimization_level" not in flags:
    # LLVM's optimisation of the CPU code: about half the compile time, and no effect on the
    # memory analysis (buffers are assigned on the optimised HLO, before code generation).
    flags += " --xla_backend_optimization_level=0"
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _split(value: str, known, what: str, parser) -> list[str]:
  items = [s.strip() for s in value.split(",") if s.strip()]
  for s in items:
    if s not in known:
      parser.error(f"--{what} takes {','.join(known)}, got {s!r}")
  return items


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None, help="write the rows to this file too")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--meshes", default="gpu8,v5e8")
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--steps", default=",".join(STEPS))
  parser.add_argument("--batch", type=int, default=64, help="episodes per step (B x G)")
  parser.add_argument("--micro_batch_size", type=int, default=8,
                      help="episodes per micro-batch (0: the whole batch at once)")
  parser.add_argument("--seq_len", type=int, default=4096, help="tokens per episode")
  parser.add_argument("--logits_chunk", type=int, default=LOGITS_CHUNK,
                      help="positions per output-head chunk (0: whole-sequence logits)")
  parser.add_argument("--timeout_s", type=float, default=0.0,
                      help="> 0: compile each configuration in a child process and skip it "
                           "(a row with `error`) when it takes longer")
  parser.add_argument("--strict", action="store_true", help="raise instead of recording errors")
  parser.add_argument("--markdown", action="store_true",
                      help="print a markdown table instead of the JSON rows")
  parser.add_argument("--from_json", default=None,
                      help="render the rows of an earlier --json file (compiles nothing)")
  parser.add_argument("--smoke", action="store_true",
                      help="a tiny model (d=128, 2 layers, vocab 512) on gpu8, 64 tokens, "
                           "batch 16 in micro-batches of 8 (seconds)")
  args = parser.parse_args(argv)

  if args.from_json:
    with open(args.from_json) as f:
      rows = json.load(f)
  else:
    if args.smoke:
      models, meshes = ["smoke"], _split(args.meshes if args.meshes != "gpu8,v5e8" else "gpu8",
                                         MESHES, "meshes", parser)
      if args.seq_len == parser.get_default("seq_len"):
        args.seq_len = 64
      if args.batch == parser.get_default("batch"):
        args.batch = 16
    else:
      models = _split(args.models, MODELS, "models", parser)
      meshes = _split(args.meshes, MESHES, "meshes", parser)
    modes = _split(args.modes, MODES, "modes", parser)
    steps = _split(args.steps, STEPS, "steps", parser)
    if args.batch % NUM_GENERATIONS:
      parser.error(f"--batch must be a multiple of G = {NUM_GENERATIONS}, got {args.batch}")
    if args.timeout_s > 0:
      rows = run_in_children(args, models, meshes, modes, steps)
    else:
      if "jax" not in sys.modules:
        _set_device_count(_devices_needed(meshes))
      rows = run_in_process(args, models, meshes, modes, steps)
    import jax  # noqa: PLC0415  (after the device count is set)
    for r in rows:
      r.update(smoke=args.smoke, jax_version=jax.__version__, backend="cpu (AOT proxy)")
  text = json.dumps(rows, indent=1)
  if args.json and not args.from_json:
    with open(args.json, "w") as f:
      f.write(text + "\n")
  print(markdown(rows) if args.markdown else text)
  return rows


if __name__ == "__main__":
  main()
