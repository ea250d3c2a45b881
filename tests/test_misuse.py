"""Bad input: misuse raises a clear error at trace time; non-finite numbers
are skipped where the optimizer promises it, and documented where not."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import _reliability as R

def _params():
  return {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}


def _trained_state(name, steps=3):
  """State after a few real steps, so every field is non-trivial."""
  spec = R.SPECS[name]
  tx = spec.make()
  params = R.init_params()
  params, state, _ = R.run(name, params, tx.init(params), 0, steps)
  return spec, tx, params, state


@functools.cache
def _step(name, wrap_finite=False):
  """A jitted update of `SPECS[name].make()`, compiled once per variant."""
  spec = R.SPECS[name]
  tx = spec.make()
  if wrap_finite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2)
  return tx, jax.jit(
      lambda g, s, p, v, stats: R.update(spec, tx, g, s, p, value=v, stats=stats))


# ---------------------------------------------------------------- misuse ---

MISMATCHED_GRADS = {
    "missing_leaf": lambda p: {"w": p["w"]},
    "extra_leaf": lambda p: {**p, "c": jnp.ones(2)},
    "list_instead_of_dict": lambda p: [p["b"], p["w"]],
}


@pytest.mark.parametrize("name", R.NAMES)
@pytest.mark.parametrize("case", list(MISMATCHED_GRADS))
def test_grads_structure_mismatch_raises_at_trace_time(name, case):
  spec = R.SPECS[name]
  tx = spec.make()
  params = _params()
  state = tx.init(params)
  grads = MISMATCHED_GRADS[case](params)
  f = jax.jit(lambda g, s, p: R.update(spec, tx, g, s, p, value=jnp.ones([])))
  with pytest.raises(ValueError, match="structure"):
    f(grads, state, params)


@pytest.mark.parametrize("name", R.NAMES)
def test_grads_structure_mismatch_message_names_the_arguments(name):
  spec = R.SPECS[name]
  tx = spec.make()
  params = _params()
  state = tx.init(params)
  with pytest.raises(ValueError, match="`updates` and `params"):
    jax.jit(lambda g, s, p: R.update(spec, tx, g, s, p))(
        {"w": params["w"]}, state, params)


@pytest.mark.parametrize("name", R.NAMES)
def test_grads_shape_mismatch_names_the_leaf(name):
  spec = R.SPECS[name]
  tx = spec.make()
  params = _params()
  state = tx.init(params)
  grads = {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"\['w'\].*\(2, 3\)"):
    jax.jit(lambda g, s, p: R.update(spec, tx, g, s, p))(grads, state, params)


@pytest.mark.parametrize("name", R.NAMES)
@pytest.mark.filterwarnings("ignore::optax_soaa.MissingValueWarning")
def test_missing_params_with_weight_decay_raises(name):
  spec = R.SPECS[name]
  tx = spec.make(weight_decay=0.1)
  params = _params()
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    jax.jit(lambda g, s: R.update(spec, tx, g, s, None))(params, state)


@pytest.mark.parametrize(
    "name", [n for n in R.NAMES if R.SPECS[n].needs_params])
def test_missing_params_raises_when_always_needed(name):
  spec = R.SPECS[name]
  tx = spec.make()
  params = _params()
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    jax.jit(lambda g, s: R.update(spec, tx, g, s, None))(params, state)


@pytest.mark.parametrize("name", [n for n in R.NAMES if R.SPECS[n].extra == "value"])
def test_non_scalar_value_raises(name):
  spec = R.SPECS[name]
  tx = spec.make()
  params = _params()
  state = tx.init(params)
  with pytest.raises(ValueError, match="scalar"):
    jax.jit(lambda g, s, v: tx.update(g, s, params, value=v))(
        params, state, jnp.ones(3))


# ---------------------------------------------------- non-finite values ---

BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


@pytest.mark.parametrize("name", [n for n in R.NAMES if R.SPECS[n].extra == "value"])
@pytest.mark.parametrize("bad", list(BAD))
def test_nonfinite_value_keeps_trust_region_and_is_counted(name, bad):
  spec, _, params, state = _trained_state(name)
  x, y = R.batch_at(0, 3)
  loss, grads = jax.value_and_grad(R.loss_fn)(params, x, y)
  _, jitted = _step(name)
  step = lambda g, s, p, v: jitted(g, s, p, v, None)
  updates, new_state = step(grads, state, params, jnp.float32(BAD[bad]))
  for field in spec.trust_fields:
    # Functions of the moments, not of this loss: r, and the predicted
    # reduction of the last step, formed in this update.
    if field in ("fisher_ratio", "predicted_reduction"):
      continue
    chex.assert_trees_all_equal(
        optax.tree.get(new_state, field), optax.tree.get(state, field))
  assert int(optax.tree.get(new_state, "skipped_values")) == int(
      optax.tree.get(state, "skipped_values")) + 1
  # The moments still take the (finite) gradient and the step is finite.
  assert int(optax.tree.get(new_state, "count")) == int(
      optax.tree.get(state, "count")) + 1
  chex.assert_tree_all_finite((updates, new_state))
  # The next finite loss moves the trust region again and is not counted.
  _, after = step(grads, new_state, params, loss)
  assert int(optax.tree.get(after, "skipped_values")) == int(
      optax.tree.get(new_state, "skipped_values"))
  assert float(optax.tree.get(after, "trust_ratio")) != float(
      optax.tree.get(new_state, "trust_ratio"))


# -------------------------------------------------- non-finite gradients ---

def _poison(grads, bad):
  """Grads with one non-finite element in one leaf."""
  leaves, treedef = jax.tree.flatten(grads)
  leaves[0] = leaves[0].reshape(-1).at[0].set(bad).reshape(leaves[0].shape)
  return jax.tree.unflatten(treedef, leaves)


def _grads_and_stats(name, params):
  spec = R.SPECS[name]
  x, y = R.batch_at(0, 3)
  if spec.extra == "stats":
    import optax_soaa.flax  # pylint: disable=g-import-not-at-top
    loss, grads, stats = optax_soaa.flax.value_grad_and_stats(R.loss_fn)(
        params, x, y)
  else:
    (loss, grads), stats = jax.value_and_grad(R.loss_fn)(params, x, y), None
  return loss, grads, stats


@pytest.mark.parametrize("name", R.CORE)
@pytest.mark.parametrize("bad", list(BAD))
def test_apply_if_finite_skips_nonfinite_grads_and_keeps_state(name, bad):
  tx, jitted = _step(name, wrap_finite=True)
  params = R.init_params()
  state = tx.init(params)
  loss, grads, stats = _grads_and_stats(name, params)
  step = lambda g, s, p, v: jitted(g, s, p, v, stats)
  updates, state = step(grads, state, params, loss)  # one good step first
  params = optax.apply_updates(params, updates)
  updates, new_state = step(_poison(grads, BAD[bad]), state, params, loss)
  chex.assert_trees_all_equal(updates, optax.tree.zeros_like(updates))
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.notfinite_count) == 1
  assert int(new_state.total_notfinite) == 1
  assert not bool(new_state.last_finite)
  # A finite gradient afterwards is applied again.
  updates, after = step(grads, new_state, params, loss)
  assert int(after.notfinite_count) == 0
  assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", [n for n in R.CORE if R.SPECS[n].extra == "value"])
def test_apply_if_finite_passes_value_through(name):
  """apply_if_finite checks only the gradients; a bad loss still reaches the
  optimizer, which skips it itself."""
  tx, jitted = _step(name, wrap_finite=True)
  params = R.init_params()
  state = tx.init(params)
  _, grads, _ = _grads_and_stats(name, params)
  _, state = jitted(grads, state, params, jnp.float32(jnp.nan), None)
  assert int(state.notfinite_count) == 0
  assert int(optax.tree.get(state.inner_state, "skipped_values")) == 1


# What happens WITHOUT apply_if_finite (documented in docs/reliability.md):
# the non-finite gradient enters the moments. For the optimizers listed here
# a global sum (SOAA's Fisher ratio, arTuRO's KL) turns EVERY leaf's update
# non-finite; for the others only the poisoned leaf's.
GLOBAL_POISON = {"soaa", "soaa_variance"}


@pytest.mark.parametrize("name", R.CORE)
def test_without_apply_if_finite_nonfinite_grads_poison_the_state(name):
  tx, jitted = _step(name)
  params = R.init_params()
  state = tx.init(params)
  loss, grads, stats = _grads_and_stats(name, params)
  step = lambda g, s, p: jitted(g, s, p, loss, stats)
  updates, state = step(_poison(grads, np.nan), state, params)
  first = jax.tree.leaves(updates)[0]
  assert not bool(jnp.all(jnp.isfinite(first)))
  finite_leaves = [bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)]
  if name in GLOBAL_POISON:
    assert not any(finite_leaves)
  else:
    assert all(finite_leaves[1:])
  # The state keeps the NaN: later finite gradients do not recover it.
  updates, state = step(grads, state, params)
  assert not bool(jnp.all(jnp.isfinite(jax.tree.leaves(updates)[0])))


# ------------------------------------------------- AdaFisher statistics ---

ADAFISHER = [n for n in R.NAMES if R.SPECS[n].extra == "stats"]


def _real_stats():
  import optax_soaa.flax  # pylint: disable=g-import-not-at-top
  params = R.init_params()
  x, y = R.batch_at(0, 0)
  _, grads, stats = optax_soaa.flax.value_grad_and_stats(R.loss_fn)(params, x, y)
  return params, grads, stats


@pytest.mark.parametrize("name", ADAFISHER)
@pytest.mark.parametrize("field,size", [("h", 3), ("s", 5)])
def test_adafisher_stats_of_wrong_shape_raise(name, field, size):
  import optax_soaa  # pylint: disable=g-import-not-at-top

  spec = R.SPECS[name]
  tx = spec.make()
  params, grads, stats = _real_stats()
  kernel = stats["Dense_0"]["kernel"]  # kernel (4, 8): h has 4 or 5, s has 8
  assert isinstance(kernel, optax_soaa.LayerStats)
  bad = optax_soaa.LayerStats(
      **{**{"h": kernel.h, "s": kernel.s}, field: jnp.ones(size)},
      part=kernel.part)
  stats = {**stats, "Dense_0": {**stats["Dense_0"], "kernel": bad}}
  with pytest.raises(ValueError, match=r"\['Dense_0'\]\['kernel'\].*entries"):
    jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))(
        grads, tx.init(params), params, stats)


@pytest.mark.parametrize("name", ADAFISHER)
def test_adafisher_stats_structure_mismatch_raises(name):
  spec = R.SPECS[name]
  tx = spec.make()
  params, grads, stats = _real_stats()
  stats = {"Dense_0": stats["Dense_0"]}
  with pytest.raises(ValueError, match="`stats` must be a pytree"):
    jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))(
        grads, tx.init(params), params, stats)
