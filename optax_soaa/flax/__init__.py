"""Flax glue for optax_soaa (imports Flax; the core package does not).

* :class:`TrainState`: a drop-in subclass of
  :class:`flax.training.train_state.TrainState` whose ``apply_gradients``
  forwards ``value=`` and other extra arguments to ``tx.update``.
* :func:`value_grad_and_stats` (Linen or any params pytree) and
  :func:`nnx_value_grad_and_stats` (NNX modules): AdaFisher's statistics with
  the ``(value, grads, stats)`` return, thin wrappers of the core
  :func:`optax_soaa.value_grad_and_stats`.
"""

from optax_soaa.flax._adafisher_stats import nnx_value_grad_and_stats
from optax_soaa.flax._adafisher_stats import value_grad_and_stats
from optax_soaa.flax._train_state import TrainState

__all__ = (
    "nnx_value_grad_and_stats",
    "TrainState",
    "value_grad_and_stats",
)
