"""LoRA adapters for the policy `Transformer`, through qwix (Google's JAX LoRA library).

LoRA (Hu et al. 2021) freezes every weight `W` of a projection and learns a low-rank update,
`y = x W + (alpha / rank) * (x A) B`, with `A` random and `B` zero at the start, so the LoRA model
is exactly the base model until the first update. Only `A` and `B` are trained and kept in the
optimizer state; the frozen base tree is shared by the policy and the KL reference (no second
copy of the weights).

How it is built: `qwix.apply_lora_to_model` (qwix 0.1.8) re-classes a linen module so that,
while it runs, `jnp.einsum` / `lax.dot_general` calls on a parameter of a module whose path
matches a `qwix.LoraRule` gain the low-rank term, and the module gets two new parameters
`{name}_lora_a` / `{name}_lora_b` beside the weight (created by the usual linen init, with the
weight's logical axis names carried over, `None` on the rank axis). Two things are adapted here:

- qwix's linen einsum path stores a debug string on the module (`setattr(module,
  "kernel_lora_einsum_str", ...)`), which a linen module refuses outside `setup`
  (`SetAttributeFrozenModuleError`), so every `nn.Einsum` (q/k/v/o projections) failed.
  `_LinenLoraProvider.einsum` is qwix's own einsum LoRA without that line, built from qwix's
  helpers (`_parse_einsum_str_for_lora`, `_get_or_create_lora_params`), hence the exact pin.
  The MLP's `nn.Dense` layers use qwix's `dot_general` path unchanged.
- qwix intercepts named methods of the class. The codebase calls `model.apply(...,
  method=Transformer.decode)` (the base class's function, which skips an intercepted
  `decode`), so the interception is placed on `Transformer._hidden` and `Transformer._logits`,
  the trunk and output head every entry point (`__call__`, `decode`, `hidden_states`) runs
  through.

Parameter tree: the base tree plus, per target module (shapes for the defaults; `r` = rank),

  layers_{i}/attn/q_proj/kernel_lora_a    [D, r]          kernel_lora_b  [r, H, hd]
  layers_{i}/attn/{k,v}_proj/kernel_lora_a [D, r]         kernel_lora_b  [r, Hkv, hd]
  layers_{i}/attn/o_proj/kernel_lora_a    [H, hd, r]      kernel_lora_b  [r, D]
  layers_{i}/mlp/{gate,up}_proj/kernel_lora_a [D, r]      kernel_lora_b  [r, F]
  layers_{i}/mlp/down_proj/kernel_lora_a  [F, r]          kernel_lora_b  [r, D]
  lm_head/kernel_lora_a                   [D, r]          kernel_lora_b  [r, V]  (untied only)

(with `scan_layers=True` the same under `layers/block/...` with a leading `layers` axis of L).
`A @ B` (contracting the rank axis) has the kernel's layout, so `merge_lora` adds
`alpha / rank * A @ B` to each kernel and gives a plain `Transformer` tree.

Limits: `LoraConfig.dropout > 0` is qwix's LoRA dropout, active on every call (no
deterministic switch): evaluate with a `dropout=0` copy of the config. QLoRA (qwix's
`LoraRule.weight_qtype`) is not wired: qwix wants the base tree pre-quantized with
`qwix.quantize_params` (kernels become `{qvalue, scale}`), which `merge_lora`, `lora_specs` and
the checkpoint code do not handle; fed float kernels it raises "feeding an unquantized param".

Example:
  >>> model = Transformer(TransformerConfig(vocab_size=64, d_model=32, num_layers=2))
  >>> base = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  >>> cfg = LoraConfig(rank=8, alpha=16.0)
  >>> lora = lora_model(model, cfg)
  >>> adapters = init_adapters(lora, base, jax.random.key(1))        # only A and B
  >>> tx = optax.adamw(1e-4); opt_state = tx.init(adapters)           # adapters only
  >>> def loss_fn(adapters, base, tokens):
  ...   logits = lora.apply({"params": join_params(base, adapters)}, tokens)
  ...   ref_logits = model.apply({"params": base}, tokens)            # KL reference: the base
  ...   ...
  >>> grads = jax.grad(loss_fn)(adapters, base, tokens)              # base receives nothing
  >>> save_hf_checkpoint(model, merge_lora(join_params(base, adapters), cfg), "out/")
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from flax import traverse_util
from qwix._src.providers import lora as _qwix_lora
from qwix._src.providers import ptq as _qwix_ptq
from qwix._src.utils import flax_util as _qwix_flax_util

from jaxsearch.models.transformer import Transformer

PyTree = Any

# Module names of the Transformer whose kernels may carry an adapter (`lm_head`: untied only).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "lm_head")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# The Transformer methods every entry point runs through (see the module docstring): the trunk
# and the output head.
_INTERCEPTED_METHODS = ("_hidden", "_logits")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """Rank, scale and placement of LoRA adapters.

  Attributes:
    rank: r, the inner dimension of `A [in, r]` and `B [r, out]`; >= 1.
    alpha: the update is scaled by `alpha / rank`; > 0.
    targets: module names that get an adapter, from `TARGETS` (`lm_head` exists only when
      the model's embeddings are untied).
    dropout: probability of zeroing an input of the low-rank branch (qwix's LoRA dropout,
      the base branch sees the input unchanged); in [0, 1). When > 0 the LoRA model applies it
      on EVERY call and needs `rngs={"dropout": key}`: for sampling or evaluation build a second
      model with `dataclasses.replace(config, dropout=0.0)`; it takes the same parameters.

  Example:
    >>> LoraConfig(rank=16, alpha=32.0, targets=("q_proj", "v_proj"))
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  dropout: float = 0.0

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoraConfig.rank must be an int >= 1, got {self.rank!r}")
    if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
        or not math.isfinite(self.alpha) or self.alpha <= 0):
      raise ValueError(f"LoraConfig.alpha must be a finite number > 0, got {self.alpha!r}")
    if isinstance(self.targets, str) or not isinstance(self.targets, (tuple, list)):
      raise ValueError(f"LoraConfig.targets must be a tuple of module names from {TARGETS}, "
                       f"got {self.targets!r}")
    object.__setattr__(self, "targets", tuple(self.targets))   # gin passes lists
    if not self.targets:
      raise ValueError(f"LoraConfig.targets must name at least one module from {TARGETS}")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown:
      raise ValueError(f"LoraConfig.targets has unknown module names {unknown}; valid names: "
                       f"{list(TARGETS)}")
    if len(set(self.targets)) != len(self.targets):
      raise ValueError(f"LoraConfig.targets names a module twice: {self.targets}")
    if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
        or not 0.0 <= self.dropout < 1.0):
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")

  @property
  def scale(self) -> float:
    """`alpha / rank`, the factor of the low-rank update."""
    return self.alpha / self.rank

  def module_path_regex(self) -> str:
    """The qwix `module_path` regex matching the target modules at any depth."""
    return "(.*/)?(" + "|".join(re.escape(t) for t in self.targets) + ")"


