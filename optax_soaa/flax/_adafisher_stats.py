"""AdaFisher layer statistics from Flax models, in the same pass as the grads.

One call returns the loss, the gradients and, for every Dense/Linear and Conv
layer, the diagonals AdaFisher needs (:class:`optax_soaa.LayerStats`), without
the model being changed:

* the input statistic ``h`` is computed from the layer's input in the forward
  pass (for a convolution from the batch-summed squared input, whose patches
  are the squared patches summed: no patch tensor the size of the batch);
* the output-gradient statistic ``s`` comes out of the backward pass: the
  layer's output goes through an identity with a custom VJP that also takes a
  zero "probe" vector of shape (out,) and returns ``Σ δ² / N`` as the probe's
  cotangent, so differentiating w.r.t. the probes yields ``s``. The extra cost
  is one square-and-sum per layer.

Layers are found by interception (Linen: :func:`flax.linen.intercept_methods`;
NNX: the ``__call__`` of ``nnx.Linear``/``nnx.Conv`` is wrapped while the
function is traced) and matched to their parameter leaves by identity, so any
parameter tree works. Learned from kfac-jax, which tags layers by tracing the
model; this API asks less of the user (no registration, no tags) and covers
less (no attention, no normalisation layers).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

from optax_soaa._src import utils
from optax_soaa._src.adafisher import LayerStats


@jax.custom_vjp
def _tap(y: jax.Array, probe: jax.Array) -> jax.Array:
  del probe
  return y


def _tap_fwd(y, probe):
  return y, jnp.zeros([], probe.dtype)


def _tap_bwd(res, dy):
  acc = jnp.promote_types(res.dtype, dy.dtype)
  lead = tuple(range(dy.ndim - 1))
  rows = math.prod(dy.shape[:-1])
  s = jnp.sum(jnp.square(dy.astype(acc)), axis=lead) / max(rows, 1)
  return dy, s.astype(res.dtype)


_tap.defvjp(_tap_fwd, _tap_bwd)


def _acc_dtype(x: jax.Array, probe: jax.Array) -> jnp.dtype:
  return jnp.promote_types(x.dtype, probe.dtype)


def _dense_h(x: jax.Array, dtype, use_bias: bool) -> jax.Array:
  x = jax.lax.stop_gradient(x).astype(dtype)
  h = jnp.mean(jnp.square(x).reshape(-1, x.shape[-1]), axis=0)
  if use_bias:
    h = jnp.concatenate([h, jnp.ones((1,), dtype)])
  return h


def _tuple(value, n: int, default: int) -> tuple[int, ...]:
  if value is None:
    return (default,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(value)


def _conv_padding(padding, n: int):
  """Flax's padding as lax takes it, or None for CIRCULAR/CAUSAL."""
  if isinstance(padding, str):
    if padding.upper() in ("CIRCULAR", "CAUSAL"):
      return None
    return padding
  if isinstance(padding, int):
    return [(padding, padding)] * n
  pads = []
  for p in padding:
    pads.append((p, p) if isinstance(p, int) else tuple(p))
  return pads


def _conv_h(x: jax.Array, dtype, layer) -> Optional[jax.Array]:
  """``h`` of a convolution: mean of squared input patches, (k..., in)-ordered."""
  kernel_size = layer.kernel_size
  kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
  n = len(kernel_size)
  padding = _conv_padding(layer.padding, n)
  if padding is None or layer.feature_group_count != 1:
    return None
  x = jax.lax.stop_gradient(x).astype(dtype)
  if x.ndim == n + 1:
    x = x[None]
  batch = x.shape[: x.ndim - n - 1]
  # Patch extraction is linear, so the patches of Σ_n x² are Σ_n patches(x)².
  x2 = jnp.sum(jnp.square(x).reshape((-1,) + x.shape[len(batch):]), axis=0)
  spatial = "".join("HWDUVXYZ"[i] for i in range(n))
  dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
  patches = jax.lax.conv_general_dilated_patches(
      x2[None], kernel_size, _tuple(layer.strides, n, 1), padding,
      lhs_dilation=_tuple(layer.input_dilation, n, 1),
      rhs_dilation=_tuple(layer.kernel_dilation, n, 1),
      dimension_numbers=dn,
  )
  positions = math.prod(patches.shape[1:-1])
  rows = math.prod(batch) * positions
  h = jnp.sum(patches, axis=tuple(range(patches.ndim - 1))) / max(rows, 1)
  in_features = x.shape[-1]
  # Patch features are ordered (in, k...); the kernel is (k..., in, out).
  h = h.reshape((in_features,) + kernel_size)
  h = jnp.moveaxis(h, 0, -1).reshape(-1)
  if layer.use_bias:
    h = jnp.concatenate([h, jnp.ones((1,), dtype)])
  return h


