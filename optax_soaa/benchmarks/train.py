"""Trains one optimizer on one task at each of its values, and times its step.

A "member" is one value of the swept hyperparameter (the learning rate, or
arTuRO's kl_bound); the tuned mode has one member per optimizer, a sweep
several. A training plan (`plans`) trains the members; this module owns what
is common to every plan: the seeds' initial params and batches, evaluation
every ``eval_every`` steps, the per-step records (the training loss and the
optimizer's diagnostics: SOAA's ``dt`` and trust ratio, arTuRO's ``eta`` and
bisection steps, K-FAC's damping and norm scale), and the step timing.

Execution: ``"vmap"`` trains every member at once (``jax.vmap`` of the step
inside a ``lax.scan``; the right plan on a GPU), ``"sequential"`` one after
another, one jitted step per call (the fast plan on XLA:CPU, where a vmapped
convolution runs several times slower per member and the same step inside a
``lax.scan`` tens of times slower); ``"auto"`` picks by backend. All members
and optimizers see the same initial params and the same batches per seed.

Seconds on the time axis are steps x the optimizer's own step time, measured
un-vmapped and interleaved with Adam's (median over pairs) before training
starts, so that the tool can print the expected wall time of a run.
"""

import math
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optax_soaa.benchmarks import optimizers as opt_lib
from optax_soaa.benchmarks import plans
from optax_soaa.benchmarks import schema
from optax_soaa.benchmarks.summarize import clip_side
from optax_soaa.benchmarks.tasks import Task

try:
  from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is in the examples extra.
  tqdm = None

EXECUTIONS = ("auto", "vmap", "sequential")


def resolve_execution(execution: str, backend: Optional[str] = None) -> str:
  if execution not in EXECUTIONS:
    raise ValueError(f"execution must be one of {EXECUTIONS}, got"
                     f" {execution!r}")
  if execution != "auto":
    return execution
  backend = backend or jax.default_backend()
  return "sequential" if backend == "cpu" else "vmap"


def _short(a: np.ndarray) -> List[Any]:
  """Per-step values for JSON: 6 significant digits (they are plotted)."""
  return [[float(f"{v:.6g}") for v in row] for row in np.asarray(a).tolist()]


def describe(spec: opt_lib.OptimizerSpec, status: str = "ok",
             **fields) -> schema.OptimizerResult:
  """A result of `spec` with its description filled in."""
  return schema.OptimizerResult(
      name=spec.name, description=spec.description, swept=spec.swept,
      scale=spec.scale, extra_args=sorted(spec.extra_args),
      diagnostic=spec.diagnostic,
      step_diagnostics=list(spec.step_diagnostics), status=status, **fields)