class _LinenLoraProvider(qwix.LoraProvider):
  """`qwix.LoraProvider` whose einsum path works on linen modules.

  qwix 0.1.8's `LoraProvider.einsum` ends its bookkeeping with `setattr(module,
  weight_name + "_lora_einsum_str", ...)`, which a linen module forbids outside `setup`. This is
  the same computation without that debug attribute: the base einsum, then
  `einsum(lhs, A, B) * alpha / rank` with qwix's own parameter shapes, names, initialisers and
  sharding metadata.
  """

  def einsum(self, einsum_str: str, *operands: jax.Array, **kwargs) -> jax.Array:
    res = _qwix_ptq.PtqProvider.einsum(self, einsum_str, *operands, **kwargs)
    rule, _ = self._get_current_rule_and_op_id("einsum", repeated_call=True)
    if not isinstance(rule, qwix.LoraRule):
      return res
    if len(operands) != 2:
      raise ValueError(f"LoRA supports two-operand einsums only, got {einsum_str!r} with "
                       f"{len(operands)} operands")
    lhs, rhs = operands
    weight_name = _qwix_flax_util.find_param(rhs, _qwix_ptq.WithAux)
    if weight_name is None:            # rhs is an activation, not a weight
      return res
    a_shape, b_shape, lora_einsum_str, a_transpose, b_transpose = (
        _qwix_lora._parse_einsum_str_for_lora(lhs.shape, rhs.shape, einsum_str, rule.rank))
    lora_a, lora_b = _qwix_lora._get_or_create_lora_params(
        name=weight_name, rule=rule, a_shape=a_shape, b_shape=b_shape,
        a_sharding_transpose=a_transpose, b_sharding_transpose=b_transpose)
    if rule.dropout > 0:
      lhs = nnx.Dropout(rule.dropout, deterministic=False)(
          lhs, rngs=_qwix_flax_util.make_rng("dropout"))
    delta = jnp.einsum(lora_einsum_str, lhs, lora_a, lora_b, **kwargs)
    return res + delta * (rule.alpha / rule.rank)


