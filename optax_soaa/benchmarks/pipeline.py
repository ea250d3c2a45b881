"""One task's run as its stages: plan -> train -> record -> report.

* `plan_run`: the task, the values each optimizer trains (a sweep, or each
  one's tuned value), and what a resumed run keeps from its results.json;
* `train_run`: times every optimizer's step (so the run's length is known
  before it starts), then trains the rest, recording after every seed;
* `record`: summarizes and writes results.json (`schema.Run`);
* `report_run`: writes results.md and the plots, and prints the table.
"""

import dataclasses
import pathlib
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from optax_soaa.benchmarks import optimizers as opt_lib
from optax_soaa.benchmarks import record as record_lib
from optax_soaa.benchmarks import report
from optax_soaa.benchmarks import schema
from optax_soaa.benchmarks import summarize as summarize_lib
from optax_soaa.benchmarks import tasks as tasks_lib
from optax_soaa.benchmarks import train as train_lib


def log(msg: str) -> None:
  print(f"[bench] {msg}", file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 90:
    return f"{seconds} s"
  if seconds < 5400:
    return f"{seconds / 60:.0f} min"
  return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def tuned_values(task: tasks_lib.Task, optimizers: Sequence[str],
                 sweep_path: Optional[str]) -> Dict[str, Tuple[float, str]]:
  """Each optimizer's tuned value and its source (published, or a sweep's).

  A sweep is named by its run (the folder of its results.json). Raises
  SystemExit naming the optimizers that have neither.
  """
  picked: Dict[str, Tuple[float, str]] = {}
  if sweep_path:
    sweep, name = schema.load(sweep_path), schema.run_name(sweep_path)
    if sweep.task.name != task.name:
      raise SystemExit(f"--tuned-from {sweep_path} is a {sweep.task.name}"
                       f" run, not {task.name}")
    if sweep.tuned:
      raise SystemExit(f"--tuned-from {sweep_path} is not a sweep")
    envs = sweep.environments

    def where(r):
      # The invocation that trained this optimizer (a resumed sweep has
      # several); older results files do not record it.
      i = r.environment_index
      if i is None and len(envs) == 1:
        i = 0
      if i is None:
        commits = ", ".join(dict.fromkeys(e.git_commit or "unknown"
                                          for e in envs))
        return (f"picked by the sweep {name} (run over {len(envs)}"
                f" invocations, commits {commits}; which one trained it is"
                " not recorded)")
      env = envs[i]
      return (f"picked by the sweep {name} (`{env.command}`, {env.date},"
              f" commit {env.git_commit or 'unknown'})")

    for opt, r in sweep.optimizers.items():
      if r.summarized and r.best_value is not None:
        picked[opt] = (float(r.best_value), where(r))
  out, missing = {}, []
  for opt in optimizers:
    if opt in task.tuned:
      out[opt] = task.tuned[opt]
    elif opt in picked:
      out[opt] = picked[opt]
    else:
      missing.append(opt)
  if missing:
    raise SystemExit(
        f"--tuned: no tuned value for {', '.join(missing)} on {task.name}"
        f" (published: {', '.join(task.tuned) or 'none'}); run a sweep of"
        " them and pass its results.json with --tuned-from")
  return out


# Task fields that must match for --resume to continue a run.
RESUME_KEYS = ("name", "kind", "batch_size", "num_steps", "eval_every",
               "milestones", "train_size", "eval_sizes", "seq_len")


def check_same_task(previous: schema.Run, task: schema.TaskInfo, mode: str,
                    path: pathlib.Path) -> None:
  old, new = vars(previous.task), vars(task)
  diff = [k for k in RESUME_KEYS if old.get(k) != new.get(k)]
  if previous.mode != mode:
    diff.append("mode")
  if diff:
    raise SystemExit(
        f"--resume: {path} is a different run ({', '.join(diff)} differ:"
        f" {[(k, old.get(k), new.get(k)) for k in diff if k != 'mode']});"
        " give another --out or the same options")


@dataclasses.dataclass
class RunPlan:
  """What one invocation trains on one task, and what it keeps."""

  task: tasks_lib.Task
  info: schema.TaskInfo
  mode: str
  seeds: Tuple[int, ...]
  runner: train_lib.TaskRunner
  path: pathlib.Path  # its results.json
  optimizers: List[str]  # named by this invocation
  values: Dict[str, List[float]]  # per optimizer ([] when unavailable)
  tuned: Dict[str, Tuple[float, str]]
  unavailable: Dict[str, str]
  environments: List[schema.Environment]  # this invocation's last
  results: Dict[str, schema.OptimizerResult]  # finished, kept
  kept: Dict[str, schema.OptimizerResult]  # same values and settings
  carried: Dict[str, schema.OptimizerResult]  # not named, kept as they ran
  planned: List[str]
  earlier_wall_s: float
  t_start: float

  @property
  def todo(self) -> List[str]:
    return [o for o in self.optimizers if o not in self.results]


def _same_values(old: schema.OptimizerResult, values: Sequence[float]) -> bool:
  return (old.status == "ok" and bool(values)
          and len(old.values) == len(values)
          and np.allclose(old.values, values, rtol=1e-6))


def plan_run(name: str, options, optimizers: Sequence[str],
             argv: Sequence[str], out: pathlib.Path) -> RunPlan:
  """Stage 1: the task, each optimizer's values, what a resume keeps."""
  t_start = time.perf_counter()
  factors = list(options.factors or ()) or None
  try:
    task = tasks_lib.make_task(name, quick=options.quick, steps=options.steps,
                               epochs=options.epochs, factors=factors,
                               data_dir=options.data_dir,
                               text_file=options.text_file)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"{name}: {e}") from e
  mode = "tuned" if options.tuned else "sweep"
  # Unavailable optimizers are reported as such; they need no tuned value.
  unavailable = {o: opt_lib.REGISTRY[o].available() for o in optimizers}
  unavailable = {o: why for o, why in unavailable.items() if why}
  tuned = (tuned_values(task, [o for o in optimizers if o not in unavailable],
                        options.tuned_from) if options.tuned else {})
  runner = train_lib.TaskRunner(
      task, seeds=tuple(range(max(1, options.seeds))),
      timing_pairs=options.timing_pairs or (3 if options.quick else 15),
      progress=not options.no_progress, execution=options.execution)
  path = out / schema.RESULTS_FILE
  info = schema.TaskInfo(**schema.clean(task.describe()))

  previous = None
  if options.resume and path.is_file():
    previous = schema.load(path)
    check_same_task(previous, info, mode, path)
  elif options.resume:
    log(f"--resume: no {path} yet; starting a new run")

  def values_of(o):
    if o in unavailable:
      return []
    if mode == "tuned":
      return [tuned[o][0]]
    return runner.values(opt_lib.REGISTRY[o]).tolist()

  values = {o: values_of(o) for o in optimizers}
  same_settings = lambda o, r: r.hp == runner.recorded_hp(opt_lib.REGISTRY[o])
  old_results = previous.optimizers if previous else {}
  results, kept = {}, {}
  for o in optimizers:
    # Kept only when it trained the same values with the same settings (a
    # changed sweep, tuned value or fixed setting trains again).
    old = old_results.get(o)
    if (old is not None and _same_values(old, values[o])
        and same_settings(o, old)):
      kept[o] = old
      if set(runner.seeds) <= set(old.seeds):
        results[o] = old
  # A resumed run's optimizers that this invocation does not name stay as
  # they were (resuming to add one optimizer keeps the rest).
  carried = {o: r for o, r in old_results.items() if o not in optimizers}
  for o, r in carried.items():
    if (o in opt_lib.REGISTRY and r.status == "ok"
        and not same_settings(o, r)):
      log(f"--resume: {o} is kept as it ran, with settings that differ from"
          f" this code's ({r.hp} vs {runner.recorded_hp(opt_lib.REGISTRY[o])});"
          " name it in --optimizers to train it again")
  # Taken before training: the commit and date of the code that runs.
  environments = (list(previous.environments) if previous else []) + [
      record_lib.environment(argv)]
  planned = list(dict.fromkeys(
      (previous.planned_optimizers if previous else []) + list(carried)
      + list(optimizers)))
  return RunPlan(task=task, info=info, mode=mode, seeds=runner.seeds,
                 runner=runner, path=path, optimizers=list(optimizers),
                 values=values, tuned=tuned, unavailable=unavailable,
                 environments=environments, results=results, kept=kept,
                 carried=carried, planned=planned,
                 earlier_wall_s=previous.wall_s if previous else 0.0,
                 t_start=t_start)


