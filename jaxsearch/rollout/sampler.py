"""Batched autoregressive sampling with a KV cache, as one compiled program.

`make_sampler` turns a model's cached `decode` into `sample_fn(params, prompts, prompt_mask,
rng)`: the left-padded prompts are prefilled in one chunk, then one `lax.while_loop` samples a
token per row per step until every row has stopped (a stop token, its own length limit, or
`max_new_tokens`). Each prompt is sampled `num_samples` (G) times, rows `b * G + g`, as GRPO
needs.

Left padding: prompt `b` occupies the last `sum(prompt_mask[b])` columns of `prompts`. Its
tokens get RoPE positions 0, 1, ... and padding slots are masked out of attention, so every
row generates exactly what it would generate alone (tested against unpadded decoding).
`left_pad` converts right-padded prompts with lengths.

Returned log-probabilities are those of the sampled tokens under the tempered distribution
before top-k / top-p truncation (for greedy, under the model's distribution), the quantity a
trainer recomputes for importance ratios.

Example:
  >>> cfg = TransformerConfig(vocab_size=64, d_model=32, num_layers=2)
  >>> model = Transformer(cfg)
  >>> sample = make_sampler(transformer.make_decode_fn(model),
  ...                       functools.partial(transformer.init_cache, cfg),
  ...                       SamplerConfig(max_new_tokens=16, temperature=0.7, top_k=20))
  >>> out = jax.jit(sample)(params, prompts, prompt_mask, jax.random.key(0))
  >>> out.tokens.shape   # [B * G, 16]
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.rollout.sampling import sample_logits
from jaxsearch.types import PyTree

DecodeFn = Callable[..., tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig:
  """How to sample.

  Attributes:
    max_new_tokens: M, tokens generated per row at most.
    temperature: 0 is greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0: off).
    top_p: nucleus mass in (0, 1] (1: off).
    num_samples: G, samples per prompt.
    stop_tokens: ids that end a row (the stop token is kept and counted in its length).
    pad_id: written after a row stops.
  """

  max_new_tokens: int = 128
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_samples: int = 1
  stop_tokens: Sequence[int] = ()
  pad_id: int = 0

  def __post_init__(self):
    for name in ("max_new_tokens", "num_samples"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SamplerConfig.{name} must be an int >= 1, got {value!r}")
    if not self.temperature >= 0:
      raise ValueError(f"SamplerConfig.temperature must be >= 0, got {self.temperature!r}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"SamplerConfig.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplerConfig.top_p must be in (0, 1], got {self.top_p!r}")
    object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))


class SampleOutput(NamedTuple):
  """Samples for N = B * G rows (row `b * G + g` is sample g of prompt b)."""

  tokens: jax.Array    # [N, M] int32 generated tokens, `pad_id` after a row stopped
  logp: jax.Array      # [N, M] float32 log-prob of each generated token (0 after the end)
  lengths: jax.Array   # [N] int32 generated tokens, a final stop token included
  stopped: jax.Array   # [N] bool, ended with a stop token (else it hit its length limit)


def left_pad(tokens: np.ndarray, lengths: np.ndarray, pad_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded prompts [B, P] with lengths [B] -> (left-padded [B, P], mask [B, P])."""
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  b, p = tokens.shape
  if lengths.shape != (b,) or np.any(lengths < 1) or np.any(lengths > p):
    raise ValueError(f"lengths must be [B] = [{b}] with values in [1, {p}], got {lengths}")
  mask = np.arange(p)[None, :] >= (p - lengths)[:, None]
  out = np.full_like(tokens, pad_id)
  for i, n in enumerate(lengths):
    out[i, p - n:] = tokens[i, :n]
  return out, mask


def make_sampler(decode_fn: DecodeFn, init_cache_fn: Callable[[int, int], Any],
                 config: SamplerConfig) -> Callable[..., SampleOutput]:
  """Builds a pure, jittable sampling function.

  Args:
    decode_fn: `(params, tokens [N, T], cache, index [], positions [N, T], kv_mask [N, S])
      -> (logits [N, T, V], cache)`, e.g. `jaxsearch.models.transformer.make_decode_fn(model)`.
    init_cache_fn: `(batch, length) -> cache` with room for `length` slots.
    config: sampling settings (static).

  Returns:
    `sample_fn(params, prompts [B, P] int32, prompt_mask [B, P] bool, rng, max_new [B] int32
    | None) -> SampleOutput`; prompts are left-padded (see `left_pad`), `max_new` optionally
    caps each prompt's generated tokens below `config.max_new_tokens`.
  """
  g, m = config.num_samples, config.max_new_tokens
  stops = jnp.asarray(config.stop_tokens, jnp.int32)

  def sample_fn(params: PyTree, prompts, prompt_mask, rng, max_new=None) -> SampleOutput:
    b, p = prompts.shape
    if prompt_mask.shape != (b, p):
      raise ValueError(f"prompt_mask must be [B, P] = {(b, p)}, got {prompt_mask.shape}")
    n = b * g
    prompts = jnp.repeat(jnp.asarray(prompts, jnp.int32), g, axis=0)           # [N, P]
    prompt_mask = jnp.repeat(jnp.asarray(prompt_mask, bool), g, axis=0)        # [N, P]
    limit = jnp.full([b], m, jnp.int32) if max_new is None else jnp.minimum(
        jnp.asarray(max_new, jnp.int32), m)
    limit = jnp.repeat(limit, g)                                               # [N]
    kv_mask = jnp.concatenate([prompt_mask, jnp.ones((n, m), bool)], axis=1)  # [N, P + M]
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    prompt_len = prompt_mask.sum(axis=1).astype(jnp.int32)                     # [N]

    cache = init_cache_fn(n, p + m)
    logits, cache = decode_fn(params, prompts, cache, jnp.int32(0), positions, kv_mask)

    def cond(state):
      step, _, _, _, _, done, *_ = state
      return (step < m) & ~jnp.all(done)

    def body(state):
      step, cache, last, out, out_logp, done, lengths, stopped, rng = state
      rng, key = jax.random.split(rng)
      tok, lp = sample_logits(key, last, temperature=config.temperature, top_p=config.top_p,
                              top_k=config.top_k)
      tok = jnp.where(done, config.pad_id, tok)
      lp = jnp.where(done, 0.0, lp)
      out = out.at[:, step].set(tok)
      out_logp = out_logp.at[:, step].set(lp)
      is_stop = jnp.any(tok[:, None] == stops[None, :], axis=1) & ~done
      lengths = lengths + (~done).astype(jnp.int32)
      stopped = stopped | is_stop
      done = done | is_stop | (lengths >= limit)
      logits, cache = decode_fn(params, tok[:, None], cache, p + step,
                                (prompt_len + step)[:, None], kv_mask)
      return (step + 1, cache, logits[:, -1], out, out_logp, done, lengths, stopped, rng)

    state = (jnp.int32(0), cache, logits[:, -1], jnp.full((n, m), config.pad_id, jnp.int32),
             jnp.zeros((n, m), jnp.float32), limit <= 0, jnp.zeros([n], jnp.int32),
             jnp.zeros([n], bool), rng)
    _, _, _, out, out_logp, _, lengths, stopped, _ = jax.lax.while_loop(cond, body, state)
    return SampleOutput(tokens=out, logp=out_logp, lengths=lengths, stopped=stopped)

  return sample_fn
