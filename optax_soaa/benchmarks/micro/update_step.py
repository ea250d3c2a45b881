"""Times the jitted optimizer step against `optax.adam` on one large pytree.

    python -m optax_soaa.benchmarks.update_step            # 10M parameters
    python -m optax_soaa.benchmarks.update_step --quick    # 1M, fewer pairs

The step is `update` + `apply_updates`, jitted with params and state donated,
as training loops run it. Each optimizer is timed interleaved with Adam in one
process (pairs of runs, alternating order); the reported ratios (wall-clock
time and the process's CPU time) are medians over pairs, which cancel slow
drifts of the machine. State memory is the bytes of the optimizer state pytree
relative to Adam's. Bytes accessed is XLA's cost analysis of the whole-array
step, beside the floor of each algorithm, and the longest loop body is the
most operations one slice of a sliced pass runs (the report's notes say how
each is counted).
"""

import argparse
import datetime
import os
import re
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
from optax_soaa._src import passes
from optax_soaa.benchmarks import tasks


class Entry(NamedTuple):
  # The optimizer; `chunk_size=` overrides its layout (bytes accessed).
  make: Callable[..., optax.GradientTransformation]
  # Extra keyword arguments of `update`, built from the step index.
  extra_args: Callable[[jax.Array], Dict[str, Any]] = lambda step: {}
  # Arrays of parameter size read or written per step at the least: each
  # pass over memory reads its inputs once and writes its outputs once (see
  # `FLOORS`).
  floor: float = 7.0


def _loss_value(step):
  # A slowly decreasing stand-in loss keeps SOAA's trust-region branch live.
  return {"value": 1.0 / (1.0 + 0.01 * step.astype(jnp.float32))}


# The `chunk_size` of the rows that do not set one (--chunk-size).
_layout = {"chunk_size": "auto"}


def _soaa(curvature="second_moment", **options):
  return lambda **layout: optax_soaa.soaa(
      1e-3, total_steps=10_000, curvature=curvature,
      **{**_layout, **options, **layout})


def _arturo(**options):
  return lambda **layout: optax_soaa.arturo(
      **tasks.ARTURO_FMNIST, **{**_layout, **options, **layout})


def _chunk_option(name: str) -> Any:
  """The `chunk_size` option of an entry ("auto" unless it sets one)."""
  options = {"-whole": None}
  return next((v for k, v in options.items() if name.endswith(k)),
              _layout["chunk_size"])


# The floors (float32 arrays of parameter size moved per step):
# Adam: one pass, reads g, θ, m, s and writes m, s, θ: 7.
# SOAA: pass 1 reads g, m, s (and v) and writes m, s (and v); pass 2 reads
#   m, s (and v) and θ and writes θ, the predicted-reduction sum fused into
#   that read: 9 (12 with curvature="variance").
# arTuRO: the filter reads g, θ and six states and writes the six (14); the
#   step reads θ, b, h, λ and writes θ (5): 19, plus 4 per bisection pass
#   beyond the filter's (none, usually, with the tuned Fashion-MNIST values).
OPTIMIZERS: Dict[str, Entry] = {
    "adam": Entry(lambda **layout: optax.adam(1e-3)),
    "soaa": Entry(_soaa(), _loss_value, 9.0),
    "soaa-variance": Entry(_soaa("variance"), _loss_value, 12.0),
    "soaa-none": Entry(_soaa("none"), _loss_value, 9.0),
    # Without `value=` SOAA keeps dt fixed and skips the predicted-reduction
    # sum: these two entries measure what the trust-region feedback costs.
    "soaa-fixed-dt": Entry(_soaa(), floor=9.0),
    "soaa-variance-fixed-dt": Entry(_soaa("variance"), floor=12.0),
    # The reference's tuned Fashion-MNIST CNN configuration.
    "arturo": Entry(_arturo(), floor=19.0),
    # Plain bisection (one level per pass): what the default's two cost.
    "arturo-1-level": Entry(_arturo(levels_per_pass=1), floor=19.0),
    # Whole arrays (chunk_size=None), the layout of GPU, TPU and several
    # devices, timed on this backend: what the slice loops of "auto" buy on
    # a single CPU device (the same as the rows above elsewhere).
    "soaa-whole": Entry(_soaa(chunk_size=None), _loss_value, 9.0),
    "soaa-variance-whole": Entry(
        _soaa("variance", chunk_size=None), _loss_value, 12.0),
    "arturo-whole": Entry(_arturo(chunk_size=None), floor=19.0),
}

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


