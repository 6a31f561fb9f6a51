"""Token sampling from logits: greedy, temperature, top-k and nucleus (top-p), explicit keys."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_logits(
    rng: jax.Array,
    logits: jax.Array,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """Samples one token per row.

  Args:
    rng: PRNG key, or [N] keys (one per row: row n's token depends on its own key only).
    logits: [N, V] float, unnormalised next-token logits.
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_p: nucleus mass in (0, 1]; 1 keeps the whole distribution. Static.
    top_k: keep only the k most likely tokens (ties at the k-th logit are kept too); 0 keeps
      all. Static. Applied before top-p, as transformers and vLLM do.

  Returns:
    `(tokens [N] int32, logp [N] float32)`: the sampled tokens and their log-probability under
    the tempered distribution (before top-k / nucleus truncation), which is what the trainer
    recomputes.

  Example:
    >>> tokens, logp = sample_logits(jax.random.key(0), logits, temperature=1.0, top_p=0.9)
  """
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
  logits = logits.astype(jnp.float32)
  if temperature == 0.0:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
  else:
    logits = logits / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    masked = logits
    if 0 < top_k < logits.shape[-1]:
      kth = jax.lax.top_k(logits, top_k)[0][:, -1:]                     # [N, 1]
      masked = jnp.where(logits >= kth, logits, -jnp.inf)
    if top_p < 1.0:
      sorted_logits = jnp.sort(masked, axis=-1)[:, ::-1]
      cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
      # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
      keep = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
      threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
      masked = jnp.where(masked >= threshold, masked, -jnp.inf)
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    if rng.ndim == (1 if typed else 2):   # a key per row
      tokens = jax.vmap(lambda k, row: jax.random.categorical(k, row))(rng, masked)
    else:
      tokens = jax.random.categorical(rng, masked, axis=-1)
    tokens = tokens.astype(jnp.int32)
  return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
