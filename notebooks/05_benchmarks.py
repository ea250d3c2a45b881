# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Benchmark results: SOAA, arTuRO and AdaFisher next to Adam and other baselines
#
# The package ships a benchmark tool, `python -m optax_soaa.bench`. It trains
# every optimizer on a task over the same sweep of its step size (learning
# rate; `kl_bound` for arTuRO), picks each one's best value, times the
# update step against Adam's, and writes everything to
# `bench_results/<task>/results.json`. This notebook reads that file and
# draws the comparison.
#
# If no results file is found, the notebook runs the tool's smallest preset
# itself (`--quick` on the `digits-mlp` task), so that it also works on a
# fresh Colab machine; on a CPU that takes a few minutes. Results are only
# as good as the run that made them: the notebook prints which command,
# machine and date produced the file it shows.
#
# **Install.** The next cell installs `optax_soaa` when it is not importable
# yet: from the repository checkout around this notebook if there is one
# (`pip install -e`), else by its name, `optax-soaa`. If pip upgrades jax or
# flax (on Colab), restart the runtime once and run on.

# %%
import importlib.util
import os
import pathlib

if importlib.util.find_spec("optax_soaa") is None:
  _root = next((p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents)
                if (p / "pyproject.toml").is_file()
                and (p / "optax_soaa").is_dir()), None)
  _package = f'-e "{_root}[examples]"' if _root else "optax-soaa[examples]"
  # %pip install -q {_package}

# %% [markdown]
# `NUM_STEPS` is the length of the training runs when this notebook runs the
# tool itself (300 is the `--quick` preset's length; CI sets
# `OPTAX_SOAA_NOTEBOOK_STEPS` much lower). `OPTAX_SOAA_BENCH_ARGS` can add
# arguments to that command (CI uses it to run fewer optimizers), and
# `OPTAX_SOAA_BENCH_RESULTS` can point at a results file or folder to show
# instead, e.g. one from a longer run or from another task.

# %%
NUM_STEPS = int(os.environ.get("OPTAX_SOAA_NOTEBOOK_STEPS", 300))
TASK = "digits-mlp"
EXTRA_BENCH_ARGS = os.environ.get("OPTAX_SOAA_BENCH_ARGS", "").split()

# %%
import shlex
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from optax_soaa.benchmarks import report
from optax_soaa.benchmarks import schema

# %% [markdown]
# ## Find the results, or make them
#
# In this order: the file named by `OPTAX_SOAA_BENCH_RESULTS`; a local run
# of the tool (`bench_results/<task>/results.json`, in this folder or a
# parent); the results published in the repository
# (`results/bench/<task>/results.json`, when the notebook runs from a
# checkout). Set `TASK` above to `"fmnist-cnn"` or `"lm"` to show the
# published results of those tasks. If nothing is found, the tool runs here.

# %%
def find_results():
  """The results file to show: given, a local run, or the published one."""
  given = os.environ.get("OPTAX_SOAA_BENCH_RESULTS")
  if given:
    path = pathlib.Path(given)
    return path / "results.json" if path.is_dir() else path
  here = pathlib.Path.cwd().resolve()
  for folder in ("bench_results", "results/bench"):
    for root in (here, *here.parents):
      path = root / folder / TASK / "results.json"
      if path.is_file():
        return path
  return None


def checkout_root():
  here = pathlib.Path.cwd().resolve()
  return next((p for p in (here, *here.parents)
               if (p / "pyproject.toml").is_file()
               and (p / "optax_soaa").is_dir()), None)


results_path = find_results()
if results_path is None:
  # Where the tool writes by default: bench_results/ at the top of a
  # checkout, else in the current folder (e.g. /content on Colab).
  out_dir = (checkout_root() or pathlib.Path.cwd()) / "bench_results" / TASK
  command = [sys.executable, "-m", "optax_soaa.bench", "--tasks", TASK,
             "--quick", "--steps", str(NUM_STEPS), "--no-progress",
             "--out", str(out_dir), *EXTRA_BENCH_ARGS]
  print("No results found; running: python", shlex.join(command[1:]))
  log = []
  with subprocess.Popen(command, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True) as proc:
    for line in proc.stdout:  # show the tool's progress lines as they come
      log.append(line)
      if line.startswith("[bench]"):
        print(line, end="", flush=True)
  if proc.returncode != 0:
    raise RuntimeError("the benchmark failed:\n" + "".join(log[-40:]))
  results_path = out_dir / "results.json"

# The tool's typed results (schema.Run): it reads every version of the file.
run = schema.load(results_path)
env, task = run.environment, run.task
_root = checkout_root()
_shown = results_path.resolve()
if _root is not None and _root in _shown.parents:
  _shown = _shown.relative_to(_root)
print(f"results: {_shown.as_posix()}")
print(f"made by: {env.command}")
print(f"on:      {env.date}, {env.machine}, {env.device}, "
      f"jax {env.jax}, optax {env.optax}")
print(f"task:    {task.name}, {task.num_steps} steps, batch "
      f"{task.batch_size}, seeds {run.seeds}")

# %% [markdown]
# ## The table
#
# The tool's own Markdown table: each optimizer at its best swept value
# (chosen by the task's selection metric), its final metrics, how many
# steps and seconds it needed to reach the test loss of the best-tuned Adam,
# and its update-step time and state memory relative to Adam's.

# %%
display(Markdown("\n".join(report.table_rows(run))))

