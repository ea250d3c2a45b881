"""AdaFisher property tests over random pytrees, with statistics (hypothesis).

The library-wide property tests call every optimizer without extra
arguments, which for AdaFisher exercises only the fallback. Here every leaf
of rank >= 1 gets a LayerStats (random, positive, the default layout; biases
for the vectors, kernels with and without the bias entry otherwise) and the
updates go through the Fisher path: two steps keep the state's structure,
shapes and dtypes, the updates keep each param's dtype, jit equals eager, a
zero gradient from the initial state gives a zero update, and the step is
``m̂ / F̃`` with ``F̃`` built from the statistics.
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

import optax_soaa
from optax_soaa import LayerStats
from tests.test_properties import DTYPES
from tests.test_properties import SETTINGS
from tests.test_properties import SHAPES


@dataclasses.dataclass(frozen=True)
class Leaf:
  shape: tuple[int, ...]
  dtype: object
  bias_entry: bool


leaf_specs = st.builds(Leaf, st.sampled_from(SHAPES), st.sampled_from(DTYPES), st.booleans())
trees = st.recursive(
    leaf_specs,
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from("abcd"), children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple)),
    max_leaves=5)
EVERY_KIND = {"a": (Leaf((), jnp.float32, False), Leaf((0,), jnp.bfloat16, True)),
              "b": {"c": Leaf((2, 3), jnp.bfloat16, True), "d": Leaf((0, 2), jnp.float32, False)},
              "e": Leaf((3,), jnp.float32, True)}


def _is_leaf(x):
  return isinstance(x, Leaf)


def materialise(spec_tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                      spec_tree, is_leaf=_is_leaf)


def statistics(spec_tree, seed):
  """A LayerStats per leaf of rank >= 1: a bias for vectors, else a kernel."""
  rng = np.random.default_rng(seed)

  def one(x):
    if not x.shape:
      return None
    fan_in, fan_out = int(np.prod(x.shape[:-1])), x.shape[-1]
    part = "bias" if len(x.shape) == 1 else "kernel"
    n_h = 1 if part == "bias" else fan_in + int(x.bias_entry)
    return LayerStats(jnp.asarray(rng.uniform(0.1, 3.0, n_h), jnp.float32),
                      jnp.asarray(rng.uniform(1e-3, 2.0, fan_out), jnp.float32), part)

  return jax.tree.map(one, spec_tree, is_leaf=_is_leaf)


def two_steps(update, tx, params, g1, g2, stats):
  s0 = tx.init(params)
  u1, s1 = update(g1, s0, params, stats)
  u2, s2 = update(g2, s1, params, stats)
  return s0, (u1, s1), (u2, s2)


@pytest.mark.parametrize("fallback", ["identity", "adam"])
@SETTINGS
@hypothesis.given(spec_tree=trees, seed=st.integers(0, 2**16))
@hypothesis.example(spec_tree=EVERY_KIND, seed=0)
def test_with_statistics_structure_dtypes_jit_and_zero_gradient(fallback, spec_tree, seed):
  params = materialise(spec_tree, seed)
  g1, g2 = materialise(spec_tree, seed + 1), materialise(spec_tree, seed + 2)
  stats = statistics(spec_tree, seed + 3)
  tx = optax_soaa.adafisher(1e-2, stats_every=2, fallback=fallback)
  update = lambda g, s, p, st: tx.update(g, s, p, stats=st)
  eager = two_steps(update, tx, params, g1, g2, stats)
  jitted = two_steps(jax.jit(update), tx, params, g1, g2, stats)
  state0 = eager[0]
  for u, state in eager[1:]:
    assert jax.tree.structure(u) == jax.tree.structure(params)
    chex.assert_trees_all_equal_dtypes(u, params)
    chex.assert_trees_all_equal_shapes(u, params)
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
  mixed = any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  tol = 3e-2 if mixed else 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * 1e-2),
               jitted, eager)
  zeros = optax.tree.zeros_like(params)
  u0, _ = tx.update(zeros, tx.init(params), params, stats=stats)
  chex.assert_trees_all_equal(u0, zeros)

  # The first step of a leaf with statistics is -α g / F̃ (m̂ = g at t = 1).
  u1 = eager[1][0]
  for g, u, st_leaf in zip(jax.tree.leaves(g1), jax.tree.leaves(u1),
                           jax.tree.leaves(stats, is_leaf=lambda x: x is None or isinstance(x, LayerStats))):
    if st_leaf is None or g.size == 0:
      continue
    minmax = lambda x: (x - x.min()) / (x.max() - x.min() + 1e-6)
    h = 0.08 + 0.008 * minmax(np.asarray(st_leaf.h, np.float64))
    s = 0.08 + 0.008 * minmax(np.asarray(st_leaf.s, np.float64))
    h = h[-1:] if st_leaf.part == "bias" else h[: int(np.prod(g.shape[:-1]))]
    fisher = (np.outer(h, s) + 1e-3).reshape(g.shape)
    want = -1e-2 * np.asarray(g, np.float64) / fisher
    # bfloat16 params: m, m̂, F̃, m̂ / F̃ and α m̂ / F̃ are each rounded to
    # bfloat16 (unit round-off 2^-8 = 0.4 %): up to 2 % together (1.15 % seen).
    np.testing.assert_allclose(np.asarray(u, np.float32), want,
                               rtol=2e-2 if g.dtype == jnp.bfloat16 else 1e-5, atol=1e-6)
