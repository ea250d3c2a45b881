"""examples/data_parallel.py trains with FSDP-sharded state, in 1 or 2 processes."""

import functools
import importlib.util
import os
import re

import jax
import numpy as np
import pytest

import launch

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "data_parallel.py")
TINY = ("--steps", "2", "--width", "32", "--layers", "1", "--heads", "2",
        "--seq-len", "16", "--batch-size", "16", "--max-bytes", "20000",
        "--log-every", "1", "--fsdp", "2")
# Its processes, from start to exit (imports and compiles included).
RUN_TIMEOUT = 300


def load_example():
  spec = importlib.util.spec_from_file_location("data_parallel", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@functools.lru_cache(maxsize=None)
def run_here(*argv):
  """The example in this process (8 devices)."""
  return load_example().main(list(argv))


@pytest.mark.parametrize("optimizer", ["soaa"])
def test_data_parallel_example(optimizer):
  out = run_here(*TINY, "--optimizer", optimizer)
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


def test_data_parallel_example_in_two_processes(tmp_path):
  """The documented two-process launch, one line per process, trains as here.

  Two processes of 4 devices form the same 8-device mesh and draw the same
  global batches, so process 0 prints the losses of the one-process run (to
  the 4 decimals printed).
  """
  out = str(tmp_path)
  with launch.Processes("example", out, lambda i, port: [
      EXAMPLE, "--multihost", "--coordinator", f"127.0.0.1:{port}",
      "--num-processes", str(launch.N_PROCESSES), "--process-id", str(i),
      "--heartbeat-timeout", "30", "--shutdown-timeout", "30", *TINY,
  ]) as procs:
    codes = procs.wait(RUN_TIMEOUT)
  if any(codes):
    reason = launch.gloo_unavailable_reason(out, RUN_TIMEOUT)
    if reason:
      pytest.skip(reason)
  assert codes == [0] * launch.N_PROCESSES, procs.tails()
  log = procs.log(0)
  assert "8 device(s), 2 process(es), mesh {'data': 4, 'fsdp': 2}" in log, log
  printed = [float(x) for x in re.findall(r"loss (\d+\.\d+) nats/byte", log)]
  here = run_here(*TINY, "--optimizer", "soaa")["losses"]
  np.testing.assert_allclose(printed, here, atol=1.5e-4)
  assert "loss" not in procs.log(1)  # Only process 0 logs.
