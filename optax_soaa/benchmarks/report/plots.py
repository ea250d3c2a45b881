"""The plots of one run: curves, per-step diagnostics, sweep sensitivity."""

import os
import pathlib
from typing import List

import numpy as np

from optax_soaa.benchmarks import schema
from optax_soaa.benchmarks import summarize

PLOT_FILES = ("curves.png", "diagnostics.png", "sweep.png")


def _per_step(r: schema.OptimizerResult, name: str):
  """(steps 1..T, values) of a per-step diagnostic: best value, first seed."""
  c = r.curves[0]
  if name not in c.per_step:
    return None
  vals = np.asarray(c.per_step[name], np.float64)[:, r.best_index]
  return np.arange(1, len(vals) + 1), vals


def _bound_fractions(r: schema.OptimizerResult, key: str):
  """Per evaluation interval, share of steps with dt at a bound (seed mean)."""
  curves = [c for c in r.curves if getattr(c, key) is not None]
  if not curves:
    return None
  frac = np.mean([np.asarray(getattr(c, key), np.float64)[:, r.best_index]
                  for c in curves], 0)
  return np.asarray(curves[0].step[1:], np.float64), frac


def write_plots(run: schema.Run, out_dir: os.PathLike) -> List[str]:
  """curves.png, diagnostics.png and sweep.png of a run into `out_dir`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  out_dir = pathlib.Path(out_dir)
  ok = {n: r for n, r in run.optimizers.items()
        if r.summarized}
  lm = run.task.kind == "lm"
  unit = "bits per byte" if lm else "cross-entropy"
  target = run.target_test_loss
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
        steps = np.asarray(r.curves[0].step, np.float64)
        x = steps if xaxis == "steps" else steps * r.timing.step_time_s
        ax.plot(x, summarize.mean_curve(r, key, r.best_index), **styles[name],
                label=f"{name} ({'kl' if r.swept == 'kl_bound' else 'lr'}"
                     f"={r.best_value:.3g})")
      if key == "test_loss" and target is not None:
        ax.axhline(target, color="k", ls="--", lw=0.8, label="Adam target")
      ax.set_yscale("log")
      ax.set_xlabel(xaxis if xaxis == "steps" else
                    "seconds (steps × measured step time)")
      ax.set_ylabel(f"{label} {unit}")
      ax.set_title(f"{label} {unit} vs {xaxis}")
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"{run.task.name}: best sweep value per optimizer"
               f" (mean over seeds {run.seeds})")
  fig.tight_layout()
  fig.savefig(out_dir / PLOT_FILES[0], dpi=90)
  plt.close(fig)
  written.append(PLOT_FILES[0])

  fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
  panels = (
      (axes[0, 0], "dt", "SOAA dt after every step (best value, seed"
       f" {run.seeds[0]})", "linear"),
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
  select = run.task.select_by
  for name, r in ok.items():
    key = "test_accuracy" if select.endswith("accuracy") else "test_loss"
    vals = np.asarray([np.nan if v is None else v
                       for v in r.final_per_value[key]], np.float64)
    ax.plot(r.factors, vals, marker="o", **styles[name], label=name)
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
