"""Flax `init` / `apply` as compiled programs, for tests.

Called outside `jax.jit`, a Flax module runs op by op and every operation is its own XLA
compile (a tiny transformer's init is ~100 of them, ~4 s here); the suite's time is mostly
compiling. These wrappers compile one program per (module, shapes) instead. The module is a
static argument (Flax modules hash by their fields), as are the boolean flags below.
"""
from __future__ import annotations

import functools

import jax

_STATIC = ("method", "return_logits", "return_hidden", "return_lm_logits", "mutable",
           "deterministic", "train")


@functools.partial(jax.jit, static_argnums=0, static_argnames=_STATIC)
def apply(module, variables, *args, **kwargs):
  """`module.apply(variables, *args, **kwargs)`, jitted."""
  return module.apply(variables, *args, **kwargs)


@functools.partial(jax.jit, static_argnums=0, static_argnames=_STATIC)
def init(module, rng, *args, **kwargs):
  """`module.init(rng, *args, **kwargs)`, jitted (boxed metadata kept)."""
  return module.init(rng, *args, **kwargs)
