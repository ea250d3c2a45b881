"""SOAA: Second-Order Adaptive Approximation (arXiv 2410.02293)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from optax_soaa._src import native
from optax_soaa._src import utils

CURVATURES = ("second_moment", "variance", "none")


class SOAAState(NamedTuple):
  """State of :func:`scale_by_soaa`.

  `S` below is the scalar dtype: float32, or the params' dtype where wider.
  """

  count: jax.Array  # shape=(), int32: steps taken.
  mu: optax.Updates  # like params (dtype mu_dtype or params'): first moment m.
  nu: optax.Updates  # like params (dtype nu_dtype or params'): second moment s.
  curvature: Optional[optax.Updates]  # like nu: centred variance v with
  # curvature="variance"; None otherwise (v̂ = ŝ, or v̂ = 0 for "none").
  dt: jax.Array  # shape=(), S: trust-region multiplier, starts at 1.
  loss_avg: jax.Array  # shape=(), S: EMA of the loss (not bias-corrected).
  predicted_reduction: jax.Array  # shape=(), S: pr of the last loss step.
  trust_ratio: jax.Array  # shape=(), S: last (l̂ - l) / max(pr, eps).
  fisher_ratio: jax.Array  # shape=(), S: last r = Σ m̂² / Σ (v̂ + eps).
  skipped_values: jax.Array  # shape=(), int32: non-finite `value`s ignored.


def scale_by_soaa(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    gamma: float = 0.1,
    eps: float = 1e-8,
    *,
    total_steps: int,
    curvature: str = "second_moment",
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    axis_name: Optional[str] = None,
    reduction_chunk_size: Union[int, str, None] = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales gradients into SOAA's trust-region direction ``g_adj``.

  The returned updates are ``g_adj`` (to be scaled by ``-learning_rate``, as
  :func:`optax.scale_by_adam`'s are); see :func:`soaa` for the equations. The
  transform takes the learning rate because the predicted loss reduction that
  drives ``dt`` is that of the step actually taken, ``-α g_adj``.

  Args:
    learning_rate: the step size α or an optax schedule (evaluated at the
      count before the step, as optax does).
    b1: decay of the first moment and of the loss average, in [0, 1).
    b2: decay of the second moment and curvature, in [0, 1).
    gamma: width of the ``dt`` bounds, in (0, 1).
    eps: numerical floor, >= 0.
    total_steps: T > 0; the ``dt`` bounds narrow over T steps.
    curvature: ``"second_moment"`` (``v̂ = ŝ``, Adam's memory; default),
      ``"variance"`` (centred variance, 1.5x Adam's state) or ``"none"``
      (``v̂ = 0``: the paper's algorithm read literally). See :func:`soaa`.
    mu_dtype: optional dtype of the first moment.
    nu_dtype: optional dtype of the second moment and of the curvature
      (e.g. float32 state for bfloat16 params); the params' dtype if None.
    axis_name: name of a mapped axis (``pmap``/``shard_map``) over which the
      parameters are *split*; the global sums are then ``psum``-ed over it.
      Leave ``None`` for replicated data parallelism and for sharded ``jit``.
    reduction_chunk_size: how the passes over memory run. ``"auto"``: on a
      single CPU device, with the leaves and moments all float32 or all
      float64, the two passes XLA cannot fuse there (the moments with the
      sums of ``r``, and the predicted-reduction sum) run as fused,
      multi-threaded kernels (``optax_soaa._src.native``: compiled at first
      use, XLA otherwise); elsewhere on the CPU the predicted-reduction sum
      runs in slices of 16384 elements (XLA would allocate a
      parameter-sized temporary each step); on GPU/TPU and with several
      devices, one fused sum (slicing sharded leaves would gather them). An
      int: XLA, slices of that length; ``None``: XLA, one sum. The kernels
      repeat the XLA path's arithmetic: results agree up to rounding (XLA
      fuses some products into FMAs) and summation order. JAX
      differentiates them as their ``jax.numpy`` restatements; they cannot
      be serialised: to ``jax.export`` a step, pass ``None``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` takes the
    loss at ``params`` as ``value=`` (optional) and ignores other extra args.
  """
  utils.check_schedule_or_nonneg("learning_rate", learning_rate)
  utils.check_range("b1", b1, lower=0.0, upper=1.0, upper_inclusive=False)
  utils.check_range("b2", b2, lower=0.0, upper=1.0, upper_inclusive=False)
  utils.check_range(
      "gamma", gamma, lower=0.0, upper=1.0, lower_inclusive=False,
      upper_inclusive=False,
  )
  utils.check_range("eps", eps, lower=0.0)
  utils.check_positive_int("total_steps", total_steps)
  utils.check_choice("curvature", curvature, CURVATURES)
  mu_dtype = optax._src.utils.canonicalize_dtype(mu_dtype)  # pylint: disable=protected-access
  nu_dtype = optax._src.utils.canonicalize_dtype(nu_dtype)  # pylint: disable=protected-access
  utils.check_chunk_size("reduction_chunk_size", reduction_chunk_size)
  lr_fn = utils.as_schedule(learning_rate)
  use_variance = curvature == "variance"
  use_fisher = curvature != "none"

  def init_fn(params):
    sdtype = utils.scalar_dtype(params)
    # A fresh array per field: shared buffers cannot be donated.
    zero = lambda: jnp.zeros([], sdtype)
    return SOAAState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params, dtype=nu_dtype),
        curvature=(
            optax.tree.zeros_like(params, dtype=nu_dtype) if use_variance
            else None
        ),
        dt=jnp.ones([], sdtype),
        loss_avg=zero(),
        predicted_reduction=zero(),
        trust_ratio=zero(),
        fisher_ratio=zero(),
        skipped_values=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del extra_args
    # Checked at trace time: a mismatch would otherwise surface as an opaque
    # tree_map or broadcasting error deep inside the moment updates.
    utils.check_trees_match("updates", updates, "params given to init", state.nu)
    if params is not None:
      utils.check_trees_match("updates", updates, "params", params)
    del params
    grads = updates
    sdtype = state.dt.dtype
    chunk_size = utils.resolve_chunk_size(reduction_chunk_size)
    count_inc = numerics.safe_int32_increment(state.count)
    t = count_inc.astype(sdtype)
    lr = jnp.asarray(lr_fn(state.count), sdtype)
    b1_ = jnp.asarray(b1, sdtype)
    b2_ = jnp.asarray(b2, sdtype)
    eps_ = jnp.asarray(eps, sdtype)
    bc1 = 1 - b1_**t
    bc2 = 1 - b2_**t

    # Pass 1: moments, and the two global sums of the Fisher ratio r. The
    # bias corrections and eps come out of the sums as scalars
    # (Σ m̂² = Σ m² / bc1², Σ (v̂ + eps) = Σ v / bc2 + n eps) so the sums read
    # the new moments directly, with no full-size temporary.
    def xla_moments():
      mu = optax.tree.update_moment(grads, state.mu, b1, 1)
      nu = optax.tree.update_moment_per_elem_norm(grads, state.nu, b2, 2)
      if use_variance:
        # In exact arithmetic g - m̂ = 0 at t = 1 (m̂ = g); computed, it is
        # rounding noise that the ratio r then divides by its own sum, so the
        # first step is set to the exact value. (Written through the previous
        # moment instead, XLA would copy that donated buffer every step.)
        first = count_inc == 1

        def variance(g, m, v):
          deviation = jnp.where(first, 0, g - m / bc1.astype(m.dtype))
          return b2 * v + (1 - b2) * jnp.square(deviation)

        curv = jax.tree.map(variance, grads, mu, state.curvature)
        curv = optax.tree.cast_like(curv, state.curvature)
      else:
        curv = None
      mu = optax.tree.cast(mu, mu_dtype)
      nu = optax.tree.cast_like(nu, state.nu)
      v_state = curv if use_variance else nu
      sum_v = (utils.tree_sum(lambda v: v, v_state, dtype=sdtype) if use_fisher
               else jnp.zeros([], sdtype))
      return (mu, nu, curv, utils.tree_sum(jnp.square, mu, dtype=sdtype),
              sum_v)

    def native_moments():
      # One fused pass per leaf (native.py): the moments in place, Σ m² and
      # Σ v; the same arithmetic, summed in another order.
      scalars = [1 - b1, b1, 1 - b2, b2, bc1, count_inc == 1]
      if use_variance:
        moments = jax.tree.map(
            lambda g, m, s, v: native.soaa_moments(g, m, s, v, scalars),
            grads, state.mu, state.nu, state.curvature)
      else:
        def without_v(g, m, s):
          m, s, _, sums = native.soaa_moments(g, m, s, None, scalars)
          return m, s, sums

        moments = jax.tree.map(without_v, grads, state.mu, state.nu)
      moments = jax.tree.transpose(
          jax.tree.structure(grads),
          jax.tree.structure((0,) * (4 if use_variance else 3)), moments)
      mu, nu, sums = moments[0], moments[1], moments[-1]
      curv = moments[2] if use_variance else None
      sums = sum(jax.tree.leaves(sums), jnp.zeros([2], sdtype))
      return mu, nu, curv, sums[0], sums[1]

    # The fused CPU kernels where `reduction_chunk_size` is "auto" and every
    # leaf and moment has one dtype, float32 or float64.
    use_native = use_fisher and reduction_chunk_size == "auto" and native.usable(
        *jax.tree.leaves((grads, state.mu, state.nu, state.curvature)))
    mu, nu, curv, sum_m2, sum_v = (
        native_moments() if use_native else xla_moments())
    # v̂ per leaf: the variance, ŝ itself, or nothing (v̂ = 0) for "none".
    v_state = curv if use_variance else (nu if use_fisher else None)
    moments = (mu, nu) if v_state is None else (mu, nu, v_state)
    sum_m2 = sum_m2 / jnp.square(bc1)
    sum_v = sum_v / bc2 + utils.tree_size(nu) * eps_
    if axis_name is not None:
      sum_m2, sum_v = jax.lax.psum((sum_m2, sum_v), axis_name)
    fisher_ratio = sum_m2 / sum_v

    # Pass 2: the trust-region direction (dt of step t-1). m̂, ŝ, v̂ are
    # formed inside each consumer (the direction, and the predicted-reduction
    # sum), so XLA never materialises them.
    dt = state.dt
    inv_bc1 = 1 / bc1
    inv_bc2 = 1 / bc2

    def direction(m, s, v=None):
      dtype = jnp.promote_types(m.dtype, s.dtype)
      m_hat = m.astype(dtype) * inv_bc1.astype(dtype)
      s_hat = s.astype(dtype) * inv_bc2.astype(dtype)
      scale = jnp.sqrt(s_hat)
      if v is not None:  # F = 0 for curvature="none": max(0, sqrt(ŝ)).
        v_hat = v.astype(dtype) * inv_bc2.astype(dtype)
        fisher = (1 + fisher_ratio.astype(dtype)) * v_hat
        scale = jnp.maximum(dt.astype(dtype) * fisher, scale)
      return m_hat * dt.astype(dtype) / (scale + eps_.astype(dtype))

    def predicted_reduction_terms(m, s, v=None):
      # m̂·g_adj - ½ v̂·g_adj², recomputing g_adj so that the returned updates
      # keep a single consumer (and fuse into `apply_updates`).
      u = direction(m, s, v).astype(sdtype)
      m_hat = m.astype(sdtype) * inv_bc1
      if v is None:
        return u * m_hat
      v_hat = v.astype(sdtype) * inv_bc2
      return u * (m_hat - 0.5 * v_hat * u)

    g_adj = jax.tree.map(direction, *moments)

    loss_avg = state.loss_avg
    predicted_reduction = state.predicted_reduction
    trust_ratio = state.trust_ratio
    skipped_values = state.skipped_values
    if value is not None:
      loss = jnp.asarray(value).astype(sdtype)
      if loss.shape:
        raise ValueError(f"`value` must be a scalar loss, got shape {loss.shape}.")
      finite = jnp.isfinite(loss)
      new_loss_avg = b1_ * loss_avg + (1 - b1_) * loss
      # At t = 1 the bias-corrected average is the loss itself; computing it
      # as loss_avg / bc1 would leave a rounding residue that, divided by
      # max(pr, eps) = eps, throws dt to its bound.
      loss_hat = jnp.where(count_inc == 1, loss, new_loss_avg / bc1)
      new_trust_ratio = (loss_hat - loss) / jnp.maximum(predicted_reduction, eps_)
      exponent = (t - 1) / total_steps
      gamma_ = jnp.asarray(gamma, sdtype)
      lower = (1 - gamma_) ** exponent
      upper = 1 + gamma_**exponent
      new_dt = jnp.clip(new_trust_ratio * dt, lower, upper)
      if use_native:
        total = sum(
            (native.soaa_predicted_reduction(
                m, s, v, [inv_bc1, inv_bc2, 1 + fisher_ratio, dt, eps_],
            ).astype(sdtype)
             for m, s, v in zip(*map(jax.tree.leaves, (mu, nu, v_state)))),
            jnp.zeros([], sdtype),
        )
      else:
        total = utils.tree_sum(
            predicted_reduction_terms, *moments, dtype=sdtype,
            chunk_size=chunk_size,
        )
      # Both paths sum this device's leaves; the mapped axis is summed once.
      if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
      new_pr = lr * total
      keep = lambda new, old: jnp.where(finite, new, old)
      loss_avg = keep(new_loss_avg, loss_avg)
      dt = keep(new_dt, dt)
      predicted_reduction = keep(new_pr, predicted_reduction)
      trust_ratio = keep(new_trust_ratio, trust_ratio)
      skipped_values = skipped_values + jnp.where(finite, 0, 1).astype(jnp.int32)

    g_adj = optax.tree.cast_like(g_adj, grads)
    new_state = SOAAState(
        count=count_inc,
        mu=mu,
        nu=nu,
        curvature=curv,
        dt=dt,
        loss_avg=loss_avg,
        predicted_reduction=predicted_reduction,
        trust_ratio=trust_ratio,
        fisher_ratio=fisher_ratio,
        skipped_values=skipped_values,
    )
    return g_adj, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def soaa(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    gamma: float = 0.1,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    total_steps: int,
    curvature: str = "second_moment",
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    weight_decay_mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    axis_name: Optional[str] = None,
    reduction_chunk_size: Union[int, str, None] = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""SOAA: Second-Order Adaptive Approximation.

  From *"Second-Order Adaptive Approximation for Deep Learning"*-style
  Algorithm 1 of arXiv 2410.02293 ("SOAA"), in the reading fixed by the
  project's spec (``shared/specs/soaa.md``). At step ``t`` with gradients
  ``g``, params ``θ`` and, optionally, the loss ``l`` at ``θ`` (``value=``)::

    m ← b1 m + (1-b1) g            s ← b2 s + (1-b2) g²
    m̂ = m / (1-b1^t)               ŝ = s / (1-b2^t)
    second_moment: v̂ = ŝ                                   (default)
    variance:      v ← b2 v + (1-b2) (g - m̂)²,  v̂ = v / (1-b2^t)
    none:          v̂ = 0
    r = Σ m̂² / Σ (v̂ + eps)         (one ratio of global sums, all leaves)
    F = (1 + r) v̂
    g_adj = m̂ dt / (max(dt F, sqrt(ŝ)) + eps)       (dt of step t-1)
    update = -α λ θ - α g_adj                         (decoupled decay)
    if a finite loss is given:
      loss_avg ← b1 loss_avg + (1-b1) l;  l̂ = loss_avg / (1-b1^t)  (l̂ = l at t=1)
      dt ← clip((l̂ - l) / max(pr, eps) · dt,  (1-γ)^((t-1)/T),  1 + γ^((t-1)/T))
      pr ← α (Σ m̂ g_adj - ½ Σ v̂ g_adj²)               (pr of step t-1 used above)

  Readings of the paper chosen here (it leaves them open):

  * The paper initialises ``v`` but never updates it. By default
    (``curvature="second_moment"``) ``v̂ = ŝ``, the bias-corrected second
    moment: the reading of both public ports of SOAA (the C++ library
    *nadir* and the *zij* documentation, ``F = (1 + Σ m̂² / Σ (v̂ + ε)) v̂``),
    at Adam's memory. ``curvature="variance"`` keeps a centred variance of
    the gradients instead (the Tadam lineage the paper's "diagonal
    covariance" suggests), one more params-sized array (1.5x Adam's state);
    until version 0.1 it was the default. ``curvature="none"`` reads the
    algorithm literally, ``v`` staying 0: ``F = 0``, the step is
    ``m̂ dt / (sqrt(ŝ) + eps)`` and ``pr = α Σ m̂ g_adj`` (``r`` is still
    reported, ``Σ m̂² / (n eps)``, and has no effect). It is an ablation: it
    tells whether the Fisher term does anything on a problem. Same state as
    ``"second_moment"``.
  * With ``curvature="variance"``, at ``t = 1`` ``g - m̂`` is exactly 0 (as
    in exact arithmetic, where ``m̂ = g``), so ``v`` is 0 after the first
    step in float32 and bfloat16 too, instead of rounding noise that ``r``
    would amplify.
  * ``dt``, ``pr`` and ``loss_avg`` are global scalars (one loss per model).
  * Without ``value``, or with a non-finite one, ``dt``, ``pr`` and
    ``loss_avg`` keep their values (a non-finite loss is counted in
    ``skipped_values``). Moments still update. The bias correction of the loss
    average uses the step count, so a loss first given at ``t > 1`` starts
    from a biased average (``dt`` then hits its lower bound once).
  * ``dt`` stays in ``[1-γ, 2]``: SOAA is Adam whose step is multiplied by
    ``dt`` wherever ``sqrt(ŝ) > dt F``. Compare against a tuned Adam.

  The ``value=`` contract: pass the loss evaluated at the ``params`` whose
  gradients are ``updates`` (under data parallelism, its ``pmean``). Unknown
  extra keyword arguments are ignored. Diagnostics live in the
  :class:`SOAAState` (``dt``, ``predicted_reduction``, ``trust_ratio``,
  ``fisher_ratio``, ``skipped_values``); ``optax.tree.get(opt_state, "dt")``
  finds them through ``chain`` and ``inject_hyperparams``.

  Example::

    import jax, optax, optax_soaa

    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax_soaa.soaa(1e-3, total_steps=10_000))
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, state = opt.update(grads, state, params, value=loss)
      return optax.apply_updates(params, updates), state, loss

  Args:
    learning_rate: α, a float or an optax schedule.
    b1: first-moment and loss-average decay, in [0, 1).
    b2: second-moment and curvature decay, in [0, 1).
    gamma: γ in (0, 1), the width of the dt bounds (0.1 by default, as in the
      C++ port; the paper gives none).
    eps: numerical floor, >= 0.
    weight_decay: decoupled weight decay λ >= 0 (scaled by α).
    total_steps: T, a positive int; shapes the dt bounds.
    curvature: ``"second_moment"`` (default; Adam's state plus a few
      scalars), ``"variance"`` (1.5x Adam's state) or ``"none"`` (the
      literal reading, ``v̂ = 0``; Adam's state). Static: it chooses the
      state's structure.
    mu_dtype: optional dtype of the first moment.
    nu_dtype: optional dtype of the second moment and curvature.
    weight_decay_mask: optional mask (or function of params) for the decay.
    axis_name: see :func:`scale_by_soaa`.
    reduction_chunk_size: see :func:`scale_by_soaa`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.
  """
  utils.check_range("weight_decay", weight_decay, lower=0.0)
  return optax.chain(
      scale_by_soaa(
          learning_rate, b1=b1, b2=b2, gamma=gamma, eps=eps,
          total_steps=total_steps, curvature=curvature, mu_dtype=mu_dtype,
          nu_dtype=nu_dtype, axis_name=axis_name,
          reduction_chunk_size=reduction_chunk_size,
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