class _Recorder:
  """Collects, during one trace, ``h`` per kernel leaf and which leaf is whose bias."""

  def __init__(self, leaf_index: dict[int, int], probes: dict[int, jax.Array]):
    self.leaf_index = leaf_index
    self.probes = probes
    self.h: dict[int, jax.Array] = {}
    self.calls: dict[int, int] = {}
    self.bias_of: dict[int, Optional[int]] = {}

  def tap(self, kind: str, layer, x, y, kernel, bias):
    """Records ``h`` and routes ``y`` through the probe; returns the new ``y``."""
    k = self.leaf_index.get(id(kernel))
    if k is None or k not in self.probes:
      return y  # params transformed or inside a lifted transform: fallback.
    probe = self.probes[k]
    if y.shape[-1] != probe.shape[0]:
      return y
    # Under shard_map(check_vma=True) the probe's cotangent (computed from δ)
    # must vary over the same mesh axes as the probe itself.
    y = _vary(y, _varying_axes(probe))
    dtype = _acc_dtype(x, probe)
    if kind == "dense":
      h = _dense_h(x, dtype, bias is not None)
    else:
      h = _conv_h(x, dtype, layer)
      if h is None:
        return y
    self.h[k] = self.h[k] + h if k in self.h else h
    self.calls[k] = self.calls.get(k, 0) + 1
    self.bias_of[k] = None if bias is None else self.leaf_index.get(id(bias))
    return _tap(y, probe)

  def stats(self, h_sums: dict[int, jax.Array], probe_grads: dict[int, jax.Array],
            n_leaves: int, axis_name: Optional[str]) -> list[Optional[LayerStats]]:
    """Per leaf statistics from the ``h`` sums returned out of the trace."""
    out: list[Optional[LayerStats]] = [None] * n_leaves
    for k, h_sum in h_sums.items():
      calls = self.calls[k]
      h = h_sum / calls
      s = probe_grads[k] / calls
      if axis_name is not None:
        # s of the device-averaged loss (the loss whose gradient is the pmean
        # of the grads): δ of that loss is δ_local / n_devices.
        n_dev = jax.lax.psum(1, axis_name)
        h = jax.lax.pmean(h, axis_name)
        s = jax.lax.pmean(s, axis_name) / (n_dev * n_dev)
      out[k] = LayerStats(h=h, s=s, part="kernel")
      b = self.bias_of[k]
      if b is not None:
        out[b] = LayerStats(h=h, s=s, part="bias")
    return out


def _varying_axes(x: Any) -> frozenset:
  """Mesh axes over which `x` varies inside shard_map (empty elsewhere)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()))  # Older JAX.


def _vary(x: jax.Array, axes: frozenset) -> jax.Array:
  """`x` made varying over `axes` (as shard_map's check_vma tracks it)."""
  axes = tuple(sorted(axes - _varying_axes(x)))
  if not axes:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axes, to="varying")
  return jax.lax.pvary(x, axes)


