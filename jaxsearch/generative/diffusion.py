r"""Masked-diffusion decoding of docIDs (in the spirit of DiffuGR): a bidirectional head that
fills all docID slots in T parallel denoising steps, confident slots first.

Layout. A docID (see `jaxsearch.generative.docids.DocIds`) is `n <= Lmax` codes in [0, K) and
an END code K. The head works on a fixed number of slots `L = Lmax + 1`, every one with a
target class in [0, K + 2):

  class c < K   code c
  class K       END
  class K + 1   PAD (every slot after END)
  class K + 2   MASK (input only, never predicted)

The model is a BERT encoder (`jaxsearch.models.encoder.BertEncoder`, bidirectional: every
position attends to every non-padding position) over

  [query tokens, right-padded to P] [L slots]

with text ids in [0, V_text), slot class c at token id `V_text + c`, token type 0 for the
query and 1 for the slots (so the slots sit at fixed positions P .. P+L-1), followed by a
dense layer from the slot states to K + 2 logits.

Training (MDLM-style absorbing-state diffusion, linear schedule alpha_t = 1 - t). Per example
draw t in (0, 1] (`min_t + (1 - min_t) u`; with `stratified_t` the B draws of a batch are
`u_b = (u + b) / B` for one uniform u, MDLM's low-discrepancy sampler), replace each slot
by MASK independently with probability t, and take the cross-entropy of the true class at the
masked slots only:

  weighting="elbo":  loss = mean_b [ (1 / t_b) * sum_i m_bi * CE_bi ] / L
                     (the continuous-time NELBO of MDLM per slot: an upper bound on
                     -log p(docID | query) / L)
  weighting="mean":  loss = sum_bi m_bi * CE_bi / max(sum_bi m_bi, 1)
                     (plain masked-LM average over the masked slots of the batch)

"mean" is the default: with the short docIDs of retrieval (L = 2 .. 5) most small-t draws
mask nothing and the rare ones that do get weight 1/t, which makes the ELBO's gradient
noisy. Measured on the world corpus (naive docIDs, 1,500 steps,
`experiments/generative_retrieval_diffusion.py`, docs/generative/diffusion.md): seen-question
hit@1 0.77 with "mean" against 0.42 with "elbo" (T = L, 16 samples).

Decoding (`diffusion_decode`). All L slots start as MASK. Step s = 0 .. T-1 runs the model
once, picks a class for every masked slot (the argmax of log p; with a temperature tau > 0
the Gumbel-max sample `argmax(log p + tau g)`), and unmasks the `n_s` masked slots whose
chosen class has the highest log-probability (plus `tau g'`, an independent Gumbel tie
breaker, when tau > 0), with

  n_s = floor((s + 1) L / T) - floor(s L / T)          (`unmask_schedule`; sum_s n_s = L)

so T = L fills one slot per step and T = 1 fills all at once; T is the quality / latency
knob (the cost is T forward passes). The score of a decoded docID is the sum over slots of
the log-probability its class had when it was unmasked. Decoding is unconstrained by default
(as DiffuGR); with `docid_targets` (the docIDs' `slot_targets`) it is constrained: a step's
slots are committed one at a time, each among the classes that keep some docID consistent
with the slots decoded so far (`allowed_classes`; still one forward pass per step), so every
output is a docID. The decoded classes are mapped to a document with the trie
(`decoded_docs`): an
output whose codes up to its first END form a docID gives that doc row (`trie.is_valid`; the
slots after END are ignored unless `strict`), anything else -1, and `valid_fraction` reports
how often decodes were valid.

Top-k (`diffusion_retrieve`). Each query is decoded `num_samples` times in one batch: sample
0 greedily (tau = 0), the others with temperature `temperature` (Gumbel-max choices and
Gumbel tie-breaking of the unmasking order, from an explicit rng). Invalid outputs are
dropped, duplicates keep their best score, and the distinct documents are ranked by score.
Recall@10 therefore needs enough samples to produce 10 distinct valid docIDs; a query whose
samples agree returns fewer than k documents (padded with -1).

Example:
  >>> docids = naive_docids(30)                                  # K = 10, 2 digits + END
  >>> config = DiffusionConfig(text_vocab_size=tok.vocab_size, num_codes=docids.num_codes,
  ...                          num_slots=slot_count(docids), max_query_len=24)
  >>> q, qm = pad_queries([tok.encode(t) for t in texts], config.max_query_len)
  >>> params, history = train_diffusion_head(config, q, qm, np.arange(30), docids, steps=300)
  >>> out = diffusion_decode(params, q, qm, config=config, num_steps=3)
  >>> docs = decoded_docs(out.classes, build_trie(docids), config.num_codes)   # [30], -1 bad
  >>> top = diffusion_retrieve(params, q, qm, build_trie(docids), config=config,
  ...                          num_steps=3, num_samples=16, k=10, rng=jax.random.key(0))
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsearch.generative import trie as trie_lib
from jaxsearch.generative.docids import DocIds
from jaxsearch.models.encoder import BertEncoder, EncoderConfig
from jaxsearch.models.transformer import DTYPES
from jaxsearch.types import PyTree

WEIGHTINGS = ("elbo", "mean")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
  """Sizes of a masked-diffusion docID head and its training loss.

  Attributes:
    text_vocab_size: V_text, the text tokenizer's ids [0, V_text); slot class c is token
      `V_text + c`.
    num_codes: K, codes per docID position; class K is END, K + 1 PAD, K + 2 MASK.
    num_slots: L = longest docID + 1 (END); `slot_count(docids)`.
    max_query_len: P, query tokens (right-padded; longer queries must be truncated by
      the caller, e.g. with `pad_queries`).
    hidden_size, num_layers, num_heads, intermediate_size: the BERT encoder's sizes.
    dropout_rate: encoder dropout during training (0 disables it).
    weighting: "mean" (masked-slot average) or "elbo" (MDLM 1/t weights); see the module
      docstring.
    min_t: smallest masking rate drawn in training, in [0, 1).
    stratified_t: MDLM's low-discrepancy draw of t over the batch.
    dtype, param_dtype: compute / parameter dtype names.
  """

  text_vocab_size: int
  num_codes: int
  num_slots: int
  max_query_len: int = 32
  hidden_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  intermediate_size: int = 512
  dropout_rate: float = 0.0
  weighting: str = "mean"
  min_t: float = 1e-3
  stratified_t: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    for name in ("text_vocab_size", "num_codes", "max_query_len", "hidden_size", "num_layers",
                 "num_heads", "intermediate_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"DiffusionConfig.{name} must be a positive int, got {value!r}")
    if isinstance(self.num_slots, bool) or not isinstance(self.num_slots, int) \
        or self.num_slots < 2:
      raise ValueError(f"DiffusionConfig.num_slots must be an int >= 2 (at least one code and "
                       f"END), got {self.num_slots!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"DiffusionConfig.hidden_size must be divisible by num_heads, got "
                       f"hidden_size={self.hidden_size}, num_heads={self.num_heads}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"DiffusionConfig.dropout_rate must be in [0, 1), got "
                       f"{self.dropout_rate!r}")
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"DiffusionConfig.weighting must be one of {WEIGHTINGS}, got "
                       f"{self.weighting!r}")
    if not 0.0 <= self.min_t < 1.0:
      raise ValueError(f"DiffusionConfig.min_t must be in [0, 1), got {self.min_t!r}")
    if not isinstance(self.stratified_t, bool):
      raise ValueError(f"DiffusionConfig.stratified_t must be a bool, got "
                       f"{self.stratified_t!r}")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if value not in DTYPES:
        raise ValueError(f"DiffusionConfig.{name} must be one of {sorted(DTYPES)}, got "
                         f"{value!r}")

  @property
  def end_class(self) -> int:
    """K: the END class."""
    return self.num_codes

  @property
  def pad_class(self) -> int:
    """K + 1: the class of every slot after END."""
    return self.num_codes + 1

  @property
  def mask_class(self) -> int:
    """K + 2: the MASK input (never a target)."""
    return self.num_codes + 2

  @property
  def num_classes(self) -> int:
    """K + 2 predicted classes (codes, END, PAD)."""
    return self.num_codes + 2

  @property
  def code_offset(self) -> int:
    """Token id of slot class 0 (= V_text)."""
    return self.text_vocab_size

  @property
  def vocab_size(self) -> int:
    """V_text + K + 3 token ids of the encoder."""
    return self.text_vocab_size + self.num_codes + 3

  def encoder_config(self) -> EncoderConfig:
    """The `EncoderConfig` of the backbone (max_position = P + L, 2 token types)."""
    return EncoderConfig(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
        num_heads=self.num_heads, intermediate_size=self.intermediate_size,
        max_position=self.max_query_len + self.num_slots, type_vocab_size=2,
        dropout_rate=self.dropout_rate, dtype=self.dtype, param_dtype=self.param_dtype)


# ----------------------------------------------------------------------------- docIDs


def slot_count(docids: DocIds) -> int:
  """L = longest docID + 1 (END), the number of slots a head for `docids` needs.

  Example:
    >>> slot_count(naive_docids(300))          # 3 digits + END
    4
  """
  return int(np.asarray(docids.codes).shape[1]) + 1


def slot_targets(docids: DocIds) -> np.ndarray:
  """Target classes of every document's slots: codes, END (= K), then PAD (= K + 1).

  Args:
    docids: N docIDs of at most Lmax codes.

  Returns:
    [N, Lmax + 1] int32.

  Example:
    >>> slot_targets(DocIds(np.array([[3, -1], [1, 2]]), np.array([1, 2]), 4, "naive"))
    array([[3, 4, 5],
           [1, 2, 4]], dtype=int32)
  """
  codes = np.asarray(docids.codes)
  lengths = np.asarray(docids.lengths)
  n, lmax = codes.shape
  k = int(docids.num_codes)
  out = np.full((n, lmax + 1), k + 1, np.int32)
  inside = np.arange(lmax)[None, :] < lengths[:, None]                   # [N, Lmax]
  out[:, :lmax] = np.where(inside, codes, k + 1)
  out[np.arange(n), lengths] = k
  if np.any((out < 0) | (out > k + 1)) or np.any(out[:, :lmax][inside] >= k):
    raise ValueError(f"docids.codes must be in [0, {k}) before each docID's length")
  return out


def classes_to_codes(classes: np.ndarray, num_codes: int) -> np.ndarray:
  """Decoded slot classes -> trie codes: codes and END kept, PAD -> -1.

  Returns int32 [..., L]; a malformed row (PAD before END, no END) is returned as is, for
  `trie.is_valid` to reject.

  Example:
    >>> classes_to_codes(np.array([[3, 4, 5]]), 4)
    array([[ 3,  4, -1]], dtype=int32)
  """
  classes = np.asarray(classes, np.int32)
  return np.where(classes == num_codes + 1, -1, classes).astype(np.int32)


def well_formed(classes: np.ndarray, num_codes: int) -> np.ndarray:
  """Whether each row of slot classes reads `codes (>= 1), END, PAD ...` (bool [...]).

  Example:
    >>> well_formed(np.array([[3, 4, 5], [4, 5, 5], [3, 5, 4], [1, 2, 3]]), 4)
    array([ True, False, False, False])
  """
  classes = np.asarray(classes)
  k = num_codes
  is_end = classes == k
  has_one_end = is_end.sum(-1) == 1
  end_pos = np.argmax(is_end, axis=-1)
  pos = np.arange(classes.shape[-1])
  before = pos < end_pos[..., None]
  after = pos > end_pos[..., None]
  codes_before = np.all(np.where(before, classes < k, True), axis=-1)
  pad_after = np.all(np.where(after, classes == k + 1, True), axis=-1)
  return has_one_end & (end_pos >= 1) & codes_before & pad_after


def decoded_docs(classes: np.ndarray, trie: Any, num_codes: int, *,
                 strict: bool = False) -> np.ndarray:
  """Doc rows of decoded slot classes, by `trie.is_valid`; -1 where not a docID.

  PAD slots become -1 codes (`classes_to_codes`), so `is_valid` rejects a PAD before END; it
  reads up to the first END and ignores the slots after it. With `strict` those slots must
  also all be PAD (`well_formed`).

  Args:
    classes: [..., L] int decoded classes (no MASK).
    trie: `jaxsearch.generative.trie.Trie` of the docIDs.
    num_codes: K.
    strict: also require PAD after END.

  Returns:
    [...] int32 doc rows, -1 where the output is not a docID.

  Example:
    >>> trie = build_trie(naive_docids(30))                     # K = 10, PAD = 11
    >>> decoded_docs(np.array([[1, 2, 10], [9, 9, 10], [1, 11, 10]]), trie, 10)
    array([12, -1, -1], dtype=int32)
  """
  classes = np.asarray(classes)
  rows = np.asarray(trie_lib.is_valid(trie, classes_to_codes(classes, num_codes)), np.int32)
  if strict:
    rows = np.where(well_formed(classes, num_codes), rows, -1)
  return rows.astype(np.int32)


def pad_queries(token_lists: Sequence[Sequence[int]], max_len: int,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads (and truncates) token lists into `([Q, P] int32 tokens, [Q, P] int32 mask)`.

  Example:
    >>> pad_queries([[5, 6, 7], [8]], 2)
    (array([[5, 6],
           [8, 0]], dtype=int32), array([[1, 1],
           [1, 0]], dtype=int32))
  """
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  tokens = np.full((len(token_lists), max_len), pad_id, np.int32)
  mask = np.zeros((len(token_lists), max_len), np.int32)
  for i, ids in enumerate(token_lists):
    ids = list(ids)[:max_len]
    if not ids:
      raise ValueError(f"query {i} has no tokens")
    tokens[i, :len(ids)] = ids
    mask[i, :len(ids)] = 1
  return tokens, mask


