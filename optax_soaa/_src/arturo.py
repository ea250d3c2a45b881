"""arTuRO: information-theoretic trust-region optimization (arXiv 2310.20574)."""

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_soaa._src import passes
from optax_soaa._src import utils


class ArturoState(NamedTuple):
  """State of :func:`scale_by_arturo`: the filter, the search precision, η.

  ``F`` below is a leaf's statistics dtype: float32, or the param's dtype
  where wider (a bfloat16 model keeps its filter in float32). ``S`` is the
  scalar dtype: float32, or the params' widest dtype where wider. A complex
  parameter of shape ``shape`` counts as the real pairs (Re, Im): its
  leaves below have shape ``shape + (2,)`` and its real dtype.

  Attributes:
    count: shape ``()``, int32: the steps taken.
    b: like params, ``F``: the linear term ``b`` of the gradient model
      ``g ≈ h θ + b``.
    h: like params, ``F``: the diagonal Hessian estimate ``h``.
    p00: like params, ``F``: the filter's covariance of ``b``.
    p01: like params, ``F``: the filter's covariance of ``(b, h)``.
    p11: like params, ``F``: the filter's covariance of ``h``.
    precision: like params, ``F``: the search precision ``λ`` the last step
      used (that step's ``λ_new`` is formed at the start of the next one).
    eta: shape ``()``, ``S``: the dual variable ``η`` of the last step.
    bisection_steps: shape ``()``, int32: the bisection iterations (KL
      evaluations) of the last step.
    kl: shape ``()``, ``S``: ``½ Σ λ (μ_new(mid) - θ)²`` at the last midpoint
      the bisection evaluated (kept from the step before when it evaluated
      none).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_soaa
    >>> opt = optax_soaa.arturo(
    ...     0.05, reg_weight=0.06, prior_prec=0.0015, dynamic_model_noise=0.02,
    ...     measurement_noise=2.8, start_filter_cov=5e-5, nu=1.3)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.array([0.1, -0.2, 0.3])}, state,
    ...                             params)
    >>> arturo_state = state[0]  # arturo() is a chain: arTuRO's state first.
    >>> int(arturo_state.count), arturo_state.h["w"].shape
    (1, (3,))
    >>> bool(optax.tree.get(state, "eta") > 0)  # The dual variable, by name.
    True
  """

  count: jax.Array
  b: optax.Updates
  h: optax.Updates
  p00: optax.Updates
  p01: optax.Updates
  p11: optax.Updates
  precision: optax.Updates
  eta: jax.Array
  bisection_steps: jax.Array
  kl: jax.Array


# See `levels_per_pass` in `scale_by_arturo`'s docstring.
_DEFAULT_LEVELS_PER_PASS = 3


def _stats_dtype(leaf: Any) -> jnp.dtype:
  return jnp.promote_types(jnp.asarray(leaf).dtype, jnp.float32)


# A complex coordinate is two real ones: (Re z, Im z) in a trailing axis of 2,
# so that the filter, the KL and the bisection are those of the real problem.


def _as_real(tree: Any) -> Any:
  """Each complex leaf as its (Re, Im) pairs, shape ``shape + (2,)``."""
  return jax.tree.map(
      lambda x: jnp.stack([x.real, x.imag], axis=-1)
      if jnp.iscomplexobj(x) else x, tree)


def _like_complex(tree: Any, like: Any) -> Any:
  """Inverse of `_as_real` for the leaves that are complex in `like`."""
  return jax.tree.map(
      lambda x, y: jax.lax.complex(x[..., 0], x[..., 1]).astype(y.dtype)
      if jnp.iscomplexobj(y) else x, tree, like)


def _cast(x: Any, like: jax.Array) -> jax.Array:
  return jnp.asarray(x, like.dtype)


