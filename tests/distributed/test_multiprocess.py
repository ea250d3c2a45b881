"""Two processes of 4 CPU devices each train exactly as one process of 8.

Run in the 8-device process of tests/test_distributed.py. Each test starts
its processes with multiprocess_worker.py (jax.distributed on a free port of
127.0.0.1, gloo collectives, XLA_FLAGS giving each process 4 devices) and
compares what they write with this process's own 8-device runs, which the
tests of test_dist_equivalence.py share:

* every optimizer, under sharded jit (FSDP, the state laid out by
  ``optax_soaa.state_shardings``) and under shard_map data parallel, ends
  with the same params, state and losses (harness.TOL, float32 rounding);
* a checkpoint saved by the two processes restores here on another mesh,
  and one saved here restores in the two processes on another mesh, both
  bit-identical;
* a process killed after its first step makes the other fail, with the
  distributed service's error, within a bounded time.

Skipped, with the workers' message, where jaxlib has no gloo CPU collectives.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import dist_harness as harness
import launch
import multiprocess_worker as worker
from optax_soaa import checkpoint

# The processes of one run, from start to exit (compiles included).
RUN_TIMEOUT = 300
# Short timeouts of jax.distributed for the death test (JAX's defaults: 100
# and 300 s): a process that stops sending heartbeats for HEARTBEAT seconds is
# dead; a process that exits waits SHUTDOWN seconds for the others to exit.
HEARTBEAT = 10
SHUTDOWN = 10
# Failure detection must take at most this long after the death.
DEATH_DETECTED_WITHIN = max(HEARTBEAT, SHUTDOWN) + 25
FATAL = "JAX distributed service detected fatal errors"


def run_two_processes(out: str) -> dict[str, np.ndarray]:
  """The workers' results.npz, after they trained and restored in `out`."""
  for name in harness.CASES:
    live = harness.cached_run("sharded_jit", name)[3]
    checkpoint.save(os.path.join(out, "from_one", name), live["params"],
                    live["state"], step=harness.STEPS)
  with launch.workers("train", out) as procs:
    # This process's data-parallel runs, while the workers train.
    for name in harness.CASES:
      harness.cached_run("shard_map_dp", name)
    codes = procs.wait(RUN_TIMEOUT)
  assert codes == [0] * launch.N_PROCESSES, procs.tails()
  with np.load(os.path.join(out, "results.npz")) as f:
    return dict(f)


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
  """The two-process results and their output directory."""
  out = str(tmp_path_factory.mktemp("multiprocess"))
  return run_two_processes(out), out


MODES = ["sharded_jit", "shard_map_dp"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(harness.CASES))
def test_two_processes_match_one(multi, name, mode):
  arrays, _ = multi
  one = harness.cached_run(mode, name)[:3]
  two = worker.unflatten_tree(arrays, f"{mode}/{name}", one)
  for got, want in zip(two, one):
    harness.assert_trees_close(got, want)
  # And both match the single-device run.
  harness.assert_trees_close(two, harness.cached_run("single", name))


def _assert_bit_identical(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, w), g in zip(jax.tree.leaves_with_path(want),
                          jax.tree.leaves(got)):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", list(harness.CASES))
def test_checkpoint_from_two_processes_restores_in_one(multi, name):
  arrays, out = multi
  one = harness.cached_run("sharded_jit", name)
  saved = worker.unflatten_tree(arrays, f"sharded_jit/{name}", one[:3])[:2]
  params_like, state_like = harness.fsdp_targets(
      harness.CASES[name], *worker.RESTORE_LAYOUT)
  params, state, step = checkpoint.restore(
      os.path.join(out, "from_multi", name), params_like, state_like)
  assert step == harness.STEPS
  n_split = 0
  for got, like in zip(jax.tree.leaves((params, state)),
                       jax.tree.leaves((params_like, state_like))):
    assert got.sharding.is_equivalent_to(like.sharding, got.ndim)
    n_split += like.sharding.spec == jax.sharding.PartitionSpec("fsdp")
  assert n_split >= 2 * len(jax.tree.leaves(params))  # Params and moments.
  _assert_bit_identical(harness.to_host((params, state)), saved)


