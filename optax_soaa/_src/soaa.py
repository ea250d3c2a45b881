"""SOAA: SecondOrderAdaptiveAdam (arXiv 2410.02293)."""

from typing import Any, Callable, NamedTuple, Optional, Union
import warnings

import jax
import jax.numpy as jnp
import optax

from optax_soaa._src import passes
from optax_soaa._src import utils

CURVATURES = ("second_moment", "variance", "none")

class _Unset:
  """Marks `reduction_chunk_size` as not given (None is one of its values)."""

  def __repr__(self):
    return "<deprecated>"


_UNSET = _Unset()


class MissingValueWarning(UserWarning):
  """SOAA was updated without ``value=``: its trust region ``dt`` stays fixed.

  Raised (as a warning) by the ``update`` of :func:`soaa` and
  :func:`scale_by_soaa` when it is called without the loss. Pass
  ``value=loss``, or silence it where a fixed ``dt`` is meant (SOAA as Adam
  with a fixed step factor).

  Examples:
    >>> import warnings, jax.numpy as jnp, optax_soaa
    >>> opt = optax_soaa.soaa(1e-3, total_steps=100)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   _ = opt.update({"w": jnp.ones(3)}, state, params)  # No value=.
    >>> [w.category.__name__ for w in caught]
    ['MissingValueWarning']
    >>> with warnings.catch_warnings():
    ...   warnings.filterwarnings(
    ...       "ignore", category=optax_soaa.MissingValueWarning)
    ...   _ = opt.update({"w": jnp.ones(3)}, state, params)  # Silent.
  """


def _check_value(value: Any) -> None:
  """Raises a clear error for a `value=` that is not a scalar loss."""
  if isinstance(value, (tuple, list)):
    raise TypeError(
        f"`value` must be the scalar loss, got a {type(value).__name__} of "
        f"{len(value)} items. With jax.value_and_grad(loss_fn, has_aux=True), "
        "pass value=loss from `(loss, aux), grads = ...`, not the pair.")
  shape = jnp.shape(value)
  if shape:
    raise ValueError(
        f"`value` must be the scalar loss at `params`, got shape {shape}; "
        "reduce it (e.g. its mean over the batch) before passing it.")


