"""The fused CPU kernels (optax_soaa/_src/native.py) against the XLA path.

With `chunk_size` / `reduction_chunk_size` "auto" on a single CPU device the
optimizers run their passes over memory in the kernels; an explicit value
(None here: whole arrays) keeps them on XLA. Both must give the same steps:
the same arithmetic, summed in another order.
"""

import os
import re
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_soaa
from optax_soaa._src import native
from optax_soaa.benchmarks import tasks

requires_kernels = pytest.mark.skipif(
    native._compiler() is None or os.environ.get("OPTAX_SOAA_NATIVE") == "0",
    reason="no C++ compiler, or the kernels are disabled",
)


def _params(dtype=jnp.float32):
  # A leaf larger than a kernel block (4096) with a ragged last block, a
  # small one and a scalar.
  return {
      "w": jnp.linspace(-1.0, 1.0, 9009, dtype=dtype).reshape(9, 1001),
      "b": jnp.linspace(0.5, -0.3, 37, dtype=dtype),
      "s": jnp.asarray(0.2, dtype),
  }


def _run(opt, params, steps, with_value):
  def loss_fn(p):
    return sum(jnp.sum(jnp.sin(3 * x) + 0.5 * x**2) for x in jax.tree.leaves(p))

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    extra = {"value": loss} if with_value else {}
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  history = []
  for _ in range(steps):
    params, state = step(params, state)
    history.append(state)
  return params, history


def _custom_calls(opt, params, with_value=False):
  extra = {"value": jnp.float32(1.0)} if with_value else {}
  text = jax.jit(lambda g, s, p: opt.update(g, s, p, **extra)).lower(
      params, opt.init(params), params).compile().as_text()
  return set(re.findall(r'custom_call_target="(optax_soaa_\w+)"', text))


@requires_kernels
def test_kernels_build_and_register():
  assert native.available()


@requires_kernels
@pytest.mark.parametrize("options", [
    {},
    {"weight_decay": 1e-3},
    {"clip_curvature": True, "levels_per_pass": 1},
    {"levels_per_pass": 3},
])
def test_arturo_kernels_match_xla(options):
  hp = {**tasks.ARTURO_FMNIST, **options}
  params = _params()
  fused = optax_soaa.arturo(**hp)
  assert _custom_calls(fused, params) == {
      "optax_soaa_arturo_filter_f32", "optax_soaa_arturo_kl_f32"}
  plain = optax_soaa.arturo(**hp, chunk_size=None)
  assert _custom_calls(plain, params) == set()
  p_fused, h_fused = _run(fused, params, 12, False)
  p_plain, h_plain = _run(plain, params, 12, False)
  steps = [int(s.bisection_steps) for s in h_plain]
  assert max(steps) > levels_of(hp), steps  # bisection passes ran too
  for a, b in zip(h_fused, h_plain):
    assert int(a.bisection_steps) == int(b.bisection_steps)
    np.testing.assert_allclose(a.eta, b.eta, rtol=1e-6)
    np.testing.assert_allclose(a.kl, b.kl, rtol=1e-4)
  for name in ("b", "h", "p00", "p01", "p11", "precision"):
    chex.assert_trees_all_close(getattr(h_fused[-1], name),
                                getattr(h_plain[-1], name),
                                rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(p_fused, p_plain, rtol=1e-5, atol=1e-6)


def levels_of(hp):
  return hp.get("levels_per_pass") or 2


@requires_kernels
@pytest.mark.parametrize("curvature", ["variance", "second_moment"])
@pytest.mark.parametrize("with_value", [True, False])
def test_soaa_kernels_match_xla(curvature, with_value):
  kw = dict(total_steps=50, curvature=curvature, weight_decay=1e-3)
  params = _params()
  fused = optax_soaa.soaa(0.05, **kw)
  expected = {"optax_soaa_soaa_moments_f32"}
  if with_value:
    expected.add("optax_soaa_soaa_predicted_reduction_f32")
  assert _custom_calls(fused, params, with_value) == expected
  plain = optax_soaa.soaa(0.05, **kw, reduction_chunk_size=None)
  p_fused, h_fused = _run(fused, params, 15, with_value)
  p_plain, h_plain = _run(plain, params, 15, with_value)
  for a, b in zip(h_fused, h_plain):
    a, b = a[0], b[0]
    for name in ("dt", "predicted_reduction", "fisher_ratio", "trust_ratio"):
      np.testing.assert_allclose(getattr(a, name), getattr(b, name),
                                 rtol=1e-5, err_msg=name)
  last_fused, last_plain = h_fused[-1][0], h_plain[-1][0]
  chex.assert_trees_all_close(
      (last_fused.mu, last_fused.nu, last_fused.curvature),
      (last_plain.mu, last_plain.nu, last_plain.curvature),
      rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(p_fused, p_plain, rtol=1e-5, atol=1e-6)
  if with_value:
    assert len({float(s[0].dt) for s in h_fused}) > 3  # dt moved


@requires_kernels
@pytest.mark.usefixtures("x64")
def test_float64_kernels_match_xla():
  params = _params(jnp.float64)
  for make in (
      lambda **o: optax_soaa.arturo(**tasks.ARTURO_FMNIST, **o),
      lambda **o: optax_soaa.soaa(
          0.05, total_steps=50,
          **{("reduction_chunk_size" if k == "chunk_size" else k): v
             for k, v in o.items()}),
  ):
    fused, plain = make(), make(chunk_size=None)
    assert any(name.endswith("_f64") for name in _custom_calls(fused, params))
    p_fused, _ = _run(fused, params, 10, True)
    p_plain, _ = _run(plain, params, 10, True)
    chex.assert_trees_all_close(p_fused, p_plain, rtol=1e-12, atol=1e-14)


@requires_kernels
def test_mixed_dtypes_stay_on_xla():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  assert _custom_calls(optax_soaa.arturo(**tasks.ARTURO_FMNIST), params) == set()
  soaa = optax_soaa.soaa(0.05, total_steps=10, mu_dtype=jnp.bfloat16)
  assert _custom_calls(soaa, _params(), True) == set()


def _python(code, **env):
  return subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)],
      capture_output=True, text=True, env={**os.environ, **env}, timeout=300,
  )


