"""Determinism: the same seed gives the same trajectory, bit for bit."""

import chex
import jax
import numpy as np
import pytest

from tests import _reliability as R

STEPS = 4


def _trajectory(name, seed, fresh=False):
  """Params, state and losses after STEPS steps from init(seed) on the data
  of `seed`. `fresh`: a newly built optimizer and a newly compiled step (no
  Python object of the first run is reused)."""
  spec = R.SPECS[name]
  tx = spec.make()
  params = R.init_params(seed)
  state = tx.init(params)
  params, state, losses = R.run(name, params, state, 0, STEPS, seed=seed,
                                tx=tx if fresh else None)
  return params, state, np.asarray(losses)


@pytest.mark.parametrize("name", R.CORE)
def test_same_seed_same_trajectory(name):
  first = _trajectory(name, seed=0)
  again = _trajectory(name, seed=0)
  rebuilt = _trajectory(name, seed=0, fresh=True)
  chex.assert_trees_all_equal(first, again)
  chex.assert_trees_all_equal(first, rebuilt)
  chex.assert_tree_all_finite(first)


@pytest.mark.parametrize("name", R.CORE)
def test_other_seed_other_trajectory(name):
  """The comparison above can fail: another seed moves elsewhere."""
  a_params, _, a_losses = _trajectory(name, seed=0)
  b_params, _, b_losses = _trajectory(name, seed=1)
  assert not np.array_equal(a_losses, b_losses)
  assert any(not np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(a_params), jax.tree.leaves(b_params)))
