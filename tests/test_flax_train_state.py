"""optax_soaa.flax.TrainState forwards `value=` to tx.update in a Linen loop."""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax.training import train_state as flax_train_state

import optax_soaa
import optax_soaa.flax


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3)(x)


def _data():
  x = jax.random.normal(jax.random.key(0), (32, 5))
  y = jnp.argmax(x[:, :3], axis=-1)
  return x, y


def _loss(params, apply_fn, x, y):
  logits = apply_fn({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_value_reaches_the_optimizer_in_a_jitted_linen_loop():
  model = _MLP()
  x, y = _data()
  params = model.init(jax.random.key(1), x)["params"]
  state = optax_soaa.flax.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=optax_soaa.soaa(1e-2, total_steps=50))

  @jax.jit
  def step(state):
    loss, grads = jax.value_and_grad(_loss)(state.params, state.apply_fn, x, y)
    return state.apply_gradients(grads=grads, value=loss), loss

  losses = []
  for _ in range(30):
    state, loss = step(state)
    losses.append(float(loss))
  assert int(state.step) == 30
  # The loss reached SOAA: its loss average and predicted reduction moved.
  assert float(optax.tree.get(state.opt_state, "loss_avg")) > 0
  assert float(optax.tree.get(state.opt_state, "predicted_reduction")) != 0
  dt = float(optax.tree.get(state.opt_state, "dt"))
  assert dt != 1.0 and 0.5 < dt <= 2.0
  assert losses[-1] < 0.7 * losses[0]


def test_matches_manual_update_and_replaces_fields():
  model = _MLP()
  x, y = _data()
  params = model.init(jax.random.key(1), x)["params"]
  tx = optax_soaa.soaa(1e-2, total_steps=10)

  class StateWithStats(optax_soaa.flax.TrainState):
    batch_stats: Any = None

  state = StateWithStats.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats={"mean": 0.0})
  loss, grads = jax.value_and_grad(_loss)(params, model.apply, x, y)
  new_state = state.apply_gradients(
      grads=grads, value=loss, batch_stats={"mean": 1.0})
  updates, opt_state = tx.update(grads, tx.init(params), params, value=loss)
  chex.assert_trees_all_close(new_state.params,
                              optax.apply_updates(params, updates))
  chex.assert_trees_all_close(new_state.opt_state, opt_state)
  assert int(new_state.step) == 1
  assert new_state.batch_stats == {"mean": 1.0}  # a field is still replaced


@pytest.mark.filterwarnings("ignore::optax_soaa.MissingValueWarning")
def test_flax_own_train_state_cannot_forward_value():
  """Why the subclass exists: Flax treats `value` as a field to replace."""
  model = _MLP()
  x, y = _data()
  params = model.init(jax.random.key(1), x)["params"]
  state = flax_train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=optax_soaa.soaa(1e-2, total_steps=10))
  grads = jax.grad(_loss)(params, model.apply, x, y)
  with pytest.raises((TypeError, ValueError)):
    state.apply_gradients(grads=grads, value=jnp.float32(1.0))
