"""Trains one optimizer on one task over its whole sweep, and times its step.

The sweep technique: the optimizer is wrapped in ``optax.inject_hyperparams``
so the swept value (learning rate or arTuRO's kl_bound) is part of the state;
params and state get a leading "sweep" axis and one ``jax.vmap``-ed train step
trains every sweep value at once, inside a ``lax.scan`` over `eval_every`
steps. Each optimizer compiles that chunk once (plus one un-vmapped step for
timing); evaluation is compiled once per task and shared. All sweep values
and all optimizers see the same initial params and the same batches per seed.

Seconds on the time axis are steps x the optimizer's own measured step time
(un-vmapped, one sweep value, median over the interleaved pairs), because the
vmapped sweep shares its wall time between all values.
"""

from __future__ import annotations

import functools
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

from optax_soaa.benchmarks import optimizers as opt_lib
from optax_soaa.benchmarks.tasks import Task

try:
  from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is in the examples extra.
  tqdm = None


def tree_bytes(tree: Any) -> int:
  return sum(
      int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree) if hasattr(x, "dtype")
  )


def make_grad_fn(spec: opt_lib.OptimizerSpec, loss_fn: Callable[..., Any]):
  """(params, batch, rng) -> (loss, grads, extra keyword args of `update`)."""
  if opt_lib.STATS in spec.extra_args:
    from optax_soaa import flax as oflax  # pylint: disable=g-import-not-at-top

    value_grad_stats = oflax.value_grad_and_stats(loss_fn)

    def with_stats(params, batch, rng):
      loss, grads, stats = value_grad_stats(params, batch, rng)
      return loss, grads, {"stats": stats}

    return with_stats

  value_and_grad = jax.value_and_grad(loss_fn)

  def plain(params, batch, rng):
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


def _diagnostic(state, name: Optional[str]):
  if name is None:
    return None
  try:
    value = optax.tree.get(state, name)
  except KeyError:
    return None
  return None if value is None else np.asarray(value, np.float64)


def _finite_or_none(x):
  x = float(x)
  return x if math.isfinite(x) else None


