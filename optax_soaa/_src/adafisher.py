"""AdaFisher and AdaFisherW: diagonal Kronecker-factored Fisher preconditioning.

Paper: *"AdaFisher: Adaptive Second Order Optimization via Fisher Information"*
(Gomes, Zhang, Belilovsky, Wolf, Hosseini; ICLR 2025, arXiv 2405.16397;
a thesis restating it: arXiv 2504.20096). The numbers follow the authors'
public PyTorch code (AtlasAnalyticsLab/AdaFisher,
``optimizers/AdaFisher.py``). This module
imports no model library: the statistics arrive as a pytree of
:class:`LayerStats`, made by :func:`optax_soaa.value_grad_and_stats` from any
JAX loss function.
"""

import math
from typing import Any, NamedTuple, Optional, Union
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_soaa._src import utils
from optax_soaa._src.layer_stats import default_layout
from optax_soaa._src.layer_stats import is_stats_leaf
from optax_soaa._src.layer_stats import LayerLayout
from optax_soaa._src.layer_stats import LayerStats
from optax_soaa._src.layer_stats import StatsFallbackWarning

FALLBACKS = ("identity", "adam")
PARTS = ("kernel", "bias")


class AdaFisherState(NamedTuple):
  """State of :func:`scale_by_adafisher`.

  ``S`` is the statistics dtype: float32, or the params' dtype where wider.
  For a parameter leaf with layout ``(stack, in, out)`` (:class:`LayerLayout`;
  by default ``in`` = all axes but the last, ``out`` = the last, no stack),
  ``stack`` is the shape of its stack axes, ``fan_in`` and ``fan_out`` the
  products of its input and output axes' sizes (1 when there are none).

  Attributes:
    count: shape ``()``, int32: the steps taken.
    refresh: shape ``()``, bool: whether the next update refreshes the
      running averages (read by :func:`optax_soaa.stats_due`).
    mu: like the params (dtype ``mu_dtype`` or the params'): the momentum m.
    nu: like the params (dtype ``nu_dtype`` or the params', real for complex
      params): the second moment of ``|g|²`` for the ``fallback="adam"``
      leaves; None for the identity fallback.
    h: per leaf, shape ``stack + (fan_in,)``, dtype S: the running average
      of the min-max-normalised input statistic (starts at ones).
    s: per leaf, shape ``stack + (fan_out,)``, dtype S: the running average
      of the min-max-normalised output-gradient statistic (starts at ones).

  Examples:
    >>> import jax.numpy as jnp, optax_soaa
    >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    >>> state = optax_soaa.scale_by_adafisher().init(params)
    >>> state.h["w"].shape, state.s["w"].shape  # (fan_in,), (fan_out,)
    ((3,), (2,))
  """

  count: jax.Array  # shape=(), int32: steps taken.
  refresh: jax.Array  # shape=(), bool: whether the next update refreshes the
  # running averages (read by optax_soaa.stats_due).
  mu: optax.Updates  # like params (dtype mu_dtype or params'): momentum m.
  nu: Optional[optax.Updates]  # like params (dtype nu_dtype or params', real
  # for complex params): Adam second moment of |g|² for the fallback="adam"
  # leaves; None for fallback="identity".
  h: optax.Updates  # per leaf, shape stack + (fan_in,), S: running average of
  # the min-max-normalised input statistic (starts at ones).
  s: optax.Updates  # per leaf, shape stack + (fan_out,), S: running average of
  # the min-max-normalised output-gradient statistic (starts at ones).


def _check_layout(path: str, shape: tuple[int, ...], layout: LayerLayout) -> None:
  axes = sorted(layout.stack_axes + layout.in_axes + layout.out_axes)
  if axes != list(range(len(shape))):
    raise ValueError(
        f"layout {layout} for parameter {path} of shape {shape} must list "
        "each of its axes once.")


def _masked_like(tree: Any, like: Any) -> Any:
  """`tree` with `optax.MaskedNode` wherever `like` has one.

  Inside `optax.masked` / `optax.multi_transform` the transformation sees
  params and gradients with the excluded leaves replaced by `MaskedNode`,
  while the statistics and layouts cover the whole model.
  """
  if tree is None:
    return None
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  if not any(is_masked(x) for x in jax.tree.leaves(like, is_leaf=is_masked)):
    return tree
  return jax.tree.map(lambda u, t: u if is_masked(u) else t, like, tree,
                      is_leaf=is_masked)


