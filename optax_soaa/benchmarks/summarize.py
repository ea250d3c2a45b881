"""What a run's curves say: best value, final metrics, time to Adam's target.

`summarize` fills in the summary fields of every trained `OptimizerResult`
of a `Run`; `extend_sweep` joins the values one optimizer trained in two
invocations of the same task (a sweep widened after the fact).
"""

import math
from typing import Dict, List, Optional

import numpy as np

from optax_soaa.benchmarks import schema

FINAL_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
PER_VALUE_KEYS = ("train_loss", "test_loss", "test_accuracy")


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


def _finite_or_none(x) -> Optional[float]:
  x = float(x)
  return x if math.isfinite(x) else None


def _array(rows) -> np.ndarray:
  return np.asarray([[np.nan if v is None else v for v in row]
                     for row in rows], np.float64)


def _final(curves: List[schema.SeedCurves], key: str) -> np.ndarray:
  """Final value per member, mean over seeds (NaN kept)."""
  return np.mean([_array(getattr(c, key)[-1:])[0] for c in curves], 0)


def best_index(r: schema.OptimizerResult, select_by: str) -> int:
  scores = _final(r.curves, select_by)
  higher = select_by.endswith("accuracy")
  scores = np.where(np.isfinite(scores), scores, -np.inf if higher else np.inf)
  return int(np.argmax(scores) if higher else np.argmin(scores))


def mean_curve(r: schema.OptimizerResult, key: str, index: int) -> np.ndarray:
  """The curve of member `index`, mean over seeds."""
  return np.mean([_array(getattr(c, key))[:, index] for c in r.curves], 0)


def per_step_all_seeds(r: schema.OptimizerResult,
                       name: str) -> Optional[np.ndarray]:
  """A per-step diagnostic at the best value, every seed's steps in turn."""
  vals = [_array(c.per_step[name])[:, r.best_index]
          for c in r.curves if name in c.per_step]
  return np.concatenate(vals) if vals else None


def _clip_summary(r: schema.OptimizerResult,
                  i: int) -> Optional[Dict[str, float]]:
  """Share of all steps (every seed) with dt at each bound, member i."""
  curves = [c for c in r.curves if c.dt_at_lower is not None]
  if not curves:
    return None
  lower = np.mean([np.asarray(c.dt_at_lower)[:, i].mean() for c in curves])
  upper = np.mean([np.asarray(c.dt_at_upper)[:, i].mean() for c in curves])
  return dict(lower=float(lower), upper=float(upper),
              either=float(lower + upper))


def summarize_result(r: schema.OptimizerResult, select_by: str) -> None:
  """The summary fields of one trained result, from its curves."""
  i = r.best_index = best_index(r, select_by)
  r.best_value = r.values[i]
  r.final = {k: _finite_or_none(_final(r.curves, k)[i]) for k in FINAL_KEYS}
  r.final_per_value = {k: [_finite_or_none(v) for v in _final(r.curves, k)]
                       for k in PER_VALUE_KEYS}
  accs = [c.test_accuracy[-1][i] for c in r.curves]
  r.test_accuracy_seeds = accs
  r.test_accuracy_mean = float(np.mean(accs))
  r.test_accuracy_std = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
  # The training's own per-step time (median over evaluation intervals, so
  # it includes periodic work such as Sophia's Hessian estimates).
  trained = [c.measured_step_s for c in r.curves]
  r.train_step_s = (float(np.mean(trained))
                    if trained and None not in trained else None)
  r.dt_at_bounds = _clip_summary(r, i)


def summarize(run: schema.Run) -> schema.Run:
  """Fills in every trained result's summary; returns `run`.

  Target: the best-tuned Adam's final test (held-out) loss, mean over seeds.
  """
  for r in run.optimizers.values():
    if r.ok:
      summarize_result(r, run.task.select_by)
  adam = run.optimizers.get("adam")
  target = adam.final["test_loss"] if adam is not None and adam.ok else None
  run.target_test_loss = target
  for r in run.optimizers.values():
    if r.status == "ok" and r.timing is not None and target is not None:
      r.state_bytes_ratio = r.timing.state_bytes / adam.timing.state_bytes
    if not r.ok:
      continue
    r.target_test_loss = target
    r.steps_to_target = r.seconds_to_target = None
    if target is None:
      continue
    steps = np.asarray(r.curves[0].step)
    test = mean_curve(r, "test_loss", r.best_index)
    hit = np.nonzero(np.isfinite(test) & (test <= target + 1e-12))[0]
    if hit.size:
      r.steps_to_target = int(steps[hit[0]])
      r.seconds_to_target = float(steps[hit[0]] * r.timing.step_time_s)
  return run


# -- a sweep widened by a later invocation ----------------------------------------

# SeedCurves fields laid out (rows, values): joined along the values.
_MEMBER_FIELDS = ("train_loss", "train_accuracy", "test_loss",
                  "test_accuracy", "batch_loss", "diagnostic", "dt_at_lower",
                  "dt_at_upper")


def _join_rows(a, b, order):
  if a is None or b is None:
    return None
  return [None if x is None or y is None else [(x + y)[j] for j in order]
          for x, y in zip(a, b)]


def extend_sweep(r: schema.OptimizerResult, more: schema.OptimizerResult,
                 environment_index: int) -> schema.OptimizerResult:
  """`r` with the values `more` trained (same task, settings and seeds).

  Both invocations train every value from the same initial params on the
  same batches, so the joined sweep is the one a single invocation would
  train. The timing stays `r`'s; the wall time adds `more`'s.
  """
  if r.hp != more.hp or sorted(r.seeds) != sorted(more.seeds):
    raise ValueError(f"{r.name}: the runs differ in settings or seeds")
  if set(r.values) & set(more.values):
    raise ValueError(f"{r.name}: both runs trained"
                     f" {sorted(set(r.values) & set(more.values))}")
  values = r.values + more.values
  order = list(np.argsort(values))
  by_seed = {c.seed: c for c in more.curves}
  curves = []
  for c in r.curves:
    m = by_seed[c.seed]
    joined = {f: _join_rows(getattr(c, f), getattr(m, f), order)
              for f in _MEMBER_FIELDS}
    joined["per_step"] = {
        n: _join_rows(c.per_step[n], m.per_step[n], order)
        for n in c.per_step}
    joined["wall_s"] = c.wall_s + m.wall_s
    curves.append(schema.SeedCurves(**{**vars(c), **joined}))
  return schema.OptimizerResult(**{
      **vars(r), "values": [values[j] for j in order],
      "factors": [(r.factors + more.factors)[j] for j in order],
      "curves": curves, "wall_s": (r.wall_s or 0.0) + (more.wall_s or 0.0),
      "extended_by": (r.extended_by or []) + [environment_index]})
