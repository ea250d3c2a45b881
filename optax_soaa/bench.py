"""Benchmark command: compares the optimizers on small tasks, honestly.

    python -m optax_soaa.bench                       # digits-mlp, every optimizer
    python -m optax_soaa.bench --tasks fmnist-cnn --quick --seeds 2
    python -m optax_soaa.bench --tasks lm --quick --optimizers adam soaa-variance
    python -m optax_soaa.bench --tasks fmnist-cnn --epochs 10 --seeds 2 \\
        --tuned --tuned-from results/bench/fmnist-cnn-sweep/results.json
    python -m optax_soaa.bench --tasks fmnist-cnn ... --resume   # after a stop
    python -m optax_soaa.bench --from-results results/bench/*/results.json \\
        --write-benchmarks-md

Two modes. Sweep (default): each optimizer trains over the same sweep of its
step size (learning rate, or kl_bound for arTuRO) and is reported at its best
value. Tuned (--tuned): each optimizer trains once per seed at its tuned
value: the published tuned configuration where the task has one (fmnist-cnn:
the arTuRO authors' Adam, AdamW, SGD-momentum and arTuRO), else the value a
sweep picked (--tuned-from a sweep's results.json). Every run writes
results.json (after every optimizer and seed: a stopped run keeps what
finished, and --resume continues it), results.md and PNG plots into --out
(default bench_results/<task>) and prints the table. Before training it
measures each optimizer's step and prints the expected wall time. See
BENCHMARKS.md for the protocol.
"""

import argparse
import os
import pathlib
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from optax_soaa.benchmarks import optimizers as opt_lib
from optax_soaa.benchmarks import report
from optax_soaa.benchmarks import runner as runner_lib
from optax_soaa.benchmarks import tasks as tasks_lib


def _split_list(values: Optional[Sequence[str]]) -> List[str]:
  out = []
  for v in values or ():
    out += [x for x in v.split(",") if x]
  return out


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="optax-soaa-bench", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=f"tasks: {', '.join(tasks_lib.TASKS)}\noptimizers: "
             f"{', '.join(opt_lib.REGISTRY)}")
  p.add_argument("--tasks", nargs="+", default=["digits-mlp"],
                 help="tasks to run (space or comma separated)")
  p.add_argument("--optimizers", nargs="+", default=None,
                 help="optimizers (default: all); adam always runs as the"
                      " reference")
  p.add_argument("--quick", action="store_true",
                 help="scaled-down preset (fewer steps, data, sweep values)")
  p.add_argument("--seeds", type=int, default=1,
                 help="number of seeds (0..N-1) per value")
  length = p.add_mutually_exclusive_group()
  length.add_argument("--steps", type=int, default=None,
                      help="training steps (overrides the task's default;"
                           " the fmnist-cnn milestones scale with it)")
  length.add_argument("--epochs", type=float, default=None,
                      help="training epochs of the classification tasks"
                           " (steps = epochs x batches per epoch; fmnist-cnn's"
                           " milestones at 1/2 and 3/4 of them)")
  p.add_argument("--lrs", nargs="+", default=None,
                 help="sweep factors times each optimizer's centre value,"
                      " e.g. 0.1,0.316,1,3.16 (>= 4 recommended)")
  p.add_argument("--tuned", action="store_true",
                 help="no sweep: each optimizer at its tuned value only")
  p.add_argument("--tuned-from", default=None, metavar="JSON",
                 help="with --tuned: a sweep's results.json (same task) whose"
                      " picked values serve the optimizers without a"
                      " published tuned configuration")
  p.add_argument("--resume", action="store_true",
                 help="continue the run whose results.json is in --out:"
                      " finished optimizers and seeds are kept, not rerun")
  p.add_argument("--plan", action="store_true",
                 help="time every optimizer's step, print the expected wall"
                      " time of the run, and stop (trains nothing, writes"
                      " nothing)")
  p.add_argument("--execution", choices=runner_lib.EXECUTIONS,
                 default="auto",
                 help="how the values train: vmapped together (a GPU) or one"
                      " after another (auto: sequential on the CPU, where"
                      " vmapped convolutions are slow)")
  p.add_argument("--out", default=None,
                 help="output directory (default bench_results/<task>; with"
                      " several tasks, <out>/<task>)")
  p.add_argument("--data-dir", default=None,
                 help="Fashion-MNIST IDX directory (overrides"
                      f" ${tasks_lib.data_lib.FMNIST_ENV_VAR})")
  p.add_argument("--text-file", default=None,
                 help="text for the lm task instead of the stdlib sources")
  p.add_argument("--timing-pairs", type=int, default=None,
                 help="interleaved Adam/optimizer timing pairs (default 15,"
                      " 3 with --quick)")
  p.add_argument("--no-progress", action="store_true",
                 help="no tqdm progress bars")
  p.add_argument("--from-results", nargs="+", default=None, metavar="JSON",
                 help="train nothing; re-render the tables and plots of these"
                      " results.json files (and BENCHMARKS.md if asked)")
  p.add_argument("--note", action="append", default=[],
                 help="a line added under the results in BENCHMARKS.md"
                      " (repeatable), e.g. a caveat about a run")
  p.add_argument("--write-benchmarks-md", nargs="?", const="BENCHMARKS.md",
                 default=None, metavar="PATH",
                 help="(re)write BENCHMARKS.md from this invocation's results")
  return p