def _tree_of_midpoints(lo, hi, levels):
  """Midpoints the bisection visits in `levels` steps from [lo, hi].

  Heap order: node j has children 2j+1 (its lower half, d <= 0) and 2j+2 (its
  upper half, d > 0). Every midpoint is computed as the bisection computes
  it, (lo + hi) / 2 of the bracket it holds at that node, so replaying the
  decisions on these values is bit-for-bit the bisection.
  """
  brackets = [(lo, hi)]
  mids = []
  for _ in range(levels):
    next_brackets = []
    for l, h in brackets:
      mid = (l + h) / 2
      mids.append(mid)
      next_brackets += [(l, mid), (mid, h)]
    brackets = next_brackets
  return jnp.stack(mids)


# The model, per leaf. Named scalars: kl_bound ε, weight_decay,
# use_decay (static: False when weight_decay is the constant 0), reg_prior
# ρ p0, clip_curvature (static).


def _theta(p, b, *, kl_bound, weight_decay, use_decay, **_):
  """θ after the decoupled weight decay, in the statistics dtype."""
  theta = p.astype(b.dtype)
  if use_decay:
    theta = theta - theta * (_cast(kl_bound, b) * _cast(weight_decay, b))
  return theta


def _curvature(h, *, reg_prior, clip_curvature, **_):
  """h + ρ p0, the curvature of the primal and of λ_new."""
  h = jnp.maximum(h, 0) if clip_curvature else h
  return h + _cast(reg_prior, h)


def _new_mean(eta, p, b, h, lam, **scalars):
  """θ and the primal μ_new(η) = (η λ θ - b) / (h + ρ p0 + η λ)."""
  theta = _theta(p, b, **scalars)
  temp = lam * eta
  return theta, (temp * theta - b) / (_curvature(h, **scalars) + temp)


def _kl_terms(p, b, h, lam, *, etas, **scalars):
  """λ (μ_new(η_k) - θ)² for each η_k in `etas`: shape (K, *leaf)."""
  shape = (etas.shape[0],) + (1,) * jnp.ndim(b)
  theta, mu = _new_mean(etas.reshape(shape).astype(b.dtype), p, b, h, lam,
                        **scalars)
  return jnp.square(theta - mu) * lam


# The passes, per leaf (see `passes.run`).


def _filter(g, p, lam, b, h, p00, p01, p11, *, first, dynamic_model_noise,
            measurement_noise, reg_weight, nu, **scalars):
  """The filter's pass: λ_new of the last step, then the Kalman update."""
  next_lam = (_curvature(h, **scalars) + lam * _cast(nu, lam)) / (
      _cast(reg_weight, lam) + _cast(nu, lam))
  lam = jnp.where(first, lam, next_lam)
  theta = _theta(p, b, **scalars)
  g = g.astype(b.dtype)
  # At t = 1 the filter starts from b = g; `init` already holds the first
  # step's h, P00, P01 and P11.
  b = jnp.where(first, g, b)
  p00 = p00 + _cast(dynamic_model_noise, b)
  p11 = p11 + _cast(dynamic_model_noise, b)
  k0 = p00 + p01 * theta
  k1 = p01 + p11 * theta
  s = k0 + k1 * theta + _cast(measurement_noise, b)
  inv_s = 1 / s
  gain0 = k0 * inv_s
  gain1 = k1 * inv_s
  # b and h take the innovation as δ / S, one shared division: b_new then
  # never reads h nor h_new b, so both update in place.
  scaled_innovation = (g - theta * h - b) / s
  b = b + k0 * scaled_innovation
  h = h + k1 * scaled_innovation
  return (lam, b, h, p00 - gain0 * (s * gain0), p01 - gain0 * (s * gain1),
          p11 - gain1 * (s * gain1))


def _filtered_kl_terms(g, p, lam, b, h, *covariances, **scalars):
  """The KL terms at the first midpoints, from the filtered b, h."""
  del g, covariances
  return _kl_terms(p, b, h, lam, **scalars)


def _step(g, p, b, h, lam, *, eta, **scalars):
  """The final pass: θ - μ_new(η), with θ before the weight decay."""
  _, mu = _new_mean(eta.astype(b.dtype), p, b, h, lam, **scalars)
  return (p.astype(b.dtype) - mu).astype(g.dtype)


