"""AdaFisher and AdaFisherW: diagonal Kronecker-factored Fisher preconditioning.

Paper: *"AdaFisher: Adaptive Second Order Optimization via Fisher Information"*
(Gomes, Zhang, Belilovsky, Wolf, Hosseini; ICLR 2025; thesis arXiv 2504.20096).
The numbers follow the authors' public PyTorch code (AtlasAnalyticsLab/AdaFisher,
``optimizers/AdaFisher.py``) as read in the project's spec
(``shared/specs/adafisher.md``). This module imports no Flax: the statistics
arrive as a pytree of :class:`LayerStats` (see
:func:`optax_soaa.flax.value_grad_and_stats` for a Flax helper that makes it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from optax_soaa._src import utils

FALLBACKS = ("identity", "adam")
PARTS = ("kernel", "bias")
_MINMAX_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Statistics of one layer, placed at one parameter leaf.

  For a layer ``y = x W + b`` (any leading dimensions; a convolution with its
  input patches as ``x``) over ``N`` rows (examples x positions):

  * ``h``: shape (fan_in,) or (fan_in + 1,): ``Σ_n x̄² / N`` with
    ``x̄ = [x, 1]`` when the layer has a bias (the last entry is then 1).
    ``fan_in`` is the product of the kernel's dimensions except the last, in
    the kernel's own order (``(kh, kw, in)`` for a Flax ``Conv`` kernel).
  * ``s``: shape (out,): ``Σ_n δ² / N`` with ``δ = ∂loss/∂y``.
  * ``part`` (static): ``"kernel"`` at the kernel leaf (its Fisher is
    ``h[:fan_in] ⊗ s`` laid out like the kernel, ``(..., out)``) or ``"bias"``
    at the bias leaf (its Fisher is ``h[-1] · s``). Both leaves of a layer
    carry the same ``h`` and ``s``: the min-max normalisation runs over the
    whole ``h``, bias entry included, as the reference code does.
  """

  h: jax.Array
  s: jax.Array
  part: str = "kernel"


jax.tree_util.register_dataclass(
    LayerStats, data_fields=["h", "s"], meta_fields=["part"]
)


class AdaFisherState(NamedTuple):
  """State of :func:`scale_by_adafisher`.

  ``S`` is the statistics dtype: float32, or the params' dtype where wider.
  For a parameter leaf of shape ``(d_1, ..., d_k)``, ``fan_in = d_1···d_{k-1}``
  and ``out = d_k`` (a 0-d leaf counts as shape ``(1,)``).
  """

  count: jax.Array  # shape=(), int32: steps taken.
  mu: optax.Updates  # like params (dtype mu_dtype or params'): momentum m.
  nu: Optional[optax.Updates]  # like params (dtype nu_dtype or params'):
  # Adam second moment of the fallback="adam" leaves; None for
  # fallback="identity".
  h: optax.Updates  # per leaf, shape (fan_in,), S: running average of the
  # min-max-normalised input diagonal (starts at ones).
  s: optax.Updates  # per leaf, shape (out,), S: running average of the
  # min-max-normalised output-gradient diagonal (starts at ones).


def _leaf_dims(shape: tuple[int, ...]) -> tuple[int, int]:
  if not shape:
    return 1, 1
  return math.prod(shape[:-1]), shape[-1]


def _min_max(x: jax.Array) -> jax.Array:
  """The reference's normalisation: +inf → 1, -inf → 0, then to [0, 1]."""
  x = jnp.where(x == jnp.inf, jnp.ones_like(x), x)
  x = jnp.where(x == -jnp.inf, jnp.zeros_like(x), x)
  lo = jnp.min(x)
  return (x - lo) / (jnp.max(x) - lo + _MINMAX_EPS)


def _check_stats(path: str, shape: tuple[int, ...], st: Any) -> None:
  """Raises at trace time when a leaf's statistics cannot fit its shape."""
  if not isinstance(st, LayerStats):
    raise TypeError(
        f"stats for parameter {path} must be a LayerStats or None, got "
        f"{type(st).__name__}."
    )
  if st.part not in PARTS:
    raise ValueError(
        f"stats for parameter {path}: part must be one of {PARTS}, got "
        f"{st.part!r}."
    )
  fan_in, out = _leaf_dims(shape)
  h_len, s_len = jnp.shape(st.h), jnp.shape(st.s)
  if len(h_len) != 1 or len(s_len) != 1:
    raise ValueError(
        f"stats for parameter {path}: h and s must be vectors, got shapes "
        f"{h_len} and {s_len}."
    )
  if s_len[0] != out:
    raise ValueError(
        f"stats for parameter {path} of shape {shape}: s has {s_len[0]} "
        f"entries, the parameter's last dimension is {out}."
    )
  if st.part == "kernel" and h_len[0] not in (fan_in, fan_in + 1):
    raise ValueError(
        f"stats for kernel {path} of shape {shape}: h has {h_len[0]} entries, "
        f"expected {fan_in} (no bias) or {fan_in + 1} (with bias)."
    )
  if st.part == "bias" and (len(shape) > 1 or h_len[0] < 1):
    raise ValueError(
        f"stats for bias {path} of shape {shape}: a bias must be a vector "
        "and h must end with its bias entry."
    )