def _log(msg: str) -> None:
  print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 90:
    return f"{seconds} s"
  if seconds < 5400:
    return f"{seconds / 60:.0f} min"
  return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def tuned_values(task: tasks_lib.Task, optimizers: Sequence[str],
                 sweep_path: Optional[str]) -> Dict[str, Tuple[float, str]]:
  """Each optimizer's tuned value and its source (published, or a sweep's).

  Raises SystemExit naming the optimizers that have neither.
  """
  picked: Dict[str, Tuple[float, str]] = {}
  if sweep_path:
    sweep = report.load_json(sweep_path)
    if sweep["task"]["name"] != task.name:
      raise SystemExit(f"--tuned-from {sweep_path} is a {sweep['task']['name']}"
                       f" run, not {task.name}")
    if sweep.get("mode", "sweep") != "sweep":
      raise SystemExit(f"--tuned-from {sweep_path} is not a sweep")
    envs = sweep.get("environments") or [sweep["environment"]]

    def where(r):
      # The invocation that trained this optimizer (a resumed sweep has
      # several); older results files do not record it.
      i = r.get("environment_index", 0 if len(envs) == 1 else None)
      if i is None:
        commits = ", ".join(dict.fromkeys(
            e.get("git_commit") or "unknown" for e in envs))
        return (f"picked by the sweep {sweep_path} (run over {len(envs)}"
                f" invocations, commits {commits}; which one trained it is"
                " not recorded)")
      env = envs[i]
      return (f"picked by the sweep {sweep_path} (`{env['command']}`,"
              f" {env['date']}, commit {env.get('git_commit') or 'unknown'})")

    for name, r in sweep["optimizers"].items():
      if r.get("status") == "ok" and r.get("best_value") is not None:
        picked[name] = (float(r["best_value"]), where(r))
  out, missing = {}, []
  for name in optimizers:
    if name in task.tuned:
      out[name] = task.tuned[name]
    elif name in picked:
      out[name] = picked[name]
    else:
      missing.append(name)
  if missing:
    raise SystemExit(
        f"--tuned: no tuned value for {', '.join(missing)} on {task.name}"
        f" (published: {', '.join(task.tuned) or 'none'}); run a sweep of"
        " them and pass its results.json with --tuned-from")
  return out


# Task fields that must match for --resume to continue a run.
_RESUME_KEYS = ("name", "kind", "batch_size", "num_steps", "eval_every",
                "milestones", "train_size", "eval_sizes", "seq_len")


def _check_resumable(previous: Dict[str, Any], task_desc: Dict[str, Any],
                     mode: str, path: pathlib.Path) -> None:
  old = previous["task"]
  diff = [k for k in _RESUME_KEYS if old.get(k) != task_desc.get(k)]
  if previous.get("mode", "sweep") != mode:
    diff.append("mode")
  if diff:
    raise SystemExit(
        f"--resume: {path} is a different run ({', '.join(diff)} differ:"
        f" {[(k, old.get(k), task_desc.get(k)) for k in diff if k != 'mode']});"
        " give another --out or the same options")


def _out_dir(name: str, args: argparse.Namespace) -> pathlib.Path:
  """Where a task's results go: --out, <out>/<task> with several tasks."""
  if args.out and len(args.tasks_list) > 1:
    return pathlib.Path(args.out) / name
  return pathlib.Path(args.out or pathlib.Path("bench_results") / name)