def lora_model(model: Transformer, config: LoraConfig) -> Transformer:
  """A copy of `model` whose target projections carry LoRA adapters.

  The returned module is still a `Transformer` (a qwix-made subclass): `apply` with
  `method=Transformer.decode` / `Transformer.hidden_states`, `make_decode_fn`, and plain
  calls all include the adapters. It takes the base tree plus the adapter leaves
  (`join_params(base, adapters)`); the original `model` is untouched and still runs the base
  tree alone (the KL reference).

  Args:
    model: the base `Transformer` (per-layer or `scan_layers=True`; any `remat`).
    config: rank, alpha, targets and dropout.

  Returns:
    The LoRA `Transformer`.

  Raises:
    TypeError: `model` is not a `Transformer`.
    ValueError: `lm_head` targeted on a model with tied embeddings (it has no `lm_head`).

  Example:
    >>> lora = lora_model(Transformer(cfg), LoraConfig(rank=4, targets=("q_proj", "v_proj")))
  """
  if not isinstance(model, Transformer):
    raise TypeError(f"lora_model needs a jaxsearch Transformer, got {type(model).__name__}")
  if not isinstance(config, LoraConfig):
    raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
  if "lm_head" in config.targets and model.config.tie_embeddings:
    raise ValueError("LoraConfig.targets has 'lm_head' but the model ties its embeddings "
                     "(tie_embeddings=True, no lm_head kernel): drop 'lm_head' from targets")
  provider = _LinenLoraProvider([qwix.LoraRule(
      module_path=config.module_path_regex(), rank=config.rank, alpha=float(config.alpha),
      dropout=float(config.dropout))])
  return qwix.apply_lora_to_model(model, provider, methods=_INTERCEPTED_METHODS)


def is_adapter_path(path: tuple[str, ...]) -> bool:
  """Whether a flattened parameter path (key tuple) names a LoRA adapter leaf."""
  return str(path[-1]).endswith(ADAPTER_SUFFIXES)


def split_params(params: PyTree) -> tuple[PyTree, PyTree]:
  """`(base, adapters)`: the frozen weights and the LoRA leaves, as two nested dicts.

  Leaves are not copied: both trees reference the input's arrays. Works on plain, boxed
  (`nn.Partitioned`), abstract and `PartitionSpec` trees alike; a tree without adapters gives
  `(params, {})`.

  Args:
    params: a LoRA model's parameter tree (optionally wrapped as `{"params": ...}`).

  Returns:
    `(base, adapters)`; `join_params(base, adapters)` rebuilds `params`.

  Example:
    >>> base, adapters = split_params(lora_params)
    >>> opt_state = tx.init(adapters)
  """
  params = _unwrap(params)
  flat = traverse_util.flatten_dict(dict(params))
  base = {k: v for k, v in flat.items() if not is_adapter_path(k)}
  adapters = {k: v for k, v in flat.items() if is_adapter_path(k)}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def join_params(base: PyTree, adapters: PyTree) -> PyTree:
  """The LoRA model's parameter tree from the frozen base and the adapters (no copies).

  Args:
    base: the base `Transformer` tree (no adapter leaves).
    adapters: the adapter leaves (`split_params(...)[1]`, `init_adapters(...)`).

  Returns:
    One nested dict holding both.

  Raises:
    ValueError: a leaf of `adapters` is not an adapter, or `base` holds adapters already.

  Example:
    >>> logits = lora.apply({"params": join_params(base, adapters)}, tokens)
  """
  flat_base = traverse_util.flatten_dict(dict(_unwrap(base)))
  flat_adapters = traverse_util.flatten_dict(dict(_unwrap(adapters)))
  if bad := [k for k in flat_base if is_adapter_path(k)]:
    raise ValueError(f"base holds adapter leaves {['/'.join(map(str, k)) for k in bad[:4]]}: "
                     "pass the base tree of split_params")
  if bad := [k for k in flat_adapters if not is_adapter_path(k)]:
    raise ValueError(f"adapters hold non-adapter leaves {['/'.join(map(str, k)) for k in bad[:4]]}"
                     f" (adapter names end with {ADAPTER_SUFFIXES})")
  return traverse_util.unflatten_dict({**flat_base, **flat_adapters})


