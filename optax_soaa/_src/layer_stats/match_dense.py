"""Dense layers: a ``dot_general`` with one params operand, the kernel.

``Dense``, ``DenseGeneral``, ``Einsum``, attention projections, ``eqx.nn.Linear``,
``x @ w`` and a one-hot matmul (an embedding written as a matmul) all trace to
it. ``h = Σ_n x² / N`` over the contracted axes, ``s = Σ_n δ² / N``.
"""

import math

from jax import lax
import jax.numpy as jnp

from optax_soaa._src import utils
from optax_soaa._src.layer_stats.linear import kernel_operand
from optax_soaa._src.layer_stats.linear import linear_site
from optax_soaa._src.layer_stats.sites import acc_dtype
from optax_soaa._src.layer_stats.sites import Matching


def match_dense(m: Matching, rec) -> None:
  eqn = rec.eqn
  hit = kernel_operand(m, rec, "dense")
  if hit is None:
    return
  k_idx, kv = hit
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if lb or rb:
    m.reject(
        rec, kv.leaf, "a dot_general with batch dimensions on the kernel (vmap over "
                      "stacked layers inside the loss)")
    return
  x_idx = 1 - k_idx
  k_contract = tuple(rc if k_idx == 1 else lc)
  x_contract = tuple(lc if k_idx == 1 else rc)
  k_free = tuple(d for d in range(len(kv.axes)) if d not in k_contract)
  x_free = tuple(d for d in range(eqn.invars[x_idx].aval.ndim) if d not in x_contract)
  y_ndim = len(x_free) + len(k_free)
  # dot_general's output: lhs free dims, then rhs free dims.
  out_dims = (tuple(range(len(x_free), y_ndim)) if k_idx == 1
              else tuple(range(len(k_free))))

  def h_fn(x):
    x = lax.stop_gradient(x).astype(acc_dtype(x))
    x = jnp.transpose(x, x_free + x_contract)
    rows = math.prod(x.shape[:len(x_free)])
    x = x.reshape((rows,) + x.shape[len(x_free):])
    return jnp.sum(utils.abs_sq(x), axis=0) / max(rows, 1)

  linear_site(m, "dense", rec, kv, x_idx, h_fn, out_dims,
              [kv.axes[d] for d in k_contract], [kv.axes[d] for d in k_free])