class TaskRunner:
  """Runs optimizers on one task; shares data, evaluation and Adam's step."""

  def __init__(self, task: Task, seeds: Sequence[int] = (0,),
               timing_pairs: int = 15, timing_inner: int = 3,
               min_sample_s: float = 0.05, progress: bool = True,
               execution: str = "auto"):
    self.task = task
    self.seeds = tuple(seeds)
    self.timing_pairs = timing_pairs
    self.timing_inner = timing_inner
    self.min_sample_s = min_sample_s
    self.progress = progress and tqdm is not None
    self.execution = resolve_execution(execution)
    self.loss_scale = 1.0 / math.log(2.0) if task.kind == "lm" else 1.0
    self.data = task.device_data()
    self.eval_sets = {k: self._chunk_eval(*v) for k, v in task.eval_sets.items()}
    self._eval_chunk = jax.jit(self._eval_one_chunk)
    self._eval_chunk_members = jax.jit(
        jax.vmap(self._eval_one_chunk, in_axes=(0, None, None, None)))
    self._init = jax.jit(task.init_params)
    self._timing_idx = task.sampler(10_000).take(1)[0]
    self._adam = None  # Adam's step runner, for interleaved timing.
    self.eval_s = None  # measured seconds of one evaluation of one member.

  # -- evaluation -----------------------------------------------------------

  def _chunk_eval(self, x, y):
    """Device chunks (x, y, weight) of an evaluation set, and its count.

    Evaluation is a Python loop over jitted chunks: on XLA:CPU a
    convolution inside a scan runs far slower than the same one alone.
    """
    n, chunk = x.shape[0], min(self.task.eval_chunk, x.shape[0])
    chunks = math.ceil(n / chunk)
    pad = chunks * chunk - n
    w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
    y = np.concatenate([y, np.repeat(y[:1], pad, 0)])
    parts = [tuple(jnp.asarray(a[i * chunk:(i + 1) * chunk]) for a in (x, y, w))
             for i in range(chunks)]
    return parts, n * self.task.tokens_per_example

  def _eval_one_chunk(self, params, x, y, w):
    loss, correct = self.task.example_metrics(params, x, y)
    return jnp.sum(loss * w), jnp.sum(correct * w)

  def evaluate(self, params, stacked: bool) -> Dict[str, np.ndarray]:
    """Metrics of params (a member stack when `stacked`), shape (members,)."""
    fn = self._eval_chunk_members if stacked else self._eval_chunk
    out = {}
    for name, (parts, count) in self.eval_sets.items():
      loss = correct = 0.0
      for x, y, w in parts:
        l, c = fn(params, x, y, w)
        loss, correct = loss + l, correct + c
      loss, correct = jax.device_get((loss, correct))
      out[f"{name}_loss"] = np.atleast_1d(
          np.asarray(loss, np.float64)) / count * self.loss_scale
      out[f"{name}_accuracy"] = np.atleast_1d(
          np.asarray(correct, np.float64)) / count
    return out

  def measure_eval(self) -> float:
    """Seconds of one evaluation of one member (compiled first)."""
    params = self._init(jax.random.key(0))
    if self.execution == "vmap":
      params = jax.tree.map(lambda x: x[None], params)
    for _ in range(2):
      t0 = time.perf_counter()
      self.evaluate(params, stacked=self.execution == "vmap")
      self.eval_s = time.perf_counter() - t0
    return self.eval_s

  def _evaluate_timed(self, plan, carry):
    t0 = time.perf_counter()
    ev = self.evaluate(plan.params(carry), stacked=plan.vmapped)
    dt = (time.perf_counter() - t0) / len(next(iter(ev.values())))
    self.eval_s = dt if self.eval_s is None else min(self.eval_s, dt)
    return ev

  # -- one optimizer --------------------------------------------------------

  def recorded_hp(self, spec: opt_lib.OptimizerSpec) -> Dict[str, Any]:
    return plans.recorded_hp(self.task, spec)

  def values(self, spec: opt_lib.OptimizerSpec) -> np.ndarray:
    center = self.task.centers[spec.scale]
    return np.asarray([center * f for f in self.task.factors], np.float32)

  def plan(self, spec: opt_lib.OptimizerSpec):
    return plans.make_plan(self.task, spec, self.execution)

  def run(self, spec: opt_lib.OptimizerSpec,
          values: Optional[Sequence[float]] = None,
          previous: Optional[schema.OptimizerResult] = None,
          on_seed: Optional[Callable[[schema.OptimizerResult], None]] = None,
          timing: Optional[schema.Timing] = None) -> schema.OptimizerResult:
    """Trains `spec` at `values` (default: the task's sweep) for every seed.

    `previous`: this optimizer's result from an interrupted run of the same
    configuration; its finished seeds are kept and not trained again.
    `on_seed(result)` is called after each seed (to write it to disk).
    `timing`: this optimizer's `time_step` result, when already measured.
    """
    reason = spec.available()
    if reason:
      return describe(spec, "unavailable", reason=reason)
    try:
      return self._run(spec, values, previous, on_seed, timing)
    except Exception as e:  # pylint: disable=broad-except
      # One optimizer failing must not lose the others' results.
      print(f"[bench] {spec.name} failed: {type(e).__name__}:"
            f" {str(e).splitlines()[0] if str(e) else ''}",
            file=sys.stderr)
      return describe(spec, "error", reason=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc())

  def _run(self, spec, values, previous, on_seed,
           timing) -> schema.OptimizerResult:
    task = self.task
    center = task.centers[spec.scale]
    values = np.asarray(self.values(spec) if values is None else values,
                        np.float32)
    plan = self.plan(spec)
    seed_runs = [c for c in (previous.curves if previous else [])
                 if c.seed in self.seeds]
    timing = timing or (previous and previous.timing) or self.time_step(spec)
    result = describe(
        spec, values=values.tolist(),
        factors=[float(v) / center for v in values], center=center,
        hp=self.recorded_hp(spec), execution=plan.execution,
        curves=seed_runs, seeds=[c.seed for c in seed_runs], timing=timing)
    todo = [s for s in self.seeds if s not in result.seeds]
    bar = None
    if self.progress and todo:
      bar = tqdm(total=task.num_steps * len(values) * len(todo),
                 desc=spec.name, leave=True, file=sys.stderr,
                 dynamic_ncols=True)
    for seed in todo:
      t0 = time.perf_counter()
      curves = self._train_seed(plan, spec, values, seed, bar)
      curves.wall_s = time.perf_counter() - t0
      seed_runs.append(curves)
      result.seeds = [c.seed for c in seed_runs]
      result.wall_s = timing.timing_wall_s + sum(c.wall_s for c in seed_runs)
      if on_seed is not None:
        on_seed(result)
    if bar is not None:
      bar.close()
    result.wall_s = timing.timing_wall_s + sum(c.wall_s for c in seed_runs)
    return result

  def _train_seed(self, plan, spec, values, seed, bar) -> schema.SeedCurves:
    task = self.task
    key = jax.random.key(seed)
    params0 = self._init(key)
    dropout_key = jax.random.fold_in(key, 1)
    idx = task.sampler(seed).take(task.num_steps)
    plan.start_seed(self.data, idx)
    groups = ([list(range(len(values)))] if plan.vmapped
              else [[i] for i in range(len(values))])
    n_chunks = task.num_steps // task.eval_every
    names = tuple(spec.step_diagnostics)
    evals: List[List[Dict[str, np.ndarray]]] = [[] for _ in range(n_chunks + 1)]
    batch_loss = np.full((n_chunks, len(values)), np.nan)
    per_step = {n: np.zeros((task.num_steps, len(values)), np.float32)
                for n in names}
    interval_s, first_interval_s = [], None
    for members in groups:
      carry = plan.init(params0, values[members])
      evals[0].append(self._evaluate_timed(plan, carry))
      for c in range(n_chunks):
        start = c * task.eval_every
        steps = np.arange(start, start + task.eval_every, dtype=np.int32)
        t0 = time.perf_counter()
        carry, losses, diag = plan.run(carry, values[members], self.data,
                                       idx[steps], steps, dropout_key)
        losses, diag = jax.device_get((losses, diag))
        seconds = time.perf_counter() - t0
        if c:  # the first interval includes compilation.
          interval_s.append(seconds / (task.eval_every * len(members)))
        elif first_interval_s is None:
          first_interval_s = seconds
        batch_loss[c, members] = np.mean(np.asarray(losses, np.float64), 0)
        for n in names:
          per_step[n][steps[:, None], members] = np.asarray(diag[n])
        evals[c + 1].append(self._evaluate_timed(plan, carry))
        if bar is not None:
          bar.update(task.eval_every * len(members))
          bar.set_postfix(seed=seed)
    return self._curves(seed, spec, evals, batch_loss, per_step, interval_s,
                        first_interval_s)

  def _curves(self, seed, spec, evals, batch_loss, per_step, interval_s,
              first_interval_s) -> schema.SeedCurves:
    task = self.task
    step = list(range(0, task.num_steps + 1, task.eval_every))
    join = lambda k: [np.concatenate([p[k] for p in parts]).tolist()
                      for parts in evals]
    # The diagnostic after the last step before each evaluation (none
    # before training).
    diag = per_step.get(spec.diagnostic)
    curves = schema.SeedCurves(
        seed=seed, step=step, train_loss=join("train_loss"),
        train_accuracy=join("train_accuracy"), test_loss=join("test_loss"),
        test_accuracy=join("test_accuracy"),
        batch_loss=[None] + (batch_loss * self.loss_scale).tolist(),
        diagnostic=[None] + [None if diag is None else diag[s - 1].tolist()
                             for s in step[1:]],
        per_step={n: _short(v) for n, v in per_step.items()},
        measured_step_s=(statistics.median(interval_s) if interval_s
                         else None),
        # With the median step above: this seed's compilation and warm-up.
        first_interval_s=first_interval_s, wall_s=0.0)
    if "dt" in per_step and "trust_ratio" in per_step:
      side = clip_side(per_step["dt"], per_step["trust_ratio"])
      intervals = side.reshape(-1, task.eval_every, side.shape[1])
      curves.dt_at_lower = (intervals == -1).mean(1).tolist()
      curves.dt_at_upper = (intervals == 1).mean(1).tolist()
    return curves

  # -- step timing ----------------------------------------------------------

  def stepper(self, spec):
    """(run(n) -> seconds per step, state bytes) of `spec` at its centre."""
    run, nbytes = self.plan(spec).stepper(
        self.data, self._init(jax.random.key(0)), self._timing_idx)
    run(2)  # compile and warm up
    return run, nbytes()

  def time_step(self, spec: opt_lib.OptimizerSpec) -> schema.Timing:
    """The un-vmapped train step's time, interleaved with Adam's."""
    t_start = time.perf_counter()
    if self._adam is None:
      self._adam, _ = self.stepper(opt_lib.REGISTRY["adam"])
    run_opt, state_bytes = self.stepper(spec)
    compile_s = time.perf_counter() - t_start
    run_adam = self._adam
    # Each sample lasts >= min_sample_s, so tiny models are not timed at the
    # resolution of the clock and the scheduler.
    per_step = min(run_adam(1), run_opt(1))
    inner = int(min(500, max(self.timing_inner,
                             math.ceil(self.min_sample_s / max(per_step, 1e-7)))))
    # Whole periods of the optimizer's costly steps (Sophia's Hessian
    # estimate, AdaFisher's statistics, K-FAC's inverses) in every sample:
    # a median over shorter samples measures the cheap steps only.
    period = max(1, int(spec.period(self.task.hp)))
    inner = -(-max(inner, period) // period) * period
    ratios, t_adam, t_opt = [], [], []
    for i in range(self.timing_pairs):
      if i % 2 == 0:
        a, b = run_adam(inner), run_opt(inner)
      else:
        b, a = run_opt(inner), run_adam(inner)
      ratios.append(b / a)
      t_adam.append(a)
      t_opt.append(b)
    return schema.Timing(
        step_time_ratio=statistics.median(ratios),
        step_time_s=statistics.median(t_opt),
        adam_step_time_s=statistics.median(t_adam),
        timing_pairs=self.timing_pairs, timing_inner_steps=inner,
        cost_period=period, state_bytes=state_bytes, compile_s=compile_s,
        timing_wall_s=time.perf_counter() - t_start)

  def expected_seconds(self, timing: schema.Timing, members: int,
                       seeds: int) -> float:
    """Expected training + evaluation seconds from a measured step time."""
    task = self.task
    evals = task.num_steps // task.eval_every + 1
    eval_s = self.eval_s if self.eval_s is not None else 0.0
    return members * seeds * (task.num_steps * timing.step_time_s
                              + evals * eval_s)