def _make_probes(leaves: list[Any]) -> dict[int, jax.Array]:
  dtype = utils.scalar_dtype(leaves)
  return {
      i: jnp.zeros((leaf.shape[-1],), dtype)
      for i, leaf in enumerate(leaves)
      if getattr(leaf, "ndim", 0) >= 2
  }


def value_grad_and_stats(
    fun: Callable[..., Any],
    has_aux: bool = False,
    axis_name: Optional[str] = None,
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like ``jax.value_and_grad(fun, has_aux)``, plus AdaFisher's statistics.

  ``fun(params, *args, **kwargs)`` computes a scalar loss and calls a Flax
  Linen module's ``.apply`` inside; the model is not changed. Every
  ``nn.Dense`` and ``nn.Conv`` (2-D or any rank; groups = 1; padding other
  than CIRCULAR/CAUSAL) whose kernel is a leaf of ``params`` passed through
  unchanged is intercepted during one forward and backward pass.

  Statistics (``N`` = rows: all leading dimensions of a Dense input, examples
  x output positions of a Conv; ``δ = ∂loss/∂y``):

  * ``h = Σ_n x̄² / N``: ``x̄ = [x, 1]`` (Dense) or ``[input patch, 1]``
    (Conv, patch flattened in the kernel's ``(k..., in)`` order); the 1 only
    when the layer has a bias;
  * ``s = Σ_n δ² / N``.

  A module called several times (shared weights) gets the mean over calls.

  Args:
    fun: the loss function, ``fun(params, *args, **kwargs)``.
    has_aux: as in :func:`jax.value_and_grad`.
    axis_name: a mapped axis (``pmap``/``shard_map`` data parallelism): ``h``
      and ``s`` are then ``pmean``-ed over it, and ``s`` is rescaled to be
      that of the device-averaged loss (``/ n_devices²``), so the statistics
      equal those of the full batch on one device. Grads are returned per
      device, as ``jax.value_and_grad`` returns them. Under sharded ``jit``
      the batch means are already global: leave it ``None``.

  Returns:
    ``f(params, *args, **kwargs) -> (value, grads, stats)`` where ``value``
    is ``loss`` or ``(loss, aux)``, and ``stats`` is a pytree with the
    structure of ``params`` whose leaf is an :class:`optax_soaa.LayerStats`
    at each intercepted kernel (``part="kernel"``) and bias
    (``part="bias"``), and ``None`` elsewhere (those parameters use the
    optimizer's fallback). Pass it as ``tx.update(grads, state, params,
    stats=stats)``. Works under ``jax.jit``; layers inside lifted transforms
    (``nn.scan``, ``nn.remat``, ``nn.jit``) or fed with transformed params
    (e.g. cast copies) get no statistics.
  """

  def wrapped(params, *args, **kwargs):
    leaves, treedef = jax.tree.flatten(params)
    # Per-device statistics, as without shard_map: probes vary over every
    # mesh axis the inputs vary over (else autodiff would psum their grads).
    axes = frozenset().union(
        *(_varying_axes(x) for x in jax.tree.leaves((params, args, kwargs))
          if isinstance(x, jax.Array))
    )
    probes = {k: _vary(p, axes) for k, p in _make_probes(leaves).items()}
    recorder: list[_Recorder] = []

    def inner(params, probes):
      rec = _Recorder({id(l): i for i, l in enumerate(jax.tree.leaves(params))},
                      probes)
      recorder.append(rec)

      def interceptor(next_fun, call_args, call_kwargs, context):
        y = next_fun(*call_args, **call_kwargs)
        module = context.module
        if context.method_name != "__call__" or not call_args:
          return y
        if isinstance(module, nn.Dense):
          kind = "dense"
        elif isinstance(module, nn.Conv):
          kind = "conv"
        else:
          return y
        if not module.has_variable("params", "kernel"):
          return y
        kernel = module.get_variable("params", "kernel")
        bias = (module.get_variable("params", "bias")
                if module.use_bias and module.has_variable("params", "bias")
                else None)
        return rec.tap(kind, module, call_args[0], y, kernel, bias)

      with nn.intercept_methods(interceptor):
        out = fun(params, *args, **kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, rec.h)

    (loss, (aux, h_sums)), (grads, probe_grads) = jax.value_and_grad(
        inner, argnums=(0, 1), has_aux=True
    )(params, probes)
    rec = recorder[-1]
    stats = jax.tree.unflatten(
        treedef, rec.stats(h_sums, probe_grads, len(leaves), axis_name)
    )
    value = (loss, aux) if has_aux else loss
    return value, grads, stats

  return wrapped


_NNX_ACTIVE: list[_Recorder] = []


def _nnx_wrap(kind: str, original):
  @functools.wraps(original)
  def call(self, inputs, *args, **kwargs):
    y = original(self, inputs, *args, **kwargs)
    for rec in reversed(_NNX_ACTIVE):
      if id(self.kernel) in rec.leaf_index:
        bias = self.bias if getattr(self, "bias", None) is not None else None
        return rec.tap(kind, self, inputs, y, self.kernel, bias)
    return y
  return call


@contextlib.contextmanager
def _nnx_tapped(rec: _Recorder):
  """Wraps nnx.Linear/nnx.Conv ``__call__`` while ``rec`` traces (restored after)."""
  saved = (nnx.Linear.__call__, nnx.Conv.__call__)
  if not _NNX_ACTIVE:
    nnx.Linear.__call__ = _nnx_wrap("dense", saved[0])
    nnx.Conv.__call__ = _nnx_wrap("conv", saved[1])
  _NNX_ACTIVE.append(rec)
  try:
    yield
  finally:
    _NNX_ACTIVE.pop()
    if not _NNX_ACTIVE:
      nnx.Linear.__call__, nnx.Conv.__call__ = saved


def nnx_value_grad_and_stats(
    fun: Callable[..., Any],
    has_aux: bool = False,
    axis_name: Optional[str] = None,
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like ``nnx.value_and_grad(fun, has_aux)``, plus AdaFisher's statistics.

  ``fun(model, *args, **kwargs)`` computes a scalar loss from an NNX model;
  its ``nnx.Linear`` and ``nnx.Conv`` layers are intercepted (their class's
  ``__call__`` is wrapped while the function is traced, then restored; only
  this model's layers are tapped, but do not trace NNX models in several
  threads at once while it runs). Statistics, ``axis_name`` and the
  fallback rules are those of :func:`value_grad_and_stats`.

  Returns:
    ``f(model, *args, **kwargs) -> (value, grads, stats)``; ``grads`` as
    ``nnx.value_and_grad`` returns them (an ``nnx.State`` of the
    ``nnx.Param`` s; the model's other state is updated in place as
    ``nnx.value_and_grad`` does), and ``stats`` an ``nnx.State`` with the
    structure of ``nnx.as_pure(grads)`` holding :class:`optax_soaa.LayerStats`
    or ``None``, ready for ``optimizer.update(model, grads, stats=stats)``.
  """

  def wrapped(model, *args, **kwargs):
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    key_to_index = {
        tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): i
        for i, (path, _) in enumerate(leaves_with_path)
    }
    probes = _make_probes([leaf for _, leaf in leaves_with_path])
    recorder: list[_Recorder] = []

    def inner(model, probes):
      index = {}
      for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable) and tuple(path) in key_to_index:
          index[id(node)] = key_to_index[tuple(path)]
      rec = _Recorder(index, probes)
      recorder.append(rec)
      with _nnx_tapped(rec):
        out = fun(model, *args, **kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, rec.h)

    (loss, (aux, h_sums)), (grads, probe_grads) = nnx.value_and_grad(
        inner, argnums=(0, 1), has_aux=True
    )(model, probes)
    rec = recorder[-1]
    stats = jax.tree.unflatten(
        treedef, rec.stats(h_sums, probe_grads, len(leaves_with_path), axis_name)
    )
    value = (loss, aux) if has_aux else loss
    return value, grads, stats

  return wrapped
