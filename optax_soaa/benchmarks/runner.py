"""Trains one optimizer on one task at each of its values, and times its step.

A "member" is one value of the swept hyperparameter (the learning rate, or
arTuRO's kl_bound); the tuned mode has one member per optimizer, a sweep
several. The optimizer is wrapped in ``optax.inject_hyperparams`` so the
member's value, times the task's step schedule, is set in its state every
step. One function, ``member_step``, trains one member for one step; two
execution plans run it, and both feed the same recording code:

* ``"vmap"``: params and state get a leading member axis; ``jax.vmap`` of the
  step, inside a ``lax.scan`` over the steps between two evaluations, trains
  every member at once (one compile; the right plan on a GPU).
* ``"sequential"``: the members train one after another, one jitted step per
  call. On XLA:CPU this is the fast plan: a vmapped convolution there runs
  several times slower per member than the plain one (about 4x for the
  Fashion-MNIST CNN at batch 255), and the same step inside a ``lax.scan``
  (a while loop) tens of times slower.

``"auto"`` picks ``sequential`` on the CPU and ``vmap`` elsewhere. K-FAC
(kfac-jax's own optimizer, which compiles its own step) always runs
sequentially. All members and optimizers see the same initial params and the
same batches per seed.

Every step records the training loss and the optimizer's per-step
diagnostics (SOAA's ``dt`` and trust ratio, arTuRO's ``eta`` and bisection
steps); evaluation runs every ``eval_every`` steps. Seconds on the time axis
are steps x the optimizer's own step time, measured un-vmapped and
interleaved with Adam's (median over pairs), before training starts, so the
tool can print the expected wall time of the run.
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
import optax
import optax_soaa

from optax_soaa.benchmarks import kfac_baseline
from optax_soaa.benchmarks import optimizers as opt_lib
from optax_soaa.benchmarks import report
from optax_soaa.benchmarks.tasks import Task

try:
  from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is in the examples extra.
  tqdm = None

EXECUTIONS = ("auto", "vmap", "sequential")
CURVE_KEYS = ("step", "train_loss", "train_accuracy", "test_loss",
              "test_accuracy", "batch_loss", "diagnostic")


def tree_bytes(tree: Any) -> int:
  return sum(
      int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree) if hasattr(x, "dtype")
  )


def resolve_execution(execution: str, backend: Optional[str] = None) -> str:
  if execution not in EXECUTIONS:
    raise ValueError(f"execution must be one of {EXECUTIONS}, got"
                     f" {execution!r}")
  if execution != "auto":
    return execution
  backend = backend or jax.default_backend()
  return "sequential" if backend == "cpu" else "vmap"


def make_grad_fn(spec: opt_lib.OptimizerSpec, loss_fn: Callable[..., Any]):
  """(params, opt_state, batch, rng) -> (loss, grads, extra args of `update`).

  AdaFisher's layer statistics come from `optax_soaa.value_grad_and_stats`,
  computed only on the steps where the optimizer state says they are due
  (its refresh steps), as a user's train step would.
  """
  if opt_lib.STATS in spec.extra_args:
    value_grad_stats = optax_soaa.value_grad_and_stats(loss_fn)

    def with_stats(params, opt_state, batch, rng):
      return value_grad_stats(params, batch, rng,
                              stats_due=optax_soaa.stats_due(opt_state))

    return with_stats

  value_and_grad = jax.value_and_grad(loss_fn)

  def plain(params, opt_state, batch, rng):
    del opt_state
    loss, grads = value_and_grad(params, batch, rng)
    extra = {}
    if opt_lib.VALUE in spec.extra_args:
      extra["value"] = loss
    if opt_lib.OBJ_FN in spec.extra_args:
      extra["obj_fn"] = lambda p: loss_fn(p, batch, rng)
    return loss, grads, extra

  return plain


def _set_hyperparam(state, name, value):
  old = state.hyperparams[name]
  return state._replace(
      hyperparams={**state.hyperparams, name: jnp.asarray(value, old.dtype)})


def _finite_or_none(x):
  x = float(x)
  return x if math.isfinite(x) else None


def _short(a: np.ndarray) -> List[Any]:
  """Per-step values for JSON: 6 significant digits (they are plotted)."""
  return [[float(f"{v:.6g}") for v in row] for row in np.asarray(a).tolist()]


def clip_side(dt: np.ndarray, trust_ratio: np.ndarray,
              dt0: float = 1.0) -> np.ndarray:
  """Per step and member: -1 where SOAA clipped dt to its lower bound, +1 to
  its upper bound, 0 where dt = trust_ratio x previous dt (unclipped).

  SOAA sets ``dt_t = clip(ratio_t * dt_{t-1}, lower_t, upper_t)`` in the
  scalar dtype; redoing the product in that dtype tells whether the clip
  acted without restating the bounds. Arrays (steps, members).
  """
  dt = np.asarray(dt)
  prev = np.concatenate([np.full_like(dt[:1], dt0), dt[:-1]], 0)
  unclipped = (np.asarray(trust_ratio, dt.dtype) * prev).astype(dt.dtype)
  side = np.zeros(dt.shape, np.int8)
  side[unclipped < dt] = -1
  side[unclipped > dt] = 1
  return side


# -- training plans -----------------------------------------------------------


class _OptaxPlan:
  """Trains members of one optax optimizer: vmapped, or one at a time."""

  def __init__(self, task: Task, spec: opt_lib.OptimizerSpec, vmapped: bool):
    self.vmapped = vmapped
    injected, _ = opt_lib.make_injected(spec, task.hp, task.num_steps)
    multiplier = task.schedule_multiplier(spec.scale)
    grad_fn = make_grad_fn(spec, task.loss_fn)
    swept, names = spec.swept, spec.step_diagnostics

    def init_member(params, value):
      return params, _set_hyperparam(injected.init(params), swept,
                                     value * multiplier(0))

    def member_step(params, opt_state, value, data, idx, step, key):
      batch = task.get_batch(data, idx)
      opt_state = _set_hyperparam(opt_state, swept, value * multiplier(step))
      loss, grads, extra = grad_fn(params, opt_state, batch,
                                   jax.random.fold_in(key, step))
      updates, opt_state = injected.update(grads, opt_state, params, **extra)
      diag = {n: optax.tree.get(opt_state, n) for n in names}
      return optax.apply_updates(params, updates), opt_state, loss, diag

    if vmapped:
      self._init = jax.jit(jax.vmap(init_member))
      step_all = jax.vmap(member_step, in_axes=(0, 0, 0, None, None, None,
                                                None))

      def interval(carry, values, data, idx, steps, key):
        def body(carry, xs):
          params, opt_state, loss, diag = step_all(*carry, values, data, *xs,
                                                   key)
          return (params, opt_state), (loss, diag)

        return jax.lax.scan(body, carry, (idx, steps))

      self._interval = jax.jit(interval, donate_argnums=(0,))
    else:
      self._init = jax.jit(init_member)
      self._step = jax.jit(member_step, donate_argnums=(0, 1))

  def init(self, params, values: np.ndarray):
    if self.vmapped:
      params = jax.tree.map(
          lambda x: jnp.broadcast_to(x, (len(values),) + x.shape).copy(),
          params)
      return self._init(params, jnp.asarray(values))
    (value,) = values
    # A copy: the donated step must not consume the seed's initial params.
    params = jax.tree.map(jnp.copy, params)
    return self._init(params, jnp.asarray(value, jnp.float32))

  def run(self, carry, values, data, idx: np.ndarray, steps: np.ndarray, key):
    """Trains `len(steps)` steps; (carry, losses (k, m), {name: (k, m)})."""
    if self.vmapped:
      carry, (loss, diag) = self._interval(
          carry, jnp.asarray(values), data, jnp.asarray(idx),
          jnp.asarray(steps), key)
      return carry, loss, diag
    (value,) = values
    value = jnp.asarray(value, jnp.float32)
    params, opt_state = carry
    losses, diags = [], []
    for i, step in zip(idx, steps):
      params, opt_state, loss, diag = self._step(
          params, opt_state, value, data, i, np.int32(step), key)
      losses.append(loss)
      diags.append(diag)
    stack = lambda *xs: jnp.stack(xs)[:, None]
    return ((params, opt_state), stack(*losses),
            jax.tree.map(stack, *diags) if diags[0] else {})

  @staticmethod
  def params(carry):
    return carry[0]


class _KfacPlan:
  """Trains K-FAC members one at a time through kfac-jax's own step."""

  vmapped = False

  def __init__(self, task: Task, spec: opt_lib.OptimizerSpec):
    self.task = task
    # Host-side factors of the learning rate, one per step: kfac-jax takes
    # the learning rate as an argument of every step.
    self._multiplier = np.asarray(jax.vmap(task.schedule_multiplier(
        spec.scale))(jnp.arange(task.num_steps)), np.float64)
    self._opt, self._settings = kfac_baseline.make_optimizer(
        task.train_logits, task.tokens_per_example, **task.hp.get("kfac", {}))
    self.batch = jax.jit(task.get_batch)
    self._first = None  # this seed's first batches, for the burn-in.

  def start_seed(self, data, idx: np.ndarray):
    n = self._settings["num_burnin_steps"]
    self._first = [self.batch(data, i) for i in idx[: max(1, n)]]

  def init(self, params, values: np.ndarray):
    del values  # given to every step (`run`)
    params = jax.tree.map(jnp.copy, params)
    return kfac_baseline.Member(self._opt, self._settings, params,
                                jax.random.key(0), self._first)

  def run(self, member, values, data, idx, steps, key):
    (value,) = values
    losses, diags = [], []
    for i, step in zip(idx, steps):
      lr = value * self._multiplier[step]
      loss, diag = member.step(self.batch(data, i), lr,
                               jax.random.fold_in(key, step))
      losses.append(loss)
      diags.append(diag)
    stack = lambda xs: jnp.stack(xs)[:, None]
    return member, stack(losses), {
        n: stack([d[n] for d in diags]) for n in diags[0]}

  @staticmethod
  def params(member):
    return member.params


