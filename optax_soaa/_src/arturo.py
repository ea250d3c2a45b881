"""arTuRO: information-theoretic trust-region optimization (arXiv 2310.20574)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from optax_soaa._src import native
from optax_soaa._src import utils


class ArturoState(NamedTuple):
  """State of :func:`arturo`.

  ``F`` below is a leaf's statistics dtype: float32, or the param's dtype
  where wider (a bfloat16 model keeps its filter in float32). ``S`` is the
  scalar dtype (:func:`optax_soaa._src.utils.scalar_dtype` of the params).
  """

  count: jax.Array  # shape=(), int32: steps taken.
  b: optax.Updates  # like params, F: linear term of the gradient model.
  h: optax.Updates  # like params, F: diagonal Hessian estimate.
  p00: optax.Updates  # like params, F: filter covariance of b.
  p01: optax.Updates  # like params, F: filter covariance of (b, h).
  p11: optax.Updates  # like params, F: filter covariance of h.
  precision: optax.Updates  # like params, F: search precision λ the last
  # step used (λ_new of that step is formed at the start of the next one,
  # from this λ and h; see "Precision" in `arturo`'s docstring).
  eta: jax.Array  # shape=(), S: dual variable η of the last step.
  bisection_steps: jax.Array  # shape=(), int32: bisection iterations of
  # the last step (KL evaluations, whatever the passes over memory).
  kl: jax.Array  # shape=(), S: ½ Σ λ (μ_new(mid) - θ)² at the last midpoint
  # the bisection evaluated (kept from the step before when it evaluated
  # none); computing it at the final η would cost one more pass.


# See `levels_per_pass` in `arturo`'s docstring.
_DEFAULT_LEVELS_PER_PASS = 2

# The slice length "auto" uses on the CPU backend where the fused kernels
# cannot run (see `chunk_size`), shorter than
# `utils.CPU_CHUNK_SIZE`: the filter streams fourteen arrays and its
# temporaries, which must stay cache-resident (at 10M parameters slices of
# about 8K elements ran the update-step benchmark's step about 1.2x faster
# than 16K ones, chunk_size=16384).
_CPU_CHUNK_SIZE = 8192


def _check_nonneg(name: str, value: Any) -> None:
  utils.check_range(name, value, lower=0.0)


def _check_positive(name: str, value: Any) -> None:
  utils.check_range(name, value, lower=0.0, lower_inclusive=False)


def _stats_dtype(leaf: Any) -> jnp.dtype:
  return jnp.promote_types(jnp.asarray(leaf).dtype, jnp.float32)


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

  From *"Information-Theoretic Trust Regions for Stochastic Gradient-Based
  Optimization"* (Dahlinger et al., arXiv 2310.20574), following the
  authors' PyTorch code (ALRhub/arturo) as the project's spec
  (``shared/specs/arturo.md``) reads it. Each parameter θᵢ is the mean of a
  Gaussian search distribution with precision λᵢ (λ₀ = 1/var_init). At step
  ``t`` with gradient ``g`` at ``θ`` and KL bound ``ε = kl_bound(t-1)``::

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
  0.006 at epochs 60 and 90): pass an optax schedule.

  Readings and known weak points (defaults are faithful to the reference):

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
  * Precision: the state's ``precision`` is the λ the last step used, not
    that step's λ_new: λ_new is formed at the start of the next step, from
    the stored λ and h (the h that step filtered), in the filter's pass.
    The numbers are the reference's; only when λ_new is formed moves, which
    lets the final pass read λ without writing it (on the CPU, writing it
    there made XLA copy λ whole every step). Under
    ``optax.inject_hyperparams``, λ_new is then formed with the next step's
    ρ, p0 and ν (the same unless those are scheduled).
  * Memory: six state arrays per parameter (b, h, P00, P01, P11, λ), 3x
    Adam's state.
  * Cost: the filter's pass reads g, θ and the six state arrays and writes
    the six; the final pass reads θ, b, h, λ and writes the step. Every
    bisection pass reads θ, b, h, λ for one reduction over all parameters;
    the first pass's midpoints depend only on the last η, so the filter's
    pass evaluates their KL too and only the later passes read memory
    again. With ``levels_per_pass = 2`` the filter's pass decides the first
    two bisection steps. With the tuned Fashion-MNIST values η settles near
    0.3 and the bracket [η/3, 3η] needs a single KL evaluation per step;
    the filter, not the dual, dominates the step time. On a single CPU
    device the filter's and the bisection's passes run as fused kernels
    (see ``chunk_size``).

  ``update`` needs ``params`` (θ). Extra keyword arguments (``value=``
  included) are accepted and ignored. Diagnostics: ``eta``,
  ``bisection_steps`` and ``kl`` in :class:`ArturoState`, found with
  ``optax.tree.get(opt_state, "eta")``.

  Example::

    import jax, optax, optax_soaa

    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax_soaa.arturo(0.0857, reg_weight=0.0587, prior_prec=0.0015,
                          dynamic_model_noise=0.0174,
                          measurement_noise=2.82, start_filter_cov=5e-5,
                          nu=1.3))
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

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
    levels_per_pass: bisection levels decided per pass over memory (a
      positive int; ``None`` picks the default, and under
      ``optax.inject_hyperparams`` an int here must be a static arg):
      each pass evaluates the KL at the 2^L - 1 midpoints the next L
      bisection steps can visit, in one fused reduction, then replays the
      bisection's decisions on those values. Same η bit for bit; fewer
      passes, more arithmetic per pass (the filter's pass evaluates the
      first 2^L - 1). Default 2: the filter's pass evaluates three
      midpoints instead of one at little extra cost, and a step that needs
      up to four bisection steps reads memory once more at most (the
      update-step benchmark times 1 level too: ``arturo-1-level``).
    chunk_size: how the filter's pass and the KL sums run. ``"auto"``: on
      a single CPU device, with every leaf and state float32 or float64,
      as fused, multi-threaded kernels (``optax_soaa._src.native``:
      compiled at first use, XLA otherwise), each one read of its arrays;
      elsewhere on a single CPU device, XLA slice loops of about 8192
      elements (a length that divides the leaf where one is near); whole
      arrays on GPU/TPU and with several devices. A positive int: XLA slice
      loops of that length (on the CPU they avoid parameter-sized
      temporaries); ``None``: XLA over whole arrays. The kernels repeat the
      XLA path's arithmetic: results agree up to rounding (XLA fuses some
      products into FMAs) and the KL's summation order. JAX differentiates
      them as their ``jax.numpy`` restatements; they cannot be
      serialised: to ``jax.export`` a step, pass ``None``. An int here must
      be a static arg of ``optax.inject_hyperparams``.
    axis_name: name of a mapped axis (``pmap``/``shard_map``) over which the
      parameters are split; the KL sums are then ``psum``-ed over it.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
  """
  utils.check_schedule_or_nonneg("kl_bound", kl_bound, positive=True)
  _check_nonneg("reg_weight", reg_weight)
  _check_nonneg("prior_prec", prior_prec)
  _check_nonneg("dynamic_model_noise", dynamic_model_noise)
  _check_nonneg("measurement_noise", measurement_noise)
  _check_nonneg("start_filter_cov", start_filter_cov)
  _check_positive("var_init", var_init)
  _check_positive("eta_tol", eta_tol)
  _check_nonneg("nu", nu)
  _check_nonneg("weight_decay", weight_decay)
  _check_positive("max_eta", max_eta)
  if levels_per_pass is None:
    levels_per_pass = _DEFAULT_LEVELS_PER_PASS
  utils.check_positive_int("levels_per_pass", levels_per_pass)
  utils.check_chunk_size("chunk_size", chunk_size)
  rho = utils._concrete_float(reg_weight)  # pylint: disable=protected-access
  nu_ = utils._concrete_float(nu)  # pylint: disable=protected-access
  if rho is not None and nu_ is not None and rho + nu_ <= 0:
    raise ValueError(
        f"`reg_weight` + `nu` must be > 0 (λ_new divides by it); got "
        f"reg_weight={reg_weight!r}, nu={nu!r}."
    )
  kl_fn = utils.as_schedule(kl_bound)
  # One product, as the reference forms it (in the hyperparameters' precision).
  reg_prior = reg_weight * prior_prec
  wd_const = utils._concrete_float(weight_decay)  # pylint: disable=protected-access
  use_decay = wd_const is None or wd_const != 0.0

  def init_fn(params):
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
    grads = updates
    sdtype = state.eta.dtype
    chunk = utils.resolve_chunk_size(chunk_size)
    if chunk_size == "auto" and chunk is not None:
      chunk = _CPU_CHUNK_SIZE
    # The fused CPU kernels (see `chunk_size`): all leaves and states in one
    # dtype, float32 or float64.
    use_native = chunk_size == "auto" and native.usable(
        *jax.tree.leaves((grads, params, state.b)))
    first = state.count == 0
    kl_value = kl_fn(state.count)
    eps = jnp.asarray(kl_value, sdtype)
    # 0.1 ε before rounding to S, as the reference compares.
    early_stop = jnp.asarray(0.1 * kl_value, sdtype)

    def cast(x, like):
      return jnp.asarray(x, like.dtype)

    def curvature(hh):
      """h + ρ p0, the curvature of the primal and of λ_new."""
      hh = jnp.maximum(hh, 0) if clip_curvature else hh
      return hh + cast(reg_prior, hh)

    def decayed(p, b):
      theta = p.astype(b.dtype)
      if use_decay:
        theta = theta - theta * (cast(eps, b) * cast(weight_decay, b))
      return theta

    def kl_scalars(b):
      """[ρ p0, decay, clip, use_decay] for the fused kernels."""
      decay = cast(eps, b) * cast(weight_decay, b) if use_decay else 0.0
      return [cast(reg_prior, b), decay, clip_curvature, use_decay]

    def new_mean(eta, p, b, h, lam):
      theta = decayed(p, b)
      temp = lam * eta
      return theta, (temp * theta - b) / (curvature(h) + temp)

    def kl_terms(etas, p, b, h, lam):
      """λ (μ_new(η_k) - θ)² per element, shape (K, size), unsummed."""
      shape = (etas.shape[0],) + (1,) * jnp.ndim(b)
      theta, mu = new_mean(etas.reshape(shape).astype(b.dtype), p, b, h, lam)
      terms = jnp.square(theta - mu) * lam
      return terms.reshape(etas.shape[0], -1).astype(sdtype)

    def kl_total(parts, etas):
      """½ Σ over leaves (and the mapped axis) of the leaves' `kl_terms`."""
      total = sum(jax.tree.leaves(parts), jnp.zeros(etas.shape, sdtype))
      if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
      return 0.5 * total

    def kl_at(etas):
      """½ Σ λ (μ_new(η_k) - θ)² for each η_k in `etas`, shape (K,)."""
      if use_native:
        parts = jax.tree.map(
            lambda p, b, h, lam: native.arturo_kl(
                p, b, h, lam, kl_scalars(b), etas).astype(sdtype),
            params, b, h, lam,
        )
        return kl_total(parts, etas)
      parts = jax.tree.map(
          lambda *xs: utils.chunked_pass(
              None, lambda *c: kl_terms(etas, *c), xs, (), chunk)[1],
          params, b, h, lam,
      )
      return kl_total(parts, etas)

    tol = jnp.asarray(eta_tol, sdtype)
    top = jnp.asarray(max_eta, sdtype)
    lo = jnp.where(first, jnp.zeros([], sdtype), state.eta / 3)
    hi = jnp.where(first, top, jnp.minimum(3 * state.eta, top))
    # The midpoints of the bisection's first pass depend only on the last η:
    # the filter's pass evaluates their KL too (whether or not the bisection
    # runs), which saves a pass over memory per step.
    first_mids = _tree_of_midpoints(lo, hi, levels_per_pass)

    def next_precision(h, lam):
      """λ_new = (h + ρ p0 + ν λ) / (ρ + ν), from the filtered h."""
      return (curvature(h) + lam * cast(nu, lam)) / (
          cast(reg_weight, lam) + cast(nu, lam)
      )

    # Filter (one pass: reads g, θ and six state arrays, writes them). The
    # last step's λ_new is formed here, from the h that step filtered: the
    # final pass then reads λ without writing it (written there, XLA copied
    # λ whole every step to keep the old values for the step).
    def filter_leaf(g, p, lam, b, h, p00, p01, p11):
      lam = jnp.where(first, lam, next_precision(h, lam))
      theta = decayed(p, b)
      g = g.astype(b.dtype)
      # At t = 1 the filter starts from b = g; `init` already holds the
      # first step's h, P00, P01 and P11.
      b = jnp.where(first, g, b)
      p00 = p00 + cast(dynamic_model_noise, b)
      p11 = p11 + cast(dynamic_model_noise, b)
      k0 = p00 + p01 * theta
      k1 = p01 + p11 * theta
      s = k0 + k1 * theta + cast(measurement_noise, b)
      inv_s = 1 / s
      gain0 = k0 * inv_s
      gain1 = k1 * inv_s
      # b and h take the innovation as δ / S, one shared division: b_new
      # then never reads h nor h_new b, so both update in place.
      scaled_innovation = (g - theta * h - b) / s
      b = b + k0 * scaled_innovation
      h = h + k1 * scaled_innovation
      return (lam, b, h, p00 - gain0 * (s * gain0),
              p01 - gain0 * (s * gain1), p11 - gain1 * (s * gain1))

    def filter_terms(g, p, lam, b, h, *unused):
      # KL terms of the first midpoints at the filtered b, h.
      del g, unused
      return kl_terms(first_mids, p, b, h, lam)

    def native_filter(g, p, *st):
      b = st[1]
      new, sums = native.arturo_filter(
          g, p, st,
          [first, cast(dynamic_model_noise, b), cast(measurement_noise, b),
           cast(reg_prior, b), cast(nu, b), cast(reg_weight, b),
           *kl_scalars(b)[1:]],
          first_mids,
      )
      return tuple(new), sums.astype(sdtype)

    # h's old slice is read by λ's update and by the filter's (h is states[2]).
    filtered = jax.tree.map(
        native_filter if use_native else
        lambda g, p, *st: utils.chunked_pass(
            filter_leaf, filter_terms, (g, p), st, chunk, carried=(2,)),
        grads, params, state.precision, state.b, state.h, state.p00,
        state.p01, state.p11,
    )
    treedef = jax.tree.structure(params)
    (lam, b, h, p00, p01, p11), first_parts = jax.tree.transpose(
        treedef, jax.tree.structure(((0,) * 6, 0)), filtered
    )

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
        kl_total(first_parts, first_mids),
    )
    lo, hi, steps, _, kl = jax.lax.while_loop(running, one_pass, carry)
    eta = (lo + hi) / 2

    # Final pass: the step.
    def final_leaf(g, p, b, h, lam):
      _, mu = new_mean(eta.astype(b.dtype), p, b, h, lam)
      return (mu - p.astype(b.dtype)).astype(g.dtype)

    new_updates = jax.tree.map(final_leaf, grads, params, b, h, lam)

    new_state = ArturoState(
        count=numerics.safe_int32_increment(state.count),
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
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
