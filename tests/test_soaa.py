"""Tests of SOAA against a float64 restatement of the algorithm and the optax
contract."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_soaa
from tests import _soaa_reference as ref

# A nested pytree of several shapes (scalar, vector, matrix, 3-D).
SHAPES = {"w": (3, 4), "b": (4,), "nested": ({"k": (2, 3, 2)}, ()), "s": ()}


def _params(dtype=jnp.float32, seed=0):
  leaves, treedef = jax.tree.flatten(
      SHAPES, is_leaf=lambda x: isinstance(x, tuple) and all(
          isinstance(i, int) for i in x))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      treedef, [jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves)])


def _loss_and_grad_np(params):
  """A smooth non-quadratic loss on flat float64 leaves: value and gradient."""
  value = 0.0
  grads = []
  for i, p in enumerate(params):
    scale = 1.0 + 0.5 * i
    value += 0.5 * scale * np.sum((p - 0.3) ** 2) + 0.1 * np.sum(np.sin(3 * p))
    grads.append(scale * (p - 0.3) + 0.3 * np.cos(3 * p))
  return value, grads


# float64 round-off, amplified by the trust-ratio feedback over 40 steps.
RTOL = 1e-10

REFERENCE_CASES = {
    "variance": dict(curvature="variance", with_value=True, weight_decay=0.0,
                     schedule=False),
    "second_moment": dict(curvature="second_moment", with_value=True,
                          weight_decay=0.0, schedule=False),
    "no_value": dict(curvature="variance", with_value=False, weight_decay=0.0,
                     schedule=False),
    "weight_decay": dict(curvature="variance", with_value=True,
                         weight_decay=0.1, schedule=False),
    "schedule": dict(curvature="variance", with_value=True, weight_decay=0.0,
                     schedule=True),
    "second_moment_decay_schedule": dict(
        curvature="second_moment", with_value=True, weight_decay=0.05,
        schedule=True),
    "none": dict(curvature="none", with_value=True, weight_decay=0.0,
                 schedule=False),
    "none_decay_schedule": dict(curvature="none", with_value=True,
                                weight_decay=0.05, schedule=True),
    # A loss on two steps of three: the predicted reduction of a step with
    # a loss is formed in the next update, with or without its own loss.
    "some_values": dict(curvature="variance", with_value=True,
                        weight_decay=0.0, schedule=False, skip_value=3),
}


# chunk_size=5: the passes run in slices of 4 to 6 elements over the larger
# leaves (the CPU's layout at scale), whole arrays over the rest.
@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("case", list(REFERENCE_CASES))
@pytest.mark.filterwarnings("ignore::optax_soaa.MissingValueWarning")
def test_matches_numpy_reference(case, chunk_size, x64):
  cfg = REFERENCE_CASES[case]
  hp = dict(b1=0.9, b2=0.99, gamma=0.1, eps=1e-8,
            weight_decay=cfg["weight_decay"], total_steps=50,
            curvature=cfg["curvature"])
  lr = (optax.cosine_decay_schedule(0.05, 40, alpha=0.1) if cfg["schedule"]
        else 0.05)
  opt = optax_soaa.soaa(lr, **hp, chunk_size=chunk_size)
  params = _params(jnp.float64)
  leaves, treedef = jax.tree.flatten(params)
  np_params = [np.asarray(x, np.float64) for x in leaves]
  state = opt.init(params)
  ref_state = ref.init(np_params, cfg["curvature"])
  lr_fn = lr if callable(lr) else (lambda count: lr)
  update = jax.jit(opt.update)
  dts = []
  for step in range(40):
    value, np_grads = _loss_and_grad_np(np_params)
    grads = jax.tree.unflatten(treedef, [jnp.asarray(g) for g in np_grads])
    params = jax.tree.unflatten(treedef, [jnp.asarray(p) for p in np_params])
    if cfg.get("skip_value") and step % cfg["skip_value"] == 1:
      value = None
    with_value = cfg["with_value"] and value is not None
    kwargs = {"value": jnp.asarray(value)} if with_value else {}
    updates, state = update(grads, state, params, **kwargs)
    # The library forms a step's predicted reduction in the next update:
    # after update t it holds the reference's pr after step t - 1.
    ref_pr = ref_state.pr
    ref_updates, ref_state = ref.step(
        ref_state, np_grads, np_params,
        value if with_value else None, lr_fn=lr_fn, **hp)
    close = functools.partial(chex.assert_trees_all_close, rtol=RTOL, atol=0)
    close(jax.tree.leaves(updates), ref_updates)
    soaa_state = state[0]
    close(jax.tree.leaves(soaa_state.mu), ref_state.m)
    close(jax.tree.leaves(soaa_state.nu), ref_state.s)
    if cfg["curvature"] == "variance":
      # At t = 1 the reference keeps the rounding residue of (g - m̂)²
      # (about 1e-36) where the library sets the exact 0.
      chex.assert_trees_all_close(jax.tree.leaves(soaa_state.curvature),
                                  ref_state.v, rtol=RTOL, atol=1e-30)
    else:
      assert soaa_state.curvature is None
    for name, ref_value in [
        ("dt", ref_state.dt), ("loss_avg", ref_state.loss_avg),
        ("predicted_reduction", ref_pr),
        ("trust_ratio", ref_state.trust_ratio),
        ("fisher_ratio", ref_state.fisher_ratio)]:
      np.testing.assert_allclose(
          getattr(soaa_state, name), ref_value, rtol=RTOL, atol=0,
          err_msg=name)
    assert int(soaa_state.count) == ref_state.t
    dts.append(float(soaa_state.dt))
    np_params = [p + u for p, u in zip(np_params, ref_updates)]
  if cfg["with_value"]:
    # The trust region must actually move, or the comparison proves little.
    assert len(set(np.round(dts, 12))) > 5, dts
  else:
    assert set(dts) == {1.0}


def test_first_step_sets_dt_to_one_in_float32():
  """At t = 1 the numerator is exactly 0 (spec): dt = lower bound = 1."""
  params = {"w": jnp.full((5,), 0.7, jnp.float32)}
  opt = optax_soaa.scale_by_soaa(0.1, total_steps=10)
  state = opt.init(params)
  for loss in [3.14159, 1e6, 7e-3]:
    _, new_state = opt.update(params, state, params, value=jnp.float32(loss))
    assert float(new_state.dt) == 1.0
    assert float(new_state.trust_ratio) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_first_step_variance_is_exactly_zero(dtype):
  """v after step 1 is (g - m̂)² = 0 exactly, not rounding noise."""
  params = _params(dtype)
  grads = jax.tree.map(lambda p: (p * 3.7 + 0.1).astype(dtype), params)
  opt = optax_soaa.scale_by_soaa(0.1, total_steps=10, curvature="variance")
  updates, state = jax.jit(opt.update)(grads, opt.init(params), params,
                                       value=jnp.float32(1.0))
  chex.assert_trees_all_equal(state.curvature,
                              optax.tree.zeros_like(params))
  # With v = 0 the first step is Adam's: m̂ / (sqrt(ŝ) + eps) = sign(g).
  chex.assert_trees_all_close(
      jax.tree.map(lambda u: u.astype(jnp.float32), updates),
      jax.tree.map(lambda g: jnp.sign(g).astype(jnp.float32), grads),
      atol=1e-2)


def test_non_finite_value_keeps_trust_region_state():
  params = {"w": jnp.arange(3.0)}
  opt = optax_soaa.scale_by_soaa(0.1, total_steps=10)
  update = jax.jit(opt.update)
  state = opt.init(params)
  for v in [2.0, 1.5, 1.2]:
    _, state = update(params, state, params, value=v)
  assert bool(state.pending_reduction)
  for i, bad in enumerate([jnp.nan, jnp.inf, -jnp.inf]):
    _, new_state = update(params, state, params, value=bad)
    for name in ["dt", "loss_avg", "trust_ratio"]:
      assert float(getattr(new_state, name)) == float(getattr(state, name))
    # The first update after the last finite loss forms that step's
    # predicted reduction; a step without a finite loss leaves none to form.
    assert not bool(new_state.pending_reduction)
    pr, old_pr = new_state.predicted_reduction, state.predicted_reduction
    assert (float(pr) != float(old_pr)) == (i == 0)
    assert int(new_state.skipped_values) == int(state.skipped_values) + 1
    # Moments still advance.
    assert int(new_state.count) == int(state.count) + 1
    state = new_state
  chex.assert_tree_all_finite(state)


# -- Convergence -------------------------------------------------------------

TARGETS = {
    "parabola": (
        lambda p: jnp.sum((p - jnp.array([1.0, -2.0, 3.0])) ** 2),
        jnp.zeros(3), jnp.array([1.0, -2.0, 3.0])),
    "rosenbrock": (
        lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2,
        jnp.zeros(2), jnp.ones(2)),
    "matrix": (
        lambda p: jnp.sum((p - jnp.array([[1.0, -0.5], [0.25, 2.0]])) ** 2),
        jnp.zeros((2, 2)), jnp.array([[1.0, -0.5], [0.25, 2.0]])),
    "mixed": (
        lambda p: jnp.sum((p["v"] - 1.5) ** 2)
        + jnp.sum((p["m"] - jnp.array([[0.5, -1.0], [2.0, 0.0]])) ** 2),
        {"v": jnp.zeros(3), "m": jnp.zeros((2, 2))},
        {"v": jnp.full(3, 1.5), "m": jnp.array([[0.5, -1.0], [2.0, 0.0]])}),
}


@functools.partial(jax.jit, static_argnames=("loss_fn", "opt", "num_steps"))
def _minimise(params, loss_fn, opt, num_steps):
  def body(_, carry):
    params, state = carry
    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state
  return jax.lax.fori_loop(0, num_steps, body, (params, opt.init(params)))


@pytest.mark.parametrize("curvature", ["second_moment", "variance", "none"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_converges(target, curvature):
  loss_fn, init, solution = TARGETS[target]
  opt = optax_soaa.soaa(1e-2, total_steps=30_000, curvature=curvature)
  params, state = _minimise(init, loss_fn, opt, 30_000)
  chex.assert_trees_all_close(params, solution, atol=3e-2)
  chex.assert_tree_all_finite(state)


# -- The optax contract -----------------------------------------------------

def _run(opt, params, num_steps=5, jit=True, value=True):
  def loss_fn(p):
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32) - 0.5))
               for x in jax.tree.leaves(p))

  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    extra = {"value": loss} if value else {}
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, updates

  step = jax.jit(step) if jit else step
  state = opt.init(params)
  for _ in range(num_steps):
    params, state, updates = step(params, state)
  return params, state, updates


@pytest.mark.parametrize("curvature", ["second_moment", "variance", "none"])
def test_jit_matches_no_jit(curvature):
  opt = optax_soaa.soaa(0.05, total_steps=20, curvature=curvature,
                        weight_decay=0.01)
  jitted = _run(opt, _params(), num_steps=3, jit=True)
  eager = _run(opt, _params(), num_steps=3, jit=False)
  # float32 rounding (fused or not), which dt's feedback on the predicted
  # reduction amplifies to about 2e-5 in a few steps.
  chex.assert_trees_all_close(jitted, eager, rtol=5e-5, atol=1e-7)


def test_no_recompilation():
  opt = optax_soaa.soaa(0.05, total_steps=20)
  traces = []

  @jax.jit
  def step(params, state, value):
    traces.append(1)
    updates, state = opt.update(params, state, params, value=value)
    return optax.apply_updates(params, updates), state

  params = _params()
  state = opt.init(params)
  for i in range(4):
    params, state = step(params, state, jnp.float32(1.0 / (i + 1)))
  assert len(traces) == 1


@pytest.mark.parametrize("curvature", ["second_moment", "variance", "none"])
def test_inject_hyperparams_matches(curvature, x64):
  # In x64 the injected (array) hyperparameters and the Python floats round
  # alike, so the two runs agree to float64 round-off.
  kwargs = dict(b1=0.8, b2=0.99, gamma=0.2, eps=1e-7, weight_decay=0.01)
  plain = optax_soaa.soaa(0.05, total_steps=30, curvature=curvature, **kwargs)
  injected = optax.inject_hyperparams(
      optax_soaa.soaa, static_args=("total_steps", "curvature"))(
          0.05, total_steps=30, curvature=curvature, **kwargs)
  p1, s1, u1 = _run(plain, _params(jnp.float64), num_steps=6)
  p2, s2, u2 = _run(injected, _params(jnp.float64), num_steps=6)
  chex.assert_trees_all_close(p1, p2, rtol=1e-12)
  chex.assert_trees_all_close(u1, u2, rtol=1e-10, atol=1e-15)
  chex.assert_trees_all_close(s1, s2.inner_state, rtol=1e-10, atol=1e-15)
  np.testing.assert_allclose(optax.tree.get(s2, "dt"),
                             optax.tree.get(s1, "dt"), rtol=1e-12)


def test_inject_hyperparams_schedule_in_float32():
  schedule = optax.linear_schedule(0.05, 0.01, 10)
  plain = optax_soaa.soaa(schedule, total_steps=30)
  injected = optax.inject_hyperparams(
      optax_soaa.soaa, static_args=("total_steps", "curvature"))(
          schedule, total_steps=30)
  p1, s1, u1 = _run(plain, _params(), num_steps=6)
  p2, s2, u2 = _run(injected, _params(), num_steps=6)
  # float32: 1 - b1 rounds differently for a Python float and an array.
  chex.assert_trees_all_close(p1, p2, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(s1[0], s2.inner_state[0], rtol=1e-4, atol=1e-6)


def test_constant_schedule_equals_constant():
  p1, s1, u1 = _run(optax_soaa.soaa(0.05, total_steps=20), _params())
  p2, s2, u2 = _run(
      optax_soaa.soaa(optax.constant_schedule(0.05), total_steps=20), _params())
  chex.assert_trees_all_close((p1, u1, s1[0]), (p2, u2, s2[0]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_updates_keep_param_dtype(dtype):
  params = _params(dtype)
  opt = optax_soaa.soaa(0.05, total_steps=20)
  new_params, state, updates = _run(opt, params, num_steps=3)
  chex.assert_trees_all_equal_dtypes(updates, params)
  chex.assert_trees_all_equal_dtypes(new_params, params)
  soaa_state = state[0]
  for name in ["dt", "loss_avg", "predicted_reduction", "trust_ratio",
               "fisher_ratio"]:
    assert getattr(soaa_state, name).dtype == jnp.float32, name
  chex.assert_tree_all_finite(new_params)


def test_updates_keep_float64_dtype(x64):
  params = _params(jnp.float64)
  opt = optax_soaa.soaa(0.05, total_steps=20)
  new_params, state, updates = _run(opt, params, num_steps=2)
  chex.assert_trees_all_equal_dtypes(updates, params)
  assert state[0].dt.dtype == jnp.float64


@pytest.mark.parametrize("curvature", ["second_moment", "variance", "none"])
def test_state_stable_under_cond(curvature):
  opt = optax_soaa.soaa(0.05, total_steps=20, curvature=curvature)
  params = _params()
  state = opt.init(params)

  @jax.jit
  def step(params, state, take):
    def apply(state):
      return opt.update(params, state, params, value=jnp.float32(1.0))[1]
    return jax.lax.cond(take, apply, lambda s: s, state)

  new_state = step(params, state, True)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_multisteps_zero_on_micro_steps():
  opt = optax.MultiSteps(optax_soaa.soaa(0.05, total_steps=20),
                         every_k_schedule=3)
  params = _params()
  state = opt.init(params)
  update = jax.jit(opt.update)
  for i in range(6):
    updates, state = update(params, state, params, value=jnp.float32(1.0))
    if i % 3 != 2:
      chex.assert_trees_all_equal(updates, optax.tree.zeros_like(params))
    else:
      assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


def test_inside_chain_after_clipping():
  # In a chain, SOAA sees the clipped gradients and `value` reaches it
  # through `chain`: the same steps as SOAA fed the clipped gradients.
  clip = optax.clip_by_global_norm(1e-3)
  chained = optax.chain(clip, optax_soaa.soaa(0.05, total_steps=20))
  alone = optax_soaa.soaa(0.05, total_steps=20)
  params = _params()
  update_chained = jax.jit(chained.update)
  update_alone = jax.jit(alone.update)
  s_chained, s_alone = chained.init(params), alone.init(params)
  for loss in (2.0, 1.5, 1.4):
    grads = jax.tree.map(lambda p: p * loss, params)
    clipped, _ = clip.update(grads, None)
    u_chained, s_chained = update_chained(grads, s_chained, params,
                                          value=jnp.float32(loss))
    u_alone, s_alone = update_alone(clipped, s_alone, params,
                                    value=jnp.float32(loss))
    chex.assert_trees_all_close(u_chained, u_alone, rtol=1e-6)
  assert float(optax.tree.get(s_chained, "dt")) != 1.0  # dt moved
  chex.assert_trees_all_close(s_chained[1], s_alone, rtol=1e-6)


def test_apply_if_finite_skips_non_finite_step():
  opt = optax.apply_if_finite(optax_soaa.soaa(0.05, total_steps=20),
                              max_consecutive_errors=5)
  params = _params()
  state = opt.init(params)
  update = jax.jit(opt.update)
  updates, state = update(params, state, params, value=jnp.float32(2.0))
  bad_grads = jax.tree.map(lambda x: x.at[...].set(jnp.nan), params)
  bad_updates, bad_state = update(bad_grads, state, params,
                                  value=jnp.float32(1.0))
  chex.assert_trees_all_equal(bad_updates, optax.tree.zeros_like(params))
  chex.assert_trees_all_equal(bad_state.inner_state, state.inner_state)
  assert int(bad_state.notfinite_count) == 1


def test_extra_args_ignored_and_value_optional_with_a_warning():
  opt = optax_soaa.soaa(0.05, total_steps=20)
  params = _params()
  state = opt.init(params)
  with pytest.warns(optax_soaa.MissingValueWarning, match="value=loss"):
    u1, s1 = opt.update(params, state, params, unknown_argument=3, batch=None)
  assert float(optax.tree.get(s1, "dt")) == 1.0
  assert float(optax.tree.get(s1, "predicted_reduction")) == 0.0


def test_value_that_is_not_a_scalar_loss_gets_a_clear_error():
  opt = optax_soaa.soaa(0.05, total_steps=20)
  params = _params()
  state = opt.init(params)
  with pytest.raises(ValueError, match="scalar loss.*shape"):
    opt.update(params, state, params, value=jnp.ones(3))
  # What jax.value_and_grad(..., has_aux=True) returns as its value.
  with pytest.raises(TypeError, match="value=loss"):
    opt.update(params, state, params, value=(jnp.float32(1.0), {"acc": 0.5}))
  with pytest.raises(TypeError, match="value=loss"):
    jax.jit(opt.update)(params, state, params, value=(jnp.float32(1.0), None))


@pytest.mark.parametrize("kwargs, name", [
    (dict(b1=1.0), "b1"), (dict(b1=-0.1), "b1"),
    (dict(b2=1.0), "b2"), (dict(b2=-1e-3), "b2"),
    (dict(gamma=0.0), "gamma"), (dict(gamma=1.0), "gamma"),
    (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(total_steps=0), "total_steps"), (dict(total_steps=2.5), "total_steps"),
    (dict(total_steps=True), "total_steps"),
    (dict(curvature="diagonal"), "curvature"),
    (dict(learning_rate=-1e-3), "learning_rate"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size="whole"), "chunk_size"),
])
def test_bad_hyperparameters(kwargs, name):
  args = dict(learning_rate=1e-3, total_steps=10)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    optax_soaa.soaa(**args)


def test_chunked_sum_equals_single_sum():
  params = {"big": jnp.linspace(-1.0, 1.0, 1000).reshape(20, 50),
            "small": jnp.arange(3.0)}
  kw = dict(total_steps=20)
  chunked = _run(optax_soaa.soaa(0.05, chunk_size=64, **kw), params)
  single = _run(optax_soaa.soaa(0.05, chunk_size=None, **kw), params)
  # Summation order and fusion differ; dt's feedback amplifies the float32
  # rounding to about 2e-5.
  chex.assert_trees_all_close(chunked, single, rtol=5e-5, atol=1e-8)


def test_reduction_chunk_size_is_a_deprecated_name_of_chunk_size():
  params = {"big": jnp.linspace(-1.0, 1.0, 100), "small": jnp.arange(3.0)}
  with pytest.warns(DeprecationWarning, match="chunk_size"):
    old = optax_soaa.soaa(0.05, total_steps=20, reduction_chunk_size=16)
  new = optax_soaa.soaa(0.05, total_steps=20, chunk_size=16)
  chex.assert_trees_all_equal(_run(old, params), _run(new, params))
  with pytest.warns(DeprecationWarning), pytest.raises(
      ValueError, match="reduction_chunk_size"):
    optax_soaa.scale_by_soaa(0.05, total_steps=20, reduction_chunk_size=0)
  with pytest.warns(DeprecationWarning), pytest.raises(ValueError,
                                                       match="not both"):
    optax_soaa.soaa(0.05, total_steps=20, chunk_size=None,
                    reduction_chunk_size=16)


def test_state_memory():
  params = _params()
  adam_bytes = sum(x.nbytes for x in jax.tree.leaves(optax.adam(1e-3).init(params)))
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  for curvature, arrays in [("variance", 3), ("second_moment", 2), ("none", 2)]:
    state = optax_soaa.soaa(1e-3, total_steps=5, curvature=curvature).init(params)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    # Per-parameter arrays plus a handful of scalars.
    assert arrays * param_bytes <= state_bytes <= arrays * param_bytes + 64
  assert 2 * param_bytes <= adam_bytes <= 2 * param_bytes + 8


@pytest.mark.parametrize("curvature", ["second_moment", "none"])
def test_parameters_split_over_axis_name_equal_one_device(curvature):
  """Σ (v̂ + eps) counts the elements of every shard: with gradients small
  enough that eps matters, r and the step of a model split over a mapped
  axis equal those of the whole model."""
  grads = {"w": jnp.arange(1.0, 9.0) * 1e-6}
  whole = optax_soaa.scale_by_soaa(1e-2, total_steps=10, curvature=curvature)
  u_whole, s_whole = whole.update(grads, whole.init(grads),
                                  value=jnp.float32(1.0))
  split = optax_soaa.scale_by_soaa(1e-2, total_steps=10, curvature=curvature,
                                   axis_name="shards")

  def on_shard(g):
    return split.update(g, split.init(g), value=jnp.float32(1.0))

  u_split, s_split = jax.vmap(on_shard, axis_name="shards")(
      {"w": grads["w"].reshape(2, 4)})
  np.testing.assert_allclose(s_split.fisher_ratio, s_whole.fisher_ratio,
                             rtol=1e-6)
  np.testing.assert_allclose(u_split["w"].reshape(-1), u_whole["w"],
                             rtol=1e-6)


def test_eps_zero_keeps_the_trust_region_finite():
  """At t = 1 the observed reduction and pr are both 0: with eps = 0 the
  ratio is 0 / max(0, 0); it counts as 0, not NaN."""
  opt = optax_soaa.soaa(1e-2, total_steps=20, eps=0.0)
  params = {"w": jnp.array([0.5, -1.0, 2.0])}
  state = opt.init(params)
  for t in range(3):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.sum(jnp.square(p["w"] - 1.0)))(params)
    updates, state = opt.update(grads, state, params, value=loss)
    params = optax.apply_updates(params, updates)
    chex.assert_tree_all_finite((params, state))
    if t == 0:
      assert float(optax.tree.get(state, "dt")) == 1.0