def record(plan: RunPlan, complete: bool) -> schema.Run:
  """Stage 3: summarizes what has trained and writes results.json."""
  ordered = {o: plan.results.get(o) or plan.carried[o] for o in plan.planned
             if o in plan.results or o in plan.carried}
  # Complete: every planned optimizer ran every seed (or could not run).
  complete = complete and all(
      o in ordered and (ordered[o].status != "ok"
                        or set(plan.seeds) <= set(ordered[o].seeds))
      for o in plan.planned)
  run = summarize_lib.summarize(schema.Run(
      environments=plan.environments, task=plan.info, mode=plan.mode,
      seeds=list(plan.seeds), execution=plan.runner.execution,
      optimizers=ordered, complete=complete, planned_optimizers=plan.planned,
      wall_s=plan.earlier_wall_s + time.perf_counter() - plan.t_start))
  schema.save(plan.path, run)
  return schema.load(plan.path)


def time_steps(plan: RunPlan) -> Tuple[Dict[str, schema.Timing], float]:
  """Every optimizer still to train, timed; and the run's expected seconds."""
  runner, timings, expected = plan.runner, {}, 0.0
  runner.measure_eval()
  for o in plan.todo:
    kept = plan.kept.get(o)
    if kept is not None and kept.timing is not None:
      timings[o] = kept.timing
    elif o in plan.unavailable:
      log(f"  {o}: unavailable ({plan.unavailable[o]})")
      continue
    else:
      try:
        timings[o] = runner.time_step(opt_lib.REGISTRY[o])
      except Exception as e:  # pylint: disable=broad-except
        log(f"  {o}: timing failed ({type(e).__name__}: {e}); it will be"
            " reported as an error")
        continue
    done = set(kept.seeds) if kept is not None else set()
    left = len([s for s in plan.seeds if s not in done])
    secs = runner.expected_seconds(timings[o], len(plan.values[o]), left)
    expected += secs
    log(f"  {o}: {timings[o].step_time_s * 1e3:.3g} ms/step"
        f" ({timings[o].step_time_ratio:.2f}x Adam) -> about"
        f" {duration(secs)} for {len(plan.values[o])} value(s) x {left}"
        " seed(s)")
  log(f"{plan.task.name}: expected wall time about {duration(expected)}"
      f" (measured steps x {plan.task.num_steps} steps,"
      f" {runner.eval_s:.2g} s per evaluation); timing took"
      f" {duration(time.perf_counter() - plan.t_start)}")
  return timings, expected