@pytest.mark.parametrize("name", list(harness.CASES))
def test_checkpoint_from_one_process_restores_in_two(multi, name):
  arrays, _ = multi
  params, state, _, _ = harness.cached_run("sharded_jit", name)
  restored = worker.unflatten_tree(arrays, f"restored/{name}", (params, state))
  _assert_bit_identical(restored, (params, state))
  assert int(arrays[f"restored_step/{name}/0"]) == harness.STEPS


# name: (victim process, how it dies)
DEATHS = {
    "coordinator-killed": (0, "kill"),
    "other-killed": (1, "kill"),
    "other-raises": (1, "raise"),
}


def die_after_first_step(out: str, victim: int, how: str):
  """Runs one death; returns (survivor's exit code, its log, seconds)."""
  survivor = 1 - victim
  marker = os.path.join(out, "victim_stepped")
  args = ["--heartbeat", str(HEARTBEAT), "--shutdown", str(SHUTDOWN),
          "--victim", str(victim)]
  if how == "raise":
    args.append("--victim-raises")
  with launch.workers("die-after-first-step", out, *args) as procs:

    def victim_died() -> bool:
      if how == "kill":
        return os.path.exists(marker)
      return worker.VICTIM_ERROR in procs.log(victim)

    deadline = time.monotonic() + RUN_TIMEOUT
    while not victim_died():
      procs.skip_if_gloo_unavailable()
      if time.monotonic() > deadline or procs.procs[survivor].poll() is not None:
        pytest.fail("no first step:\n" + procs.tails())
      time.sleep(0.05)
    if how == "kill":
      procs.procs[victim].send_signal(signal.SIGKILL)
    died_at = time.monotonic()
    try:
      code = procs.procs[survivor].wait(DEATH_DETECTED_WITHIN)
    except subprocess.TimeoutExpired:
      pytest.fail(f"the survivor still runs {DEATH_DETECTED_WITHIN} s after "
                  "the other died:\n" + procs.tails())
    return code, procs.log(survivor), time.monotonic() - died_at


@pytest.fixture(scope="module")
def deaths(tmp_path_factory):
  """Every death of DEATHS, all at once (most of each is waiting)."""
  with concurrent.futures.ThreadPoolExecutor(len(DEATHS)) as pool:
    yield {
        name: pool.submit(die_after_first_step,
                          str(tmp_path_factory.mktemp(name)), victim, how)
        for name, (victim, how) in DEATHS.items()
    }


@pytest.mark.parametrize("name", list(DEATHS))
def test_dead_process_fails_the_other(deaths, name):
  """One process dies after its first step; the other exits, not hangs.

  Process 0 runs the coordination service. When another process is killed,
  the service misses its heartbeats for `HEARTBEAT` seconds and tells every
  process to terminate; when process 0 is killed, the others lose the
  service at once. A process that raises waits at exit for the others to
  shut down too, and `SHUTDOWN` seconds later the service gives up on them.
  In every case the survivor, blocked in a collective of step 2, is aborted
  by JAX's distributed client with `FATAL` in its log.
  """
  code, log, seconds = deaths[name].result()  # Re-raises a fail or skip.
  assert code != 0, log[-3000:]
  assert FATAL in log, log[-3000:]
  # It had finished step 1 and was inside step 2 when the other died.
  assert "step 0 done" in log and "step 1 done" not in log, log[-3000:]
  print(f"{name}: the survivor exited ({code}) {seconds:.1f} s after")


if __name__ == "__main__":
  # Prints how far the two-process runs are from this process's 8-device
  # runs (the quantity harness.TOL bounds):
  # XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
  #   python tests/distributed/test_multiprocess.py
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    results = run_two_processes(tmp)
  for case_name in harness.CASES:
    for run_mode in MODES:
      here = harness.cached_run(run_mode, case_name)[:3]
      there = worker.unflatten_tree(results, f"{run_mode}/{case_name}", here)
      print(f"{case_name:10s} {run_mode:13s} params "
            f"{harness.worst_deviation(there[0], here[0]):.2e}  state "
            f"{harness.worst_deviation(there[1], here[1]):.2e}  losses "
            f"{harness.worst_deviation(there[2], here[2]):.2e}")
