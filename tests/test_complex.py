"""Complex parameters, in optax's convention.

optax's own tests conjugate JAX's gradient before `update` (the update of a
complex parameter z = x + iy is then built from ∂L/∂x + i ∂L/∂y) and add the
updates to the parameters. SOAA and AdaFisher treat complex numbers as optax's
Adam does (|g|² in second moments, real scalars, complex updates); arTuRO as
pairs of real coordinates. Convergence on optax's complex parabola and
Rosenbrock targets runs in tests/test_optax_shared.py (optax's own test).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_soaa
from optax_soaa import LayerStats
from tests import _soaa_reference as ref

# Casting a complex value to a real dtype drops its imaginary part: an error
# in this module, wherever it would happen.
pytestmark = pytest.mark.filterwarnings("error::numpy.exceptions.ComplexWarning")

SHAPES = {"w": (3, 4), "b": (4,), "s": ()}


def _complex_params(dtype=jnp.complex64, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(SHAPES))
  return {name: jax.random.normal(k, shape, dtype)
          for k, (name, shape) in zip(keys, sorted(SHAPES.items()))}


def _loss_and_grad_np(params):
  """A smooth non-quadratic loss of complex leaves and its gradient in
  optax's convention, ∂L/∂x + i ∂L/∂y, in float64."""
  value, grads = 0.0, []
  for i, p in enumerate(params):
    scale, c = 1.0 + 0.5 * i, 0.3 - 0.2j
    value += (0.5 * scale * np.sum(np.abs(p - c) ** 2)
              + 0.1 * np.sum(np.sin(3 * p.real)) + 0.05 * np.sum(np.sin(2 * p.imag)))
    grads.append(scale * (p - c) + 0.3 * np.cos(3 * p.real)
                 + 0.1j * np.cos(2 * p.imag))
  return value, grads


# -- SOAA: a float64 restatement ---------------------------------------------

@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("curvature", ["second_moment", "variance", "none"])
def test_soaa_complex_matches_float64_reference(curvature, chunk_size, x64):
  hp = dict(b1=0.9, b2=0.99, gamma=0.1, eps=1e-8, weight_decay=0.05,
            total_steps=50, curvature=curvature)
  opt = optax_soaa.soaa(0.05, **hp, chunk_size=chunk_size)
  params = _complex_params(jnp.complex128)
  leaves, treedef = jax.tree.flatten(params)
  np_params = [np.asarray(x) for x in leaves]
  state = opt.init(params)
  ref_state = ref.init(np_params, curvature)
  update = jax.jit(opt.update)
  close = functools.partial(chex.assert_trees_all_close, rtol=1e-10, atol=0)
  dts = []
  for _ in range(30):
    value, np_grads = _loss_and_grad_np(np_params)
    grads = jax.tree.unflatten(treedef, [jnp.asarray(g) for g in np_grads])
    params = jax.tree.unflatten(treedef, [jnp.asarray(p) for p in np_params])
    updates, state = update(grads, state, params, value=jnp.asarray(value))
    # The library forms a step's predicted reduction in the next update:
    # after update t it holds the reference's pr after step t - 1.
    ref_pr = ref_state.pr
    ref_updates, ref_state = ref.step(
        ref_state, np_grads, np_params, value, lr_fn=lambda count: 0.05, **hp)
    close(jax.tree.leaves(updates), ref_updates)
    soaa_state = state[0]
    close(jax.tree.leaves(soaa_state.mu), ref_state.m)
    close(jax.tree.leaves(soaa_state.nu), ref_state.s)
    if curvature == "variance":
      chex.assert_trees_all_close(jax.tree.leaves(soaa_state.curvature),
                                  ref_state.v, rtol=1e-10, atol=1e-30)
    for name, ref_value in [
        ("dt", ref_state.dt), ("loss_avg", ref_state.loss_avg),
        ("predicted_reduction", ref_pr),
        ("trust_ratio", ref_state.trust_ratio),
        ("fisher_ratio", ref_state.fisher_ratio)]:
      np.testing.assert_allclose(getattr(soaa_state, name), ref_value,
                                 rtol=1e-10, atol=0, err_msg=name)
    dts.append(float(soaa_state.dt))
    np_params = [p + u for p, u in zip(np_params, ref_updates)]
  assert len(set(np.round(dts, 12))) > 5, dts  # The trust region moved.


