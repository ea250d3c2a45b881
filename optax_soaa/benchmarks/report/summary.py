"""The summary across tasks: each optimizer's headline result, next to Adam's.

For every task, the runs of its longest training (the most steps) are the
headline; every optimizer they trained is a row: its headline metric (test
accuracy, or test bits per byte for the language model) as mean ± sd over
seeds, the difference from the task's best-tuned Adam row, its step time and
state memory relative to Adam's, how its value was tuned, and the run it
comes from. An optimizer trained at two values (Adam at the authors'
configuration and at a sweep's pick) has a row for each.
"""

import dataclasses
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from optax_soaa.benchmarks import schema
from optax_soaa.benchmarks import tasks as tasks_lib
from optax_soaa.benchmarks.report.tables import fmt

_PICKED = re.compile(r"picked by the sweep (\S+)")


@dataclasses.dataclass
class Row:
  task: str
  optimizer: str
  value: float
  swept: str  # "lr" or "kl_bound"
  tuning: str
  seeds: List[float]  # the headline metric per seed
  higher_is_better: bool
  step_time_ratio: Optional[float]
  state_bytes_ratio: Optional[float]
  run: str
  delta: Optional[float] = None  # from the task's best Adam row

  @property
  def mean(self) -> float:
    return float(np.mean(self.seeds))

  @property
  def sd(self) -> float:
    return float(np.std(self.seeds, ddof=1)) if len(self.seeds) > 1 else 0.0


# A value this close to a sweep's pick counts as that pick (a factor typed
# with three digits, 3.16 for 10**0.5, differs from it by 0.07 %).
NEAR_PICK = 0.01


def _close(a: float, b: Optional[float], rel_tol: float = 1e-6) -> bool:
  return b is not None and math.isclose(a, b, rel_tol=rel_tol)


def _sweep_pick(runs: Dict[str, schema.Run], task: str, optimizer: str,
                value: float) -> Optional[Tuple[str, float]]:
  """(the sweep run of `task` whose pick for `optimizer` is nearest `value`,
  their relative difference), when within NEAR_PICK."""
  found = []
  for name, run in runs.items():
    r = run.optimizers.get(optimizer)
    if (run.task.name == task and not run.tuned and r is not None
        and r.summarized and len(r.values) > 1
        and _close(value, r.best_value, NEAR_PICK)):
      found.append((abs(value / r.best_value - 1), name))
  return (min(found)[1], min(found)[0]) if found else None


def tuning(runs: Dict[str, schema.Run], run: schema.Run,
           r: schema.OptimizerResult) -> str:
  """How `r`'s value was chosen, from the records (not from its label)."""
  task, value = run.task, r.best_value
  published = task.tuned.get(r.name)
  if run.tuned and published and r.value_source == published["source"]:
    return "authors' configuration"
  if not run.tuned and len(r.values) > 1:
    return (f"best of its {len(r.values)}-value sweep"
            + (" (at the sweep's edge)" if r.at_sweep_edge else ""))
  picked = _PICKED.match(r.value_source or "")
  near = _sweep_pick(runs, task.name, r.name, value)
  if near is not None:
    sweep, apart = near
    edge = runs[sweep].optimizers[r.name].at_sweep_edge
    return (f"pick of `{sweep}`" + (" (at its edge)" if edge else "")
            + (f" (within {100 * apart:.2g} %)" if apart > 1e-6 else ""))
  if picked:
    return (f"an earlier pick of `{picked.group(1)}` (it now picks another"
            " value)")
  return "fixed value"


def _headline(task: schema.TaskInfo) -> Tuple[str, bool]:
  if task.kind == "lm":
    return "test_loss", False
  return "test_accuracy", True


def rows(runs: Dict[str, schema.Run]) -> List[Row]:
  """Every headline row, by task (the tool's order), best first."""
  out = []
  names = list(tasks_lib.TASKS) + sorted(
      {r.task.name for r in runs.values()} - set(tasks_lib.TASKS))
  for task in names:
    of_task = {n: r for n, r in runs.items() if r.task.name == task}
    if not of_task:
      continue
    longest = max(r.task.num_steps for r in of_task.values())
    found: List[Row] = []
    for name, run in of_task.items():
      if run.task.num_steps != longest:
        continue
      key, higher = _headline(run.task)
      for r in run.optimizers.values():
        if not r.summarized:
          continue
        i = r.best_index
        row = Row(task=task, optimizer=r.name, value=r.best_value,
                  swept=r.swept_label, tuning=tuning(runs, run, r),
                  seeds=[getattr(c, key)[-1][i] for c in r.curves],
                  higher_is_better=higher,
                  step_time_ratio=r.timing.step_time_ratio,
                  state_bytes_ratio=r.state_bytes_ratio, run=name)
        same = [x for x in found
                if x.optimizer == row.optimizer and _close(row.value, x.value)]
        if same and len(same[0].seeds) >= len(row.seeds):
          continue
        found = [x for x in found if x not in same] + [row]
    adams = [x.mean for x in found if x.optimizer == "adam"]
    if adams:
      best = max(adams) if found[0].higher_is_better else min(adams)
      for x in found:
        x.delta = x.mean - best
    found.sort(key=lambda x: -x.mean if x.higher_is_better else x.mean)
    out += found
  return out


def _metric(row: Row) -> str:
  if row.higher_is_better:
    return (f"{100 * row.mean:.2f} ± {100 * row.sd:.2f}"
            if len(row.seeds) > 1 else f"{100 * row.mean:.2f}")
  return (f"{row.mean:.3f} ± {row.sd:.3f}" if len(row.seeds) > 1
          else f"{row.mean:.3f}")


def _delta(row: Row) -> str:
  if row.delta is None:
    return "—"
  if row.optimizer == "adam" and row.delta == 0:
    return "(reference)"
  if row.higher_is_better:
    return f"{100 * row.delta:+.2f} pts"
  return f"{row.delta:+.3f}"


def summary_table(runs: Dict[str, schema.Run]) -> str:
  """The summary table (Markdown) of named runs, with its legend."""
  head = ["task: metric", "optimizer", "value", "tuning", "mean ± sd (seeds)",
          "vs best Adam", "step time ×Adam", "state ×Adam", "run"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] * 4 + ["---:"] * 4 + ["---"]) + "|"]
  for row in rows(runs):
    metric = ("test acc %" if row.higher_is_better else "test bits/byte")
    lines.append("| " + " | ".join([
        f"{row.task}: {metric}", f"**{row.optimizer}**",
        f"{row.swept} {row.value:.3g}", row.tuning,
        f"{_metric(row)} ({len(row.seeds)})", _delta(row),
        fmt(row.step_time_ratio, ".2f"), fmt(row.state_bytes_ratio, ".2f"),
        f"`{row.run}`"]) + " |")
  legend = (
      "Each task's longest runs; per optimizer and value, the final test"
      " accuracy (%) or test bits per byte (lower is better), mean ± sd over"
      " the seeds in brackets; *vs best Adam*: the difference from the"
      " task's best Adam row (points of accuracy, or bits per byte); step"
      " time and state memory relative to Adam's in the same run; *tuning*:"
      " how the value was chosen (a sweep at the run's length, a sweep's"
      " pick at a shorter length, or the arTuRO authors' published"
      " configuration).")
  return "\n".join(lines) + "\n\n" + legend + "\n"


def runs_by_name(runs: Sequence[Tuple[str, schema.Run]]
                 ) -> Dict[str, schema.Run]:
  out = {}
  for name, run in runs:
    if name in out:
      raise ValueError(f"two runs named {name!r}: give each its own folder")
    out[name] = run
  return out
