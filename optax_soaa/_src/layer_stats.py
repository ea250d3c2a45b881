"""AdaFisher's per-layer statistics, found from the jaxpr of any loss function.

:func:`value_grad_and_stats` is ``jax.value_and_grad`` plus, for every layer
it recognises in the loss function's jaxpr, the diagonals AdaFisher needs
(:class:`LayerStats`), computed in the same forward and backward pass. Nothing
about the model library is assumed: Flax (Linen, NNX), Equinox and plain
``jax.numpy`` models (those the tests cover) trace to the same primitives.
The design is learned
from kfac-jax (which finds layers by matching patterns in the jaxpr and taps
their outputs); the API here is smaller: one function, no registration.

How it works (developer notes are in ``docs/internals_adafisher.md``):

1. ``jax.make_jaxpr`` of the loss function; the params leaves are its first
   inputs. Every value that is a params leaf after layout-only operations
   (reshape, transpose, squeeze, broadcast, dtype conversion) keeps a symbolic
   map from its axes to the leaf's axes.
2. Layers are found by pattern: a ``dot_general`` or ``conv_general_dilated``
   with one params operand (the kernel) and an optional following add of a
   params vector aligned with the output features (the bias); a feature-wise
   multiply / add of params vectors after ``x - mean(x)`` (LayerNorm,
   BatchNorm). The kernel's axes are classified as inputs (contracted),
   outputs and stacked layers (a ``lax.scan`` over the leaf's leading axis).
3. The jaxpr is evaluated again by an interpreter that, at each layer,
   computes ``h`` from the layer's input (no gradient) and routes the layer's
   output through an identity with a custom VJP whose second input, a zero
   "probe", receives the layer's output-gradient statistic as its cotangent.
   Differentiating w.r.t. params and probes gives the gradients and ``s`` in
   one backward pass.
"""

import collections
import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
from jax import lax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

from optax_soaa._src import utils

LAYER_KINDS = ("dense", "conv", "layer_norm", "batch_norm")
NORM_KINDS = ("layer_norm", "batch_norm")


class LayerLayout(NamedTuple):
  """Which axes of a parameter leaf are inputs, outputs and stacked layers.

  Axes are positions in the leaf's shape, each tuple increasing; together
  they list every axis once. ``h`` is laid out over ``in_axes`` (flattened
  row-major), ``s`` over ``out_axes``, and both carry the ``stack_axes`` as
  leading dimensions (one layer per index: a ``lax.scan`` over stacked
  layers).
  """

  stack_axes: tuple[int, ...]
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]


def default_layout(ndim: int) -> LayerLayout:
  """Flax's kernel layout ``(..., in, out)``; a vector's axis is its output."""
  if ndim == 0:
    return LayerLayout((), (), ())
  return LayerLayout((), tuple(range(ndim - 1)), (ndim - 1,))


