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
docs/benchmark_protocol.md for the protocol and BENCHMARKS.md for the results.
"""

import argparse
import os
import pathlib
import sys
from typing import List, Optional, Sequence

from optax_soaa.benchmarks import optimizers as opt_lib
from optax_soaa.benchmarks import pipeline
from optax_soaa.benchmarks import report
from optax_soaa.benchmarks import schema
from optax_soaa.benchmarks import tasks as tasks_lib
from optax_soaa.benchmarks import train as train_lib

# The stage functions, under the names this module has always offered.
tuned_values = pipeline.tuned_values


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
                      " published tuned configuration (recorded by its run"
                      " name, the folder of the file)")
  p.add_argument("--resume", action="store_true",
                 help="continue the run whose results.json is in --out:"
                      " finished optimizers and seeds are kept, not rerun")
  p.add_argument("--plan", action="store_true",
                 help="time every optimizer's step, print the expected wall"
                      " time of the run, and stop (trains nothing, writes"
                      " nothing)")
  p.add_argument("--execution", choices=train_lib.EXECUTIONS,
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
  p.add_argument("--merge", default=None, metavar="DIR",
                 help="with --from-results: join those sweeps of one task"
                      " (the first, then the values each later one added)"
                      " into DIR/results.json, e.g. a sweep widened by a"
                      " later run of the new values only")
  p.add_argument("--provenance", action="append", default=[],
                 metavar="NOTE",
                 help="with --merge: a note on how the runs came about (a"
                      " machine's load, a package from a local clone), kept"
                      " in the merged results.json (repeatable)")
  p.add_argument("--note", action="append", default=[],
                 help="a line added under the results in BENCHMARKS.md"
                      " (repeatable), e.g. a caveat about a run")
  p.add_argument("--write-benchmarks-md", nargs="?", const="BENCHMARKS.md",
                 default=None, metavar="PATH",
                 help="(re)write BENCHMARKS.md from this invocation's results"
                      " (and, beside it, docs/benchmark_protocol.md and the"
                      " README's summary table, when they are there)")
  return p


def _out_dir(name: str, args: argparse.Namespace) -> pathlib.Path:
  """Where a task's results go: --out, <out>/<task> with several tasks."""
  if args.out and len(args.tasks_list) > 1:
    return pathlib.Path(args.out) / name
  return pathlib.Path(args.out or pathlib.Path("bench_results") / name)


def _rerender(paths: Sequence[str]) -> List[pathlib.Path]:
  """Re-renders results.md and the plots beside each results.json."""
  dirs = []
  for path in paths:
    run, out = schema.load(path), pathlib.Path(path).parent
    dirs.append(out)
    if os.access(out, os.W_OK):
      pipeline.report_run(run, out)
    else:
      print(report.markdown_report(run))
  return dirs


def _merge(paths: Sequence[str], out: pathlib.Path,
           notes: Sequence[str]) -> None:
  runs = [schema.load(p) for p in paths]
  merged = runs[0]
  for more in runs[1:]:
    merged = pipeline.merge_runs(merged, more)
  merged.provenance_notes += [n for n in notes
                              if n not in merged.provenance_notes]
  out.mkdir(parents=True, exist_ok=True)
  schema.save(out / schema.RESULTS_FILE, merged)


def _optimizers(args: argparse.Namespace) -> List[str]:
  optimizers = _split_list(args.optimizers) or list(opt_lib.DEFAULT_OPTIMIZERS)
  for o in optimizers:
    if o not in opt_lib.REGISTRY:
      raise SystemExit(f"unknown optimizer {o!r}; choose from"
                       f" {tuple(opt_lib.REGISTRY)}")
  if "adam" not in optimizers:
    optimizers.insert(0, "adam")  # the reference for target and ratios
  return list(dict.fromkeys(optimizers))


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  if args.merge:
    if not args.from_results:
      raise SystemExit("--merge needs --from-results")
    _merge(args.from_results, pathlib.Path(args.merge), args.provenance)
    args.from_results = [str(pathlib.Path(args.merge) / schema.RESULTS_FILE)]
  if args.from_results:
    paths = list(args.from_results)
    plot_dirs = _rerender(paths)
  else:
    args.tasks_list = _split_list(args.tasks)
    args.factors = [float(x) for x in _split_list(args.lrs)]
    if args.tuned_from and not args.tuned:
      raise SystemExit("--tuned-from needs --tuned")
    if args.plan and args.write_benchmarks_md:
      raise SystemExit("--plan writes nothing; drop --write-benchmarks-md")
    for t in args.tasks_list:
      if t not in tasks_lib.TASKS:
        raise SystemExit(f"unknown task {t!r}; choose from {tasks_lib.TASKS}")
    optimizers = _optimizers(args)
    plot_dirs = [_out_dir(t, args) for t in args.tasks_list]
    for t, out in zip(args.tasks_list, plot_dirs):
      pipeline.run_task(t, args, optimizers,
                        ["python", "-m", "optax_soaa.bench"] + argv, out)
    paths = [str(d / schema.RESULTS_FILE) for d in plot_dirs]
  if args.write_benchmarks_md:
    path = pathlib.Path(args.write_benchmarks_md)
    runs = [(schema.run_name(p), schema.load(p)) for p in paths]
    path.write_text(report.benchmarks_md(
        runs, notes=args.note, plot_dirs=plot_dirs, relative_to=path.parent))
    # Beside it, when there: the full protocol page and the README's copy
    # of the summary table.
    protocol = path.parent / report.PROTOCOL_PAGE
    if protocol.parent.is_dir():
      protocol.write_text(report.protocol_text())
    readme = path.parent / "README.md"
    if readme.is_file() and report.README_MARKS[0] in readme.read_text():
      readme.write_text(report.with_summary(
          readme.read_text(),
          report.summary_table(dict(runs))))
    print(f"[bench] wrote {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
