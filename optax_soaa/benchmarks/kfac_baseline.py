"""K-FAC (google-deepmind/kfac-jax) as an optional baseline of the benchmark.

kfac-jax is not an optax transformation: it owns the train step
(``kfac_jax.Optimizer.step`` computes the loss, gradients and curvature and
compiles itself), finds the layers by tracing the loss, and needs the loss
registered (``kfac_jax.register_softmax_cross_entropy_loss``). The benchmark
drives it through that API on the same tasks, initial params and batches as
the other optimizers. Install it with the ``kfac`` extra
(``pip install 'optax-soaa[kfac]'``); without it, or when the installed
release cannot run on the installed JAX, the benchmark lists it as
unavailable with the reason. kfac-jax 0.0.8, the latest release on PyPI,
cannot trace on JAX >= 0.9.2; its GitHub main can (``pip install 'kfac-jax @
git+https://github.com/google-deepmind/kfac-jax'``), and the results record
which kfac-jax ran (version and git commit).

Settings (kfac-jax's examples of *stochastic* training, where its authors
advise against adaptive learning rate and momentum): the learning rate is
given every step (the swept value times the task's step schedule), momentum
fixed at 0.9, damping adapted by the Levenberg-Marquardt rule (initial 1e-3,
within [1e-6, 1e3]), and the library's defaults otherwise (curvature EMA
0.95, inverses refreshed every 5 steps, damping adapted every 5 steps). Its
curvature burn-in (5 steps that update only the curvature estimate) reads the
run's first 5 batches (repeated when a run has fewer); every parameter update
then sees the same batch as the other optimizers' same step.
"""

import functools
import importlib
import itertools
from typing import Any, Callable, Dict, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

MODULE = "kfac_jax"
# kfac-jax 0.0.8, its latest release, fails inside its layer matcher on JAX
# >= 0.9.2; its GitHub main has the fix (google-deepmind/kfac-jax 222c299).
FIX = ("its GitHub main runs on current JAX: pip install"
       " 'kfac-jax @ git+https://github.com/google-deepmind/kfac-jax'")
PIP_NAME = "kfac-jax"
SETTINGS = dict(
    momentum=0.9,
    initial_damping=1e-3,
    min_damping=1e-6,
    max_damping=1e3,
    num_burnin_steps=5,
)


def _import():
  return importlib.import_module(MODULE)


def make_optimizer(loss_parts: Callable[..., Any], tokens_per_example: int,
                   **overrides):
  """A ``kfac_jax.Optimizer`` for ``loss_parts(params, batch, rng) -> (logits, targets)``.

  The registered loss is the mean softmax cross-entropy over every target
  (kfac-jax reads a registered loss as ``weight * sum / batch size``, so a
  sequence model's tokens get weight ``1 / tokens_per_example``).
  """
  kfac_jax = _import()
  settings = {**SETTINGS, **overrides}

  def loss(params, rng, batch):
    logits, targets = loss_parts(params, batch, rng)
    kfac_jax.register_softmax_cross_entropy_loss(
        logits, targets, weight=1.0 / tokens_per_example)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  return kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss),
      l2_reg=0.0,
      value_func_has_rng=True,
      use_adaptive_learning_rate=False,
      use_adaptive_momentum=False,
      use_adaptive_damping=True,
      initial_damping=settings["initial_damping"],
      min_damping=settings["min_damping"],
      max_damping=settings["max_damping"],
      num_burnin_steps=settings["num_burnin_steps"],
      multi_device=False,
  ), settings


class Member:
  """One K-FAC training run: params, optimizer state and its step counter."""

  def __init__(self, optimizer, settings: Dict[str, Any], params, key,
               burnin_batches: Iterable[Any]):
    self._opt = optimizer
    self._momentum = jnp.asarray(settings["momentum"], jnp.float32)
    # kfac-jax's burn-in reads exactly num_burnin_steps batches: a run with
    # fewer batches than that repeats them.
    first = list(itertools.islice(burnin_batches,
                                  settings["num_burnin_steps"]))
    self._burnin = list(itertools.islice(itertools.cycle(first),
                                         settings["num_burnin_steps"]))
    self.params = params
    self.state = optimizer.init(params, key, self._burnin[0])
    self.count = 0

  def step(self, batch, learning_rate, key):
    """One update on `batch`; returns (loss, damping) as device scalars."""
    kwargs = dict(learning_rate=jnp.asarray(learning_rate, jnp.float32),
                  momentum=self._momentum, global_step_int=self.count)
    if self.count == 0 and self._burnin:
      data = dict(data_iterator=iter(self._burnin + [batch]))
    else:
      data = dict(batch=batch)
    self.params, self.state, stats = self._opt.step(
        self.params, self.state, key, **data, **kwargs)
    self.count += 1
    return stats["loss"], stats["damping"]


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
  """None when kfac-jax is installed and runs here, else why not.

  Runs two steps of a tiny model: a release may import under a JAX it
  cannot trace (kfac-jax 0.0.8 fails inside its layer matcher on JAX >=
  0.9.2), and the benchmark should say so instead of failing per task.
  """
  try:
    kfac_jax = _import()
  except ImportError as e:
    return (f"{PIP_NAME} is not installed (the `kfac` extra;"
            f" {FIX}): {e}")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 2, 8), jnp.int32)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "b": jnp.zeros(2, jnp.float32)}

  def parts(p, batch, rng):
    del rng
    return batch[0] @ p["w"] + p["b"], batch[1]

  try:
    opt, settings = make_optimizer(parts, 1, num_burnin_steps=1)
    member = Member(opt, settings, params, jax.random.key(0), [(x, y)])
    for i in range(2):
      loss, _ = member.step((x, y), 1e-2, jax.random.key(i + 1))
    if not np.isfinite(float(loss)):
      return f"{PIP_NAME} {kfac_jax.__version__}: non-finite loss on a probe"
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).splitlines()[0] if str(e) else ""
    return (f"{PIP_NAME} {getattr(kfac_jax, '__version__', '?')} cannot run"
            f" with jax {jax.__version__}: {type(e).__name__}: {first} ({FIX})")
  return None
