"""The public functions: value_grad_and_stats, describe_stats, stats_layouts."""

from typing import Any, Callable, NamedTuple, Optional, Sequence
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_soaa._src import utils
from optax_soaa._src.layer_stats.plan import Plan
from optax_soaa._src.layer_stats.taps import varying_axes
from optax_soaa._src.layer_stats.types import is_stats_leaf
from optax_soaa._src.layer_stats.types import LAYER_KINDS
from optax_soaa._src.layer_stats.types import NORM_KINDS


def _is_traced_input(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _is_differentiable(x) -> bool:
  """What ``eqx.filter_value_and_grad`` differentiates: inexact arrays (not
  Python floats, which Equinox modules hold as settings, e.g. a dropout
  rate)."""
  return _is_traced_input(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)


class _Traced(NamedTuple):
  """One trace of the loss: its plan, and how the params split.

  Params leaves that are inexact arrays are differentiated
  (``p_leaves``); other arrays are traced but not differentiated, and other
  Python objects (an Equinox model's functions, flags) are closed over; both
  get ``None`` for their gradient and statistics, as
  ``eqx.filter_value_and_grad`` gives them.
  """

  plan: Plan
  flat_fun: Callable[..., Any]  # (p_leaves, d_leaves) -> (loss, aux)
  p_leaves: list
  d_leaves: list  # traced arguments, then the traced non-differentiated params
  out_tree: Any
  paths: list  # keystr of every params leaf
  p_index: list  # index among every params leaf of each p_leaves entry
  p_tree: Any

  def full(self, leaves) -> Any:
    """A pytree like the params from values at the differentiated leaves
    (None elsewhere)."""
    out = [None] * len(self.paths)
    for i, x in zip(self.p_index, leaves):
      out[i] = x
    return jax.tree.unflatten(self.p_tree, out)


def _trace(fun, has_aux, params, args, kwargs, kinds) -> _Traced:
  """The plan of `fun` at these arguments and the functions built from it."""
  flat, p_tree = jax.tree_util.tree_flatten_with_path(params)
  paths = [jax.tree_util.keystr(p) for p, _ in flat]
  all_p = [x for _, x in flat]
  p_index = [i for i, x in enumerate(all_p) if _is_differentiable(x)]
  q_index = [i for i, x in enumerate(all_p)
             if i not in set(p_index) and _is_traced_input(x)]
  a_leaves, a_tree = jax.tree.flatten((args, kwargs))
  dynamic = [i for i, x in enumerate(a_leaves) if _is_traced_input(x)]

  def flat_fun(p_leaves, d_leaves):
    leaves = list(a_leaves)
    for i, x in zip(dynamic, d_leaves):
      leaves[i] = x
    args_, kwargs_ = jax.tree.unflatten(a_tree, leaves)
    model = list(all_p)
    for i, x in zip(p_index + q_index, list(p_leaves) + list(d_leaves[len(dynamic):])):
      model[i] = x
    out = fun(jax.tree.unflatten(p_tree, model), *args_, **kwargs_)
    return out if has_aux else (out, None)

  p_leaves = [all_p[i] for i in p_index]
  d_leaves = [a_leaves[i] for i in dynamic] + [all_p[i] for i in q_index]
  closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(p_leaves, d_leaves)
  out_tree = jax.tree.structure(out_shape)
  shapes = [tuple(jnp.shape(x)) for x in p_leaves]
  plan = Plan(closed, len(p_leaves), shapes, kinds)
  return _Traced(plan, flat_fun, p_leaves, d_leaves, out_tree, paths, p_index, p_tree)


def _check_layers(layers) -> tuple[str, ...]:
  if isinstance(layers, str):
    layers = (layers,)
  layers = tuple(layers)
  for kind in layers:
    utils.check_choice("layers", kind, LAYER_KINDS)
  return layers


def value_grad_and_stats(
    fun: Callable[..., Any],
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    *,
    layers: Sequence[str] = LAYER_KINDS,
) -> Callable[..., tuple[Any, Any, dict]]:
  r"""Like ``jax.value_and_grad(fun, has_aux)``, plus AdaFisher's statistics.

  ``fun(params, *args, **kwargs)`` returns a scalar loss (or ``(loss, aux)``
  with ``has_aux``); ``params`` is any pytree of arrays (Flax ``params``, an
  Equinox model's arrays, a dict). The layers are found in the jaxpr of
  ``fun``, so the model library does not matter and nothing is patched:

  * **dense**: a ``dot_general`` with one operand a params leaf (after
    reshapes, transposes, casts) — ``Dense``, ``DenseGeneral``, ``Einsum``,
    attention projections, ``eqx.nn.Linear``, ``x @ w``, a one-hot matmul;
  * **conv**: a ``conv_general_dilated`` whose kernel is a params leaf, with
    any groups (a grouped or depthwise convolution pools its groups' patches,
    as the reference does), any rank, strides, padding, dilation;
  * a following add of a params leaf with one element per output is the
    layer's **bias**;
  * **embedding**: a ``gather`` of rows of a params table (``table[ids]``,
    ``jnp.take``, Flax ``Embed``, NNX ``Embed``, Equinox ``Embedding``), and
    a params table added to activations after slices and broadcasts
    (``x + pos[:T]``, a learned position embedding);
  * **layer_norm**, **group_norm**, **rms_norm**, **batch_norm**: a
    multiply (scale) and / or add (bias) of params tensors broadcast over a
    normalised value: ``x - mean(x)`` over any axes (LayerNorm without the
    batch axis, BatchNorm with it, GroupNorm over the input reshaped into
    groups) or ``x`` scaled by a per-row factor from ``mean(x²)`` (RMSNorm).

  Statistics (``N`` rows: every axis of the layer's input and output but the
  contracted / feature ones; ``δ = ∂loss/∂y`` at the layer output ``y``):

  * dense / conv: ``h = Σ_n x̄² / N`` with ``x̄ = [x, 1]`` (``[patch, 1]``
    for a convolution; the 1 only with a bias) and ``s = Σ_n δ² / N``;
  * embedding: a dense layer without bias on one-hot inputs (not in the
    reference, which never trains one): ``h[row] = (lookups of the row) /
    N`` and ``s = Σ δ² / N`` over the ``N`` lookups; an added table the same
    with the position as the row (``N`` the rows of the sum). A table also
    used as a tied output layer (``x @ table.T``) gets the mean of its two
    uses in the table's layout (the output layer's ``s`` per row, its ``h``
    per column), each min-max normalised before the mean;
  * normalisation layers, the reference's formulas generalised to any
    normalised axes, from the input ``x`` of shape ``(B, ...)`` as the
    layer's mean sees it (GroupNorm's reshaped into groups): with ``keep``
    the first non-batch axis that is not normalised (axis 1 if all are),
    ``u = Σ x / m²`` summed over every axis but ``keep``, ``m`` the product
    of the summed non-batch axes; ``h = [Σ u², len(u)] / B²`` (two numbers:
    the scale's and the bias's) and ``s = (Σ_rows δ)² / B`` per parameter
    element. For the reference's own layers this is its code exactly:
    LayerNorm over the last axis reduces every axis but axis 1 (the sequence
    axis of ``(B, T, D)``), BatchNorm every axis but the channels.

  For complex values the squares are magnitudes (``|x̄|²``, ``|δ|²``; for
  the normalisation layers ``|u|²`` and ``|Σ_rows δ|²``), and the statistics
  are real. The gradients are JAX's: for complex params, conjugate them
  before an optax ``update``, as optax's convention asks.

  A layer called several times (shared weights; a ``lax.scan`` that reuses
  it) gets the mean of its statistics over the calls. A ``lax.scan`` over a
  stack of layers (the params' leading axis scanned) gives each layer its own
  statistics (``stack_axes`` of :class:`LayerStats`). Calls inside
  ``jax.jit``, ``jax.checkpoint`` (kept as a checkpoint) and
  ``jax.custom_jvp`` functions are looked into; layers inside
  ``jax.custom_vjp`` functions, ``lax.cond`` and ``lax.while_loop`` get no
  statistics. :func:`describe_stats` lists which leaves got statistics and
  why the others did not.

  The statistics add a square-and-sum per layer to the one backward pass
  that computes the gradients (the layer output goes through an identity
  whose VJP also returns the statistic); the gradients are those of
  ``jax.value_and_grad(fun)``. How the layers are matched and evaluated is
  described on the documentation's AdaFisher internals page.

  Args:
    fun: the loss function, ``fun(params, *args, **kwargs)``. Array arguments
      are traced (as under ``jax.jit``, also when called eagerly); other
      Python values (flags, strings) are passed as they are. ``params`` may
      hold non-array leaves (an Equinox model's activation functions): as
      ``eqx.filter_value_and_grad`` does, the inexact arrays are
      differentiated, other arrays are traced, other values (Python numbers
      included) are passed through, and all of those get ``None`` for their
      gradient and statistics.
    has_aux: as in :func:`jax.value_and_grad`.
    axis_name: a mapped axis (``pmap`` / ``shard_map`` data parallelism): the
      statistics are then those of the whole batch across devices (the
      device-averaged loss). Grads are returned per device, as
      ``jax.value_and_grad`` returns them. Under sharded ``jit`` leave it
      ``None``: the batch is already global.
    layers: the layer kinds to collect, a subset of ``("dense", "conv",
      "embedding", "layer_norm", "group_norm", "rms_norm", "batch_norm")``
      (all by default). Leaves of the kinds left out take the optimizer's
      fallback.

  Returns:
    ``f(params, *args, stats_due=True, **kwargs) -> (value, grads, extras)``
    with ``value`` as ``jax.value_and_grad`` returns it and ``extras =
    {"value": loss, "stats": stats}``: the extra arguments of this library's
    optimizers, so one line serves all of them::

      value, grads, extras = f(params, x, y, stats_due=optax_soaa.stats_due(state))
      updates, state = tx.update(grads, state, params, **extras)

    ``stats`` has the structure of ``params``, a :class:`LayerStats` at each
    leaf with statistics and ``None`` elsewhere. ``stats_due`` (a bool or a
    boolean array, e.g. :func:`optax_soaa.stats_due` of the optimizer
    state) says whether to compute the statistics: ``False`` makes the call
    a plain ``jax.value_and_grad`` with zeros for ``stats``; an array makes
    each layer's square-and-sum conditional (``lax.cond``) around a shared
    forward and backward pass, so steps that do not refresh AdaFisher's
    running averages do not pay for statistics.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_soaa
    >>> def loss_fn(params, x, y):
    ...   h = jax.nn.relu(x @ params["w1"] + params["b1"])
    ...   return jnp.mean((h @ params["w2"] - y) ** 2)
    >>> params = {"w1": jnp.ones((3, 4)), "b1": jnp.zeros(4),
    ...           "w2": jnp.ones((4, 1))}
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
    >>> loss, grads, extras = optax_soaa.value_grad_and_stats(loss_fn)(
    ...     params, x, y)
    >>> stats = extras["stats"]
    >>> stats["w1"].h.shape, stats["w1"].s.shape  # [x, 1]² and δ², per feature.
    ((4,), (4,))
    >>> bool(jnp.allclose(stats["w1"].h, jnp.array([1.0, 1.0, 1.0, 1.0])))
    True
  """
  kinds = _check_layers(layers)

  def wrapped(params, *args, stats_due=True, **kwargs):
    traced = _trace(fun, has_aux, params, args, kwargs, kinds)
    plan, p_leaves, d_leaves = traced.plan, traced.p_leaves, traced.d_leaves
    if not plan.sites:
      _warn_no_layers(fun)
    dtype = utils.scalar_dtype(p_leaves)
    axes = frozenset().union(*(varying_axes(x) for x in jax.tree.leaves((p_leaves, d_leaves))))

    def with_stats(p_leaves, d_leaves, due=None):
      def inner(p_leaves, probes):
        outs, hs = plan.evaluate(plan.closed.jaxpr, plan.closed.consts,
                                 list(p_leaves) + list(d_leaves), (), probes, due)
        return outs[0], (outs[1:], hs)

      (loss, (aux, hs)), (grads, probe_grads) = jax.value_and_grad(
          inner, argnums=(0, 1), has_aux=True)(p_leaves, plan.probes(dtype, axes))
      return loss, aux, grads, plan.finish(hs, probe_grads, axis_name)

    if stats_due is True:
      loss, aux, grads, stats = with_stats(p_leaves, d_leaves)
    elif stats_due is False:
      (loss, aux), grads = jax.value_and_grad(traced.flat_fun, has_aux=True)(p_leaves, d_leaves)
      aux = jax.tree.leaves(aux)
      stats = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                           jax.eval_shape(with_stats, p_leaves, d_leaves)[3])
    else:
      loss, aux, grads, stats = with_stats(p_leaves, d_leaves, jnp.asarray(stats_due, bool))
    if has_aux:
      _, aux = jax.tree.unflatten(traced.out_tree, [loss] + list(aux))
      value = (loss, aux)
    else:
      value = loss
    return value, traced.full(grads), {"value": loss, "stats": traced.full(stats)}

  return wrapped