def scale_by_arturo(
    kl_bound: optax.ScalarOrSchedule,
    reg_weight: float,
    prior_prec: float,
    dynamic_model_noise: float,
    measurement_noise: float,
    start_filter_cov: float,
    var_init: float = 0.01,
    eta_tol: float = 0.5,
    nu: float = 0.0,
    weight_decay: float = 0.0,
    max_eta: float = 1e4,
    *,
    clip_curvature: bool = False,
    levels_per_pass: Optional[int] = None,
    chunk_size: Union[int, str, None] = "auto",
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""arTuRO's step, with optax's sign: ``θ - μ_new(η)``.

  The returned updates are the negative of the step arTuRO takes (as the
  updates of every ``scale_by_*`` transformation are, to be scaled by a
  negative number); :func:`arturo` is ``optax.chain(scale_by_arturo(...),
  optax.scale(-1.0))``, as :func:`optax.rprop` is built. The KL bound is
  the step size and acts inside the transformation, through the dual
  variable η: do not scale the updates by it again. See :func:`arturo` for
  the equations, the readings of the reference code and the arguments.

  ``update`` needs ``params`` (θ). Extra keyword arguments (``value=``
  included) are accepted and ignored.

  Examples:
    arTuRO's step under a step schedule of the KL bound (the authors decay
    it at fixed epochs), with its sign flipped as :func:`arturo` does:

    >>> import jax, jax.numpy as jnp, optax, optax_soaa
    >>> def loss_fn(params, x, y):
    ...   return jnp.mean((x @ params["w"] - y) ** 2)
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> y = x @ jnp.array([1.0, -2.0, 0.5])
    >>> params = {"w": jnp.zeros(3)}
    >>> kl_bound = optax.piecewise_constant_schedule(
    ...     0.0857, {150: 0.1, 225: 0.1})
    >>> opt = optax.chain(
    ...     optax_soaa.scale_by_arturo(
    ...         kl_bound, reg_weight=0.0587, prior_prec=0.0015,
    ...         dynamic_model_noise=0.0174, measurement_noise=2.82,
    ...         start_filter_cov=5e-5, nu=1.3),
    ...     optax.scale(-1.0))
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    ...   updates, state = opt.update(grads, state, params)
    ...   return optax.apply_updates(params, updates), state, loss
    >>> for _ in range(300):
    ...   params, state, loss = step(params, state)
    >>> bool(loss < 1e-2)
    True

  Args:
    kl_bound: ε > 0, the KL each step moves the search distribution by (the
      step size), a float or an optax schedule of the step count.
    reg_weight: ρ >= 0, weight of the prior (entropy) regulariser.
    prior_prec: p0 >= 0, prior precision.
    dynamic_model_noise: q >= 0, random-walk noise of the filter.
    measurement_noise: R >= 0, gradient noise of the filter.
    start_filter_cov: c0 >= 0, initial filter variance of b and h.
    var_init: initial search variance, > 0 (λ₀ = 1/var_init).
    eta_tol: absolute bisection tolerance on η, > 0.
    nu: ν >= 0, weight of the old precision in λ_new (ρ + ν must be > 0).
    weight_decay: decoupled decay >= 0, scaled by ε.
    max_eta: upper end of the η bracket, > 0.
    clip_curvature: use ``max(h, 0)`` in the primal and in λ_new (a guard
      the reference code does not have; see :func:`arturo`).
    levels_per_pass: bisection steps decided per evaluation of the KL sums
      (a positive int; ``None``: 2); the same η bit for bit. See
      :func:`arturo`.
    chunk_size: how the passes over memory are laid out (``"auto"``, a
      positive int or ``None``); the numbers do not depend on it beyond
      summation order. See :func:`arturo`.
    axis_name: name of a mapped axis over which the parameters are split;
      the KL sums are then ``psum``-ed over it.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is an
    :class:`ArturoState`.
  """
  (kl_bound, reg_weight, prior_prec, dynamic_model_noise, measurement_noise,
   start_filter_cov, var_init, eta_tol, nu, weight_decay, max_eta) = (
       utils.real_hyperparams(
           kl_bound=kl_bound, reg_weight=reg_weight, prior_prec=prior_prec,
           dynamic_model_noise=dynamic_model_noise,
           measurement_noise=measurement_noise,
           start_filter_cov=start_filter_cov, var_init=var_init,
           eta_tol=eta_tol, nu=nu, weight_decay=weight_decay,
           max_eta=max_eta))
  utils.check_schedule_or_nonneg("kl_bound", kl_bound, positive=True)
  for name, value in (
      ("reg_weight", reg_weight), ("prior_prec", prior_prec),
      ("dynamic_model_noise", dynamic_model_noise),
      ("measurement_noise", measurement_noise),
      ("start_filter_cov", start_filter_cov), ("nu", nu),
      ("weight_decay", weight_decay)):
    utils.check_range(name, value, lower=0.0)
  for name, value in (
      ("var_init", var_init), ("eta_tol", eta_tol), ("max_eta", max_eta)):
    utils.check_range(name, value, lower=0.0, lower_inclusive=False)
  if levels_per_pass is None:
    levels_per_pass = _DEFAULT_LEVELS_PER_PASS
  utils.check_positive_int("levels_per_pass", levels_per_pass, static=True)
  passes.check_chunk_size("chunk_size", chunk_size)
  rho = utils.concrete_float(reg_weight)
  nu_ = utils.concrete_float(nu)
  if rho is not None and nu_ is not None and rho + nu_ <= 0:
    raise ValueError(
        f"`reg_weight` + `nu` must be > 0 (λ_new divides by it); got "
        f"reg_weight={reg_weight!r}, nu={nu!r}."
    )
  kl_fn = utils.as_schedule(kl_bound)
  wd_const = utils.concrete_float(weight_decay)

  def init_fn(params):
    params = _as_real(params)
    sdtype = utils.scalar_dtype(params)

    def full(value):
      return jax.tree.map(
          lambda p: jnp.full_like(p, value, _stats_dtype(p)), params
      )

    return ArturoState(
        count=jnp.zeros([], jnp.int32),
        b=full(0.0),
        h=full(0.1),
        p00=full(start_filter_cov),
        p01=full(0.0),
        p11=full(start_filter_cov),
        precision=jax.tree.map(
            lambda p: jnp.ones_like(p, _stats_dtype(p))
            / jnp.asarray(var_init, _stats_dtype(p)),
            params,
        ),
        eta=jnp.zeros([], sdtype),
        bisection_steps=jnp.zeros([], jnp.int32),
        kl=jnp.zeros([], sdtype),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("arturo's `update` needs `params` (the means θ).")
    utils.check_trees_match("updates", updates, "params", params)
    complex_updates = updates
    updates, params = _as_real(updates), _as_real(params)
    sdtype = state.eta.dtype
    chunk = passes.resolve_chunk_size(chunk_size)
    first = state.count == 0
    kl_value = kl_fn(state.count)
    eps = jnp.asarray(kl_value, sdtype)
    # 0.1 ε before rounding to S, as the reference compares.
    early_stop = jnp.asarray(0.1 * kl_value, sdtype)
    model = dict(
        kl_bound=eps, weight_decay=weight_decay,
        use_decay=wd_const is None or wd_const != 0.0,
        # One product, as the reference forms it (in the hyperparameters'
        # precision).
        reg_prior=reg_weight * prior_prec, clip_curvature=clip_curvature,
    )

    tol = jnp.asarray(eta_tol, sdtype)
    top = jnp.asarray(max_eta, sdtype)
    lo = jnp.where(first, jnp.zeros([], sdtype), state.eta / 3)
    hi = jnp.where(first, top, jnp.minimum(3 * state.eta, top))
    # The midpoints of the bisection's first pass depend only on the last η:
    # the filter's pass evaluates their KL too (whether or not the bisection
    # runs), which saves a pass over memory per step.
    first_mids = _tree_of_midpoints(lo, hi, levels_per_pass)
    # h (states[2]) is read by λ's update and by the filter's: carried.
    filtered = passes.run(
        "arturo/filter", (updates, params),
        (state.precision, state.b, state.h, state.p00, state.p01, state.p11),
        dict(model, first=first, dynamic_model_noise=dynamic_model_noise,
             measurement_noise=measurement_noise, reg_weight=reg_weight,
             nu=nu, etas=first_mids),
        update=_filter, terms=_filtered_kl_terms, sum_dtype=sdtype,
        chunk_size=chunk, carried=(2,), axis_name=axis_name,
    )
    lam, b, h, p00, p01, p11 = filtered.states

    def kl_at(etas):
      """½ Σ λ (μ_new(η_k) - θ)² for each η_k in `etas`, shape (K,)."""
      return 0.5 * passes.run(
          "arturo/kl", (params, b, h, lam), (), dict(model, etas=etas),
          terms=_kl_terms, sum_dtype=sdtype, chunk_size=chunk,
          axis_name=axis_name,
      ).sums

    def running(carry):
      lo, hi, _, done, _ = carry
      return jnp.logical_and(hi - lo > tol, jnp.logical_not(done))

    def replay(carry, kls):
      """The next `levels_per_pass` bisection steps, given the KL at the
      midpoints they can visit (heap order, see `_tree_of_midpoints`)."""
      lo, hi, steps, done, kl = carry
      node = jnp.zeros([], jnp.int32)
      for _ in range(levels_per_pass):
        active = running((lo, hi, steps, done, kl))
        mid = (lo + hi) / 2
        d = kls[node] - eps
        above = d > 0
        lo = jnp.where(active & above, mid, lo)
        hi = jnp.where(active & ~above, mid, hi)
        done = done | (active & (jnp.abs(d) < early_stop))
        kl = jnp.where(active, kls[node], kl)
        steps = steps + active.astype(jnp.int32)
        node = 2 * node + 1 + above.astype(jnp.int32)
      return lo, hi, steps, done, kl

    def one_pass(carry):
      lo, hi = carry[:2]
      return replay(carry, kl_at(_tree_of_midpoints(lo, hi, levels_per_pass)))

    # The first pass, from the filter's sums (a no-op when the bracket is
    # already narrower than eta_tol: every level is then inactive).
    carry = replay(
        (lo, hi, jnp.zeros([], jnp.int32), jnp.zeros([], jnp.bool_),
         state.kl),
        0.5 * filtered.sums,
    )
    lo, hi, steps, _, kl = jax.lax.while_loop(running, one_pass, carry)
    eta = (lo + hi) / 2

    step = passes.run(
        "arturo/step", (updates, params, b, h, lam), (), dict(model, eta=eta),
        output=_step,
    )
    new_state = ArturoState(
        count=optax.safe_int32_increment(state.count),
        b=b,
        h=h,
        p00=p00,
        p01=p01,
        p11=p11,
        precision=lam,
        eta=eta,
        bisection_steps=steps,
        kl=kl,
    )
    return _like_complex(step.outputs, complex_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def arturo(
    kl_bound: optax.ScalarOrSchedule,
    reg_weight: float,
    prior_prec: float,
    dynamic_model_noise: float,
    measurement_noise: float,
    start_filter_cov: float,
    var_init: float = 0.01,
    eta_tol: float = 0.5,
    nu: float = 0.0,
    weight_decay: float = 0.0,
    max_eta: float = 1e4,
    *,
    clip_curvature: bool = False,
    levels_per_pass: Optional[int] = None,
    chunk_size: Union[int, str, None] = "auto",
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""arTuRO: a Kalman-filtered diagonal quadratic model in a KL trust region.

  arTuRO treats each parameter θᵢ as the mean of a Gaussian search
  distribution with precision λᵢ (λ₀ = 1/var_init). A per-coordinate Kalman
  filter fits the gradient model ``g ≈ h θ + b`` (``h`` a diagonal Hessian
  estimate) with a random-walk drift, and one global dual variable η sets the
  step so that the mean moves by a fixed KL, ``½ Σ λ (μ_new - θ)² = ε``. At
  step ``t`` with gradient ``g`` at ``θ`` and KL bound ``ε = kl_bound(t-1)``::

    θ ← θ - ε·weight_decay·θ                (decoupled decay, before the filter)
    t = 1 only: h = 0.1, b = g, P00 = P11 = c0, P01 = 0
    Kalman filter of g ≈ h θ + b (random walk Q = diag(q, q), noise R):
      P00 += q;  P11 += q
      k0 = P00 + P01 θ;  k1 = P01 + P11 θ;  S = k0 + k1 θ + R
      K0 = k0 / S;  K1 = k1 / S;  δ = g - h θ - b
      b += K0 δ;  h += K1 δ
      P00 -= K0² S;  P01 -= K0 K1 S;  P11 -= K1² S
    primal:  μ_new(η) = (η λ θ - b) / (h + ρ p0 + η λ)
             λ_new    = (h + ρ p0 + ν λ) / (ρ + ν)
    dual, one η for all parameters (bisection):
      [lo, hi] = [0, max_eta] at t = 1, else [η/3, min(3η, max_eta)]
      while hi - lo > eta_tol:
        mid = (lo + hi)/2;  d = ½ Σ λ (μ_new(mid) - θ)² - ε   (every leaf)
        d > 0 → lo = mid, else hi = mid;  stop early if |d| < 0.1 ε
      η = (lo + hi)/2
    update = μ_new(η) - θ_before_decay;   λ ← λ_new

  ``ε`` is the step size: the mean moves by (about) a fixed KL per step. The
  paper schedules it (the reference's Fashion-MNIST run multiplies it by
  0.006 at epochs 60 and 90): pass an optax schedule. It acts through η, so
  the updates are not scaled by a learning rate afterwards.

  The equations follow the authors' PyTorch code (ALRhub/arturo), which fixes
  what the paper leaves open; with ``weight_decay=0`` the steps are that
  code's to float round-off. Readings and known weak points (the defaults are
  faithful to the reference):

  * The reference applies the weight decay to the parameter before the
    filter; from step 2 on its stored mean is that same tensor, so the dual
    uses the decayed θ too. At step 1 only, its stored mean is a copy made at
    construction and the dual uses the *undecayed* θ; here every step uses
    the decayed θ (weight_decay = 0, the reference's tested case, is exact).
  * ``h + ρ p0 + η λ`` can reach zero or go negative (h is a filter
    estimate and may be negative); the reference has no guard, and neither
    has this default. ``clip_curvature=True`` uses ``max(h, 0)`` in the
    primal and in λ_new, which keeps the denominator ≥ η λ > 0 and λ > 0
    when ``prior_prec > 0`` or ``nu > 0``.
  * ``eta_tol`` is absolute: once η < 3·eta_tol/8 (0.1875 for 0.5) the
    bracket [η/3, 3η] is already narrower than eta_tol, no KL is evaluated,
    and η just becomes 5η/3 (``bisection_steps`` is then 0).
  * The state's ``precision`` is the λ the last step used; that step's
    λ_new is formed at the start of the next one, from the stored λ and h.
    The numbers are the reference's. Under ``optax.inject_hyperparams``,
    λ_new is then formed with the next step's ρ, p0 and ν (the same unless
    those are scheduled).
  * Complex parameters, with gradients in optax's convention (the conjugate
    of JAX's, ``∂L/∂x + i ∂L/∂y``), are pairs of real coordinates
    ``(Re θ, Im θ)``: the filter, the KL and η are exactly those of the real
    problem, each state array of a complex leaf has a trailing axis of 2,
    and the updates are complex.
  * Memory: six state arrays per parameter (b, h, P00, P01, P11, λ), 3x
    Adam's state. The filter and λ stay float32 (or the param's dtype where
    wider) for bfloat16 params.

  ``update`` needs ``params`` (θ). Extra keyword arguments (``value=``
  included) are accepted and ignored. Diagnostics: ``eta``,
  ``bisection_steps`` and ``kl`` in :class:`ArturoState`, found with
  ``optax.tree.get(opt_state, "eta")``. How the passes over memory of a step
  are laid out (and what ``levels_per_pass`` and ``chunk_size`` change) is
  described on the documentation's :doc:`internals page </internals>`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_soaa
    >>> def loss_fn(params, x, y):
    ...   return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> y = x @ jnp.array([[1.0], [-2.0], [0.5]]) + 0.3
    >>> params = {"w": jnp.zeros((3, 1)), "b": jnp.zeros((1,))}
    >>> opt = optax.chain(
    ...     optax.clip_by_global_norm(1.0),
    ...     optax_soaa.arturo(0.0857, reg_weight=0.0587, prior_prec=0.0015,
    ...                       dynamic_model_noise=0.0174,
    ...                       measurement_noise=2.82, start_filter_cov=5e-5,
    ...                       nu=1.3))
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    ...   updates, state = opt.update(grads, state, params)
    ...   return optax.apply_updates(params, updates), state, loss
    >>> for _ in range(300):
    ...   params, state, loss = step(params, state)
    >>> bool(loss < 1e-2)
    True
    >>> eta = optax.tree.get(state, "eta")  # The dual variable of the KL bound.

  Args:
    kl_bound: ε > 0, a float or an optax schedule of the step count.
    reg_weight: ρ >= 0, weight of the prior (entropy) regulariser.
    prior_prec: p0 >= 0, prior precision.
    dynamic_model_noise: q >= 0, random-walk noise of the filter.
    measurement_noise: R >= 0, gradient noise of the filter.
    start_filter_cov: c0 >= 0, initial filter variance of b and h.
    var_init: initial search variance, > 0 (λ₀ = 1/var_init).
    eta_tol: absolute bisection tolerance on η, > 0.
    nu: ν >= 0, weight of the old precision in λ_new (ρ + ν must be > 0).
    weight_decay: decoupled decay >= 0, scaled by ε.
    max_eta: upper end of the η bracket, > 0 (1e4 in the reference).
    clip_curvature: opt-in guard, see above.
    levels_per_pass: bisection steps decided per evaluation of the KL sums
      (a positive int; ``None``: 3). Each evaluation computes the KL at the
      2^L - 1 midpoints the next L bisection steps can visit, then replays
      the bisection's decisions on them: the same η bit for bit, fewer
      passes over memory, more arithmetic per pass. The first evaluation
      is part of the filter's pass, so a step whose bisection takes at most
      L steps reads its memory no more than twice. Under
      ``optax.inject_hyperparams`` an int here must be a static arg.
    chunk_size: how the passes over memory are laid out; the numbers do not
      depend on it beyond summation order. ``"auto"`` (default): slices of
      large leaves on a single CPU device, whole arrays elsewhere. A
      positive int: slices of that many elements; ``None``: whole arrays.
      An int must be a static arg of ``optax.inject_hyperparams``.
    axis_name: name of a mapped axis (``pmap``/``shard_map``) over which the
      parameters are split; the KL sums are then ``psum``-ed over it.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`:
    ``optax.chain(scale_by_arturo(...), optax.scale(-1.0))``; its state is
    ``(ArturoState, EmptyState())``.

  References:
    Dahlinger et al., `Information-Theoretic Trust Regions for Stochastic
    Gradient-Based Optimization <https://arxiv.org/abs/2310.20574>`_, 2023.
    The authors' code: https://github.com/ALRhub/arturo.
  """
  return optax.chain(
      scale_by_arturo(
          kl_bound, reg_weight, prior_prec, dynamic_model_noise,
          measurement_noise, start_filter_cov, var_init=var_init,
          eta_tol=eta_tol, nu=nu, weight_decay=weight_decay, max_eta=max_eta,
          clip_curvature=clip_curvature, levels_per_pass=levels_per_pass,
          chunk_size=chunk_size, axis_name=axis_name,
      ),
      optax.scale(-1.0),
  )
