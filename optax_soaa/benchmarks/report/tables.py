"""One run's Markdown: its table, its notes, and the record of how it ran."""

import math
from typing import List, Optional, Tuple

import numpy as np

from optax_soaa.benchmarks import optimizers as opt_lib
from optax_soaa.benchmarks import schema
from optax_soaa.benchmarks import summarize

# Beyond this factor between an optimizer's timed step and its training
# steps, a note says so; below MIN_STEP_S a training step's time is mostly
# the loop's own dispatch, and no note is made.
TIMING_DISAGREEMENT = 1.25
MIN_STEP_S = 0.01


def fmt(x, spec=".4f", dash="—") -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return dash
  return format(x, spec)


def short_timing_note(r: schema.OptimizerResult,
                      run: schema.Run) -> Optional[str]:
  """Where a step was timed on samples shorter than its cost period.

  Runs before the timing spanned whole periods (Sophia's Hessian estimate,
  K-FAC's inverses, AdaFisher's statistics) timed 3-step samples: their
  ratio is that of the cheap steps. The note gives the ratio of the median
  training step measured during the run instead.
  """
  spec = opt_lib.REGISTRY.get(r.name)
  t = r.timing
  if spec is None or t is None or t.cost_period is not None:
    return None
  period = int(spec.period(run.task.hp))
  if t.timing_inner_steps % period == 0:
    return None
  adam = run.optimizers.get("adam")
  adam_train = adam.train_step_s if adam is not None else None
  train = (r.train_step_s or 0) / (adam_train or math.nan)
  return (f"its step time was timed on {t.timing_inner_steps}-step samples,"
          f" shorter than its {period}-step cost period, so its ratio is that"
          " of its cheap steps (before the timing spanned whole periods); its"
          f" median training step during the run was {fmt(train, '.2f')}×"
          " Adam's.")


def timing_disagrees_note(r: schema.OptimizerResult) -> Optional[str]:
  """Where an optimizer's timed step and its training steps disagree.

  The step ratio comes from timing samples taken before training; the
  training's own per-step time is measured over its evaluation intervals.
  Both are the same optimizer's seconds, so a difference is the machine's
  (its load at either time) or the timing's; both are given when they differ
  by more than TIMING_DISAGREEMENT, so that neither is taken on trust.
  """
  timed = r.timing.step_time_s if r.timing else None
  train = r.train_step_s
  if r.name == "adam" or not timed or not train or timed < MIN_STEP_S:
    return None
  if r.execution == "vmap" and len(r.values) > 1:
    return None  # a training step is a share of the vmapped members' step
  if max(train / timed, timed / train) <= TIMING_DISAGREEMENT:
    return None
  return (f"its timing samples measured {timed:.3g} s a step and its training"
          f" {train:.3g} s a step (median over evaluation intervals), more"
          f" than {100 * (TIMING_DISAGREEMENT - 1):.0f} % apart, so its step"
          " ratio is uncertain by as much; the wall time is what the run"
          " took.")


def units(task: schema.TaskInfo) -> Tuple[str, str]:
  lm = task.kind == "lm"
  return ("bpb" if lm else "loss"), ("next-byte acc" if lm else "acc")