def init_adapters(model: Transformer, base_params: PyTree, rng: jax.Array,
                  tokens: jax.Array | None = None) -> PyTree:
  """Fresh adapters for `base_params`: A random (qwix's He-uniform), B zero.

  Runs the LoRA model once over `tokens` with the `params` collection mutable, so linen
  creates only the missing adapter leaves (the base is never re-initialised). Pure and
  jittable; under `jax.eval_shape` it costs nothing. With boxed (`nn.Partitioned`) base
  parameters the adapters come out boxed with logical axis names (see `lora_specs`).

  Args:
    model: a LoRA model (`lora_model`).
    base_params: the base `Transformer` tree (plain or boxed).
    rng: PRNG key for A (and for dropout when the config has it).
    tokens: [B, T] int32 dummy input; default `zeros([1, 1])` (when calling this under a
      mesh with logical-axis rules active, pass B divisible by the batch shards).

  Returns:
    The adapter tree (`{..: {"kernel_lora_a": A, "kernel_lora_b": B}}`).

  Example:
    >>> adapters = jax.jit(init_adapters, static_argnums=0)(lora, base, jax.random.key(1))
  """
  if not hasattr(type(model), "_unquantized_type"):
    raise ValueError("init_adapters needs the LoRA model from lora_model(model, config), got "
                     "a plain Transformer (it would create no adapters)")
  if tokens is None:
    tokens = jnp.zeros((1, 1), jnp.int32)
  params_rng, dropout_rng = jax.random.split(rng)
  _, variables = model.apply({"params": _unwrap(base_params)}, tokens, mutable=["params"],
                             rngs={"params": params_rng, "dropout": dropout_rng})
  _, adapters = split_params(variables["params"])
  return adapters


def init_lora_params(model: Transformer, base_params: PyTree, rng: jax.Array,
                     tokens: jax.Array | None = None) -> PyTree:
  """The LoRA model's full tree: `base_params` plus fresh adapters (A random, B zero).

  `join_params(base_params, init_adapters(model, base_params, rng, tokens))`; the base arrays
  are referenced, not copied.

  Args:
    model: a LoRA model (`lora_model`).
    base_params: the base `Transformer` tree.
    rng: PRNG key for A.
    tokens: optional dummy input, see `init_adapters`.

  Returns:
    The joined tree; `split_params` takes it apart again.

  Example:
    >>> params = init_lora_params(lora, base, jax.random.key(1))
    >>> lora.apply({"params": params}, tokens) == model.apply({"params": base}, tokens)
  """
  return join_params(base_params, init_adapters(model, base_params, rng, tokens))


def lora_specs(model: Transformer) -> tuple[PyTree, PyTree]:
  """`(base_specs, adapter_specs)`: logical PartitionSpecs of a LoRA model's parameters.

  From an abstract init (no FLOPs, no memory). An adapter carries its kernel's logical names
  on the kernel's axes and `None` on the rank axis (e.g. q_proj: A `("embed", None)`, B
  `(None, "heads", "head_dim")`); map them with `jaxsearch.train.sharding.param_shardings`.

  Example:
    >>> base_specs, adapter_specs = lora_specs(lora)
    >>> adapters = jax.device_put(adapters, sharding.param_shardings(adapter_specs, mesh))
  """
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  return split_params(nn.get_partition_spec(boxed))