# ----------------------------------------------------------------------------- model


class DiffusionHead(nn.Module):
  """Bidirectional encoder over `[query] [slots]` -> slot logits [B, L, K + 2] (float32).

  Example:
    >>> cfg = DiffusionConfig(text_vocab_size=50, num_codes=10, num_slots=3,
    ...                       max_query_len=8, hidden_size=32, num_heads=4)
    >>> params = init_diffusion_params(cfg, jax.random.key(0))
    >>> q, qm = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)
    >>> slots = jnp.full((2, 3), cfg.mask_class)
    >>> DiffusionHead(cfg).apply({"params": params}, q, qm, slots).shape
    (2, 3, 12)
  """

  config: DiffusionConfig

  @nn.compact
  def __call__(self, query_tokens, query_mask, slots, deterministic: bool = True):
    """query_tokens [B, P] int text ids, query_mask [B, P], slots [B, L] classes in
    [0, K + 3) -> logits [B, L, K + 2] float32."""
    cfg = self.config
    b, p = query_tokens.shape
    if p != cfg.max_query_len or slots.shape != (b, cfg.num_slots):
      raise ValueError(f"expected query_tokens [B, {cfg.max_query_len}] and slots "
                       f"[B, {cfg.num_slots}], got {query_tokens.shape} and {slots.shape}")
    ids = jnp.concatenate([query_tokens.astype(jnp.int32),
                           cfg.code_offset + slots.astype(jnp.int32)], axis=1)
    mask = jnp.concatenate([query_mask.astype(jnp.int32),
                            jnp.ones((b, cfg.num_slots), jnp.int32)], axis=1)
    types = jnp.concatenate([jnp.zeros((b, p), jnp.int32),
                             jnp.ones((b, cfg.num_slots), jnp.int32)], axis=1)
    hidden = BertEncoder(cfg.encoder_config(), name="encoder")(ids, mask, types, deterministic)
    logits = nn.Dense(
        cfg.num_classes, name="head", dtype=DTYPES[cfg.dtype],
        param_dtype=DTYPES[cfg.param_dtype],
        kernel_init=nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                                 ("embed", "vocab")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
    )(hidden[:, p:])
    return logits.astype(jnp.float32)


