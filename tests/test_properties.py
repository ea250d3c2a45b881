"""Property tests over random pytrees (hypothesis).

Trees: nested dicts and tuples of float32/bfloat16 leaves, scalars and 0-size
leaves included. For every optimizer: two steps keep the tree structure of
the state and of the updates, the updates keep each param's dtype, the jitted
steps equal the eager ones, and (SOAA, AdaFisher) a zero gradient from the
initial state gives a zero update. Each new tree compiles, so the example
counts are small and the examples derandomised (the same trees on every run).
"""

import dataclasses

import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import _reliability as R

SETTINGS = hypothesis.settings(
    max_examples=10, deadline=None, derandomize=True, database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)

SHAPES = [(), (0,), (1,), (3,), (2, 3), (0, 2), (2, 1, 2)]
DTYPES = [jnp.float32, jnp.bfloat16]



@dataclasses.dataclass(frozen=True)
class Leaf:
  """A leaf to be drawn (a pytree leaf itself: not a registered node)."""
  shape: tuple[int, ...]
  dtype: object


leaf_specs = st.builds(Leaf, st.sampled_from(SHAPES), st.sampled_from(DTYPES))
trees = st.recursive(
    leaf_specs,
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from("abcd"), children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple),
    ),
    max_leaves=5,
)

# Always tried: a scalar, 0-size leaves, both dtypes, dicts in tuples.
EVERY_KIND = {"a": (Leaf((), jnp.float32), Leaf((0,), jnp.bfloat16)),
              "b": {"c": Leaf((2, 3), jnp.bfloat16), "d": Leaf((0, 2), jnp.float32)}}


def materialise(spec_tree, seed, scale=1.0):
  specs, treedef = jax.tree.flatten(spec_tree)
  rng = np.random.default_rng(seed)
  leaves = [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)
            for x in specs]
  return jax.tree.unflatten(treedef, leaves)


# One representative per algorithm: every example compiles anew.
PROPERTY_NAMES = list(R.CORE)


def two_steps(update_fn, tx, params, g1, g2):
  state0 = tx.init(params)
  u1, state1 = update_fn(g1, state0, params, jnp.float32(1.5))
  u2, state2 = update_fn(g2, state1, params, jnp.float32(1.2))
  return state0, (u1, state1), (u2, state2)


def _close(a, b, mixed):
  """jit vs eager. All-f32 trees: to a few f32 ulps. Trees with bf16 leaves:
  to bf16 precision everywhere, since XLA keeps fused bf16 arithmetic in f32
  and the global sums (SOAA's Fisher ratio, arTuRO's KL) carry that into
  every leaf."""
  tol = 3e-2 if mixed else 1e-4
  def leaf(x, y):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=tol, atol=tol * 1e-2)
  jax.tree.map(leaf, a, b)


@pytest.mark.parametrize("name", PROPERTY_NAMES)
@SETTINGS
@hypothesis.given(spec_tree=trees, seed=st.integers(0, 2**16))
@hypothesis.example(spec_tree=EVERY_KIND, seed=0)
def test_structure_dtypes_and_jit_equals_eager(name, spec_tree, seed):
  params = materialise(spec_tree, seed)
  g1 = materialise(spec_tree, seed + 1)
  g2 = materialise(spec_tree, seed + 2)
  spec = R.SPECS[name]
  tx = spec.make()
  update_fn = lambda g, s, p, v: R.update(spec, tx, g, s, p, value=v)
  eager = two_steps(update_fn, tx, params, g1, g2)
  jitted = two_steps(jax.jit(update_fn), tx, params, g1, g2)
  state0 = eager[0]
  for u, state in eager[1:]:
    # Structure of the updates is the params'; of the state, the initial one's.
    assert jax.tree.structure(u) == jax.tree.structure(params)
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    chex.assert_trees_all_equal_dtypes(u, params)
    chex.assert_trees_all_equal_shapes(u, params)
    chex.assert_trees_all_equal_dtypes(state, state0)
    chex.assert_trees_all_equal_shapes(state, state0)
  assert jax.tree.structure(jitted) == jax.tree.structure(eager)
  chex.assert_trees_all_equal_dtypes(jitted, eager)
  mixed = any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  _close(jitted, eager, mixed)


ZERO_NAMES = [n for n in R.NAMES if R.SPECS[n].zero_grad_zero_update]


@pytest.mark.parametrize("name", ZERO_NAMES)
@SETTINGS
@hypothesis.given(spec_tree=trees, seed=st.integers(0, 2**16))
@hypothesis.example(spec_tree=EVERY_KIND, seed=0)
def test_zero_gradient_from_initial_state_is_zero_update(name, spec_tree, seed):
  params = materialise(spec_tree, seed)
  zeros = optax.tree.zeros_like(params)
  spec = R.SPECS[name]
  tx = spec.make()  # weight_decay = 0
  updates, _ = R.update(spec, tx, zeros, tx.init(params), params,
                        value=jnp.float32(2.0))
  chex.assert_trees_all_equal(updates, zeros)
