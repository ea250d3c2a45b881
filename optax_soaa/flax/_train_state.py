"""A Flax Linen TrainState that forwards extra arguments to ``tx.update``."""

from typing import Any

import optax
from flax.training import train_state

_OVERWRITE_WITH_GRADIENT = train_state.OVERWRITE_WITH_GRADIENT


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` that forwards ``value=``.

  Flax's own ``apply_gradients(grads=..., **kwargs)`` treats every keyword
  argument as a dataclass field to replace, so the loss cannot reach an
  optimizer that needs it. Here the keyword arguments that are not fields of
  the state (``value``, ``stats``, ...) go to ``tx.update``; names of fields
  still replace those fields, as in Flax.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax_soaa.flax
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
    >>> state = optax_soaa.flax.TrainState.create(
    ...     apply_fn=model.apply,
    ...     params=model.init(jax.random.key(0), x)["params"],
    ...     tx=optax_soaa.soaa(1e-2, total_steps=100))
    >>> @jax.jit
    ... def step(state):
    ...   def loss_fn(params):
    ...     return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
    ...   loss, grads = jax.value_and_grad(loss_fn)(state.params)
    ...   return state.apply_gradients(grads=grads, value=loss), loss
    >>> for _ in range(3):
    ...   state, loss = step(state)
    >>> int(state.step)
    3
  """

  def apply_gradients(self, *, grads: Any, **kwargs: Any) -> "TrainState":
    field_names = set(self.__dataclass_fields__)
    replace = {k: v for k, v in kwargs.items() if k in field_names}
    extra_args = {k: v for k, v in kwargs.items() if k not in field_names}
    overwrite = _OVERWRITE_WITH_GRADIENT in grads
    grads_with_opt = grads["params"] if overwrite else grads
    params_with_opt = self.params["params"] if overwrite else self.params
    updates, new_opt_state = self.tx.update(
        grads_with_opt, self.opt_state, params_with_opt, **extra_args
    )
    new_params = optax.apply_updates(params_with_opt, updates)
    if overwrite:
      new_params = {
          "params": new_params,
          _OVERWRITE_WITH_GRADIENT: grads[_OVERWRITE_WITH_GRADIENT],
      }
    return self.replace(
        step=self.step + 1,
        params=new_params,
        opt_state=new_opt_state,
        **replace,
    )