def table_rows(run: schema.Run) -> List[str]:
  """The Markdown table of one run (one task), without notes."""
  unit, acc = units(run.task)
  multi_seed = len(run.seeds) > 1
  head = ["optimizer", "swept", "tuned value" if run.tuned else "best value",
          f"train {unit}", f"train {acc}", f"test {unit}", f"test {acc}"]
  if multi_seed:
    head.append(f"test {acc} mean ± sd (n={len(run.seeds)})")
  head += ["steps to target", "s to target", "step time ×Adam",
           "wall time (s)", "state bytes ×Adam"]
  rows = ["| " + " | ".join(head) + " |",
          "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
  for name, r in run.optimizers.items():
    if not r.summarized:
      cells = [name, r.swept, r.status] + ["—"] * (len(head) - 3)
      rows.append("| " + " | ".join(cells) + " |")
      continue
    f = r.final
    cells = [name, r.swept_label, fmt(r.best_value, ".3g"),
             fmt(f["train_loss"]), fmt(f["train_accuracy"]),
             fmt(f["test_loss"]), fmt(f["test_accuracy"])]
    if multi_seed:
      n = len(r.curves)
      cells.append(f"{r.test_accuracy_mean:.4f} ± {r.test_accuracy_std:.4f}"
                   + ("" if n == len(run.seeds) else f" (n={n})"))
    cells += [fmt(r.steps_to_target, "d"),
              fmt(r.seconds_to_target, ".3g"),
              fmt(r.timing.step_time_ratio, ".2f"), fmt(r.wall_s, ".0f"),
              fmt(r.state_bytes_ratio, ".2f")]
    rows.append("| " + " | ".join(cells) + " |")
  return rows


def legend(run: schema.Run) -> str:
  unit, _ = units(run.task)
  chosen = ("Each optimizer at its tuned value, mean over seeds." if run.tuned
            else "Best value chosen by final"
            f" {run.task.select_by.replace('_', ' ')} (mean over seeds).")
  return (f"Target = {'tuned' if run.tuned else 'best-tuned'} Adam's final"
          f" test {unit} ({fmt(run.target_test_loss)}); steps/seconds to"
          f" target: first evaluation (every {run.task.eval_every} steps) at"
          " or below it, seconds = steps × the optimizer's measured step"
          " time. Wall time: this optimizer's whole share of the run (step"
          " timing, compilation, training of every value and seed,"
          f" evaluation). {chosen}")


def notes(run: schema.Run) -> List[str]:
  """Every per-optimizer note of a run: status, edge, source, timing."""
  out = []
  for name, r in run.optimizers.items():
    if not r.summarized:
      out.append(f"`{name}`: {r.status}: {r.reason}")
      continue
    if not run.tuned and r.at_sweep_edge:
      out.append(f"`{name}`: best value at the edge of the sweep"
                 f" ({fmt(r.best_value, '.3g')}); a wider sweep may do"
                 " better.")
    if run.tuned and r.value_source:
      out.append(f"`{name}`: {r.swept} {fmt(r.best_value, '.6g')}"
                 f" ({r.value_source})")
    timing = short_timing_note(r, run) or timing_disagrees_note(r)
    if timing:
      out.append(f"`{name}`: {timing}")
  return out


def short_notes(run: schema.Run) -> List[str]:
  """At most three one-line notes for a table in BENCHMARKS.md."""
  out = [f"Chosen by final {run.task.select_by.replace('_', ' ')}; target ="
         f" {'tuned' if run.tuned else 'best-tuned'} Adam's final test"
         f" {units(run.task)[0]} ({fmt(run.target_test_loss)})."]
  edge = [f"`{n}` ({fmt(r.best_value, '.3g')})"
          for n, r in run.optimizers.items()
          if r.summarized and not run.tuned and r.at_sweep_edge]
  if edge:
    out.append(f"Best value at the sweep's edge: {', '.join(edge)}.")
  uncertain = [f"`{n}`" for n, r in run.optimizers.items() if r.summarized
               and (short_timing_note(r, run) or timing_disagrees_note(r))]
  if uncertain:
    out.append(f"Step ratio uncertain (see the record below):"
               f" {', '.join(uncertain)}.")
  return out


def _percent(pct: float) -> str:
  """A share in percent that reads 0 or 100 only when it is."""
  if 0 < pct < 10:
    return f"{pct:.2g}"
  if 90 < pct < 100:
    return f"{min(pct, 99.9):.1f}"
  return f"{pct:.0f}"


def diagnostics_summary(run: schema.Run) -> Optional[str]:
  """One sentence, from the per-step records, on what the diagnostics show."""
  ok = {n: r for n, r in run.optimizers.items() if r.summarized}
  parts = []
  for name, r in ok.items():
    b = r.dt_at_bounds
    if b:
      parts.append(f"`{name}`'s dt sat at a clip bound on"
                   f" {100 * b['either']:.0f} % of steps ({100 * b['lower']:.0f} %"
                   f" at the lower, {100 * b['upper']:.0f} % at the upper)")
  for name, r in ok.items():
    steps = summarize.per_step_all_seeds(r, "bisection_steps")
    etas = summarize.per_step_all_seeds(r, "eta")
    if steps is not None and etas is not None:
      half = etas[len(etas) // 2:] if len(etas) > 1 else etas
      parts.append(f"`{name}` took {np.mean(steps):.2g} bisection steps per"
                   f" step on average (none on {100 * np.mean(steps == 0):.0f} %"
                   f" of steps), its eta spanning {np.min(etas):.2g} to"
                   f" {np.max(etas):.2g} ({np.median(half):.2g} median over the"
                   " second half of training)")
  for name, r in ok.items():
    scales = summarize.per_step_all_seeds(r, "norm_scale")
    if scales is not None and r.hp.get("norm_constraint") is not None:
      cut = scales < 1.0 - 1e-6
      parts.append(f"`{name}`'s norm constraint shortened the step on"
                   f" {_percent(100 * np.mean(cut))} % of steps"
                   + (f" (median factor {np.median(scales[cut]):.2g})"
                      if cut.any() else ""))
  if not parts:
    return None
  where = (f"{'tuned' if run.tuned else 'best'} value, all {len(run.seeds)}"
           " seed(s)")
  return f"Per-step diagnostics ({where}): " + "; ".join(parts) + "."


def provenance(run: schema.Run) -> List[str]:
  """How the run ran: commands, dates, commits, machine, versions, mode."""
  env, task = run.environment, run.task
  if run.tuned:
    mode = ("mode: **tuned** (each optimizer at its tuned value, no sweep;"
            " sources in the notes)")
  else:
    sweep = ", ".join(f"{f:.3g}" for f in task.factors)
    mode = (f"mode: **sweep**, factors {sweep} × centre (adam-scale"
            f" {task.centers['adam']:.3g}, sgd {task.centers['sgd']:.3g},"
            f" arTuRO kl_bound {task.centers['kl']:.3g}); values added by a"
            " later invocation are listed per optimizer in results.json")
  # A resumed run may be the first to have kfac-jax (its K-FAC rows).
  kfac_env = next((e for e in reversed(run.environments) if e.kfac_jax), None)
  kfac = kfac_env.kfac_jax if kfac_env else None
  if kfac_env and kfac_env.kfac_conv_input_stats == "explicit-patches":
    kfac += ", conv input factor from explicit patches"
  lines = [f"- command: `{env.command}`"]
  extended = {i for r in run.optimizers.values() for i in r.extended_by or ()}
  for i, later in enumerate(run.environments[1:], 1):
    how = ("values added (joined by --merge)" if i in extended
           else "resumed")
    lines.append(f"- {how}: `{later.command}` ({later.date}, commit"
                 f" {later.git_commit or 'unknown'})")
  lines += [
      f"- date: {env.date}; commit: {env.git_commit or 'unknown'}",
      f"- machine: {env.machine}; device: {env.device}"
      + (f"; load average at the start {', '.join(map(str, env.load_average))}"
         if env.load_average else ""),
      f"- versions: python {env.python}, jax {env.jax}, optax {env.optax},"
      f" flax {env.flax}" + (f", kfac-jax {kfac}" if kfac else ""),
      f"- {mode}",
      f"- steps: {task.num_steps}"
      + (f" ({task.epochs:.3g} epochs)" if task.epochs else "")
      + f", batch {task.batch_size}, seeds: {run.seeds}, execution:"
      f" {run.execution}",
      f"- wall time of the whole run: {run.wall_s:.0f} s",
  ]
  lines += [f"- {n}" for n in task.notes]
  lines += [f"- Provenance: {n}" for n in run.provenance_notes]
  if not run.complete:
    done = [f"{o} (seeds {[c.seed for c in r.curves]})"
            for o, r in run.optimizers.items()]
    missing = [o for o in run.planned_optimizers if o not in run.optimizers]
    lines.append(f"- **partial run** (interrupted): finished {', '.join(done)};"
                 f" not run: {', '.join(missing) or 'none'}")
  return lines


def heading(run: schema.Run, level: int = 2, name: Optional[str] = None) -> str:
  """"<task>: <mode>, <length>", or "<run> (<task>, ...)" for a named run."""
  what = f"{'tuned' if run.tuned else 'sweep'}, {run.task.length}"
  if name and name != run.task.name:
    return f"{'#' * level} {name} ({run.task.name}, {what})"
  return f"{'#' * level} {run.task.name}: {what}"


def markdown_report(run: schema.Run, heading_level: int = 2) -> str:
  """results.md: the record of the run, its table, every note."""
  lines = [heading(run, heading_level), ""] + provenance(run)
  lines += ["", *table_rows(run), "", legend(run)]
  every = notes(run)
  if every:
    lines += ["", *[f"- {n}" for n in every]]
  lines.append("")
  summary = diagnostics_summary(run)
  if summary:
    lines += [summary, ""]
  return "\n".join(lines)


def compact_report(run: schema.Run, name: str, heading_level: int = 3) -> str:
  """A run in BENCHMARKS.md: table, <= 3 notes, the record collapsed."""
  lines = [heading(run, heading_level, name), "", *table_rows(run), ""]
  lines += [f"- {n}" for n in short_notes(run)]
  details = provenance(run) + ["", legend(run)]
  details += [f"- {n}" for n in notes(run)]
  summary = diagnostics_summary(run)
  if summary:
    details += ["", summary]
  lines += ["", "<details><summary>How this run ran, every note</summary>",
            "", *details, "", "</details>", ""]
  return "\n".join(lines)