@pytest.mark.parametrize("curvature", ["second_moment", "variance"])
def test_soaa_complex_state_is_real_where_squared(curvature):
  params = _complex_params()
  state = optax_soaa.scale_by_soaa(
      0.1, total_steps=10, curvature=curvature).init(params)
  for leaf in jax.tree.leaves(state.mu):
    assert leaf.dtype == jnp.complex64
  second = [state.nu] + ([state.curvature] if curvature == "variance" else [])
  for leaf in jax.tree.leaves(second):
    assert leaf.dtype == jnp.float32
  for name in ("dt", "loss_avg", "predicted_reduction", "fisher_ratio"):
    assert getattr(state, name).dtype == jnp.float32
  with jax.enable_x64(True):
    wide = optax_soaa.scale_by_soaa(0.1, total_steps=10).init(
        _complex_params(jnp.complex128))
    assert wide.dt.dtype == jnp.float64
    assert {x.dtype for x in jax.tree.leaves(wide.nu)} == {jnp.dtype("float64")}


# -- arTuRO: the real problem of (Re, Im) pairs -------------------------------

def _pairs(tree):
  return jax.tree.map(lambda z: jnp.stack([z.real, z.imag], axis=-1), tree)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_arturo_complex_is_the_real_split_bit_for_bit(chunk_size):
  opt = optax_soaa.arturo(0.05, reg_weight=0.05, prior_prec=0.0015,
                          dynamic_model_noise=0.017, measurement_noise=2.8,
                          start_filter_cov=5e-5, nu=1.3, weight_decay=0.01,
                          chunk_size=chunk_size)
  target = jax.tree.map(lambda p: 0.5 * p + (0.3 - 0.2j), _complex_params(seed=1))

  def loss(z):
    return sum(jnp.sum(jnp.abs(a - b) ** 2 + 0.1 * jnp.sin(3 * a.real))
               for a, b in zip(jax.tree.leaves(z), jax.tree.leaves(target)))

  @jax.jit
  def complex_step(z, state):
    grads = jax.tree.map(jnp.conj, jax.grad(loss)(z))
    updates, state = opt.update(grads, state, z)
    return optax.apply_updates(z, updates), state, updates

  @jax.jit
  def real_step(x, state):
    to_complex = lambda x: jax.tree.map(
        lambda a: jax.lax.complex(a[..., 0], a[..., 1]), x)
    grads = _pairs(jax.tree.map(jnp.conj, jax.grad(loss)(to_complex(x))))
    updates, state = opt.update(grads, state, x)
    return optax.apply_updates(x, updates), state, updates

  z = _complex_params()
  x = _pairs(z)
  z_state, x_state = opt.init(z), opt.init(x)
  chex.assert_trees_all_equal_shapes_and_dtypes(z_state, x_state)
  for _ in range(6):
    z, z_state, z_updates = complex_step(z, z_state)
    x, x_state, x_updates = real_step(x, x_state)
    for leaf in jax.tree.leaves(z_updates):
      assert leaf.dtype == jnp.complex64
    chex.assert_trees_all_equal(_pairs(z_updates), x_updates)
    chex.assert_trees_all_equal(z_state, x_state)
    chex.assert_trees_all_equal(_pairs(z), x)
  assert int(optax.tree.get(z_state, "bisection_steps")) > 0


