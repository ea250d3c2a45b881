"""The loss function's jaxpr flattened into one graph, with params provenance.

Calls (``jit``, ``closed_call``, ``custom_jvp_call``) and remat are made
transparent by aliasing their inner variables to the outer ones; ``lax.scan``
bodies are walked with their consts aliased and their ``xs`` seen one slice
per iteration. Every value that is a params leaf after layout-only primitives
keeps its :class:`PView`.
"""

import collections
from typing import Any, NamedTuple, Optional

import jax.extend.core as jex_core

from optax_soaa._src.layer_stats.views import apply_layout_op
from optax_soaa._src.layer_stats.views import LAYOUT_PRIMITIVES
from optax_soaa._src.layer_stats.views import PView
from optax_soaa._src.layer_stats.views import source_view

# Calls whose body is evaluated in place (its semantics do not depend on the
# call boundary); remat keeps its semantics through jax.checkpoint.
INLINE_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call"})
REMAT = frozenset({"remat2", "checkpoint", "remat"})
# Layers inside these get no statistics (reported): a custom VJP is the
# user's word on the gradient, and cond/while do not take every branch/step.
OPAQUE = {
    "custom_vjp_call": "inside a jax.custom_vjp function (its own gradient rule)",
    "custom_vjp_call_jaxpr": "inside a jax.custom_vjp function (its own gradient rule)",
    "cond": "inside lax.cond / lax.switch",
    "while": "inside lax.while_loop / fori_loop",
}


def call_jaxpr(eqn):
  """(jaxpr, consts) of an inlinable call or remat equation."""
  params = eqn.params
  for key in ("jaxpr", "call_jaxpr"):
    if key in params:
      j = params[key]
      if isinstance(j, jex_core.ClosedJaxpr):
        return j.jaxpr, list(j.consts)
      return j, []
  raise TypeError(f"no jaxpr in {eqn.primitive.name}")


class Rec(NamedTuple):
  """One equation of the (nested) jaxpr, with where it sits."""

  path: tuple[int, ...]
  eqn: Any
  scans: tuple[tuple[int, ...], ...]  # paths of the enclosing scans, outer first


def is_var(x) -> bool:
  return isinstance(x, jex_core.Var)


class Graph:
  """The jaxpr flattened across call boundaries, with params provenance."""

  def __init__(self, jaxpr, n_params: int, leaf_shapes):
    self.canon: dict = {}
    self.producer: dict = {}
    self.consumers = collections.defaultdict(list)
    self.views: dict = {}
    self.recs: list[Rec] = []
    self.blocked = collections.defaultdict(list)  # leaf -> reasons
    self.uses = collections.defaultdict(list)  # leaf -> [primitive names]
    self.leaf_shapes = leaf_shapes
    self.scan_lengths: dict = {}
    for i, v in enumerate(jaxpr.invars[:n_params]):
      self.views[self.node((), v)] = PView(
          i, source_view(i, tuple(v.aval.shape)), ())
    self._walk(jaxpr, (), ())

  def node(self, ctx, v):
    if not is_var(v):
      return None
    key = (ctx, v)
    while key in self.canon:
      key = self.canon[key]
    return key

  def view(self, ctx, v) -> Optional[PView]:
    n = self.node(ctx, v)
    return None if n is None else self.views.get(n)

  def _walk(self, jaxpr, ctx, scans):
    for i, eqn in enumerate(jaxpr.eqns):
      path = ctx + (i,)
      rec = Rec(path, eqn, scans)
      self.recs.append(rec)
      in_nodes = [self.node(ctx, v) for v in eqn.invars]
      for k, n in enumerate(in_nodes):
        if n is not None:
          self.consumers[n].append((rec, k))
      name = eqn.primitive.name
      in_views = [self.views.get(n) if n is not None else None for n in in_nodes]
      if name in INLINE_CALLS or name in REMAT:
        sub, _ = call_jaxpr(eqn)
        offset = len(sub.invars) - len(eqn.invars)
        for k, n in enumerate(in_nodes):
          if n is not None and k + offset >= 0:
            self.canon[(path, sub.invars[k + offset])] = n
        self._walk(sub, path, scans)
        for o, inner in zip(eqn.outvars, sub.outvars):
          n = self.node(path, inner)
          if n is not None and is_var(o):
            self.canon[(ctx, o)] = n
        continue
      if name == "scan":
        self._walk_scan(eqn, path, ctx, scans, in_nodes, in_views)
      for o in eqn.outvars:
        if is_var(o):
          self.producer[self.node(ctx, o)] = rec
      if name in LAYOUT_PRIMITIVES and in_views and in_views[0] is not None:
        pv = in_views[0]
        new = apply_layout_op(eqn, pv.axes)
        if new is not None:
          self.views[self.node(ctx, eqn.outvars[0])] = pv._replace(axes=new)
          continue
      for pv in in_views:
        if pv is not None:
          self.uses[pv.leaf].append(name)
          if name in OPAQUE:
            self.blocked[pv.leaf].append(OPAQUE[name])

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
        self.views[(path, v)] = PView(
            pv.leaf, pv.axes[1:], pv.scans + ((path, pv.axes[0]),))
    self._walk(body, path, scans + (path,))
