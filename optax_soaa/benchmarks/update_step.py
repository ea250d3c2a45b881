"""Times the jitted optimizer step against `optax.adam` on one large pytree.

    python -m optax_soaa.benchmarks.update_step            # 10M parameters
    python -m optax_soaa.benchmarks.update_step --quick    # 1M, fewer pairs

The step is `update` + `apply_updates`, jitted with params and state donated,
as training loops run it. Each optimizer is timed interleaved with Adam in one
process (pairs of runs, alternating order); the reported ratio is the median
over pairs, which cancels slow drifts of the machine. State memory is the
bytes of the optimizer state pytree relative to Adam's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import json
import platform
import statistics
import time
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_soaa
from optax_soaa._src import arturo as arturo_lib
from optax_soaa._src import native
from optax_soaa._src import utils
from optax_soaa.benchmarks import tasks


class Entry(NamedTuple):
  make: Callable[[], optax.GradientTransformation]
  # Extra keyword arguments of `update`, built from the step index.
  extra_args: Callable[[jax.Array], Dict[str, Any]] = lambda step: {}


def _loss_value(step):
  # A slowly decreasing stand-in loss keeps SOAA's trust-region branch live.
  return {"value": 1.0 / (1.0 + 0.01 * step.astype(jnp.float32))}


OPTIMIZERS: Dict[str, Entry] = {
    "adam": Entry(lambda: optax.adam(1e-3)),
    "soaa-variance": Entry(
        lambda: optax_soaa.soaa(1e-3, total_steps=10_000, curvature="variance"),
        _loss_value,
    ),
    "soaa-second_moment": Entry(
        lambda: optax_soaa.soaa(
            1e-3, total_steps=10_000, curvature="second_moment"
        ),
        _loss_value,
    ),
    # Without `value=` SOAA keeps dt fixed and skips the predicted-reduction
    # sum: these two entries measure what the trust-region feedback costs.
    "soaa-variance-fixed-dt": Entry(
        lambda: optax_soaa.soaa(1e-3, total_steps=10_000, curvature="variance")
    ),
    "soaa-second_moment-fixed-dt": Entry(
        lambda: optax_soaa.soaa(
            1e-3, total_steps=10_000, curvature="second_moment"
        )
    ),
    # The reference's tuned Fashion-MNIST CNN configuration.
    "arturo": Entry(lambda: optax_soaa.arturo(**tasks.ARTURO_FMNIST)),
    # Plain bisection (one level per pass): what the default's two cost.
    "arturo-1-level": Entry(
        lambda: optax_soaa.arturo(**tasks.ARTURO_FMNIST, levels_per_pass=1)
    ),
    # The XLA path, as "auto" runs it where the fused CPU kernels cannot:
    # what the kernels buy (the same rows as above otherwise).
    "soaa-variance-xla": Entry(
        lambda: optax_soaa.soaa(
            1e-3, total_steps=10_000, curvature="variance",
            reduction_chunk_size=_xla_chunk()),
        _loss_value,
    ),
    "soaa-second_moment-xla": Entry(
        lambda: optax_soaa.soaa(
            1e-3, total_steps=10_000, curvature="second_moment",
            reduction_chunk_size=_xla_chunk()),
        _loss_value,
    ),
    "arturo-xla": Entry(
        lambda: optax_soaa.arturo(
            **tasks.ARTURO_FMNIST,
            chunk_size=_xla_chunk(arturo_lib._CPU_CHUNK_SIZE)),  # pylint: disable=protected-access
    ),
}


def _xla_chunk(cpu_chunk: int = utils.CPU_CHUNK_SIZE) -> Optional[int]:
  """The slice length "auto" uses when the fused CPU kernels cannot run."""
  return None if utils.resolve_chunk_size("auto") is None else cpu_chunk


def fused_kernels_in_use() -> bool:
  """Whether "auto" runs the fused CPU kernels here (float32 params)."""
  return native.usable(jnp.zeros((), jnp.float32))


def make_params(num_params: int, seed: int = 0) -> Dict[str, jax.Array]:
  """A pytree shaped like an MLP/embedding model, about `num_params` large."""
  width = max(8, int(round((num_params / 5.0) ** 0.5)))
  shapes = {
      "embedding": (width, width),
      "dense_0": {"kernel": (width, 2 * width), "bias": (2 * width,)},
      "dense_1": {"kernel": (2 * width, width), "bias": (width,)},
      "norm": {"scale": (width,)},
  }
  leaves, treedef = jax.tree.flatten(
      shapes, is_leaf=lambda x: isinstance(x, tuple)
  )
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  arrays = [
      0.02 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, arrays)


def tree_bytes(tree: Any) -> int:
  return sum(
      int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree)
  )


def build_step(entry: Entry):
  opt = entry.make()

  def step(params, state, grads, step_index):
    updates, state = opt.update(
        grads, state, params, **entry.extra_args(step_index)
    )
    return optax.apply_updates(params, updates), state

  return opt, jax.jit(step, donate_argnums=(0, 1))


def _time_steps(step_fn, carry, grads, n_steps):
  params, state = carry
  start = time.perf_counter()
  for i in range(n_steps):
    params, state = step_fn(params, state, grads, jnp.asarray(i, jnp.int32))
  jax.block_until_ready((params, state))
  return time.perf_counter() - start, (params, state)


def run(
    names, num_params: int, pairs: int, steps_per_timing: int
) -> Dict[str, Dict[str, float]]:
  params0 = make_params(num_params)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.cos(p * 100.0), params0)
  n = sum(x.size for x in jax.tree.leaves(params0))

  runners = {}
  for name in ["adam", *[m for m in names if m != "adam"]]:
    opt, step_fn = build_step(OPTIMIZERS[name])
    params = jax.tree.map(jnp.copy, params0)
    state = opt.init(params)
    state_bytes = tree_bytes(state)
    # Compile and warm up.
    _, carry = _time_steps(step_fn, (params, state), grads, 2)
    runners[name] = dict(step=step_fn, carry=carry, state_bytes=state_bytes)

  times = {name: [] for name in runners}
  ratios = {name: [] for name in runners if name != "adam"}
  for p in range(pairs):
    for name in ratios:
      order = ["adam", name] if p % 2 == 0 else [name, "adam"]
      pair = {}
      for who in order:
        r = runners[who]
        dt, r["carry"] = _time_steps(r["step"], r["carry"], grads,
                                     steps_per_timing)
        pair[who] = dt / steps_per_timing
        times[who].append(pair[who])
      ratios[name].append(pair[name] / pair["adam"])

  adam_bytes = runners["adam"]["state_bytes"]
  results = {"num_params": n}
  for name in runners:
    results[name] = dict(
        median_step_s=statistics.median(times[name]),
        time_ratio_vs_adam=(
            1.0 if name == "adam" else statistics.median(ratios[name])
        ),
        time_ratio_iqr=(
            [0.0, 0.0] if name == "adam" else
            [float(np.percentile(ratios[name], 25)),
             float(np.percentile(ratios[name], 75))]
        ),
        state_bytes=runners[name]["state_bytes"],
        state_ratio_vs_adam=runners[name]["state_bytes"] / adam_bytes,
    )
  return results


def format_table(results) -> str:
  lines = [
      "| optimizer | step (ms) | time / Adam (median) | IQR | state / Adam |",
      "|---|---|---|---|---|",
  ]
  for name, r in results.items():
    if name == "num_params":
      continue
    lo, hi = r["time_ratio_iqr"]
    lines.append(
        f"| {name} | {1e3 * r['median_step_s']:.2f} | "
        f"{r['time_ratio_vs_adam']:.2f}x | {lo:.2f}-{hi:.2f} | "
        f"{r['state_ratio_vs_adam']:.2f}x |"
    )
  return "\n".join(lines)


def main(argv: Optional[list] = None) -> Dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="1M parameters and 5 pairs (a smoke run).")
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                      choices=list(OPTIMIZERS))
  parser.add_argument("--num-params", type=int, default=None)
  parser.add_argument("--pairs", type=int, default=None)
  parser.add_argument("--steps-per-timing", type=int, default=5)
  parser.add_argument("--json", type=str, default=None,
                      help="Also write the results to this JSON file.")
  parser.add_argument("--markdown", type=str, default=None,
                      help="Also write a Markdown report (command, machine, "
                      "date, table) to this file.")
  args = parser.parse_args(argv)
  num_params = args.num_params or (1_000_000 if args.quick else 10_000_000)
  pairs = args.pairs or (5 if args.quick else 15)
  results = run(args.optimizers, num_params, pairs, args.steps_per_timing)
  header = (
      f"update+apply step, {results['num_params']:,} params, {pairs} pairs, "
      f"{args.steps_per_timing} steps per timing, backend="
      f"{jax.default_backend()} ({jax.devices()[0].device_kind}), "
      f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
      f"fused CPU kernels {'on' if fused_kernels_in_use() else 'off'} "
      "(the -xla rows never use them)"
  )
  print(header)
  print(format_table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(header=header, results=results), f, indent=2)
  if args.markdown:
    command = "python -m optax_soaa.benchmarks.update_step " + " ".join(
        argv if argv is not None else sys.argv[1:])
    with open(args.markdown, "w") as f:
      f.write(
          "# Update-step benchmark\n\n"
          f"Produced by `{command.strip()}` on "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{os.cpu_count()} CPU cores. Do not edit by hand: rerun the "
          "command.\n\n"
          f"{header}\n\n{format_table(results)}\n"
      )
  return results


if __name__ == "__main__":
  main()