def test_arturo_complex_state_shardings_follow_the_param():
  P = jax.sharding.PartitionSpec
  opt = optax_soaa.arturo(0.05, reg_weight=0.05, prior_prec=0.0015,
                          dynamic_model_noise=0.017, measurement_noise=2.8,
                          start_filter_cov=5e-5)
  params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.complex64),
            "v": jax.ShapeDtypeStruct((8,), jnp.float32)}
  specs = optax_soaa.state_partition_specs(
      opt, params, {"w": P("x", None), "v": P("x")})
  arturo_specs = specs[0]
  for name in ("b", "h", "p00", "p01", "p11", "precision"):
    assert getattr(arturo_specs, name) == {"w": P("x", None), "v": P("x")}
  assert arturo_specs.eta == P()


# -- AdaFisher ----------------------------------------------------------------

def _dense_stats(rng):
  h = jnp.asarray(np.append(rng.uniform(0.1, 3.0, 3), 1.0), jnp.float32)
  s = jnp.asarray(rng.uniform(1e-3, 2.0, 4), jnp.float32)
  return {"kernel": LayerStats(h=h, s=s, part="kernel"),
          "bias": LayerStats(h=h, s=s, part="bias"), "other": None}


@pytest.mark.parametrize("fallback", ["identity", "adam"])
@pytest.mark.parametrize("factory", [optax_soaa.adafisher, optax_soaa.adafisherw])
def test_adafisher_complex_is_linear_in_the_real_and_imaginary_parts(
    factory, fallback):
  """With real Fisher scales F̃, the direction of a complex gradient is the
  direction of its real part plus i times that of its imaginary part; the
  "adam" fallback's second moment is the sum of the two parts' (|g|²)."""
  rng = np.random.default_rng(0)
  shapes = {"kernel": (3, 4), "bias": (4,), "other": (5,)}
  opt = factory(0.1, stats_every=2, weight_decay=0.0, fallback=fallback)
  parts = [{k: jnp.asarray(rng.normal(size=s), jnp.float32)
            for k, s in shapes.items()} for _ in range(2)]
  z = jax.tree.map(jax.lax.complex, *parts)
  update = jax.jit(opt.update)
  states = [opt.init(z), opt.init(parts[0]), opt.init(parts[1])]
  for step in range(4):
    stats = _dense_stats(rng)
    g_parts = [{k: jnp.asarray(rng.normal(size=s), jnp.float32)
                for k, s in shapes.items()} for _ in range(2)]
    g = jax.tree.map(jax.lax.complex, *g_parts)
    out = [update(grads, st, p, stats=stats) for grads, st, p in zip(
        (g, *g_parts), states, (z, *parts))]
    states = [s for _, s in out]
    (u, _), (u_re, _), (u_im, _) = out
    # Adam's scale of the leaf without statistics is |g|'s, not linear.
    linear = ("kernel", "bias") + (("other",) if fallback == "identity" else ())
    for k in linear:
      chex.assert_trees_all_close(
          u[k], jax.lax.complex(u_re[k], u_im[k]), rtol=1e-6, atol=1e-7)
    inner = [optax.tree.get(s, "nu") for s in states]
    if fallback == "adam":
      assert {x.dtype for x in jax.tree.leaves(inner[0])} == {jnp.dtype("float32")}
      chex.assert_trees_all_close(
          inner[0], jax.tree.map(jnp.add, inner[1], inner[2]), rtol=1e-6)
    else:
      assert inner[0] is None


def test_real_mu_dtype_for_complex_params_is_a_type_error():
  for opt in (optax_soaa.adafisher(1e-3, mu_dtype=jnp.float32),
              optax_soaa.soaa(1e-3, total_steps=5, mu_dtype=jnp.float32)):
    with pytest.raises(TypeError, match="`mu_dtype`=float32 is real.*complex"):
      opt.init(_complex_params())


def test_soaa_complex_nu_dtype_is_a_type_error():
  # s and v hold |g|²: a complex dtype there would be ignored or waste half.
  for dtype in (jnp.complex64, "complex128"):
    with pytest.raises(TypeError, match="`nu_dtype`=complex.* is complex"):
      optax_soaa.soaa(1e-3, total_steps=5, nu_dtype=dtype)


