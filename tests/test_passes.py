"""The passes seam (optax_soaa/_src/passes.py): slice loops against whole
arrays, global sums over a mapped axis, and the in-place structure of the
compiled steps the slice loops exist for."""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_soaa
from optax_soaa._src import passes
from optax_soaa.benchmarks import tasks


def _update(g, lam, a, b, *, decay, **_):
  # b's old value is read by a's update and by b's own: a carried state.
  return 0.5 * lam + b, a + g * b, b * decay - g


def _terms(g, lam, a, b, *, shift, **_):
  return a * b, lam - g + shift


def _output(g, lam, a, b, *, shift, **_):
  return g * a + shift


@pytest.mark.parametrize("size,chunk", [
    (60, 12),   # slices that divide the leaf
    (61, 12),   # 61 is prime: a ragged last slice, run as an overlapping one
    (7, 12),    # smaller than a slice: no loop
])
@pytest.mark.parametrize("carried", [(), (2,)])
def test_slices_match_whole_arrays(size, chunk, carried):
  rng = np.random.default_rng(size)
  tree = lambda: {"x": jnp.asarray(rng.normal(size=(size,)), jnp.float32),
                  "y": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  g = tree()
  states = tuple(tree() for _ in range(3))
  scalars = dict(decay=jnp.float32(0.9), shift=jnp.float32(0.25))

  def run(chunk_size):
    return jax.jit(lambda g, states: passes.run(
        "test", (g,), states, scalars, update=_update, terms=_terms,
        output=_output, chunk_size=chunk_size, carried=carried))(g, states)

  want, got = run(None), run(chunk)
  chex.assert_shape(got.sums, (2,))
  # (XLA may fuse a product into an FMA in one layout and not the other.)
  chex.assert_trees_all_close(got.states, want.states, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(got.sums, want.sums, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(got.outputs, want.outputs, rtol=1e-6, atol=1e-6)
  # Against the arithmetic written out (whole arrays are the definition).
  new = jax.tree.map(lambda *xs: _update(*xs, **scalars), g, *states)
  new = jax.tree.transpose(jax.tree.structure(g),
                           jax.tree.structure((0, 0, 0)), new)
  chex.assert_trees_all_close(want.states, new, rtol=1e-6, atol=1e-6)
  total = sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(new[1]),
                                             jax.tree.leaves(new[2])))
  np.testing.assert_allclose(want.sums[0], total, rtol=1e-5)


def _ordered_update(g, a, b, *, decay, **_):
  # b's update reads a's old value (the states before it, as SOAA's v reads
  # m): the order of the writes matters.
  return a * decay + g, b * decay + a * g


def _old_terms(g, a, b, *, shift, **_):
  return (a * b + shift,)


@pytest.mark.parametrize("size,chunk", [(60, 12), (61, 12), (7, 12)])
def test_old_terms_read_the_states_before_the_update(size, chunk):
  rng = np.random.default_rng(size)
  tree = lambda: {"x": jnp.asarray(rng.normal(size=(size,)), jnp.float32),
                  "y": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  g, states = tree(), (tree(), tree())
  scalars = dict(decay=jnp.float32(0.9), shift=jnp.float32(0.25))

  def run(chunk_size):
    return jax.jit(lambda g, states: passes.run(
        "test", (g,), states, scalars, update=_ordered_update,
        terms=lambda g, a, b, **_: (a - b, g * a), old_terms=_old_terms,
        chunk_size=chunk_size))(g, states)

  want, got = run(None), run(chunk)
  chex.assert_shape(got.sums, (3,))
  chex.assert_trees_all_close(got.states, want.states, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(got.sums, want.sums, rtol=1e-5, atol=1e-5)
  new = jax.tree.map(lambda *xs: _ordered_update(*xs, **scalars), g, *states)
  new = jax.tree.transpose(jax.tree.structure(g),
                           jax.tree.structure((0, 0)), new)
  chex.assert_trees_all_close(want.states, new, rtol=1e-6, atol=1e-6)
  leaves = lambda t: jax.tree.leaves(t)
  old_total = sum(jnp.sum(a * b + 0.25) for a, b in zip(
      leaves(states[0]), leaves(states[1])))
  new_total = sum(jnp.sum(x * y) for x, y in zip(leaves(g), leaves(new[0])))
  np.testing.assert_allclose(got.sums[2], old_total, rtol=1e-5)
  np.testing.assert_allclose(got.sums[1], new_total, rtol=1e-5)
  with pytest.raises(ValueError, match="carried"):
    passes.run("test", (g,), states, scalars, update=_ordered_update,
               old_terms=_old_terms, chunk_size=chunk, carried=(0,))


@pytest.mark.parametrize("option, want", [
    ("auto", passes.CPU_CHUNK_SIZE), (None, None), (100, 100)])
def test_auto_slices_on_a_single_cpu_device(option, want):
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
    pytest.skip("'auto' means whole arrays here")
  assert passes.resolve_chunk_size(option) == want


def test_sums_over_a_mapped_axis():
  # Parameters split over a mapped axis (vmap here, one device): the global
  # sums of both optimizers are psum-ed over it, whole arrays or slices.
  shards = {"w": jnp.stack([jnp.linspace(-1.0, 1.0, 500) * k
                            for k in (1.0, -0.5)])}
  grads = jax.tree.map(lambda x: jnp.sin(3 * x) + x, shards)
  results = []
  for chunk in (None, 64):
    out = []
    for opt in (
        optax_soaa.soaa(0.05, total_steps=10, axis_name="shard",
                        chunk_size=chunk),
        optax_soaa.arturo(**tasks.ARTURO_FMNIST, axis_name="shard",
                          chunk_size=chunk)):
      update = jax.jit(jax.vmap(
          lambda g, s, p, opt=opt: opt.update(g, s, p, value=jnp.float32(1.0)),
          axis_name="shard"))
      state = jax.vmap(opt.init)(shards)
      for _ in range(3):
        _, state = update(grads, state, shards)
      out.append(state[0])
    results.append(out)
  (soaa_whole, arturo_whole), (soaa_sliced, arturo_sliced) = results
  for name in ("predicted_reduction", "fisher_ratio", "dt"):
    values = getattr(soaa_whole, name)
    np.testing.assert_allclose(values[0], values[1], rtol=1e-6)  # global
    np.testing.assert_allclose(getattr(soaa_sliced, name), values,
                               rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(arturo_whole.eta[0], arturo_whole.eta[1])
  np.testing.assert_allclose(arturo_sliced.eta, arturo_whole.eta, rtol=1e-6)


# -- In-place writes of the donated state ------------------------------------

# One HLO instruction: `%name = f32[16384]{0} copy(%operand), ...`.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*\w+\[([\d,]*)\]\S*\s+([\w\-]+)\(")


def _large_copies(compiled, min_elements):
  """The instructions that copy an array of at least `min_elements`."""
  copies, parameters = [], 0
  for line in compiled.as_text().splitlines():
    match = _INSTRUCTION.match(line)
    if match is None:
      continue
    dims, opcode = match.groups()
    parameters += opcode == "parameter"
    size = math.prod(int(d) for d in dims.split(",") if d)
    if opcode == "copy" and size >= min_elements:
      copies.append(line.strip())
  # The parser understood this XLA's text: it saw the step's parameters.
  assert parameters >= 3, compiled.as_text()[:2000]
  return copies


def _compiled_step(opt, params, extra):
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  grads = jax.tree.map(lambda p: 1e-3 * p, params)
  return jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt.init(params), grads).compile()


_PARAMS = {"w": jnp.ones((128, 128)), "v": jnp.ones((64, 256)),
           "b": jnp.ones((128,))}


def test_copy_check_fires_on_a_step_that_copies():
  # The positive control: a step that reads a state's old values in another
  # output after writing the new ones (the first moment's old value in a
  # sum), so XLA must keep the old array: a whole-array copy.
  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(grads, state, params=None):
    del params
    new = jax.tree.map(lambda m, g: 0.9 * m + g, state, grads)
    total = sum(jnp.sum(m * g) for m, g in zip(jax.tree.leaves(state),
                                               jax.tree.leaves(grads)))
    return jax.tree.map(lambda m: m * total, new), new

  copying = optax.GradientTransformation(init, update)
  copies = _large_copies(_compiled_step(copying, _PARAMS, {}), 16384)
  assert copies, "the check missed the copy of a donated state"
  assert _large_copies(_compiled_step(optax.adam(1e-3), _PARAMS, {}),
                       16384) == []


@pytest.mark.parametrize("curvature", ["variance", "second_moment"])
def test_donated_whole_array_step_writes_state_in_place(curvature):
  # Whole arrays (GPU, TPU): the moments pass sums the last step's predicted
  # reduction from the old moments, which the pass then overwrites; the
  # updates must wait for that sum, not copy the moments.
  opt = optax_soaa.soaa(1e-3, total_steps=100, chunk_size=None,
                        curvature=curvature)
  compiled = _compiled_step(opt, _PARAMS, {"value": jnp.float32(1.0)})
  assert _large_copies(compiled, 16384) == []


@pytest.mark.parametrize(
    "name", ["arturo", "soaa-variance", "soaa-second_moment", "soaa-none"])
def test_donated_step_writes_state_in_place(name):
  # Slices of 512 over leaves of 16384: the loops "auto" runs on a single
  # CPU device at scale. A whole-array copy here (XLA keeping old values a
  # fusion still reads) cost arTuRO 2x to 7x in time on the update-step
  # benchmark.
  if name == "arturo":
    opt = optax_soaa.arturo(**tasks.ARTURO_FMNIST, chunk_size=512)
    extra = {}
  else:
    opt = optax_soaa.soaa(1e-3, total_steps=100, chunk_size=512,
                          curvature=name.split("-")[1])
    extra = {"value": jnp.float32(1.0)}
  assert _large_copies(_compiled_step(opt, _PARAMS, extra), 16384) == []


def test_a_pass_over_no_leaves_sums_to_zero():
  # An empty params tree (a model with nothing to train yet): the sums of
  # every pass are zeros of the right length, and both optimizers step.
  result = passes.run("test", ({},), ({}, {}, {}), dict(shift=1.0, decay=0.5),
                      update=_update, terms=_terms)
  chex.assert_trees_all_equal(result.sums, jnp.zeros(2))
  for opt in (optax_soaa.soaa(0.1, total_steps=10),
              optax_soaa.arturo(**tasks.ARTURO_FMNIST)):
    updates, state = opt.update({}, opt.init({}), {}, value=1.0)
    assert updates == {}
    assert int(optax.tree.get(state, "count")) == 1


@pytest.mark.parametrize("name", ["soaa", "arturo"])
def test_sliced_step_exports(name):
  # Pure JAX on every layout: the sliced step exports with jax.export (a
  # custom call into a library would not), and the exported step gives the
  # jitted step's numbers.
  if name == "arturo":
    opt, extra = optax_soaa.arturo(**tasks.ARTURO_FMNIST, chunk_size=64), {}
  else:
    opt = optax_soaa.soaa(1e-3, total_steps=100, chunk_size=64)
    extra = {"value": jnp.float32(1.0)}
  params = {"w": jnp.linspace(-1.0, 1.0, 300).reshape(3, 100)}
  grads = jax.tree.map(jnp.sin, params)

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  exported = jax.export.export(jax.jit(step))(params, state, grads)
  chex.assert_trees_all_close(exported.call(params, state, grads),
                              jax.jit(step)(params, state, grads), rtol=1e-6)
