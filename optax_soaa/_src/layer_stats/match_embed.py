"""Embeddings: a lookup of rows of a params table, and a table added to
activations (a learned position embedding).

A lookup ``y = table[ids]`` is a dense layer without bias on one-hot inputs,
so it gets the dense statistics of those inputs: ``h[row] = (lookups of the
row) / N`` and ``s = Σ δ² / N`` over the ``N`` lookups. It is a ``gather``
whose slices are single rows along the indexed axes and whole along the
others (``table[ids]``, ``jnp.take``, Flax ``Embed``, Equinox ``Embedding``
under ``vmap``); a one-hot matmul is a ``dot_general`` and is found as a dense
layer, with the same statistics.

A table added to activations, ``x + pos[:T]`` (any slice, reshape or
broadcast of it), is a dense layer on one-hot positions: the rows of the sum
(every axis but the last, the features) each add one row of the table, so
``h[row] = (rows that add it) / N`` (a constant of the shapes) and
``s = Σ δ² / N`` at the sum. It must have several rows, each broadcast over
some axis of the sum (a batch): a bias vector or a parameter-sized sum
(``W + A @ B``) is not a table. A table whose rows are all added equally
often (a position table used at its full length) has a constant ``h``, which
AdaFisher's min-max normalisation maps to 0: its Fisher is the damping, as
for any layer whose input statistic is constant.
"""

import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from optax_soaa._src import utils
from optax_soaa._src.layer_stats.graph import is_var
from optax_soaa._src.layer_stats.linear import linear_site
from optax_soaa._src.layer_stats.sites import global_batch
from optax_soaa._src.layer_stats.sites import Matching
from optax_soaa._src.layer_stats.sites import Site
from optax_soaa._src.layer_stats.types import LayerLayout
from optax_soaa._src.layer_stats.views import IDENTITY_LAYOUT
from optax_soaa._src.layer_stats.views import LAYOUT_PRIMITIVES
from optax_soaa._src.layer_stats.views import leaf_coords
from optax_soaa._src.layer_stats.views import mean_over_repeats

_KIND = "embedding"
# What may stand between a table and its sum with the activations.
_TABLE_OPS = LAYOUT_PRIMITIVES | frozenset({"slice"})


def _stat_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(utils.real_dtype(dtype), jnp.float32)


def match_gather(m: Matching, rec) -> None:
  """An embedding lookup: a ``gather`` of rows of a params table."""
  eqn = rec.eqn
  ctx = rec.path[:-1]
  kv = m.g.view(ctx, eqn.invars[0])
  if kv is None or m.g.view(ctx, eqn.invars[1]) is not None:
    return
  if not m.wants(_KIND):
    m.reject(rec, kv.leaf, f"{_KIND} layers not requested (layers=)")
    return
  dn = eqn.params["dimension_numbers"]
  sizes = tuple(eqn.params["slice_sizes"])
  table_shape = tuple(eqn.invars[0].aval.shape)
  # Axes indexed by the lookup; a start index on a whole-axis slice is 0.
  indexed = tuple(a for a in range(len(table_shape))
                  if a in dn.start_index_map and sizes[a] != table_shape[a])
  whole = tuple(a for a in range(len(table_shape)) if a not in indexed)
  if (getattr(dn, "operand_batching_dims", ()) or not indexed
      or any(sizes[a] != 1 for a in indexed)
      or any(sizes[a] != table_shape[a] for a in whole)):
    m.reject(rec, kv.leaf, "a gather of slices that are neither single rows nor "
                           "whole axes (not an embedding lookup)")
    return
  kept = [a for a in range(len(table_shape)) if a not in dn.collapsed_slice_dims]
  out_dim_of = dict(zip(kept, dn.offset_dims))
  out_dims = tuple(out_dim_of[a] for a in whole)
  components = [list(dn.start_index_map).index(a) for a in indexed]
  rows_shape = tuple(table_shape[a] for a in indexed)
  # Out-of-range ids read a clamped row (CLIP, and PROMISE_IN_BOUNDS as XLA
  # implements it) or nothing (FILL_OR_DROP).
  clip = "FILL" not in str(eqn.params["mode"]).upper()
  dtype = _stat_dtype(eqn.invars[0].aval.dtype)

  def h_fn(indices):
    idx = lax.stop_gradient(indices)
    n = math.prod(idx.shape[:-1])
    idx = idx.reshape((n, idx.shape[-1]))[:, components]
    bound = jnp.asarray(rows_shape, idx.dtype)
    if clip:
      idx = jnp.clip(idx, 0, bound - 1)
    flat = jnp.ravel_multi_index(tuple(idx.T), rows_shape, mode="clip")
    valid = jnp.all((idx >= 0) & (idx < bound), axis=1)
    # Out-of-range lookups (filled, not read) count for no row.
    counts = jnp.zeros(math.prod(rows_shape), dtype).at[flat].add(
        valid.astype(dtype))
    return counts.reshape(rows_shape) / max(n, 1)

  linear_site(m, _KIND, rec, kv, 1, h_fn, out_dims,
              [kv.axes[a] for a in indexed], [kv.axes[a] for a in whole])


def _view_index(pv, shape, leaf_shape) -> np.ndarray:
  """The flat leaf index of each element of a value of `shape` seen as `pv`."""
  coords = [np.zeros(shape, np.int64) for _ in leaf_shape]
  for i, atoms in enumerate(pv.axes):
    idx = [np.newaxis] * len(shape)
    idx[i] = slice(None)
    for axis, coord in leaf_coords(np.arange(shape[i]), atoms):
      coords[axis] = coords[axis] + coord[tuple(idx)]
  return np.ravel_multi_index(tuple(np.broadcast_to(c, shape) for c in coords), leaf_shape)


