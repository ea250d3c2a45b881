"""Normalisation layers: a scale (``mul``) and / or a bias (``add``) of params
tensors applied to a normalised value.

The normalised value is found by walking back from the scale or bias through
per-row factors (``mul`` / ``div`` by a smaller operand) and layout-only
equations to either ``x - mean(x)`` (LayerNorm over any axes, GroupNorm,
BatchNorm on any feature axis) or ``x`` itself with a per-row factor computed
from ``mean(x²)`` (RMSNorm). The axes the mean reduces decide the kind.

Statistics, the reference's LayerNorm / BatchNorm formulas generalised to any
reduction axes: with ``x`` the input as the normalisation's mean sees it
(GroupNorm's reshaped into groups), batch axis 0 of size ``B``, ``keep`` the
first non-batch axis that is not normalised (axis 1 if every axis is),
``u = Σ x / m²`` summed over every axis but ``keep`` with ``m`` the product of
the summed non-batch axes; ``h = [Σ u², len(u)] / B²`` (the scale's and the
bias's entries) and ``s = (Σ_rows δ)² / B`` per parameter element. For the
reference's own layers (LayerNorm over the last axis, BatchNorm over all axes
but the features) this is exactly its ``Compute_H_bar_D`` / ``Compute_S_D``.
"""

import math
from typing import NamedTuple, Optional

from jax import lax
import jax.numpy as jnp
import jax.extend.core as jex_core
import numpy as np

from optax_soaa._src import utils
from optax_soaa._src.layer_stats.graph import is_var
from optax_soaa._src.layer_stats.sites import acc_dtype
from optax_soaa._src.layer_stats.sites import Matching
from optax_soaa._src.layer_stats.sites import Site
from optax_soaa._src.layer_stats.views import axis_size
from optax_soaa._src.layer_stats.views import block_relayout
from optax_soaa._src.layer_stats.views import IDENTITY_LAYOUT
from optax_soaa._src.layer_stats.views import mean_over_repeats
from optax_soaa._src.layer_stats.views import PView
from optax_soaa._src.layer_stats.views import tiles
from optax_soaa._src.layer_stats.views import vector_layout

# Equations that keep every element of their input (in another layout).
_SAME_ELEMENTS = IDENTITY_LAYOUT | frozenset({"reshape", "transpose"})
# Equations a per-row factor passes through on its way from a reduction.
_FACTOR_PATH = IDENTITY_LAYOUT | frozenset({
    "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "psum", "pmean",
    "psum_invariant", "rsqrt", "sqrt", "add", "max", "integer_pow", "div",
    "mul", "sub",
})


class _Feature(NamedTuple):
  """A params tensor broadcast over a value: its view and the value's axes
  it fills (its feature dims)."""

  pv: PView
  dims: tuple[int, ...]


class _Source(NamedTuple):
  """Where the normalised input ``x`` is read, and the axes normalised."""

  rec: object  # the equation whose operand `operand` is x
  operand: int
  axes: tuple[int, ...]  # the normalised axes, in x's coordinates
  centred: bool  # x - mean(x) (False: RMSNorm's x / rms(x))


def feature_tensor(m: Matching, ctx, v, shape) -> Optional[_Feature]:
  """`v` as a params tensor broadcast over a value of `shape`, or None: its
  view fills whole axes of `shape` (at least one, never the batch axis 0)
  and is broadcast along the others, and it covers its leaf once."""
  pv = m.g.view(ctx, v)
  if pv is None or len(shape) < 2 or len(pv.axes) != len(shape):
    return None
  dims = []
  for i, atoms in enumerate(pv.axes):
    real = [a for a in atoms if a.src is not None]
    if not real:
      continue
    if len(real) != len(atoms) or axis_size(real) != shape[i]:
      return None
    dims.append(i)
  if not dims or dims[0] == 0:
    return None
  covered = [a for d in dims for a in pv.axes[d]] + [a for _, ax in pv.scans for a in ax]
  if not tiles(covered, m.g.leaf_shapes[pv.leaf]):
    return None
  return _Feature(pv, tuple(dims))


def _root(m: Matching, node):
  """The node whose elements `node` holds, through casts, reshapes and
  transposes."""
  while True:
    rec = m.g.producer.get(node)
    if rec is None or rec.eqn.primitive.name not in _SAME_ELEMENTS:
      return node
    node = m.g.node(rec.path[:-1], rec.eqn.invars[0])


def _is_zero(m: Matching, ctx, v, depth=0) -> bool:
  """Whether `v` is a broadcast constant zero (Flax RMSNorm's ``x - 0``)."""
  if isinstance(v, jex_core.Literal):
    return not np.any(np.asarray(v.val))
  rec = m.g.producer.get(m.g.node(ctx, v))
  if rec is None or depth > 4 or rec.eqn.primitive.name not in (
      IDENTITY_LAYOUT | {"broadcast_in_dim", "reshape"}):
    return False
  return _is_zero(m, rec.path[:-1], rec.eqn.invars[0], depth + 1)


