"""Results files, Markdown tables, plots and BENCHMARKS.md of the benchmark tool."""

from __future__ import annotations

import datetime
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
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain",
         "--untracked-files=no"], capture_output=True, text=True, timeout=5)
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
  )


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


def results_table(payload: Dict[str, Any]) -> str:
  """The Markdown table of one results payload (one task)."""
  task = payload["task"]
  lm = task["kind"] == "lm"
  unit = "bpb" if lm else "loss"
  acc = "next-byte acc" if lm else "acc"
  multi_seed = len(payload.get("seeds", [0])) > 1
  head = ["optimizer", "swept", "best value",
          f"train {unit}", f"train {acc}", f"test {unit}", f"test {acc}"]
  if multi_seed:
    head.append(f"test {acc} mean ± sd (n={len(payload['seeds'])})")
  head += ["steps to target", "s to target", "step time ×Adam",
           "state bytes ×Adam"]
  rows = ["| " + " | ".join(head) + " |",
          "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
  notes = []
  for name, r in payload["optimizers"].items():
    if r.get("status") != "ok":
      cells = [name, r.get("swept", "—")] + ["—"] * (len(head) - 2)
      cells[2] = r.get("status", "?")
      notes.append(f"- `{name}`: {r.get('status')}: {r.get('reason')}")
      rows.append("| " + " | ".join(cells) + " |")
      continue
    f = r["final"]
    cells = [name, "kl_bound" if r["swept"] == "kl_bound" else "lr",
             _fmt(r["best_value"], ".3g"),
             _fmt(f["train_loss"]), _fmt(f["train_accuracy"]),
             _fmt(f["test_loss"]), _fmt(f["test_accuracy"])]
    if multi_seed:
      cells.append(f"{r['test_accuracy_mean']:.4f} ± {r['test_accuracy_std']:.4f}")
    cells += [_fmt(r.get("steps_to_target"), "d"),
              _fmt_seconds(r.get("seconds_to_target")),
              _fmt(r.get("step_time_ratio"), ".2f"),
              _fmt(r.get("state_bytes_ratio"), ".2f")]
    rows.append("| " + " | ".join(cells) + " |")
    if r["best_index"] in (0, len(r["values"]) - 1):
      notes.append(f"- `{name}`: best value at the edge of the sweep"
                   f" ({_fmt(r['best_value'], '.3g')}); a wider sweep may do"
                   " better.")
  target = payload.get("target_test_loss")
  legend = (
      f"Target = best-tuned Adam's final test {unit}"
      f" ({_fmt(target)}); steps/seconds to target: first evaluation (every"
      f" {task['eval_every']} steps) at or below it, seconds = steps × the"
      " optimizer's measured step time. Best value chosen by final"
      f" {task['select_by'].replace('_', ' ')} (mean over seeds).")
  return "\n".join(rows) + "\n\n" + legend + (
      "\n\n" + "\n".join(notes) if notes else "") + "\n"


def markdown_report(payload: Dict[str, Any], heading_level: int = 2) -> str:
  env, task = payload["environment"], payload["task"]
  h = "#" * heading_level
  sweep = ", ".join(f"{f:.3g}" for f in task["factors"])
  lines = [
      f"{h} {task['name']}",
      "",
      f"- command: `{env['command']}`",
      f"- date: {env['date']}; commit: {env.get('git_commit') or 'unknown'}",
      f"- machine: {env['machine']}; device: {env['device']}",
      f"- versions: python {env['python']}, jax {env['jax']}, optax"
      f" {env['optax']}, flax {env['flax']}",
      f"- steps: {task['num_steps']} (batch {task['batch_size']}), seeds:"
      f" {payload['seeds']}, sweep factors: {sweep} × centre"
      f" (adam-scale {task['centers']['adam']:.3g}, sgd {task['centers']['sgd']:.3g},"
      f" arTuRO kl_bound {task['centers']['kl']:.3g})",
      f"- wall time of the whole run: {payload.get('wall_s', 0):.0f} s",
  ]
  lines += [f"- {n}" for n in task.get("notes", [])]
  if not payload.get("complete", True):
    done = list(payload["optimizers"])
    missing = [o for o in payload.get("planned_optimizers", []) if o not in done]
    lines.append(f"- **partial run** (interrupted): finished {', '.join(done)};"
                 f" not run: {', '.join(missing)}")
  lines += ["", results_table(payload)]
  return "\n".join(lines)


# -- plots --------------------------------------------------------------------


def _best_curves(r, key):
  i = r["best_index"]
  arr = np.asarray([np.asarray(c[key], dtype=np.float64)[:, i]
                    if c[key] and c[key][0] is not None else
                    np.full(len(c["step"]), np.nan) for c in r["curves"]])
  return arr.mean(0)


def _diag_curve(r):
  i = r["best_index"]
  c = r["curves"][0]
  vals = [np.nan if d is None else d[i] for d in c["diagnostic"]]
  return np.asarray(c["step"]), np.asarray(vals, np.float64)


def write_plots(payload: Dict[str, Any], out_dir: os.PathLike) -> List[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  out_dir = pathlib.Path(out_dir)
  ok = {n: r for n, r in payload["optimizers"].items()
        if r.get("status") == "ok"}
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

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, diag, title in ((axes[0], "dt", "SOAA trust-region multiplier dt"),
                          (axes[1], "eta", "arTuRO dual variable eta")):
    drawn = False
    for name, r in ok.items():
      if r.get("diagnostic") != diag:
        continue
      steps, vals = _diag_curve(r)
      if np.isfinite(vals).any():
        ax.plot(steps, vals, **styles[name], label=f"{name} (best value)")
        drawn = True
    if drawn:
      ax.legend(fontsize=8)
      if diag == "eta":
        ax.set_yscale("log")
    else:
      ax.text(0.5, 0.5, "not run", ha="center", va="center",
              transform=ax.transAxes)
    ax.set_xlabel("steps")
    ax.set_ylabel(diag)
    ax.set_title(title)
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
behind it (JSON, tables, plots) are committed under `results/bench/<task>/`
(a run writes to `bench_results/<task>/`; copy it there to publish it).
Regenerate with

    python -m optax_soaa.bench --from-results results/bench/*/results.json --write-benchmarks-md

## Protocol

- **Tool.** `python -m optax_soaa.bench` (console script `optax-soaa-bench`).
  Every run writes `results.json` (environment, command, all curves of every
  sweep value and seed), `results.md` (the table below) and plots
  (`curves.png`: train and test loss against steps and seconds;
  `diagnostics.png`: SOAA's dt and arTuRO's eta; `sweep.png`: final metric
  against the swept value) to `--out` (default `bench_results/<task>`).
- **Tasks.** `digits-mlp` (scikit-learn's embedded digits, the default),
  `fmnist-cnn` (the arTuRO paper's Fashion-MNIST CNN protocol, data from the
  Debian package `dataset-fashion-mnist`), `lm` (byte-level decoder-only
  transformer on the Python standard library's sources). No downloads.
- **Optimizers.** SOAA (curvature `variance` and `second_moment`, loss passed
  as `value=`), arTuRO, AdaFisher and AdaFisherW (layer statistics from
  `optax_soaa.flax.value_grad_and_stats`, passed as `stats=`), and the
  baselines `optax.adam`, `optax.adamw`, `optax.sgd` with momentum and
  `optax.contrib.sophia` (Hutchinson Hessian estimate; the train step passes
  `obj_fn`, the batch loss as a function of the params). An optimizer whose
  API is missing from the installed package is listed as unavailable.
  Fixed settings: library defaults except where a task names tuned values
  (`fmnist-cnn`: the arTuRO authors' tuned Adam, AdamW, SGD-momentum and
  arTuRO configurations); SOAA gets `total_steps` = the run's steps;
  AdaFisher(W) refreshes its statistics every step (`stats_every=1`: the
  train step computes them every step anyway), AdaFisherW uses AdamW's weight
  decay; SGD's weight decay is coupled (L2), as in PyTorch.
- **Sweep.** Each optimizer gets the same factors (≥ 4, log-spaced) times its
  centre value: Adam's learning rate for every Adam-scale method (SOAA,
  AdaFisher(W), Sophia, AdamW, Adam: literally the same values), SGD's own
  learning rate for SGD, and for arTuRO the swept quantity is `kl_bound`
  (around its tuned value), not a learning rate. Each optimizer is reported at
  its best value (by the task's selection metric, mean over seeds), so no
  method wins by a larger step.
- **How the sweep runs.** The optimizer is wrapped in
  `optax.inject_hyperparams`, so the swept value is part of its state; params
  and state get a leading sweep axis and one `jax.vmap`-ed train step (inside
  a `lax.scan` over the steps between evaluations) trains all sweep values at
  once from the same initial params on the same batches. Each optimizer
  compiles that function once; evaluation is compiled once per task.
- **Measures.** Final train and test loss (bits per byte for `lm`) and
  accuracy at the best value; steps and seconds until the test loss first
  reaches the best-tuned Adam's final test loss (a dash when never); the
  train-step time (forward, backward, statistics, update; un-vmapped, params
  and state donated) relative to Adam's, measured interleaved with Adam in one
  process, median of the pairs' ratios; the optimizer state's bytes relative
  to Adam's. Seconds on the plots' time axis are steps × that measured step
  time, because the vmapped sweep shares its wall time among the values.
  Adam's own ratio compares two separately compiled copies of the same step:
  its distance from 1.00 is the timing noise of that run (large on a shared,
  loaded machine).
"""


def benchmarks_md(payloads: Sequence[Dict[str, Any]],
                  notes: Sequence[str] = ()) -> str:
  parts = [PROTOCOL, "## Results\n"]
  if notes:
    parts.append("\n".join(f"- Note: {n}" for n in notes) + "\n")
  for p in payloads:
    parts.append(markdown_report(p, heading_level=3))
  return "\n".join(parts).rstrip() + "\n"