class SOAAState(NamedTuple):
  """State of :func:`scale_by_soaa`: moments, trust region and diagnostics.

  ``S`` below is the scalar dtype: float32, or the params' dtype where wider.
  Every field keeps its shape and dtype from step to step.

  Attributes:
    count: shape ``()``, int32: the steps taken.
    mu: like params (dtype ``mu_dtype``, else the params'): the first moment
      ``m``.
    nu: like params (dtype ``nu_dtype``, else the params'; real, float32 for
      complex64 params): the second moment ``s`` of ``|g|²``.
    curvature: like ``nu``: the centred variance ``v`` with
      ``curvature="variance"``; ``None`` otherwise (``v̂ = ŝ``, or ``v̂ = 0``
      for ``"none"``).
    dt: shape ``()``, ``S``: the trust-region multiplier of the next step;
      starts at 1.
    loss_avg: shape ``()``, ``S``: the moving average of the loss (not bias
      corrected).
    predicted_reduction: shape ``()``, ``S``: ``pr``, the loss reduction the
      quadratic model predicted for the last step before this update that
      had a finite loss (formed one update late, see :func:`soaa`).
    trust_ratio: shape ``()``, ``S``: ``(l̂ - l) / max(pr, eps)`` of the last
      step given a loss.
    fisher_ratio: shape ``()``, ``S``: the last ``r = Σ m̂² / Σ (v̂ + eps)``.
    skipped_values: shape ``()``, int32: how many non-finite ``value`` s were
      ignored.
    pending_reduction: shape ``()``, bool: the last step had a finite loss,
      so its predicted reduction is still to be formed (by the next update,
      from the scalars below and the moments before they change).
    pending_learning_rate: shape ``()``, ``S``: that step's learning rate.
    pending_dt: shape ``()``, ``S``: the dt its direction used.
    pending_bc1: shape ``()``, ``S``: its ``1 - b1^t``.
    pending_bc2: shape ``()``, ``S``: its ``1 - b2^t``.
    pending_eps: shape ``()``, ``S``: its eps.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_soaa
    >>> opt = optax_soaa.soaa(1e-3, total_steps=100)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.array([0.1, -0.2, 0.3])}
    >>> updates, state = opt.update(grads, state, params, value=jnp.array(1.0))
    >>> soaa_state = state[0]  # soaa() is a chain: SOAA's state comes first.
    >>> int(soaa_state.count), float(soaa_state.dt), soaa_state.mu["w"].shape
    (1, 1.0, (3,))
    >>> float(optax.tree.get(state, "dt"))  # The same field, found by name.
    1.0
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  curvature: Optional[optax.Updates]
  dt: jax.Array
  loss_avg: jax.Array
  predicted_reduction: jax.Array
  trust_ratio: jax.Array
  fisher_ratio: jax.Array
  skipped_values: jax.Array
  pending_reduction: jax.Array
  pending_learning_rate: jax.Array
  pending_dt: jax.Array
  pending_bc1: jax.Array
  pending_bc2: jax.Array
  pending_eps: jax.Array


# The two passes of a step, per leaf (see `passes.run`). `v` is the
# curvature state v (curvature="variance"), ŝ's state s again
# ("second_moment"), or absent ("none": v̂ = 0).


# Complex parameters (the gradient given as optax's convention has it, the
# conjugate of JAX's: ∂L/∂x + i ∂L/∂y) as optax's Adam treats them: |g|² in
# the second moment and the variance, which stay real, and real inner
# products Re(conj(a) b) in the sums; m and the updates are complex.


def _moments(g, m, s, *v, b1, b2, bc1, first, **_):
  """Pass 1: m, s (and the centred variance v) after gradient g."""
  m = (1 - b1) * g + b1 * m
  s = (1 - b2) * utils.abs_sq(g) + b2 * s
  if not v:
    return m, s
  # In exact arithmetic g - m̂ = 0 at t = 1 (m̂ = g); computed, it is rounding
  # noise that r would divide by its own sum, so the first step takes the
  # exact value.
  deviation = jnp.where(
      first, 0, g - m / bc1.astype(utils.real_dtype(m.dtype)))
  return m, s, b2 * v[0] + (1 - b2) * utils.abs_sq(deviation)


def _moment_sums(g, m, s, *v, curvature, **_):
  """Σ |m|² and Σ v (Σ s when v̂ = ŝ): the sums of r, unscaled."""
  del g
  if curvature == "none":
    return (utils.abs_sq(m),)
  return utils.abs_sq(m), (v[0] if v else s)


def _last_reduction_terms(g, m, s, *v, curvature, last_step, **_):
  """The terms of the last step's predicted reduction, from the moments
  before this update (those its direction read) and its scalars."""
  del g
  curvature_state = {"variance": v, "second_moment": (s,), "none": ()}
  return _predicted_reduction_terms(m, s, *curvature_state[curvature],
                                    **last_step)


def _direction(m, s, *v, inv_bc1, inv_bc2, dt, eps, fisher_scale, **_):
  """Pass 2: g_adj = m̂ dt / (max(dt (1 + r) v̂, sqrt(ŝ)) + eps)."""
  dtype = jnp.promote_types(utils.real_dtype(m.dtype), s.dtype)
  cast = lambda x: jnp.asarray(x).astype(dtype)
  m_hat = m.astype(jnp.promote_types(m.dtype, dtype)) * cast(inv_bc1)
  scale = jnp.sqrt(s.astype(dtype) * cast(inv_bc2))
  if v:  # F = 0 for curvature="none": max(0, sqrt(ŝ)).
    fisher = cast(fisher_scale) * (v[0].astype(dtype) * cast(inv_bc2))
    scale = jnp.maximum(cast(dt) * fisher, scale)
  return m_hat * cast(dt) / (scale + cast(eps))


def _predicted_reduction_terms(m, s, *v, sum_dtype, curvature_weight,
                               **scalars):
  """(Re(conj(m̂) g_adj) - ½ v̂ |g_adj|²) bc1, with g_adj recomputed from
  the moments it was formed from and its step's scalars. m and v enter
  unscaled (`curvature_weight` = ½ bc1 / bc2): XLA then needs no m̂ or v̂
  array."""
  widen = lambda x: x.astype(jnp.promote_types(x.dtype, sum_dtype))
  u = widen(_direction(m, s, *v, **scalars))
  terms = utils.real_dot(widen(m), u)
  if v:
    terms = terms - v[0].astype(sum_dtype) * utils.abs_sq(u) * curvature_weight
  return (terms,)


def _direction_scalars(*, bc1, bc2, dt, eps, fisher_ratio, sum_dtype):
  """The named scalars of `_direction` and `_predicted_reduction_terms` for
  one step (bias corrections, the dt it used, eps and r)."""
  return dict(
      inv_bc1=1 / bc1, inv_bc2=1 / bc2, dt=dt, eps=eps,
      fisher_scale=1 + fisher_ratio, sum_dtype=sum_dtype,
      curvature_weight=0.5 * bc1 / bc2,
  )


def _cast_updates(directions, updates):
  """The directions in the gradients' dtypes (the real part where a complex
  `mu_dtype` held the moment of a real parameter)."""
  def cast(u, g):
    if jnp.iscomplexobj(u) and not jnp.iscomplexobj(g):
      u = u.real
    return u.astype(g.dtype)
  return jax.tree.map(cast, directions, updates)


def _chunk_size_option(chunk_size, reduction_chunk_size):
  """`chunk_size`, or the deprecated `reduction_chunk_size` with a warning."""
  if reduction_chunk_size is _UNSET:
    return chunk_size
  warnings.warn(
      "`reduction_chunk_size` is deprecated and will be removed in the next "
      "release; use `chunk_size` (the same option, under arturo's name).",
      DeprecationWarning, stacklevel=3,
  )
  if not (isinstance(chunk_size, str) and chunk_size == "auto"):
    raise ValueError(
        "give `chunk_size` or the deprecated `reduction_chunk_size`, not "
        "both."
    )
  passes.check_chunk_size("reduction_chunk_size", reduction_chunk_size)
  return reduction_chunk_size


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
    chunk_size: Union[int, str, None] = "auto",
    reduction_chunk_size: Any = _UNSET,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales gradients into SOAA's trust-region direction ``g_adj``.

  The returned updates are ``g_adj`` (to be scaled by ``-learning_rate``, as
  :func:`optax.scale_by_adam`'s are); see :func:`soaa` for the equations and
  the readings of the paper. The transform takes the learning rate because
  the predicted loss reduction that drives ``dt`` is that of the step
  actually taken, ``-α g_adj``.

  Examples:
    SOAA's direction with a step of your own: here gradient clipping before
    it and a cosine schedule, given to the transform (for ``dt``) and to the
    step alike. This is :func:`soaa` without weight decay.

    >>> import jax, jax.numpy as jnp, optax, optax_soaa
    >>> def loss_fn(params, x, y):
    ...   return jnp.mean((x @ params["w"] - y) ** 2)
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> y = x @ jnp.array([1.0, -2.0, 0.5])
    >>> params = {"w": jnp.zeros(3)}
    >>> schedule = optax.cosine_decay_schedule(3e-2, decay_steps=300)
    >>> opt = optax.chain(
    ...     optax.clip_by_global_norm(1.0),
    ...     optax_soaa.scale_by_soaa(schedule, total_steps=300),
    ...     optax.scale_by_learning_rate(schedule))
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    ...   updates, state = opt.update(grads, state, params, value=loss)
    ...   return optax.apply_updates(params, updates), state, loss
    >>> for _ in range(300):
    ...   params, state, loss = step(params, state)
    >>> bool(loss < 1e-3)
    True

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
    mu_dtype: optional dtype of the first moment (the params' if None). A
      complex one is honoured for real params too (its imaginary part stays
      0); a real one for complex params raises ``TypeError``.
    nu_dtype: optional dtype of the second moment and of the curvature
      (e.g. float32 state for bfloat16 params); the params' dtype if None
      (its real counterpart for complex params). They hold ``|g|²``: a
      complex dtype raises ``TypeError``.
    axis_name: name of a mapped axis (``pmap``/``shard_map``) over which the
      parameters are *split*; the global sums are then ``psum``-ed over it.
      Leave ``None`` for replicated data parallelism and for sharded ``jit``.
    chunk_size: how the passes over memory are laid out; the numbers do not
      depend on it beyond summation order. ``"auto"`` (default): slices of
      large leaves on a single CPU device, whole arrays elsewhere. A
      positive int: slices of that many elements; ``None``: whole arrays.
      An int must be a static arg of ``optax.inject_hyperparams``.
    reduction_chunk_size: deprecated name of ``chunk_size``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` takes the
    loss at ``params`` as ``value=`` (optional) and ignores other extra args.
  """
  chunk_size = _chunk_size_option(chunk_size, reduction_chunk_size)
  learning_rate, b1, b2, gamma, eps = utils.real_hyperparams(
      learning_rate=learning_rate, b1=b1, b2=b2, gamma=gamma, eps=eps)
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
  mu_dtype = utils.canonicalize_dtype(mu_dtype)
  nu_dtype = utils.canonicalize_dtype(nu_dtype)
  utils.check_real_dtype("nu_dtype", nu_dtype)
  passes.check_chunk_size("chunk_size", chunk_size)
  lr_fn = utils.as_schedule(learning_rate)
  use_variance = curvature == "variance"

  def init_fn(params):
    sdtype = utils.scalar_dtype(params)
    utils.check_moment_dtype("mu_dtype", mu_dtype, params)
    # A fresh array per field: shared buffers cannot be donated.
    zero = lambda: jnp.zeros([], sdtype)
    one = lambda: jnp.ones([], sdtype)
    return SOAAState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=utils.real_zeros_like(params, nu_dtype),
        curvature=(
            utils.real_zeros_like(params, nu_dtype) if use_variance else None
        ),
        dt=one(),
        loss_avg=zero(),
        predicted_reduction=zero(),
        trust_ratio=zero(),
        fisher_ratio=zero(),
        skipped_values=jnp.zeros([], jnp.int32),
        pending_reduction=jnp.zeros([], jnp.bool_),
        # Finite scalars for the zero moments of the first update's sum
        # (which `pending_reduction` then discards).
        pending_learning_rate=zero(),
        pending_dt=one(),
        pending_bc1=one(),
        pending_bc2=one(),
        pending_eps=jnp.asarray(eps, sdtype),
    )

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del extra_args
    # Checked at trace time: a mismatch would otherwise surface as an opaque
    # tree_map or broadcasting error deep inside the moment updates.
    utils.check_trees_match("updates", updates, "params given to init", state.nu)
    if params is not None:
      utils.check_trees_match("updates", updates, "params", params)
    del params
    sdtype = state.dt.dtype
    chunk = passes.resolve_chunk_size(chunk_size)
    count_inc = optax.safe_int32_increment(state.count)
    t = count_inc.astype(sdtype)
    lr = jnp.asarray(lr_fn(state.count), sdtype)
    b1_ = jnp.asarray(b1, sdtype)
    eps_ = jnp.asarray(eps, sdtype)
    bc1 = 1 - b1_**t
    bc2 = 1 - jnp.asarray(b2, sdtype)**t

    # Pass 1: the moments, the sums of r and the last step's predicted
    # reduction. The bias corrections and eps come out of the sums as
    # scalars (Σ m̂² = Σ m² / bc1², Σ (v̂ + eps) = Σ v / bc2 + n eps). The
    # predicted reduction of step t-1 is first needed now, by this step's
    # dt: it is summed here, from the moments before this update (those its
    # direction read) and its stored scalars, instead of in a pass of its
    # own over step t-1's moments.
    last_step = _direction_scalars(
        bc1=state.pending_bc1, bc2=state.pending_bc2, dt=state.pending_dt,
        eps=state.pending_eps, fisher_ratio=state.fisher_ratio,
        sum_dtype=sdtype)
    old = (state.mu, state.nu) + ((state.curvature,) if use_variance else ())
    moments = passes.run(
        "soaa/moments", (updates,), old,
        dict(b1=b1, b2=b2, bc1=bc1, first=count_inc == 1,
             curvature=curvature, last_step=last_step),
        update=_moments, terms=_moment_sums,
        old_terms=_last_reduction_terms, sum_dtype=sdtype, chunk_size=chunk,
        axis_name=axis_name,
    )
    mu, nu = moments.states[:2]
    curv = moments.states[2] if use_variance else None
    sum_m2 = moments.sums[0]
    sum_v = moments.sums[1] if curvature != "none" else jnp.zeros([], sdtype)
    # n eps: n counts every element of the model, on all devices that hold
    # a part of it (the sums are psum-ed over `axis_name` too).
    num_elements = optax.tree.size(nu)
    if axis_name is not None:
      num_elements = jax.lax.psum(num_elements, axis_name)
    sum_v = sum_v / bc2 + num_elements * eps_
    fisher_ratio = sum_m2 / jnp.square(bc1) / sum_v
    predicted_reduction = jnp.where(
        state.pending_reduction,
        state.pending_learning_rate * moments.sums[-1] / state.pending_bc1,
        state.predicted_reduction)

    # Pass 2: the direction g_adj (dt of step t-1). m̂, ŝ, v̂ are formed
    # inside it, so XLA never materialises them, and it fuses into
    # `optax.apply_updates`.
    v_state = {"variance": (curv,), "second_moment": (nu,), "none": ()}[
        curvature]
    dt = state.dt
    step_scalars = _direction_scalars(
        bc1=bc1, bc2=bc2, dt=dt, eps=eps_, fisher_ratio=fisher_ratio,
        sum_dtype=sdtype)
    with_loss = value is not None
    if with_loss:
      _check_value(value)
    else:
      warnings.warn(
          "optax_soaa SOAA was updated without `value=`: its trust region "
          "dt stays at its current value. Pass the loss at `params`: "
          "tx.update(grads, state, params, value=loss). If a fixed dt is "
          "what you want, silence this with warnings.filterwarnings("
          "'ignore', category=optax_soaa.MissingValueWarning).",
          MissingValueWarning, stacklevel=2)
    step = passes.run(
        "soaa/step", (mu, nu, *v_state), (), step_scalars,
        output=_direction, chunk_size=chunk, axis_name=axis_name,
    )

    loss_avg = state.loss_avg
    trust_ratio = state.trust_ratio
    skipped_values = state.skipped_values
    finite = jnp.zeros([], jnp.bool_)
    if with_loss:
      loss = jnp.asarray(value).astype(sdtype)
      finite = jnp.isfinite(loss)
      new_loss_avg = b1_ * loss_avg + (1 - b1_) * loss
      # At t = 1 the bias-corrected average is the loss itself; computing it
      # as loss_avg / bc1 would leave a rounding residue that, divided by
      # max(pr, eps) = eps, throws dt to its bound.
      loss_hat = jnp.where(count_inc == 1, loss, new_loss_avg / bc1)
      # A zero numerator is a zero ratio, also where max(pr, eps) is 0
      # (eps = 0 at t = 1): 0 / 0 would make dt, and every later step, NaN.
      observed = loss_hat - loss
      new_trust_ratio = jnp.where(
          observed == 0, jnp.zeros_like(observed),
          observed / jnp.maximum(predicted_reduction, eps_))
      exponent = (t - 1) / jnp.asarray(total_steps, sdtype)
      gamma_ = jnp.asarray(gamma, sdtype)
      lower = (1 - gamma_) ** exponent
      upper = 1 + gamma_**exponent
      new_dt = jnp.clip(new_trust_ratio * dt, lower, upper)
      keep = lambda new, old: jnp.where(finite, new, old)
      loss_avg = keep(new_loss_avg, loss_avg)
      dt = keep(new_dt, dt)
      trust_ratio = keep(new_trust_ratio, trust_ratio)
      skipped_values = skipped_values + jnp.where(finite, 0, 1).astype(jnp.int32)

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
        pending_reduction=finite,
        pending_learning_rate=lr,
        pending_dt=state.dt,
        pending_bc1=bc1,
        pending_bc2=bc2,
        pending_eps=eps_,
    )
    return _cast_updates(step.outputs, updates), new_state

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
    chunk_size: Union[int, str, None] = "auto",
    reduction_chunk_size: Any = _UNSET,
) -> optax.GradientTransformationExtraArgs:
  r"""SOAA: Adam with a diagonal-Fisher step bound in an adaptive trust region.

  SOAA (SecondOrderAdaptiveAdam, Algorithm 1 of arXiv 2410.02293) keeps
  Adam's moments, bounds each coordinate's step by a diagonal Fisher
  estimate ``F``, and rescales the whole step by a trust-region multiplier
  ``dt`` that follows the ratio of the observed to the predicted loss
  reduction. At step ``t`` with gradients ``g``, params ``θ`` and,
  optionally, the loss ``l`` at ``θ`` (``value=``)::

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
    At ``t = 1``, ``l̂ = l`` exactly and ``pr = 0``, so ``dt = 1``.
  * ``pr`` of step ``t`` is first needed at step ``t+1`` (by its ``dt``),
    and is formed there, from the moments step ``t``'s direction read and
    that step's scalars (kept in the state as ``pending_*``): the numbers
    are the equations' above, and a step reads its memory twice instead of
    three times. The state's ``predicted_reduction`` is therefore one
    update behind: after update ``t`` it holds the ``pr`` of the last step
    before ``t`` that had a finite loss (the one update ``t``'s
    ``trust_ratio`` divided by), 0 after the first update.
  * Without ``value``, or with a non-finite one, ``dt``, ``pr`` and
    ``loss_avg`` keep their values (a non-finite loss is counted in
    ``skipped_values``). Moments still update. The bias correction of the loss
    average uses the step count, so a loss first given at ``t > 1`` starts
    from a biased average (``dt`` then hits its lower bound once).
  * ``dt`` stays in ``[1-γ, 2]``: SOAA is Adam whose step is multiplied by
    ``dt`` wherever ``sqrt(ŝ) > dt F``. Compare against a tuned Adam.
  * Where gradients are large (``ŝ`` above about 1), ``F = (1 + r) ŝ``
    outweighs ``sqrt(ŝ)`` and the step shrinks to about ``α / |g|``: unlike
    Adam's, SOAA's default step depends on the scale of the loss (on a
    least-squares problem with gradients of 10 to 100, ``α = 1e-3`` barely
    moved it). ``curvature="variance"`` (``v̂`` small where gradients are
    consistent) or a larger ``α`` are the remedies.
  * Complex parameters, with gradients in optax's convention (the conjugate
    of JAX's, ``∂L/∂x + i ∂L/∂y``), are treated as optax's Adam treats them:
    squares are ``|g|²``, ``|m̂|²``, ``|g_adj|²`` and ``Σ m̂ g_adj`` is
    ``Σ Re(conj(m̂) g_adj)``, so ``s``, ``v``, ``F``, ``r``, ``pr`` and ``dt``
    are real while ``m`` and the updates are complex.

  The ``value=`` contract: pass the loss evaluated at the ``params`` whose
  gradients are ``updates`` (under data parallelism, its ``pmean``). Unknown
  extra keyword arguments are ignored. Diagnostics live in the
  :class:`SOAAState` (``dt``, ``predicted_reduction``, ``trust_ratio``,
  ``fisher_ratio``, ``skipped_values``); ``optax.tree.get(opt_state, "dt")``
  finds them through ``chain`` and ``inject_hyperparams``.

  How the two passes over memory of a step run on each backend (and what
  ``chunk_size`` changes) is described on the documentation's
  :doc:`internals page </internals>`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_soaa
    >>> def loss_fn(params, x, y):
    ...   return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> y = x @ jnp.array([[1.0], [-2.0], [0.5]]) + 0.3
    >>> params = {"w": jnp.zeros((3, 1)), "b": jnp.zeros((1,))}
    >>> opt = optax.chain(optax.clip_by_global_norm(1.0),
    ...                   optax_soaa.soaa(1e-2, total_steps=500))
    >>> state = opt.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    ...   updates, state = opt.update(grads, state, params, value=loss)
    ...   return optax.apply_updates(params, updates), state, loss
    >>> for _ in range(500):
    ...   params, state, loss = step(params, state)
    >>> bool(loss < 1e-3)
    True
    >>> dt = optax.tree.get(state, "dt")  # The trust region, in the state.
    >>> bool(0.9 <= dt <= 2.0)
    True

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
    mu_dtype: optional dtype of the first moment; see
      :func:`scale_by_soaa`.
    nu_dtype: optional dtype of the second moment and curvature (real);
      see :func:`scale_by_soaa`.
    weight_decay_mask: optional mask (or function of params) for the decay.
    axis_name: see :func:`scale_by_soaa`.
    chunk_size: see :func:`scale_by_soaa`.
    reduction_chunk_size: deprecated name of ``chunk_size``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`: ``optax.chain`` of
    :func:`scale_by_soaa`, ``optax.add_decayed_weights`` and
    ``optax.scale_by_learning_rate`` (its state is their states' tuple).

  References:
    Vo and Vo, `Efficient Second-Order Neural Network Optimization via
    Adaptive Trust Region Methods <https://arxiv.org/abs/2410.02293>`_, 2024.
  """
  chunk_size = _chunk_size_option(chunk_size, reduction_chunk_size)
  learning_rate, weight_decay = utils.real_hyperparams(
      learning_rate=learning_rate, weight_decay=weight_decay)
  utils.check_range("weight_decay", weight_decay, lower=0.0)
  return optax.chain(
      scale_by_soaa(
          learning_rate, b1=b1, b2=b2, gamma=gamma, eps=eps,
          total_steps=total_steps, curvature=curvature, mu_dtype=mu_dtype,
          nu_dtype=nu_dtype, axis_name=axis_name, chunk_size=chunk_size,
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