def _reduction(m: Matching, ctx, v, accept, depth=0):
  """The first ``reduce_sum`` that `v` is computed from through per-row
  arithmetic and whose input passes `accept(rec of the reduce_sum)`, as
  (its record, its axes), or None."""
  node = m.g.node(ctx, v)
  rec = m.g.producer.get(node)
  if rec is None or depth > 12:
    return None
  eqn, rctx = rec.eqn, rec.path[:-1]
  name = eqn.primitive.name
  if name == "reduce_sum":
    return (rec, tuple(sorted(int(a) for a in eqn.params["axes"]))) if accept(rec) else None
  if name not in _FACTOR_PATH:
    return None
  # A sum divided by a count: only the numerator of a division.
  operands = eqn.invars[:1] if name == "div" else eqn.invars
  for x in operands:
    if is_var(x):
      found = _reduction(m, rctx, x, accept, depth + 1)
      if found is not None:
        return found
  return None


def _squared(m: Matching, rec):
  """(record, operand) of ``x`` if `rec` computes ``x²``, else None."""
  eqn = rec.eqn
  name = eqn.primitive.name
  if name == "square" or (name == "integer_pow" and eqn.params["y"] == 2):
    return rec, 0
  if name == "mul" and eqn.invars[0] is eqn.invars[1] and is_var(eqn.invars[0]):
    return rec, 0
  return None


def _normaliser(m: Matching, ctx, v, factors) -> Optional[_Source]:
  """The normalisation that produced `v`, walking back through per-row
  factors (collected, with `factors` given) and layout-only equations."""
  node = m.g.node(ctx, v)
  factors = list(factors)
  for _ in range(12):
    rec = m.g.producer.get(node)
    if rec is None:
      break
    eqn, rctx = rec.eqn, rec.path[:-1]
    name = eqn.primitive.name
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if name == "sub":
      x, mean = eqn.invars
      if not is_var(x) or tuple(x.aval.shape) != out_shape:
        return None
      if _is_zero(m, rctx, mean):
        node = m.g.node(rctx, x)
        continue
      x_root = _root(m, m.g.node(rctx, x))
      same_x = lambda r: _root(m, m.g.node(r.path[:-1], r.eqn.invars[0])) == x_root
      found = _reduction(m, rctx, mean, same_x)
      return None if found is None else _Source(found[0], 0, found[1], True)
    if name in ("mul", "div"):
      full = [i for i, x in enumerate(eqn.invars)
              if is_var(x) and tuple(x.aval.shape) == out_shape]
      if len(full) != 1 or (name == "div" and full[0] != 0):
        break
      factors.append((rctx, eqn.invars[1 - full[0]]))
      node = m.g.node(rctx, eqn.invars[full[0]])
      continue
    if name in _SAME_ELEMENTS:
      node = m.g.node(rctx, eqn.invars[0])
      continue
    break
  # Not centred: RMSNorm, if a factor comes from the mean of this x squared.
  x_root = _root(m, node)

  def squares_x(r):
    sq = m.g.producer.get(m.g.node(r.path[:-1], r.eqn.invars[0]))
    hit = sq and _squared(m, sq)
    return bool(hit) and _root(m, m.g.node(sq.path[:-1], sq.eqn.invars[0])) == x_root

  for fctx, f in factors:
    if not is_var(f):
      continue
    found = _reduction(m, fctx, f, squares_x)
    if found is not None:
      reduce_rec, axes = found
      sq = m.g.producer[m.g.node(reduce_rec.path[:-1], reduce_rec.eqn.invars[0])]
      return _Source(sq, 0, axes, False)
  return None


def _kind(source: _Source, x_shape, y_shape) -> str:
  if 0 in source.axes:
    return "batch_norm"
  if not source.centred:
    return "rms_norm"
  # GroupNorm normalises the input reshaped into groups.
  return "layer_norm" if tuple(x_shape) == tuple(y_shape) else "group_norm"


