"""Mixed precision: bf16 params with f32 state and the reverse; trust-region
scalars stay float32 or wider; the memory table in docs/ is the measured one."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from tests import _reliability as R
from tests import state_memory

# Optimizers whose params-shaped state has no dtype option, by design: arTuRO
# keeps its Kalman filter in float32 or wider (no bfloat16 state).
NO_STATE_DTYPE_BY_DESIGN = {"arturo"}

MODES = [
    pytest.param(name, params_dtype, kwargs, id=f"{name}-{label}")
    for name in R.NAMES
    for label, params_dtype, kwargs in state_memory.modes(name)
]

SHAPES = {"w": (4, 3), "b": (3,), "scale": ()}


def _problem(params_dtype, name):
  keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(SHAPES))
  params, grads = {}, {}
  for i, (k, shape) in enumerate(SHAPES.items()):
    params[k] = jax.random.normal(keys[2 * i], shape).astype(params_dtype)
    grads[k] = jax.random.normal(keys[2 * i + 1], shape).astype(params_dtype)
  stats = None
  if R.SPECS[name].extra == "stats":
    import optax_soaa  # pylint: disable=g-import-not-at-top
    h = jnp.array([1.0, 2.0, 0.5, 0.1, 1.0])
    s = jnp.array([0.3, 1.0, 2.0])
    stats = {"w": optax_soaa.LayerStats(h, s, "kernel"),
             "b": optax_soaa.LayerStats(h, s, "bias"), "scale": None}
  return params, grads, stats


def _params_shaped(state, params):
  """State leaves shaped like a param (moments, filters), by field."""
  treedef = jax.tree.structure(params)
  out = {}
  for field in ("mu", "nu", "curvature", "b", "h", "p00", "p01", "p11",
                "precision"):
    try:
      value = optax.tree.get(state, field)
    except KeyError:
      continue
    if (value is not None and jax.tree.structure(value) == treedef and all(
        jnp.shape(v) == jnp.shape(p) for v, p in
        zip(jax.tree.leaves(value), jax.tree.leaves(params)))):
      out[field] = value
  return out


def _steps(name, tx, params, grads, stats, n=2):
  spec = R.SPECS[name]
  step = jax.jit(lambda g, s, p: R.update(
      spec, tx, g, s, p, value=jnp.float32(1.0), stats=stats))
  state = tx.init(params)
  states, updates = [state], []
  for i in range(n):
    u, state = step(jax.tree.map(lambda g: g * (i + 1), grads), state, params)
    updates.append(u)
    states.append(state)
  return updates, states


@pytest.mark.parametrize("name,params_dtype,kwargs", MODES)
def test_mode_keeps_dtypes_and_scalars_stay_wide(name, params_dtype, kwargs):
  tx = R.SPECS[name].make(**kwargs)
  params, grads, stats = _problem(params_dtype, name)
  updates, states = _steps(name, tx, params, grads, stats)
  for u in updates:
    chex.assert_trees_all_equal_dtypes(u, params)
    chex.assert_tree_all_finite(u)
  for s in states[1:]:
    chex.assert_trees_all_equal_structs(s, states[0])
    chex.assert_trees_all_equal_dtypes(s, states[0])
    chex.assert_trees_all_equal_shapes(s, states[0])
    chex.assert_tree_all_finite(s)
  for field in R.SPECS[name].trust_fields:
    dtype = optax.tree.get(states[-1], field).dtype
    assert jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32, (
        field, dtype)
  # What was asked for is what is held.
  shaped = _params_shaped(states[-1], params)
  if "mu_dtype" in kwargs:
    assert {x.dtype for x in jax.tree.leaves(shaped["mu"])} == {
        jnp.dtype(kwargs["mu_dtype"])}
  if "nu_dtype" in kwargs:
    for field in ("nu", "curvature"):
      if field in shaped:
        assert {x.dtype for x in jax.tree.leaves(shaped[field])} == {
            jnp.dtype(kwargs["nu_dtype"])}


@pytest.mark.parametrize(
    "name", [n for n in R.NAMES if n not in NO_STATE_DTYPE_BY_DESIGN])
@pytest.mark.parametrize("params_dtype,state_dtype",
                         [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16)])
def test_all_params_shaped_state_in_chosen_dtype(name, params_dtype, state_dtype):
  kwargs = state_memory.state_dtype_kwargs(name, state_dtype)
  assert kwargs is not None, f"{name} has no option for a {state_dtype} state"
  params, _, _ = _problem(params_dtype, name)
  state = R.SPECS[name].make(**kwargs).init(params)
  shaped = _params_shaped(state, params)
  assert shaped
  assert {x.dtype for x in jax.tree.leaves(shaped)} == {jnp.dtype(state_dtype)}


@pytest.mark.parametrize("name", sorted(NO_STATE_DTYPE_BY_DESIGN & set(R.NAMES)))
def test_arturo_filter_is_float32_for_bf16_params(name):
  params, _, _ = _problem(jnp.bfloat16, name)
  state = R.SPECS[name].make().init(params)
  assert {x.dtype for x in jax.tree.leaves(_params_shaped(state, params))} == {
      jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", R.CORE)
def test_bf16_params_with_wide_state_tracks_float32(name):
  """A bf16 model whose momentum is f32 steps like the f32 model, to bf16
  precision (same bf16-representable inputs).

  Compared at step 2: at step 1 SOAA's variance is zero in exact arithmetic
  (g = m̂), and its rounding residue, divided by itself in the Fisher ratio,
  decides F; a residue of bf16 rounding and one of f32 rounding differ.
  """
  kwargs = state_memory.state_dtype_kwargs(name, jnp.float32) or (
      {} if name in NO_STATE_DTYPE_BY_DESIGN else {"mu_dtype": jnp.float32})
  params16, grads16, stats = _problem(jnp.bfloat16, name)
  params32 = optax.tree.cast(params16, jnp.float32)
  grads32 = optax.tree.cast(grads16, jnp.float32)
  (_, u16), _ = _steps(name, R.SPECS[name].make(**kwargs), params16, grads16,
                       stats)
  (_, u32), _ = _steps(name, R.SPECS[name].make(), params32, grads32, stats)
  chex.assert_trees_all_close(
      optax.tree.cast(u16, jnp.float32), u32, rtol=2e-2, atol=1e-6)


def test_memory_table_in_docs_is_the_measured_one():
  assert state_memory.doc_table() == state_memory.table(), (
      "docs/reliability.md is stale: run `python -m tests.state_memory --write`")