@pytest.mark.parametrize("params_dtype", [jnp.float32, jnp.complex64])
def test_soaa_explicit_state_dtypes_are_honoured(params_dtype):
  # optax's test_explicit_dtype asks the state in the requested dtype: a
  # complex mu_dtype for real params too (its imaginary part stays 0, and
  # the updates are the same as with real moments).
  params = jax.tree.map(lambda x: x.astype(params_dtype),
                        _complex_params() if params_dtype == jnp.complex64
                        else jax.tree.map(jnp.real, _complex_params()))
  grads = jax.tree.map(lambda x: 0.5 * x + 0.1, params)
  plain = optax_soaa.soaa(0.1, total_steps=5)
  explicit = optax_soaa.soaa(0.1, total_steps=5, mu_dtype=jnp.complex64,
                             nu_dtype=jnp.float32)
  state = explicit.init(params)
  assert {x.dtype for x in jax.tree.leaves(optax.tree.get(state, "mu"))} == {
      jnp.dtype(jnp.complex64)}
  assert {x.dtype for x in jax.tree.leaves(optax.tree.get(state, "nu"))} == {
      jnp.dtype(jnp.float32)}
  runs = []
  for opt, state in ((plain, plain.init(params)), (explicit, state)):
    for step in range(3):
      updates, state = opt.update(grads, state, params,
                                  value=jnp.float32(1.0 / (step + 1)))
    runs.append(updates)
  chex.assert_trees_all_equal_dtypes(runs[1], params)
  chex.assert_trees_all_close(runs[1], runs[0], rtol=1e-6)


def _complex_regression(seed=0):
  kx, kw, kb, kn = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(kx, (64, 3), jnp.complex64)
  w_true = jax.random.normal(kw, (3, 2), jnp.complex64)
  b_true = jax.random.normal(kb, (2,), jnp.complex64)
  y = x @ w_true + b_true

  def loss(params, x, y):
    return jnp.mean(jnp.abs(x @ params["kernel"] + params["bias"] - y) ** 2)

  params = {"kernel": jnp.zeros((3, 2), jnp.complex64),
            "bias": jnp.zeros((2,), jnp.complex64)}
  return loss, params, x, y, {"kernel": w_true, "bias": b_true}


def test_collector_statistics_of_a_complex_dense_layer_are_magnitudes():
  loss, params, x, y, _ = _complex_regression()
  params = jax.tree.map(lambda p: p + 0.5, params)
  _, grads, extras = optax_soaa.value_grad_and_stats(loss)(params, x, y)
  chex.assert_trees_all_close(grads, jax.grad(loss)(params, x, y))
  out = x @ params["kernel"] + params["bias"]
  delta = jax.grad(lambda o: jnp.mean(jnp.abs(o - y) ** 2))(out)
  x_bar = jnp.concatenate([x, jnp.ones((64, 1), x.dtype)], axis=1)
  st = extras["stats"]["kernel"]
  assert st.h.dtype == st.s.dtype == jnp.float32
  chex.assert_trees_all_close(st.h, jnp.mean(jnp.abs(x_bar) ** 2, 0), rtol=1e-5)
  chex.assert_trees_all_close(st.s, jnp.mean(jnp.abs(delta) ** 2, 0), rtol=1e-5)