def _warn_no_layers(fun):
  warnings.warn(
      f"value_grad_and_stats found no layer in {getattr(fun, '__name__', fun)!r}: "
      "every parameter gets stats=None and AdaFisher's fallback. "
      "optax_soaa.describe_stats(fun, params, *args) says why for each leaf "
      "(for an NNX model use optax_soaa.flax.nnx_value_grad_and_stats).",
      stacklevel=3)


def describe_stats(
    fun: Callable[..., Any],
    params: Any,
    *args: Any,
    has_aux: bool = False,
    layers: Sequence[str] = LAYER_KINDS,
    **kwargs: Any,
) -> str:
  """Which params leaves :func:`value_grad_and_stats` gives statistics, and why not.

  Traces ``fun(params, *args, **kwargs)`` (nothing is computed) and returns
  one line per leaf: its path and shape, then the layer kind, the part
  (kernel / bias; scale / bias of a normalisation layer), its
  :class:`LayerLayout` and the number of calls, or the reason it has none.
  A leaf without statistics takes the optimizer's fallback; under
  AdaFisher's default fallback it steps about ``1 / damping`` times less
  than the others (the optimizer warns with
  :class:`optax_soaa.StatsFallbackWarning`).

  Args:
    fun: the loss function, as for :func:`value_grad_and_stats`.
    params: the params pytree passed to ``fun`` first.
    *args: the other positional arguments of ``fun`` (a batch).
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    layers: the layer kinds to collect, as for :func:`value_grad_and_stats`.
    **kwargs: keyword arguments of ``fun``.

  Returns:
    The report, one line per params leaf and a closing count.

  Examples:
    >>> import jax.numpy as jnp, optax_soaa
    >>> def loss_fn(params, tokens):
    ...   x = params["embed"][tokens]  # An embedding lookup.
    ...   mean = x.mean(-1, keepdims=True)  # A LayerNorm, written out.
    ...   x = (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True)
    ...                             + 1e-6)
    ...   x = x * params["scale"] + params["bias"]
    ...   x = x * params["gain"]  # LayerScale: no layer of a known kind.
    ...   return jnp.mean((x @ params["w"]) ** 2)  # A dense layer.
    >>> params = {"embed": jnp.ones((10, 8)), "scale": jnp.ones(8),
    ...           "bias": jnp.zeros(8), "gain": jnp.ones(8),
    ...           "w": jnp.ones((8, 2))}
    >>> print(optax_soaa.describe_stats(loss_fn, params, jnp.zeros((2, 3), int)))
    ... # doctest: +NORMALIZE_WHITESPACE
    ['bias']   (8,)             layer_norm bias: in () out (0,), 1 call
    ['embed']  (10, 8)          embedding kernel: in (0,) out (1,), 1 call
    ['gain']   (8,)             fallback: a scale or shift of a value that is not normalised (no x - mean(x) or x / rms(x) behind it). Under AdaFisher's default fallback it steps ~1/damping times less than leaves with statistics
    ['scale']  (8,)             layer_norm scale: in () out (0,), 1 call
    ['w']      (8, 2)           dense kernel: in (0,) out (1,), 1 call
    4 of 5 differentiated leaves have statistics.
  """
  kinds = _check_layers(layers)
  traced = _trace(fun, has_aux, params, args, kwargs, kinds)
  plan = traced.plan
  info = plan.leaf_info()
  where = dict(zip(traced.p_index, range(len(traced.p_index))))
  width = max([len(p) for p in traced.paths] + [4])
  lines = []
  for j, path in enumerate(traced.paths):
    i = where.get(j)
    if i is None:
      lines.append(f"{path:<{width}}  {'':<16} not differentiated (not an inexact "
                   "array): no gradient, no statistics")
      continue
    shape = plan.leaf_shapes[i]
    if i in info:
      kind, part, layout, calls = info[i]
      if kind in NORM_KINDS:
        part = "scale" if part == "kernel" else part
      what = (f"{kind} {part}: in {layout.in_axes} out {layout.out_axes}"
              + (f" stack {layout.stack_axes}" if layout.stack_axes else "")
              + f", {calls} call{'s' if calls != 1 else ''}"
              + (" (tied: also an output layer)" if i in plan.tied else ""))
    else:
      what = (f"fallback: {plan.why_not(i)}. Under AdaFisher's default "
              "fallback it steps ~1/damping times less than leaves with statistics")
    lines.append(f"{path:<{width}}  {str(shape):<16} {what}")
  lines.append(f"{len(info)} of {len(traced.p_index)} differentiated leaves have statistics.")
  return "\n".join(lines)