def _leaf_layouts(treedef, leaves, paths, layouts) -> list[LayerLayout]:
  """Each leaf's static layout: from `layouts` where given, else the default."""
  if layouts is None:
    return [default_layout(jnp.ndim(x)) for x in leaves]
  try:
    given = treedef.flatten_up_to(layouts)
  except (ValueError, TypeError):
    # Containers may differ (an nnx.State of Variables against a pure one):
    # the leaves must still correspond one to one.
    given = jax.tree.leaves(layouts, is_leaf=is_stats_leaf)
  if len(given) != len(leaves):
    raise ValueError(
        f"`layouts` has {len(given)} leaves, the params have {len(leaves)}; "
        "pass optax_soaa.stats_layouts(...) of these params.")
  out = []
  for path, x, lay in zip(paths, leaves, given):
    ndim = jnp.ndim(x)
    if lay is None:
      lay = default_layout(ndim)
    elif isinstance(lay, LayerStats):
      lay = lay.layout(ndim)
    elif not isinstance(lay, LayerLayout):
      raise ValueError(
          f"`layouts` leaf for parameter {path} must be a LayerLayout, "
          f"LayerStats or None, got {type(lay).__name__}.")
    _check_layout(path, jnp.shape(x), lay)
    out.append(lay)
  return out


def _layout_dims(shape, layout: LayerLayout) -> tuple[tuple[int, ...], int, int]:
  """(stack shape, fan_in, fan_out) of a leaf under `layout`."""
  pick = lambda axes: tuple(shape[a] for a in axes)
  return (pick(layout.stack_axes), math.prod(pick(layout.in_axes)),
          math.prod(pick(layout.out_axes)))


def _fisher(h, s, shape, layout: LayerLayout, damping, dtype) -> jax.Array:
  """``H[i] S[o] + λ`` laid out like the leaf."""
  f = h[..., :, None].astype(dtype) * s[..., None, :].astype(dtype) + damping
  pick = lambda axes: tuple(shape[a] for a in axes)
  f = f.reshape(pick(layout.stack_axes) + pick(layout.in_axes) + pick(layout.out_axes))
  order = layout.stack_axes + layout.in_axes + layout.out_axes
  return jnp.transpose(f, tuple(np.argsort(order))).reshape(shape)


def _check_stats(path: str, shape: tuple[int, ...], st: Any, layout: LayerLayout) -> None:
  """Raises at trace time when a leaf's statistics cannot fit it."""
  if not isinstance(st, LayerStats):
    raise TypeError(
        f"stats for parameter {path} must be a LayerStats or None, got "
        f"{type(st).__name__}.")
  if st.part not in PARTS:
    raise ValueError(
        f"stats for parameter {path}: part must be one of {PARTS}, got "
        f"{st.part!r}.")
  got = st.layout(len(shape))
  if got != layout:
    raise ValueError(
        f"stats for parameter {path} of shape {shape} have layout {got}, but "
        f"the optimizer's state is laid out {layout}. Build the optimizer "
        "with layouts=optax_soaa.stats_layouts(<your value_grad_and_stats "
        "function>, params, *batch).")
  stack, fan_in, fan_out = _layout_dims(shape, layout)
  h_shape, s_shape = jnp.shape(st.h), jnp.shape(st.s)
  if len(h_shape) != len(stack) + 1 or len(s_shape) != len(stack) + 1:
    raise ValueError(
        f"stats for parameter {path}: h and s must be vectors (one per stacked "
        f"layer: leading shape {stack}), got shapes {h_shape} and {s_shape}.")
  if h_shape[:-1] != stack or s_shape[:-1] != stack:
    raise ValueError(
        f"stats for parameter {path}: leading shapes {h_shape[:-1]} / "
        f"{s_shape[:-1]} of h / s must be the stack shape {stack}.")
  if s_shape[-1] != fan_out:
    raise ValueError(
        f"stats for parameter {path} of shape {shape}: s has {s_shape[-1]} "
        f"entries, the parameter has {fan_out} outputs.")
  if st.part == "kernel" and h_shape[-1] not in (fan_in, fan_in + 1):
    raise ValueError(
        f"stats for kernel {path} of shape {shape}: h has {h_shape[-1]} "
        f"entries, expected {fan_in} (no bias) or {fan_in + 1} (with bias).")
  if st.part == "bias" and (fan_in != 1 or h_shape[-1] < 1):
    raise ValueError(
        f"stats for bias {path} of shape {shape}: a bias has one element per "
        "output and h must end with its bias entry.")


