"""The 8-device tests: run by tests/test_distributed.py in a subprocess.

They need XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX
is imported, which the main test process (JAX already imported) cannot do;
there they are skipped.
"""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))

N_DEVICES = 8


def pytest_collection_modifyitems(config, items):
  del config
  if jax.device_count() >= N_DEVICES:
    return
  skip = pytest.mark.skip(
      reason=f"needs {N_DEVICES} devices; run through tests/test_distributed.py"
  )
  for item in items:
    if "tests/distributed/" in str(item.fspath).replace(os.sep, "/"):
      item.add_marker(skip)
