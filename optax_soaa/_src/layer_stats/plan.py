"""Evaluation: the jaxpr interpreted again with each layer's input statistic
computed and its output tapped, descending only into the calls and scans that
hold a layer; then each leaf's statistics assembled from its sites."""

import collections
import jax
from jax import lax
import jax.extend.core as jex_core
import jax.numpy as jnp

from optax_soaa._src import utils
from optax_soaa._src.layer_stats.graph import call_jaxpr
from optax_soaa._src.layer_stats.graph import Graph
from optax_soaa._src.layer_stats.graph import is_var
from optax_soaa._src.layer_stats.graph import REMAT
from optax_soaa._src.layer_stats.matchers import find_sites
from optax_soaa._src.layer_stats.taps import tap
from optax_soaa._src.layer_stats.taps import vary
from optax_soaa._src.layer_stats.taps import varying_axes
from optax_soaa._src.layer_stats.taps import zeros_like_shape
from optax_soaa._src.layer_stats.types import LayerLayout
from optax_soaa._src.layer_stats.types import LayerStats
from optax_soaa._src.layer_stats.views import LAYOUT_PRIMITIVES


def bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  manager = getattr(getattr(eqn, "ctx", None), "manager", None)
  if manager is None:
    out = eqn.primitive.bind(*invals, **params)
  else:
    with manager:
      out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


class Plan:
  """The layers of one traced loss function and how to evaluate it with taps."""

  def __init__(self, closed, n_params: int, leaf_shapes, kinds):
    self.closed = closed
    self.n_params = n_params
    self.leaf_shapes = leaf_shapes
    graph = Graph(closed.jaxpr, n_params, leaf_shapes)
    matching = find_sites(graph, kinds)
    self.reasons = matching.reasons
    self.uses = graph.uses
    self.blocked = graph.blocked
    self.primary: dict = {}  # leaf -> its (kind, part, layout)
    self.transposed: set = set()  # (site, leaf): a tied table's other use
    self.tied: set = set()  # leaves with transposed uses
    self.sites = self._consistent(matching.sites)
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
    """Sites whose leaves agree on part and layout across calls.

    A leaf's layout is that of its first lookup (an embedding table), else
    of its first call. A table also used transposed, as a bias-free kernel
    with its inputs and outputs swapped (a tied output layer, ``x @
    table.T``), keeps that use: its statistics are swapped into the table's
    layout in :meth:`finish`.
    """
    first = {}  # leaf -> (kind, part, layout, leaves of that site)
    for site in sorted(sites, key=lambda s: s.kind != "embedding"):
      for leaf, (part, layout) in site.leaves.items():
        first.setdefault(leaf, (site.kind, part, layout, len(site.leaves)))
    bad, transposed = set(), set()
    for sid, site in enumerate(sites):
      for leaf, (part, layout) in site.leaves.items():
        _, part0, layout0, n0 = first[leaf]
        if (part, layout) == (part0, layout0):
          continue
        swapped = LayerLayout(layout0.stack_axes, layout0.out_axes, layout0.in_axes)
        # The output layer may have a bias (its own leaf); the lookup may not.
        if part == part0 == "kernel" and n0 == 1 and layout == swapped:
          transposed.add((sid, leaf))
        else:
          bad.add(leaf)
    for leaf in bad:
      self.reasons[leaf].append(
          "used by several layers with different roles or layouts")
    keep = [sid for sid, s in enumerate(sites) if not bad & set(s.leaves)]
    self.primary = {leaf: v[:3] for leaf, v in first.items() if leaf not in bad}
    self.transposed = {(keep.index(sid), leaf) for sid, leaf in transposed if sid in keep}
    self.tied = {leaf for _, leaf in self.transposed}
    return [sites[sid] for sid in keep]

  def leaf_info(self) -> dict:
    """leaf -> (kind, part, layout, number of calls)."""
    calls = collections.Counter()
    for site in self.sites:
      for leaf in site.leaves:
        calls[leaf] += site.calls
    return {leaf: (*self.primary[leaf], n) for leaf, n in calls.items()}

  def probes(self, dtype, axes: frozenset) -> dict:
    return {
        sid: vary(jnp.zeros(tuple(n for n, _ in s.levels) + s.probe_shape, dtype), axes)
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
          zeros = lambda x, f=site.h_fn: zeros_like_shape(jax.eval_shape(f, x))
          hs[sid] = lax.cond(due, site.h_fn, zeros, x)
      if path in self.descend:
        outvals, inner_hs = self._descend(eqn, path, invals, probes, due)
        hs.update(inner_hs)
      else:
        outvals = bind(eqn, invals)
      for sid in self.tap_at.get(path, ()):
        probe = probes[sid]
        y = vary(outvals[0], varying_axes(probe))
        outvals[0] = tap(y, probe, due, self.sites[sid].tap_spec)
      for v, x in zip(eqn.outvars, outvals):
        if is_var(v):
          env[v] = x
    return [read(v) for v in jaxpr.outvars], hs

  def _inside(self, path, probes):
    n = len(path)
    return {sid: p for sid, p in probes.items() if self.sites[sid].tap_path[:n] == path}

  def _descend(self, eqn, path, invals, probes, due):
    name = eqn.primitive.name
    if name == "scan":
      return self._scan(eqn, path, invals, probes, due)
    sub, consts = call_jaxpr(eqn)
    if name in REMAT:
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

  def finish(self, hs, probe_grads, axis_name) -> list:
    """Each params leaf's LayerStats (or None) from the taps: its
    statistics averaged over its calls."""
    uses = collections.defaultdict(list)  # leaf -> [(calls, part, layout, h, s)]
    for sid, site in enumerate(self.sites):
      for leaf, (part, layout, h, s) in site.post(hs[sid], probe_grads[sid], axis_name).items():
        uses[leaf].append(((sid, leaf) in self.transposed, site.calls, part, layout, h, s))
    out = [None] * self.n_params
    info = self.leaf_info()
    for leaf, leaf_uses in uses.items():
      kind, part, layout, calls = info[leaf]
      fan_out = next(s.shape[-1] for t, _, _, _, _, s in leaf_uses if not t)
      h_sum = s_sum = 0
      for transposed, w, _, _, h, s in leaf_uses:
        if transposed:
          # A tied output layer in the table's layout: its output gradients
          # are per table row, its inputs per table column.
          h, s = s, h[..., :fan_out]
        if leaf in self.tied:
          # Each use min-max normalised first: neither one's scale dominates.
          h, s = utils.min_max(h), utils.min_max(s)
        h_sum, s_sum = h_sum + w * h, s_sum + w * s
      out[leaf] = LayerStats(
          h=h_sum / calls, s=s_sum / calls, part=part,
          stack_axes=layout.stack_axes, in_axes=layout.in_axes,
          out_axes=layout.out_axes, kind=kind)
    return out

  def why_not(self, leaf: int) -> str:
    """Why a leaf got no statistics."""
    if self.blocked.get(leaf):
      return self.blocked[leaf][0]
    if self.reasons.get(leaf):
      return self.reasons[leaf][0]
    uses = [u for u in self.uses.get(leaf, ()) if u not in LAYOUT_PRIMITIVES]
    if not uses:
      return "not used by a layer the collector knows (or not used by the loss)"
    return f"used by {', '.join(sorted(set(uses)))}, not by a recognised layer"
