"""The probe: an identity whose VJP hands a per-layer statistic of the output
gradient to a zero input of the statistic's shape.

Differentiating the loss w.r.t. the params and the probes gives the gradients
and every layer's output statistic in one backward pass.
"""

import functools
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from optax_soaa._src import utils


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tap(y, probe, due, spec):
  del probe, due, spec
  return y


def tap_fwd(y, probe, due, spec):
  del spec
  return y, (jnp.zeros([], probe.dtype), due)


def output_statistic(spec, dy, dtype):
  """The statistic of the output gradient `dy` a site's probe receives.

  ``spec = (kind, out_dims)``, static: ``"mean_sq"`` is ``Σ_rows |δ|² / N``
  (linear layers), ``"sum"`` is ``Σ_rows δ`` (normalisation layers, squared
  later), the rows being every axis of `dy` but `out_dims`; the result is laid
  out over `out_dims` in increasing order.
  """
  kind, out_dims = spec
  d = dy.astype(jnp.promote_types(dtype, dy.dtype))
  rows = tuple(i for i in range(d.ndim) if i not in out_dims)
  if kind == "mean_sq":
    n = math.prod(d.shape[i] for i in rows)
    stat = jnp.sum(utils.abs_sq(d), axis=rows) / max(n, 1)
  else:
    stat = jnp.sum(d, axis=rows)
    if jnp.iscomplexobj(stat):  # The real probe takes (Re, Im) pairs.
      stat = jnp.stack([stat.real, stat.imag], axis=-1)
  return stat.astype(dtype)


def zeros_like_shape(s):
  return jnp.zeros(s.shape, s.dtype)


def tap_bwd(spec, res, dy):
  marker, due = res
  stat = functools.partial(output_statistic, spec, dtype=marker.dtype)
  if due is None:
    return dy, stat(dy), None
  # Only this square-and-sum is conditional, not the backward pass around
  # it (XLA:CPU runs a convolution inside a conditional far slower).
  zeros = lambda d: zeros_like_shape(jax.eval_shape(stat, d))
  return dy, lax.cond(due, stat, zeros, dy), None


tap.defvjp(tap_fwd, tap_bwd)


def varying_axes(x: Any) -> frozenset:
  """Mesh axes over which `x` varies inside shard_map (empty elsewhere)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()))  # Older JAX.


def vary(x: jax.Array, axes: frozenset) -> jax.Array:
  """`x` made varying over `axes` (as shard_map's check_vma tracks it)."""
  axes = tuple(sorted(axes - varying_axes(x)))
  if not axes:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axes, to="varying")
  return jax.lax.pvary(x, axes)