def match_norm(m: Matching, rec) -> None:
  """A scale or bias of a normalisation layer at a ``mul`` / ``add``."""
  eqn = rec.eqn
  ctx = rec.path[:-1]
  if len(eqn.invars) != 2:
    return
  out_shape = tuple(eqn.outvars[0].aval.shape)
  found = [feature_tensor(m, ctx, x, out_shape) for x in eqn.invars]
  if (found[0] is None) == (found[1] is None):
    return
  p_idx = 0 if found[0] is not None else 1
  feat, other = found[p_idx], eqn.invars[1 - p_idx]
  scale = bias = None
  # Where the normalised value meets the scale: this multiply (Equinox, and
  # BatchNorm's per-channel factor), or a following multiply of the
  # normalised input by (rsqrt factor * scale) (Flax / NNX), whose rsqrt
  # factor is then `other`.
  candidates = [(rec, other, ())]
  if eqn.primitive.name == "mul":
    scale = feat
    for c_rec, k in m.g.consumers.get(m.g.node(ctx, eqn.outvars[0]), ()):
      ce = c_rec.eqn
      if ce.primitive.name != "mul" or len(ce.invars) != 2:
        continue
      full = ce.invars[1 - k]
      if (is_var(full)
          and tuple(full.aval.shape) == tuple(ce.outvars[0].aval.shape)):
        candidates.append((c_rec, full, ((ctx, other),)))
  else:
    bias = feat
  source = y0_rec = None
  for y0_rec, normalised, factors in candidates:
    if is_var(normalised):
      source = _normaliser(m, y0_rec.path[:-1], normalised, factors)
    if source is not None:
      break
  leaf = feat.pv.leaf
  if source is None:
    m.reasons[leaf].append(
        "a scale or shift of a value that is not normalised (no x - mean(x) "
        "or x / rms(x) behind it)")
    return
  y_rec = y0_rec
  if scale is not None:
    y_node = m.g.node(y0_rec.path[:-1], y0_rec.eqn.outvars[0])
    for c_rec, k in m.g.consumers.get(y_node, ()):
      ce = c_rec.eqn
      shape = tuple(ce.outvars[0].aval.shape)
      if ce.primitive.name != "add" or tuple(ce.invars[k].aval.shape) != shape:
        continue
      q = feature_tensor(m, c_rec.path[:-1], ce.invars[1 - k], shape)
      if q is not None and q.dims == scale.dims:
        bias, y_rec = q, c_rec
        break
  x_shape = tuple(source.rec.eqn.invars[source.operand].aval.shape)
  y_shape = tuple(y_rec.eqn.outvars[0].aval.shape)
  kind = _kind(source, x_shape, y_shape)
  if kind not in m.kinds:
    m.reasons[leaf].append(f"{kind} layers not requested (layers=)")
    return
  if (source.rec.scans != y_rec.scans or len(x_shape) < 2 or len(y_shape) != len(out_shape)
      or x_shape[0] != y_shape[0]):
    m.reasons[leaf].append(
        "a normalisation without a batch axis, or split across a scan")
    return
  params_ = [p for p in (scale, bias) if p is not None]
  if len({len(p.pv.scans) for p in params_}) != 1 or (
      len(params_) == 2 and scale.pv.leaf == bias.pv.leaf):
    return
  for r in (rec, y0_rec, y_rec):
    m.claimed.add(r.path)
  _add_site(m, kind, source, x_shape, y_shape, scale, bias, y_rec)


def _add_site(m: Matching, kind, source, x_shape, y_shape, scale, bias, y_rec):
  axes = source.axes
  keep = next((d for d in range(1, len(x_shape)) if d not in axes), 1)
  summed = tuple(d for d in range(len(x_shape)) if d != keep)
  dim_norm = math.prod(x_shape[d] for d in summed if d != 0)
  batch = x_shape[0]
  dims = (scale or bias).dims
  complex_output = jnp.issubdtype(y_rec.eqn.outvars[0].aval.dtype, jnp.complexfloating)

  def h_fn(x):
    x = lax.stop_gradient(x).astype(acc_dtype(x))
    return jnp.sum(x, axis=summed) / (dim_norm * dim_norm)

  leaves = {}
  for part, p in (("kernel", scale), ("bias", bias)):
    if p is not None:
      shape = m.g.leaf_shapes[p.pv.leaf]
      leaves[p.pv.leaf] = (part, vector_layout(shape, p.pv), p.pv)
  levels = m.levels(y_rec, (scale or bias).pv)
  n_lev = len(levels)

  def post(sum_h, sigma, axis_name):
    n_dev = 1
    if axis_name is not None:
      n_dev = lax.psum(1, axis_name)
      sum_h = lax.psum(sum_h, axis_name)
      # δ of the device-averaged loss is δ_local / n_devices.
      sigma = lax.pmean(sigma, axis_name)
    total = batch * n_dev
    h0 = jnp.sum(utils.abs_sq(sum_h), axis=-1) / (total * total)
    h1 = jnp.full_like(h0, sum_h.shape[-1] / (total * total))
    h = mean_over_repeats(jnp.stack([h0, h1], axis=-1), levels)
    sigma_sq = (jnp.sum(jnp.square(sigma), axis=-1) if complex_output
                else jnp.square(sigma))
    s = sigma_sq / total
    out = {}
    for leaf, (part, layout, pv) in leaves.items():
      scans = [atoms for _, atoms in pv.scans]
      p_shape = m.g.leaf_shapes[leaf]
      s_leaf = block_relayout(s, n_lev, [pv.axes[d] for d in dims], p_shape,
                              layout.out_axes, True)
      s_leaf = mean_over_repeats(s_leaf, levels)
      out[leaf] = (part, layout,
                   block_relayout(h, 0, scans, p_shape, layout.stack_axes, False),
                   block_relayout(s_leaf, 0, scans, p_shape, layout.stack_axes, False))
    return out

  m.sites.append(Site(
      kind=kind, h_path=source.rec.path, h_operand=source.operand, h_fn=h_fn,
      tap_path=y_rec.path, tap_spec=("sum", dims),
      probe_shape=tuple(y_shape[d] for d in dims) + ((2,) if complex_output else ()),
      levels=levels, post=post,
      leaves={leaf: v[:2] for leaf, v in leaves.items()}))
