"""Device meshes, the one logical-axis rules table, sharded init / update steps, AOT checks, MFU.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`norm`), activations `batch`, `length`; `DEFAULT_RULES` maps them onto the mesh axes
`('data', 'fsdp', 'tensor')`. Batches are split over `data` x `fsdp`, parameters over `fsdp`
(their `embed` dimension) and `tensor` (heads, MLP, vocabulary). On one device every rule is
trivially satisfied, so the same code runs from a laptop CPU to a pod.

The scaling path is JAX's own (what used to be pjit):
  - `sharded_init`: abstract shapes (`jax.eval_shape`) -> logical specs -> `NamedSharding`s ->
    `jax.jit(init_fn, out_shardings=...)`, so parameters AND optimizer state are created
    already split over the devices, never whole on one of them;
  - `jit_sharded`: `jax.jit` with explicit in/out shardings and buffer donation for the update
    steps (`state_and_metrics_shardings` builds the usual `(state, metrics)` out shardings);
  - `constrain`: activation sharding constraints by logical names (`nn.with_logical_constraint`,
    a no-op outside `nn.logical_axis_rules`);
  - `assert_sharded`: fails when a large parameter ended up fully replicated;
  - `compile_report`: ahead-of-time `lower(...).compile()` on `jax.ShapeDtypeStruct` inputs,
    giving per-device memory (`memory_analysis()`) and FLOPs (`cost_analysis()`);
  - `PEAK_FLOPS`, `peak_flops`, `mfu`, `transformer_flops_per_token`, `cpu_peak_flops`,
    `measure_cpu_peak_flops`: model FLOPs utilisation.

MFU = model FLOPs per token x tokens per second / (peak FLOP/s per device x devices). Model
FLOPs count the matmuls a perfect implementation must do (`transformer_flops_per_token`, the
PaLM accounting: 6N + 12 L H hd T for training), not what XLA executed (rematerialisation and
padding do not raise MFU).

Example:
  >>> mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  >>> tx = optax.adamw(1e-3)
  >>> def init_fn(rng):   # boxed params (nn.Partitioned leaves) -> the optimizer state is boxed too
  ...   params = model.init(rng, jnp.zeros((8, 16), jnp.int32))["params"]
  ...   return TrainState.create(apply_fn=apply_fn, params=params, tx=tx)
  >>> state, state_sh = sharded_init(init_fn, jax.random.key(0), mesh)
  >>> assert_sharded(state.params, min_size=2**16)
  >>> update = jit_sharded(make_sft_update_fn(apply_fn), (state_sh, batch_sharding(mesh)),
  ...                      state_and_metrics_shardings(state_sh, mesh), donate_argnums=0)
  >>> with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
  ...   report = compile_report(update, abstract_like(state), abstract_like(batch))
  ...   state, metrics = update(state, shard_batch(batch, mesh))
  >>> mfu(transformer_flops_per_token(model.config, 256), tokens_per_s,
  ...     jax.devices()[0].device_kind, jax.device_count())
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsearch.train.state import TrainState
from jaxsearch.types import PyTree

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),                 # the stacked axis of scan-over-layers parameters
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """Mesh shape over `('data', 'fsdp', 'tensor')`; one entry may be -1 (all remaining devices).

  Attributes:
    data: data-parallel replicas.
    fsdp: data parallelism with parameters and optimizer state sharded.
    tensor: tensor parallelism (heads, MLP and vocabulary split).
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = (self.data, self.fsdp, self.tensor)
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
      raise ValueError(f"MeshConfig sizes must be positive with at most one -1, got "
                       f"data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}")

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} "
                         "devices: choose sizes whose product divides the device count")
      sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} devices "
                       f"but {num_devices} are available: make the product equal the count, or "
                       "use -1 for one axis")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with Auto axis types (Explicit, jax's new default, breaks ordinary model code)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = config.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def param_shardings(logical_specs: PyTree, mesh: Mesh, rules=DEFAULT_RULES) -> PyTree:
  """NamedShardings for parameters from their logical partition specs."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over `data` x `fsdp`, everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(rows: int, mesh: Mesh, what: str) -> None:
  """Raises a ValueError naming `what` when `rows` does not split over the batch axes."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if rows % shards:
    raise ValueError(f"{what} has {rows} rows, which the mesh's data x fsdp = {shards} "
                     f"shards cannot split evenly: make it a multiple of {shards}, or choose "
                     "MeshConfig.data / MeshConfig.fsdp whose product divides it")


def shard_batch(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places every array of `tree` (leading axis = rows) on the mesh, split over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


# ---------------------------------------------------------------------------------------------
# Sharded initialisation and update steps.


def unbox(tree: PyTree) -> PyTree:
  """Strips `nn.Partitioned` boxes without applying their sharding constraints."""
  return jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x, tree,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def tree_shardings(boxed: PyTree, mesh: Mesh, rules=DEFAULT_RULES) -> PyTree:
  """NamedShardings for every array leaf of a (possibly abstract) boxed tree.

  Leaves boxed in `nn.Partitioned` (flax's `with_logical_partitioning`) get their logical names
  mapped through `rules`; plain array leaves (step counters, ...) are replicated. The result has
  the structure of `unbox(boxed)`.

  Example:
    >>> abstract = jax.eval_shape(model.init, rng, tokens)["params"]
    >>> shardings = tree_shardings(abstract, mesh)   # {"embed": {"embedding": NamedSharding}}
  """
  return param_shardings(nn.get_partition_spec(boxed), mesh, rules)


# Compiler options of a jitted parameter init that rounds exactly as op-by-op execution: the
# algebraic simplifier reassociates initialisers' scalings (`(x * a) * b` -> `x * (a * b)`),
# which moves parameters by an ulp and, through training, every later figure.
EXACT_INIT_OPTIONS = {"xla_disable_hlo_passes": "algsimp"}


def sharded_init(init_fn: Callable[[jax.Array], PyTree], rng: jax.Array, mesh: Mesh,
                 rules=DEFAULT_RULES) -> tuple[PyTree, PyTree]:
  """Runs `init_fn(rng)` so that every output array is created already sharded.

  `jax.eval_shape` gives the abstract output (no FLOPs, no memory); its `nn.Partitioned` boxes
  give logical specs, `rules` turn them into `NamedSharding`s, and `jax.jit(init_fn,
  out_shardings=...)` materialises each device's shard only. Build a `TrainState` from BOXED
  parameters (`model.init(...)["params"]` as is): optax maps the optimizer state over the
  parameter tree, so Adam's moments inherit the boxes and hence the parameters' shardings;
  counters are replicated. The returned state is unboxed (plain arrays).

  The init batch inside `init_fn` passes the model's activation constraints: give it a row
  count divisible by `data` x `fsdp` (e.g. `check_batch`).

  Args:
    init_fn: `rng -> pytree` whose leaves are arrays or `nn.Partitioned` boxes of arrays
      (params, a `TrainState`, ...). Static pytree fields (apply_fn, tx) are kept.
    rng: a PRNG key.
    mesh: the device mesh.
    rules: the logical-axis rules table.

  Returns:
    `(state, shardings)`: the unboxed output, each leaf a `jax.Array` with its NamedSharding,
    and the NamedSharding tree (same structure), ready for `jit_sharded`'s in/out shardings.

  Example:
    >>> def init_fn(rng):
    ...   params = model.init(rng, jnp.zeros((8, 16), jnp.int32))["params"]
    ...   return TrainState.create(apply_fn=apply_fn, params=params, tx=optax.adamw(1e-3))
    >>> state, shardings = sharded_init(init_fn, jax.random.key(0), mesh)
    >>> state.opt_state[0].mu["embed"]["embedding"].sharding == state.params[...].sharding
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init_fn, rng)
    shardings = tree_shardings(abstract, mesh, rules)
    state = jax.jit(lambda key: unbox(init_fn(key)), out_shardings=shardings)(rng)
  return state, shardings



def sharded_abstract(init_fn: Callable[[jax.Array], PyTree], rng: jax.Array, mesh: Mesh,
                     rules=DEFAULT_RULES) -> tuple[PyTree, PyTree]:
  """What `sharded_init` would create, as `jax.ShapeDtypeStruct`s with shardings (no compute).

  The target of a checkpoint restore onto `mesh` (any mesh: orbax reads each device's slice),
  or the abstract inputs of `compile_report`.

  Returns:
    `(abstract, shardings)`: the unboxed abstract tree and its NamedSharding tree.

  Example:
    >>> target, _ = sharded_abstract(init_fn, jax.random.key(0), mesh4)
    >>> tree, meta = Checkpointer(path).restore(step, {"params": target.params, ...})
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_fn, rng)
    shardings = tree_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          unbox(boxed), shardings)
  return abstract, shardings


def sharded_train_state(params: PyTree, specs: PyTree, *, apply_fn: Callable,
                        tx: optax.GradientTransformation, mesh: Mesh, rules=DEFAULT_RULES,
                        ) -> tuple[TrainState, PyTree]:
  """A `TrainState` over existing parameters, optimizer state born with their shardings.

  For parameters that already exist with their logical specs (`Experiment.init_params`, a
  converted checkpoint, the PPO critic's copied trunk): the parameters are placed with
  `param_shardings(specs)`, then the optimizer state is created inside a jit whose
  `out_shardings` give every param-shaped optimizer leaf (Adam's moments, momentum) its
  parameter's sharding; counters are replicated. (`jax.jit(tx.init)(params)` alone would put
  it on one device.)

  Args:
    params: the unboxed parameter tree (host or device arrays).
    specs: its logical PartitionSpecs (`nn.get_partition_spec` of the boxed tree).
    apply_fn: the state's apply function.
    tx: the optimizer.
    mesh: the device mesh.
    rules: the logical-axis rules table.

  Returns:
    `(state, shardings)`: the sharded state and its NamedSharding tree.

  Example:
    >>> params, specs = exp.init_params(rng)
    >>> state, state_sh = sharded_train_state(params, specs, apply_fn=exp.apply_fn, tx=tx,
    ...                                       mesh=mesh)
  """
  p_sh = param_shardings(specs, mesh, rules)
  params = jax.device_put(params, p_sh)

  def create(p):
    boxed = jax.tree.map(lambda s, x: nn.Partitioned(x, names=tuple(s)), specs, p,
                         is_leaf=lambda s: isinstance(s, P))
    return TrainState.create(apply_fn=apply_fn, params=boxed, tx=tx)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = tree_shardings(jax.eval_shape(create, params), mesh, rules)
    state = jax.jit(lambda p: unbox(create(p)), in_shardings=(p_sh,),
                    out_shardings=shardings)(params)
  return state, shardings

def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a whole copy on every device (scalars, metrics)."""
  return NamedSharding(mesh, P())


def state_and_metrics_shardings(state_shardings: PyTree, mesh: Mesh) -> tuple[PyTree, Any]:
  """Out shardings of an update step `(state, metrics)`: the state's own, metrics replicated."""
  return state_shardings, replicated(mesh)


def jit_sharded(fn: Callable, in_shardings: Any, out_shardings: Any,
                donate_argnums: int | Sequence[int] = ()) -> Callable:
  """`jax.jit` with explicit shardings and donation: the update steps' one way to compile.

  A sharding may stand for a whole subtree (a prefix), e.g. `batch_sharding(mesh)` for a
  batch NamedTuple whose fields all have rows first, or `replicated(mesh)` for a metrics dict.
  Donated arguments (the train state) are overwritten in place, so the step holds one copy of
  the parameters and optimizer state, not two; do not reuse a donated input.

  Args:
    fn: a pure function.
    in_shardings: a sharding (prefix) tree per positional argument, as a tuple.
    out_shardings: a sharding (prefix) tree of the output.
    donate_argnums: positions of arguments whose buffers the output may reuse.

  Returns:
    The jitted function (`.lower(...)` works on `jax.ShapeDtypeStruct`s, see `compile_report`).

  Example:
    >>> update = jit_sharded(make_policy_update_fn(apply_fn, PolicyGradientConfig()),
    ...                      (state_sh, batch_sharding(mesh)),
    ...                      state_and_metrics_shardings(state_sh, mesh), donate_argnums=0)
  """
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                 donate_argnums=donate_argnums)