def scale_by_adafisher(
    b1: float = 0.9,
    decay: float = 0.08,
    new_weight: float = 0.008,
    damping: float = 1e-3,
    stats_every: int = 100,
    *,
    fallback: str = "identity",
    fallback_b2: float = 0.999,
    fallback_eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales gradients into AdaFisher's direction ``m̂ / F̃``.

  The returned updates are to be scaled by ``-learning_rate`` (as
  :func:`optax.scale_by_adam`'s are); see :func:`adafisher` for the equations.

  Args:
    b1: momentum decay β, in [0, 1).
    decay: ``a`` of the running average ``F ← a F + b F_new``, >= 0.
    new_weight: ``b`` of the running average, >= 0.
    damping: λ >= 0 added to every Fisher entry.
    stats_every: statistics refresh the running averages on the steps whose
      count before the step is a multiple of this (steps 1, 1 + k, 1 + 2k...
      counting from 1), like the reference's ``TCov``.
    fallback: how leaves without statistics are scaled: ``"identity"``
      (``F̃ = 1``: bias-corrected momentum, as the reference does) or
      ``"adam"`` (``F̃ = sqrt(v̂) + fallback_eps``, ``v`` decayed by
      ``fallback_b2``; allocates a params-sized second moment).
    fallback_b2: second-moment decay of the ``"adam"`` fallback, in [0, 1).
    fallback_eps: epsilon of the ``"adam"`` fallback, >= 0.
    mu_dtype: optional dtype of the momentum.
    nu_dtype: optional dtype of the ``"adam"`` fallback's second moment
      (e.g. float32 state for bfloat16 params); the params' dtype if None.
    axis_name: name of a mapped axis (``pmap``/``shard_map``) over which the
      incoming statistics are averaged (``pmean``) before use. Not needed
      when the Flax helper already averaged them (its own ``axis_name``;
      averaging twice changes nothing) or under sharded ``jit``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` takes
    ``stats=`` (a pytree like params whose leaves are :class:`LayerStats` or
    ``None``) and ignores other extra args.
  """
  utils.check_range("b1", b1, lower=0.0, upper=1.0, upper_inclusive=False)
  utils.check_range("decay", decay, lower=0.0)
  utils.check_range("new_weight", new_weight, lower=0.0)
  utils.check_range("damping", damping, lower=0.0)
  utils.check_positive_int("stats_every", stats_every)
  utils.check_choice("fallback", fallback, FALLBACKS)
  utils.check_range(
      "fallback_b2", fallback_b2, lower=0.0, upper=1.0, upper_inclusive=False
  )
  utils.check_range("fallback_eps", fallback_eps, lower=0.0)
  mu_dtype = optax._src.utils.canonicalize_dtype(mu_dtype)  # pylint: disable=protected-access
  nu_dtype = optax._src.utils.canonicalize_dtype(nu_dtype)  # pylint: disable=protected-access
  use_adam = fallback == "adam"

  def init_fn(params):
    sdtype = utils.scalar_dtype(params)
    ones_h = lambda p: jnp.ones((_leaf_dims(jnp.shape(p))[0],), sdtype)
    ones_s = lambda p: jnp.ones((_leaf_dims(jnp.shape(p))[1],), sdtype)
    return AdaFisherState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params, dtype=nu_dtype) if use_adam else None,
        h=jax.tree.map(ones_h, params),
        s=jax.tree.map(ones_s, params),
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
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(grads)[0]]
    if stats is None:
      leaf_stats = [None] * len(leaves)
    else:
      try:
        leaf_stats = treedef.flatten_up_to(stats)
      except (ValueError, TypeError) as e:
        raise ValueError(
            "`stats` must be a pytree with the structure of the gradients whose "
            "leaves are LayerStats (or None for the fallback); got a "
            f"mismatching structure: {e}"
        ) from None
    for path, g, st in zip(paths, leaves, leaf_stats):
      if st is not None:
        _check_stats(path, jnp.shape(g), st)

    count_inc = numerics.safe_int32_increment(state.count)
    sdtype = jax.tree.leaves(state.h)[0].dtype if jax.tree.leaves(state.h) else jnp.float32
    t = count_inc.astype(sdtype)
    bc1 = 1 - jnp.asarray(b1, sdtype) ** t
    refresh = state.count % stats_every == 0
    decay_ = jnp.asarray(decay, sdtype)
    new_weight_ = jnp.asarray(new_weight, sdtype)
    damping_ = jnp.asarray(damping, sdtype)

    mu = optax.tree.update_moment(grads, state.mu, b1, 1)
    mu = optax.tree.cast(mu, mu_dtype)
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
    for g, m, v, h_avg, s_avg, st in zip(
        leaves, mu_leaves, nu_leaves, h_leaves, s_leaves, leaf_stats
    ):
      shape = jnp.shape(g)
      dtype = jnp.promote_types(m.dtype, g.dtype)
      m_hat = m.astype(dtype) / bc1.astype(dtype)
      if st is None:
        if use_adam:
          v_hat = v.astype(dtype) / bc2.astype(dtype)
          direction = m_hat / (jnp.sqrt(v_hat) + jnp.asarray(fallback_eps, dtype))
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
        h_norm = _min_max(h_in)
        fan_in = h_avg.shape[0]
        h_part = h_norm[:fan_in] if st.part == "kernel" else h_norm[-fan_in:]
        h_next = jnp.where(refresh, decay_ * h_avg + new_weight_ * h_part, h_avg)
        s_next = jnp.where(
            refresh, decay_ * s_avg + new_weight_ * _min_max(s_in), s_avg
        )
        fisher = (
            h_next[:, None].astype(dtype) * s_next[None, :].astype(dtype)
            + damping_.astype(dtype)
        ).reshape(shape)
        direction = m_hat / fisher
        new_h.append(h_next)
        new_s.append(s_next)
      directions.append(direction.astype(g.dtype))

    new_state = AdaFisherState(
        count=count_inc,
        mu=mu,
        nu=nu,
        h=jax.tree.unflatten(treedef, new_h),
        s=jax.tree.unflatten(treedef, new_s),
    )
    return jax.tree.unflatten(treedef, directions), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_DOC_COMMON = r"""
  From *"AdaFisher: Adaptive Second Order Optimization via Fisher
  Information"* (ICLR 2025; arXiv 2504.20096), with the numbers of the authors'
  code. For a layer ``y = x W + b`` the empirical Fisher is approximated as
  ``H ⊗ S`` (K-FAC) and only the diagonals are kept: ``h`` (inputs) and ``s``
  (gradients w.r.t. the outputs), both given per step in ``stats=``. At step
  ``t`` (counting from 1) with gradients ``g`` and params ``θ``::

    if (t - 1) % stats_every == 0:                 (refresh, like TCov)
      H ← a H + b minmax(h)      S ← a S + b minmax(s)      (H, S start at 1)
    F̃[i, o] = H[i] S[o] + λ      (kernel laid out (..., in, out), i over all
                                  but the last axis; bias: F̃[o] = H[-1] S[o] + λ)
    F̃ = 1                        (leaves without statistics, fallback="identity")
    F̃ = sqrt(v̂) + eps            (leaves without statistics, fallback="adam")
    minmax(x) = (x - min x) / (max x - min x + 1e-6)  after +inf → 1, -inf → 0
{equations}

  Readings chosen here:

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
    modulating each coordinate's step by at most a few per cent. That is the
    authors' algorithm as they ship it; the defaults keep it.
  * A leaf uses its Fisher on a step iff ``stats`` holds a :class:`LayerStats`
    for it on that step; without ``stats`` (or with ``None`` at a leaf) the
    fallback applies. On steps that do not refresh, the statistics passed
    only decide which leaves use their Fisher; their values are ignored.
  * Kernels are laid out ``(..., in, out)`` as Flax's are (``Dense``:
    ``(in, out)``, the transpose of PyTorch's ``W[o, i]``; ``Conv``:
    ``(kh, kw, in, out)``), so ``F̃ = outer(H, S)`` reshaped to the kernel.
  * The first refresh is the first step (count 0), as the reference's
    ``steps % TCov == 0`` with ``steps`` starting at 0.
  * Statistics are per layer vectors (``fan_in + out`` numbers per leaf), so
    the state is Adam-like in memory: one params-sized momentum (two with
    ``fallback="adam"``) plus those vectors.
  * Normalisation layers (LayerNorm, BatchNorm) use the fallback: the
    reference's formula collapses their input statistic to two numbers that
    min-max normalisation maps to {{0, 1}}, and reduces over the axis at
    position 1 (the sequence axis of a (B, T, D) input); we do not reproduce it.

  Example::

    import jax, optax, optax_soaa
    from optax_soaa.flax import value_grad_and_stats

    opt = optax_soaa.{name}(1e-3)
    state = opt.init(params)
    loss_grads_stats = value_grad_and_stats(
        lambda p, x, y: loss_fn(model.apply({{"params": p}}, x), y))

    @jax.jit
    def step(params, state, x, y):
      loss, grads, stats = loss_grads_stats(params, x, y)
      updates, state = opt.update(grads, state, params, stats=stats)
      return optax.apply_updates(params, updates), state, loss

  Args:
    learning_rate: α, a float or an optax schedule.
    b1: momentum decay β, in [0, 1).
    decay: ``a``, the running-average decay of the statistics, >= 0.
    new_weight: ``b``, the weight of new statistics, >= 0.
    damping: λ >= 0.
    stats_every: refresh period of the statistics (the reference's TCov).
    weight_decay: {wd_doc}
    fallback: ``"identity"`` or ``"adam"``; see :func:`scale_by_adafisher`.
    fallback_b2: second-moment decay of the ``"adam"`` fallback.
    fallback_eps: epsilon of the ``"adam"`` fallback.
    mu_dtype: optional dtype of the momentum.
    nu_dtype: optional dtype of the ``"adam"`` fallback's second moment.
    axis_name: see :func:`scale_by_adafisher`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``stats=``.
"""


def _adafisher_chain(decoupled: bool):
  """Builds the `adafisher` (L2 into the momentum) or `adafisherw` alias."""

  def alias(
      learning_rate: optax.ScalarOrSchedule = 1e-3,
      b1: float = 0.9,
      decay: float = 0.08,
      new_weight: float = 0.008,
      damping: float = 1e-3,
      stats_every: int = 100,
      weight_decay: float = 0.0,
      *,
      fallback: str = "identity",
      fallback_b2: float = 0.999,
      fallback_eps: float = 1e-8,
      mu_dtype: Optional[Any] = None,
      nu_dtype: Optional[Any] = None,
      axis_name: Optional[str] = None,
  ) -> optax.GradientTransformationExtraArgs:
    utils.check_schedule_or_nonneg("learning_rate", learning_rate)
    utils.check_range("weight_decay", weight_decay, lower=0.0)
    decay_weights = optax.add_decayed_weights(weight_decay)
    precondition = scale_by_adafisher(
        b1=b1, decay=decay, new_weight=new_weight, damping=damping,
        stats_every=stats_every, fallback=fallback, fallback_b2=fallback_b2,
        fallback_eps=fallback_eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
        axis_name=axis_name,
    )
    # AdaFisherW decays θ after preconditioning; AdaFisher adds wd θ to the
    # gradient before the momentum.
    stages = ((precondition, decay_weights) if decoupled
              else (decay_weights, precondition))
    return optax.chain(*stages, optax.scale_by_learning_rate(learning_rate))

  return alias


adafisher = _adafisher_chain(decoupled=False)
adafisher.__name__ = adafisher.__qualname__ = "adafisher"
adafisherw = _adafisher_chain(decoupled=True)
adafisherw.__name__ = adafisherw.__qualname__ = "adafisherw"


adafisher.__doc__ = "AdaFisher (weight decay coupled into the momentum).\n" + (
    _DOC_COMMON.format(
        name="adafisher",
        equations=(
            "    m ← β m + (1-β) (g + wd θ)\n"
            "    θ ← θ - α / (1-β^t) · m / F̃"
        ),
        wd_doc="wd >= 0, added to the gradient before the momentum (L2).",
    )
)
adafisherw.__doc__ = "AdaFisherW (decoupled weight decay).\n" + (
    _DOC_COMMON.format(
        name="adafisherw",
        equations=(
            "    m ← β m + (1-β) g\n"
            "    θ ← θ - α (m / (1-β^t) / F̃ + wd θ)"
        ),
        wd_doc="wd >= 0, decoupled (scaled by α, not by F̃).",
    )
)
