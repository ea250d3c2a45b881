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

Settings: those of kfac-jax's own example of stochastic training without
normalisation layers (``examples/lrelunet101_imagenet/pipeline.py``, the TAT
ResNet): momentum fixed at 0.9, damping fixed at 1e-3, the step along the
preconditioned gradient ``u`` (K-FAC's damped inverse curvature times the
gradient ``g``) shortened where ``lr² gᵀu``, its squared norm under the
curvature it inverts, exceeds 1e-3,
curvature EMA 0.99, inverses refreshed every 50 steps; the learning rate is
given every step (the swept value times the task's step schedule), as its
authors advise against adaptive learning rate and momentum for stochastic
training. Until 5bc6e25 the benchmark ran its own choice instead: kfac-jax's
Levenberg-Marquardt damping adaptation (every 5 steps, decay 0.9, from 1e-3
within [1e-6, 1e3]) with the library's defaults otherwise (curvature EMA
0.95, inverses every 5 steps, no norm constraint), settings kfac-jax's
examples use for full-batch training (its examples/README.md calls damping
adaptation "of questionable effectiveness in the stochastic setting"). On
the fmnist-cnn task the damping fell to its floor (1e-6) within six epochs
and the training loss rose at a constant learning rate. ``adaptive_damping`` in
``SETTINGS`` (a task's ``hp["kfac"]``) restores kfac-jax's adaptation with
the given arguments. Its curvature burn-in (5 steps that update only the
curvature estimate) reads the run's first 5 batches (repeated when a run has
fewer); every parameter update then sees the same batch as the other
optimizers' same step. Each step records the damping and ``norm_scale``,
the factor by which the norm constraint shortened it.

One change of how, not what, it computes on the CPU: kfac-jax's convolution
blocks get the patches' second moment from ``kfac_jax.patches_moments``, a
memory-saving formulation (a convolution whose kernel is the batch of images)
that XLA:CPU runs very slowly: on the fmnist-cnn task's second convolution (a
255 x 13 x 13 x 32 input) it takes seconds a step, and a K-FAC step of that CNN
took 6.8 s against Adam's 0.16 s. On the CPU backend the benchmark therefore
gives kfac-jax, through its ``layer_tag_to_block_ctor`` option, a subclass of
``kfac_jax.Conv2DTwoKroneckerFactored`` that computes the same input factor
from explicitly extracted patches (``jax.lax.conv_general_dilated_patches``
and one matrix product; a test checks it equals kfac-jax's own to float32
rounding). Everything else is kfac-jax's. On GPU/TPU, or for convolutions with
dilation or feature groups, kfac-jax's own block runs unchanged. The results
record which ran (``conv_input_stats`` in the K-FAC settings).
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
# kfac-jax's own example of stochastic training without normalisation layers
# (examples/lrelunet101_imagenet/pipeline.py at google-deepmind/kfac-jax
# babd853): fixed damping, a norm constraint on the step, a slow curvature
# average and rare inverses.
SETTINGS = dict(
    momentum=0.9,
    damping=1e-3,
    # None: fixed damping; a dict: kfac-jax's Levenberg-Marquardt adaptation
    # with these arguments (initial_damping, min_damping, ...).
    adaptive_damping=None,
    norm_constraint=1e-3,
    curvature_ema=0.99,
    num_burnin_steps=5,
    # The benchmark's step timing spans whole periods of it.
    inverse_update_period=50,
)


def import_kfac_jax():
  """kfac_jax itself (ImportError when it is not installed)."""
  return _import()


def _import():
  return importlib.import_module(MODULE)


def _explicit_patches_conv_block(kfac_jax):
  """kfac-jax's Conv2D Kronecker block, input factor from explicit patches."""
  parent = kfac_jax.Conv2DTwoKroneckerFactored

  class ExplicitPatchesConv2D(parent):
    """Same factors as the parent; the patch moments by one matrix product."""

    def compute_inputs_stats(self, inputs, weighting_array=None):
      params = self._layer_tag_eq.params  # pylint: disable=protected-access
      undilated = all(params.get(k) in (None, 1, (1, 1))
                      for k in ("lhs_dilation", "rhs_dilation"))
      if (weighting_array is not None or not undilated
          or params.get("feature_group_count", 1) != 1
          or params.get("batch_group_count", 1) != 1):
        return super().compute_inputs_stats(inputs, weighting_array)
      dn = params["dimension_numbers"]
      # (N, C * kh * kw, H', W'), the features ordered (C, kh, kw) with the
      # window dims in the kernel's spatial order (weights_spatial_shape).
      patches = jax.lax.conv_general_dilated_patches(
          inputs, self.weights_spatial_shape, params["window_strides"],
          params["padding"],
          dimension_numbers=jax.lax.ConvDimensionNumbers(
              dn.lhs_spec, (0, 1, 2, 3), (0, 1, 2, 3)),
          precision=params.get("precision"))
      channels = inputs.shape[dn.lhs_spec[1]]
      # The parent's layout: kernel window first, then the input channel.
      patches = patches.reshape(
          (patches.shape[0], channels, *self.weights_spatial_shape, -1))
      patches = jnp.transpose(patches, (0, 4, 2, 3, 1)).reshape(
          -1, channels * self.weights_spatial_size)
      normalizer = inputs.shape[0] * self.num_locations
      second = (patches.T @ patches) / normalizer
      if self.number_of_parameters == 1:
        return second
      first = jnp.sum(patches, axis=0) / normalizer
      first = jnp.concatenate([first, jnp.ones([1], first.dtype)])
      top = jnp.concatenate([second, first[None, :-1]], axis=0)
      return jnp.concatenate([top, first[:, None]], axis=1)

  return ExplicitPatchesConv2D