def run_task(name: str, args: argparse.Namespace, optimizers: Sequence[str],
             argv: Sequence[str]) -> dict:
  t_start = time.perf_counter()
  factors = [float(x) for x in _split_list(args.lrs)] or None
  try:
    task = tasks_lib.make_task(name, quick=args.quick, steps=args.steps,
                               epochs=args.epochs, factors=factors,
                               data_dir=args.data_dir,
                               text_file=args.text_file)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"{name}: {e}") from e
  mode = "tuned" if args.tuned else "sweep"
  # Unavailable optimizers are reported as such; they need no tuned value.
  unavailable = {o: opt_lib.REGISTRY[o].available() for o in optimizers}
  unavailable = {o: why for o, why in unavailable.items() if why}
  tuned = (tuned_values(task, [o for o in optimizers if o not in unavailable],
                        args.tuned_from) if args.tuned else {})
  pairs = args.timing_pairs or (3 if args.quick else 15)
  seeds = tuple(range(max(1, args.seeds)))
  runner = runner_lib.TaskRunner(task, seeds=seeds, timing_pairs=pairs,
                                 progress=not args.no_progress,
                                 execution=args.execution)
  out = _out_dir(name, args)
  if not args.plan:
    out.mkdir(parents=True, exist_ok=True)
  path = out / report.RESULTS_FILE
  task_desc = task.describe()

  previous: Dict[str, Any] = {}
  if args.resume and path.is_file():
    previous = report.load_json(path)
    _check_resumable(previous, task_desc, mode, path)
  elif args.resume:
    _log(f"--resume: no {path} yet; starting a new run")

  # Taken before training: the commit and date of the code that runs.
  env = report.environment(argv)
  environments = previous.get("environments") or (
      [previous["environment"]] if previous else [])
  environments.append(env)
  earlier_wall = previous.get("wall_s", 0.0) if previous else 0.0

  def values_of(opt):
    if opt in unavailable:
      return []
    if mode == "tuned":
      return [tuned[opt][0]]
    return runner.values(opt_lib.REGISTRY[opt]).tolist()

  def same_settings(opt, r):
    return r.get("hp", {}) == runner.recorded_hp(opt_lib.REGISTRY[opt])

  results: Dict[str, Dict[str, Any]] = {}
  kept: Dict[str, Dict[str, Any]] = {}
  for opt in optimizers:
    # Kept only when it trained the same values with the same settings (a
    # changed sweep, tuned value or fixed setting trains again).
    old = (previous.get("optimizers") or {}).get(opt) or {}
    old_values, new_values = old.get("values", []), values_of(opt)
    if (old.get("status") == "ok" and new_values
        and len(old_values) == len(new_values)
        and np.allclose(old_values, new_values, rtol=1e-6)
        and same_settings(opt, old)):
      kept[opt] = old
      if set(seeds) <= {c["seed"] for c in old["curves"]}:
        results[opt] = old

  # A resumed run's optimizers that this invocation does not name stay in
  # the results as they were (resuming to add one optimizer keeps the rest).
  carried = {o: r for o, r in (previous.get("optimizers") or {}).items()
             if o not in optimizers}
  for o, r in carried.items():
    if (o in opt_lib.REGISTRY and r.get("status") == "ok"
        and not same_settings(o, r)):
      _log(f"--resume: {o} is kept as it ran, with settings that differ from"
           f" this code's ({r.get('hp')} vs"
           f" {runner.recorded_hp(opt_lib.REGISTRY[o])}); name it in"
           " --optimizers to train it again")
  planned = list(dict.fromkeys(
      list(previous.get("planned_optimizers") or []) + list(carried)
      + list(optimizers)))

  def save(complete):
    ordered = {o: results.get(o) or carried[o] for o in planned
               if o in results or o in carried}
    summary = runner_lib.summarize(ordered, task)
    # Complete: every planned optimizer ran every seed (or could not run).
    complete = complete and all(
        o in ordered and (ordered[o].get("status") != "ok" or set(seeds) <= {
            c["seed"] for c in ordered[o].get("curves", [])})
        for o in planned)
    payload = dict(environment=environments[0], environments=environments,
                   task=task_desc, mode=mode, seeds=list(seeds),
                   execution=runner.execution, optimizers=ordered,
                   complete=complete, planned_optimizers=planned,
                   **summary)
    payload["wall_s"] = earlier_wall + time.perf_counter() - t_start
    report.write_json(path, payload)
    return report.load_json(path)

  todo = [o for o in optimizers if o not in results]
  _log(f"{name}: {task.num_steps} steps (batch {task.batch_size}) x"
       f" {'1 tuned value' if mode == 'tuned' else f'{len(task.factors)} sweep values'}"
       f" x {len(seeds)} seed(s), {runner.execution} execution;"
       f" to run: {', '.join(todo) or 'nothing'}"
       + (f"; kept from {path}: "
          + ", ".join(o for o in planned if o in results or o in carried)
          if len(todo) < len(optimizers) or carried else ""))
  for opt in optimizers:
    if mode == "tuned" and opt in tuned:
      _log(f"  {opt}: {opt_lib.REGISTRY[opt].swept} = {tuned[opt][0]:.6g}"
           f" ({tuned[opt][1]})")

  # Every optimizer's step is measured first, so the run's length is known
  # before it starts.
  timings: Dict[str, Dict[str, Any]] = {}
  runner.measure_eval()
  expected = 0.0
  for opt in todo:
    spec = opt_lib.REGISTRY[opt]
    if kept.get(opt, {}).get("timing"):
      timings[opt] = kept[opt]["timing"]
    elif opt in unavailable:
      _log(f"  {opt}: unavailable ({unavailable[opt]})")
      continue
    else:
      try:
        timings[opt] = runner.time_step(spec)
      except Exception as e:  # pylint: disable=broad-except
        _log(f"  {opt}: timing failed ({type(e).__name__}: {e}); it will be"
             " reported as an error")
        continue
    done = {c["seed"] for c in kept.get(opt, {}).get("curves", [])}
    left = len([s for s in seeds if s not in done])
    secs = runner.expected_seconds(timings[opt], len(values_of(opt)), left)
    expected += secs
    _log(f"  {opt}: {timings[opt]['step_time_s'] * 1e3:.3g} ms/step"
         f" ({timings[opt]['step_time_ratio']:.2f}x Adam) -> about"
         f" {_duration(secs)} for {len(values_of(opt))} value(s) x {left}"
         " seed(s)")
  _log(f"{name}: expected wall time about {_duration(expected)} (measured"
       f" steps x {task.num_steps} steps, {runner.eval_s:.2g} s per"
       " evaluation); timing took"
       f" {_duration(time.perf_counter() - t_start)}")

  if args.plan:
    return dict(expected_s=expected, timings=timings)
  payload = save(complete=not todo)
  for opt in todo:
    spec = opt_lib.REGISTRY[opt]

    def with_source(result, opt=opt):
      if mode == "tuned" and result.get("status") == "ok":
        result["value_source"] = tuned[opt][1]
      # Which invocation of a resumed run trained it (its environment).
      result["environment_index"] = len(environments) - 1
      return result

    def on_seed(partial, opt=opt):
      results[opt] = with_source(partial)
      save(complete=False)

    results[opt] = with_source(runner.run(
        spec, values_of(opt), previous=kept.get(opt), on_seed=on_seed,
        timing=timings.get(opt)))
    payload = save(complete=opt == todo[-1])
    r = results[opt]
    _log(f"{opt}: {r.get('status')}"
         + (f", {_duration(r['wall_s'])}" if "wall_s" in r else ""))
  table = report.markdown_report(payload)
  (out / report.TABLE_FILE).write_text(table)
  report.write_plots(payload, out)
  print(table)
  _log(f"wrote {out}/{{{report.RESULTS_FILE}, {report.TABLE_FILE},"
       f" {', '.join(report.PLOT_FILES)}}} in {_duration(payload['wall_s'])}")
  return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  payloads = []
  plot_dirs = []  # Where each payload's plots are, for BENCHMARKS.md.
  if args.from_results:
    for path in args.from_results:
      payload = report.load_json(path)
      out = pathlib.Path(path).parent
      plot_dirs.append(out)
      table = report.markdown_report(payload)
      if os.access(out, os.W_OK):  # re-render the table and plots beside it
        (out / report.TABLE_FILE).write_text(table)
        report.write_plots(payload, out)
      print(table)
      payloads.append(payload)
  else:
    args.tasks_list = _split_list(args.tasks)
    if args.tuned_from and not args.tuned:
      raise SystemExit("--tuned-from needs --tuned")
    if args.plan and args.write_benchmarks_md:
      raise SystemExit("--plan writes nothing; drop --write-benchmarks-md")
    for t in args.tasks_list:
      if t not in tasks_lib.TASKS:
        raise SystemExit(f"unknown task {t!r}; choose from {tasks_lib.TASKS}")
    optimizers = _split_list(args.optimizers) or list(opt_lib.DEFAULT_OPTIMIZERS)
    for o in optimizers:
      if o not in opt_lib.REGISTRY:
        raise SystemExit(f"unknown optimizer {o!r}; choose from"
                         f" {tuple(opt_lib.REGISTRY)}")
    if "adam" not in optimizers:
      optimizers.insert(0, "adam")  # the reference for target and ratios
    optimizers = list(dict.fromkeys(optimizers))
    for t in args.tasks_list:
      payloads.append(run_task(t, args, optimizers,
                               ["python", "-m", "optax_soaa.bench"] + argv))
      plot_dirs.append(_out_dir(t, args))
  if args.write_benchmarks_md:
    path = pathlib.Path(args.write_benchmarks_md)
    path.write_text(report.benchmarks_md(
        payloads, notes=args.note, plot_dirs=plot_dirs,
        relative_to=path.parent))
    print(f"[bench] wrote {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