class TaskRunner:
  """Runs optimizers on one task; shares data, evaluation and Adam's step."""

  def __init__(self, task: Task, seeds: Sequence[int] = (0,),
               timing_pairs: int = 15, timing_inner: int = 3,
               min_sample_s: float = 0.05, progress: bool = True):
    self.task = task
    self.seeds = tuple(seeds)
    self.timing_pairs = timing_pairs
    self.timing_inner = timing_inner
    self.min_sample_s = min_sample_s
    self.progress = progress and tqdm is not None
    self.loss_scale = 1.0 / math.log(2.0) if task.kind == "lm" else 1.0
    self.data = task.device_data()
    self.eval_sets = {k: self._pad_eval(*v) for k, v in task.eval_sets.items()}
    self._evaluate = jax.jit(jax.vmap(self._eval_one, in_axes=(0, None)))
    self._init = jax.jit(task.init_params)
    self._timing_batch = task.get_batch(
        self.data, jnp.asarray(task.sampler(10_000).take(1)[0]))
    self._adam = None  # (step fn, [params, state]) for interleaved timing.

  # -- evaluation -----------------------------------------------------------

  def _pad_eval(self, x, y):
    n, chunk = x.shape[0], min(self.task.eval_chunk, x.shape[0])
    chunks = math.ceil(n / chunk)
    pad = chunks * chunk - n
    w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
    y = np.concatenate([y, np.repeat(y[:1], pad, 0)])
    shape = lambda a: a.reshape((chunks, chunk) + a.shape[1:])
    return (jnp.asarray(shape(x)), jnp.asarray(shape(y)), jnp.asarray(shape(w)),
            n * self.task.tokens_per_example)

  def _eval_one(self, params, batches):
    def body(acc, xs):
      x, y, w = xs
      loss, correct = self.task.example_metrics(params, x, y)
      return (acc[0] + jnp.sum(loss * w), acc[1] + jnp.sum(correct * w)), None

    zero = jnp.zeros([], jnp.float32)
    (loss, correct), _ = jax.lax.scan(body, (zero, zero), batches)
    return loss, correct

  def evaluate(self, params_stack) -> Dict[str, np.ndarray]:
    out = {}
    for name, (x, y, w, count) in self.eval_sets.items():
      loss, correct = jax.device_get(self._evaluate(params_stack, (x, y, w)))
      out[f"{name}_loss"] = np.asarray(loss, np.float64) / count * self.loss_scale
      out[f"{name}_accuracy"] = np.asarray(correct, np.float64) / count
    return out

  # -- one optimizer --------------------------------------------------------

  def run(self, spec: opt_lib.OptimizerSpec) -> Dict[str, Any]:
    result: Dict[str, Any] = dict(
        name=spec.name, description=spec.description, swept=spec.swept,
        scale=spec.scale, extra_args=sorted(spec.extra_args),
        diagnostic=spec.diagnostic)
    reason = spec.available()
    if reason:
      result.update(status="unavailable", reason=reason)
      return result
    try:
      result.update(self._run(spec))
      result["status"] = "ok"
    except Exception as e:  # pylint: disable=broad-except
      # One optimizer failing must not lose the others' results.
      result.update(status="error", reason=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc())
      print(f"[bench] {spec.name} failed: {type(e).__name__}:"
            f" {str(e).splitlines()[0] if str(e) else ''}",
            file=sys.stderr)
    return result

  def _run(self, spec: opt_lib.OptimizerSpec) -> Dict[str, Any]:
    task = self.task
    injected, factory = opt_lib.make_injected(spec, task.hp, task.num_steps)
    center = task.centers[spec.scale]
    values = np.asarray([center * f for f in task.factors], np.float32)
    base = jnp.asarray(values)
    multiplier = task.schedule_multiplier(spec.scale)
    grad_fn = make_grad_fn(spec, task.loss_fn)
    swept = spec.swept

    def init_members(params, base):
      def one(p, b):
        return _set_hyperparam(injected.init(p), swept, b * multiplier(0))
      return jax.vmap(one)(params, base)

    def chunk(carry, data, idx, steps, base, key):
      def body(carry, xs):
        params, opt_state = carry
        idx_t, step = xs
        batch = task.get_batch(data, idx_t)
        rng = jax.random.fold_in(key, step)
        mult = multiplier(step)

        def one(p, s, b):
          s = _set_hyperparam(s, swept, b * mult)
          loss, grads, extra = grad_fn(p, batch, rng)
          updates, s = injected.update(grads, s, p, **extra)
          return optax.apply_updates(p, updates), s, loss

        params, opt_state, loss = jax.vmap(one)(params, opt_state, base)
        return (params, opt_state), loss

      return jax.lax.scan(body, carry, (idx, steps))

    init_members = jax.jit(init_members)
    chunk = jax.jit(chunk, donate_argnums=(0,))
    n_chunks = task.num_steps // task.eval_every

    seed_curves = []
    sweep_wall, compile_s = 0.0, None
    bar = None
    if self.progress:
      bar = tqdm(total=task.num_steps * len(self.seeds), desc=spec.name,
                 leave=True, file=sys.stderr, dynamic_ncols=True)
    for seed in self.seeds:
      key = jax.random.key(seed)
      params0 = self._init(key)
      n = len(values)
      params = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape).copy(),
                            params0)
      opt_state = init_members(params, base)
      sampler = task.sampler(seed)
      dropout_key = jax.random.fold_in(key, 1)
      curves = {k: [] for k in ("step", "train_loss", "train_accuracy",
                                "test_loss", "test_accuracy", "batch_loss",
                                "diagnostic")}

      def record(step, batch_loss=None):
        ev = self.evaluate(params)
        curves["step"].append(step)
        for k, v in ev.items():
          curves[k].append(v.tolist())
        curves["batch_loss"].append(
            None if batch_loss is None else batch_loss.tolist())
        diag = _diagnostic(opt_state, spec.diagnostic)
        curves["diagnostic"].append(None if diag is None else
                                    np.ravel(diag).tolist())
        return ev

      record(0)
      for c in range(n_chunks):
        idx = jnp.asarray(sampler.take(task.eval_every))
        start = c * task.eval_every
        steps = jnp.arange(start, start + task.eval_every, dtype=jnp.int32)
        t0 = time.perf_counter()
        (params, opt_state), losses = chunk(
            (params, opt_state), self.data, idx, steps, base, dropout_key)
        losses = np.asarray(jax.device_get(losses), np.float64)
        dt = time.perf_counter() - t0
        if compile_s is None:
          compile_s = dt
        else:
          sweep_wall += dt
        ev = record(start + task.eval_every,
                    losses.mean(0) * self.loss_scale)
        if bar is not None:
          bar.update(task.eval_every)
          bar.set_postfix(seed=seed, best_test_loss=f"{np.nanmin(ev['test_loss']):.4g}")
      seed_curves.append(dict(seed=seed, **curves))
    if bar is not None:
      bar.close()

    # Un-vmapped single step at the sweep centre: speed and state size.
    plain = factory(center)
    timing = self._time_against_adam(plain, grad_fn)
    params_one = self._init(jax.random.key(0))
    state_bytes = tree_bytes(plain.init(params_one))

    return dict(
        values=values.tolist(), factors=list(task.factors), center=center,
        hp=task.hp.get(spec.name.split("-")[0], {}),
        seeds=list(self.seeds), curves=seed_curves,
        compile_and_first_chunk_s=compile_s,
        sweep_wall_s=sweep_wall,
        state_bytes=state_bytes, **timing)

  # -- step timing ----------------------------------------------------------

  def _make_step(self, tx, grad_fn):
    def step(params, opt_state, batch, rng):
      loss, grads, extra = grad_fn(params, batch, rng)
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))

  def _prepared(self, tx, grad_fn):
    step = self._make_step(tx, grad_fn)
    params = self._init(jax.random.key(0))
    holder = [params, tx.init(params)]
    rng = jax.random.key(7)

    def run(n):
      t0 = time.perf_counter()
      loss = None
      for _ in range(n):
        holder[0], holder[1], loss = step(holder[0], holder[1],
                                          self._timing_batch, rng)
      jax.block_until_ready((holder[0], loss))
      return (time.perf_counter() - t0) / n

    run(2)  # compile and warm up
    return run

  def _time_against_adam(self, tx, grad_fn) -> Dict[str, Any]:
    if self._adam is None:
      adam_spec = opt_lib.REGISTRY["adam"]
      adam_tx = adam_spec.build(self.task.hp, self.task.num_steps)(
          self.task.centers["adam"])
      self._adam = self._prepared(adam_tx, make_grad_fn(adam_spec,
                                                        self.task.loss_fn))
    run_adam, run_opt = self._adam, self._prepared(tx, grad_fn)
    # Each sample lasts >= min_sample_s, so tiny models are not timed at the
    # resolution of the clock and the scheduler.
    per_step = min(run_adam(1), run_opt(1))
    inner = int(min(500, max(self.timing_inner,
                             math.ceil(self.min_sample_s / max(per_step, 1e-7)))))
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
                timing_inner_steps=inner)


# -- summary across optimizers ----------------------------------------------


def _final(curves: List[Dict[str, Any]], key: str) -> np.ndarray:
  """Final value per sweep value, mean over seeds (NaN kept)."""
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


def summarize(results: Dict[str, Dict[str, Any]], task: Task) -> Dict[str, Any]:
  """Adds best value, final metrics and time to target to every `ok` result.

  Target: the best-tuned Adam's final test (held-out) loss, mean over seeds.
  """
  for r in results.values():
    if r.get("status") != "ok":
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

  adam = results.get("adam")
  target = None
  if adam and adam.get("status") == "ok":
    target = adam["final"]["test_loss"]
    for r in results.values():
      if r.get("status") == "ok":
        r["state_bytes_ratio"] = r["state_bytes"] / adam["state_bytes"]
  for r in results.values():
    if r.get("status") != "ok":
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
