"""Device meshes and the one logical-axis rules table.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`norm`), activations `batch`, `length`; `DEFAULT_RULES` maps them onto the mesh axes
`('data', 'fsdp', 'tensor')`. Batches are split over `data` x `fsdp`, parameters over `fsdp`
(their `embed` dimension) and `tensor` (heads, MLP, vocabulary). On one device every rule is
trivially satisfied, so the same code runs from a laptop CPU to a pod.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
                     f"shards cannot split evenly: make it a multiple of {shards}")


def shard_batch(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places every array of `tree` (leading axis = rows) on the mesh, split over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)
