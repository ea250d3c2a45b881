"""One process of a multi-process run, started by test_multiprocess.py.

    python tests/distributed/multiprocess_worker.py MODE --process-id I \\
        --num-processes N --port PORT --out DIR [--heartbeat S] \\
        [--shutdown S] [--victim I] [--victim-raises]

with XLA_FLAGS=--xla_force_host_platform_device_count=D in the environment:
N processes of D simulated CPU devices each, joined by
``jax.distributed.initialize`` on 127.0.0.1:PORT, their collectives over gloo.

MODE "probe": only the cross-process sum that every mode starts with.

MODE "train": every optimizer of dist_harness.CASES trained under sharded jit
(FSDP) and under shard_map data parallel, the exact runners the one-process
tests use; the final FSDP params and state saved with
``optax_soaa.checkpoint.save`` to DIR/from_multi/NAME; the checkpoints that
one process wrote to DIR/from_one/NAME restored into another layout
(RESTORE_LAYOUT); all results gathered and written by process 0 to
DIR/results.npz (see `flatten_trees`).

MODE "die-after-first-step": SOAA under sharded jit; after its first step
process VICTIM (--victim) writes DIR/victim_stepped and waits to be killed
(or, with --victim-raises, raises VICTIM_ERROR); the others go on into the
next step, whose collectives cannot complete.

Exit status launch.GLOO_UNAVAILABLE, with "gloo unavailable: ..." in the
output: this jaxlib cannot run CPU collectives across processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_harness as harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import launch  # pylint: disable=g-import-not-at-top,wrong-import-position

from optax_soaa import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position

# The checkpoints are restored onto a (data, fsdp) mesh other than the
# (DATA, FSDP) = (4, 2) one that saved them: every param split 4 ways.
RESTORE_LAYOUT = (2, 4)
# How long (seconds) a process waits for the others to join.
INIT_TIMEOUT = 60
VICTIM_ERROR = "this process fails after its first step"


def initialize(process_id: int, num_processes: int, port: int,
               heartbeat: int, shutdown: int) -> None:
  """Joins the other processes, or exits with launch.GLOO_UNAVAILABLE."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = f"127.0.0.1:{port}"
  jax.distributed.initialize(
      coordinator_address=address,
      # JAX's default binds every interface; these tests talk to localhost.
      coordinator_bind_address=address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=INIT_TIMEOUT,
      heartbeat_timeout_seconds=heartbeat,
      shutdown_timeout_seconds=shutdown,
  )
  try:
    # The first computation builds the CPU client with its collectives, and a
    # sum across processes is the smallest thing that needs them.
    mesh = jax.make_mesh((jax.device_count(),), ("all",))
    ones = harness.global_array(
        np.ones(jax.device_count(), np.float32),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("all")),
    )
    total = float(jax.jit(lambda a: a.sum())(ones))
  except Exception as e:  # pylint: disable=broad-except
    print(f"{launch.GLOO_UNAVAILABLE_MESSAGE}: {type(e).__name__}: {e}",
          file=sys.stderr, flush=True)
    os._exit(launch.GLOO_UNAVAILABLE)  # pylint: disable=protected-access
  if total != jax.device_count():
    raise RuntimeError(f"cross-process sum gave {total}")


def flatten_trees(trees: dict[str, object]) -> dict[str, np.ndarray]:
  """{key: pytree} as flat NumPy arrays "key/i" (leaves in tree order)."""
  out = {}
  for key, tree in trees.items():
    for i, leaf in enumerate(jax.tree.leaves(tree)):
      out[f"{key}/{i}"] = np.asarray(leaf)
  return out


def unflatten_tree(arrays, key: str, like):
  """The pytree `key` of `flatten_trees`'s output, with `like`'s structure."""
  treedef = jax.tree.structure(like)
  leaves = [arrays[f"{key}/{i}"] for i in range(treedef.num_leaves)]
  if f"{key}/{treedef.num_leaves}" in arrays:
    raise ValueError(f"{key} has more leaves than {treedef}")
  return jax.tree.unflatten(treedef, leaves)


def train(out: str) -> None:
  trees = {}
  for name, case in harness.CASES.items():
    params, state, losses, live = harness.run_sharded_jit(case)
    trees[f"sharded_jit/{name}"] = (params, state, losses)
    checkpoint.save(os.path.join(out, "from_multi", name), live["params"],
                    live["state"], step=harness.STEPS)

    trees[f"shard_map_dp/{name}"] = harness.run_shard_map(case, layout="dp")

    params_like, state_like = harness.fsdp_targets(case, *RESTORE_LAYOUT)
    params, state, step = checkpoint.restore(
        os.path.join(out, "from_one", name), params_like, state_like)
    for got, like in zip(jax.tree.leaves((params, state)),
                         jax.tree.leaves((params_like, state_like))):
      if not got.sharding.is_equivalent_to(like.sharding, got.ndim):
        raise AssertionError(f"restored as {got.sharding}, not {like.sharding}")
    trees[f"restored/{name}"] = harness.to_host((params, state))
    trees[f"restored_step/{name}"] = np.asarray(step)
  if jax.process_index() == 0:
    np.savez(os.path.join(out, "results.npz"), **flatten_trees(trees))


def die_after_first_step(out: str, victim: int, raises: bool) -> None:

  def after_step(t, loss):
    loss.block_until_ready()
    if t == 0 and jax.process_index() == victim:
      if raises:
        raise RuntimeError(VICTIM_ERROR)
      with open(os.path.join(out, "victim_stepped"), "w") as f:
        f.write(str(os.getpid()))
      time.sleep(600)
    print(f"step {t} done", flush=True)

  harness.run_sharded_jit(harness.CASES["soaa"], after_step=after_step)
  print("finished", flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("mode",
                      choices=["probe", "train", "die-after-first-step"])
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--heartbeat", type=int, default=30)
  parser.add_argument("--shutdown", type=int, default=30)
  parser.add_argument("--victim", type=int, default=1)
  parser.add_argument("--victim-raises", action="store_true")
  args = parser.parse_args(argv)
  initialize(args.process_id, args.num_processes, args.port, args.heartbeat,
             args.shutdown)
  if args.mode == "train":
    train(args.out)
  elif args.mode == "die-after-first-step":
    die_after_first_step(args.out, args.victim, args.victim_raises)


if __name__ == "__main__":
  main()
