"""How a value derived from a params leaf is seen: symbolic layouts.

A value derived from a params leaf by layout-only operations is described axis
by axis: each axis is a tuple of "atoms" (outer first), an atom being a slice
of one source axis, (source, axis, stride, size): the atom's coordinate is
(source coordinate // stride) % size. Broadcast axes have atoms whose source
is None. Size-1 atoms are dropped (they carry no index). The same atoms map
statistics computed in a value's axis order to the leaf's axis order.
"""

import collections
import math
from typing import Any, NamedTuple, Optional, Sequence

import jax.numpy as jnp

from optax_soaa._src.layer_stats.types import default_layout
from optax_soaa._src.layer_stats.types import LayerLayout

class Atom(NamedTuple):
  src: Any
  axis: Optional[int]
  stride: int
  size: int


View = tuple  # tuple[tuple[Atom, ...], ...], one entry per axis


def source_view(src: Any, shape: Sequence[int]) -> View:
  return tuple(((Atom(src, a, 1, n),) if n != 1 else ()) for a, n in enumerate(shape))


def axis_size(atoms) -> int:
  return math.prod(a.size for a in atoms)


def leaf_coords(pos, atoms):
  """(leaf axis, coordinate contribution) of positions `pos` along a value
  axis made of `atoms` (broadcast atoms contribute nothing)."""
  out = []
  for a in reversed(atoms):  # inner first
    comp, pos = pos % a.size, pos // a.size
    if a.src is not None:
      out.append((a.axis, comp * a.stride))
  return out


def view_reshape(view: View, new_sizes: Sequence[int]) -> Optional[View]:
  seq = [a for ax in view for a in ax]
  out = []
  for n in new_sizes:
    cur, prod = [], 1
    while prod < n:
      if not seq:
        return None
      atom = seq.pop(0)
      k = n // prod
      if atom.size <= k and k % atom.size == 0:
        cur.append(atom)
        prod *= atom.size
      elif atom.size % k == 0:
        inner = atom.size // k
        cur.append(Atom(atom.src, atom.axis, atom.stride * inner, k))
        seq.insert(0, Atom(atom.src, atom.axis, atom.stride, inner))
        prod *= k
      else:
        return None
    if prod != n:
      return None
    out.append(tuple(cur))
  return tuple(out) if not seq else None


def view_broadcast(view: View, shape: Sequence[int], dims: Sequence[int]) -> View:
  out = [((Atom(None, None, 1, n),) if n != 1 else ()) for n in shape]
  for operand_axis, target in enumerate(dims):
    atoms = view[operand_axis]
    if axis_size(atoms) == shape[target]:
      out[target] = atoms
  return tuple(out)


# Same values, same layout (pvary / pcast: shard_map's varying-axes casts).
IDENTITY_LAYOUT = frozenset({
    "convert_element_type", "copy", "copy_p", "reduce_precision",
    "sharding_constraint", "optimization_barrier", "pvary", "pcast",
})


def apply_layout_op(eqn, view: View) -> Optional[View]:
  """The view of a layout-only equation's output, or None if not one."""
  name = eqn.primitive.name
  params = eqn.params
  out_shape = tuple(eqn.outvars[0].aval.shape)
  if name in IDENTITY_LAYOUT:
    return view
  if name == "reshape":
    if params.get("dimensions") is not None:
      return None
    return view_reshape(view, out_shape)
  if name == "transpose":
    return tuple(view[p] for p in params["permutation"])
  if name == "squeeze":
    dims = {d % len(view) for d in params["dimensions"]}
    return tuple(ax for i, ax in enumerate(view) if i not in dims)
  if name == "expand_dims":
    return view_reshape(view, out_shape)
  if name == "broadcast_in_dim":
    return view_broadcast(view, out_shape, params["broadcast_dimensions"])
  return None


LAYOUT_PRIMITIVES = IDENTITY_LAYOUT | frozenset({
    "reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim",
})


class PView(NamedTuple):
  """A value that is a params leaf after layout-only operations."""

  leaf: int
  axes: View  # per axis of the value
  scans: tuple  # ((scan path, atoms), ...): leaf slices taken by enclosing scans


def roles_to_layout(leaf_shape, groups) -> Optional[LayerLayout]:
  """The leaf's layout from {role: [atoms]}, or None if the roles mix.

  Roles are "stack", "in", "out"; a leaf axis whose atoms fall in two roles
  (a reshape merging inputs and outputs) has no layout. Size-1 leaf axes take
  the role the default layout gives them.
  """
  role_of = {}
  for role, atoms in groups.items():
    for a in atoms:
      if a.src is None:
        return None
      if role_of.setdefault(a.axis, role) != role:
        return None
  ndim = len(leaf_shape)
  default = default_layout(ndim)
  for ax in range(ndim):
    if ax not in role_of:
      role_of[ax] = "out" if ax in default.out_axes else "in"
  pick = lambda r: tuple(ax for ax in range(ndim) if role_of[ax] == r)
  return LayerLayout(pick("stack"), pick("in"), pick("out"))


def vector_layout(shape, pv: PView) -> LayerLayout:
  """The layout of a bias or scale leaf: its scanned axes are stacked, the
  axes its view spreads over the outputs are outputs; size-1 axes take their
  default role."""
  stack = {a.axis for _, ax in pv.scans for a in ax if a.src is not None}
  out = {a.axis for ax in pv.axes for a in ax if a.src is not None}
  default = default_layout(len(shape))
  for ax in range(len(shape)):
    if ax not in stack and ax not in out and shape[ax] == 1 and ax in default.out_axes:
      out.add(ax)
  return LayerLayout(tuple(sorted(stack)), tuple(a for a in range(len(shape)) if a not in stack | out),
                     tuple(sorted(out)))


def tiles(atoms, leaf_shape) -> bool:
  """Whether `atoms` cover every element of the leaf exactly once."""
  by_axis = collections.defaultdict(list)
  for a in atoms:
    if a.src is None:
      return False
    by_axis[a.axis].append(a)
  for ax, n in enumerate(leaf_shape):
    stride = 1
    for a in sorted(by_axis.pop(ax, []), key=lambda a: a.stride):
      if a.stride != stride:
        return False
      stride *= a.size
    if stride != n:
      return False
  return not by_axis


def block_relayout(x, start: int, dim_atoms, leaf_shape, axes, flatten: bool):
  """Dims ``start .. start + len(dim_atoms)`` of `x` (value axes with atoms
  `dim_atoms`) rearranged into the leaf's `axes` order: one dim per axis, or
  one flattened dim."""
  atoms = [a for ax in dim_atoms for a in ax]
  head, tail = x.shape[:start], x.shape[start + len(dim_atoms):]
  x = x.reshape(head + tuple(a.size for a in atoms) + tail)
  rank = {ax: i for i, ax in enumerate(axes)}
  order = sorted(range(len(atoms)), key=lambda i: (rank[atoms[i].axis], -atoms[i].stride))
  perm = (tuple(range(start)) + tuple(start + i for i in order)
          + tuple(range(start + len(atoms), x.ndim)))
  x = jnp.transpose(x, perm)
  target = tuple(leaf_shape[a] for a in axes)
  if flatten:
    target = (math.prod(target),)
  return x.reshape(head + target + tail)


def mean_over_repeats(x, levels):
  axes = tuple(i for i, (_, stacked) in enumerate(levels) if not stacked)
  return jnp.mean(x, axis=axes) if axes else x