# -- the runner -----------------------------------------------------------------


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
    self._adam = None  # (step runner) for interleaved timing.
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

  # -- one optimizer --------------------------------------------------------

  def describe_spec(self, spec: opt_lib.OptimizerSpec) -> Dict[str, Any]:
    return dict(name=spec.name, description=spec.description,
                swept=spec.swept, scale=spec.scale,
                extra_args=sorted(spec.extra_args),
                diagnostic=spec.diagnostic,
                step_diagnostics=list(spec.step_diagnostics))

  def recorded_hp(self, spec: opt_lib.OptimizerSpec) -> Dict[str, Any]:
    """The settings a result records (a resumed run retrains on a change).

    The task's fixed hyperparameters of this optimizer; for K-FAC, every
    setting of kfac-jax's optimizer the benchmark passes.
    """
    hp = self.task.hp.get(spec.name.split("-")[0], {})
    if spec.kind == "kfac":
      hp = kfac_baseline.effective_settings(hp)
    # As results.json stores it (non-finite numbers as null, tuples as
    # lists), so that a resumed run compares like with like.
    return report._clean(hp)  # pylint: disable=protected-access

  def values(self, spec: opt_lib.OptimizerSpec) -> np.ndarray:
    center = self.task.centers[spec.scale]
    return np.asarray([center * f for f in self.task.factors], np.float32)

  def plan(self, spec: opt_lib.OptimizerSpec):
    if spec.kind == "kfac":
      return _KfacPlan(self.task, spec)
    return _OptaxPlan(self.task, spec, vmapped=self.execution == "vmap")

  def run(self, spec: opt_lib.OptimizerSpec,
          values: Optional[Sequence[float]] = None,
          previous: Optional[Dict[str, Any]] = None,
          on_seed: Optional[Callable[[Dict[str, Any]], None]] = None,
          timing: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Trains `spec` at `values` (default: the task's sweep) for every seed.

    `previous`: this optimizer's result from an interrupted run of the same
    configuration; its finished seeds are kept and not trained again.
    `on_seed(result)` is called after each seed (to write it to disk).
    `timing`: this optimizer's `time_step` result, when already measured.
    """
    result: Dict[str, Any] = dict(self.describe_spec(spec))
    reason = spec.available()
    if reason:
      result.update(status="unavailable", reason=reason)
      return result
    try:
      result.update(self._run(spec, values, previous, result, on_seed,
                              timing))
      result["status"] = "ok"
    except Exception as e:  # pylint: disable=broad-except
      # One optimizer failing must not lose the others' results.
      result.update(status="error", reason=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc())
      print(f"[bench] {spec.name} failed: {type(e).__name__}:"
            f" {str(e).splitlines()[0] if str(e) else ''}",
            file=sys.stderr)
    return result

  def _run(self, spec, values, previous, result, on_seed,
           timing) -> Dict[str, Any]:
    task = self.task
    center = task.centers[spec.scale]
    values = np.asarray(self.values(spec) if values is None else values,
                        np.float32)
    result.update(
        values=values.tolist(),
        factors=[float(v) / center for v in values], center=center,
        hp=self.recorded_hp(spec),
        execution="sequential" if spec.kind == "kfac" else self.execution)
    previous = previous or {}
    seed_runs = [c for c in previous.get("curves", [])
                 if c["seed"] in self.seeds]
    result.update(curves=seed_runs, seeds=[c["seed"] for c in seed_runs])
    timing = timing or previous.get("timing") or self.time_step(spec)
    result.update(timing=timing, **timing)
    plan = self.plan(spec)
    todo = [s for s in self.seeds if s not in result["seeds"]]
    bar = None
    if self.progress and todo:
      bar = tqdm(total=task.num_steps * len(values) * len(todo),
                 desc=spec.name, leave=True, file=sys.stderr,
                 dynamic_ncols=True)
    for seed in todo:
      t0 = time.perf_counter()
      curves = self._train_seed(plan, spec, values, seed, bar)
      curves["wall_s"] = time.perf_counter() - t0
      seed_runs.append(curves)
      result["seeds"] = [c["seed"] for c in seed_runs]
      result["wall_s"] = timing["timing_wall_s"] + sum(
          c["wall_s"] for c in seed_runs)
      if on_seed is not None:
        on_seed(dict(result, status="ok"))
    if bar is not None:
      bar.close()
    result["wall_s"] = timing["timing_wall_s"] + sum(
        c["wall_s"] for c in seed_runs)
    return result

  def _train_seed(self, plan, spec, values, seed, bar) -> Dict[str, Any]:
    task = self.task
    key = jax.random.key(seed)
    params0 = self._init(key)
    dropout_key = jax.random.fold_in(key, 1)
    idx = task.sampler(seed).take(task.num_steps)
    if isinstance(plan, _KfacPlan):
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
    curves = self._curves(seed, spec, evals, batch_loss, per_step, interval_s)
    # With the median step above: this seed's compilation and warm-up.
    curves["first_interval_s"] = first_interval_s
    return curves

  def _evaluate_timed(self, plan, carry):
    t0 = time.perf_counter()
    ev = self.evaluate(plan.params(carry), stacked=plan.vmapped)
    dt = (time.perf_counter() - t0) / len(next(iter(ev.values())))
    self.eval_s = dt if self.eval_s is None else min(self.eval_s, dt)
    return ev

  def _curves(self, seed, spec, evals, batch_loss, per_step, interval_s):
    task = self.task
    join = lambda parts, k: np.concatenate([p[k] for p in parts])
    curves: Dict[str, Any] = dict(
        seed=seed, step=list(range(0, task.num_steps + 1, task.eval_every)))
    for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
      curves[k] = [join(parts, k).tolist() for parts in evals]
    curves["batch_loss"] = [None] + (batch_loss * self.loss_scale).tolist()
    # The diagnostic after the last step before each evaluation (none
    # before training).
    diag = per_step.get(spec.diagnostic)
    curves["diagnostic"] = [None] + [
        None if diag is None else diag[s - 1].tolist()
        for s in curves["step"][1:]]
    curves["per_step"] = {n: _short(v) for n, v in per_step.items()}
    if "dt" in per_step and "trust_ratio" in per_step:
      side = clip_side(per_step["dt"], per_step["trust_ratio"])
      k = task.eval_every
      intervals = side.reshape(-1, k, side.shape[1])
      curves["dt_at_lower"] = (intervals == -1).mean(1).tolist()
      curves["dt_at_upper"] = (intervals == 1).mean(1).tolist()
    curves["measured_step_s"] = (statistics.median(interval_s)
                                 if interval_s else None)
    return curves

  # -- step timing ----------------------------------------------------------

  def _optax_stepper(self, tx, grad_fn):
    def step(params, opt_state, batch, rng):
      loss, grads, extra = grad_fn(params, opt_state, batch, rng)
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    params = self._init(jax.random.key(0))
    holder = [params, tx.init(params)]
    batch = self.task.get_batch(self.data, jnp.asarray(self._timing_idx))
    rng = jax.random.key(7)

    def run(n):
      t0 = time.perf_counter()
      loss = None
      for _ in range(n):
        holder[0], holder[1], loss = step(holder[0], holder[1], batch, rng)
      jax.block_until_ready((holder[0], loss))
      return (time.perf_counter() - t0) / n

    return run, lambda: tree_bytes(holder[1])

  def _kfac_stepper(self, spec):
    plan = _KfacPlan(self.task, spec)
    idx = self.task.sampler(10_000).take(
        kfac_baseline.SETTINGS["num_burnin_steps"])
    plan.start_seed(self.data, idx)
    member = plan.init(self._init(jax.random.key(0)), [self.task.centers[
        spec.scale]])
    batch = plan.batch(self.data, idx[0])
    lr = self.task.centers[spec.scale]
    key = jax.random.key(7)

    def run(n):
      t0 = time.perf_counter()
      loss = None
      for _ in range(n):
        loss, _ = member.step(batch, lr, key)
      jax.block_until_ready((member.params, loss))
      return (time.perf_counter() - t0) / n

    return run, lambda: tree_bytes(member.state)

  def stepper(self, spec):
    """(run(n) -> seconds per step, state bytes) of `spec` at its centre."""
    if spec.kind == "kfac":
      run, nbytes = self._kfac_stepper(spec)
    else:
      tx = spec.build(self.task.hp, self.task.num_steps)(
          self.task.centers[spec.scale])
      run, nbytes = self._optax_stepper(tx, make_grad_fn(spec,
                                                         self.task.loss_fn))
    run(2)  # compile and warm up
    return run, nbytes()

  def time_step(self, spec: opt_lib.OptimizerSpec) -> Dict[str, Any]:
    """The un-vmapped train step's time, interleaved with Adam's."""
    t_start = time.perf_counter()
    if self._adam is None:
      self._adam, self._adam_bytes = self.stepper(opt_lib.REGISTRY["adam"])
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
    return dict(step_time_ratio=statistics.median(ratios),
                step_time_s=statistics.median(t_opt),
                adam_step_time_s=statistics.median(t_adam),
                timing_pairs=self.timing_pairs,
                timing_inner_steps=inner, cost_period=period,
                state_bytes=state_bytes,
                compile_s=compile_s,
                timing_wall_s=time.perf_counter() - t_start)

  def expected_seconds(self, timing: Dict[str, Any], members: int,
                       seeds: int) -> float:
    """Expected training + evaluation seconds from a measured step time."""
    task = self.task
    evals = task.num_steps // task.eval_every + 1
    eval_s = self.eval_s if self.eval_s is not None else 0.0
    return members * seeds * (task.num_steps * timing["step_time_s"]
                              + evals * eval_s)

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


# -- summary across optimizers ----------------------------------------------


def _final(curves: List[Dict[str, Any]], key: str) -> np.ndarray:
  """Final value per member, mean over seeds (NaN kept)."""
  return np.mean([np.asarray(c[key][-1], np.float64) for c in curves], 0)


def _worst(select_by: str) -> float:
  return -np.inf if select_by.endswith("accuracy") else np.inf


def best_index(result: Dict[str, Any], select_by: str) -> int:
  scores = _final(result["curves"], select_by)
  worst = _worst(select_by)
  scores = np.where(np.isfinite(scores), scores, worst)
  return int(np.argmax(scores) if select_by.endswith("accuracy")
             else np.argmin(scores))


def mean_curve(result: Dict[str, Any], key: str, index: int) -> np.ndarray:
  return np.mean([np.asarray(c[key], np.float64)[:, index]
                  for c in result["curves"]], 0)


def _clip_summary(r: Dict[str, Any], i: int) -> Optional[Dict[str, float]]:
  """Share of all steps (every seed) with dt at each bound, member i."""
  curves = [c for c in r["curves"] if "dt_at_lower" in c]
  if not curves:
    return None
  lower = np.mean([np.asarray(c["dt_at_lower"])[:, i].mean() for c in curves])
  upper = np.mean([np.asarray(c["dt_at_upper"])[:, i].mean() for c in curves])
  return dict(lower=float(lower), upper=float(upper),
              either=float(lower + upper))


def summarize(results: Dict[str, Dict[str, Any]], task: Task) -> Dict[str, Any]:
  """Adds best value, final metrics and time to target to every `ok` result.

  Target: the best-tuned Adam's final test (held-out) loss, mean over seeds.
  """
  for r in results.values():
    if r.get("status") != "ok" or not r.get("curves"):
      continue
    i = best_index(r, task.select_by)
    r["best_index"] = i
    r["best_value"] = r["values"][i]
    r["final"] = {k: _finite_or_none(_final(r["curves"], k)[i])
                  for k in ("train_loss", "train_accuracy", "test_loss",
                            "test_accuracy")}
    r["final_per_value"] = {
        k: [_finite_or_none(v) for v in _final(r["curves"], k)]
        for k in ("train_loss", "test_loss", "test_accuracy")}
    accs = [c["test_accuracy"][-1][i] for c in r["curves"]]
    r["test_accuracy_seeds"] = accs
    r["test_accuracy_mean"] = float(np.mean(accs))
    r["test_accuracy_std"] = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
    r["seconds_per_step"] = r["step_time_s"]
    # The training's own per-step time (median over evaluation intervals,
    # so it includes periodic work such as Sophia's Hessian estimates).
    trained = [c.get("measured_step_s") for c in r["curves"]]
    r["train_step_s"] = (float(np.mean(trained))
                         if trained and None not in trained else None)
    r["dt_at_bounds"] = _clip_summary(r, i)

  adam = results.get("adam")
  target = None
  if adam and adam.get("status") == "ok" and adam.get("curves"):
    target = adam["final"]["test_loss"]
    for r in results.values():
      if r.get("status") == "ok" and "state_bytes" in r:
        r["state_bytes_ratio"] = r["state_bytes"] / adam["state_bytes"]
  for r in results.values():
    if r.get("status") != "ok" or not r.get("curves"):
      continue
    r["target_test_loss"] = target
    r["steps_to_target"] = r["seconds_to_target"] = None
    if target is None:
      continue
    steps = np.asarray(r["curves"][0]["step"])
    test = mean_curve(r, "test_loss", r["best_index"])
    hit = np.nonzero(np.isfinite(test) & (test <= target + 1e-12))[0]
    if hit.size:
      r["steps_to_target"] = int(steps[hit[0]])
      r["seconds_to_target"] = float(steps[hit[0]] * r["step_time_s"])
  return dict(target_test_loss=target)
