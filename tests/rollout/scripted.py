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

  def decode_fn(params, tokens, ptr, index):
    del params, index
    expected = jnp.take_along_axis(scripts, jnp.minimum(ptr, last)[:, None], 1)
    ptr = ptr + (tokens[:, 0] == expected[:, 0])
    nxt = jnp.take_along_axis(scripts, jnp.minimum(ptr, last)[:, None], 1)[:, 0]
    return 50.0 * jax.nn.one_hot(nxt, vocab_size)[:, None, :], ptr

  return decode_fn, init_cache_fn
