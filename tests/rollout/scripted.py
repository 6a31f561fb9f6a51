"""A scripted 'policy' for rollout tests (a test helper, no tests here).

`scripted_policy(scripts, vocab_size)` returns `(decode_fn, init_cache_fn)` for
`jaxsearch.rollout.search_env.make_rollout_fn`: the greedy choice of row i is the next id of
`scripts[i]`. Its 'cache' is a pointer per row, advanced when the token just fed is the
expected one, so forced tokens (the prompt, environment blocks) must not equal the id a row
expects next: tests script actions that start with ids no forced block contains.

Example:
  >>> decode_fn, init_cache_fn = scripted_policy([[S_OPEN, 11, S_CLOSE, EOS]], vocab_size=40)
"""
import jax
import jax.numpy as jnp


def scripted_policy(scripts, vocab_size: int):
  """`(decode_fn, init_cache_fn)` whose greedy tokens are each row's script."""
  scripts = jnp.asarray(scripts, jnp.int32)
  last = scripts.shape[1] - 1

  def init_cache_fn(n, length):
    del length
    return jnp.zeros((n,), jnp.int32)

  def decode_fn(params, tokens, ptr, index, positions=None, kv_mask=None, logits_at=None):
    # Feeds the row's tokens in order (up to `logits_at`, the chunked engine's last kept one);
    # the pointer moves past each token that is the one the row expects next.
    del params, index, positions, kv_mask
    width = tokens.shape[1]
    last_fed = (jnp.full((tokens.shape[0],), width - 1, jnp.int32) if logits_at is None
                else logits_at)
    for j in range(width):
      expected = jnp.take_along_axis(scripts, jnp.minimum(ptr, last)[:, None], 1)[:, 0]
      ptr = ptr + ((tokens[:, j] == expected) & (j <= last_fed))
    nxt = jnp.take_along_axis(scripts, jnp.minimum(ptr, last)[:, None], 1)[:, 0]
    logits = 50.0 * jax.nn.one_hot(nxt, vocab_size)
    return (logits if logits_at is not None else logits[:, None, :]), ptr

  return decode_fn, init_cache_fn