def build_step(opt: optax.GradientTransformation, entry: Entry):
  def step(params, state, grads, step_index):
    updates, state = opt.update(
        grads, state, params, **entry.extra_args(step_index)
    )
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def _compiled_step(name: str, params, **layout):
  entry = OPTIMIZERS[name]
  opt = entry.make(**layout)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.cos(p * 100.0), params)
  return build_step(opt, entry).lower(
      params, opt.init(params), grads, jnp.asarray(0, jnp.int32)).compile()


def _bytes(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per module
    cost = cost[0]
  return float(cost["bytes accessed"])


def arrays_accessed(name: str, params) -> float:
  """Bytes the compiled whole-array step accesses, per float32 parameter.

  From XLA's cost analysis of the step (`update` + `apply_updates`, params
  and state donated) compiled for this backend, over whole arrays (the
  layout of GPU and TPU: the analysis counts a loop's body once, so a
  sliced step's figure would mean nothing); divided by 4 bytes times the
  number of parameters, so that it reads as arrays of parameter size moved
  per step.
  """
  n = sum(x.size for x in jax.tree.leaves(params))
  return _bytes(_compiled_step(name, params, chunk_size=None)) / (4 * n)


# One HLO instruction: `%name = f32[16384]{0} fusion(...)`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*.*?\s([\w\-]+)\(")
_BOOKKEEPING = {"parameter", "get-tuple-element", "tuple", "constant",
                "bitcast"}


def longest_loop_body(compiled) -> int:
  """The most operations (fusions, copies: what the runtime executes) in
  the body of one of the step's loops over slices; 0 without such loops.

  XLA:CPU runs a loop body of up to 8 operations inline; a longer one is
  dispatched operation by operation on every iteration, a cost per slice.
  A loop over slices reads slices (dynamic slices in its fusions); a loop
  that holds loops (arTuRO's bisection, in the sliced layout) is not one.
  """
  text = compiled.as_text()
  bodies = set(re.findall(r"while\(.*?body=%?([\w.\-]+)", text))
  computations, current = {}, None
  for line in text.splitlines():
    header = re.match(r"^%?([\w.\-]+) \(", line)
    if header:
      current = computations.setdefault(header.group(1), [])
      continue
    match = _INSTRUCTION.match(line)
    if current is not None and match and match.group(1) not in _BOOKKEEPING:
      current.append((match.group(1), line))
  longest = 0
  for name in bodies:
    ops = computations.get(name, [])
    if any(op == "while" for op, _ in ops) or not any(
        "dynamic" in line for _, line in ops):
      continue
    longest = max(longest, len(ops))
  return longest


def _time_steps(step_fn, carry, grads, n_steps):
  """(wall-clock seconds, CPU seconds of this process), the new carry."""
  params, state = carry
  start, cpu_start = time.perf_counter(), time.process_time()
  for i in range(n_steps):
    params, state = step_fn(params, state, grads, jnp.asarray(i, jnp.int32))
  jax.block_until_ready((params, state))
  return ((time.perf_counter() - start, time.process_time() - cpu_start),
          (params, state))


def run(
    names, num_params: int, pairs: int, steps_per_timing: int,
    repeats: int = 1,
) -> Dict[str, Any]:
  """Times each optimizer against Adam; `repeats` blocks of `pairs` pairs."""
  params0 = make_params(num_params)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.cos(p * 100.0), params0)
  n = sum(x.size for x in jax.tree.leaves(params0))

  runners = {}
  for name in ["adam", *[m for m in names if m != "adam"]]:
    entry = OPTIMIZERS[name]
    opt = entry.make()
    step_fn = build_step(opt, entry)
    params = jax.tree.map(jnp.copy, params0)
    state = opt.init(params)
    state_bytes = tree_bytes(state)
    body = longest_loop_body(step_fn.lower(
        params, state, grads, jnp.asarray(0, jnp.int32)).compile())
    # Compile and warm up.
    _, carry = _time_steps(step_fn, (params, state), grads, 2)
    runners[name] = dict(
        step=step_fn, carry=carry, state_bytes=state_bytes,
        arrays=arrays_accessed(name, params0), loop_body=body,
        layout="whole" if name == "adam" or passes.resolve_chunk_size(
            _chunk_option(name)) is None else "sliced",
    )

  times = {name: [] for name in runners}
  ratios = {name: [[] for _ in range(repeats)]
            for name in runners if name != "adam"}
  cpu_ratios = {name: [] for name in ratios}
  loads = []
  for block in range(repeats):
    load_before = os.getloadavg()[0]
    for p in range(pairs):
      for name in ratios:
        order = ["adam", name] if p % 2 == 0 else [name, "adam"]
        pair = {}
        for who in order:
          r = runners[who]
          (wall, cpu), r["carry"] = _time_steps(r["step"], r["carry"], grads,
                                                steps_per_timing)
          pair[who] = (wall / steps_per_timing, cpu)
          times[who].append(pair[who][0])
        ratios[name][block].append(pair[name][0] / pair["adam"][0])
        cpu_ratios[name].append(pair[name][1] / pair["adam"][1])
    loads.append([load_before, os.getloadavg()[0]])

  adam = runners["adam"]
  results = {"num_params": n, "load_average_1min": loads}
  for name, r in runners.items():
    all_ratios = sum(ratios.get(name, []), [])
    results[name] = dict(
        median_step_s=statistics.median(times[name]),
        time_ratio_vs_adam=(
            1.0 if name == "adam" else statistics.median(all_ratios)
        ),
        time_ratio_iqr=(
            [0.0, 0.0] if name == "adam" else
            [float(np.percentile(all_ratios, 25)),
             float(np.percentile(all_ratios, 75))]
        ),
        time_ratio_per_repeat=(
            [1.0] * repeats if name == "adam" else
            [statistics.median(x) for x in ratios[name]]
        ),
        cpu_time_ratio_vs_adam=(
            1.0 if name == "adam" else statistics.median(cpu_ratios[name])
        ),
        layout=r["layout"],
        longest_loop_body=r["loop_body"],
        state_bytes=r["state_bytes"],
        state_ratio_vs_adam=r["state_bytes"] / adam["state_bytes"],
        arrays_accessed=r["arrays"],
        bytes_ratio_vs_adam=r["arrays"] / adam["arrays"],
        floor_arrays=OPTIMIZERS[name].floor,
        floor_ratio_vs_adam=OPTIMIZERS[name].floor / OPTIMIZERS["adam"].floor,
        bytes_ratio_vs_floor=r["arrays"] / OPTIMIZERS[name].floor,
    )
  return results


