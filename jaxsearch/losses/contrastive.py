"""InfoNCE with in-batch negatives (and optional hard negatives) for dual encoders.

Query i's positive is document i; every other document of the batch, plus H extra hard
negatives appended after the B positives, is a negative:

  s[i, j] = <q_i, d_j> / temperature                          # [B, B + H]
  L_q->d  = mean_i [ logsumexp_j s[i, j] - s[i, i] ]

With `symmetric=True` the document -> query direction over the B positives is added,
`L = (L_q->d + L_d->q) / 2` with `L_d->q = mean_i [ logsumexp_j s[j, i] - s[i, i] ]`
(j over the B queries; hard negatives have no query and stay out of it).

False negatives: when two rows share a positive document (two questions about the same
passage), pass `doc_ids` ([B + H] ints naming each document); column j is then dropped from
row i's softmax when `doc_ids[j] == doc_ids[i]` and j != i, in both directions.

Pure and jittable; embeddings are used as given (normalise them beforehand for cosine
similarity; `temperature` may be a traced scalar, e.g. a learned one).

Example:
  >>> q = jnp.eye(2); d = jnp.eye(2)
  >>> loss, aux = info_nce_loss(q, d, temperature=1.0)     # log(1 + e^-1) = 0.3133
  >>> round(float(loss), 4), float(aux["accuracy"])
  (0.3133, 1.0)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # masked logit: exp() is exactly 0, and 0 * _NEG is finite (no NaN in grads)


def info_nce_loss(query: jax.Array, docs: jax.Array, *, temperature: float | jax.Array = 0.05,
                  symmetric: bool = False, doc_ids: jax.Array | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Contrastive (InfoNCE / multiple-negatives ranking) loss.

  Args:
    query: [B, D] query embeddings.
    docs: [B + H, D] document embeddings: the B positives in query order, then H >= 0 hard
      negatives.
    temperature: softmax temperature (> 0); scores are `<q, d> / temperature`.
    symmetric: also average in the document -> query loss over the B positives.
    doc_ids: optional [B + H] int ids of the documents; equal ids mark the same document,
      which is then not used as a negative for a row whose positive it is.

  Returns:
    `(loss [] float32, aux)`; aux holds "accuracy" (fraction of queries whose positive
    scores highest among their candidates), "positive_score" and "negative_score" (mean raw
    `<q, d>` of positives and of the in-softmax negatives), all float32 scalars.

  Raises:
    ValueError: on shapes that do not fit (named), or a non-positive Python temperature.

  Example:
    >>> q = jnp.array([[1., 0.], [0., 1.]])
    >>> d = jnp.array([[1., 0.], [0., 1.], [1., 1.]])                    # 1 hard negative
    >>> loss, _ = info_nce_loss(q, d, temperature=1.0)   # log(1 + e^-1 + e^0) = 0.8620
    >>> round(float(loss), 4)
    0.862
  """
  if query.ndim != 2 or docs.ndim != 2:
    raise ValueError(f"query and docs must be [B, D] and [B + H, D], got {query.shape} and "
                     f"{docs.shape}")
  b, dim = query.shape
  if docs.shape[1] != dim:
    raise ValueError(f"query and docs must have the same width D, got {query.shape} and "
                     f"{docs.shape}")
  if docs.shape[0] < b:
    raise ValueError(f"docs must hold at least the B={b} positives, got {docs.shape[0]} rows")
  if doc_ids is not None and doc_ids.shape != (docs.shape[0],):
    raise ValueError(f"doc_ids must have shape [B + H] = [{docs.shape[0]}], got "
                     f"{doc_ids.shape}")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")

  raw = jnp.einsum("id,jd->ij", query.astype(jnp.float32), docs.astype(jnp.float32))
  n = docs.shape[0]
  diag = jnp.arange(b)[:, None] == jnp.arange(n)[None, :]                # [B, B + H]
  if doc_ids is None:
    keep = jnp.ones((b, n), bool)
  else:
    keep = (doc_ids[:b, None] != doc_ids[None, :]) | diag
  logits = jnp.where(keep, raw / temperature, _NEG)
  positive = jnp.diagonal(logits[:, :b])                                 # [B]
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - positive)
  if symmetric:
    logits_t = logits[:, :b].T                                           # [B docs, B queries]
    loss = 0.5 * (loss + jnp.mean(jax.nn.logsumexp(logits_t, axis=-1) - positive))

  negatives = keep & ~diag
  others = jnp.where(negatives, logits, _NEG)
  accuracy = jnp.mean((positive > jnp.max(others, axis=-1)).astype(jnp.float32))
  num_neg = jnp.maximum(jnp.sum(negatives), 1)
  aux = {
      "accuracy": accuracy,
      "positive_score": jnp.mean(jnp.diagonal(raw[:, :b])),
      "negative_score": jnp.sum(jnp.where(negatives, raw, 0.0)) / num_neg,
  }
  return loss, aux
