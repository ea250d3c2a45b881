"""What matching hands to evaluation: one :class:`Site` per layer call, and
the :class:`Matching` context every matcher reads and writes."""

import collections
import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from optax_soaa._src.layer_stats.graph import Graph
from optax_soaa._src.layer_stats.graph import Rec
from optax_soaa._src.layer_stats.views import apply_layout_op
from optax_soaa._src.layer_stats.views import LAYOUT_PRIMITIVES
from optax_soaa._src.layer_stats.views import PView
from optax_soaa._src.layer_stats.views import source_view


def global_batch(h, s, axis_name):
  """A linear layer's statistics of the whole batch across the devices of
  `axis_name` (None: unchanged): means of the per-device ones, ``s`` also
  divided by ``n_devices²`` since δ of the device-averaged loss is
  ``δ_local / n_devices``."""
  if axis_name is None:
    return h, s
  n_dev = jax.lax.psum(1, axis_name)
  return (jax.lax.pmean(h, axis_name),
          jax.lax.pmean(s, axis_name) / (n_dev * n_dev))


def acc_dtype(x) -> jnp.dtype:
  """The dtype statistics are accumulated in: float32 or wider."""
  return jnp.promote_types(x.dtype, jnp.float32)


@dataclasses.dataclass
class Site:
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
  tap_spec: tuple  # static: ("mean_sq" or "sum", output dims); see taps
  probe_shape: tuple[int, ...]  # per iteration
  levels: tuple[tuple[int, bool], ...]  # per enclosing scan: (length, stacked)
  # (h, s, axis_name) with leading level dims -> {leaf: (part, layout, h, s)}
  # averaged over the repeated levels, in the leaf's layout.
  post: Callable
  leaves: dict  # leaf -> (part, LayerLayout)

  @property
  def calls(self) -> int:
    return math.prod(n for n, stacked in self.levels if not stacked)


class Matching:
  """The state of matching one graph: the sites found so far, why leaves got
  none, and which equations a layer already claimed (a bias add, a norm's
  multiply), with the helpers every matcher shares."""

  def __init__(self, graph: Graph, kinds: Sequence[str]):
    self.g = graph
    self.kinds = tuple(kinds)
    self.sites: list[Site] = []
    self.reasons = collections.defaultdict(list)  # leaf -> why not
    self.claimed: set = set()  # paths of equations already part of a layer

  def wants(self, kind: str) -> bool:
    return kind in self.kinds

  def levels(self, rec: Rec, pv: PView):
    """Per scan enclosing `rec`: (length, whether it slices `pv`'s leaf)."""
    stacked = {p for p, _ in pv.scans}
    return tuple((self.g.scan_lengths[p], p in stacked) for p in rec.scans)

  def follow_layout(self, rec: Rec, view, max_depth=6):
    """(record, operand index, view) of the non-layout consumers of `rec`'s
    output reached through layout-only equations."""
    out = []
    frontier = [(self.g.node(rec.path[:-1], rec.eqn.outvars[0]), view, 0)]
    while frontier:
      node, view, depth = frontier.pop()
      for c_rec, k in self.g.consumers.get(node, ()):
        eqn = c_rec.eqn
        if eqn.primitive.name in LAYOUT_PRIMITIVES and depth < max_depth:
          new = apply_layout_op(eqn, view)
          if new is not None:
            frontier.append((self.g.node(c_rec.path[:-1], eqn.outvars[0]), new, depth + 1))
            continue
        out.append((c_rec, k, view))
    return out

  def reject(self, rec: Rec, leaf: int, reason: str):
    """Records why a layer gets no statistics, for its kernel and its bias."""
    self.reasons[leaf].append(reason)
    y_shape = tuple(rec.eqn.outvars[0].aval.shape)
    for add_rec, k, _ in self.follow_layout(rec, source_view("y", y_shape)):
      if add_rec.eqn.primitive.name == "add":
        bv = self.g.view(add_rec.path[:-1], add_rec.eqn.invars[1 - k])
        if bv is not None:
          self.reasons[bv.leaf].append(f"the bias of a layer without statistics ({reason})")
