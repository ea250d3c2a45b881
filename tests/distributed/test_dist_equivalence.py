"""pmap, sharded jit and shard_map each reproduce the single-device run.

Run on 8 simulated CPU devices (see tests/test_distributed.py). Every run
trains the harness's MLP for harness.STEPS steps on the same global batches.

Tolerance: float32 runs that differ only in the order of their reductions
(the batch mean split over devices, the optimizers' global sums split over
shards) agree to a few ulps per step; the trust-region feedback (SOAA's dt
through a ratio of loss differences, arTuRO's eta) can amplify such
differences. The largest deviation of any leaf relative to that leaf's largest
magnitude after 20 steps, as printed by running this file as a script (see
the end), is of order 1e-7 to 1e-6 (a few to ten float32 ulps); the tests
allow TOL = 1e-5. Integer leaves (step counts, bisection steps) must match
exactly: a discrete decision that flipped would show there first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dist_harness as harness
import optax_soaa

P = jax.sharding.PartitionSpec
CASES = harness.CASES
TOL = harness.TOL
assert_trees_close = harness.assert_trees_close


def reference(name):
  return harness.cached_run("single", name)


@pytest.mark.parametrize("name", CASES)
def test_pmap_matches_single_device(name):
  params, state, losses = harness.run_pmap(CASES[name])
  ref_params, ref_state, ref_losses = reference(name)
  # Replicated: every device holds bitwise the same params and state.
  for tree in (params, state):
    for leaf in jax.tree.leaves(tree):
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
  first = lambda tree: jax.tree.map(lambda a: a[0], tree)
  assert_trees_close(first(params), ref_params)
  assert_trees_close(first(state), ref_state)
  assert_trees_close(losses[:, 0], ref_losses)


def _param_paths(params):
  return {tuple(p): leaf for p, leaf in jax.tree.leaves_with_path(params)}


@pytest.mark.parametrize("name", CASES)
def test_sharded_jit_matches_single_device(name):
  params, state, losses, live = harness.cached_run("sharded_jit", name)
  ref_params, ref_state, ref_losses = reference(name)
  assert_trees_close(params, ref_params)
  assert_trees_close(state, ref_state)
  assert_trees_close(losses, ref_losses)

  # The state is laid out like the params: every leaf that mirrors a param
  # has that param's sharding, before and after training; the rest (global
  # scalars, per-layer statistics) is replicated.
  by_path = _param_paths(live["params"])
  n_mirrored = 0
  for tree in (live["init_state"], live["state"]):
    for path, leaf in jax.tree.leaves_with_path(tree):
      path = tuple(path)
      match = next(
          (by_path[path[i:]] for i in range(len(path) + 1)
           if path[i:] in by_path and by_path[path[i:]].shape == leaf.shape),
          None,
      )
      if match is not None:
        n_mirrored += 1
        assert leaf.sharding.is_equivalent_to(match.sharding, leaf.ndim), (
            jax.tree_util.keystr(path)
        )
        assert leaf.sharding.spec == P("fsdp"), jax.tree_util.keystr(path)
        assert not leaf.sharding.is_fully_replicated
      else:
        assert leaf.sharding.is_fully_replicated, jax.tree_util.keystr(path)
  assert n_mirrored >= 2 * len(by_path)  # At least one copy per param.


# check_vma=False (the user psums the gradients over the replica axes
# himself) for one optimizer with split params and for AdaFisher.
SHARD_MAP_PARAMS = [
    pytest.param(name, vma, id=f"{name}-{'vma' if vma else 'novma'}")
    for name in CASES for vma in (True, False)
    if vma or name in ("soaa", "adafisher")
]


@pytest.mark.parametrize("name,check_vma", SHARD_MAP_PARAMS)
def test_shard_map_matches_single_device(name, check_vma):
  params, state, losses = harness.run_shard_map(
      CASES[name], check_vma=check_vma
  )
  ref_params, ref_state, ref_losses = reference(name)
  assert_trees_close(params, ref_params)
  assert_trees_close(state, ref_state)
  assert_trees_close(losses, ref_losses)


@pytest.mark.parametrize("name", CASES)
def test_shard_map_without_axis_name_is_wrong(name):
  # Without axis_name each device reduces only its own part (SOAA's and
  # arTuRO's global sums over split params, AdaFisher's statistics of its
  # part of the batch). With check_vma=True shard_map refuses the result at
  # trace time (a global scalar of the state would vary across devices);
  # without the check the run leaves the single-device one, which shows that
  # the shard_map test above can fail.
  with pytest.raises((ValueError, TypeError),
                     match="vary|manual axis|replicat"):
    harness.run_shard_map(CASES[name], axis_name=None, check_vma=True)
  _, state, _ = harness.run_shard_map(
      CASES[name], axis_name=None, check_vma=False
  )
  _, ref_state, _ = reference(name)
  with pytest.raises(AssertionError):
    assert_trees_close(state, ref_state, tol=100 * TOL)


@pytest.mark.parametrize("name", CASES)
def test_explicit_sharding_keeps_state_types(name):
  """With explicit mesh axes the state's sharding types follow the params'.

  init then update under jax.set_mesh with Explicit axes: the state's types
  (shape, dtype, sharding) do not change from step to step, and every leaf
  that comes out sharded is sharded as state_shardings says.
  """
  mesh = jax.make_mesh(
      (harness.DATA, harness.FSDP), ("data", "fsdp"),
      axis_types=(jax.sharding.AxisType.Explicit,) * 2,
  )
  params, _, _ = harness.problem()
  opt = CASES[name].make(None)
  with jax.set_mesh(mesh):
    params = jax.device_put(
        params, jax.tree.map(lambda _: P("fsdp"), params)
    )
    grads = jax.tree.map(lambda p: 0.1 * p, params)
    state0 = jax.jit(opt.init)(params)
    _, state1 = jax.jit(
        functools.partial(opt.update, value=jnp.float32(1.0))
    )(grads, state0, params)
    types0 = jax.tree.map(jax.typeof, state0)
    types1 = jax.tree.map(jax.typeof, state1)
  assert types0 == types1
  expected = optax_soaa.state_shardings(opt, params)
  n_sharded = 0
  for leaf, sharding in zip(jax.tree.leaves(state1), jax.tree.leaves(expected)):
    if not leaf.sharding.is_fully_replicated:
      n_sharded += 1
      assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  assert n_sharded >= len(jax.tree.leaves(params))  # The moments at least.


if __name__ == "__main__":
  # Prints the measured deviations that TOL must cover:
  # XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  #   python tests/distributed/test_dist_equivalence.py
  first = lambda tree: jax.tree.map(lambda a: a[0], tree)
  for case_name, case in CASES.items():
    ref = reference(case_name)
    runs = {
        "pmap": first(harness.run_pmap(case)[:2]),
        "sharded_jit": harness.run_sharded_jit(case)[:2],
        "shard_map": harness.run_shard_map(
            case, check_vma=not case.stats)[:2],
    }
    for mode, (run_params, run_state) in runs.items():
      print(f"{case_name:10s} {mode:12s} params "
            f"{harness.worst_deviation(run_params, ref[0]):.2e}  state "
            f"{harness.worst_deviation(run_state, ref[1]):.2e}")
