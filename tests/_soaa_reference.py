"""A NumPy float64 restatement of shared/specs/soaa.md, one step at a time.

Written from the spec page, not from the library: leaves are flat float64
arrays and every sum runs over all of them. Complex leaves (complex128) follow
optax's convention for Adam: the gradient is ∂L/∂x + i ∂L/∂y, squares are
|·|² and products in sums are Re(conj(a) b), so s, v and every scalar are
real; for real leaves these are the plain squares and products.
"""

import dataclasses
from typing import Callable, List, Optional

import numpy as np


@dataclasses.dataclass
class ReferenceState:
  t: int
  m: List[np.ndarray]
  s: List[np.ndarray]
  v: Optional[List[np.ndarray]]
  dt: float = 1.0
  loss_avg: float = 0.0
  pr: float = 0.0
  trust_ratio: float = 0.0
  fisher_ratio: float = 0.0


def _abs_sq(x: np.ndarray) -> np.ndarray:
  return (np.conj(x) * x).real


def _real_dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return (np.conj(x) * y).real


def init(params: List[np.ndarray], curvature: str) -> ReferenceState:
  zeros = [np.zeros(p.shape, np.float64) for p in params]
  return ReferenceState(
      t=0, m=[np.zeros(p.shape, np.result_type(p, np.float64)) for p in params],
      s=[z.copy() for z in zeros],
      v=[z.copy() for z in zeros] if curvature == "variance" else None,
  )


def step(
    state: ReferenceState,
    grads: List[np.ndarray],
    params: List[np.ndarray],
    loss: Optional[float],
    *,
    lr_fn: Callable[[int], float],
    b1: float,
    b2: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    total_steps: int,
    curvature: str,
):
  """Returns (updates, new_state) for step t = state.t + 1."""
  t = state.t + 1
  lr = float(lr_fn(t - 1))
  m = [b1 * m + (1 - b1) * g for m, g in zip(state.m, grads)]
  s = [b2 * s + (1 - b2) * _abs_sq(g) for s, g in zip(state.s, grads)]
  m_hat = [x / (1 - b1**t) for x in m]
  s_hat = [x / (1 - b2**t) for x in s]
  if curvature == "variance":
    v = [b2 * v + (1 - b2) * _abs_sq(g - mh)
         for v, g, mh in zip(state.v, grads, m_hat)]
    v_hat = [x / (1 - b2**t) for x in v]
  elif curvature == "second_moment":
    v = None
    v_hat = s_hat
  else:  # "none": the paper read literally, v initialised and never updated.
    v = None
    v_hat = [np.zeros_like(x) for x in s_hat]
  r = (sum(np.sum(_abs_sq(x)) for x in m_hat)
       / sum(np.sum(x + eps) for x in v_hat))
  fisher = [(1 + r) * x for x in v_hat]
  dt = state.dt
  g_adj = [
      mh * dt / (np.maximum(dt * f, np.sqrt(sh)) + eps)
      for mh, f, sh in zip(m_hat, fisher, s_hat)
  ]
  updates = [-lr * weight_decay * p - lr * u for p, u in zip(params, g_adj)]

  new = ReferenceState(t=t, m=m, s=s, v=v, dt=state.dt,
                       loss_avg=state.loss_avg, pr=state.pr,
                       trust_ratio=state.trust_ratio, fisher_ratio=r)
  if loss is not None and np.isfinite(loss):
    loss_avg = b1 * state.loss_avg + (1 - b1) * loss
    loss_hat = loss if t == 1 else loss_avg / (1 - b1**t)
    lo = (1 - gamma) ** ((t - 1) / total_steps)
    hi = 1 + gamma ** ((t - 1) / total_steps)
    ratio = (loss_hat - loss) / max(state.pr, eps)
    new.dt = min(max(ratio * state.dt, lo), hi)
    new.pr = lr * (
        sum(np.sum(_real_dot(mh, u)) for mh, u in zip(m_hat, g_adj))
        - 0.5 * sum(np.sum(vh * _abs_sq(u)) for vh, u in zip(v_hat, g_adj))
    )
    new.loss_avg = loss_avg
    new.trust_ratio = ratio
  return updates, new
