"""pmap, sharded jit and shard_map each reproduce the single-device run.

Run on 8 simulated CPU devices (see tests/test_distributed.py). Every run
trains the harness's MLP for harness.STEPS steps on the same global batches.

Tolerance: float32 runs that differ only in the order of their reductions
(the batch mean split over devices, the optimizers' global sums split over
shards) agree to a few ulps per step; the trust-region feedback (SOAA's dt,
arTuRO's eta) can amplify such differences. Measured: the largest deviation of
any leaf, relative to that leaf's largest magnitude, is below 1e-6 after 20
steps; the tests allow TOL = 1e-5. Integer leaves (step counts) must match
exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import harness
import optax_soaa

P = jax.sharding.PartitionSpec
TOL = 1e-5


def _soaa(axis_name):
  return optax_soaa.soaa(
      3e-2, weight_decay=1e-3, total_steps=harness.STEPS, axis_name=axis_name
  )


CASES = {
    "soaa": harness.Case("soaa", _soaa),
}
# Cases whose trust region is a global sum: without axis_name under split
# params they must go wrong (which shows the shard_map test can fail).
GLOBAL_SUMS = ("soaa",)
# Diagnostics that are global reductions, to compare in the no-axis test.
GLOBAL_FIELDS = {"soaa": "fisher_ratio"}


@functools.lru_cache(maxsize=None)
def reference(name):
  return harness.run_single(CASES[name])


def assert_trees_close(actual, expected, tol=TOL):
  """Leafwise: max|a - e| <= tol * max|e|; integer leaves exactly equal."""
  paths = jax.tree.leaves_with_path(expected)
  leaves = jax.tree.leaves(actual)
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, e), a in zip(paths, leaves):
    a, e = np.asarray(a), np.asarray(e)
    assert a.shape == e.shape and a.dtype == e.dtype, jax.tree_util.keystr(path)
    if not np.issubdtype(e.dtype, np.floating):
      np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))
      continue
    if e.size == 0:
      continue
    scale = max(float(np.max(np.abs(e))), np.finfo(np.float32).tiny)
    err = float(np.max(np.abs(a.astype(np.float64) - e)))
    assert np.all(np.isfinite(a)), jax.tree_util.keystr(path)
    assert err <= tol * scale, (
        f"{jax.tree_util.keystr(path)}: max |diff| {err:.3g} > "
        f"{tol:g} * max |ref| {scale:.3g}"
    )


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
  params, state, losses, live = harness.run_sharded_jit(CASES[name])
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


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "novma"])
@pytest.mark.parametrize("name", CASES)
def test_shard_map_matches_single_device(name, check_vma):
  params, state, losses = harness.run_shard_map(
      CASES[name], axis_name="fsdp", check_vma=check_vma
  )
  ref_params, ref_state, ref_losses = reference(name)
  assert_trees_close(params, ref_params)
  assert_trees_close(state, ref_state)
  assert_trees_close(losses, ref_losses)


@pytest.mark.parametrize("name", GLOBAL_SUMS)
def test_shard_map_without_axis_name_is_wrong(name):
  # Split params and no axis_name: each shard sums only its own part, so the
  # trust region differs from the single-device one.
  _, state, _ = harness.run_shard_map(CASES[name], axis_name=None)
  _, ref_state, _ = reference(name)
  field = GLOBAL_FIELDS[name]
  got = float(optax.tree.get(state, field))
  want = float(optax.tree.get(ref_state, field))
  assert abs(got - want) > 100 * TOL * abs(want)


@pytest.mark.parametrize("name", CASES)
def test_explicit_sharding_keeps_state_types(name):
  """With explicit mesh axes the state's sharding types follow the params'."""
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
  for leaf, sharding in zip(jax.tree.leaves(state1), jax.tree.leaves(expected)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
