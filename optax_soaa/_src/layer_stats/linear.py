"""What the linear layers share: the kernel operand, the site that maps a
linear layer's statistics to its kernel (and bias) leaves, and the bias."""

import math

import jax.numpy as jnp
import numpy as np

from optax_soaa._src.layer_stats.sites import global_batch
from optax_soaa._src.layer_stats.sites import Matching
from optax_soaa._src.layer_stats.sites import Site
from optax_soaa._src.layer_stats.views import axis_size
from optax_soaa._src.layer_stats.views import block_relayout
from optax_soaa._src.layer_stats.views import leaf_coords
from optax_soaa._src.layer_stats.views import mean_over_repeats
from optax_soaa._src.layer_stats.views import PView
from optax_soaa._src.layer_stats.views import roles_to_layout
from optax_soaa._src.layer_stats.views import source_view
from optax_soaa._src.layer_stats.views import tiles
from optax_soaa._src.layer_stats.views import vector_layout


def kernel_operand(m: Matching, rec, kind):
  """(kernel operand index, its view) of a layer equation of a requested
  kind, or None."""
  ctx = rec.path[:-1]
  views = [m.g.view(ctx, v) for v in rec.eqn.invars]
  found = [(i, pv) for i, pv in enumerate(views) if pv is not None]
  if len(found) > 1:
    for _, pv in found:
      m.reasons[pv.leaf].append(
          f"{rec.eqn.primitive.name} of two parameters (no layer input)")
  if len(found) != 1:
    return None
  if kind not in m.kinds:
    m.reject(rec, found[0][1].leaf, f"{kind} layers not requested (layers=)")
    return None
  return found[0]


def linear_site(m: Matching, kind, rec, kv, x_idx, h_fn, out_dims, in_atoms, out_atoms):
  leaf = kv.leaf
  leaf_shape = m.g.leaf_shapes[leaf]
  scan_atoms = [atoms for _, atoms in kv.scans]
  flat = lambda groups: [a for ax in groups for a in ax]
  layout = roles_to_layout(leaf_shape, {
      "stack": flat(scan_atoms), "in": flat(in_atoms), "out": flat(out_atoms)})
  if layout is None or not tiles(flat(scan_atoms + in_atoms + out_atoms), leaf_shape):
    m.reasons[leaf].append(
        f"a {kind} kernel reshaped across its input and output axes, or "
        "broadcast")
    return
  y_shape = tuple(rec.eqn.outvars[0].aval.shape)
  levels = m.levels(rec, kv)
  n_lev = len(levels)
  stacked_atoms = scan_atoms  # the kernel's scans are exactly its stacked levels
  bias = find_bias(m, rec, out_dims, kv)
  leaves = {leaf: ("kernel", layout)}
  if bias is not None:
    b_leaf, b_layout, b_order, b_scans, add_path = bias
    leaves[b_leaf] = ("bias", b_layout)
    m.claimed.add(add_path)
  n_out = math.prod(y_shape[d] for d in out_dims)

  def post(h, s, axis_name):
    h, s = global_batch(h, s, axis_name)
    h = block_relayout(h, n_lev, in_atoms, leaf_shape, layout.in_axes, True)
    if bias is not None:
      h = jnp.concatenate([h, jnp.ones(h.shape[:-1] + (1,), h.dtype)], axis=-1)
    s_out = s.reshape(s.shape[:n_lev] + (n_out,))
    s_k = block_relayout(s, n_lev, out_atoms, leaf_shape, layout.out_axes, True)
    h, s_k, s_out = (mean_over_repeats(x, levels) for x in (h, s_k, s_out))
    h_k = block_relayout(h, 0, stacked_atoms, leaf_shape, layout.stack_axes, False)
    s_k = block_relayout(s_k, 0, stacked_atoms, leaf_shape, layout.stack_axes, False)
    out = {leaf: ("kernel", layout, h_k, s_k)}
    if bias is not None:
      b_shape = m.g.leaf_shapes[b_leaf]
      h_b = block_relayout(h, 0, b_scans, b_shape, b_layout.stack_axes, False)
      s_b = block_relayout(s_out[..., b_order], 0, b_scans, b_shape,
                            b_layout.stack_axes, False)
      out[b_leaf] = ("bias", b_layout, h_b, s_b)
    return out

  m.sites.append(Site(
      kind=kind, h_path=rec.path, h_operand=x_idx, h_fn=h_fn,
      tap_path=rec.path, tap_spec=("mean_sq", tuple(out_dims)),
      probe_shape=tuple(y_shape[d] for d in out_dims), levels=levels,
      post=post, leaves=leaves))