def test_collector_statistics_of_a_complex_layer_norm_are_magnitudes():
  kx, kd = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (6, 5), jnp.complex64)
  target = jax.random.normal(kd, (6, 5), jnp.complex64)
  params = {"scale": jnp.full((5,), 1.2 - 0.3j, jnp.complex64),
            "bias": jnp.full((5,), 0.1j, jnp.complex64)}

  def norm(params, x):
    return (x - jnp.mean(x, axis=-1, keepdims=True)) * params["scale"] + params["bias"]

  def loss(params, x):
    return jnp.sum(jnp.abs(norm(params, x) - target) ** 2)

  _, _, extras = optax_soaa.value_grad_and_stats(loss)(params, x)
  st = extras["stats"]["scale"]
  assert st is not None and st.kind == "layer_norm"
  delta = jax.grad(lambda o: jnp.sum(jnp.abs(o - target) ** 2))(norm(params, x))
  # LayerNorm of a (B, D) input, as the reference reduces it: u = Σ_b x,
  # h = [Σ |u|², D] / B², s = |Σ_b δ|² / B.
  expected_h = jnp.stack([jnp.sum(jnp.abs(jnp.sum(x, 0)) ** 2), 5.0]) / 36
  chex.assert_trees_all_close(st.h, expected_h, rtol=1e-5)
  chex.assert_trees_all_close(st.s, jnp.abs(jnp.sum(delta, 0)) ** 2 / 6, rtol=1e-5)


@pytest.mark.parametrize("factory", [optax_soaa.adafisher, optax_soaa.adafisherw])
def test_adafisher_with_statistics_converges_on_complex_regression(factory):
  loss, params, x, y, solution = _complex_regression()
  opt = factory(2e-4, stats_every=5)
  collect = optax_soaa.value_grad_and_stats(loss)

  def step(carry, _):
    params, state = carry
    _, grads, extras = collect(params, x, y,
                               stats_due=optax_soaa.stats_due(state))
    grads = jax.tree.map(jnp.conj, grads)  # optax's convention.
    updates, state = opt.update(grads, state, params, **extras)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.jit(
      lambda c: jax.lax.scan(step, c, length=1000))((params, opt.init(params)))
  chex.assert_tree_all_finite(state)
  stats = collect(params, x, y)[2]["stats"]
  assert stats["kernel"] is not None and stats["bias"] is not None
  chex.assert_trees_all_close(params, solution, atol=3e-2)


ARTURO_KWARGS = dict(kl_bound=0.05, reg_weight=0.05, prior_prec=0.0015,
                     dynamic_model_noise=0.017, measurement_noise=2.8,
                     start_filter_cov=5e-5, nu=1.3, weight_decay=0.01)


@pytest.mark.parametrize("factory, kwargs", [
    (optax_soaa.soaa, dict(learning_rate=0.1, total_steps=10, weight_decay=0.01)),
    (optax_soaa.arturo, ARTURO_KWARGS),
    (optax_soaa.adafisherw, dict(learning_rate=0.1, weight_decay=0.01,
                                 fallback="adam")),
], ids=["soaa", "arturo", "adafisherw"])
@pytest.mark.filterwarnings("ignore:AdaFisher's update got no statistics")
def test_inject_hyperparams_with_complex_params(factory, kwargs):
  """optax.inject_hyperparams casts the hyperparameters to the params'
  dtype, complex here: the optimizers take their real parts."""
  params = _complex_params()
  grads = jax.tree.map(lambda p: 0.5 * p + (0.2 - 0.1j), params)
  injected = optax.inject_hyperparams(factory)(**kwargs)
  plain = factory(**kwargs)
  states = [injected.init(params), plain.init(params)]
  for _ in range(3):
    (u_inj, s_inj), (u_plain, s_plain) = [
        jax.jit(opt.update)(grads, state, params, value=jnp.float32(1.0))
        for opt, state in zip((injected, plain), states)]
    states = [s_inj, s_plain]
  assert states[0].hyperparams["weight_decay"].dtype == jnp.complex64
  chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-4)
  chex.assert_trees_all_close(s_inj.inner_state, s_plain, rtol=1e-4)


def test_a_complex_hyperparameter_must_be_real():
  with pytest.raises(ValueError, match="`learning_rate` must be real"):
    optax_soaa.soaa(jnp.asarray(0.1 + 0.1j), total_steps=3)
  with pytest.raises(ValueError, match="`kl_bound` must be real"):
    optax_soaa.arturo(**dict(ARTURO_KWARGS, kl_bound=jnp.asarray(0.1j)))
