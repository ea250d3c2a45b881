"""BENCHMARKS.md and the full protocol page: generated from results files."""

import os
import pathlib
from typing import Optional, Sequence, Tuple

from optax_soaa.benchmarks import schema
from optax_soaa.benchmarks.report import plots
from optax_soaa.benchmarks.report import summary
from optax_soaa.benchmarks.report import tables

# Where the full protocol goes, relative to BENCHMARKS.md's folder.
PROTOCOL_PAGE = "docs/benchmark_protocol.md"
# The README's copy of the summary table lies between these lines.
README_MARKS = ("<!-- summary table: written by the benchmark tool"
                " (--write-benchmarks-md) -->", "<!-- end of summary table -->")
REGENERATE = ("python -m optax_soaa.bench --from-results"
              " results/bench/*/results.json --write-benchmarks-md")

PROTOCOL = """\
# Benchmark protocol

This page is written by the benchmark tool (`--write-benchmarks-md`), with
the settings filled in from the code that applies them; the results are on
the [benchmarks page](benchmarks.md) (BENCHMARKS.md), the summary first.

- **Tool.** `python -m optax_soaa.bench` (console script `optax-soaa-bench`).
  Every run writes `results.json` (environment, command, every evaluation of
  every value and seed, and per-step diagnostics), `results.md` (the run's
  table) and plots (`curves.png`: train and test loss against steps and
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
  `stats_due=optax_soaa.stats_due(state)`) for every parameter: on `lm`
  the token and position embeddings and the LayerNorms too (28 of 28
  leaves). The authors never trained an embedding (their language model
  freezes its pretrained token and position tables and the tied head); this
  benchmark's AdaFisher rows before commit 87ccb56 left the embeddings on
  the fallback, 1000 times smaller steps (2.98 test bits/byte on `lm-2000`);
  AdaFisherW uses AdamW's weight decay; SGD's weight decay is coupled (L2),
  as in PyTorch.
- **Two modes; each run's table names its mode.** *Sweep*: each optimizer
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
  every value is printed under the table. A sweep whose best value sits at
  its edge is widened until it does not: a run of the values beyond the edge
  alone, joined to the first with `--from-results FIRST MORE --merge DIR`
  (the same initial params and batches, so the joined sweep is the one a
  single run would train).
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


def _filled(text: str) -> str:
  """`text` with the settings filled in from the code that applies them."""
  import inspect  # pylint: disable=g-import-not-at-top

  import optax  # pylint: disable=g-import-not-at-top
  import optax_soaa  # pylint: disable=g-import-not-at-top
  from optax_soaa.benchmarks import kfac_baseline  # pylint: disable=g-import-not-at-top
  from optax_soaa.benchmarks import tasks  # pylint: disable=g-import-not-at-top

  stats_every = inspect.signature(optax_soaa.adafisher).parameters[
      "stats_every"].default
  return text.format(
      stats_every=stats_every, lm_stats_every=tasks.ADAFISHER_LM_STATS_EVERY,
      kfac_momentum=kfac_baseline.SETTINGS["momentum"],
      kfac_damping=f"{kfac_baseline.SETTINGS['damping']:g}",
      kfac_norm=f"{kfac_baseline.SETTINGS['norm_constraint']:g}",
      kfac_ema=kfac_baseline.SETTINGS["curvature_ema"],
      kfac_burnin=kfac_baseline.SETTINGS["num_burnin_steps"],
      kfac_period=kfac_baseline.SETTINGS["inverse_update_period"],
      sophia_period=inspect.signature(optax.contrib.sophia).parameters[
          "update_interval"].default)




SHORT_PROTOCOL = """\
## Protocol, in short

- **Tasks.** `digits-mlp`: an MLP on scikit-learn's embedded digits.
  `fmnist-cnn`: the arTuRO paper's CNN protocol on Fashion-MNIST (its step
  schedule, batch 255). `lm`: a byte-level transformer on the Python
  standard library's sources. Nothing is downloaded.
- **Sweep runs** train every optimizer at the same factors × its centre value
  (Adam's learning rate for every Adam-scale method, SGD's for SGD, the tuned
  `kl_bound` for arTuRO) and report each at its best value. **Tuned runs**
  train one value per optimizer over several seeds: the arTuRO authors'
  published configuration where there is one, else a sweep's pick; the
  summary's *tuning* column says which.
- Every optimizer sees the same initial params and batches per seed.
- **Step time** is measured before training, interleaved with Adam's in one
  process (median of the pairs, each sample spanning whole periods of an
  optimizer's costly steps); **state** is the optimizer state's bytes. Both
  relative to Adam's. Each run's record (collapsed under its table) names its
  machine, load average, commits and commands.
- The full protocol, with every fixed setting: [{page}]({page}).
"""


def protocol_text() -> str:
  """The full protocol page, settings filled in from the code."""
  return _filled(PROTOCOL)


def benchmarks_md(runs: Sequence[Tuple[str, schema.Run]],
                  notes: Sequence[str] = (),
                  plot_dirs: Sequence[Optional[pathlib.Path]] = (),
                  relative_to: Optional[pathlib.Path] = None) -> str:
  """BENCHMARKS.md: the summary, the protocol in short, then every run.

  `runs`: (name, run) pairs, a run's name being its folder; `plot_dirs[i]`
  is where run i's plots are; links are written relative to `relative_to`
  (the directory of the written file).
  """
  named = summary.runs_by_name(runs)
  parts = [
      "# Benchmarks\n",
      "Written by the benchmark tool from the results files under"
      " `results/bench/<run>/` (JSON, tables, plots); no number is typed by"
      f" hand. Regenerate with `{REGENERATE}`.\n",
      "## Summary\n", summary.summary_table(named),
      SHORT_PROTOCOL.format(page=PROTOCOL_PAGE), "## Runs\n"]
  if notes:
    parts.append("\n".join(f"- Note: {n}" for n in notes) + "\n")
  for i, (name, run) in enumerate(runs):
    parts.append(tables.compact_report(run, name))
    plot_dir = plot_dirs[i] if i < len(plot_dirs) else None
    if plot_dir is not None:
      base = pathlib.Path(os.path.relpath(plot_dir, relative_to or "."))
      parts.append("\n".join(
          f"![{name} {f[:-4]}]({(base / f).as_posix()})"
          for f in plots.PLOT_FILES if (plot_dir / f).is_file()) + "\n")
  return "\n".join(parts).rstrip() + "\n"


def with_summary(readme: str, table: str) -> str:
  """`readme` with `table` between its `README_MARKS` (ValueError without)."""
  start, end = README_MARKS
  if start not in readme or end not in readme:
    raise ValueError(f"no {start!r} ... {end!r} lines to write the summary to")
  head, rest = readme.split(start, 1)
  return f"{head}{start}\n{table}{end}{rest.split(end, 1)[1]}"