def describe_plan(plan: RunPlan) -> None:
  task = plan.task
  sweep = ("1 tuned value" if plan.mode == "tuned"
           else f"{len(task.factors)} sweep values")
  kept = [o for o in plan.planned if o in plan.results or o in plan.carried]
  log(f"{task.name}: {task.num_steps} steps (batch {task.batch_size}) x"
      f" {sweep} x {len(plan.seeds)} seed(s), {plan.runner.execution}"
      f" execution; to run: {', '.join(plan.todo) or 'nothing'}"
      + (f"; kept from {plan.path}: " + ", ".join(kept)
         if len(plan.todo) < len(plan.optimizers) or plan.carried else ""))
  for o, (value, source) in plan.tuned.items():
    log(f"  {o}: {opt_lib.REGISTRY[o].swept} = {value:.6g} ({source})")


def train_run(plan: RunPlan, timings: Dict[str, schema.Timing]) -> schema.Run:
  """Stage 2: trains what is left, recording after every seed."""
  run = record(plan, complete=not plan.todo)
  todo = plan.todo
  index = len(plan.environments) - 1
  for o in todo:
    def tag(result, o=o):
      if plan.mode == "tuned" and result.status == "ok":
        result.value_source = plan.tuned[o][1]
      result.environment_index = index  # which invocation trained it
      return result

    def on_seed(partial, o=o):
      plan.results[o] = tag(partial)
      record(plan, complete=False)

    plan.results[o] = tag(plan.runner.run(
        opt_lib.REGISTRY[o], plan.values[o], previous=plan.kept.get(o),
        on_seed=on_seed, timing=timings.get(o)))
    run = record(plan, complete=o == todo[-1])
    r = plan.results[o]
    log(f"{o}: {r.status}"
        + (f", {duration(r.wall_s)}" if r.wall_s is not None else ""))
  return run


def report_run(run: schema.Run, out: pathlib.Path) -> None:
  """Stage 4: results.md and the plots beside results.json; the table."""
  table = report.markdown_report(run)
  (out / report.TABLE_FILE).write_text(table)
  report.write_plots(run, out)
  print(table)


def merge_runs(base: schema.Run, more: schema.Run) -> schema.Run:
  """`base` with what `more` (a later run of the same task) trained.

  An optimizer in both gets the values of both sweeps (`extend_sweep`);
  one only in `more` is added. Both must be sweeps of the same task.
  """
  check_same_task(base, more.task, "sweep", pathlib.Path("the merged run"))
  if more.mode != "sweep":
    raise SystemExit("only sweeps are merged")
  offset = len(base.environments)
  optimizers = dict(base.optimizers)
  for o, r in more.optimizers.items():
    r = dataclasses.replace(
        r, environment_index=offset + (r.environment_index or 0))
    old = optimizers.get(o)
    optimizers[o] = (summarize_lib.extend_sweep(old, r, r.environment_index)
                     if old is not None and old.ok and r.ok else r)
  return summarize_lib.summarize(dataclasses.replace(
      base, environments=base.environments + more.environments,
      optimizers=optimizers, complete=base.complete and more.complete,
      planned_optimizers=list(dict.fromkeys(base.planned_optimizers
                                            + more.planned_optimizers)),
      wall_s=base.wall_s + more.wall_s,
      provenance_notes=list(dict.fromkeys(base.provenance_notes
                                          + more.provenance_notes))))


def run_task(name: str, options, optimizers: Sequence[str],
             argv: Sequence[str], out: pathlib.Path) -> Optional[schema.Run]:
  """plan -> train -> record -> report; with `options.plan`, only timing."""
  plan = plan_run(name, options, optimizers, argv, out)
  describe_plan(plan)
  timings, expected = time_steps(plan)
  if options.plan:
    del expected
    return None
  out.mkdir(parents=True, exist_ok=True)
  run = train_run(plan, timings)
  report_run(run, out)
  log(f"wrote {out}/{{{schema.RESULTS_FILE}, {report.TABLE_FILE},"
      f" {', '.join(report.PLOT_FILES)}}} in {duration(run.wall_s)}")
  return run
