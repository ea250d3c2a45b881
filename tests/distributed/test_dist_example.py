"""examples/data_parallel.py trains on 8 devices with FSDP-sharded state."""

import importlib.util
import os

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--steps", "2", "--width", "32", "--layers", "1", "--heads", "2",
        "--seq-len", "16", "--batch-size", "16", "--max-bytes", "20000",
        "--log-every", "1"]


def load_example():
  path = os.path.join(ROOT, "examples", "data_parallel.py")
  spec = importlib.util.spec_from_file_location("data_parallel", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("optimizer", ["soaa"])
def test_data_parallel_example(optimizer):
  out = load_example().main(TINY + ["--optimizer", optimizer, "--fsdp", "2"])
  assert out["losses"].shape == (2,)
  assert np.all(np.isfinite(out["losses"]))
  assert dict(out["mesh"].shape) == {"data": 4, "fsdp": 2}
  # The params that can be split are split, and their moments with them.
  kernel = out["params"]["block_0"]["mlp_in"]["kernel"]
  assert not kernel.sharding.is_fully_replicated
  mu = out["opt_state"][0].mu["block_0"]["mlp_in"]["kernel"]
  assert mu.sharding.is_equivalent_to(kernel.sharding, mu.ndim)
  for leaf, sharding in zip(jax.tree.leaves(out["opt_state"]),
                            jax.tree.leaves(out["state_shardings"])):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
