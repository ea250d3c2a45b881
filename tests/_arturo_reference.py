"""arTuRO restated in NumPy float64 from the spec (shared/specs/arturo.md).

Deliberately literal: a list of parameter arrays, a plain Python bisection
loop, no JAX. Used by tests/test_arturo.py for step-by-step equality.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Union

import numpy as np


@dataclasses.dataclass
class ReferenceArturo:
  kl_bound: Union[float, Callable[[int], float]]
  reg_weight: float
  prior_prec: float
  dynamic_model_noise: float
  measurement_noise: float
  start_filter_cov: float
  var_init: float = 0.01
  eta_tol: float = 0.5
  nu: float = 0.0
  weight_decay: float = 0.0
  max_eta: float = 1e4

  def init(self, params: List[np.ndarray]) -> None:
    self.count = 0
    self.precision = [np.full(p.shape, 1.0 / self.var_init) for p in params]
    self.eta = -1.0  # no previous η
    self.b = self.h = self.p00 = self.p01 = self.p11 = None
    self.bisection_steps = 0
    self.kl = 0.0
    self.capped_steps = 0  # steps whose bracket was cut at max_eta
    self.early_stops = 0  # steps ended by |d| < 0.1 ε

  def _eps(self) -> float:
    if callable(self.kl_bound):
      return float(self.kl_bound(self.count))
    return float(self.kl_bound)

  def step(self, grads: List[np.ndarray], params: List[np.ndarray]):
    """Returns the updates μ_new - θ; advances the state."""
    eps = self._eps()
    thetas = [p - eps * self.weight_decay * p for p in params]
    if self.count == 0:
      self.h = [np.full(p.shape, 0.1) for p in params]
      self.b = [g.copy() for g in grads]
      self.p00 = [np.full(p.shape, self.start_filter_cov) for p in params]
      self.p11 = [np.full(p.shape, self.start_filter_cov) for p in params]
      self.p01 = [np.zeros(p.shape) for p in params]
    q, r = self.dynamic_model_noise, self.measurement_noise
    for i, (g, th) in enumerate(zip(grads, thetas)):
      p00 = self.p00[i] + q
      p11 = self.p11[i] + q
      p01 = self.p01[i]
      k0 = p00 + p01 * th
      k1 = p01 + p11 * th
      s = k0 + k1 * th + r
      gain0, gain1 = k0 / s, k1 / s
      delta = g - self.h[i] * th - self.b[i]
      self.b[i] = self.b[i] + gain0 * delta
      self.h[i] = self.h[i] + gain1 * delta
      self.p00[i] = p00 - gain0**2 * s
      self.p01[i] = p01 - gain0 * gain1 * s
      self.p11[i] = p11 - gain1**2 * s

    rp = self.reg_weight * self.prior_prec

    def new_mean(eta):
      return [
          (eta * lam * th - b) / (h + rp + eta * lam)
          for th, b, h, lam in zip(thetas, self.b, self.h, self.precision)
      ]

    def dual(eta):
      kl = 0.5 * sum(
          float(np.sum(lam * (mu - th) ** 2))
          for mu, th, lam in zip(new_mean(eta), thetas, self.precision)
      )
      return kl - eps

    if self.eta < 0:
      lo, hi = 0.0, self.max_eta
    else:
      lo, hi = self.eta / 3, min(3 * self.eta, self.max_eta)
      self.capped_steps += 3 * self.eta > self.max_eta
    steps = 0
    while hi - lo > self.eta_tol:
      steps += 1
      mid = (lo + hi) / 2
      d = dual(mid)
      self.kl = d + eps
      if d > 0:
        lo = mid
      else:
        hi = mid
      if abs(d) < 0.1 * eps:
        self.early_stops += 1
        break
    self.eta = (lo + hi) / 2
    self.bisection_steps = steps
    mus = new_mean(self.eta)
    # The λ this step used: what arturo's state holds (it forms λ_new at the
    # start of the next step).
    self.step_precision = self.precision
    self.precision = [
        (h + rp + self.nu * lam) / (self.reg_weight + self.nu)
        for h, lam in zip(self.h, self.precision)
    ]
    self.count += 1
    return [mu - p for mu, p in zip(mus, params)]