def init_diffusion_params(config: DiffusionConfig, rng: jax.Array) -> PyTree:
  """Random parameters (plain dict): `{"encoder": BERT tree, "head": {kernel, bias}}`.

  Example:
    >>> p = init_diffusion_params(DiffusionConfig(text_vocab_size=50, num_codes=10,
    ...                                           num_slots=3), jax.random.key(0))
    >>> p["head"]["kernel"].shape
    (128, 12)
  """
  q = jnp.zeros((1, config.max_query_len), jnp.int32)
  slots = jnp.full((1, config.num_slots), config.mask_class, jnp.int32)
  variables = jax.jit(DiffusionHead(config).init)(rng, q, jnp.ones_like(q), slots)
  return nn.meta.unbox(variables["params"])


def apply_head(params: PyTree, query_tokens: jax.Array, query_mask: jax.Array,
               slots: jax.Array, *, config: DiffusionConfig, dropout_rng: jax.Array | None = None
               ) -> jax.Array:
  """Slot logits [B, L, K + 2]; dropout is on when `dropout_rng` is given (and rate > 0)."""
  deterministic = dropout_rng is None or config.dropout_rate == 0
  rngs = None if deterministic else {"dropout": dropout_rng}
  return DiffusionHead(config).apply({"params": params}, query_tokens, query_mask, slots,
                                     deterministic, rngs=rngs)


