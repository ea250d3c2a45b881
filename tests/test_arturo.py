"""Tests of optax_soaa.arturo (arTuRO, arXiv 2310.20574)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_soaa
from optax_soaa.benchmarks import tasks
try:
  from _arturo_reference import ReferenceArturo
except ImportError:  # tests/ imported as a package
  from tests._arturo_reference import ReferenceArturo

# The reference repository's tuned Fashion-MNIST CNN values, without their
# weight decay (the reference comparison runs at weight_decay = 0).
FMNIST = {k: v for k, v in tasks.ARTURO_FMNIST.items() if k != "weight_decay"}


def _nested_params(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "dense": {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=(3,))},
      "conv": (rng.normal(size=(2, 2, 3)), rng.normal(size=(5,))),
      "scale": rng.normal(size=()),
  }, dtype


def _params(dtype=jnp.float32, seed=0):
  tree, dtype = _nested_params(dtype, seed)
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def _loss(params, scale=1.0):
  """A smooth non-quadratic loss: its curvature changes along the path."""
  return scale * sum(
      jnp.sum(jnp.sin(x) + 0.5 * x**2 + 0.1 * x**4 / (1 + x**2))
      for x in jax.tree.leaves(params)
  )


def _run_against_reference(hp, steps, *, loss_scale=1.0, **options):
  """Runs both implementations side by side; returns the reference object."""
  params = _params(jnp.float64)
  opt = optax_soaa.arturo(**hp, **options)
  chained_state = opt.init(params)
  ref = ReferenceArturo(**hp)
  ref.init([np.asarray(x) for x in jax.tree.leaves(params)])
  grad_fn = jax.jit(jax.grad(functools.partial(_loss, scale=loss_scale)))
  update = jax.jit(opt.update)
  for _ in range(steps):
    grads = grad_fn(params)
    updates, chained_state = update(grads, chained_state, params)
    state = chained_state[0]
    ref_updates = ref.step(
        [np.asarray(x) for x in jax.tree.leaves(grads)],
        [np.asarray(x) for x in jax.tree.leaves(params)],
    )
    # float64 round-off only (the NumPy reference groups the filter's
    # products in another order and sums each leaf's KL first).
    rtol = 1e-10
    np.testing.assert_allclose(float(state.eta), ref.eta, rtol=rtol)
    assert int(state.bisection_steps) == ref.bisection_steps
    np.testing.assert_allclose(float(state.kl), ref.kl, rtol=rtol)
    for name, ref_name in (("b", "b"), ("h", "h"), ("p00", "p00"),
                           ("p01", "p01"), ("p11", "p11"),
                           ("precision", "step_precision")):
      for got, want in zip(
          jax.tree.leaves(getattr(state, name)), getattr(ref, ref_name)
      ):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0,
                                   err_msg=name)
    for got, want in zip(jax.tree.leaves(updates), ref_updates):
      np.testing.assert_allclose(got, want, rtol=rtol, atol=0)
    params = optax.apply_updates(params, updates)
  return ref


# Whole arrays here; the next test runs the passes slice by slice.
@pytest.mark.usefixtures("x64")
def test_matches_float64_reference_fmnist_hyperparameters():
  ref = _run_against_reference(FMNIST, 45, chunk_size=None)
  assert ref.count == 45


@pytest.mark.usefixtures("x64")
def test_matches_reference_with_schedule_weight_decay_k_section_chunks():
  # chunk_size=3 runs the filter and the KL sums slice by slice, as large
  # leaves run on CPU: the 12-element leaves in slices of 4, the 5-element
  # leaf in a slice of 3 and a last slice of 2.
  schedule = optax.piecewise_constant_schedule(0.08, {10: 0.5, 25: 0.2})
  hp = dict(FMNIST, kl_bound=schedule, weight_decay=1e-2)
  ref = _run_against_reference(hp, 40, levels_per_pass=3, chunk_size=3)
  assert ref.count == 40


@pytest.mark.usefixtures("x64")
def test_matches_reference_with_early_stop_and_eta_cap():
  # A steep loss drives η to the max_eta cap; a loose kl_bound and a tight
  # eta_tol make the early stop |d| < 0.1 ε end the loop.
  hp = dict(FMNIST, kl_bound=0.5, max_eta=4.0, eta_tol=1e-3)
  ref = _run_against_reference(hp, 40, loss_scale=30.0)
  assert ref.capped_steps > 0, "the bracket never reached max_eta"
  assert ref.early_stops > 0, "the early stop never fired"


def _small_params(dtype=jnp.float32):
  return {
      "w": jnp.asarray([[0.5, -1.0], [1.5, 0.2], [-0.7, 0.9]], dtype),
      "b": jnp.asarray([0.3, -0.4], dtype),
  }


def _run(opt, params, n, jit=True, **extra):
  """n steps on `_loss`: params, final state, updates and bisection steps."""

  def step(params, state):
    grads = jax.grad(_loss)(params)
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), updates, state

  step = jax.jit(step) if jit else step
  state = opt.init(params)
  all_updates = []
  steps_taken = []
  for _ in range(n):
    params, updates, state = step(params, state)
    all_updates.append(updates)
    steps_taken.append(int(optax.tree.get(state, "bisection_steps")))
  return params, state, all_updates, steps_taken


def test_no_recompilation_and_jit_matches_eager():
  params = _small_params()
  opt = optax_soaa.arturo(**FMNIST)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)
    grads = jax.grad(_loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  p_jit, s_jit = step(params, opt.init(params))
  p_jit, s_jit = step(p_jit, s_jit)
  assert len(traces) == 1
  p_eager, s_eager, _, _ = _run(opt, params, 2, jit=False)
  chex.assert_trees_all_close(p_jit, p_eager, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s_jit, s_eager, rtol=1e-5, atol=1e-6)


def test_inject_hyperparams_matches():
  params = _small_params()
  plain = optax_soaa.arturo(**FMNIST)
  injected = optax.inject_hyperparams(
      optax_soaa.arturo, static_args=("eta_tol", "max_eta")
  )(**FMNIST)
  _, s_plain, u_plain, _ = _run(plain, params, 3)
  _, s_inj, u_inj, _ = _run(injected, params, 3)
  chex.assert_trees_all_close(u_plain, u_inj, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(s_plain, s_inj.inner_state, rtol=1e-6,
                              atol=1e-7)
  np.testing.assert_allclose(optax.tree.get(s_inj, "eta"), s_plain[0].eta)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtypes_and_state_stable_under_cond(dtype):
  params = _small_params(dtype)
  grads = jax.grad(_loss)(params)
  opt = optax_soaa.arturo(**FMNIST)

  @jax.jit
  def maybe_step(pred, state):
    return jax.lax.cond(
        pred, lambda s: opt.update(grads, s, params), lambda s: (grads, s),
        state,
    )

  state = opt.init(params)
  updates, new_state = maybe_step(True, state)
  chex.assert_trees_all_equal_dtypes(updates, params)
  chex.assert_tree_all_finite(updates)
  for name in ("b", "h", "p00", "p01", "p11", "precision"):
    for leaf in jax.tree.leaves(getattr(new_state[0], name)):
      assert leaf.dtype == jnp.float32, name
  chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
  assert jax.tree.structure(state) == jax.tree.structure(new_state)
  assert int(new_state[0].bisection_steps) > 0
  _, kept = maybe_step(False, new_state)
  chex.assert_trees_all_equal(kept, new_state)


def test_multisteps_emits_zeros_on_micro_steps():
  params = _small_params()
  grads = jax.grad(_loss)(params)
  opt = optax.MultiSteps(optax_soaa.arturo(**FMNIST), every_k_schedule=3)
  state = opt.init(params)
  update = jax.jit(opt.update)
  for micro in range(3):
    updates, state = update(grads, state, params)
    zero = all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    assert zero == (micro < 2)
  assert int(optax.tree.get(state, "count")) == 1


def test_constant_schedule_equals_constant():
  params = _small_params()
  const = optax_soaa.arturo(**FMNIST)
  sched = optax_soaa.arturo(**dict(FMNIST, kl_bound=optax.constant_schedule(
      FMNIST["kl_bound"])))
  p1, s1, _, _ = _run(const, params, 3)
  p2, s2, _, _ = _run(sched, params, 3)
  chex.assert_trees_all_close(p1, p2, rtol=1e-6)
  chex.assert_trees_all_close(s1, s2, rtol=1e-6)


def test_in_chain_after_clipping_and_extra_args_ignored():
  params = _small_params()
  grads = jax.grad(_loss)(params)
  chained = optax.chain(
      optax.clip_by_global_norm(0.5), optax_soaa.arturo(**FMNIST)
  )
  alone = optax_soaa.arturo(**FMNIST)
  clipped, _ = optax.clip_by_global_norm(0.5).update(grads, None)
  u1, s1 = jax.jit(functools.partial(chained.update, value=1.0, unknown=3))(
      grads, chained.init(params), params)
  u2, s2 = jax.jit(alone.update)(clipped, alone.init(params), params)
  chex.assert_trees_all_close(u1, u2, rtol=1e-6)
  np.testing.assert_allclose(optax.tree.get(s1, "eta"), s2[0].eta)
  assert int(optax.tree.get(s1, "bisection_steps")) > 0


def test_k_section_gives_the_bisection_eta_bit_for_bit():
  # float32, where a change in summation order would show first. (The x64
  # reference test runs the k-section too.)
  hp = dict(FMNIST, kl_bound=0.3, eta_tol=1e-4)
  params = _small_params()
  plain = optax_soaa.arturo(**hp, levels_per_pass=1, chunk_size=3)
  k_section = optax_soaa.arturo(**hp, levels_per_pass=3, chunk_size=3)
  _, s1, u1, steps = _run(plain, params, 10)
  _, s2, u2, _ = _run(k_section, params, 10)
  assert max(steps) > 3 * 3  # the replay went past three passes
  chex.assert_trees_all_equal(s1, s2)
  chex.assert_trees_all_equal(u1, u2)


def test_clip_curvature_guard_keeps_the_step_finite():
  # A concave loss: the filter's h turns negative, so h + ρ p0 + η λ can
  # reach zero at some η, which the reference does not guard against.
  hp = dict(FMNIST, kl_bound=0.05)
  params = jax.tree.map(lambda x: 0.3 * x, _small_params())
  concave = lambda p: -sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

  def run(opt):
    @jax.jit
    def step(p, state):
      updates, state = opt.update(jax.grad(concave)(p), state, p)
      return optax.apply_updates(p, updates), state

    p, state = params, opt.init(params)
    for _ in range(15):
      p, state = step(p, state)
    return state

  s_faithful = run(optax_soaa.arturo(**hp))
  s_guarded = run(optax_soaa.arturo(**hp, clip_curvature=True))
  assert any(bool(jnp.any(h < 0)) for h in jax.tree.leaves(s_faithful[0].h))
  assert all(bool(jnp.all(lam > 0))
             for lam in jax.tree.leaves(s_guarded[0].precision))
  chex.assert_tree_all_finite(s_guarded)


# Convergence: the reference's tuned Fashion-MNIST hyperparameters, untouched
# (arTuRO is meant to run with one setting; ε = 0.086 moves the mean by a
# fixed KL and the filter's curvature turns that into damped Newton steps).
# 1000 steps: Rosenbrock from (0, 0) needs about 600 to reach 3e-2. The
# residual ~1e-4 on the quadratics is the prior's pull (ρ p0 in the
# denominator of the mean).
_MATRIX = np.array([[1.0, 2.0], [3.0, 4.0]])
PROBLEMS = {
    "parabola": (
        lambda p: jnp.sum((p - jnp.array([1.0, -2.0, 3.0])) ** 2),
        jnp.zeros(3), jnp.array([1.0, -2.0, 3.0]),
    ),
    "rosenbrock": (
        lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2,
        jnp.zeros(2), jnp.ones(2),
    ),
    "matrix": (
        lambda p: jnp.sum((p - _MATRIX) ** 2),
        jnp.zeros((2, 2)), jnp.asarray(_MATRIX),
    ),
    "mixed": (
        lambda p: jnp.sum((p["v"] - jnp.array([1.0, -1.0])) ** 2)
        + jnp.sum((p["m"] - _MATRIX) ** 2),
        {"v": jnp.zeros(2), "m": jnp.zeros((2, 2))},
        {"v": jnp.array([1.0, -1.0]), "m": jnp.asarray(_MATRIX)},
    ),
}


@pytest.fixture(scope="module")
def converged():
  """Final params of 1000 steps on every problem, in one compiled program."""
  opt = optax_soaa.arturo(**FMNIST)

  def solve(loss, start):
    def body(carry, _):
      params, state = carry
      updates, state = opt.update(jax.grad(loss)(params), state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(
        body, (start, opt.init(start)), None, length=1000
    )
    return params

  names = sorted(PROBLEMS)
  finals = jax.jit(
      lambda starts: [solve(PROBLEMS[n][0], x) for n, x in zip(names, starts)]
  )([PROBLEMS[n][1] for n in names])
  return dict(zip(names, finals))


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_converges(problem, converged):
  chex.assert_trees_all_close(
      converged[problem], PROBLEMS[problem][2], atol=3e-2
  )


@pytest.mark.parametrize(
    "name, value",
    [
        ("kl_bound", 0.0),
        ("kl_bound", -0.1),
        ("reg_weight", -1.0),
        ("prior_prec", -1.0),
        ("dynamic_model_noise", -1e-3),
        ("measurement_noise", -1.0),
        ("start_filter_cov", -1e-5),
        ("var_init", 0.0),
        ("eta_tol", 0.0),
        ("nu", -0.5),
        ("weight_decay", -1e-4),
        ("max_eta", 0.0),
        ("levels_per_pass", 0),
        ("chunk_size", 0),
    ],
)
def test_bad_input_raises(name, value):
  with pytest.raises(ValueError, match=name):
    optax_soaa.arturo(**dict(FMNIST, **{name: value}))


def test_reg_weight_plus_nu_must_be_positive_and_params_required():
  with pytest.raises(ValueError, match="reg_weight"):
    optax_soaa.arturo(**dict(FMNIST, reg_weight=0.0, nu=0.0))
  params = _small_params()
  grads = jax.grad(_loss)(params)
  opt = optax_soaa.arturo(**FMNIST)
  with pytest.raises(ValueError, match="params"):
    opt.update(grads, opt.init(params))


def test_no_bisection_when_the_bracket_starts_narrow():
  # The filter's pass always sums the KL at the first midpoint; when the
  # bracket is already no wider than eta_tol the bisection must ignore
  # that sum: no step counted, the last KL kept, η the bracket's middle.
  hp = dict(FMNIST, eta_tol=1e3, max_eta=1e3)
  opt = optax_soaa.arturo(**hp, chunk_size=4)
  params = _small_params()
  _, chained1, _, steps1 = _run(opt, params, 1)
  assert steps1 == [0]  # [0, max_eta] is exactly eta_tol wide
  s1 = chained1[0]
  np.testing.assert_allclose(s1.eta, 500.0)
  step = jax.jit(opt.update)
  grads = jax.grad(_loss)(params)
  updates, chained2 = step(grads, chained1, params)
  s2 = chained2[0]
  assert int(s2.bisection_steps) == 0
  chex.assert_trees_all_equal(s2.kl, s1.kl)
  want = (s1.eta / 3 + jnp.minimum(3 * s1.eta, 1e3)) / 2
  np.testing.assert_allclose(s2.eta, want, rtol=1e-6)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_arturo_is_scale_by_arturo_negated():
  # optax's pattern (as optax.rprop): the alias chains the transformation
  # with scale(-1); the ArturoState is the chain's first state.
  params = _small_params()
  grads = jax.grad(_loss)(params)
  alias = optax_soaa.arturo(**FMNIST)
  transform = optax_soaa.scale_by_arturo(**FMNIST)
  state = alias.init(params)
  assert isinstance(state[0], optax_soaa.ArturoState)
  assert state[1] == optax.EmptyState()
  chex.assert_trees_all_equal(state[0], transform.init(params))
  u_alias, s_alias = jax.jit(alias.update)(grads, state, params)
  u_transform, s_transform = jax.jit(transform.update)(
      grads, state[0], params)
  chex.assert_trees_all_equal(u_alias, jax.tree.map(jnp.negative,
                                                    u_transform))
  chex.assert_trees_all_equal(s_alias[0], s_transform)
  # The alias's sign is the one that descends.
  assert _loss(optax.apply_updates(params, u_alias)) < _loss(params)
