"""What the step measurements share: timing a jitted call, and their record."""

import datetime
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence

import jax

from optax_soaa.benchmarks import record


def median_seconds(fn: Callable[..., Any], args: Sequence[Any],
                   rounds: int) -> float:
  """Median seconds of `fn(*args)` over `rounds` calls, after one warm-up."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run_record(module: str, argv: Optional[Sequence[str]]) -> Dict[str, Any]:
  """The machine, versions, date, load and command of a measurement."""
  argv = list(sys.argv[1:] if argv is None else argv)
  load = record.load_average()
  return dict(
      device=str(jax.devices()[0].device_kind), machine=record.machine(),
      cpu_cores=os.cpu_count(), jax=jax.__version__,
      # Other jobs on the machine inflate both sides of each comparison.
      load_average_1min=load[0] if load else None,
      date_utc=datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M"),
      command=record.portable_command(["python", "-m", module] + argv))


def recorded(result: Dict[str, Any], module: str,
             argv: Optional[Sequence[str]],
             json_path: Optional[str]) -> Dict[str, Any]:
  """`result` with its `run_record`, also written to `json_path` if given."""
  result.update(run_record(module, argv))
  if json_path:
    with open(json_path, "w") as f:
      json.dump(result, f, indent=2)
  return result