def constrain(x: PyTree, logical_axes: PyTree) -> PyTree:
  """Activation sharding constraint by logical axis names (`nn.with_logical_constraint`).

  Inside a jitted function, under `nn.logical_axis_rules(rules)` and `jax.set_mesh(mesh)`, it
  tells the partitioner how `x` must be laid out at this point (e.g. the residual stream
  `("batch", "length", "embed")`: rows over data x fsdp, the model dimension over fsdp under
  DEFAULT_RULES); without rules it returns `x` unchanged, so model code calls it freely.
  Names a rule maps to `None` (`length`, `head_dim`) leave that dimension replicated.

  Args:
    x: an array (or pytree of arrays).
    logical_axes: one logical name (or None) per dimension, e.g. `("batch", "length", "mlp")`.

  Returns:
    `x`, constrained.

  Example:
    >>> h = constrain(h, ("batch", "length", "mlp"))   # [B, T, F]: F split over `tensor`
  """
  return nn.with_logical_constraint(x, logical_axes)


def abstract_like(tree: PyTree, shardings: PyTree | None = None) -> PyTree:
  """`jax.ShapeDtypeStruct`s (with shardings) for `tree`, the inputs of an AOT compile.

  Args:
    tree: arrays (their own shardings are kept) or ShapeDtypeStructs.
    shardings: optional sharding (prefix) tree overriding them, e.g. `batch_sharding(mesh)`.

  Example:
    >>> abstract_like(batch, batch_sharding(mesh))   # no data moved
  """
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
  leaves, treedef = jax.tree.flatten(tree)
  shard_leaves = treedef.flatten_up_to(_broadcast_prefix(shardings, tree))
  return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                                      for x, s in zip(leaves, shard_leaves)])


