"""utils.chunked_pass (the CPU slice loop) against whole-array arithmetic,
and the compiled steps' in-place structure it exists for."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_soaa
from optax_soaa._src import native
from optax_soaa._src import utils
from optax_soaa.benchmarks import tasks


def _update(g, lam, a, b):
  # b's old value is read by a's update and by b's own: a carried state.
  return 0.5 * lam + b, a + g * b, b * 0.9 - g


def _terms(g, lam, a, b):
  return jnp.stack([a * b, lam - g]).reshape(2, -1)


@pytest.mark.parametrize("size,chunk,divide_evenly", [
    (60, 12, True),     # slices that divide the leaf
    (61, 12, False),    # a ragged last slice, run as an overlapping slice
    (61, 12, True),     # 61 is prime: no divisor near 12, ragged again
    (7, 12, True),      # smaller than a slice: no loop
])
@pytest.mark.parametrize("carried", [(), (2,)])
def test_matches_whole_arrays(size, chunk, divide_evenly, carried):
  rng = np.random.default_rng(size)
  g = jnp.asarray(rng.normal(size=(size,)), jnp.float32)
  states = tuple(jnp.asarray(rng.normal(size=(size,)), jnp.float32)
                 for _ in range(3))
  want_states = _update(g, *states)
  want_total = jnp.sum(_terms(g, *want_states), axis=-1)

  @jax.jit
  def run(g, states):
    return utils.chunked_pass(_update, _terms, (g,), states, chunk,
                              carried=carried, divide_evenly=divide_evenly)

  got_states, got_total = run(g, states)
  chex.assert_trees_all_close(got_states, want_states, rtol=1e-6)
  chex.assert_trees_all_close(got_total, want_total, rtol=1e-5, atol=1e-5)
  chex.assert_shape(got_total, (2,))


@pytest.mark.parametrize("size", [48, 50])
def test_plain_sum_with_a_short_last_slice(size):
  x = jnp.arange(size, dtype=jnp.float32)
  _, total = jax.jit(lambda x: utils.chunked_pass(
      None, lambda x: (x * x)[None], (x,), (), 16, divide_evenly=False))(x)
  np.testing.assert_allclose(total, [np.sum(np.arange(size) ** 2)], rtol=1e-6)


def _large_copies(step, params, state, grads, min_elements):
  """The compiled step's copies of arrays with at least `min_elements`."""
  text = step.lower(params, state, grads).compile().as_text()
  copies = []
  for line in text.splitlines():
    match = re.search(r"= f32\[([\d,]+)\]\S* copy\(", line)
    if match and np.prod([int(d) for d in match.group(1).split(",")]) >= (
        min_elements):
      copies.append(line.strip())
  return copies


@pytest.mark.parametrize("chunk", [
    512,
    pytest.param("auto", marks=pytest.mark.skipif(
        not native.available(), reason="no fused CPU kernels here")),
])
@pytest.mark.parametrize(
    "name", ["arturo", "soaa-variance", "soaa-second_moment", "soaa-none"])
def test_donated_step_writes_state_in_place(name, chunk):
  # Slices of 512 over leaves of 16384: the loops the CPU's XLA path runs
  # at scale; "auto": the fused CPU kernels, which write the states into
  # their donated buffers. A whole-array copy here (XLA keeping old values
  # a fusion still reads) cost arTuRO 2x to 7x in time on the update-step
  # benchmark.
  params = {"w": jnp.ones((128, 128)), "v": jnp.ones((64, 256)),
            "b": jnp.ones((128,))}
  if name == "arturo":
    opt = optax_soaa.arturo(**tasks.ARTURO_FMNIST, chunk_size=chunk)
    extra = {}
  else:
    opt = optax_soaa.soaa(1e-3, total_steps=100, reduction_chunk_size=chunk,
                          curvature=name.split("-")[1])
    extra = {"value": jnp.float32(1.0)}

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  grads = jax.tree.map(lambda p: 1e-3 * p, params)
  state = opt.init(params)
  text = step.lower(params, state, grads).compile().as_text()
  # curvature="none" has no kernel of its own: it always runs the XLA path.
  assert ('custom_call_target="optax_soaa_' in text) == (
      chunk == "auto" and name != "soaa-none")
  assert _large_copies(step, params, state, grads, 16384) == []
