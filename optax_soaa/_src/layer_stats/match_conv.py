"""Convolutions: a ``conv_general_dilated`` whose kernel is a params leaf.

Any rank, strides, padding, dilation and groups (a grouped or depthwise
convolution pools its groups' patches, as the reference does).
"""

import math

from jax import lax
import jax.numpy as jnp

from optax_soaa._src import utils
from optax_soaa._src.layer_stats.linear import kernel_operand
from optax_soaa._src.layer_stats.linear import linear_site
from optax_soaa._src.layer_stats.sites import acc_dtype
from optax_soaa._src.layer_stats.sites import Matching


def match_conv(m: Matching, rec) -> None:
  eqn = rec.eqn
  hit = kernel_operand(m, rec, "conv")
  if hit is None:
    return
  k_idx, kv = hit
  params = eqn.params
  if k_idx != 1:
    m.reject(rec, kv.leaf, "a parameter as a convolution's input")
    return
  if params["batch_group_count"] != 1:
    m.reject(rec, kv.leaf, "a convolution with batch groups")
    return
  # A grouped convolution (depthwise: one group per channel) pools the
  # patches of its groups, as the reference's patch extraction does: h is
  # over the (C / groups) kernel inputs, averaged over groups too.
  groups = params["feature_group_count"]
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  k_shape = tuple(eqn.invars[1].aval.shape)
  window = tuple(k_shape[d] for d in rhs_spec[2:])
  strides = tuple(params["window_strides"])
  padding = tuple(tuple(p) for p in params["padding"])
  lhs_dil = tuple(params["lhs_dilation"] or (1,) * len(window))
  rhs_dil = tuple(params["rhs_dilation"] or (1,) * len(window))
  y_shape = tuple(eqn.outvars[0].aval.shape)
  rows = y_shape[out_spec[0]] * math.prod(y_shape[d] for d in out_spec[2:])
  lhs_perm = tuple(lhs_spec)

  def h_fn(x):
    x = lax.stop_gradient(x).astype(acc_dtype(x))
    x = jnp.transpose(x, lhs_perm)  # (N, C, spatial...)
    # Patch extraction is linear: the patches of Σ_n x² are Σ_n patches(x)²,
    # so no patch tensor the size of the batch is built.
    x2 = jnp.sum(utils.abs_sq(x), axis=0, keepdims=True)
    x2 = jnp.sum(x2.reshape((1, groups, -1) + x2.shape[2:]), axis=1)
    patches = lax.conv_general_dilated_patches(
        x2, window, strides, padding, lhs_dilation=lhs_dil,
        rhs_dilation=rhs_dil, precision=lax.Precision.HIGHEST)
    h = jnp.sum(patches, axis=tuple(range(2, patches.ndim)))[0]
    # Patch features are ordered (in, window...).
    return h.reshape((x2.shape[1],) + window) / max(rows * groups, 1)

  in_dims = (rhs_spec[1],) + tuple(rhs_spec[2:])
  linear_site(m, "conv", rec, kv, 0, h_fn, (out_spec[1],),
              [kv.axes[d] for d in in_dims], [kv.axes[rhs_spec[0]]])