def format_table(results) -> str:
  lines = [
      "| optimizer | layout | step (ms) | time / Adam (median) | IQR "
      "| per repeat | CPU time / Adam | state / Adam "
      "| bytes accessed, whole arrays | floor (arrays) | bytes / floor "
      "| longest loop body |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    if not isinstance(r, dict):
      continue
    lo, hi = r["time_ratio_iqr"]
    per_repeat = " / ".join(f"{x:.2f}" for x in r["time_ratio_per_repeat"])
    lines.append(
        f"| {name} | {r['layout']} | {1e3 * r['median_step_s']:.2f} | "
        f"{r['time_ratio_vs_adam']:.2f}x | {lo:.2f}-{hi:.2f} | {per_repeat} | "
        f"{r['cpu_time_ratio_vs_adam']:.2f}x | "
        f"{r['state_ratio_vs_adam']:.2f}x | {r['arrays_accessed']:.1f} | "
        f"{r['floor_arrays']:.0f} | {r['bytes_ratio_vs_floor']:.2f}x | "
        f"{r['longest_loop_body'] or '-'} |"
    )
  return "\n".join(lines)


_NOTES = """\
- time / Adam: the step (`update` + `apply_updates`, jitted, params and state
  donated) of each optimizer timed against `optax.adam`'s, interleaved in one
  process (pairs of timings in alternating order); the median ratio over all
  pairs, its interquartile range, and the median of each repeat (blocks of
  pairs run one after another). The load average is recorded before and after
  each repeat: the machine may be shared, and a loaded machine moves ratios.
- CPU time / Adam: the same pairs, timed by the process's CPU time (all its
  threads): what the step costs the machine. Adam's step is whole-array
  fusions, which XLA:CPU splits over the cores; a loop over slices runs on
  one core, so its wall-clock ratio is above its CPU-time ratio on an idle
  machine (a loaded one leaves no core free and flattens the difference).
- layout: how the row's passes run on this backend: `sliced` (loops over
  slices of {chunk} elements, "auto" on a single CPU device) or `whole`
  (whole arrays, as on GPU and TPU; the `-whole` rows).
- bytes accessed: XLA's cost analysis (`jit(step).lower(...).compile()
  .cost_analysis()["bytes accessed"]`) of the step over whole arrays (the
  layout of GPU and TPU; `chunk_size=None`), compiled for this backend, in
  float32 arrays of parameter size (bytes / 4 / parameters). The analysis
  counts a loop's body once, so it says nothing of the sliced layout, whose
  loops read and write each of their arrays once per step (the floor's
  count), slice by slice. arTuRO's figure holds one bisection pass whether
  or not it runs. It is this backend's fusion: XLA:CPU forms no
  multi-output loop fusions, so a value two outputs need is written and
  read back (Adam itself moves 10 arrays here, against its floor of 7).
- floor: the arrays each pass must read and write, with every pass fused:
  Adam 7; SOAA 9 (12 with `curvature="variance"`): the moments' pass reads g,
  m, s (v) and writes m, s (v), the step's pass reads m, s (v), θ and writes
  θ (the predicted reduction of the step before is summed in the moments'
  pass, from the moments it reads); arTuRO 19: the filter reads g, θ and six
  states and writes the six, the step reads θ, b, h, λ and writes θ (plus 4
  per bisection pass beyond the filter's).
- longest loop body: the most operations (fusions, copies) in the body of
  one loop over slices of the step. XLA:CPU runs a body of up to 8 inline
  and dispatches a longer one operation by operation, on every slice: over
  8 it pays a fixed cost per operation and slice.
"""


def main(argv: Optional[list] = None) -> Dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="1M parameters and 5 pairs (a smoke run).")
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                      choices=list(OPTIMIZERS))
  parser.add_argument("--num-params", type=int, default=None)
  parser.add_argument("--pairs", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=1,
                      help="Blocks of --pairs pairs, each reported apart.")
  parser.add_argument("--steps-per-timing", type=int, default=5)
  parser.add_argument("--chunk-size", type=int, default=None,
                      help="Slice length of the rows that use chunk_size="
                      "'auto' (default: what 'auto' picks here).")
  parser.add_argument("--json", type=str, default=None,
                      help="Also write the results to this JSON file.")
  parser.add_argument("--markdown", type=str, default=None,
                      help="Also write a Markdown report (command, machine, "
                      "date, table) to this file.")
  args = parser.parse_args(argv)
  num_params = args.num_params or (1_000_000 if args.quick else 10_000_000)
  pairs = args.pairs or (5 if args.quick else 15)
  if args.chunk_size is not None:
    _layout["chunk_size"] = args.chunk_size
  results = run(args.optimizers, num_params, pairs, args.steps_per_timing,
                args.repeats)
  loads = ", ".join(f"{a:.1f} -> {b:.1f}"
                    for a, b in results["load_average_1min"])
  header = (
      f"update+apply step, {results['num_params']:,} params, {args.repeats} "
      f"x {pairs} pairs, {args.steps_per_timing} steps per timing, backend="
      f"{jax.default_backend()} ({jax.devices()[0].device_kind}), "
      f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
      f"chunk_size={_layout['chunk_size']!r}; "
      f"1-minute load average before -> after each repeat: {loads}"
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
          f"{header}\n\n{format_table(results)}\n\n"
          + _NOTES.format(chunk=passes.CPU_CHUNK_SIZE)
      )
  return results


if __name__ == "__main__":
  main()