def _warn_fallback(paths, damping) -> None:
  """Warns that leaves without statistics barely train (default fallback)."""
  if not paths:
    return
  try:
    ratio = f"about {1 / float(damping):.0f} times"
  except (TypeError, ValueError, ZeroDivisionError, jax.errors.ConcretizationTypeError):
    ratio = "about 1/damping times"
  shown = ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
  warnings.warn(
      f"AdaFisher: {len(paths)} parameter leaves have no layer statistics and take "
      f"the identity fallback (F̃ = 1), so they step {ratio} less than the "
      f"leaves with statistics: they practically do not train. Leaves: {shown}. "
      "optax_soaa.describe_stats(loss_fn, params, *batch) says why; pass "
      "fallback='adam' to give them Adam's step, or fallback='identity' to keep "
      "the reference's F̃ = 1 on purpose (either silences this warning).",
      StatsFallbackWarning, stacklevel=3)


def _warn_no_stats():
  warnings.warn(
      "AdaFisher's update got no statistics (stats=None, or None at every "
      "leaf): every parameter takes the fallback step. Pass the statistics of "
      "the same step: value, grads, extras = "
      "optax_soaa.value_grad_and_stats(loss_fn)(params, *batch); "
      "tx.update(grads, state, params, **extras).",
      StatsFallbackWarning, stacklevel=2)


