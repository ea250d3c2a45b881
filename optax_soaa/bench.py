"""Benchmark command: compares the optimizers on small tasks, honestly.

    python -m optax_soaa.bench                       # digits-mlp, every optimizer
    python -m optax_soaa.bench --tasks fmnist-cnn --quick --seeds 2
    python -m optax_soaa.bench --tasks lm --quick --optimizers adam soaa-variance
    python -m optax_soaa.bench --from-results results/bench/*/results.json \\
        --write-benchmarks-md

Each optimizer trains over the same sweep of its step size (learning rate,
or kl_bound for arTuRO) and is reported at its best value. Every run writes
results.json, results.md and PNG plots into --out (default
bench_results/<task>) and prints the table. See BENCHMARKS.md for the protocol.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import List, Optional, Sequence

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
                 help="number of seeds (0..N-1) per sweep value")
  p.add_argument("--steps", type=int, default=None,
                 help="training steps (overrides the task's default; the"
                      " fmnist-cnn milestones scale with it)")
  p.add_argument("--lrs", nargs="+", default=None,
                 help="sweep factors times each optimizer's centre value,"
                      " e.g. 0.1,0.316,1,3.16 (>= 4 recommended)")
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
                      " 7 with --quick)")
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


def run_task(name: str, args: argparse.Namespace, optimizers: Sequence[str],
             argv: Sequence[str]) -> dict:
  t_start = time.perf_counter()
  factors = [float(x) for x in _split_list(args.lrs)] or None
  task = tasks_lib.make_task(name, quick=args.quick, steps=args.steps,
                             factors=factors, data_dir=args.data_dir,
                             text_file=args.text_file)
  pairs = args.timing_pairs or (7 if args.quick else 15)
  seeds = tuple(range(max(1, args.seeds)))
  runner = runner_lib.TaskRunner(task, seeds=seeds, timing_pairs=pairs,
                                 progress=not args.no_progress)
  print(f"[bench] {name}: {task.num_steps} steps x {len(task.factors)} sweep"
        f" values x {len(seeds)} seed(s), optimizers: {', '.join(optimizers)}",
        file=sys.stderr)
  out = pathlib.Path(args.out) / name if (
      args.out and len(args.tasks_list) > 1) else pathlib.Path(
          args.out or pathlib.Path("bench_results") / name)
  out.mkdir(parents=True, exist_ok=True)

  # Taken before training: the commit and date of the code that runs.
  env = report.environment(argv)

  def save(results, complete):
    summary = runner_lib.summarize(results, task)
    payload = dict(environment=env, task=task.describe(),
                   seeds=list(seeds), optimizers=results, complete=complete,
                   planned_optimizers=list(optimizers), **summary)
    payload["wall_s"] = time.perf_counter() - t_start
    report.write_json(out / report.RESULTS_FILE, payload)
    return report.load_json(out / report.RESULTS_FILE)

  results = {}
  for opt in optimizers:
    results[opt] = runner.run(opt_lib.REGISTRY[opt])
    # Written after every optimizer, so an interrupted long run keeps what
    # finished (re-render it with --from-results).
    payload = save(results, complete=len(results) == len(optimizers))
  table = report.markdown_report(payload)
  (out / report.TABLE_FILE).write_text(table)
  report.write_plots(payload, out)
  print(table)
  print(f"[bench] wrote {out}/{{{report.RESULTS_FILE}, {report.TABLE_FILE},"
        f" {', '.join(report.PLOT_FILES)}}} in {payload['wall_s']:.0f} s",
        file=sys.stderr)
  return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  payloads = []
  if args.from_results:
    for path in args.from_results:
      payload = report.load_json(path)
      out = pathlib.Path(path).parent
      table = report.markdown_report(payload)
      if os.access(out, os.W_OK):  # re-render the table and plots beside it
        (out / report.TABLE_FILE).write_text(table)
        report.write_plots(payload, out)
      print(table)
      payloads.append(payload)
  else:
    args.tasks_list = _split_list(args.tasks)
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
  if args.write_benchmarks_md:
    path = pathlib.Path(args.write_benchmarks_md)
    path.write_text(report.benchmarks_md(payloads, notes=args.note))
    print(f"[bench] wrote {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
