"""Flax glue for optax_soaa (imports Flax; the core package does not).

* :class:`TrainState`: a drop-in subclass of
  :class:`flax.training.train_state.TrainState` whose ``apply_gradients``
  forwards ``value=`` and other extra arguments to ``tx.update``.
"""

from optax_soaa.flax._train_state import TrainState

__all__ = ("TrainState",)
