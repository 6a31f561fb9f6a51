"""XLA settings shared by the test processes and every program a test starts.

The suite's programs are tiny, so on CPU its time goes to compiling them, and most of a
compile is LLVM optimising code that then runs for milliseconds. The tests compile at LLVM
`-O0` (`--xla_backend_optimization_level=0`): about half the compile time, measured on this
suite's files. It changes how fast the machine code runs, not what it computes: XLA's own
graph passes, fusion and numerics flags are the defaults. Runs that tests compare with each
other all get the same flags. Users' runs are not affected.
"""
from __future__ import annotations

import os

COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 1) -> str:
  """`XLA_FLAGS` for a test process with `devices` fake CPU devices."""
  if devices > 1:
    return f"{COMPILE_FLAGS} --xla_force_host_platform_device_count={devices}"
  return COMPILE_FLAGS


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """The environment of a program a test starts: CPU, `devices` devices, quiet, + `extra`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices),
             TF_CPP_MIN_LOG_LEVEL="3")
  env.update(extra)
  return env
