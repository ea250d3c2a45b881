"""Results files, Markdown tables, plots and BENCHMARKS.md of the benchmark tool."""

import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
PLOT_FILES = ("curves.png", "diagnostics.png", "sweep.png")


# -- environment --------------------------------------------------------------


def _cpu_name() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.lower().startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
  try:
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short",
                          "HEAD"], capture_output=True, text=True, timeout=5)
    commit = out.stdout.strip()
    if not commit:
      return None
    # "+modified" when the code that runs (the package) differs from the
    # commit; results written into the checkout (results/bench/) do not count.
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain",
         "--untracked-files=no", "--", "optax_soaa"],
        capture_output=True, text=True, timeout=5)
    return commit + ("+modified" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    return None


def environment(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Machine, device and versions, recorded with every run."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  backend = jax.default_backend()
  device = ("CPU" if backend == "cpu" else
            f"{backend.upper()}: {devices[0].device_kind} x{len(devices)}")
  argv = list(sys.argv if argv is None else argv)
  return dict(
      date=datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC"),
      command=" ".join(shlex.quote(a) for a in argv),
      machine=f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()}"
              f" {platform.machine()}",
      device=device,
      python=platform.python_version(),
      jax=jax.__version__, optax=optax.__version__, flax=flax.__version__,
      git_commit=_git_commit(),
      **({"kfac_jax": kfac, "kfac_conv_input_stats": _kfac_conv_stats()}
         if (kfac := _kfac_jax_version()) else {}),
  )


def _kfac_conv_stats() -> str:
  from optax_soaa.benchmarks import kfac_baseline  # pylint: disable=g-import-not-at-top
  return kfac_baseline.conv_input_stats()


def _kfac_jax_version() -> Optional[str]:
  """kfac-jax's version, with the commit when installed from git; else None.

  Read from its distribution metadata, without importing it: the released
  0.0.8 and the GitHub main the benchmark can run (see kfac_baseline) carry
  the same version number.
  """
  try:
    dist = importlib.metadata.distribution("kfac-jax")
  except importlib.metadata.PackageNotFoundError:
    return None
  version = dist.version
  try:
    url = json.loads(dist.read_text("direct_url.json") or "null") or {}
  except ValueError:
    url = {}
  commit = (url.get("vcs_info") or {}).get("commit_id")
  return f"{version} (git {commit[:12]})" if commit else version


# -- JSON ---------------------------------------------------------------------


def _clean(x):
  """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python."""
  if isinstance(x, dict):
    return {str(k): _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, np.ndarray):
    return _clean(x.tolist())
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return x if math.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_json(path: os.PathLike, payload: Dict[str, Any]) -> None:
  pathlib.Path(path).write_text(json.dumps(_clean(payload), indent=1,
                                           allow_nan=False))


def load_json(path: os.PathLike) -> Dict[str, Any]:
  return json.loads(pathlib.Path(path).read_text())


# -- tables -------------------------------------------------------------------


def _fmt(x, spec=".4f", dash="—"):
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return dash
  return format(x, spec)


def _fmt_seconds(s):
  if s is None:
    return "—"
  return f"{s:.3g}"


def _value_cell(r: Dict[str, Any]) -> str:
  return _fmt(r.get("best_value"), ".3g")


def _short_timing_note(name: str, r: Dict[str, Any],
                       payload: Dict[str, Any]) -> List[str]:
  """A note where a step was timed on samples shorter than its cost period.

  Runs before the timing spanned whole periods (Sophia's Hessian estimate,
  K-FAC's inverses, AdaFisher's statistics) timed 3-step samples: their
  ratio is that of the cheap steps. The note gives the ratio of the median
  training step measured during the run instead.
  """
  from optax_soaa.benchmarks import optimizers as opt_lib  # pylint: disable=g-import-not-at-top
  spec = opt_lib.REGISTRY.get(name)
  if spec is None or "cost_period" in r or "timing_inner_steps" not in r:
    return []
  period = int(spec.period(payload["task"].get("hp") or {}))
  if r["timing_inner_steps"] % period == 0:
    return []
  adam = payload["optimizers"].get("adam", {})
  train = (r.get("train_step_s") or 0) / (adam.get("train_step_s") or math.nan)
  return [f"- `{name}`: its step time was timed on"
          f" {r['timing_inner_steps']}-step samples, shorter than its"
          f" {period}-step cost period, so its ratio is that of its cheap"
          " steps (before the timing spanned whole periods); its median"
          f" training step during the run was {_fmt(train, '.2f')}× Adam's."]


# Beyond this factor between an optimizer's timed step and its training
# steps, a table row says so; below MIN_STEP_S a training step's time is
# mostly the loop's own dispatch, and no note is made.
TIMING_DISAGREEMENT = 1.25
MIN_STEP_S = 0.01


def _timing_disagrees_note(name: str, r: Dict[str, Any],
                           payload: Dict[str, Any]) -> List[str]:
  """A note where an optimizer's timed step and its training steps disagree.

  The step ratio comes from timing samples taken before training (by the
  invocation that first trained the optimizer, when a run is resumed); the
  training's own per-step time is measured over its evaluation intervals.
  Both are the same optimizer's seconds, so a difference is the machine's
  (its load at either time) or the timing's; both are given when they differ
  by more than TIMING_DISAGREEMENT, so that neither is taken on trust.
  """
  del payload  # the same signature as _short_timing_note
  timed, train = r.get("step_time_s"), r.get("train_step_s")
  if name == "adam" or not timed or not train or timed < MIN_STEP_S:
    return []
  if r.get("execution") == "vmap" and len(r.get("values", [])) > 1:
    return []  # a training step is a share of the vmapped members' step
  if max(train / timed, timed / train) <= TIMING_DISAGREEMENT:
    return []
  return [f"- `{name}`: its timing samples measured {timed:.3g} s a step and"
          f" its training {train:.3g} s a step (median over evaluation"
          f" intervals), more than {100 * (TIMING_DISAGREEMENT - 1):.0f} %"
          " apart, so its step ratio is uncertain by as much; the wall time"
          " is what the run took."]


def results_table(payload: Dict[str, Any]) -> str:
  """The Markdown table of one results payload (one task)."""
  task = payload["task"]
  lm = task["kind"] == "lm"
  tuned = payload.get("mode") == "tuned"
  unit = "bpb" if lm else "loss"
  acc = "next-byte acc" if lm else "acc"
  multi_seed = len(payload.get("seeds", [0])) > 1
  head = ["optimizer", "swept", "tuned value" if tuned else "best value",
          f"train {unit}", f"train {acc}", f"test {unit}", f"test {acc}"]
  if multi_seed:
    head.append(f"test {acc} mean ± sd (n={len(payload['seeds'])})")
  head += ["steps to target", "s to target", "step time ×Adam",
           "wall time (s)", "state bytes ×Adam"]
  rows = ["| " + " | ".join(head) + " |",
          "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
  notes = []
  for name, r in payload["optimizers"].items():
    if r.get("status") != "ok" or "final" not in r:
      cells = [name, r.get("swept", "—")] + ["—"] * (len(head) - 2)
      cells[2] = r.get("status", "?")
      notes.append(f"- `{name}`: {r.get('status')}: {r.get('reason')}")
      rows.append("| " + " | ".join(cells) + " |")
      continue
    f = r["final"]
    cells = [name, "kl_bound" if r["swept"] == "kl_bound" else "lr",
             _value_cell(r),
             _fmt(f["train_loss"]), _fmt(f["train_accuracy"]),
             _fmt(f["test_loss"]), _fmt(f["test_accuracy"])]
    if multi_seed:
      n = len(r["curves"])
      cells.append(f"{r['test_accuracy_mean']:.4f} ± {r['test_accuracy_std']:.4f}"
                   + ("" if n == len(payload["seeds"]) else f" (n={n})"))
    cells += [_fmt(r.get("steps_to_target"), "d"),
              _fmt_seconds(r.get("seconds_to_target")),
              _fmt(r.get("step_time_ratio"), ".2f"),
              _fmt(r.get("wall_s"), ".0f"),
              _fmt(r.get("state_bytes_ratio"), ".2f")]
    rows.append("| " + " | ".join(cells) + " |")
    if not tuned and r["best_index"] in (0, len(r["values"]) - 1):
      notes.append(f"- `{name}`: best value at the edge of the sweep"
                   f" ({_fmt(r['best_value'], '.3g')}); a wider sweep may do"
                   " better.")
    if tuned and r.get("value_source"):
      notes.append(f"- `{name}`: {r['swept']} {_fmt(r['best_value'], '.6g')}"
                   f" ({r['value_source']})")
    notes += (_short_timing_note(name, r, payload)
              or _timing_disagrees_note(name, r, payload))
  target = payload.get("target_test_loss")
  chosen = ("Each optimizer at its tuned value (below), mean over seeds." if
            tuned else "Best value chosen by final"
            f" {task['select_by'].replace('_', ' ')} (mean over seeds).")
  legend = (
      f"Target = {'tuned' if tuned else 'best-tuned'} Adam's final test {unit}"
      f" ({_fmt(target)}); steps/seconds to target: first evaluation (every"
      f" {task['eval_every']} steps) at or below it, seconds = steps × the"
      " optimizer's measured step time. Wall time: this optimizer's whole"
      " share of the run (step timing, compilation, training of every value"
      f" and seed, evaluation). {chosen}")
  return "\n".join(rows) + "\n\n" + legend + (
      "\n\n" + "\n".join(notes) if notes else "") + "\n"


def _percent(pct: float) -> str:
  """A share in percent that reads 0 or 100 only when it is."""
  if 0 < pct < 10:
    return f"{pct:.2g}"
  if 90 < pct < 100:
    return f"{min(pct, 99.9):.1f}"
  return f"{pct:.0f}"


def _per_step_all_seeds(r, name) -> Optional[np.ndarray]:
  """A per-step diagnostic at the best value, every seed's steps in turn."""
  vals = [np.asarray(c["per_step"][name], np.float64)[:, r["best_index"]]
          for c in r["curves"] if name in c.get("per_step", {})]
  return np.concatenate(vals) if vals else None


def diagnostics_summary(payload: Dict[str, Any]) -> Optional[str]:
  """One sentence, from the per-step records, on what the diagnostics show."""
  ok = {n: r for n, r in payload["optimizers"].items()
        if r.get("status") == "ok" and r.get("curves")}
  parts = []
  for name, r in ok.items():
    b = r.get("dt_at_bounds")
    if b:
      parts.append(f"`{name}`'s dt sat at a clip bound on"
                   f" {100 * b['either']:.0f} % of steps ({100 * b['lower']:.0f} %"
                   f" at the lower, {100 * b['upper']:.0f} % at the upper)")
  for name, r in ok.items():
    steps = _per_step_all_seeds(r, "bisection_steps")
    etas = _per_step_all_seeds(r, "eta")
    if steps is not None and etas is not None:
      half = etas[len(etas) // 2:] if len(etas) > 1 else etas
      parts.append(f"`{name}` took {np.mean(steps):.2g} bisection steps per"
                   f" step on average (none on {100 * np.mean(steps == 0):.0f} %"
                   f" of steps), its eta spanning {np.min(etas):.2g} to"
                   f" {np.max(etas):.2g} ({np.median(half):.2g} median over the"
                   " second half of training)")
  for name, r in ok.items():
    scales = _per_step_all_seeds(r, "norm_scale")
    if (scales is not None
        and (r.get("hp") or {}).get("norm_constraint") is not None):
      cut = scales < 1.0 - 1e-6
      parts.append(f"`{name}`'s norm constraint shortened the step on"
                   f" {_percent(100 * np.mean(cut))} % of steps"
                   + (f" (median factor {np.median(scales[cut]):.2g})"
                      if cut.any() else ""))
  if not parts:
    return None
  where = (f"best value, all {len(payload['seeds'])} seed(s)"
           if payload.get("mode") != "tuned" else
           f"tuned value, all {len(payload['seeds'])} seed(s)")
  return f"Per-step diagnostics ({where}): " + "; ".join(parts) + "."


def markdown_report(payload: Dict[str, Any], heading_level: int = 2) -> str:
  env, task = payload["environment"], payload["task"]
  h = "#" * heading_level
  tuned = payload.get("mode") == "tuned"
  epochs = task.get("epochs")
  length = f"steps: {task['num_steps']}" + (
      f" ({epochs:.3g} epochs)" if epochs else "") + (
          f", batch {task['batch_size']}")
  if tuned:
    mode = ("mode: **tuned** (each optimizer at its tuned value, no sweep;"
            " sources under the table)")
  else:
    sweep = ", ".join(f"{f:.3g}" for f in task["factors"])
    mode = (f"mode: **sweep**, factors {sweep} × centre (adam-scale"
            f" {task['centers']['adam']:.3g}, sgd {task['centers']['sgd']:.3g},"
            f" arTuRO kl_bound {task['centers']['kl']:.3g})")
  scale = (f"{epochs:.3g} epochs" if epochs else f"{task['num_steps']} steps")
  # A resumed run may be the first to have kfac-jax (its K-FAC rows).
  kfac_env = next((e for e in reversed(payload.get("environments") or [env])
                   if e.get("kfac_jax")), {})
  kfac = kfac_env.get("kfac_jax")
  if kfac_env.get("kfac_conv_input_stats") == "explicit-patches":
    kfac += ", conv input factor from explicit patches"
  lines = [
      # The mode and length in the heading: one task can have several runs.
      f"{h} {task['name']}: {'tuned' if tuned else 'sweep'}, {scale}",
      "",
      f"- command: `{env['command']}`",
  ]
  for later in payload.get("environments", [])[1:]:
    lines.append(f"- resumed: `{later['command']}` ({later['date']}, commit"
                 f" {later.get('git_commit') or 'unknown'})")
  lines += [
      f"- date: {env['date']}; commit: {env.get('git_commit') or 'unknown'}",
      f"- machine: {env['machine']}; device: {env['device']}",
      f"- versions: python {env['python']}, jax {env['jax']}, optax"
      f" {env['optax']}, flax {env['flax']}"
      + (f", kfac-jax {kfac}" if kfac else ""),
      f"- {mode}",
      f"- {length}, seeds: {payload['seeds']}"
      + (f", execution: {payload['execution']}" if payload.get("execution")
         else ""),
      f"- wall time of the whole run: {payload.get('wall_s', 0):.0f} s",
  ]
  lines += [f"- {n}" for n in task.get("notes", [])]
  if not payload.get("complete", True):
    done = [f"{o} (seeds {[c['seed'] for c in r.get('curves', [])]})"
            for o, r in payload["optimizers"].items()]
    missing = [o for o in payload.get("planned_optimizers", [])
               if o not in payload["optimizers"]]
    lines.append(f"- **partial run** (interrupted): finished {', '.join(done)};"
                 f" not run: {', '.join(missing) or 'none'}")
  lines += ["", results_table(payload)]
  summary = diagnostics_summary(payload)
  if summary:
    lines += [summary, ""]
  return "\n".join(lines)


# -- plots --------------------------------------------------------------------


def _best_curves(r, key):
  i = r["best_index"]
  arr = np.asarray([np.asarray(c[key], dtype=np.float64)[:, i]
                    if c[key] and c[key][0] is not None else
                    np.full(len(c["step"]), np.nan) for c in r["curves"]])
  return arr.mean(0)


def _per_step(r, name):
  """(steps 1..T, values) of a per-step diagnostic: best value, first seed."""
  c = r["curves"][0]
  if name not in c.get("per_step", {}):
    return None
  vals = np.asarray(c["per_step"][name], np.float64)[:, r["best_index"]]
  return np.arange(1, len(vals) + 1), vals


def _bound_fractions(r, key):
  """Per evaluation interval, share of steps with dt at a bound (seed mean)."""
  curves = [c for c in r["curves"] if key in c]
  if not curves:
    return None
  i = r["best_index"]
  frac = np.mean([np.asarray(c[key], np.float64)[:, i] for c in curves], 0)
  return np.asarray(curves[0]["step"][1:], np.float64), frac


def write_plots(payload: Dict[str, Any], out_dir: os.PathLike) -> List[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  out_dir = pathlib.Path(out_dir)
  ok = {n: r for n, r in payload["optimizers"].items()
        if r.get("status") == "ok" and r.get("curves")}
  lm = payload["task"]["kind"] == "lm"
  unit = "bits per byte" if lm else "cross-entropy"
  target = payload.get("target_test_loss")
  written = []

  # Several methods nearly coincide (SOAA's two modes, Adam and AdamW):
  # vary the dash pattern so none hides another completely.
  styles = {n: dict(color=f"C{i % 10}", ls=("-", "--", ":", "-.")[i % 4])
            for i, n in enumerate(ok)}

  fig, axes = plt.subplots(2, 2, figsize=(12, 9))
  for col, (key, label) in enumerate((("train_loss", "train"),
                                      ("test_loss", "test"))):
    for row, xaxis in enumerate(("steps", "seconds")):
      ax = axes[row, col]
      for name, r in ok.items():
        steps = np.asarray(r["curves"][0]["step"], np.float64)
        x = steps if xaxis == "steps" else steps * r["step_time_s"]
        ax.plot(x, _best_curves(r, key), **styles[name],
                label=f"{name} ({'kl' if r['swept'] == 'kl_bound' else 'lr'}"
                     f"={r['best_value']:.3g})")
      if key == "test_loss" and target is not None:
        ax.axhline(target, color="k", ls="--", lw=0.8, label="Adam target")
      ax.set_yscale("log")
      ax.set_xlabel(xaxis if xaxis == "steps" else
                    "seconds (steps × measured step time)")
      ax.set_ylabel(f"{label} {unit}")
      ax.set_title(f"{label} {unit} vs {xaxis}")
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"{payload['task']['name']}: best sweep value per optimizer"
               f" (mean over seeds {payload['seeds']})")
  fig.tight_layout()
  fig.savefig(out_dir / PLOT_FILES[0], dpi=90)
  plt.close(fig)
  written.append(PLOT_FILES[0])

  fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
  panels = (
      (axes[0, 0], "dt", "SOAA dt after every step (best value, seed"
       f" {payload['seeds'][0]})", "linear"),
      (axes[1, 0], "eta", "arTuRO eta after every step", "log"),
      (axes[1, 1], "bisection_steps", "arTuRO bisection steps per step",
       "linear"),
  )
  for ax, diag, title, scale in panels:
    drawn = False
    for name, r in ok.items():
      got = _per_step(r, diag)
      if got is None or not np.isfinite(got[1]).any():
        continue
      ax.plot(*got, **styles[name], lw=0.8, alpha=0.8, label=name)
      drawn = True
    if drawn:
      ax.legend(fontsize=8)
      ax.set_yscale(scale)
    else:
      ax.text(0.5, 0.5, "not run", ha="center", va="center",
              transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel(diag)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  ax = axes[0, 1]
  drawn = False
  for name, r in ok.items():
    for key, ls, side in (("dt_at_lower", "-", "lower"),
                          ("dt_at_upper", "--", "upper")):
      got = _bound_fractions(r, key)
      if got is not None:
        ax.plot(*got, color=styles[name]["color"], ls=ls, marker=".",
                label=f"{name}: at {side} bound")
        drawn = True
  if drawn:
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, "not run", ha="center", va="center",
            transform=ax.transAxes)
  ax.set_xlabel("step (end of evaluation interval)")
  ax.set_ylabel("share of the interval's steps")
  ax.set_title("SOAA: steps with dt clipped to a bound, per evaluation"
               " interval", fontsize=10)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out_dir / PLOT_FILES[1], dpi=90)
  plt.close(fig)
  written.append(PLOT_FILES[1])

  fig, ax = plt.subplots(figsize=(7, 4.5))
  select = payload["task"]["select_by"]
  for name, r in ok.items():
    key = "test_accuracy" if select.endswith("accuracy") else "test_loss"
    vals = np.asarray([np.nan if v is None else v
                       for v in r["final_per_value"][key]], np.float64)
    ax.plot(r["factors"], vals, marker="o", **styles[name], label=name)
  ax.set_xscale("log")
  if not select.endswith("accuracy"):
    ax.set_yscale("log")
  ax.set_xlabel("sweep factor (× each optimizer's centre value)")
  ax.set_ylabel(f"final {select.replace('_', ' ')}")
  ax.set_title("sensitivity to the swept value (missing = diverged)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_dir / PLOT_FILES[2], dpi=90)
  plt.close(fig)
  written.append(PLOT_FILES[2])
  return written


# -- BENCHMARKS.md --------------------------------------------------------------

PROTOCOL = """\
# Benchmarks

This file is written by the benchmark tool (this protocol text included)
from its results files; no number in it is typed by hand. The results files
behind it (JSON, tables, plots) are committed under `results/bench/<run>/`
(a run writes to `bench_results/<task>/`; copy it there to publish it).
Regenerate with

    python -m optax_soaa.bench --from-results results/bench/*/results.json --write-benchmarks-md

## Protocol

- **Tool.** `python -m optax_soaa.bench` (console script `optax-soaa-bench`).
  Every run writes `results.json` (environment, command, every evaluation of
  every value and seed, and per-step diagnostics), `results.md` (the table
  below) and plots (`curves.png`: train and test loss against steps and
  seconds; `diagnostics.png`: SOAA's dt after every step and the share of
  steps it spent at each clip bound, arTuRO's eta and bisection steps after
  every step; `sweep.png`: final metric against the swept value) to `--out`
  (default `bench_results/<task>`). `results.json` is rewritten after every
  optimizer and seed: a stopped run keeps everything that finished, and
  `--resume` continues it, skipping what is done. Before training, the tool
  times every optimizer's step and prints the run's expected wall time.
- **Tasks.** `digits-mlp` (scikit-learn's embedded digits, the default),
  `fmnist-cnn` (the arTuRO paper's Fashion-MNIST CNN protocol, data from the
  Debian package `dataset-fashion-mnist`), `lm` (byte-level decoder-only
  transformer on the Python standard library's sources). No downloads.
  `--epochs N` sets a classification task's length in epochs of its training
  set; `fmnist-cnn`'s step schedule drops at 1/2 and 3/4 of training, the
  fractions of the paper's 120-epoch protocol (epochs 60 and 90).
- **Optimizers.** SOAA (`soaa`: the default curvature `second_moment`;
  `soaa-variance`; loss passed as `value=`), arTuRO, AdaFisher and
  AdaFisherW (layer statistics from `optax_soaa.flax.value_grad_and_stats`,
  passed as `stats=`), and the baselines `optax.adam`, `optax.adamw`,
  `optax.sgd` with momentum, `optax.contrib.sophia` (Hutchinson Hessian
  estimate; the train step passes `obj_fn`, the batch loss as a function of
  the params) and K-FAC (`kfac`: kfac-jax's own `kfac_jax.Optimizer`, optional
  extra `kfac`; the softmax cross-entropy registered with
  `kfac_jax.register_softmax_cross_entropy_loss`; learning rate swept and
  scheduled like the others; the settings of kfac-jax's own example of
  stochastic training (examples/lrelunet101_imagenet; run before with
  adaptive damping, the damping fell to its floor on fmnist-cnn): momentum
  {kfac_momentum}, fixed damping {kfac_damping}, the
  step along the preconditioned gradient shortened where its
  curvature-weighted squared norm exceeds {kfac_norm}, curvature
  average {kfac_ema}, inverses every {kfac_period} steps, and its
  {kfac_burnin}-step curvature burn-in on the run's first {kfac_burnin}
  batches; on the CPU its convolution blocks compute the same
  input factor from explicit patches, as kfac-jax's patch-moment routine
  is slow on XLA:CPU; the environment's `kfac_conv_input_stats` says which
  ran). An optimizer whose
  API or package is missing, or that cannot run on the installed JAX, is
  listed as unavailable with the reason.
  Fixed settings: library defaults except where a task names tuned values
  (`fmnist-cnn`: the arTuRO authors' tuned Adam, AdamW, SGD-momentum and
  arTuRO configurations); SOAA gets `total_steps` = the run's steps;
  AdaFisher(W) refreshes its curvature statistics every {stats_every} steps
  on the classification tasks (the library default, the authors' TCov for
  image classification) and every {lm_stats_every} steps on `lm` (the default
  of the authors' language-model script), with the statistics computed only
  on those steps (`optax_soaa.value_grad_and_stats` with
  `stats_due=optax_soaa.stats_due(state)`, LayerNorms included);
  AdaFisherW uses AdamW's weight decay; SGD's weight decay is coupled (L2),
  as in PyTorch.
- **Two modes; each table below names its mode.** *Sweep*: each optimizer
  gets the same factors (≥ 4, log-spaced) times its centre value: Adam's
  learning rate for every Adam-scale method (SOAA, AdaFisher(W), Sophia,
  AdamW, K-FAC, Adam: literally the same values), SGD's own learning rate for
  SGD, and for arTuRO the swept quantity is `kl_bound` (around its tuned
  value), not a learning rate; each optimizer is reported at its best value
  (by the task's selection metric, mean over seeds), so no method wins by a
  larger step. *Tuned* (`--tuned`): no sweep; each optimizer trains at one
  value for every seed (mean ± sd over seeds): the published tuned
  configuration where the task has one (`fmnist-cnn`: the arTuRO authors'
  Adam, AdamW, SGD-momentum and arTuRO), else the value a sweep of the same
  task picked (`--tuned-from` that sweep's `results.json`); the source of
  every value is printed under the table.
- **How the values train.** The optimizer is wrapped in
  `optax.inject_hyperparams`, so the value, times the step schedule, is set
  in its state every step. One function trains one value for one step; on a
  GPU all values train together (`jax.vmap` of it inside a `lax.scan` over
  the steps between evaluations), on the CPU one after another, one jitted
  step per call (`--execution`), because XLA:CPU runs a vmapped convolution
  several times slower per value, and a convolution inside a scan slower
  still. All values and optimizers see the same initial params and the same
  batches per seed.
- **Measures.** Final train and test loss (bits per byte for `lm`) and
  accuracy at the best (or tuned) value; steps and seconds until the test
  loss first reaches Adam's final test loss (a dash when never); the
  train-step time (forward, backward, statistics, update; un-vmapped, params
  and state donated) relative to Adam's, measured interleaved with Adam in
  one process before training, median of the pairs' ratios, each sample
  spanning whole periods of the optimizer's costly steps (Sophia's Hessian
  estimate every {sophia_period} steps, K-FAC's inverse refreshes every
  {kfac_period}, AdaFisher's statistics every
  {stats_every} or {lm_stats_every}): a sample's mean is a training step's
  mean cost (runs before this rule timed 3-step samples, see the notes); the
  wall time of
  each optimizer's whole share of the run (timing, compilation, training of
  every value and seed, evaluation); the optimizer state's bytes relative to
  Adam's. Seconds on the plots' time axis are steps × that measured step
  time. Adam's own ratio compares two separately compiled copies of the same
  step: its distance from 1.00 is the timing noise of that run (large on a
  shared, loaded machine).
"""


def protocol_text() -> str:
  """PROTOCOL with the settings filled in from the code that applies them."""
  import inspect  # pylint: disable=g-import-not-at-top

  import optax  # pylint: disable=g-import-not-at-top
  import optax_soaa  # pylint: disable=g-import-not-at-top
  from optax_soaa.benchmarks import kfac_baseline  # pylint: disable=g-import-not-at-top
  from optax_soaa.benchmarks import tasks  # pylint: disable=g-import-not-at-top

  stats_every = inspect.signature(optax_soaa.adafisher).parameters[
      "stats_every"].default
  return PROTOCOL.format(
      stats_every=stats_every, lm_stats_every=tasks.ADAFISHER_LM_STATS_EVERY,
      kfac_momentum=kfac_baseline.SETTINGS["momentum"],
      kfac_damping=f"{kfac_baseline.SETTINGS['damping']:g}",
      kfac_norm=f"{kfac_baseline.SETTINGS['norm_constraint']:g}",
      kfac_ema=kfac_baseline.SETTINGS["curvature_ema"],
      kfac_burnin=kfac_baseline.SETTINGS["num_burnin_steps"],
      kfac_period=kfac_baseline.SETTINGS["inverse_update_period"],
      sophia_period=inspect.signature(optax.contrib.sophia).parameters[
          "update_interval"].default)


def benchmarks_md(payloads: Sequence[Dict[str, Any]],
                  notes: Sequence[str] = (),
                  plot_dirs: Sequence[Optional[pathlib.Path]] = (),
                  relative_to: Optional[pathlib.Path] = None) -> str:
  """BENCHMARKS.md: the protocol, then each payload's table and plots.

  `plot_dirs[i]` is where payload i's plots are; links are written relative
  to `relative_to` (the directory of the written file).
  """
  parts = [protocol_text(), "## Results\n"]
  if notes:
    parts.append("\n".join(f"- Note: {n}" for n in notes) + "\n")
  for i, p in enumerate(payloads):
    parts.append(markdown_report(p, heading_level=3))
    plot_dir = plot_dirs[i] if i < len(plot_dirs) else None
    if plot_dir is not None:
      base = pathlib.Path(os.path.relpath(plot_dir, relative_to or "."))
      parts.append("\n".join(
          f"![{name[:-4]}]({(base / name).as_posix()})"
          for name in PLOT_FILES if (plot_dir / name).is_file()) + "\n")
  return "\n".join(parts).rstrip() + "\n"
