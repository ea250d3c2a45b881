"""Distributed training: the state-sharding helper, and the 8-device suite.

The equivalence tests (pmap, sharded jit, shard_map against one device; two
processes of 4 devices against one of 8) need 8 devices, which on CPU means
XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX is imported;
this process has JAX imported already, so `test_eight_device_suite` runs
tests/distributed in a fresh process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_soaa

P = jax.sharding.PartitionSpec
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DEVICES = 8


def _params():
  return {
      "dense": {"kernel": jnp.zeros((4, 6)), "bias": jnp.zeros((6,))},
      "out": {"kernel": jnp.zeros((6, 2))},
  }


def _specs():
  return {
      "dense": {"kernel": P(None, "fsdp"), "bias": P("fsdp")},
      "out": {"kernel": P("fsdp", None)},
  }


@pytest.mark.parametrize("curvature", ["second_moment", "variance"])
def test_soaa_state_specs_mirror_params(curvature):
  opt = optax_soaa.soaa(1e-3, total_steps=10, curvature=curvature)
  specs = optax_soaa.state_partition_specs(opt, _params(), _specs())
  soaa_specs = specs[0]
  assert isinstance(soaa_specs, optax_soaa.SOAAState)
  mirrored = ("mu", "nu") + (("curvature",) if curvature == "variance" else ())
  for field in mirrored:
    assert getattr(soaa_specs, field) == _specs(), field
  if curvature == "second_moment":  # v̂ = ŝ: no array of its own.
    assert soaa_specs.curvature is None
  for field in ("count", "dt", "loss_avg", "predicted_reduction",
                "trust_ratio", "fisher_ratio", "skipped_values"):
    assert getattr(soaa_specs, field) == P(), field
  assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == (
      jax.tree.structure(jax.eval_shape(opt.init, _params()))
  )


@pytest.mark.parametrize("wrapper", ["chain", "inject", "multisteps", "masked"])
def test_specs_found_through_wrappers(wrapper):
  base = optax_soaa.soaa(1e-3, total_steps=10)
  if wrapper == "chain":
    opt = optax.chain(optax.clip_by_global_norm(1.0), base)
  elif wrapper == "inject":
    opt = optax.inject_hyperparams(
        optax_soaa.soaa, static_args=("total_steps",)
    )(learning_rate=1e-3, total_steps=10)
  elif wrapper == "multisteps":
    opt = optax.MultiSteps(base, every_k_schedule=2)
  else:
    mask = {"dense": {"kernel": True, "bias": False}, "out": {"kernel": True}}
    opt = optax.masked(base, mask)
  specs = optax_soaa.state_partition_specs(opt, _params(), _specs())
  mus = optax.tree.get_all_with_path(specs, "mu")
  assert mus, "no first moment found"
  for _, mu in mus:
    for path, spec in jax.tree.leaves_with_path(
        mu, is_leaf=lambda x: isinstance(x, P)):
      keys = tuple(k.key for k in path)
      want = _specs()[keys[0]][keys[1]]
      assert spec == want, keys
  # Every leaf is a spec, and exactly the scalar ones are replicated.
  state = jax.eval_shape(opt.init, _params())
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for spec, leaf in zip(spec_leaves, jax.tree.leaves(state)):
    assert isinstance(spec, P)
    if leaf.ndim == 0:
      assert spec == P()


def test_leaves_of_other_shapes_are_replicated():
  # Adafactor's factored second moments are per-row / per-column vectors.
  params = {"w": jnp.zeros((8, 16))}
  opt = optax.adafactor(1e-3, min_dim_size_to_factor=4)
  specs = optax_soaa.state_partition_specs(opt, params, {"w": P("fsdp", None)})
  state = jax.eval_shape(opt.init, params)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for spec, leaf in zip(spec_leaves, jax.tree.leaves(state)):
    want = P("fsdp", None) if leaf.shape == (8, 16) else P()
    assert spec == want, leaf.shape


def test_state_shardings_single_device_mesh():
  mesh = jax.make_mesh((1,), ("fsdp",))
  opt = optax_soaa.soaa(1e-3, total_steps=10)
  shardings = jax.tree.map(
      lambda s: jax.sharding.NamedSharding(mesh, s), _specs())
  params = jax.device_put(_params(), shardings)
  from_arrays = optax_soaa.state_shardings(opt, params)
  from_specs = optax_soaa.state_shardings(
      opt, jax.eval_shape(lambda: _params()), _specs(), mesh=mesh)
  assert from_arrays == from_specs
  assert from_arrays[0].mu == shardings
  assert from_arrays[0].dt == jax.sharding.NamedSharding(mesh, P())
  state = jax.jit(opt.init, out_shardings=from_arrays)(params)
  assert state[0].mu["dense"]["kernel"].sharding == shardings["dense"]["kernel"]


def test_state_shardings_bad_input():
  opt = optax_soaa.soaa(1e-3, total_steps=10)
  with pytest.raises(ValueError, match="mesh"):
    optax_soaa.state_shardings(opt, _params(), _specs())
  with pytest.raises(ValueError, match="one entry per leaf"):
    optax_soaa.state_partition_specs(opt, _params(), {"a": P()})
  with pytest.raises(TypeError, match="array or a jax.ShapeDtypeStruct"):
    optax_soaa.state_partition_specs(opt, {"a": "x"}, {"a": P()})


def test_eight_device_suite():
  """Runs tests/distributed on 8 simulated CPU devices, in a fresh process."""
  env = dict(os.environ)
  # CPU compile time dominates these tests; the cheaper backend passes cut it
  # by about 40%, and every run compared is compiled alike.
  env["XLA_FLAGS"] = " ".join([
      env.get("XLA_FLAGS", ""),
      f"--xla_force_host_platform_device_count={N_DEVICES}",
      "--xla_backend_optimization_level=0",
      "--xla_llvm_disable_expensive_passes=true",
  ]).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("PYTEST_ADDOPTS", None)
  env.pop("PYTEST_XDIST_WORKER", None)
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "tests/distributed", "-q", "-rs",
       "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-8000:]
  summary = out.strip().splitlines()[-1]
  assert re.search(r"\d+ passed", summary), out[-4000:]
  assert not re.search(r"\d+ (failed|errors?|xpassed)", summary), out[-4000:]
  # The multi-process tests skip where jaxlib has no gloo CPU collectives;
  # nothing else may.
  skips = re.findall(r"^SKIPPED .*$", out, re.M)
  unexpected = [s for s in skips if "gloo unavailable" not in s]
  assert not unexpected, "\n".join(unexpected)
  for skip in skips:
    warnings.warn(f"tests/distributed: {skip}")