ok = {name: r for name, r in run.optimizers.items() if r.summarized}
for name, r in run.optimizers.items():
  if name not in ok:
    print(f"not plotted: {name}: {r.status} ({r.reason})")

# %% [markdown]
# ## Learning curves
#
# Test loss at each evaluation for every optimizer's best value (mean over
# seeds), against steps and against wall-clock seconds (steps times the
# measured time of one update step, so a slower step shifts a curve right).
# The dashed line is the target: the best-tuned Adam's final test loss.

# %%
styles = {name: dict(color=f"C{i % 10}", ls=("-", "--", ":", "-.")[i % 4],
                     lw=2 if name == "adam" else 1.5)
          for i, name in enumerate(ok)}
unit = "bits per byte" if task.kind == "lm" else "cross-entropy"


def best_curve(r, key):
  """Mean over seeds of the curve of the best sweep value (NaN = diverged)."""
  i = r.best_index
  return np.nanmean([[np.nan if v is None or v[i] is None else v[i]
                      for v in getattr(c, key)] for c in r.curves], axis=0)


fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
for name, r in ok.items():
  steps = np.asarray(r.curves[0].step, float)
  loss = best_curve(r, "test_loss")
  label = f"{name} ({'kl' if r.swept == 'kl_bound' else 'lr'} {r.best_value:.3g})"
  axes[0].plot(steps, loss, **styles[name], label=label)
  axes[1].plot(steps * r.timing.step_time_s, loss, **styles[name], label=label)
for ax, xlabel in zip(axes, ("step", "seconds (steps x measured step time)")):
  if run.target_test_loss is not None:
    ax.axhline(run.target_test_loss, color="k", ls="--", lw=0.8)
  ax.set(yscale="log", xlabel=xlabel)
  ax.grid(alpha=0.3, which="both")
axes[0].set_ylabel(f"test {unit}")
axes[0].legend(fontsize=8)
fig.suptitle(f"{task.name}: test loss at each optimizer's best value")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## How sensitive is each optimizer to its step size?
#
# Final test loss for every swept value. The x axis is the factor times each
# optimizer's centre value (Adam's learning rate for the Adam-like methods,
# the tuned `kl_bound` for arTuRO). A flat curve means a forgiving
# optimizer; a missing point means the run diverged.

# %%
fig, ax = plt.subplots(figsize=(8, 4.5))
for name, r in ok.items():
  vals = np.asarray([np.nan if v is None else v
                     for v in r.final_per_value["test_loss"]], float)
  ax.plot(r.factors, vals, marker="o", ms=4, **styles[name], label=name)
  ax.plot(r.factors[r.best_index], vals[r.best_index], "o", ms=9,
          mfc="none", color=styles[name]["color"])
ax.set(xscale="log", yscale="log", xlabel="sweep factor (x centre value)",
       ylabel=f"final test {unit}", title="step-size sweep (circled: best)")
ax.grid(alpha=0.3, which="both")
ax.legend(fontsize=8, ncol=2)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What it costs
#
# Accuracy at the best value (with the spread over seeds when there are
# several), the time of one update step relative to Adam's (measured
# interleaved with Adam in the same process), and the optimizer state's
# memory relative to Adam's.

# %%
names = list(ok)
fig, axes = plt.subplots(1, 3, figsize=(14, 0.45 * len(names) + 1.8),
                         sharey=True)
y = np.arange(len(names))
colors = [styles[n]["color"] for n in names]
acc = [ok[n].test_accuracy_mean for n in names]
acc_sd = [ok[n].test_accuracy_std or 0.0 for n in names]
axes[0].barh(y, acc, xerr=acc_sd, color=colors)
axes[0].set(xlim=(min(acc) - 0.05, 1.0), title="test accuracy (best value)")
ratios = {"update step time / Adam": [ok[n].timing.step_time_ratio
                                     for n in names],
          "state memory / Adam": [ok[n].state_bytes_ratio for n in names]}
for ax, (title, values) in zip(axes[1:], ratios.items()):
  ax.barh(y, [np.nan if v is None else v for v in values], color=colors)
  ax.axvline(1.0, color="k", lw=0.8, ls="--")
  ax.set_title(title)
axes[0].set_yticks(y, names)
axes[0].invert_yaxis()
for ax in axes:
  ax.grid(alpha=0.3, axis="x")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Trust-region diagnostics
#
# The tool records one diagnostic per optimizer where there is one: SOAA's
# `dt` and arTuRO's `eta`, for the best value (first seed). They are samples
# taken at each evaluation (every `eval_every` steps), not averages, so they
# look jumpier than the per-step plots of `01_quickstart` and `04_arturo`,
# which explain how to read them.

# %%
diagnostics = {name: r for name, r in ok.items() if r.diagnostic}
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for ax, diag in zip(axes, ("dt", "eta")):
  for name, r in diagnostics.items():
    if r.diagnostic != diag:
      continue
    c, i = r.curves[0], r.best_index
    vals = np.asarray([np.nan if d is None else d[i]
                       for d in c.diagnostic], float)
    if diag == "eta":
      vals[vals <= 0] = np.nan  # eta is 0 before the first step; log axis
    ax.plot(c.step, vals, marker=".", **styles[name], label=name)
  if ax.lines:
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, f"no optimizer with {diag} in these results",
            ha="center", va="center", transform=ax.transAxes)
  ax.set(xlabel="step", title=diag)
  ax.grid(alpha=0.3)
if axes[1].lines:
  axes[1].set_yscale("log")
fig.tight_layout()
plt.show()