@requires_kernels
def test_build_is_cached_and_can_be_disabled(tmp_path):
  code = """
      import warnings
      warnings.simplefilter("error")
      from optax_soaa._src import native
      print(native.available())
  """
  cache = str(tmp_path / "cache")
  built = _python(code, OPTAX_SOAA_CACHE_DIR=cache)
  assert built.stdout.strip() == "True", built.stderr
  assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".so"]
  disabled = _python(code, OPTAX_SOAA_CACHE_DIR=cache, OPTAX_SOAA_NATIVE="0")
  assert disabled.stdout.strip() == "False", disabled.stderr


def test_failed_build_warns_and_falls_back(tmp_path):
  code = """
      import warnings
      import jax.numpy as jnp
      import optax_soaa
      from optax_soaa._src import native
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = optax_soaa.soaa(0.1, total_steps=10)
        params = {"w": jnp.ones((3,))}
        opt.update(params, opt.init(params), params, value=1.0)
      print(native.available(), [str(w.message)[:40] for w in caught])
  """
  result = _python(code, OPTAX_SOAA_CACHE_DIR=str(tmp_path), CXX="false")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("False"), result.stdout
  assert "optax_soaa: building the fused CPU" in result.stdout


@requires_kernels
def test_vmapped_update_matches_xla():
  # An ensemble: one optimizer step vmapped over three parameter sets (the
  # kernels then run once per member), and a zero-size leaf.
  params = {"w": jnp.stack([jnp.linspace(-1.0, 1.0, 5000) * k
                            for k in (1.0, 0.5, -2.0)]),
            "empty": jnp.zeros((3, 0))}
  grads = jax.tree.map(lambda x: jnp.sin(3 * x) + x, params)
  for make in (
      lambda c: optax_soaa.arturo(**tasks.ARTURO_FMNIST, chunk_size=c),
      lambda c: optax_soaa.soaa(0.05, total_steps=10, reduction_chunk_size=c),
  ):
    results = []
    for chunk in ("auto", None):
      opt = make(chunk)
      update = jax.jit(jax.vmap(
          lambda g, s, p: opt.update(g, s, p, value=jnp.float32(1.0))))
      state = jax.vmap(opt.init)(params)
      for _ in range(3):
        updates, state = update(grads, state, params)
      results.append((updates, state))
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@requires_kernels
def test_axis_name_sums_over_shards():
  # Parameters split over a mapped axis (here vmap, one CPU device): the
  # kernels' global sums must be psum-ed over it as XLA's are.
  shards = {"w": jnp.stack([jnp.linspace(-1.0, 1.0, 5000) * k
                            for k in (1.0, -0.5)])}
  grads = jax.tree.map(lambda x: jnp.sin(3 * x) + x, shards)
  results = []
  for chunk in ("auto", None):
    soaa = optax_soaa.soaa(0.05, total_steps=10, axis_name="shard",
                           reduction_chunk_size=chunk)
    arturo = optax_soaa.arturo(**tasks.ARTURO_FMNIST, axis_name="shard",
                               chunk_size=chunk)
    out = []
    for opt in (soaa, arturo):
      update = jax.jit(jax.vmap(
          lambda g, s, p, opt=opt: opt.update(g, s, p, value=jnp.float32(1.0)),
          axis_name="shard"))
      state = jax.vmap(opt.init)(shards)
      for _ in range(3):
        _, state = update(grads, state, shards)
      out.append(state)
    results.append(out)
  (soaa_fused, arturo_fused), (soaa_plain, arturo_plain) = results
  for name in ("predicted_reduction", "fisher_ratio", "dt"):
    values = getattr(soaa_fused[0], name)
    np.testing.assert_allclose(values[0], values[1], rtol=1e-6)  # global
    np.testing.assert_allclose(values, getattr(soaa_plain[0], name),
                               rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(arturo_fused.eta, arturo_plain.eta, rtol=1e-6)


@requires_kernels
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_kernels_match_their_jax_restatement(dtype):
  # native.py's jax.numpy restatements define the kernels' derivatives;
  # each kernel must compute what its restatement computes.
  with jax.enable_x64(dtype == jnp.float64):
    rng = np.random.default_rng(0)
    shape = (3, 2001)  # ragged last block
    arr = lambda scale=1.0, low=0.0: jnp.asarray(
        low + scale * rng.random(shape), dtype)
    g, p, b, h, lam = arr(2, -1), arr(2, -1), arr(0.1), arr(1, -0.3), arr(5, 1)
    covs = (arr(0.01), arr(0.001), arr(0.01))
    etas = jnp.asarray([0.5, 2.0, 7.0], dtype)
    for first, clip, decay in [(1.0, 0.0, 0.0), (0.0, 1.0, 1.0)]:
      scalars = native._scalars(
          [first, 1e-3, 2.0, 0.01, 1.3, 0.06, 1e-3 * decay, clip, decay],
          dtype)
      kernel = jax.jit(lambda *xs: native.arturo_filter(
          xs[0], xs[1], xs[2:8], list(scalars), etas))
      states, sums = kernel(g, p, lam, b, h, *covs)
      expected = native._arturo_filter_reference(
          g, p, lam, b, h, *covs, scalars, etas)
      chex.assert_trees_all_close((*states, sums), expected, rtol=2e-5,
                                  atol=1e-7)
      kl = native.arturo_kl(p, b, h, lam, list(scalars[jnp.array([3, 6, 7, 8])]),
                            etas)
      chex.assert_trees_all_close(kl, native._arturo_kl_reference(
          p, b, h, lam, scalars[jnp.array([3, 6, 7, 8])], etas), rtol=2e-5)
    m, s, v = arr(0.1, -0.05), arr(0.01), arr(0.01)
    for variance in (True, False):
      moments = [0.1, 0.9, 0.001, 0.999, 0.3, False]
      got = jax.jit(lambda g, m, s, v: native.soaa_moments(
          g, m, s, v, moments))(g, m, s, v if variance else None)
      expected = native._soaa_moments_reference(
          g, m, s, v, native._scalars(moments, dtype), variance=variance)
      chex.assert_trees_all_close(
          [x for x in got if x is not None],
          [x for x, keep in zip(expected, (1, 1, variance, 1)) if keep],
          rtol=2e-5, atol=1e-9)
    pr_scalars = [10.0, 1000.0, 1.7, 1.2, 1e-8]
    chex.assert_trees_all_close(
        native.soaa_predicted_reduction(m, s, v, pr_scalars),
        native._soaa_predicted_reduction_reference(
            m, s, v, native._scalars(pr_scalars, dtype))[0][0],
        rtol=2e-5)


@requires_kernels
def test_derivatives_through_update_match_xla():
  # The kernels are differentiated as their jax.numpy restatements: a
  # hypergradient through three SOAA steps (reverse mode, the learning rate
  # injected) and a forward-mode derivative through two arTuRO steps (its
  # bisection is a while_loop) equal the XLA path's.
  params = _params()

  def loss_fn(p):
    return sum(jnp.sum(jnp.sin(3 * x) + x**2) for x in jax.tree.leaves(p))

  def after_soaa(lr, chunk):
    opt = optax.inject_hyperparams(
        optax_soaa.soaa, static_args=("total_steps", "reduction_chunk_size"))(
            learning_rate=lr, total_steps=10, reduction_chunk_size=chunk)
    p, state = params, opt.init(params)
    for _ in range(3):
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, state = opt.update(grads, state, p, value=loss)
      p = optax.apply_updates(p, updates)
    return loss_fn(p) + state.inner_state[0].predicted_reduction

  def after_arturo(kl_bound, chunk):
    opt = optax_soaa.arturo(**{**tasks.ARTURO_FMNIST, "kl_bound": kl_bound},
                            chunk_size=chunk)
    p, state = params, opt.init(params)
    for _ in range(2):
      updates, state = opt.update(jax.grad(loss_fn)(p), state, p)
      p = optax.apply_updates(p, updates)
    return loss_fn(p)

  grads = [jax.jit(jax.grad(after_soaa), static_argnums=1)(0.05, chunk)
           for chunk in ("auto", None)]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5)
  tangents = [jax.jvp(lambda k, c=chunk: after_arturo(k, c), (0.1,), (1.0,))
              for chunk in ("auto", None)]
  np.testing.assert_allclose(tangents[0], tangents[1], rtol=1e-5)