def _table_index(m: Matching, ctx, v):
  """(leaf, flat leaf index of each element of `v`) if `v` is a params table
  after slices and layout-only equations (not inside a scan over it)."""
  chain, node = [], m.g.node(ctx, v)
  for _ in range(8):
    if node is None:
      return None
    pv = m.g.views.get(node)
    if pv is not None:
      break
    rec = m.g.producer.get(node)
    if rec is None or rec.eqn.primitive.name not in _TABLE_OPS:
      return None
    chain.append(rec.eqn)
    node = m.g.node(rec.path[:-1], rec.eqn.invars[0])
  else:
    return None
  if pv.scans:
    return None
  src_eqn = chain[-1] if chain else None
  shape = (tuple(src_eqn.invars[0].aval.shape) if src_eqn is not None
           else tuple(v.aval.shape))
  idx = _view_index(pv, shape, m.g.leaf_shapes[pv.leaf])
  # Replayed on constants: evaluated now, also under the caller's jit or vmap.
  with jax.ensure_compile_time_eval():
    for eqn in reversed(chain):
      if eqn.primitive.name not in IDENTITY_LAYOUT:
        params = eqn.primitive.get_bind_params(eqn.params)
        idx = np.asarray(eqn.primitive.bind(jnp.asarray(idx, jnp.int32), **params))
  return pv.leaf, idx


def match_added_table(m: Matching, rec) -> None:
  """A params table added to activations, ``x + pos[:T]``."""
  eqn = rec.eqn
  ctx = rec.path[:-1]
  if len(eqn.invars) != 2:
    return
  y_shape = tuple(eqn.outvars[0].aval.shape)
  for p_idx in (0, 1):
    x = eqn.invars[1 - p_idx]
    if (not is_var(x) or tuple(x.aval.shape) != y_shape
        or m.g.view(ctx, x) is not None or not is_var(eqn.invars[p_idx])):
      continue
    found = _table_index(m, ctx, eqn.invars[p_idx])
    if found is not None:
      break
  else:
    return
  leaf, idx = found
  leaf_shape = m.g.leaf_shapes[leaf]
  if len(y_shape) < 2:
    return
  if not m.wants(_KIND):
    m.reasons[leaf].append(f"{_KIND} layers not requested (layers=)")
    return
  coords = np.unravel_index(np.broadcast_to(idx, y_shape), leaf_shape)
  # Axes of the table along the features (the last axis of the sum) are its
  # outputs; the others, its rows, must not vary along the features.
  out_axes = tuple(a for a, c in enumerate(coords) if np.any(c != c[..., :1]))
  in_axes = tuple(a for a in range(len(leaf_shape)) if a not in out_axes)
  first_row = (0,) * (len(y_shape) - 1)
  fan_out = math.prod(leaf_shape[a] for a in out_axes)
  out_flat = (np.ravel_multi_index(tuple(coords[a][first_row] for a in out_axes),
                                   tuple(leaf_shape[a] for a in out_axes))
              if out_axes else np.zeros(y_shape[-1], np.int64))
  rows_in = [c[..., 0] for c in coords]
  if (fan_out != y_shape[-1] or sorted(out_flat.tolist()) != list(range(fan_out))
      or any(np.any(coords[a] != coords[a][first_row]) for a in out_axes)):
    m.reasons[leaf].append(
        "added to activations, but not one table row per row of the sum "
        "with one element per feature")
    return
  in_sizes = tuple(leaf_shape[a] for a in in_axes)
  in_flat = (np.ravel_multi_index(tuple(rows_in[a] for a in in_axes), in_sizes)
             if in_axes else np.zeros(y_shape[:-1], np.int64))
  # A table: several rows, each broadcast over some axis of the sum (a
  # batch). Not a bias vector, nor a parameter-sized merge (W + A @ B).
  broadcast = any(y_shape[d] > 1 and not np.any(np.diff(in_flat, axis=d))
                  for d in range(len(y_shape) - 1))
  if math.prod(in_sizes) < 2 or not broadcast:
    m.reasons[leaf].append(
        "added to activations, but not a table of rows broadcast over a batch")
    return
  n_rows = math.prod(y_shape[:-1])
  dtype = _stat_dtype(eqn.outvars[0].aval.dtype)
  h_const = np.bincount(in_flat.ravel(), minlength=math.prod(in_sizes)) / max(n_rows, 1)
  order = np.argsort(out_flat)
  layout = LayerLayout((), in_axes, out_axes)
  levels = tuple((m.g.scan_lengths[p], False) for p in rec.scans)
  m.claimed.add(rec.path)

  def h_fn(x):
    del x
    return jnp.asarray(h_const, dtype)

  def post(h, s, axis_name):
    h, s = global_batch(h, s, axis_name)
    h, s = (mean_over_repeats(v, levels) for v in (h, s[..., order]))
    return {leaf: ("kernel", layout, h, s)}

  m.sites.append(Site(
      kind=_KIND, h_path=rec.path, h_operand=1 - p_idx, h_fn=h_fn,
      tap_path=rec.path, tap_spec=("mean_sq", (len(y_shape) - 1,)),
      probe_shape=(y_shape[-1],), levels=levels, post=post,
      leaves={leaf: ("kernel", layout)}))