@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Statistics of one layer, placed at one parameter leaf.

  For a layer ``y = x W + b`` (any leading dimensions; a convolution with its
  input patches as ``x``) over ``N`` rows (examples x positions):

  * ``h``: shape ``stack + (fan_in,)`` or ``stack + (fan_in + 1,)``:
    ``Σ_n x̄² / N`` with ``x̄ = [x, 1]`` when the layer has a bias (the last
    entry is then 1). ``fan_in`` is the product of the leaf's ``in_axes``
    sizes, in the leaf's own order (``(kh, kw, in)`` for a Flax ``Conv``
    kernel). For a LayerNorm / BatchNorm the two numbers of the reference
    code (one for the scale, one for the bias; see :func:`value_grad_and_stats`).
  * ``s``: shape ``stack + (fan_out,)``: ``Σ_n δ² / N`` with ``δ = ∂loss/∂y``
    (normalisation layers: the reference's ``(Σ_n δ)² / B``).
  * ``part`` (static): ``"kernel"`` at the kernel (or norm scale) leaf, whose
    Fisher is ``h[:fan_in] ⊗ s`` laid out like the leaf, or ``"bias"`` at the
    bias leaf, whose Fisher is ``h[-1] · s``. Both leaves of a layer carry the
    same ``h``: its min-max normalisation runs over the whole vector, bias
    entry included, as the reference code does.
  * ``stack_axes``, ``in_axes``, ``out_axes`` (static): the leaf's
    :class:`LayerLayout`; all ``None`` means the default layout
    (``(..., in, out)``).
  * ``kind`` (static): the layer it came from (``"dense"``, ``"conv"``,
    ``"layer_norm"``, ``"batch_norm"``), or ``""`` when built by hand.
  """

  h: jax.Array
  s: jax.Array
  part: str = "kernel"
  stack_axes: Optional[tuple[int, ...]] = None
  in_axes: Optional[tuple[int, ...]] = None
  out_axes: Optional[tuple[int, ...]] = None
  kind: str = ""

  def layout(self, ndim: int) -> LayerLayout:
    """This leaf's :class:`LayerLayout` (the default when none was given)."""
    if self.stack_axes is None and self.in_axes is None and self.out_axes is None:
      return default_layout(ndim)
    return LayerLayout(tuple(self.stack_axes or ()), tuple(self.in_axes or ()),
                       tuple(self.out_axes or ()))


jax.tree_util.register_dataclass(
    LayerStats, data_fields=["h", "s"],
    meta_fields=["part", "stack_axes", "in_axes", "out_axes", "kind"],
)


def is_stats_leaf(x: Any) -> bool:
  return x is None or isinstance(x, (LayerStats, LayerLayout))


# ----------------------------------------------------------------------------
# Symbolic layouts. A value derived from a params leaf by layout-only
# operations is described axis by axis: each axis is a tuple of "atoms"
# (outer first), an atom being a slice of one source axis,
# (source, axis, stride, size): the atom's coordinate is
# (source coordinate // stride) % size. Broadcast axes have atoms whose source
# is None. Size-1 atoms are dropped (they carry no index).


class _Atom(NamedTuple):
  src: Any
  axis: Optional[int]
  stride: int
  size: int


_View = tuple  # tuple[tuple[_Atom, ...], ...], one entry per axis


def _source_view(src: Any, shape: Sequence[int]) -> _View:
  return tuple(((_Atom(src, a, 1, n),) if n != 1 else ()) for a, n in enumerate(shape))


def _axis_size(atoms) -> int:
  return math.prod(a.size for a in atoms)


def _v_reshape(view: _View, new_sizes: Sequence[int]) -> Optional[_View]:
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
        cur.append(_Atom(atom.src, atom.axis, atom.stride * inner, k))
        seq.insert(0, _Atom(atom.src, atom.axis, atom.stride, inner))
        prod *= k
      else:
        return None
    if prod != n:
      return None
    out.append(tuple(cur))
  return tuple(out) if not seq else None


def _v_broadcast(view: _View, shape: Sequence[int], dims: Sequence[int]) -> _View:
  out = [((_Atom(None, None, 1, n),) if n != 1 else ()) for n in shape]
  for operand_axis, target in enumerate(dims):
    atoms = view[operand_axis]
    if _axis_size(atoms) == shape[target]:
      out[target] = atoms
  return tuple(out)


# Same values, same layout (pvary / pcast: shard_map's varying-axes casts).
_IDENTITY_LAYOUT = frozenset({
    "convert_element_type", "copy", "copy_p", "reduce_precision",
    "sharding_constraint", "optimization_barrier", "pvary", "pcast",
})


def _apply_layout_op(eqn, view: _View) -> Optional[_View]:
  """The view of a layout-only equation's output, or None if not one."""
  name = eqn.primitive.name
  params = eqn.params
  out_shape = tuple(eqn.outvars[0].aval.shape)
  if name in _IDENTITY_LAYOUT:
    return view
  if name == "reshape":
    if params.get("dimensions") is not None:
      return None
    return _v_reshape(view, out_shape)
  if name == "transpose":
    return tuple(view[p] for p in params["permutation"])
  if name == "squeeze":
    dims = {d % len(view) for d in params["dimensions"]}
    return tuple(ax for i, ax in enumerate(view) if i not in dims)
  if name == "expand_dims":
    return _v_reshape(view, out_shape)
  if name == "broadcast_in_dim":
    return _v_broadcast(view, out_shape, params["broadcast_dimensions"])
  return None


_LAYOUT_PRIMITIVES = _IDENTITY_LAYOUT | frozenset({
    "reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim",
})
# Calls whose body is evaluated in place (its semantics do not depend on the
# call boundary); remat keeps its semantics through jax.checkpoint.
_INLINE_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call"})
_REMAT = frozenset({"remat2", "checkpoint", "remat"})
# Layers inside these get no statistics (reported): a custom VJP is the
# user's word on the gradient, and cond/while do not take every branch/step.
_OPAQUE = {
    "custom_vjp_call": "inside a jax.custom_vjp function (its own gradient rule)",
    "custom_vjp_call_jaxpr": "inside a jax.custom_vjp function (its own gradient rule)",
    "cond": "inside lax.cond / lax.switch",
    "while": "inside lax.while_loop / fori_loop",
}


def _call_jaxpr(eqn):
  """(jaxpr, consts) of an inlinable call or remat equation."""
  params = eqn.params
  for key in ("jaxpr", "call_jaxpr"):
    if key in params:
      j = params[key]
      if isinstance(j, jex_core.ClosedJaxpr):
        return j.jaxpr, list(j.consts)
      return j, []
  raise TypeError(f"no jaxpr in {eqn.primitive.name}")


class _PView(NamedTuple):
  """A value that is a params leaf after layout-only operations."""

  leaf: int
  axes: _View  # per axis of the value
  scans: tuple  # ((scan path, atoms), ...): leaf slices taken by enclosing scans


class _Rec(NamedTuple):
  """One equation of the (nested) jaxpr, with where it sits."""

  path: tuple[int, ...]
  eqn: Any
  scans: tuple[tuple[int, ...], ...]  # paths of the enclosing scans, outer first


@dataclasses.dataclass
class _Site:
  """One call site of one layer: where its h is computed and its output tapped.

  Inside ``lax.scan`` bodies a site runs once per iteration: its ``h`` and its
  probe carry one leading dimension per enclosing scan (``levels``), stacked
  for a scan over the layer's own parameters (a stack of layers), repeated
  (averaged, as calls) for a scan that reuses them.
  """

  kind: str
  h_path: tuple[int, ...]
  h_operand: int
  h_fn: Callable[[jax.Array], jax.Array]
  tap_path: tuple[int, ...]
  tap_spec: tuple  # static: ("mean_sq", output dims) or ("sum", None)
  probe_shape: tuple[int, ...]  # per iteration
  levels: tuple[tuple[int, bool], ...]  # per enclosing scan: (length, stacked)
  # (h, s, axis_name) with leading level dims -> {leaf: (part, layout, h, s)}
  # averaged over the repeated levels, in the leaf's layout.
  post: Callable
  leaves: dict  # leaf -> (part, LayerLayout)

  @property
  def calls(self) -> int:
    return math.prod(n for n, stacked in self.levels if not stacked)


def _is_var(x) -> bool:
  return isinstance(x, jex_core.Var)


class _Graph:
  """The jaxpr flattened across call boundaries, with params provenance."""

  def __init__(self, jaxpr, n_params: int, leaf_shapes):
    self.canon: dict = {}
    self.producer: dict = {}
    self.consumers = collections.defaultdict(list)
    self.views: dict = {}
    self.recs: list[_Rec] = []
    self.blocked = collections.defaultdict(list)  # leaf -> reasons
    self.uses = collections.defaultdict(list)  # leaf -> [primitive names]
    self.leaf_shapes = leaf_shapes
    self.scan_lengths: dict = {}
    for i, v in enumerate(jaxpr.invars[:n_params]):
      self.views[self.node((), v)] = _PView(
          i, _source_view(i, tuple(v.aval.shape)), ())
    self._walk(jaxpr, (), ())

  def node(self, ctx, v):
    if not _is_var(v):
      return None
    key = (ctx, v)
    while key in self.canon:
      key = self.canon[key]
    return key

  def view(self, ctx, v) -> Optional[_PView]:
    n = self.node(ctx, v)
    return None if n is None else self.views.get(n)

  def _walk(self, jaxpr, ctx, scans):
    for i, eqn in enumerate(jaxpr.eqns):
      path = ctx + (i,)
      rec = _Rec(path, eqn, scans)
      self.recs.append(rec)
      in_nodes = [self.node(ctx, v) for v in eqn.invars]
      for k, n in enumerate(in_nodes):
        if n is not None:
          self.consumers[n].append((rec, k))
      name = eqn.primitive.name
      in_views = [self.views.get(n) if n is not None else None for n in in_nodes]
      if name in _INLINE_CALLS or name in _REMAT:
        sub, _ = _call_jaxpr(eqn)
        offset = len(sub.invars) - len(eqn.invars)
        for k, n in enumerate(in_nodes):
          if n is not None and k + offset >= 0:
            self.canon[(path, sub.invars[k + offset])] = n
        self._walk(sub, path, scans)
        for o, inner in zip(eqn.outvars, sub.outvars):
          n = self.node(path, inner)
          if n is not None and _is_var(o):
            self.canon[(ctx, o)] = n
        continue
      if name == "scan":
        self._walk_scan(eqn, path, ctx, scans, in_nodes, in_views)
      for o in eqn.outvars:
        if _is_var(o):
          self.producer[self.node(ctx, o)] = rec
      if name in _LAYOUT_PRIMITIVES and in_views and in_views[0] is not None:
        pv = in_views[0]
        new = _apply_layout_op(eqn, pv.axes)
        if new is not None:
          self.views[self.node(ctx, eqn.outvars[0])] = pv._replace(axes=new)
          continue
      for pv in in_views:
        if pv is not None:
          self.uses[pv.leaf].append(name)
          if name in _OPAQUE:
            self.blocked[pv.leaf].append(_OPAQUE[name])

  def _walk_scan(self, eqn, path, ctx, scans, in_nodes, in_views):
    params = eqn.params
    body = params["jaxpr"].jaxpr
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    self.scan_lengths[path] = params["length"]
    for k, v in enumerate(body.invars):
      n, pv = in_nodes[k], in_views[k]
      if k < n_consts:
        if n is not None:
          self.canon[(path, v)] = n
      elif k >= n_consts + n_carry and pv is not None and pv.axes:
        self.views[(path, v)] = _PView(
            pv.leaf, pv.axes[1:], pv.scans + ((path, pv.axes[0]),))
    self._walk(body, path, scans + (path,))


# ----------------------------------------------------------------------------
# Mapping statistics between a value's axes and a leaf's axes.


def _roles_to_layout(leaf_shape, groups) -> Optional[LayerLayout]:
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


def _vector_layout(shape, pv: _PView) -> LayerLayout:
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


def _tiles(atoms, leaf_shape) -> bool:
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


def _block_relayout(x, start: int, dim_atoms, leaf_shape, axes, flatten: bool):
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


def _mean_over_repeats(x, levels):
  axes = tuple(i for i, (_, stacked) in enumerate(levels) if not stacked)
  return jnp.mean(x, axis=axes) if axes else x


# ----------------------------------------------------------------------------
# The probe: an identity whose VJP hands a per-layer statistic of the output
# gradient to a zero input of the statistic's shape.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tap(y, probe, due, spec):
  del probe, due, spec
  return y


def _tap_fwd(y, probe, due, spec):
  del spec
  return y, (jnp.zeros([], probe.dtype), due)


def _output_statistic(spec, dy, dtype):
  kind, out_dims = spec
  d = dy.astype(jnp.promote_types(dtype, dy.dtype))
  if kind == "mean_sq":
    rows = tuple(i for i in range(d.ndim) if i not in out_dims)
    n = math.prod(d.shape[i] for i in rows)
    stat = jnp.sum(utils.abs_sq(d), axis=rows) / max(n, 1)
  else:  # "sum": the normalisation layers' Σ_rows δ per feature (last axis).
    stat = jnp.sum(d, axis=tuple(range(d.ndim - 1)))
    if jnp.iscomplexobj(stat):  # The real probe takes (Re, Im) pairs.
      stat = jnp.stack([stat.real, stat.imag], axis=-1)
  return stat.astype(dtype)


def _zeros_like_shape(s):
  return jnp.zeros(s.shape, s.dtype)


def _tap_bwd(spec, res, dy):
  marker, due = res
  stat = functools.partial(_output_statistic, spec, dtype=marker.dtype)
  if due is None:
    return dy, stat(dy), None
  # Only this square-and-sum is conditional, not the backward pass around
  # it (XLA:CPU runs a convolution inside a conditional far slower).
  zeros = lambda d: _zeros_like_shape(jax.eval_shape(stat, d))
  return dy, lax.cond(due, stat, zeros, dy), None


_tap.defvjp(_tap_fwd, _tap_bwd)


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


def _acc_dtype(x) -> jnp.dtype:
  return jnp.promote_types(x.dtype, jnp.float32)


# ----------------------------------------------------------------------------
# Layer patterns.


class _Finder:
  """Finds the layers of a flattened jaxpr graph and builds their sites."""

  def __init__(self, graph: _Graph, kinds: Sequence[str]):
    self.g = graph
    self.kinds = tuple(kinds)
    self.sites: list[_Site] = []
    self.reasons = collections.defaultdict(list)  # leaf -> why not
    self.claimed: set = set()  # add/mul equations already part of a layer
    for rec in graph.recs:
      name = rec.eqn.primitive.name
      if name == "dot_general":
        self._dense(rec)
      elif name == "conv_general_dilated":
        self._conv(rec)
    for rec in graph.recs:
      if rec.eqn.primitive.name in ("mul", "add") and rec.path not in self.claimed:
        self._norm(rec)

  def _levels(self, rec, pv: _PView):
    stacked = {p for p, _ in pv.scans}
    return tuple((self.g.scan_lengths[p], p in stacked) for p in rec.scans)

  # -- dense and conv --------------------------------------------------------

  def _kernel(self, rec, kind):
    """(kernel operand index, its view) of a layer equation of a requested
    kind, or None."""
    ctx = rec.path[:-1]
    views = [self.g.view(ctx, v) for v in rec.eqn.invars]
    found = [(i, pv) for i, pv in enumerate(views) if pv is not None]
    if len(found) > 1:
      for _, pv in found:
        self.reasons[pv.leaf].append(
            f"{rec.eqn.primitive.name} of two parameters (no layer input)")
    if len(found) != 1:
      return None
    if kind not in self.kinds:
      self._reject(rec, found[0][1].leaf, f"{kind} layers not requested (layers=)")
      return None
    return found[0]

  def _reject(self, rec, leaf, reason):
    """Records why a layer gets no statistics, for its kernel and its bias."""
    self.reasons[leaf].append(reason)
    y_shape = tuple(rec.eqn.outvars[0].aval.shape)
    for add_rec, k, _ in self._follow_layout(rec, _source_view("y", y_shape)):
      if add_rec.eqn.primitive.name == "add":
        bv = self.g.view(add_rec.path[:-1], add_rec.eqn.invars[1 - k])
        if bv is not None:
          self.reasons[bv.leaf].append(f"the bias of a layer without statistics ({reason})")

  def _dense(self, rec):
    eqn = rec.eqn
    hit = self._kernel(rec, "dense")
    if hit is None:
      return
    k_idx, kv = hit
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
      self._reject(
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
      x = lax.stop_gradient(x).astype(_acc_dtype(x))
      x = jnp.transpose(x, x_free + x_contract)
      rows = math.prod(x.shape[:len(x_free)])
      x = x.reshape((rows,) + x.shape[len(x_free):])
      return jnp.sum(utils.abs_sq(x), axis=0) / max(rows, 1)

    self._linear_site("dense", rec, kv, x_idx, h_fn, out_dims,
                      [kv.axes[d] for d in k_contract], [kv.axes[d] for d in k_free])

  def _conv(self, rec):
    eqn = rec.eqn
    hit = self._kernel(rec, "conv")
    if hit is None:
      return
    k_idx, kv = hit
    params = eqn.params
    if k_idx != 1:
      self._reject(rec, kv.leaf, "a parameter as a convolution's input")
      return
    if params["batch_group_count"] != 1:
      self._reject(rec, kv.leaf, "a convolution with batch groups")
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
      x = lax.stop_gradient(x).astype(_acc_dtype(x))
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
    self._linear_site("conv", rec, kv, 0, h_fn, (out_spec[1],),
                      [kv.axes[d] for d in in_dims], [kv.axes[rhs_spec[0]]])

  def _linear_site(self, kind, rec, kv, x_idx, h_fn, out_dims, in_atoms, out_atoms):
    leaf = kv.leaf
    leaf_shape = self.g.leaf_shapes[leaf]
    scan_atoms = [atoms for _, atoms in kv.scans]
    flat = lambda groups: [a for ax in groups for a in ax]
    layout = _roles_to_layout(leaf_shape, {
        "stack": flat(scan_atoms), "in": flat(in_atoms), "out": flat(out_atoms)})
    if layout is None or not _tiles(flat(scan_atoms + in_atoms + out_atoms), leaf_shape):
      self.reasons[leaf].append(
          f"a {kind} kernel reshaped across its input and output axes, or "
          "broadcast")
      return
    y_shape = tuple(rec.eqn.outvars[0].aval.shape)
    levels = self._levels(rec, kv)
    n_lev = len(levels)
    stacked_atoms = scan_atoms  # the kernel's scans are exactly its stacked levels
    bias = self._find_bias(rec, out_dims, kv)
    leaves = {leaf: ("kernel", layout)}
    if bias is not None:
      b_leaf, b_layout, b_order, b_scans, add_path = bias
      leaves[b_leaf] = ("bias", b_layout)
      self.claimed.add(add_path)
    n_out = math.prod(y_shape[d] for d in out_dims)

    def post(h, s, axis_name):
      if axis_name is not None:
        n_dev = lax.psum(1, axis_name)
        h = lax.pmean(h, axis_name)
        # δ of the device-averaged loss is δ_local / n_devices.
        s = lax.pmean(s, axis_name) / (n_dev * n_dev)
      h = _block_relayout(h, n_lev, in_atoms, leaf_shape, layout.in_axes, True)
      if bias is not None:
        h = jnp.concatenate([h, jnp.ones(h.shape[:-1] + (1,), h.dtype)], axis=-1)
      s_out = s.reshape(s.shape[:n_lev] + (n_out,))
      s_k = _block_relayout(s, n_lev, out_atoms, leaf_shape, layout.out_axes, True)
      h, s_k, s_out = (_mean_over_repeats(x, levels) for x in (h, s_k, s_out))
      h_k = _block_relayout(h, 0, stacked_atoms, leaf_shape, layout.stack_axes, False)
      s_k = _block_relayout(s_k, 0, stacked_atoms, leaf_shape, layout.stack_axes, False)
      out = {leaf: ("kernel", layout, h_k, s_k)}
      if bias is not None:
        b_shape = self.g.leaf_shapes[b_leaf]
        h_b = _block_relayout(h, 0, b_scans, b_shape, b_layout.stack_axes, False)
        s_b = _block_relayout(s_out[..., b_order], 0, b_scans, b_shape,
                              b_layout.stack_axes, False)
        out[b_leaf] = ("bias", b_layout, h_b, s_b)
      return out

    self.sites.append(_Site(
        kind=kind, h_path=rec.path, h_operand=x_idx, h_fn=h_fn,
        tap_path=rec.path, tap_spec=("mean_sq", tuple(out_dims)),
        probe_shape=tuple(y_shape[d] for d in out_dims), levels=levels,
        post=post, leaves=leaves))

  def _follow_layout(self, rec, view, max_depth=6):
    """(record, operand index, view) of the non-layout consumers of `rec`'s
    output reached through layout-only equations."""
    out = []
    frontier = [(self.g.node(rec.path[:-1], rec.eqn.outvars[0]), view, 0)]
    while frontier:
      node, view, depth = frontier.pop()
      for c_rec, k in self.g.consumers.get(node, ()):
        eqn = c_rec.eqn
        if eqn.primitive.name in _LAYOUT_PRIMITIVES and depth < max_depth:
          new = _apply_layout_op(eqn, view)
          if new is not None:
            frontier.append((self.g.node(c_rec.path[:-1], eqn.outvars[0]), new, depth + 1))
            continue
        out.append((c_rec, k, view))
    return out

  def _find_bias(self, rec, out_dims, kv):
    """(bias leaf, layout, order, scan atoms, add path) or None."""
    y_shape = tuple(rec.eqn.outvars[0].aval.shape)
    for add_rec, k, view in self._follow_layout(rec, _source_view("y", y_shape)):
      eqn = add_rec.eqn
      if eqn.primitive.name != "add" or len(eqn.invars) != 2:
        continue
      if tuple(eqn.invars[k].aval.shape) != tuple(eqn.outvars[0].aval.shape):
        continue
      bv = self.g.view(add_rec.path[:-1], eqn.invars[1 - k])
      if bv is None:
        continue
      mapped = self._bias_map(view, bv, y_shape, out_dims, kv)
      if mapped is None:
        self.reasons[bv.leaf].append(
            "added to a layer's output, but not one element per output")
        continue
      layout, order = mapped
      return bv.leaf, layout, order, [atoms for _, atoms in bv.scans], add_rec.path
    return None

  def _bias_map(self, y_view, bv: _PView, y_shape, out_dims, kv):
    """The bias leaf's layout, and for each of its elements (in its out-axes
    order) the index of its output (row-major over the layer's out dims)."""
    b_shape = self.g.leaf_shapes[bv.leaf]
    if len(bv.axes) != len(y_view) or len(bv.scans) != len(kv.scans):
      return None
    if any(_axis_size(a) != _axis_size(b) for (_, a), (_, b) in zip(bv.scans, kv.scans)):
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
      for a in reversed(b_atoms):
        comp, pos = pos % a.size, pos // a.size
        if a.src is not None:
          b_coord[a.axis] += comp * a.stride
    layout = _vector_layout(b_shape, bv)
    stack_axes, in_axes, out_axes = layout
    out_shape = tuple(b_shape[a] for a in out_axes)
    if (any(b_shape[a] != 1 for a in in_axes) or math.prod(out_shape) != n_out
        or not _tiles([a for _, ax in bv.scans for a in ax]
                      + [a for ax in bv.axes for a in ax if a.src is not None], b_shape)):
      return None
    idx = (np.ravel_multi_index(tuple(b_coord[a] for a in out_axes), out_shape)
           if out_axes else np.zeros(n_out, np.int64))
    if len(set(idx.tolist())) != n_out:
      return None
    order = np.empty(n_out, np.int64)
    order[idx] = np.arange(n_out)
    return layout, order

  # -- normalisation layers --------------------------------------------------

  def _feature_vector(self, ctx, v, shape) -> Optional[_PView]:
    """The view of `v` if it is a params vector along the last axis of `shape`
    (one element per feature, in order)."""
    pv = self.g.view(ctx, v)
    if pv is None or not shape or len(pv.axes) != len(shape):
      return None
    if any(a.src is not None for atoms in pv.axes[:-1] for a in atoms):
      return None
    last = [a for a in pv.axes[-1] if a.src is not None]
    if not last or _axis_size(last) != shape[-1]:
      return None
    if [a.stride for a in last] != sorted((a.stride for a in last), reverse=True):
      return None
    if not _tiles(last + [a for _, ax in pv.scans for a in ax], self.g.leaf_shapes[pv.leaf]):
      return None
    return pv

  def _norm(self, rec):
    eqn = rec.eqn
    ctx = rec.path[:-1]
    out_shape = tuple(eqn.outvars[0].aval.shape)
    fv = [self._feature_vector(ctx, x, out_shape) for x in eqn.invars]
    if len(fv) != 2 or (fv[0] is None) == (fv[1] is None):
      return
    p_idx = 0 if fv[0] is not None else 1
    pv, other = fv[p_idx], eqn.invars[1 - p_idx]
    scale = bias = None
    # Where the normalised value meets the scale: this multiply (Equinox, and
    # BatchNorm's per-channel factor), or a following multiply of the centred
    # input by (rsqrt factor * scale) (Flax / NNX LayerNorm).
    candidates = [(rec, other)]
    if eqn.primitive.name == "mul":
      scale = pv
      for c_rec, k in self.g.consumers.get(self.g.node(ctx, eqn.outvars[0]), ()):
        ce = c_rec.eqn
        full = ce.invars[1 - k]
        if (ce.primitive.name == "mul" and _is_var(full)
            and tuple(full.aval.shape) == tuple(ce.outvars[0].aval.shape)):
          candidates.append((c_rec, full))
    else:
      bias = pv
    centring = y0_rec = None
    for y0_rec, normalised in candidates:
      if _is_var(normalised):
        centring = self._centring(y0_rec.path[:-1], normalised)
      if centring is not None:
        break
    if centring is None:
      self.reasons[pv.leaf].append(
          "a feature-wise scale or shift of a value that is not x - mean(x) "
          "(e.g. RMSNorm): the reference has no statistics for it")
      return
    x_rec, kind = centring
    if kind is None:
      self.reasons[pv.leaf].append(
          "a normalisation over axes other than LayerNorm's (the last) or "
          "BatchNorm's (all but the last)")
      return
    if kind not in self.kinds:
      self.reasons[pv.leaf].append(f"{kind} layers not requested (layers=)")
      return
    y_rec = y0_rec
    if scale is not None:
      y_node = self.g.node(y0_rec.path[:-1], y0_rec.eqn.outvars[0])
      for c_rec, k in self.g.consumers.get(y_node, ()):
        ce = c_rec.eqn
        if ce.primitive.name != "add":
          continue
        shape = tuple(ce.outvars[0].aval.shape)
        q = self._feature_vector(c_rec.path[:-1], ce.invars[1 - k], shape)
        if q is not None and tuple(ce.invars[k].aval.shape) == shape:
          bias, y_rec = q, c_rec
          break
    x_shape = tuple(x_rec.eqn.invars[0].aval.shape)
    y_shape = tuple(y_rec.eqn.outvars[0].aval.shape)
    complex_output = jnp.issubdtype(y_rec.eqn.outvars[0].aval.dtype,
                                    jnp.complexfloating)
    if x_rec.scans != y_rec.scans or x_shape != y_shape or len(x_shape) < 2:
      self.reasons[pv.leaf].append(
          "a normalisation without a batch axis, or split across a scan")
      return
    params_ = [p for p in (scale, bias) if p is not None]
    if len({len(p.scans) for p in params_}) != 1 or len(params_) == 2 and scale.leaf == bias.leaf:
      return
    for r in (rec, y0_rec, y_rec):
      self.claimed.add(r.path)
    batch = x_shape[0]
    if kind == "layer_norm":
      # The reference reduces over every axis but 1 (T of a (B, T, D) input,
      # D of a (B, D) one) and divides by the product of the axes after 1.
      reduce_axes = tuple(d for d in range(len(x_shape)) if d != 1)
      dim_norm = math.prod(x_shape[2:])
    else:
      # BatchNorm2d's (0, 2, 3) of NCHW: every axis but the channels (last).
      reduce_axes = tuple(range(len(x_shape) - 1))
      dim_norm = math.prod(x_shape[1:-1])

    def h_fn(x):
      x = lax.stop_gradient(x).astype(_acc_dtype(x))
      return jnp.sum(x, axis=reduce_axes) / (dim_norm * dim_norm)

    leaves = {}
    for part, p in (("kernel", scale), ("bias", bias)):
      if p is not None:
        leaves[p.leaf] = (part, _vector_layout(self.g.leaf_shapes[p.leaf], p), p)
    levels = self._levels(y_rec, params_[0])

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
      h = _mean_over_repeats(jnp.stack([h0, h1], axis=-1), levels)
      sigma_sq = (jnp.sum(jnp.square(sigma), axis=-1) if complex_output
                  else jnp.square(sigma))
      s = _mean_over_repeats(sigma_sq / total, levels)
      out = {}
      for leaf, (part, layout, p) in leaves.items():
        scans = [atoms for _, atoms in p.scans]
        p_shape = self.g.leaf_shapes[leaf]
        out[leaf] = (part, layout,
                     _block_relayout(h, 0, scans, p_shape, layout.stack_axes, False),
                     _block_relayout(s, 0, scans, p_shape, layout.stack_axes, False))
      return out

    self.sites.append(_Site(
        kind=kind, h_path=x_rec.path, h_operand=0, h_fn=h_fn,
        tap_path=y_rec.path, tap_spec=("sum", None),
        probe_shape=(y_shape[-1],) + ((2,) if complex_output else ()),
        levels=levels, post=post,
        leaves={leaf: v[:2] for leaf, v in leaves.items()}))

  def _centring(self, ctx, v):
    """(record of ``x - mean(x)``, kind or None) reached back from `v`
    through per-row factors (``mul``/``div`` by a smaller operand)."""
    node = self.g.node(ctx, v)
    for _ in range(8):
      rec = self.g.producer.get(node)
      if rec is None:
        return None
      eqn, rctx = rec.eqn, rec.path[:-1]
      name = eqn.primitive.name
      out_shape = tuple(eqn.outvars[0].aval.shape)
      if name == "sub":
        x, m = eqn.invars
        if not _is_var(x) or tuple(x.aval.shape) != out_shape:
          return None
        axes = self._mean_axes(rctx, m, self.g.node(rctx, x))
        if axes is None:
          return None
        ndim = len(out_shape)
        if ndim >= 2 and axes == tuple(range(ndim - 1)):
          return rec, "batch_norm"
        if axes == (ndim - 1,):
          return rec, "layer_norm"
        return rec, None
      if name in ("mul", "div"):
        full = [i for i, x in enumerate(eqn.invars)
                if _is_var(x) and tuple(x.aval.shape) == out_shape]
        if len(full) != 1 or (name == "div" and full[0] != 0):
          return None
        node = self.g.node(rctx, eqn.invars[full[0]])
        continue
      if name in _IDENTITY_LAYOUT:
        node = self.g.node(rctx, eqn.invars[0])
        continue
      return None
    return None

  def _same_value(self, a, b) -> bool:
    """Whether nodes `a` and `b` hold the same values up to dtype casts."""
    def root(n):
      while True:
        rec = self.g.producer.get(n)
        if rec is None or rec.eqn.primitive.name not in _IDENTITY_LAYOUT:
          return n
        n = self.g.node(rec.path[:-1], rec.eqn.invars[0])
    return root(a) == root(b)

  def _mean_axes(self, ctx, m, x_node, depth=0):
    """The axes of `x` that `m` averages (a reduce_sum of x, scaled and
    broadcast back), or None."""
    node = self.g.node(ctx, m)
    rec = self.g.producer.get(node)
    if rec is None or depth > 12:
      return None
    eqn, rctx = rec.eqn, rec.path[:-1]
    name = eqn.primitive.name
    if name == "reduce_sum":
      if not self._same_value(self.g.node(rctx, eqn.invars[0]), x_node):
        return None
      return tuple(sorted(int(a) for a in eqn.params["axes"]))
    if name in _IDENTITY_LAYOUT or name in (
        "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "psum",
        "pmean", "psum_invariant"):
      return self._mean_axes(rctx, eqn.invars[0], x_node, depth + 1)
    if name in ("div", "mul"):
      # A sum divided (or multiplied) by a count: the sum is the numerator,
      # or either factor of a product.
      candidates = eqn.invars[:1] if name == "div" else eqn.invars
      for v in candidates:
        if _is_var(v):
          axes = self._mean_axes(rctx, v, x_node, depth + 1)
          if axes is not None:
            return axes
    return None


# ----------------------------------------------------------------------------
# Evaluation with taps.


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  manager = getattr(getattr(eqn, "ctx", None), "manager", None)
  if manager is None:
    out = eqn.primitive.bind(*invals, **params)
  else:
    with manager:
      out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


class _Plan:
  """The layers of one traced loss function and how to evaluate it with taps."""

  def __init__(self, closed, n_params: int, leaf_shapes, kinds):
    self.closed = closed
    self.n_params = n_params
    self.leaf_shapes = leaf_shapes
    graph = _Graph(closed.jaxpr, n_params, leaf_shapes)
    finder = _Finder(graph, kinds)
    self.reasons = finder.reasons
    self.uses = graph.uses
    self.blocked = graph.blocked
    self.sites = self._consistent(finder.sites)
    self.h_at = collections.defaultdict(list)
    self.tap_at = collections.defaultdict(list)
    self.descend = set()
    for sid, site in enumerate(self.sites):
      self.h_at[site.h_path].append(sid)
      self.tap_at[site.tap_path].append(sid)
      for path in (site.h_path, site.tap_path):
        for k in range(1, len(path)):
          self.descend.add(path[:k])

  def _consistent(self, sites):
    """Sites whose leaves agree on part and layout across calls."""
    seen = {}
    bad = set()
    for site in sites:
      for leaf, (part, layout) in site.leaves.items():
        if seen.setdefault(leaf, (part, layout)) != (part, layout):
          bad.add(leaf)
    for leaf in bad:
      self.reasons[leaf].append(
          "used by several layers with different roles or layouts")
    return [s for s in sites if not bad & set(s.leaves)]

  def leaf_info(self) -> dict:
    """leaf -> (kind, part, layout, number of calls)."""
    info = {}
    for site in self.sites:
      for leaf, (part, layout) in site.leaves.items():
        kind, _, _, calls = info.get(leaf, (site.kind, part, layout, 0))
        info[leaf] = (kind, part, layout, calls + site.calls)
    return info

  def probes(self, dtype, axes: frozenset) -> dict:
    return {
        sid: _vary(jnp.zeros(tuple(n for n, _ in s.levels) + s.probe_shape, dtype), axes)
        for sid, s in enumerate(self.sites)
    }

  def evaluate(self, jaxpr, consts, args, ctx, probes, due=None):
    """(outputs, {site: h}) of `jaxpr`, tapping the sites under `ctx`; with
    a boolean array `due`, the statistics are computed only where it holds
    (zeros elsewhere)."""
    env = {}

    def read(v):
      return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    for v, x in zip(jaxpr.invars, args):
      env[v] = x
    hs = {}
    for i, eqn in enumerate(jaxpr.eqns):
      path = ctx + (i,)
      invals = [read(v) for v in eqn.invars]
      for sid in self.h_at.get(path, ()):
        site = self.sites[sid]
        x = invals[site.h_operand]
        if due is None:
          hs[sid] = site.h_fn(x)
        else:
          zeros = lambda x, f=site.h_fn: _zeros_like_shape(jax.eval_shape(f, x))
          hs[sid] = lax.cond(due, site.h_fn, zeros, x)
      if path in self.descend:
        outvals, inner_hs = self._descend(eqn, path, invals, probes, due)
        hs.update(inner_hs)
      else:
        outvals = _bind(eqn, invals)
      for sid in self.tap_at.get(path, ()):
        probe = probes[sid]
        y = _vary(outvals[0], _varying_axes(probe))
        outvals[0] = _tap(y, probe, due, self.sites[sid].tap_spec)
      for v, x in zip(eqn.outvars, outvals):
        if _is_var(v):
          env[v] = x
    return [read(v) for v in jaxpr.outvars], hs

  def _inside(self, path, probes):
    n = len(path)
    return {sid: p for sid, p in probes.items() if self.sites[sid].tap_path[:n] == path}

  def _descend(self, eqn, path, invals, probes, due):
    name = eqn.primitive.name
    if name == "scan":
      return self._scan(eqn, path, invals, probes, due)
    sub, consts = _call_jaxpr(eqn)
    if name in _REMAT:
      inside = self._inside(path, probes)

      def body(invals, inside, due):
        return self.evaluate(sub, consts, invals, path, inside, due)

      return jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                            policy=eqn.params.get("policy"))(invals, inside, due)
    return self.evaluate(sub, consts, invals, path, probes, due)

  def _scan(self, eqn, path, invals, probes, due):
    params = eqn.params
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts = invals[:n_consts]
    carry = invals[n_consts:n_consts + n_carry]
    xs = invals[n_consts + n_carry:]
    body = params["jaxpr"]
    inside = self._inside(path, probes)

    def step(carry, x):
      x_i, probes_i = x
      outs, hs = self.evaluate(body.jaxpr, body.consts, consts + list(carry) + list(x_i),
                               path, probes_i, due)
      return outs[:n_carry], (outs[n_carry:], hs)

    carry, (ys, hs) = lax.scan(
        step, carry, (xs, inside), length=params["length"],
        reverse=params["reverse"], unroll=params["unroll"])
    return list(carry) + list(ys), hs

  def finish(self, hs, probe_grads, axis_name, treedef) -> Any:
    """The stats pytree (LayerStats or None per leaf) from the taps."""
    sums, calls = {}, {}
    for sid, site in enumerate(self.sites):
      for leaf, (part, layout, h, s) in site.post(hs[sid], probe_grads[sid], axis_name).items():
        w = site.calls
        if leaf in sums:
          _, _, h0, s0 = sums[leaf]
          h, s = h0 + w * h, s0 + w * s
        else:
          h, s = w * h, w * s
        sums[leaf] = (part, layout, h, s)
        calls[leaf] = calls.get(leaf, 0) + w
    out = [None] * self.n_params
    for leaf, (part, layout, h, s) in sums.items():
      kind = self.leaf_info()[leaf][0]
      out[leaf] = LayerStats(
          h=h / calls[leaf], s=s / calls[leaf], part=part,
          stack_axes=layout.stack_axes, in_axes=layout.in_axes,
          out_axes=layout.out_axes, kind=kind)
    return jax.tree.unflatten(treedef, out)

  def why_not(self, leaf: int) -> str:
    """Why a leaf got no statistics."""
    if self.blocked.get(leaf):
      return self.blocked[leaf][0]
    if self.reasons.get(leaf):
      return self.reasons[leaf][0]
    uses = [u for u in self.uses.get(leaf, ()) if u not in _LAYOUT_PRIMITIVES]
    if not uses:
      return "not used by a layer the collector knows (or not used by the loss)"
    if "gather" in uses or "dynamic_slice" in uses:
      return f"used by {uses[0]} (an embedding lookup or a slice): no layer statistics"
    return f"used by {', '.join(sorted(set(uses)))}, not by a recognised layer"


def _is_traced_input(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _trace(fun, has_aux, params, args, kwargs, kinds):
  """The plan of `fun` at these arguments and the functions built from it."""
  p_leaves, p_tree = jax.tree.flatten(params)
  a_leaves, a_tree = jax.tree.flatten((args, kwargs))
  dynamic = [i for i, x in enumerate(a_leaves) if _is_traced_input(x)]

  def flat_fun(p_leaves, d_leaves):
    leaves = list(a_leaves)
    for i, x in zip(dynamic, d_leaves):
      leaves[i] = x
    args_, kwargs_ = jax.tree.unflatten(a_tree, leaves)
    out = fun(jax.tree.unflatten(p_tree, p_leaves), *args_, **kwargs_)
    return out if has_aux else (out, None)

  d_leaves = [a_leaves[i] for i in dynamic]
  closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(p_leaves, d_leaves)
  out_tree = jax.tree.structure(out_shape)
  shapes = [tuple(jnp.shape(x)) for x in p_leaves]
  plan = _Plan(closed, len(p_leaves), shapes, kinds)
  return plan, flat_fun, p_leaves, p_tree, d_leaves, out_tree


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
    attention projections, ``eqx.nn.Linear``, ``x @ w``;
  * **conv**: a ``conv_general_dilated`` whose kernel is a params leaf, with
    any groups (a grouped or depthwise convolution pools its groups' patches,
    as the reference does), any rank, strides, padding, dilation;
  * a following add of a params leaf with one element per output is the
    layer's **bias**;
  * **layer_norm** / **batch_norm**: a feature-wise multiply (scale) and / or
    add (bias) of params vectors after ``x - mean(x)`` over the last axis
    (LayerNorm) or over all axes but the last (BatchNorm, training mode).

  Statistics (``N`` rows: every axis of the layer's input and output but the
  contracted / feature ones; ``δ = ∂loss/∂y`` at the layer output ``y``):

  * dense / conv: ``h = Σ_n x̄² / N`` with ``x̄ = [x, 1]`` (``[patch, 1]``
    for a convolution; the 1 only with a bias) and ``s = Σ_n δ² / N``;
  * LayerNorm / BatchNorm, as the reference code computes them from the
    layer's raw input ``x`` of shape ``(B, ...)``: ``u = Σ x / m²`` reduced
    over every axis but axis 1 (LayerNorm, ``m`` the product of the axes
    after 1) or over every axis but the feature axis (BatchNorm, the
    channel-last form of the reference's ``(0, 2, 3)`` of NCHW; ``m`` the
    spatial size), then ``h = [Σ u², len(u)] / B²`` (two numbers: the
    scale's and the bias's) and ``s = (Σ_rows δ)² / B``.

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
  ``jax.value_and_grad(fun)``. How the layers are matched and evaluated:
  ``docs/internals_adafisher.md`` in the repository.

  Args:
    fun: the loss function, ``fun(params, *args, **kwargs)``. Array arguments
      are traced (as under ``jax.jit``, also when called eagerly); other
      Python values (flags, strings) are passed as they are.
    has_aux: as in :func:`jax.value_and_grad`.
    axis_name: a mapped axis (``pmap`` / ``shard_map`` data parallelism): the
      statistics are then those of the whole batch across devices (the
      device-averaged loss). Grads are returned per device, as
      ``jax.value_and_grad`` returns them. Under sharded ``jit`` leave it
      ``None``: the batch is already global.
    layers: the layer kinds to collect, a subset of ``("dense", "conv",
      "layer_norm", "batch_norm")``. ``("dense", "conv")`` leaves the
      normalisation layers to the optimizer's fallback.

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
    plan, flat_fun, p_leaves, p_tree, d_leaves, out_tree = _trace(
        fun, has_aux, params, args, kwargs, kinds)
    if not plan.sites:
      _warn_no_layers(fun)
    dtype = utils.scalar_dtype(p_leaves)
    axes = frozenset().union(*(_varying_axes(x) for x in jax.tree.leaves((p_leaves, d_leaves))))

    def with_stats(p_leaves, d_leaves, due=None):
      def inner(p_leaves, probes):
        outs, hs = plan.evaluate(plan.closed.jaxpr, plan.closed.consts,
                                 list(p_leaves) + list(d_leaves), (), probes, due)
        return outs[0], (outs[1:], hs)

      (loss, (aux, hs)), (grads, probe_grads) = jax.value_and_grad(
          inner, argnums=(0, 1), has_aux=True)(p_leaves, plan.probes(dtype, axes))
      stats = plan.finish(hs, probe_grads, axis_name, p_tree)
      return loss, aux, grads, stats

    if stats_due is True:
      loss, aux, grads, stats = with_stats(p_leaves, d_leaves)
    elif stats_due is False:
      (loss, aux), grads = jax.value_and_grad(flat_fun, has_aux=True)(p_leaves, d_leaves)
      aux = jax.tree.leaves(aux)
      stats = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                           jax.eval_shape(with_stats, p_leaves, d_leaves)[3])
    else:
      loss, aux, grads, stats = with_stats(p_leaves, d_leaves, jnp.asarray(stats_due, bool))
    grads = jax.tree.unflatten(p_tree, grads)
    if has_aux:
      _, aux = jax.tree.unflatten(out_tree, [loss] + list(aux))
      value = (loss, aux)
    else:
      value = loss
    return value, grads, {"value": loss, "stats": stats}

  return wrapped


def _warn_no_layers(fun):
  import warnings  # pylint: disable=g-import-not-at-top
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
  :class:`LayerLayout` and the number of calls, or the reason it has none
  (those leaves use the optimizer's fallback).

  Examples:
    >>> import jax.numpy as jnp, optax_soaa
    >>> def loss_fn(params, tokens):
    ...   x = params["embed"][tokens]  # An embedding lookup.
    ...   mean = x.mean(-1, keepdims=True)  # A LayerNorm, written out.
    ...   x = (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True)
    ...                             + 1e-6)
    ...   x = x * params["scale"] + params["bias"]
    ...   return jnp.mean((x @ params["w"]) ** 2)  # A dense layer.
    >>> params = {"embed": jnp.ones((10, 8)), "scale": jnp.ones(8),
    ...           "bias": jnp.zeros(8), "w": jnp.ones((8, 2))}
    >>> print(optax_soaa.describe_stats(loss_fn, params, jnp.zeros((2, 3), int)))
    ... # doctest: +NORMALIZE_WHITESPACE
    ['bias']   (8,)             layer_norm bias: in () out (0,), 1 call
    ['embed']  (10, 8)          fallback: used by gather (an embedding lookup or a slice): no layer statistics
    ['scale']  (8,)             layer_norm scale: in () out (0,), 1 call
    ['w']      (8, 2)           dense kernel: in (0,) out (1,), 1 call
    3 of 4 leaves have statistics.
  """
  kinds = _check_layers(layers)
  plan, *_ = _trace(fun, has_aux, params, args, kwargs, kinds)
  info = plan.leaf_info()
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  width = max([len(p) for p in paths] + [4])
  lines = []
  for i, path in enumerate(paths):
    shape = plan.leaf_shapes[i]
    if i in info:
      kind, part, layout, calls = info[i]
      if kind in NORM_KINDS:
        part = "scale" if part == "kernel" else part
      what = (f"{kind} {part}: in {layout.in_axes} out {layout.out_axes}"
              + (f" stack {layout.stack_axes}" if layout.stack_axes else "")
              + f", {calls} call{'s' if calls != 1 else ''}")
    else:
      what = "fallback: " + plan.why_not(i)
    lines.append(f"{path:<{width}}  {str(shape):<16} {what}")
  n = len(info)
  lines.append(f"{n} of {len(paths)} leaves have statistics.")
  return "\n".join(lines)


def stats_layouts(fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any) -> Any:
  """The :class:`LayerLayout` of each leaf of ``fn``'s statistics.

  ``fn`` is a function made by :func:`value_grad_and_stats` (or a Flax
  wrapper of it); it is traced with ``jax.eval_shape`` (nothing is
  computed). Pass the result as ``layouts=`` to :func:`optax_soaa.adafisher`
  when kernels are not laid out ``(..., in, out)`` (Equinox's ``(out, in)``,
  convolutions ``(out, in, kh, kw)``, ``DenseGeneral`` with several output
  axes, stacked layers).
  """
  out = jax.eval_shape(fn, params, *args, **kwargs)
  stats = out[2]["stats"] if isinstance(out[2], dict) and "stats" in out[2] else out[2]
  return jax.tree.map(
      lambda st: None if st is None else st.layout(0), stats, is_leaf=is_stats_leaf)
