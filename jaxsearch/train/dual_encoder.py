"""Dual-encoder (dense retriever) training: InfoNCE over in-batch and hard negatives.

A query encoder and a document encoder map token ids to vectors; the update step embeds a
batch of (query, positive document) pairs plus optional hard-negative documents and takes
one optimizer step on `losses.contrastive.info_nce_loss`. The encoders are either shared
(one parameter tree, `state.params`) or separate (`state.params == {"query": ...,
"document": ...}`). Encoders are given as pure embedding functions

  embed_fn(params, input_ids [N, T], attention_mask [N, T], rng | None) -> [N, D]

so any model works; `make_embed_fn(BertEncoder(cfg))` adapts `jaxsearch.models.encoder`
(dropout runs when the config's `dropout_rate > 0` and an rng is given).

Example:
  >>> from jaxsearch.models.encoder import EncoderConfig, init_encoder_params
  >>> from jaxsearch.train.optim import OptimizerConfig, make_optimizer
  >>> cfg = EncoderConfig(vocab_size=100, hidden_size=32, num_heads=4, max_position=16)
  >>> embed_fn = make_embed_fn(BertEncoder(cfg))
  >>> params = init_encoder_params(cfg, jax.random.key(0))
  >>> state = TrainState.create(apply_fn=embed_fn, params=params,
  ...                           tx=make_optimizer(OptimizerConfig(learning_rate=1e-3)))
  >>> update_fn = jax.jit(make_dual_encoder_update_fn(embed_fn, config=DualEncoderConfig()))
  >>> ids = jnp.arange(16).reshape(2, 8); mask = jnp.ones_like(ids)    # 2 (query, doc) pairs
  >>> state, metrics = update_fn(state, DualEncoderBatch(ids, mask, ids[::-1], mask))
  >>> int(state.step), sorted(metrics)
  (1, ['accuracy', 'grad_norm', 'loss', 'negative_score', 'positive_score'])
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsearch.losses.contrastive import info_nce_loss
from jaxsearch.models.encoder import BertEncoder
from jaxsearch.train.state import TrainState
from jaxsearch.types import PyTree

Metrics = dict[str, jax.Array]
EmbedFn = Callable[[PyTree, jax.Array, jax.Array, "jax.Array | None"], jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DualEncoderConfig:
  """Dual-encoder loss settings.

  Attributes:
    temperature: InfoNCE temperature on the (normalised) dot products.
    symmetric: add the document -> query direction (see `info_nce_loss`).
    shared: True: one encoder embeds queries and documents (`state.params` is its tree);
      False: `state.params == {"query": ..., "document": ...}`.
  """

  temperature: float = 0.05
  symmetric: bool = False
  shared: bool = True

  def __post_init__(self):
    if isinstance(self.temperature, bool) or not self.temperature > 0:
      raise ValueError(f"DualEncoderConfig.temperature must be > 0, got {self.temperature!r}")
    for name in ("symmetric", "shared"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"DualEncoderConfig.{name} must be a bool, got "
                         f"{getattr(self, name)!r}")


class DualEncoderBatch(NamedTuple):
  """Queries, their positive documents (same order) and optional hard negatives after them."""

  query_ids: jax.Array    # [B, Tq] int32
  query_mask: jax.Array   # [B, Tq] int32 / bool, 1 = real token
  doc_ids: jax.Array      # [B + H, Td] int32, rows 0..B-1 are the positives
  doc_mask: jax.Array     # [B + H, Td] int32 / bool
  doc_keys: jax.Array | None = None  # [B + H] int32 document identities (false-negative mask)


def make_embed_fn(model: BertEncoder) -> EmbedFn:
  """`embed_fn(params, ids, mask, rng=None) -> [N, D]` for a `BertEncoder`.

  Dropout runs only when `rng` is given and the config's `dropout_rate > 0`.

  Example:
    >>> from jaxsearch.models.encoder import EncoderConfig
    >>> embed_fn = make_embed_fn(BertEncoder(EncoderConfig(vocab_size=50)))
  """
  def embed_fn(params, input_ids, attention_mask, rng=None):
    train = rng is not None and model.config.dropout_rate > 0
    return model.apply({"params": params}, input_ids, attention_mask,
                       deterministic=not train, rngs={"dropout": rng} if train else None,
                       method=BertEncoder.embed)
  return embed_fn


def make_dual_encoder_loss_fn(query_embed_fn: EmbedFn, doc_embed_fn: EmbedFn | None = None, *,
                              config: DualEncoderConfig):
  """The InfoNCE objective as a function of the parameters.

  Args:
    query_embed_fn: embeds queries (and documents when shared).
    doc_embed_fn: embeds documents; defaults to `query_embed_fn` (the same function on a
      separate tree when `config.shared` is False).
    config: loss settings.

  Returns:
    `loss_fn(params, batch: DualEncoderBatch, rng=None) -> (loss [], metrics)`, pure.

  Example:
    >>> def embed_fn(table, ids, mask, rng=None):        # any model; here a bag of embeddings
    ...   return (table[ids] * mask[..., None]).sum(1)
    >>> loss_fn = make_dual_encoder_loss_fn(embed_fn, config=DualEncoderConfig(temperature=1.0))
    >>> ids = jnp.array([[0], [1]]); mask = jnp.ones_like(ids)
    >>> loss, metrics = loss_fn(jnp.eye(2), DualEncoderBatch(ids, mask, ids, mask))
    >>> round(float(loss), 4)                            # log(1 + e^-1)
    0.3133
  """
  doc_embed_fn = query_embed_fn if doc_embed_fn is None else doc_embed_fn

  def loss_fn(params, batch: DualEncoderBatch, rng=None):
    if config.shared:
      q_params = d_params = params
    else:
      q_params, d_params = params["query"], params["document"]
    q_rng = d_rng = None
    if rng is not None:
      q_rng, d_rng = jax.random.split(rng)
    q = query_embed_fn(q_params, batch.query_ids, batch.query_mask, q_rng)
    d = doc_embed_fn(d_params, batch.doc_ids, batch.doc_mask, d_rng)
    return info_nce_loss(q, d, temperature=config.temperature, symmetric=config.symmetric,
                         doc_ids=batch.doc_keys)

  return loss_fn


def make_dual_encoder_update_fn(query_embed_fn: EmbedFn, doc_embed_fn: EmbedFn | None = None, *,
                                config: DualEncoderConfig
                                ) -> Callable[..., tuple[TrainState, Metrics]]:
  """One optimizer step on the dual-encoder InfoNCE loss.

  Args: as `make_dual_encoder_loss_fn`.

  Returns:
    `update_fn(state: TrainState, batch: DualEncoderBatch, rng=None) -> (state, metrics)`,
    pure (the caller jits and shards it). With an `rng`, dropout uses
    `fold_in(rng, state.step)`. Metrics: loss, grad_norm, accuracy, positive_score,
    negative_score.

  Example:
    See the module example.
  """
  loss_fn = make_dual_encoder_loss_fn(query_embed_fn, doc_embed_fn, config=config)

  def update_fn(state: TrainState, batch: DualEncoderBatch, rng=None):
    if rng is not None:
      rng = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    return state.apply_gradients(grads), {"loss": loss, "grad_norm": optax.tree.norm(grads),
                                          **aux}

  return update_fn


def recall_at_k(query_emb: jax.Array, doc_emb: jax.Array, targets: jax.Array, k: int = 1
                ) -> jax.Array:
  """Fraction of queries whose target document is among the k highest dot products.

  Args:
    query_emb: [B, D] query embeddings.
    doc_emb: [M, D] corpus embeddings.
    targets: [B] int index into the corpus of each query's relevant document.
    k: cut-off.

  Returns:
    [] float32 recall@k (ties broken towards the lower document index, as `lax.top_k`).

  Example:
    >>> recall_at_k(jnp.eye(2), jnp.eye(2), jnp.array([0, 0]), k=1)
    Array(0.5, dtype=float32)
  """
  scores = jnp.einsum("bd,md->bm", query_emb.astype(jnp.float32), doc_emb.astype(jnp.float32))
  _, top = jax.lax.top_k(scores, k)
  return jnp.mean(jnp.any(top == targets[:, None], axis=-1).astype(jnp.float32))
