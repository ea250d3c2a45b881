"""Shared fixtures for the optax_soaa tests."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs a test with 64-bit JAX types (for float64 reference comparisons)."""
  with jax.enable_x64(True):
    yield