def merge_lora(params: PyTree, config: LoraConfig) -> PyTree:
  """A plain `Transformer` tree: every adapted kernel becomes `W + alpha / rank * A @ B`.

  `A @ B` contracts the rank axis (the last of A, the first of B after any leading stacked
  `layers` axis), which gives the kernel's own layout: [D, H, hd] for q_proj, [H, hd, D] for
  o_proj, [D, F] for gate/up, .... Computed in float32, cast back to the kernel's dtype.
  The result loads into the base model and `save_hf_checkpoint`.

  Args:
    params: the LoRA model's tree (`join_params(base, adapters)`), plain arrays.
    config: the config the adapters were trained with (its `alpha / rank` scale).

  Returns:
    The merged tree, with no adapter leaves.

  Raises:
    ValueError: an adapter without its pair or its kernel, a rank differing from
      `config.rank`, or shapes that do not multiply to the kernel's.

  Example:
    >>> save_hf_checkpoint(model, merge_lora(params, cfg), "out/", model_type="llama")
  """
  flat = traverse_util.flatten_dict(dict(_unwrap(params)))
  merged = {k: v for k, v in flat.items() if not is_adapter_path(k)}
  for key in [k for k in flat if str(k[-1]).endswith("_lora_a")]:
    name = str(key[-1])[:-len("_lora_a")]
    where = "/".join(map(str, key[:-1] + (name,)))
    b_key, w_key = key[:-1] + (name + "_lora_b",), key[:-1] + (name,)
    if b_key not in flat or w_key not in flat:
      raise ValueError(f"adapter of {where} lacks its "
                       f"{'_lora_b pair' if b_key not in flat else 'base kernel'}")
    a, b, w = flat[key], flat[b_key], flat[w_key]
    batch = a.ndim + b.ndim - 2 - w.ndim       # leading stacked axes (scan layers): 0 or 1
    if batch < 0 or a.shape[:batch] != b.shape[:batch] or a.shape[-1] != b.shape[batch]:
      raise ValueError(f"adapter of {where}: A {a.shape} and B {b.shape} do not multiply to the "
                       f"kernel {w.shape}")
    if a.shape[-1] != config.rank:
      raise ValueError(f"adapter of {where} has rank {a.shape[-1]} but config.rank is "
                       f"{config.rank}: pass the LoraConfig the adapters were made with")
    product = lambda x, y: jnp.tensordot(x, y, axes=1)    # [..in, r] x [r, ..out]
    for _ in range(batch):
      product = jax.vmap(product)
    delta = product(a.astype(jnp.float32), b.astype(jnp.float32))
    if delta.size != w.size:
      raise ValueError(f"adapter of {where}: A @ B has shape {delta.shape}, the kernel {w.shape}")
    merged[w_key] = (w.astype(jnp.float32) + config.scale * delta.reshape(w.shape)).astype(w.dtype)
  for key in flat:
    if str(key[-1]).endswith("_lora_b") and key[:-1] + (str(key[-1])[:-7] + "_lora_a",) not in flat:
      raise ValueError(f"adapter {'/'.join(map(str, key))} lacks its _lora_a pair")
  return traverse_util.unflatten_dict(merged)


def count_adapter_params(params: PyTree) -> int:
  """Number of trainable LoRA scalars in a tree (adapter leaves only).

  For each target, `rank * (in + out)` per layer (o_proj: in = H * hd; k/v_proj: out = Hkv * hd).

  Example:
    >>> count_adapter_params(join_params(base, adapters))   # 4096 for the tests' tiny model
  """
  _, adapters = split_params(params)
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(adapters))


def _unwrap(params: PyTree) -> PyTree:
  """`{"params": tree}` -> tree (a Transformer tree has no top-level "params" key)."""
  if isinstance(params, dict) or hasattr(params, "keys"):
    if set(params.keys()) == {"params"}:
      return params["params"]
  return params