def stats_layouts(fn: Callable[..., Any], params: Any, *args: Any,
                  **kwargs: Any) -> optax.Params:
  """The :class:`LayerLayout` of each leaf of ``fn``'s statistics.

  ``fn`` is a function made by :func:`value_grad_and_stats` (or a Flax
  wrapper of it); it is traced with ``jax.eval_shape`` (nothing is
  computed). Pass the result as ``layouts=`` to :func:`optax_soaa.adafisher`
  when kernels are not laid out ``(..., in, out)`` (Equinox's ``(out, in)``,
  convolutions ``(out, in, kh, kw)``, ``DenseGeneral`` with several output
  axes, stacked layers).

  Args:
    fn: a function made by :func:`value_grad_and_stats`.
    params: the params (or Equinox model) ``fn`` takes first.
    *args: the other arguments of ``fn`` (a batch of the right shapes).
    **kwargs: keyword arguments of ``fn``.

  Returns:
    A pytree like ``params`` with a :class:`LayerLayout` at each leaf that
    gets statistics and ``None`` elsewhere.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_soaa
    >>> def loss_fn(params, x):  # A kernel laid out (out, in), as Equinox's.
    ...   return jnp.sum(jnp.tanh(x @ params["w"].T))
    >>> params = {"w": jnp.ones((3, 4))}
    >>> collect = optax_soaa.value_grad_and_stats(loss_fn)
    >>> layouts = optax_soaa.stats_layouts(collect, params, jnp.ones((2, 4)))
    >>> layouts["w"]
    LayerLayout(stack_axes=(), in_axes=(1,), out_axes=(0,))
    >>> opt = optax_soaa.adafisher(1e-3, layouts=layouts)
  """
  leaves, tree = jax.tree.flatten((params, args, kwargs))
  arrays = [i for i, x in enumerate(leaves) if _is_traced_input(x)]

  def with_arrays(*values):  # other leaves (an Equinox model's functions) stay
    full = list(leaves)
    for i, x in zip(arrays, values):
      full[i] = x
    params, args, kwargs = jax.tree.unflatten(tree, full)
    return fn(params, *args, **kwargs)

  out = jax.eval_shape(with_arrays, *[leaves[i] for i in arrays])
  stats = out[2]["stats"] if isinstance(out[2], dict) and "stats" in out[2] else out[2]
  return jax.tree.map(
      lambda st: None if st is None else st.layout(0), stats, is_leaf=is_stats_leaf)