def find_bias(m: Matching, rec, out_dims, kv):
  """(bias leaf, layout, order, scan atoms, add path) or None."""
  y_shape = tuple(rec.eqn.outvars[0].aval.shape)
  for add_rec, k, view in m.follow_layout(rec, source_view("y", y_shape)):
    eqn = add_rec.eqn
    if eqn.primitive.name != "add" or len(eqn.invars) != 2:
      continue
    if tuple(eqn.invars[k].aval.shape) != tuple(eqn.outvars[0].aval.shape):
      continue
    bv = m.g.view(add_rec.path[:-1], eqn.invars[1 - k])
    if bv is None:
      continue
    mapped = bias_map(m, view, bv, y_shape, out_dims, kv)
    if mapped is None:
      m.reasons[bv.leaf].append(
          "added to a layer's output, but not one element per output")
      continue
    layout, order = mapped
    return bv.leaf, layout, order, [atoms for _, atoms in bv.scans], add_rec.path
  return None

def bias_map(m: Matching, y_view, bv: PView, y_shape, out_dims, kv):
  """The bias leaf's layout, and for each of its elements (in its out-axes
  order) the index of its output (row-major over the layer's out dims)."""
  b_shape = m.g.leaf_shapes[bv.leaf]
  if len(bv.axes) != len(y_view) or len(bv.scans) != len(kv.scans):
    return None
  if any(axis_size(a) != axis_size(b) for (_, a), (_, b) in zip(bv.scans, kv.scans)):
    return None
  out_sizes = tuple(y_shape[d] for d in out_dims)
  n_out = math.prod(out_sizes)
  coords = np.unravel_index(np.arange(n_out), out_sizes) if out_sizes else ()
  y_coord = dict(zip(out_dims, coords))
  b_coord = np.zeros((len(b_shape), n_out), np.int64)
  for y_atoms, b_atoms in zip(y_view, bv.axes):
    if any(a.src is None for a in y_atoms):
      return None
    b_real = [a for a in b_atoms if a.src is not None]
    if any(a.axis not in y_coord for a in y_atoms):
      if b_real:
        return None  # the bias would vary along a non-output axis
      continue
    pos = np.zeros(n_out, np.int64)
    for a in y_atoms:
      pos = pos * a.size + (y_coord[a.axis] // a.stride) % a.size
    for axis, coord in leaf_coords(pos, b_atoms):
      b_coord[axis] += coord
  layout = vector_layout(b_shape, bv)
  stack_axes, in_axes, out_axes = layout
  out_shape = tuple(b_shape[a] for a in out_axes)
  if (any(b_shape[a] != 1 for a in in_axes) or math.prod(out_shape) != n_out
      or not tiles([a for _, ax in bv.scans for a in ax]
                    + [a for ax in bv.axes for a in ax if a.src is not None], b_shape)):
    return None
  idx = (np.ravel_multi_index(tuple(b_coord[a] for a in out_axes), out_shape)
         if out_axes else np.zeros(n_out, np.int64))
  if len(set(idx.tolist())) != n_out:
    return None
  order = np.empty(n_out, np.int64)
  order[idx] = np.arange(n_out)
  return layout, order