def _broadcast_prefix(prefix: PyTree, tree: PyTree) -> PyTree:
  """Expands a sharding prefix tree to the full structure of `tree`."""
  return jax.tree.map(
      lambda s, sub: jax.tree.map(lambda _: s, sub), prefix, tree,
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


# ---------------------------------------------------------------------------------------------
# Compile-time checks.


def _path_name(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def assert_sharded(params: PyTree, shardings: PyTree | None = None, *, min_size: int = 2**20,
                   mesh: Mesh | None = None, axes: Sequence[str] = ("fsdp", "tensor")) -> None:
  """Raises when a large parameter is fully replicated although the mesh could split it.

  A parameter with more than `min_size` elements must be sharded whenever the mesh's
  parameter axes (`axes`, `fsdp` x `tensor` by default) span more than one device; a pure
  data-parallel mesh (data = all devices) replicates parameters by design and passes.

  Args:
    params: the parameter tree (`jax.Array`s, or `jax.ShapeDtypeStruct`s with `shardings`).
    shardings: the sharding tree to check; None reads each array's own `.sharding`.
    min_size: parameters with at most this many elements may stay replicated.
    mesh: the mesh (needed only when a sharding is not a `NamedSharding`, e.g. a parameter
      left on one device, which counts as unsharded).
    axes: the mesh axes parameters are split over.

  Raises:
    ValueError: naming every offending parameter path, its shape and sharding.

  Example:
    >>> assert_sharded(state.params, min_size=2**16)
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  if shardings is None:
    shards = [getattr(x, "sharding", None) for _, x in leaves]
  else:
    shards = jax.tree.structure(params).flatten_up_to(_broadcast_prefix(shardings, params))
  bad = []
  for (path, x), s in zip(leaves, shards):
    size = math.prod(x.shape)
    if size <= min_size:
      continue
    m = s.mesh if isinstance(s, NamedSharding) else mesh
    if m is None:
      raise ValueError(f"parameter {_path_name(path)} has sharding {s}, not a NamedSharding: "
                       "pass the mesh")
    candidates = math.prod(m.shape[a] for a in axes if a in m.shape)
    if candidates > 1 and (s is None or s.is_fully_replicated):
      spec = s.spec if isinstance(s, NamedSharding) else s
      bad.append(f"{_path_name(path)} {tuple(x.shape)} ({spec})")
  if bad:
    raise ValueError(
        f"parameters with more than {min_size} elements are fully replicated although the "
        f"mesh axes {tuple(axes)} span more than one device: {'; '.join(bad)}. Give them "
        "logical axis names the rules map to fsdp/tensor (and dimensions those axes divide), "
        "or raise min_size")


def compile_report(jitted_fn: Callable, *abstract_args, **abstract_kwargs) -> dict[str, Any]:
  """Compiles `jitted_fn` ahead of time on abstract inputs; memory per device and FLOPs.

  Nothing runs and no input buffer is allocated: `jitted_fn.lower(*abstract_args).compile()`
  on `jax.ShapeDtypeStruct`s (with shardings, see `abstract_like`) is enough to know whether a
  step fits and what it costs before a run starts. XLA reports the SPMD-partitioned program,
  so every figure is for ONE device (one shard of the work).

  Args:
    jitted_fn: a `jax.jit` (e.g. `jit_sharded`) function.
    *abstract_args: its positional arguments as `jax.ShapeDtypeStruct` pytrees (concrete
      arrays work too).
    **abstract_kwargs: keyword arguments, likewise.

  Returns:
    A dict of floats: `flops_per_device` and `bytes_accessed_per_device` (XLA's
    `cost_analysis()`; -1 where the backend gives none); `argument_bytes`, `output_bytes`,
    `alias_bytes` (outputs written into donated inputs), `temp_bytes`,
    `generated_code_bytes` and `total_bytes` (argument + output - alias + temp + code) per
    device from `memory_analysis()`; `peak_bytes` where XLA gives it; `num_devices`;
    `compile_seconds`.

  Example:
    >>> report = compile_report(update, abstract_like(state), abstract_like(batch, bsh))
    >>> report["total_bytes"] / 2**30   # GiB per device
  """
  t0 = time.perf_counter()
  compiled = jitted_fn.lower(*abstract_args, **abstract_kwargs).compile()
  report: dict[str, Any] = {"compile_seconds": time.perf_counter() - t0}
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  cost = cost or {}
  report["flops_per_device"] = float(cost.get("flops", -1.0))
  report["bytes_accessed_per_device"] = float(cost.get("bytes accessed", -1.0))
  mem = compiled.memory_analysis()
  fields = {"argument_bytes": "argument_size_in_bytes", "output_bytes": "output_size_in_bytes",
            "alias_bytes": "alias_size_in_bytes", "temp_bytes": "temp_size_in_bytes",
            "generated_code_bytes": "generated_code_size_in_bytes"}
  for key, attr in fields.items():
    report[key] = float(getattr(mem, attr, 0) or 0) if mem is not None else -1.0
  report["total_bytes"] = (report["argument_bytes"] + report["output_bytes"]
                           - report["alias_bytes"] + report["temp_bytes"]
                           + report["generated_code_bytes"])
  peak = getattr(mem, "peak_memory_in_bytes", None)
  if peak:
    report["peak_bytes"] = float(peak)
  devices = set()
  for s in jax.tree.leaves(compiled.input_shardings) + jax.tree.leaves(compiled.output_shardings):
    if isinstance(s, jax.sharding.Sharding):
      devices |= set(s.device_set)
  report["num_devices"] = float(max(len(devices), 1))
  return report


# ---------------------------------------------------------------------------------------------
# Model FLOPs utilisation.

# Dense bf16 peak FLOP/s per device (one JAX device: a TPU chip, a GPU), from the vendors' data
# sheets. `peak_flops` matches a device's `device_kind` to the longest key it starts with.
# TPU device kinds: v4 "TPU v4"; v5e "TPU v5 lite"; v5p "TPU v5" (some runtimes "TPU v5p");
# v6e "TPU v6 lite". GPUs: "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200", ...
# A CPU is not in the table: `peak_flops("cpu")` is `cpu_peak_flops()`, this host's float32
# peak (CPUs have no fast bf16 path) worked out from the cores this process may use, their
# vector units and clock (and never below what a matmul probe measures here). It is the
# figure for the whole host: fake CPU devices (`--xla_force_host_platform_device_count`)
# share the same cores, so pass num_devices=1 per host to `mfu` on CPU.
# The fixed figure used before (1024 x 1024 float32 matmuls, best of 5, on the project's
# 2-core development machine while shared with other jobs); kept for the benchmark's
# comparison. A quiet 2-core machine beats it (the quickstart's SFT logged mfu=1.43).
CPU_MEASURED_PEAK_FLOPS = 1.0e11
PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,          # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,               # v5p reports "TPU v5"
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,          # v6e (Trillium)
    "NVIDIA A100": 312e12,          # SXM and PCIe alike
    "NVIDIA H100": 989e12,          # SXM ("NVIDIA H100 80GB HBM3")
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA H200": 989e12,          # same tensor cores as the H100 SXM, more and faster HBM
    "NVIDIA H200 NVL": 835e12,
}


def cpu_cores() -> int:
  """CPU cores this process may run on: its affinity mask (else `os.cpu_count()`), capped by
  a cgroup v2 CPU quota (a container's `--cpus`)."""
  try:
    cores = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    cores = os.cpu_count() or 1
  try:
    with open("/sys/fs/cgroup/cpu.max") as f:
      quota, period = f.read().split()[:2]
    if quota != "max":
      cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
  except (OSError, ValueError):
    pass
  return max(cores, 1)


def cpu_flops_per_cycle(flags: Sequence[str], machine: str = "x86_64") -> int:
  """Peak float32 FLOPs per cycle of one core, from its instruction-set flags: two fused
  multiply-add pipes of the widest vector unit (AVX-512: 2 x 16 x 2 = 64; AVX2 + FMA: 32;
  AVX without FMA, one add and one multiply pipe of 8 lanes: 16; SSE: 8; Arm NEON: 2 x 4 x 2 =
  16). An upper bound: a core with a single AVX-512 pipe reaches half.

  Example:
    >>> cpu_flops_per_cycle(["sse2", "avx", "avx2", "fma"])
    32
  """
  flags = {f.lower() for f in flags}
  if machine.lower() in ("aarch64", "arm64"):
    return 16
  if "avx512f" in flags:
    return 64
  if "avx2" in flags and "fma" in flags:
    return 32
  if "avx" in flags:
    return 16
  return 8


def _cpuinfo() -> tuple[list[str], float]:
  """(instruction-set flags, clock in GHz) of this host; ([], 0) where unknown."""
  flags, mhz = [], 0.0
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
          flags = value.split()
        elif key == "cpu mhz":
          mhz = max(mhz, float(value))
  except (OSError, ValueError):
    pass
  try:   # the maximum (boost) clock, where the kernel exposes it
    with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
      mhz = max(mhz, int(f.read()) / 1e3)
  except (OSError, ValueError):
    pass
  return flags, mhz / 1e3


def theoretical_cpu_peak_flops(cores: int | None = None, ghz: float | None = None,
                               flops_per_cycle: int | None = None) -> float:
  """cores x float32 FLOPs per cycle per core x clock: this host's float32 peak FLOP/s
  (arguments left None are read from the host; an unknown clock counts as 3 GHz).

  Example:
    >>> theoretical_cpu_peak_flops(cores=2, ghz=2.5, flops_per_cycle=32)   # 1.6e11
  """
  flags, host_ghz = _cpuinfo()
  cores = cpu_cores() if cores is None else cores
  ghz = (host_ghz or 3.0) if ghz is None else ghz
  if flops_per_cycle is None:
    flops_per_cycle = cpu_flops_per_cycle(flags, platform.machine())
  return float(cores * flops_per_cycle * ghz * 1e9)


@functools.cache
def cpu_peak_flops() -> float:
  """This host's float32 peak FLOP/s, the denominator of MFU on CPU (`peak_flops("cpu")`).

  `theoretical_cpu_peak_flops()` (the cores this process may use, their vector units, the
  clock the kernel reports), raised to what a 1024 x 1024 matmul probe measures
  (`measure_cpu_peak_flops`) if that is higher, e.g. a boost clock above the reported one.
  Worked out once per process (the probe takes well under a second).
  """
  return max(theoretical_cpu_peak_flops(), measure_cpu_peak_flops(n=1024, repeats=3))


def peak_flops(device_kind: str) -> float:
  """Peak dense bf16 FLOP/s of one device of `device_kind` (`jax.devices()[0].device_kind`);
  for "cpu", this host's float32 peak (`cpu_peak_flops`).

  Raises:
    ValueError: an unknown device kind (pass `peak=` to `mfu`, or add it to `PEAK_FLOPS`).

  Example:
    >>> peak_flops("NVIDIA H100 80GB HBM3")   # 989e12
  """
  kind = device_kind.strip().lower()
  if kind == "cpu":
    return cpu_peak_flops()
  matches = [k for k in PEAK_FLOPS if kind == k.lower() or kind.startswith(k.lower() + " ")
             or kind.startswith(k.lower() + "-")]
  if not matches:
    raise ValueError(f"no peak FLOP/s known for device kind {device_kind!r}; known: "
                     f"{sorted([*PEAK_FLOPS, 'cpu'])} (pass peak= explicitly)")
  return PEAK_FLOPS[max(matches, key=len)]


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
  """FLOP/s of a jitted `n x n` matmul on the first CPU device, best of `repeats`.

  An achievable rate of XLA's CPU matmul on this host (float32), which `cpu_peak_flops`
  never goes below. It takes well under a second at n=1024.

  Returns:
    2 n^3 / (best seconds per matmul).

  Example:
    >>> measure_cpu_peak_flops()   # ~1e11 on 2 cores
  """
  device = jax.devices("cpu")[0]
  x = jax.device_put(jnp.ones((n, n), dtype), device)
  y = jax.device_put(jnp.full((n, n), 0.5, dtype), device)
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(x, y).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(x, y).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def transformer_flops_per_token(config, seq_len: int, *, backward: bool = True) -> float:
  """Model FLOPs per token of a decoder (`models.transformer.TransformerConfig`).

  PaLM's accounting (Chowdhery et al. 2022, appendix B): every weight of a matmul costs 2
  FLOPs per token forward and 4 backward, so 6N for training, with N the matmul weights

    N = L (D H hd + 2 D Hkv hd + H hd D + 3 D F) + D V
        (q, k, v, o projections, SwiGLU gate / up / down; output head, tied or not; the
        embedding lookup and the norms are not matmuls);

  attention scores and the weighted sum add 2 x 2 H hd T forward per token per layer (each
  query against all T positions; PaLM counts the full T, not the causal half), 3x that for
  training: 12 L H hd T. Total: 6N + 12 L H hd T (training), 2N + 4 L H hd T (forward only,
  `backward=False`, e.g. a prefill).

  Args:
    config: a TransformerConfig (uses vocab_size, d_model, num_layers, num_heads,
      num_kv_heads, hd, mlp_dim).
    seq_len: T, the sequence length the attention term uses.
    backward: training (forward + backward) or forward only.

  Returns:
    FLOPs per token (float).

  Example:
    >>> transformer_flops_per_token(TransformerConfig(vocab_size=64, d_model=32, num_layers=2,
    ...                             num_heads=4, num_kv_heads=2, mlp_dim=64), seq_len=16)
  """
  d, h, hkv, hd = config.d_model, config.num_heads, config.num_kv_heads, config.hd
  per_layer = d * h * hd + 2 * d * hkv * hd + h * hd * d + 3 * d * config.mlp_dim
  n = config.num_layers * per_layer + d * config.vocab_size
  attention = 4.0 * config.num_layers * h * hd * seq_len
  return (6.0 * n + 3.0 * attention) if backward else (2.0 * n + attention)


def mfu(model_flops_per_token: float, tokens_per_s: float, device_kind: str,
        num_devices: int, *, peak: float | None = None) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak.

    MFU = model_flops_per_token * tokens_per_s / (peak_flops(device_kind) * num_devices)

  Args:
    model_flops_per_token: e.g. `transformer_flops_per_token(config, T)`.
    tokens_per_s: tokens the step processes per second (all devices together).
    device_kind: `jax.devices()[0].device_kind`.
    num_devices: devices doing the work (on CPU: hosts, see `PEAK_FLOPS`).
    peak: per-device peak FLOP/s overriding the table.

  Returns:
    A fraction in [0, 1] for a sound measurement.

  Example:
    >>> mfu(6 * 124e6, 1.0e5, "NVIDIA H100 80GB HBM3", 1)   # 0.075
  """
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices}")
  per_device = peak_flops(device_kind) if peak is None else peak
  return model_flops_per_token * tokens_per_s / (per_device * num_devices)