def conv_input_stats() -> str:
  """Which input factor of kfac-jax's Conv2D blocks the benchmark uses here."""
  return "explicit-patches" if jax.default_backend() == "cpu" else "kfac-jax"


def effective_settings(overrides: Optional[Dict[str, Any]] = None
                       ) -> Dict[str, Any]:
  """SETTINGS with a task's overrides, and which conv input factor runs."""
  settings = {**SETTINGS, **(overrides or {})}
  settings.setdefault("conv_input_stats", conv_input_stats())
  return settings


def make_optimizer(loss_parts: Callable[..., Any], tokens_per_example: int,
                   **overrides):
  """A ``kfac_jax.Optimizer`` for ``loss_parts(params, batch, rng) -> (logits, targets)``.

  The registered loss is the mean softmax cross-entropy over every target
  (kfac-jax reads a registered loss as ``weight * sum / batch size``, so a
  sequence model's tokens get weight ``1 / tokens_per_example``).
  """
  kfac_jax = _import()
  settings = effective_settings(overrides)
  block_ctors = {}
  if settings["conv_input_stats"] == "explicit-patches":
    block_ctors["conv2d"] = _explicit_patches_conv_block(kfac_jax)

  def loss(params, rng, batch):
    logits, targets = loss_parts(params, batch, rng)
    kfac_jax.register_softmax_cross_entropy_loss(
        logits, targets, weight=1.0 / tokens_per_example)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  adaptive = settings["adaptive_damping"]
  return kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss),
      l2_reg=0.0,
      value_func_has_rng=True,
      use_adaptive_learning_rate=False,
      use_adaptive_momentum=False,
      use_adaptive_damping=adaptive is not None,
      **({"initial_damping": settings["damping"], **adaptive}
         if adaptive is not None else {}),
      norm_constraint=settings["norm_constraint"],
      curvature_ema=settings["curvature_ema"],
      num_burnin_steps=settings["num_burnin_steps"],
      inverse_update_period=settings["inverse_update_period"],
      multi_device=False,
      **({"layer_tag_to_block_ctor": block_ctors} if block_ctors else {}),
  ), settings


class Member:
  """One K-FAC training run: params, optimizer state and its step counter."""

  def __init__(self, optimizer, settings: Dict[str, Any], params, key,
               burnin_batches: Iterable[Any]):
    self._opt = optimizer
    self._momentum = jnp.asarray(settings["momentum"], jnp.float32)
    # Fixed damping is an argument of every step; adapted, kfac-jax's own.
    self._norm = settings["norm_constraint"]
    self._damping = (None if settings["adaptive_damping"] is not None
                     else jnp.asarray(settings["damping"], jnp.float32))
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
    """One update on `batch`: (loss, diagnostics), device scalars.

    The diagnostics: the damping, and ``norm_scale``, the factor by which
    the norm constraint shortened the step (1 where it did not; kfac-jax
    scales the preconditioned gradient u so that lr² gᵀu stays
    within the constraint, before adding the momentum term).
    """
    kwargs = dict(learning_rate=jnp.asarray(learning_rate, jnp.float32),
                  momentum=self._momentum, global_step_int=self.count)
    if self._damping is not None:
      kwargs["damping"] = self._damping
    if self.count == 0 and self._burnin:
      data = dict(data_iterator=iter(self._burnin + [batch]))
    else:
      data = dict(batch=batch)
    self.params, self.state, stats = self._opt.step(
        self.params, self.state, key, **data, **kwargs)
    self.count += 1
    sq = stats.get("scaled_grad_norm_sq")
    scale = (jnp.ones([], jnp.float32) if sq is None or self._norm is None
             else jnp.minimum(1.0, jnp.sqrt(self._norm / sq)))
    return stats["loss"], {"damping": stats["damping"], "norm_scale": scale}


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
