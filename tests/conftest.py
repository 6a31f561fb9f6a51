"""Test configuration: 8 fake CPU devices and LLVM -O0 (tests/xla_env.py), set before jax is
imported, and one compilation cache shared by every process of the run.

The suite compiles the same small programs many times: the same tiny launcher config in a
dozen subprocesses, the same notebook cells, the same update step in several test files. A
persistent XLA compilation cache in a directory made for this run (every xdist worker and
every subprocess inherits it through the environment) compiles each once; a cache hit is the
same executable, so results are bit for bit those of a cold run (the kill/resume and
launcher tests compare runs exactly). It starts empty on every run: nothing carries over
between runs. Set `JAX_COMPILATION_CACHE_DIR` yourself to keep one across runs, or to an
empty string to switch it off.

`JAXSEARCH_COMPILE_REPORT=FILE` appends one JSON line per test to FILE: how many programs it
compiled (XLA backend compiles, cache hits excluded) and the seconds spent tracing, lowering
and compiling them; where the suite's time goes is mostly there. Subprocesses are not
counted.
"""
import os
import shutil
import sys
import tempfile

from xla_env import xla_flags  # noqa: E402  (tests/ is on the path of its conftest)

os.environ.setdefault("XLA_FLAGS", xla_flags(devices=8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",   # the tiny test programs too
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    # A size limit turns on the cache's file lock: processes then never read a half-written
    # entry. Far above what the suite writes (~100 MB).
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30),
}


def pytest_configure(config):
  if hasattr(config, "workerinput"):    # an xdist worker: the controller set the environment
    return
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    config._jaxsearch_cache_dir = tempfile.mkdtemp(prefix="jaxsearch-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config._jaxsearch_cache_dir
  if os.environ["JAX_COMPILATION_CACHE_DIR"]:
    for name, value in _CACHE_ENV.items():
      os.environ.setdefault(name, value)
    if "jax" in sys.modules:            # imported by a plugin before this hook: tell it too
      import jax  # noqa: PLC0415
      jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
      for name in _CACHE_ENV:
        value = float(os.environ[name])
        jax.config.update(name.lower(), value if "TIME" in name else int(value))


def pytest_unconfigure(config):
  cache_dir = getattr(config, "_jaxsearch_cache_dir", None)
  if cache_dir:
    shutil.rmtree(cache_dir, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  import jax  # noqa: PLC0415
  if jax.default_backend() != "gpu":
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
      if "gpu_only" in item.keywords:
        item.add_marker(skip)


_COMPILE_EVENTS = {"/jax/core/compile/backend_compile_duration": "compile_s",
                   "/jax/core/compile/jaxpr_trace_duration": "trace_s",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s"}
_compile_totals: dict[str, float] = {}
_listening = False


def _on_duration(event: str, duration: float, **_) -> None:
  key = _COMPILE_EVENTS.get(event)
  if key:
    _compile_totals[key] = _compile_totals.get(key, 0.0) + duration
    if key == "compile_s":
      _compile_totals["compiles"] = _compile_totals.get("compiles", 0) + 1


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  path = os.environ.get("JAXSEARCH_COMPILE_REPORT")
  if not path:
    yield
    return
  import json  # noqa: PLC0415
  import time  # noqa: PLC0415

  import jax  # noqa: PLC0415
  global _listening
  if not _listening:
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _listening = True
  _compile_totals.clear()
  t0 = time.perf_counter()
  yield
  row = {"test": item.nodeid, "wall_s": round(time.perf_counter() - t0, 3),
         **{k: round(v, 3) for k, v in _compile_totals.items()}}
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