def scale_by_adafisher(
    b1: float = 0.9,
    decay: float = 0.08,
    new_weight: float = 0.008,
    damping: float = 1e-3,
    stats_every: int = 100,
    *,
    fallback: Optional[str] = None,
    fallback_b2: float = 0.999,
    fallback_eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    axis_name: Optional[str] = None,
    layouts: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales gradients into AdaFisher's direction ``m̂ / F̃``.

  The returned updates are to be scaled by ``-learning_rate`` (as
  :func:`optax.scale_by_adam`'s are); see :func:`adafisher` for the equations
  and the readings of the paper.

  Args:
    b1: momentum decay β, in [0, 1).
    decay: ``a`` of the running average ``F ← a F + b F_new``, >= 0.
    new_weight: ``b`` of the running average, >= 0.
    damping: λ >= 0 added to every Fisher entry.
    stats_every: statistics refresh the running averages on the steps whose
      count before the step is a multiple of this (steps 1, 1 + k, 1 + 2k...
      counting from 1), like the reference's ``TCov``. A positive int (an
      array under :func:`optax.inject_hyperparams`).
    fallback: how leaves without statistics are scaled: ``"identity"``
      (``F̃ = 1``: bias-corrected momentum, as the reference does) or
      ``"adam"`` (``F̃ = sqrt(v̂) + fallback_eps``, ``v`` decayed by
      ``fallback_b2``; allocates a params-sized second moment). ``None``
      (the default) is ``"identity"`` plus a
      :class:`optax_soaa.StatsFallbackWarning` at trace time naming the
      leaves that get no statistics (they step about ``1 / damping`` times
      less than the others); passing either value silences it.
    fallback_b2: second-moment decay of the ``"adam"`` fallback, in [0, 1).
    fallback_eps: epsilon of the ``"adam"`` fallback, >= 0.
    mu_dtype: optional dtype of the momentum.
    nu_dtype: optional dtype of the ``"adam"`` fallback's second moment
      (e.g. float32 state for bfloat16 params); the params' dtype if None.
    axis_name: name of a mapped axis (``pmap``/``shard_map``) over which the
      incoming statistics are averaged (``pmean``) before use. Prefer the
      ``axis_name`` of :func:`optax_soaa.value_grad_and_stats`, which gives
      the statistics of the whole batch across devices exactly; this one
      averages per-device statistics, which differ from them (normalisation
      layers' ``h`` and a dense layer's ``s`` depend on the batch size, and
      min-max normalisation does not cancel all of it). With the collector's
      averaging this one is not needed (averaging twice changes nothing);
      under sharded ``jit`` neither is.
    layouts: which axes of each leaf are inputs, outputs and stacked layers:
      a pytree like params whose leaves are :class:`optax_soaa.LayerLayout`,
      :class:`LayerStats` (their layout is read) or None (the default
      ``(..., in, out)``), e.g. :func:`optax_soaa.stats_layouts`. Fixes the
      shapes of the state's running averages; statistics of another layout
      raise at trace time.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` takes
    ``stats=`` (a pytree like params whose leaves are :class:`LayerStats` or
    ``None``) and ignores other extra args.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_soaa
    >>> def loss_fn(params, x):
    ...   return jnp.mean(jnp.tanh(x @ params["w"]) ** 2)
    >>> params, x = {"w": jnp.ones((3, 2))}, jnp.ones((4, 3))
    >>> opt = optax.chain(optax_soaa.scale_by_adafisher(),
    ...                   optax.scale_by_learning_rate(1e-3))
    >>> _, grads, extras = optax_soaa.value_grad_and_stats(loss_fn)(params, x)
    >>> updates, state = opt.update(grads, opt.init(params), params, **extras)
    >>> updates["w"].shape
    (3, 2)
  """
  b1, decay, new_weight, damping, fallback_b2, fallback_eps = (
      utils.real_hyperparams(
          b1=b1, decay=decay, new_weight=new_weight, damping=damping,
          fallback_b2=fallback_b2, fallback_eps=fallback_eps))
  utils.check_range("b1", b1, lower=0.0, upper=1.0, upper_inclusive=False)
  utils.check_range("decay", decay, lower=0.0)
  utils.check_range("new_weight", new_weight, lower=0.0)
  utils.check_range("damping", damping, lower=0.0)
  utils.check_positive_int("stats_every", stats_every)
  warn_fallback = fallback is None
  fallback = "identity" if fallback is None else fallback
  utils.check_choice("fallback", fallback, FALLBACKS)
  utils.check_range(
      "fallback_b2", fallback_b2, lower=0.0, upper=1.0, upper_inclusive=False)
  utils.check_range("fallback_eps", fallback_eps, lower=0.0)
  use_adam = fallback == "adam"

  def init_fn(params):
    sdtype = utils.scalar_dtype(params)
    leaves, treedef = jax.tree.flatten(params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    leaf_layouts = _leaf_layouts(treedef, leaves, paths,
                                 _masked_like(layouts, params))
    dims = [_layout_dims(jnp.shape(x), lay)
            for x, lay in zip(leaves, leaf_layouts)]
    utils.check_moment_dtype("mu_dtype", mu_dtype, params)
    return AdaFisherState(
        count=jnp.zeros([], jnp.int32),
        refresh=jnp.ones([], bool),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=utils.real_zeros_like(params, nu_dtype) if use_adam else None,
        h=jax.tree.unflatten(treedef, [jnp.ones(st + (fi,), sdtype) for st, fi, _ in dims]),
        s=jax.tree.unflatten(treedef, [jnp.ones(st + (fo,), sdtype) for st, _, fo in dims]),
    )

  def update_fn(updates, state, params=None, *, stats=None, **extra_args):
    del extra_args
    # Checked at trace time: a mismatch would otherwise surface as an opaque
    # tree_map or broadcasting error inside the momentum update.
    utils.check_trees_match("updates", updates, "params given to init", state.mu)
    if params is not None:
      utils.check_trees_match("updates", updates, "params", params)
    del params
    grads = updates
    leaves, treedef = jax.tree.flatten(grads)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads)]
    leaf_layouts = _leaf_layouts(treedef, leaves, paths,
                                 _masked_like(layouts, grads))
    if stats is None:
      leaf_stats = [None] * len(leaves)
    else:
      try:
        leaf_stats = treedef.flatten_up_to(_masked_like(stats, grads))
      except (ValueError, TypeError) as e:
        raise ValueError(
            "`stats` must be a pytree with the structure of the gradients whose "
            "leaves are LayerStats (or None for the fallback); got a "
            f"mismatching structure: {e}") from None
    if leaves and all(st is None for st in leaf_stats):
      _warn_no_stats()
    elif warn_fallback:
      _warn_fallback([p for p, st in zip(paths, leaf_stats) if st is None], damping)
    for path, g, st, lay in zip(paths, leaves, leaf_stats, leaf_layouts):
      if st is not None:
        _check_stats(path, jnp.shape(g), st, lay)

    count_inc = optax.safe_int32_increment(state.count)
    sdtype = jax.tree.leaves(state.h)[0].dtype if jax.tree.leaves(state.h) else jnp.float32
    t = count_inc.astype(sdtype)
    bc1 = 1 - jnp.asarray(b1, sdtype) ** t
    refresh = state.refresh
    decay_ = jnp.asarray(decay, sdtype)
    new_weight_ = jnp.asarray(new_weight, sdtype)
    damping_ = jnp.asarray(damping, sdtype)

    mu = optax.tree.update_moment(grads, state.mu, b1, 1)
    mu = optax.tree.cast_like(mu, state.mu)
    if use_adam:
      nu = optax.tree.update_moment_per_elem_norm(grads, state.nu, fallback_b2, 2)
      nu = optax.tree.cast_like(nu, state.nu)
      bc2 = 1 - jnp.asarray(fallback_b2, sdtype) ** t
      nu_leaves = treedef.flatten_up_to(nu)
    else:
      nu = None
      nu_leaves = [None] * len(leaves)

    mu_leaves = treedef.flatten_up_to(mu)
    h_leaves = treedef.flatten_up_to(state.h)
    s_leaves = treedef.flatten_up_to(state.s)
    directions, new_h, new_s = [], [], []
    for g, m, v, h_avg, s_avg, st, lay in zip(
        leaves, mu_leaves, nu_leaves, h_leaves, s_leaves, leaf_stats, leaf_layouts):
      shape = jnp.shape(g)
      dtype = jnp.promote_types(m.dtype, g.dtype)
      # Complex params: m̂ and the direction complex, the scales F̃ real.
      rdtype = utils.real_dtype(dtype)
      m_hat = m.astype(dtype) / bc1.astype(rdtype)
      if st is None:
        if use_adam:
          v_hat = v.astype(rdtype) / bc2.astype(rdtype)
          direction = m_hat / (jnp.sqrt(v_hat) + jnp.asarray(fallback_eps, rdtype))
        else:
          direction = m_hat
        new_h.append(h_avg)
        new_s.append(s_avg)
      else:
        h_in = jnp.asarray(st.h).astype(sdtype)
        s_in = jnp.asarray(st.s).astype(sdtype)
        if axis_name is not None:
          h_in = jax.lax.pmean(h_in, axis_name)
          s_in = jax.lax.pmean(s_in, axis_name)
        h_norm = utils.min_max(h_in)
        fan_in = h_avg.shape[-1]
        h_part = h_norm[..., :fan_in] if st.part == "kernel" else h_norm[..., -fan_in:]
        h_next = jnp.where(refresh, decay_ * h_avg + new_weight_ * h_part, h_avg)
        s_next = jnp.where(refresh, decay_ * s_avg + new_weight_ * utils.min_max(s_in), s_avg)
        direction = m_hat / _fisher(h_next, s_next, shape, lay, damping_.astype(rdtype), rdtype)
        new_h.append(h_next)
        new_s.append(s_next)
      directions.append(direction.astype(g.dtype))

    new_state = AdaFisherState(
        count=count_inc,
        refresh=(count_inc % stats_every) == 0,
        mu=mu,
        nu=nu,
        h=jax.tree.unflatten(treedef, new_h),
        s=jax.tree.unflatten(treedef, new_s),
    )
    return jax.tree.unflatten(treedef, directions), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stats_due(opt_state: optax.OptState) -> Union[jax.Array, bool]:
  """Whether the next update of an AdaFisher in `opt_state` refreshes its
  statistics.

  Looks through any nesting (``optax.chain``, ``inject_hyperparams``,
  ``MultiSteps``, ``multi_transform``) for :class:`AdaFisherState` and
  returns a boolean array (true if any of them refreshes), or ``False``
  when there is none (SOAA, arTuRO, optax optimizers need no statistics).
  Pass it to the function made by :func:`optax_soaa.value_grad_and_stats`
  so that only refresh steps compute statistics::

    value, grads, extras = loss_grads_stats(params, x, y,
                                            stats_due=optax_soaa.stats_due(state))

  Args:
    opt_state: any optimizer state (a pytree that may hold
      :class:`AdaFisherState` s).

  Returns:
    A boolean scalar array, or the Python ``False`` when `opt_state` holds no
    AdaFisher.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_soaa
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> opt = optax.chain(optax.clip_by_global_norm(1.0),
    ...                   optax_soaa.adafisher(1e-3, stats_every=10))
    >>> bool(optax_soaa.stats_due(opt.init(params)))  # The first step does.
    True
    >>> optax_soaa.stats_due(optax.adam(1e-3).init(params))
    False
  """
  found = [s.refresh for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, AdaFisherState))
           if isinstance(s, AdaFisherState)]
  if not found:
    return False
  return jnp.any(jnp.stack(found))


def _adafisher_chain(learning_rate, b1, decay, new_weight, damping, stats_every,
                     weight_decay, decoupled, **kwargs):
  learning_rate, weight_decay = utils.real_hyperparams(
      learning_rate=learning_rate, weight_decay=weight_decay)
  utils.check_schedule_or_nonneg("learning_rate", learning_rate)
  utils.check_range("weight_decay", weight_decay, lower=0.0)
  decay_weights = optax.add_decayed_weights(weight_decay)
  precondition = scale_by_adafisher(
      b1=b1, decay=decay, new_weight=new_weight, damping=damping,
      stats_every=stats_every, **kwargs)
  # AdaFisherW decays θ after preconditioning (scaled by α, not by F̃);
  # AdaFisher adds wd θ to the gradient before the momentum.
  stages = ((precondition, decay_weights) if decoupled
            else (decay_weights, precondition))
  return optax.chain(*stages, optax.scale_by_learning_rate(learning_rate))


def adafisher(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    decay: float = 0.08,
    new_weight: float = 0.008,
    damping: float = 1e-3,
    stats_every: int = 100,
    weight_decay: float = 0.0,
    *,
    fallback: Optional[str] = None,
    fallback_b2: float = 0.999,
    fallback_eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    axis_name: Optional[str] = None,
    layouts: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaFisher: momentum preconditioned by a diagonal Kronecker-factored Fisher.

  For a layer ``y = x W + b`` the empirical Fisher is approximated as
  ``H ⊗ S`` (K-FAC) and only the diagonals are kept: ``h``, the mean square of
  the layer inputs, and ``s``, the mean square of the gradients w.r.t. the
  layer outputs. Both come with each step's gradients in ``stats=``
  (:func:`optax_soaa.value_grad_and_stats` computes them for any JAX model).
  At step ``t`` (counting from 1) with gradients ``g`` and params ``θ``::

    if (t - 1) % stats_every == 0:                   (refresh, the code's TCov)
      H ← a H + b minmax(h)      S ← a S + b minmax(s)      (H, S start at 1)
    F̃[i, o] = H[i] S[o] + λ      (i over the kernel's input axes, o over its
                                  output axes; a bias: F̃[o] = H[-1] S[o] + λ)
    F̃ = 1                        (leaves without statistics, fallback="identity")
    F̃ = sqrt(v̂) + eps            (leaves without statistics, fallback="adam")
    m ← β m + (1-β) (g + wd θ)
    θ ← θ - α / (1-β^t) · m / F̃

  with ``minmax(x) = (x - min x) / (max x - min x + 1e-6)`` per layer, after
  ``+inf → 1, -inf → 0``.

  Readings of the paper and the authors' code chosen here:

  * ``a = 0.08, b = 0.008`` by default, the authors' code in both of its
    forms: the current ``optimizers/AdaFisher.py`` takes one ``γ = 0.8`` and
    computes ``F ← 0.1 γ F + 0.01 γ F_new``; the earlier versions (and the
    paper's and the language-model scripts' ``gamma1 = 0.92, gamma2 =
    0.008``) compute ``F ← (1 - gamma1) F + gamma2 F_new``, the same
    ``a = 1 - 0.92``. For another ``γ`` of the current code pass
    ``decay=0.1 * γ, new_weight=0.01 * γ``.
  * What these numbers imply: ``F`` forgets its start within two or three
    refreshes and settles at about ``b / (1 - a) ≈ 0.0087`` times the
    min-max-normalised statistic, so ``H[i] S[o] <= 0.0087² ≈ 7.6e-5`` and
    ``F̃ = λ (1 + at most 7.6 %)`` with the default ``λ = 1e-3``. AdaFisher
    then steps like momentum SGD with step ``α / λ``, the layer curvature
    modulating each coordinate's step by at most a few per cent, and often
    far less: the mean square of the output gradients of a batch-mean loss
    is small, and where the spread of ``s`` is not large against the
    ``1e-6`` that min-max normalisation adds to it, ``minmax(s)`` stays far
    below 1. That is the authors' algorithm as they ship it; the defaults
    keep it.
  * Leaves without statistics: with the identity fallback (the reference's
    ``F̃ = 1``) such a leaf steps ``α m̂`` while a leaf with statistics steps
    about ``α m̂ / λ``, 1/λ = 1000 times more: it practically does not train.
    :func:`optax_soaa.value_grad_and_stats` therefore gives statistics to
    every layer kind a modern model uses (dense, convolution, embedding
    lookups and added position tables, LayerNorm over any axes, GroupNorm,
    RMSNorm, BatchNorm on any feature axis), and a leaf still without them
    raises a :class:`optax_soaa.StatsFallbackWarning` at trace time, naming
    it, unless ``fallback`` was passed: ``fallback="adam"`` gives such leaves
    Adam's step (``α m̂ / (sqrt(v̂) + eps)``, about ``α`` per coordinate
    whatever the gradient's scale), ``fallback="identity"`` keeps ``F̃ = 1``.
  * Embeddings (beyond the reference, which never trains one: its language
    model freezes its pretrained token and position tables and its tied
    head): a lookup of rows of a table is a dense layer without bias on
    one-hot inputs, so it gets those dense statistics, ``h[row] = (lookups of
    the row) / N`` and ``s = Σ δ² / N`` over the ``N`` lookups; a table added
    to activations (``x + pos[:T]``) is the same with the position as the
    row. A table that is also a tied output layer (``x @ table.T``) gets the
    mean of its two uses, each in the table's layout (the head's
    output-gradient statistic per row, its input statistic per column) and
    each min-max normalised first. Measured on the benchmark's byte-level
    transformer (2,000 steps), AdaFisher reaches 2.98 test bits/byte with its
    embeddings on the fallback and about 2.5 with them on statistics (Adam:
    2.40); the benchmark tables have the current numbers.
  * Normalisation layers as the reference does them: LayerNorm and
    BatchNorm scale and bias get statistics with the reference's formulas:
    ``h`` is two numbers per layer (scale, bias) computed from the layer's
    raw input and min-max normalised together (so one of them is 0 and the
    other about 1), and LayerNorm's input statistic reduces over every axis
    but axis 1 (the sequence axis of a ``(B, T, D)`` input). GroupNorm,
    RMSNorm and LayerNorm over several axes (the reference has none of them)
    get the same formulas generalised to their normalised axes: the input
    as the normalisation's mean sees it (GroupNorm's reshaped into groups)
    summed over every axis but the first non-batch axis it does not
    normalise, and ``s = (Σ_rows δ)² / B`` per parameter element
    (:func:`optax_soaa.value_grad_and_stats` gives the formulas).
    ``value_grad_and_stats(..., layers=("dense", "conv", "embedding"))``
    leaves the normalisation layers to the fallback.
  * A leaf uses its Fisher on a step iff ``stats`` holds a :class:`LayerStats`
    for it on that step. On steps that do not refresh the values passed are
    ignored (zeros from ``value_grad_and_stats(..., stats_due=False)`` are
    fine); :func:`optax_soaa.stats_due` says which steps refresh.
  * Kernel layouts: the optimizer state is laid out for Flax's
    ``(..., in, out)`` kernels unless ``layouts`` says otherwise (Equinox's
    ``(out, in)`` and ``(out, in, kh, kw)``, ``DenseGeneral`` with several
    output axes, a scanned stack of layers): pass
    ``layouts=optax_soaa.stats_layouts(...)``.
  * The first refresh is the first step (count 0), as the reference's
    ``steps % TCov == 0`` with ``steps`` starting at 0.
  * Where this library departs from the reference code, deliberately: a
    layer called several times gets the mean of its statistics over the
    calls (the reference's hooks update the running average once per call,
    so its last call dominates); a convolution's ``h`` is the mean over
    examples and output positions (the reference's grouped-convolution patch
    layout divides it by the patch size once more, which min-max
    normalisation all but cancels) and uses the true dilated patches (the
    reference ignores dilation); under data parallelism the statistics of the
    global batch are normalised (the reference all-reduces its running
    averages after normalising per device); and BatchNorm over ``(B, D)`` or
    ``(B, T, D)`` inputs, 1-D and 3-D convolutions, ``DenseGeneral`` and
    einsum layers get statistics, where the reference (``Linear``,
    ``Conv2d``, ``BatchNorm2d``, ``LayerNorm`` only) gives them ``F̃ = 1``.
  * Statistics are per layer vectors, so the state is Adam-like in memory:
    one params-sized momentum (two with ``fallback="adam"``) plus those
    vectors.
  * Complex parameters, with gradients in optax's convention (the conjugate
    of JAX's, ``∂L/∂x + i ∂L/∂y``), are treated as optax's Adam treats them:
    the statistics are of ``|x|²`` and ``|δ|²``, the ``"adam"`` fallback's
    second moment of ``|g|²``, ``F̃`` is real, and the momentum and the
    updates are complex.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_soaa
    >>> def loss_fn(params, x, y):  # Any JAX model: a plain-JAX MLP here.
    ...   h = jnp.tanh(x @ params["w1"] + params["b1"])
    ...   return jnp.mean((h @ params["w2"] - y) ** 2)
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> params = {"w1": 0.5 * jax.random.normal(k1, (4, 16)),
    ...           "b1": jnp.zeros(16),
    ...           "w2": 0.5 * jax.random.normal(k2, (16, 1))}
    >>> x = jax.random.normal(k3, (64, 4))
    >>> y = jnp.sin(x[:, :1])
    >>> opt = optax_soaa.adafisher(1e-3)
    >>> state = opt.init(params)
    >>> loss_grads_stats = optax_soaa.value_grad_and_stats(loss_fn)
    >>> @jax.jit
    ... def step(params, state):
    ...   # Statistics only on the steps that refresh AdaFisher's averages.
    ...   loss, grads, extras = loss_grads_stats(
    ...       params, x, y, stats_due=optax_soaa.stats_due(state))
    ...   updates, state = opt.update(grads, state, params, **extras)
    ...   return optax.apply_updates(params, updates), state, loss
    >>> first = loss_fn(params, x, y)
    >>> for _ in range(100):
    ...   params, state, loss = step(params, state)
    >>> bool(loss < 0.05 * first)
    True

  Args:
    learning_rate: α, a float or an optax schedule.
    b1: momentum decay β, in [0, 1).
    decay: ``a``, the running-average decay of the statistics, >= 0.
    new_weight: ``b``, the weight of new statistics, >= 0.
    damping: λ >= 0.
    stats_every: refresh period of the statistics (the reference's TCov).
    weight_decay: wd >= 0, added to the gradient before the momentum (L2).
    fallback: ``"identity"``, ``"adam"`` or ``None`` (``"identity"`` with a
      :class:`optax_soaa.StatsFallbackWarning` naming the leaves without
      statistics); see above.
    fallback_b2: second-moment decay of the ``"adam"`` fallback.
    fallback_eps: epsilon of the ``"adam"`` fallback.
    mu_dtype: optional dtype of the momentum.
    nu_dtype: optional dtype of the ``"adam"`` fallback's second moment.
    axis_name: see :func:`scale_by_adafisher`.
    layouts: see :func:`scale_by_adafisher`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``stats=`` (and ignores other extra arguments such as ``value=``).

  References:
    Gomes et al., `AdaFisher: Adaptive Second Order Optimization via Fisher
    Information <https://arxiv.org/abs/2405.16397>`_, ICLR 2025 (arXiv
    2405.16397; a thesis restating it: arXiv 2504.20096).
  """
  return _adafisher_chain(
      learning_rate, b1, decay, new_weight, damping, stats_every, weight_decay,
      decoupled=False, fallback=fallback, fallback_b2=fallback_b2,
      fallback_eps=fallback_eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      axis_name=axis_name, layouts=layouts)


def adafisherw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    decay: float = 0.08,
    new_weight: float = 0.008,
    damping: float = 1e-3,
    stats_every: int = 100,
    weight_decay: float = 0.0,
    *,
    fallback: Optional[str] = None,
    fallback_b2: float = 0.999,
    fallback_eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    axis_name: Optional[str] = None,
    layouts: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaFisherW: AdaFisher with decoupled weight decay.

  Everything but the weight decay is :func:`adafisher` (same statistics,
  running averages, Fisher ``F̃`` and readings of the paper). At step ``t``::

    m ← β m + (1-β) g
    θ ← θ - α (m / (1-β^t) / F̃ + wd θ)

  so the decay is scaled by α only, not by ``1 / F̃`` (the authors'
  ``AdaFisherW``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_soaa
    >>> def loss_fn(params, x, y):  # Any JAX model: a plain-JAX MLP here.
    ...   h = jnp.tanh(x @ params["w1"] + params["b1"])
    ...   return jnp.mean((h @ params["w2"] - y) ** 2)
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> params = {"w1": 0.5 * jax.random.normal(k1, (4, 16)),
    ...           "b1": jnp.zeros(16),
    ...           "w2": 0.5 * jax.random.normal(k2, (16, 1))}
    >>> x = jax.random.normal(k3, (64, 4))
    >>> y = jnp.sin(x[:, :1])
    >>> opt = optax_soaa.adafisherw(1e-3, weight_decay=1e-4)
    >>> loss, grads, extras = optax_soaa.value_grad_and_stats(loss_fn)(
    ...     params, x, y)
    >>> sorted(extras)  # What every optimizer of this library may take.
    ['stats', 'value']
    >>> updates, state = opt.update(grads, opt.init(params), params, **extras)

  Args:
    learning_rate: α, a float or an optax schedule.
    b1: momentum decay β, in [0, 1).
    decay: ``a``, the running-average decay of the statistics, >= 0.
    new_weight: ``b``, the weight of new statistics, >= 0.
    damping: λ >= 0.
    stats_every: refresh period of the statistics (the reference's TCov).
    weight_decay: wd >= 0, decoupled (scaled by α, not by F̃).
    fallback: ``"identity"``, ``"adam"`` or ``None`` (``"identity"``, with
      a warning naming the leaves without statistics); see :func:`adafisher`.
    fallback_b2: second-moment decay of the ``"adam"`` fallback.
    fallback_eps: epsilon of the ``"adam"`` fallback.
    mu_dtype: optional dtype of the momentum.
    nu_dtype: optional dtype of the ``"adam"`` fallback's second moment.
    axis_name: see :func:`scale_by_adafisher`.
    layouts: see :func:`scale_by_adafisher`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``stats=``.

  References:
    Gomes et al., `AdaFisher: Adaptive Second Order Optimization via Fisher
    Information <https://arxiv.org/abs/2405.16397>`_, ICLR 2025 (arXiv
    2405.16397; a thesis restating it: arXiv 2504.20096).
  """
  return _adafisher_chain(
      learning_rate, b1, decay, new_weight, damping, stats_every, weight_decay,
      decoupled=True, fallback=fallback, fallback_b2=fallback_b2,
      fallback_eps=fallback_eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      axis_name=axis_name, layouts=layouts)
