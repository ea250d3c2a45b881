"""The table of layer matchers, keyed by the primitive they start from.

Matching runs in phases over every equation of the graph: a phase's matchers
may claim equations (a layer's bias ``add``, a norm's ``mul``), which no
matcher sees after that. Adding a layer kind is one matcher function
``f(matching, record)`` registered here, plus its test.
"""

from typing import Callable, Sequence

from optax_soaa._src.layer_stats.graph import Graph
from optax_soaa._src.layer_stats.match_conv import match_conv
from optax_soaa._src.layer_stats.match_dense import match_dense
from optax_soaa._src.layer_stats.match_embed import match_added_table
from optax_soaa._src.layer_stats.match_embed import match_gather
from optax_soaa._src.layer_stats.match_norm import match_norm
from optax_soaa._src.layer_stats.sites import Matching

Matcher = Callable[[Matching, object], None]

# Phase by phase, {primitive name: matchers tried at each such equation}.
MATCHERS: tuple[dict[str, tuple[Matcher, ...]], ...] = (
    # Layers with a kernel; each claims the bias add that follows it.
    {
        "dot_general": (match_dense,),
        "conv_general_dilated": (match_conv,),
        "gather": (match_gather,),
    },
    # Normalisation layers' scales and biases (adds not claimed as a bias).
    {"mul": (match_norm,), "add": (match_norm,)},
    # Tables added to activations (adds claimed by neither).
    {"add": (match_added_table,)},
)


def find_sites(graph: Graph, kinds: Sequence[str]) -> Matching:
  """Every layer call site of `graph` of the requested `kinds`."""
  m = Matching(graph, kinds)
  for phase in MATCHERS:
    for rec in graph.recs:
      for matcher in phase.get(rec.eqn.primitive.name, ()):
        if rec.path not in m.claimed:  # already part of a layer
          matcher(m, rec)
  return m
