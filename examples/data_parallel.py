"""Train the benchmark's byte-level transformer LM with FSDP sharding.

Runs on however many devices JAX sees: one CPU, eight simulated ones
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), a GPU host, or many
processes (``--multihost``, which calls ``jax.distributed.initialize()``).
The global batch of each step depends on ``--seed`` and the step alone, so
the same arguments train the same model (up to float32 rounding) on any
number of devices and processes.

Layout: a 2-D mesh ``('data', 'fsdp')``. The global batch is split over both
axes (every device sees its own examples); every parameter is split over
``'fsdp'`` along its largest dimension that the axis size divides (FSDP), the
rest replicated; the optimizer state is laid out like the parameters by
``optax_soaa.state_shardings``. Under ``jax.jit`` the optimizers need no
``axis_name``: their global sums (SOAA's Fisher ratio and predicted
reduction, arTuRO's KL) are sums of sharded arrays, which XLA makes global.

    python examples/data_parallel.py --optimizer soaa --steps 200
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python examples/data_parallel.py --optimizer adafisher --fsdp 4

    # Two processes on one machine, 4 simulated CPU devices each: one line
    # per process (on a cluster, one per host, each with its own id).
    export XLA_FLAGS=--xla_force_host_platform_device_count=4
    ARGS="--multihost --coordinator 127.0.0.1:12345 --num-processes 2"
    python examples/data_parallel.py $ARGS --process-id 1 &
    python examples/data_parallel.py $ARGS --process-id 0
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_soaa
import optax_soaa.flax
from optax_soaa.benchmarks import data as data_lib
from optax_soaa.benchmarks import models

P = jax.sharding.PartitionSpec


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--optimizer", default="soaa",
                      choices=["soaa", "arturo", "adafisher", "adam"])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch-size", type=int, default=32,
                      help="global batch (rounded up to the device count)")
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--learning-rate", type=float, default=3e-3,
                      help="learning rate (arTuRO: the KL bound)")
  parser.add_argument("--fsdp", type=int, default=None,
                      help="size of the 'fsdp' mesh axis (default: all)")
  parser.add_argument("--max-bytes", type=int, default=1_000_000,
                      help="training bytes read from the stdlib sources")
  parser.add_argument("--log-every", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--multihost", action="store_true",
                      help="call jax.distributed.initialize() first")
  parser.add_argument("--coordinator", default=None,
                      help="host:port of process 0 (else from the cluster)")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument(
      "--heartbeat-timeout", type=int, default=100,
      help="seconds without a heartbeat after which a process counts as dead "
           "and every process is terminated (JAX's default, 100)")
  parser.add_argument(
      "--shutdown-timeout", type=int, default=300,
      help="seconds a finished (or failed) process waits for the others at "
           "exit before every process is terminated (JAX's default, 300)")
  return parser.parse_args(argv)


def make_optimizer(name: str, learning_rate: float, total_steps: int):
  # The default chunk_size="auto" slices the passes on one CPU device only:
  # across several devices they run over whole (sharded) leaves, as FSDP
  # needs (slicing would make XLA gather a sharded leaf).
  if name == "soaa":
    return optax_soaa.soaa(learning_rate, total_steps=total_steps)
  if name == "arturo":
    # The reference's tuned Fashion-MNIST values; the KL bound is swept.
    return optax_soaa.arturo(
        learning_rate, reg_weight=0.0587, prior_prec=0.0015,
        dynamic_model_noise=0.0174, measurement_noise=2.82,
        start_filter_cov=5e-5, nu=1.3)
  if name == "adafisher":
    return optax_soaa.adafisherw(learning_rate, stats_every=10)
  return optax.adam(learning_rate)


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Splits the largest dimension that `fsdp` divides; else replicated."""
  if fsdp == 1:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % fsdp == 0:
      spec = [None] * len(shape)
      spec[d] = "fsdp"
      return P(*spec)
  return P()


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.multihost:
    # CPU devices of several processes talk through gloo (the default of
    # recent JAX; it does not affect GPUs and TPUs).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # What is not given is read from the cluster (SLURM, Cloud TPU, ...).
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
        shutdown_timeout_seconds=args.shutdown_timeout,
    )

  n_devices = jax.device_count()
  fsdp = args.fsdp or n_devices
  if n_devices % fsdp:
    raise ValueError(f"--fsdp {fsdp} must divide the device count {n_devices}.")
  mesh = jax.make_mesh(
      (n_devices // fsdp, fsdp), ("data", "fsdp"),
      axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )
  batch_size = math.ceil(args.batch_size / n_devices) * n_devices
  batch_sharding = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
  replicated = jax.sharding.NamedSharding(mesh, P())

  model = models.TransformerLM(
      width=args.width, num_layers=args.layers, num_heads=args.heads,
      max_len=args.seq_len,
  )
  abstract = jax.eval_shape(
      model.init, jax.random.key(args.seed),
      jnp.zeros((1, args.seq_len), jnp.int32),
  )["params"]
  param_shardings = jax.tree.map(
      lambda p: jax.sharding.NamedSharding(mesh, fsdp_spec(p.shape, fsdp)),
      abstract,
  )
  # Initialised directly in its shards: no device ever holds all the params.
  params = jax.jit(
      lambda key: model.init(key, jnp.zeros((1, args.seq_len), jnp.int32))[
          "params"],
      out_shardings=param_shardings,
  )(jax.random.key(args.seed))

  opt = make_optimizer(args.optimizer, args.learning_rate, args.steps)
  state_shardings = optax_soaa.state_shardings(opt, params)
  opt_state = jax.jit(opt.init, out_shardings=state_shardings)(params)

  def loss_fn(params, tokens, targets):
    logits = model.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  if args.optimizer == "adafisher":
    # Under jit the batch means are already global: no axis_name.
    value_grad_stats = optax_soaa.flax.value_grad_and_stats(loss_fn)
  else:
    def value_grad_stats(params, tokens, targets):
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets)
      return loss, grads, None

  @functools.partial(
      jax.jit,
      in_shardings=(param_shardings, state_shardings, batch_sharding,
                    batch_sharding),
      out_shardings=(param_shardings, state_shardings, replicated),
      donate_argnums=(0, 1),
  )
  def train_step(params, opt_state, tokens, targets):
    loss, grads, stats = value_grad_stats(params, tokens, targets)
    extra = {"stats": stats} if stats is not None else {}
    updates, opt_state = opt.update(
        grads, opt_state, params, value=loss, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  # Every process draws the same window starts for the whole global batch
  # (a few integers) and reads only the windows of the rows its own devices
  # hold: the batch does not depend on how many processes share it.
  stream = data_lib.lm_byte_splits(max_bytes=args.max_bytes)["train"]
  rng = np.random.default_rng(args.seed)
  batch_shape = (batch_size, args.seq_len)

  def next_batch():
    starts = rng.integers(0, stream.size - args.seq_len - 1, batch_size)

    def windows(index, shift):
      rows, cols = index
      pos = starts[rows, None] + np.arange(args.seq_len)[None, cols]
      return stream[pos + shift].astype(np.int32)

    return (
        jax.make_array_from_callback(
            batch_shape, batch_sharding, lambda i: windows(i, 0)),
        jax.make_array_from_callback(
            batch_shape, batch_sharding, lambda i: windows(i, 1)),
    )

  if jax.process_index() == 0:
    n_params = sum(p.size for p in jax.tree.leaves(params))
    print(f"{n_devices} device(s), {jax.process_count()} process(es), mesh "
          f"{dict(mesh.shape)}; {n_params:,} params; global batch "
          f"{batch_size}x{args.seq_len}; optimizer {args.optimizer}")
    kernel = params["block_0"]["mlp_in"]["kernel"]
    print(f"block_0/mlp_in/kernel {kernel.shape}: {kernel.sharding.spec}")

  losses = []
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    tokens, targets = next_batch()
    params, opt_state, loss = train_step(params, opt_state, tokens, targets)
    losses.append(loss)
    if jax.process_index() == 0 and (
        step % args.log_every == 0 or step in (1, args.steps)):
      print(f"step {step:5d}  loss {float(loss):.4f} nats/byte  "
            f"({time.perf_counter() - start:.1f}s)", flush=True)
  losses = np.asarray(jax.device_get(losses))
  return {"losses": losses, "params": params, "opt_state": opt_state,
          "mesh": mesh, "param_shardings": param_shardings,
          "state_shardings": state_shardings}


if __name__ == "__main__":
  main()
