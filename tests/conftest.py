"""Test configuration: 8 fake CPU devices, set before jax is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  import jax  # noqa: PLC0415
  if jax.default_backend() != "gpu":
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
      if "gpu_only" in item.keywords:
        item.add_marker(skip)