# ----------------------------------------------------------------------------- loss


class DiffusionBatch(NamedTuple):
  """A training batch: queries (or document texts) and the slot targets of their docs."""

  query_tokens: jax.Array  # [B, P] int32 text ids, right-padded
  query_mask: jax.Array    # [B, P] int32, 1 for real tokens
  targets: jax.Array       # [B, L] int32 classes in [0, K + 2): codes, END, PAD


def sample_t(rng: jax.Array, batch: int, *, min_t: float, stratified: bool) -> jax.Array:
  """Masking rates [B] in [min_t, 1): `min_t + (1 - min_t) u` with u uniform, or, when
  `stratified`, `u_b = (u + b) / B` for one uniform u (one draw per stratum).

  Example:
    >>> sample_t(jax.random.key(0), 4, min_t=0.0, stratified=True)   # one per quarter
  """
  if stratified:
    u = (jax.random.uniform(rng, ()) + jnp.arange(batch, dtype=jnp.float32)) / batch
  else:
    u = jax.random.uniform(rng, (batch,))
  return min_t + (1.0 - min_t) * u


def corrupt(rng: jax.Array, targets: jax.Array, *, config: DiffusionConfig
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Forward (masking) process: slot i of row b becomes MASK with probability t_b.

  Args:
    rng: PRNG key.
    targets: [B, L] int target classes.
    config: the head's config (`min_t`, `stratified_t`, `mask_class`).

  Returns:
    `(slots [B, L] int32, masked [B, L] bool, t [B] float32)`, slots = MASK where masked,
    else the target.

  Example:
    >>> slots, masked, t = corrupt(jax.random.key(0), targets, config=config)
  """
  rng_t, rng_m = jax.random.split(rng)
  t = sample_t(rng_t, targets.shape[0], min_t=config.min_t, stratified=config.stratified_t)
  masked = jax.random.uniform(rng_m, targets.shape) < t[:, None]
  slots = jnp.where(masked, config.mask_class, targets).astype(jnp.int32)
  return slots, masked, t


def masked_loss(logits: jax.Array, targets: jax.Array, masked: jax.Array, t: jax.Array, *,
                weighting: str) -> jax.Array:
  """The diffusion loss from slot logits (see the module docstring).

  Args:
    logits: [B, L, C] float slot logits.
    targets: [B, L] int classes.
    masked: [B, L] bool, the corrupted slots.
    t: [B] masking rates.
    weighting: "elbo" | "mean".

  Returns:
    [] float32.

  Example:
    >>> masked_loss(jnp.zeros((1, 2, 4)), jnp.array([[0, 1]]), jnp.array([[True, False]]),
    ...             jnp.array([0.5]), weighting="elbo")           # (1/0.5) * log 4 / 2
    Array(1.3862944, dtype=float32)
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  m = masked.astype(jnp.float32)
  if weighting == "elbo":
    per_example = jnp.sum(m * ce, axis=-1) / t / targets.shape[1]
    return jnp.mean(per_example)
  return jnp.sum(m * ce) / jnp.maximum(jnp.sum(m), 1.0)


def diffusion_loss(params: PyTree, batch: DiffusionBatch, rng: jax.Array, *,
                   config: DiffusionConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked-diffusion loss of a batch: corrupt the targets, predict the masked slots.

  Args:
    params: head parameters.
    batch: `DiffusionBatch` of B rows.
    rng: PRNG key (masking rates, masks, dropout).
    config: the head's config (static under jit).

  Returns:
    `(loss [], aux)` with aux {"accuracy": argmax accuracy on masked slots, "masked_fraction",
    "mean_t"}.

  Example:
    >>> loss, aux = jax.jit(functools.partial(diffusion_loss, config=cfg))(params, batch, key)
  """
  rng_corrupt, rng_drop = jax.random.split(rng)
  slots, masked, t = corrupt(rng_corrupt, batch.targets, config=config)
  logits = apply_head(params, batch.query_tokens, batch.query_mask, slots, config=config,
                      dropout_rng=rng_drop)
  loss = masked_loss(logits, batch.targets, masked, t, weighting=config.weighting)
  m = masked.astype(jnp.float32)
  hits = (jnp.argmax(logits, -1) == batch.targets).astype(jnp.float32)
  aux = {"accuracy": jnp.sum(hits * m) / jnp.maximum(jnp.sum(m), 1.0),
         "masked_fraction": jnp.mean(m), "mean_t": jnp.mean(t)}
  return loss, aux


# ----------------------------------------------------------------------------- training


def make_optimizer(steps: int, *, learning_rate: float = 1e-3, warmup_steps: int = 100,
                   weight_decay: float = 0.01, grad_clip: float = 1.0
                   ) -> optax.GradientTransformation:
  """AdamW with linear warm-up then cosine decay to 10% over `steps`, global-norm clipping.

  Example:
    >>> tx = make_optimizer(1000, learning_rate=1e-3)
  """
  warmup_steps = max(1, min(warmup_steps, steps))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps, max(steps, warmup_steps + 1),
      end_value=0.1 * learning_rate)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=weight_decay))
  return optax.chain(*parts)


def make_train_step(config: DiffusionConfig, tx: optax.GradientTransformation):
  """A jitted `(params, opt_state, batch, rng) -> (params, opt_state, loss, aux)`.

  Example:
    >>> step = make_train_step(config, tx)
    >>> params, opt_state, loss, aux = step(params, tx.init(params), batch, key)
  """
  grad_fn = jax.value_and_grad(functools.partial(diffusion_loss, config=config), has_aux=True)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch, rng):
    (loss, aux), grads = grad_fn(params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux

  return step


def train_diffusion_head(config: DiffusionConfig, query_tokens: np.ndarray,
                         query_mask: np.ndarray, doc_rows: np.ndarray, docids: DocIds, *,
                         steps: int, batch_size: int = 64, learning_rate: float = 1e-3,
                         warmup_steps: int = 100, weight_decay: float = 0.01, seed: int = 0,
                         params: PyTree | None = None, log_every: int = 0,
                         time_budget_s: float | None = None
                         ) -> tuple[PyTree, list[dict[str, float]]]:
  """Trains a head on (query, document) pairs: each example's targets are its doc's slots.

  Batches are drawn uniformly with replacement (a fresh permutation per epoch) from the M
  examples, from `seed`.

  Args:
    config: head config (`num_codes` / `num_slots` must match `docids`).
    query_tokens: [M, P] int text ids (queries and/or document texts; see `pad_queries`).
    query_mask: [M, P] int, 1 for real tokens.
    doc_rows: [M] int doc row of each example (index into `docids`).
    docids: the docIDs.
    steps: optimizer steps.
    batch_size: examples per step.
    learning_rate, warmup_steps, weight_decay: AdamW (`make_optimizer`).
    seed: seeds the initial parameters, the batches and the masks.
    params: initial parameters (default: `init_diffusion_params(config, key(seed))`); they
      are copied, not donated.
    log_every: record the loss every this many steps (0: only the last step).
    time_budget_s: stop early after this many seconds of training (None: no limit).

  Returns:
    `(params, history)`; history holds {"step", "loss", "accuracy", "seconds"} rows.

  Raises:
    ValueError: mismatched shapes, doc rows out of range, or a config that does not fit
      `docids`.

  Example:
    >>> params, hist = train_diffusion_head(cfg, q, qm, rows, docids, steps=300)
  """
  query_tokens = np.asarray(query_tokens, np.int32)
  query_mask = np.asarray(query_mask, np.int32)
  doc_rows = np.asarray(doc_rows, np.int64)
  targets_all = slot_targets(docids)
  if docids.num_codes != config.num_codes or targets_all.shape[1] != config.num_slots:
    raise ValueError(f"config has num_codes={config.num_codes}, num_slots={config.num_slots} "
                     f"but the docids need num_codes={docids.num_codes}, "
                     f"num_slots={targets_all.shape[1]}")
  m = query_tokens.shape[0]
  if query_tokens.shape != (m, config.max_query_len) or query_mask.shape != query_tokens.shape \
      or doc_rows.shape != (m,):
    raise ValueError(f"query_tokens / query_mask must be [M, {config.max_query_len}] and "
                     f"doc_rows [M], got {query_tokens.shape}, {query_mask.shape}, "
                     f"{doc_rows.shape}")
  if m == 0 or doc_rows.min() < 0 or doc_rows.max() >= targets_all.shape[0]:
    raise ValueError(f"doc_rows must be non-empty and in [0, {targets_all.shape[0]})")
  if steps < 1 or batch_size < 1:
    raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
  targets = targets_all[doc_rows]
  rng = jax.random.key(seed)
  rng, init_rng = jax.random.split(rng)
  if params is None:
    params = init_diffusion_params(config, init_rng)
  else:
    params = jax.tree.map(jnp.array, params)      # a copy: the train step donates its input
  tx = make_optimizer(steps, learning_rate=learning_rate, warmup_steps=warmup_steps,
                      weight_decay=weight_decay)
  opt_state = tx.init(params)
  step_fn = make_train_step(config, tx)
  order_rng = np.random.default_rng(seed)
  order = np.empty(0, np.int64)
  history = []
  start = time.perf_counter()
  for step in range(steps):
    while len(order) < batch_size:
      order = np.concatenate([order, order_rng.permutation(m)])
    idx, order = order[:batch_size], order[batch_size:]
    batch = DiffusionBatch(jnp.asarray(query_tokens[idx]), jnp.asarray(query_mask[idx]),
                           jnp.asarray(targets[idx]))
    params, opt_state, loss, aux = step_fn(params, opt_state, batch,
                                           jax.random.fold_in(rng, step))
    last = step == steps - 1
    out_of_time = time_budget_s is not None and time.perf_counter() - start > time_budget_s
    if last or out_of_time or (log_every and step % log_every == 0):
      history.append({"step": step, "loss": float(loss), "accuracy": float(aux["accuracy"]),
                      "seconds": time.perf_counter() - start})
    if out_of_time:
      break
  return params, history


# ----------------------------------------------------------------------------- decoding


def unmask_schedule(num_slots: int, num_steps: int) -> np.ndarray:
  """Slots unmasked at each of T steps: `floor((s+1) L / T) - floor(s L / T)` ([T] int32).

  Example:
    >>> unmask_schedule(4, 4), unmask_schedule(4, 1), unmask_schedule(5, 2)
    (array([1, 1, 1, 1], dtype=int32), array([4], dtype=int32), array([2, 3], dtype=int32))
  """
  if not 1 <= num_steps <= num_slots:
    raise ValueError(f"num_steps must be in [1, num_slots={num_slots}], got {num_steps}")
  s = np.arange(num_steps + 1)
  return np.diff((s * num_slots) // num_steps).astype(np.int32)


class DecodeResult(NamedTuple):
  """Output of `diffusion_decode`."""

  classes: jax.Array      # [B, L] int32 decoded classes in [0, K + 2) (never MASK)
  logp: jax.Array         # [B, L] float32 log-prob of each class when it was unmasked
  scores: jax.Array       # [B] float32 sum of `logp`
  step_filled: jax.Array  # [B, L] int32 the step (0 .. T-1) that unmasked each slot


def allowed_classes(slots: jax.Array, targets: jax.Array, num_classes: int,
                    mask_class: int) -> jax.Array:
  """Which class each slot may take so that the slots still spell some docID.

  A docID (row n of `targets`) is consistent with partly decoded `slots` when it agrees with
  every unmasked slot; slot j may take class c when some consistent docID has c at j.

  Args:
    slots: [B, L] int32 classes, `mask_class` where not decoded yet.
    targets: [N, L] int32 the docIDs' slot classes (`slot_targets`).
    num_classes: C = K + 2.
    mask_class: the MASK class.

  Returns:
    [B, L, C] bool. Cost O(B N L) (a scatter-max per slot), no [N, L, C] table.

  Example:
    >>> t = jnp.array([[0, 1, 3], [0, 2, 3], [2, 3, 4]])        # K = 3: END 3, PAD 4, MASK 5
    >>> allowed_classes(jnp.array([[0, 5, 5]]), t, 5, 5)[0, 1]   # after code 0: 1 or 2
    Array([False,  True,  True, False, False], dtype=bool)
  """
  undecided = slots == mask_class                                               # [B, L]
  agree = (targets[None, :, :] == slots[:, None, :]) | undecided[:, None, :]    # [B, N, L]
  consistent = jnp.all(agree, axis=-1).astype(jnp.int32)                        # [B, N]
  per_slot = [jnp.zeros((slots.shape[0], num_classes), jnp.int32)
              .at[:, targets[:, j]].max(consistent) for j in range(slots.shape[1])]
  return jnp.stack(per_slot, axis=1) > 0                                        # [B, L, C]


def diffusion_decode(params: PyTree, query_tokens: jax.Array, query_mask: jax.Array, *,
                     config: DiffusionConfig, num_steps: int | jax.Array,
                     rng: jax.Array | None = None,
                     temperature: jax.Array | float = 0.0,
                     docid_targets: jax.Array | np.ndarray | None = None) -> DecodeResult:
  """Decodes docID slots in `num_steps` parallel denoising steps, confident slots first.

  Jitted with `config` static; `num_steps` is traced (a `while` loop), so one compilation
  serves every T for a given batch shape.

  Constrained decoding (`docid_targets`, the [N, L] `slot_targets` of the valid docIDs): each
  step still runs the model once, but its slots are committed one at a time, most confident
  first, each choosing among the classes that keep the slots consistent with at least one
  docID (`allowed_classes`, recomputed after every commit, no extra forward pass). The output
  is then always a valid docID (codes, END, PAD as in `targets`); with a `targets` that
  allows every class sequence it equals unconstrained decoding. This is the diffusion
  counterpart of trie-constrained beam search (DiffuGR decodes unconstrained).

  Args:
    params: head parameters.
    query_tokens: [B, P] int text ids, right-padded.
    query_mask: [B, P] int, 1 for real tokens.
    config: the head's config.
    num_steps: T in [1, L]: step s unmasks `unmask_schedule(L, T)[s]` slots.
    rng: PRNG key for the Gumbel noise (only used where temperature > 0; default key(0)).
    temperature: scalar or [B]: 0 = greedy; tau > 0 samples each slot's class by Gumbel-max
      `argmax(log p + tau g)` and perturbs the unmasking order by `tau g'`.
    docid_targets: optional [N, L] int classes of the docIDs to constrain decoding to.

  Returns:
    `DecodeResult` (classes, per-slot log-probs (the model's, not renormalised over the
    allowed classes), scores, fill steps).

  Raises:
    ValueError: a Python int `num_steps` outside [1, L]; `docid_targets` not [N, L] classes.

  Example:
    >>> out = diffusion_decode(params, q, qm, config=cfg, num_steps=cfg.num_slots)
    >>> out.step_filled[0]                               # one slot per step
  """
  if isinstance(num_steps, (int, np.integer)) and not 1 <= num_steps <= config.num_slots:
    raise ValueError(f"num_steps must be in [1, num_slots={config.num_slots}], got {num_steps}")
  rng = jax.random.key(0) if rng is None else rng
  if docid_targets is not None:
    shape = np.shape(docid_targets)
    if len(shape) != 2 or shape[1] != config.num_slots or shape[0] < 1:
      raise ValueError(f"docid_targets must be [N >= 1, num_slots={config.num_slots}] slot "
                       f"classes (slot_targets(docids)), got shape {shape}")
    if isinstance(docid_targets, np.ndarray) and (
        docid_targets.min() < 0 or docid_targets.max() >= config.num_classes):
      raise ValueError(f"docid_targets must hold classes in [0, {config.num_classes}), got "
                       f"[{docid_targets.min()}, {docid_targets.max()}]")
    docid_targets = jnp.asarray(docid_targets, jnp.int32)
  return _decode(params, query_tokens, query_mask, jnp.asarray(num_steps, jnp.int32), rng,
                 jnp.asarray(temperature, jnp.float32), docid_targets, config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def _decode(params, query_tokens, query_mask, num_steps, rng, temperature, targets, *,
            config: DiffusionConfig) -> DecodeResult:
  b = query_tokens.shape[0]
  l, c = config.num_slots, config.num_classes
  num_steps = jnp.clip(num_steps, 1, l)
  tau = jnp.broadcast_to(temperature, (b,))
  neg_inf = jnp.float32(-jnp.inf)

  def body(s, carry):
    slots, logp_kept, step_filled = carry
    count = ((s + 1) * l) // num_steps - (s * l) // num_steps     # unmask_schedule(L, T)[s]
    logits = apply_head(params, query_tokens, query_mask, slots, config=config)
    logp = jax.nn.log_softmax(logits, axis=-1)                            # [B, L, C]
    rng_class, rng_order = jax.random.split(jax.random.fold_in(rng, s))
    g = jax.random.gumbel(rng_class, (b, l, c))
    if targets is not None:
      return _commit_constrained(carry, s, count, logp, logp + tau[:, None, None] * g,
                                 tau[:, None] * jax.random.gumbel(rng_order, (b, l)),
                                 targets, config)
    choice = jnp.argmax(logp + tau[:, None, None] * g, axis=-1)          # [B, L]
    chosen = jnp.take_along_axis(logp, choice[..., None], axis=-1)[..., 0]
    is_masked = slots == config.mask_class
    conf = chosen + tau[:, None] * jax.random.gumbel(rng_order, (b, l))
    conf = jnp.where(is_masked, conf, neg_inf)
    rank = jnp.argsort(jnp.argsort(-conf, axis=-1, stable=True), axis=-1, stable=True)
    fill = is_masked & (rank < count)
    slots = jnp.where(fill, choice, slots).astype(jnp.int32)
    logp_kept = jnp.where(fill, chosen, logp_kept)
    step_filled = jnp.where(fill, s, step_filled).astype(jnp.int32)
    return slots, logp_kept, step_filled

  init = (jnp.full((b, l), config.mask_class, jnp.int32), jnp.zeros((b, l), jnp.float32),
          jnp.full((b, l), -1, jnp.int32))
  slots, logp_kept, step_filled = jax.lax.fori_loop(0, num_steps, body, init)
  return DecodeResult(slots, logp_kept, jnp.sum(logp_kept, axis=-1), step_filled)


def _commit_constrained(carry, s, count, logp, noisy_logp, order_noise, targets,
                        config: DiffusionConfig):
  """One constrained denoising step: `count` slots committed one by one, each the most
  confident masked slot with its best class among `allowed_classes` after the earlier ones.

  logp / noisy_logp: [B, L, C] (noisy = logp + tau g); order_noise: [B, L] (tau g').
  """
  neg_inf = jnp.float32(-jnp.inf)
  l = config.num_slots

  def commit(_, inner):
    slots, logp_kept, step_filled = inner
    allowed = allowed_classes(slots, targets, config.num_classes, config.mask_class)
    choice = jnp.argmax(jnp.where(allowed, noisy_logp, neg_inf), axis=-1)   # [B, L]
    chosen = jnp.take_along_axis(logp, choice[..., None], axis=-1)[..., 0]
    is_masked = slots == config.mask_class
    conf = jnp.where(is_masked, chosen + order_noise, neg_inf)
    fill = (jax.nn.one_hot(jnp.argmax(conf, axis=-1), l, dtype=jnp.bool_)
            & is_masked)                                                    # [B, L]
    slots = jnp.where(fill, choice, slots).astype(jnp.int32)
    logp_kept = jnp.where(fill, chosen, logp_kept)
    step_filled = jnp.where(fill, s, step_filled).astype(jnp.int32)
    return slots, logp_kept, step_filled

  return jax.lax.fori_loop(0, count, commit, carry)


class DiffusionRetrieval(NamedTuple):
  """Output of `diffusion_retrieve` (host arrays)."""

  docs: np.ndarray        # [B, k] int32 doc rows, best first; -1 padding
  scores: np.ndarray      # [B, k] float32 their scores (-inf padding)
  greedy_docs: np.ndarray  # [B] int32 doc of the greedy (sample 0) decode, -1 if invalid
  valid: np.ndarray       # [B, S] bool, which of the S decodes were valid docIDs
  valid_fraction: float   # mean of `valid`


def rank_samples(docs: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Dedupes S sampled doc rows per query (best score each, -1 dropped) and keeps the top k.

  Args:
    docs: [B, S] int doc rows, -1 invalid.
    scores: [B, S] float scores.
    k: documents to return.

  Returns:
    `([B, k] int32 docs, [B, k] float32 scores)`, best first (ties: lower doc row first),
    padded with -1 / -inf.

  Example:
    >>> rank_samples(np.array([[4, 2, 4, -1]]), np.array([[-1., -3., -0.5, 0.]]), 3)
    (array([[ 4,  2, -1]], dtype=int32), array([[-0.5, -3. , -inf]], dtype=float32))
  """
  docs = np.asarray(docs)
  scores = np.asarray(scores, np.float32)
  out_docs = np.full((docs.shape[0], k), -1, np.int32)
  out_scores = np.full((docs.shape[0], k), -np.inf, np.float32)
  for i in range(docs.shape[0]):
    best: dict[int, float] = {}
    for d, s in zip(docs[i].tolist(), scores[i].tolist()):
      if d >= 0 and (d not in best or s > best[d]):
        best[d] = s
    ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    for j, (d, s) in enumerate(ranked):
      out_docs[i, j], out_scores[i, j] = d, s
  return out_docs, out_scores


def diffusion_retrieve(params: PyTree, query_tokens: np.ndarray, query_mask: np.ndarray,
                       trie: Any, *, config: DiffusionConfig, num_steps: int,
                       num_samples: int = 1, k: int = 10, rng: jax.Array | None = None,
                       temperature: float = 1.0, batch_size: int | None = None,
                       strict: bool = False,
                       docid_targets: np.ndarray | None = None) -> DiffusionRetrieval:
  """Top-k documents per query from `num_samples` parallel decodes (see module docstring).

  Sample 0 of each query is greedy; samples 1 .. S-1 use `temperature` with noise from
  `rng`. Each decode is mapped to a doc row with the trie (`decoded_docs`), invalid ones are
  dropped, duplicates keep their best score.

  Args:
    params: head parameters.
    query_tokens: [Q, P] int, query_mask: [Q, P] int.
    trie: `Trie` of the docIDs.
    config: head config.
    num_steps: T in [1, L].
    num_samples: S >= 1 decodes per query.
    k: documents returned per query.
    rng: PRNG key for the sampled decodes (default key(0)).
    temperature: tau of samples 1 .. S-1 (> 0 when S > 1).
    batch_size: queries per jitted call (default all; one compilation per distinct size).
    strict: `decoded_docs(strict=...)`: also require PAD after END.
    docid_targets: [N, L] `slot_targets(docids)` to constrain decoding to the docIDs (every
      decode then valid); None decodes unconstrained.

  Returns:
    `DiffusionRetrieval`.

  Example:
    >>> r = diffusion_retrieve(params, q, qm, trie, config=cfg, num_steps=2, num_samples=16,
    ...                        k=10, rng=jax.random.key(1))
    >>> r.docs.shape, r.valid_fraction
  """
  if num_samples < 1 or k < 1:
    raise ValueError(f"num_samples and k must be >= 1, got {num_samples}, {k}")
  if num_samples > 1 and not temperature > 0:
    raise ValueError(f"temperature must be > 0 when num_samples > 1, got {temperature}")
  query_tokens = np.asarray(query_tokens, np.int32)
  query_mask = np.asarray(query_mask, np.int32)
  q = query_tokens.shape[0]
  rng = jax.random.key(0) if rng is None else rng
  batch_size = q if batch_size is None else batch_size
  taus = np.full((num_samples,), temperature, np.float32)
  taus[0] = 0.0
  all_classes, all_scores = [], []
  for start in range(0, q, batch_size):
    stop = min(q, start + batch_size)
    n = stop - start
    tok = np.repeat(query_tokens[start:stop], num_samples, axis=0)
    msk = np.repeat(query_mask[start:stop], num_samples, axis=0)
    if n < batch_size and start > 0:         # pad the last batch to one compiled shape
      pad = (batch_size - n) * num_samples
      tok = np.concatenate([tok, np.repeat(tok[:1], pad, 0)])
      msk = np.concatenate([msk, np.repeat(msk[:1], pad, 0)])
    out = diffusion_decode(params, tok, msk, config=config, num_steps=num_steps,
                           rng=jax.random.fold_in(rng, start),
                           temperature=np.tile(taus, tok.shape[0] // num_samples),
                           docid_targets=docid_targets)
    all_classes.append(np.asarray(out.classes)[:n * num_samples])
    all_scores.append(np.asarray(out.scores)[:n * num_samples])
  classes = np.concatenate(all_classes).reshape(q, num_samples, config.num_slots)
  scores = np.concatenate(all_scores).reshape(q, num_samples)
  docs = decoded_docs(classes, trie, config.num_codes, strict=strict)     # [Q, S]
  top_docs, top_scores = rank_samples(docs, scores, k)
  valid = docs >= 0
  return DiffusionRetrieval(top_docs, top_scores, docs[:, 0].astype(np.int32), valid,
                            float(valid.mean()) if valid.size else math.nan)
