"""AdaFisher's per-layer statistics, found from the jaxpr of any loss function.

The collector is a pipeline, one module a stage:

* ``types``: the public records (:class:`LayerStats`, :class:`LayerLayout`)
  and the layer kinds, all the optimizers import;
* ``views``: how a value derived from a params leaf maps onto the leaf's
  axes (symbolic layouts through reshapes, transposes, broadcasts);
* ``graph``: the jaxpr flattened across calls, scans and remat;
* ``sites``: the record matching hands to evaluation, and the matching
  context; ``linear``: what dense, conv and embedding layers share;
* ``match_dense``, ``match_conv``, ``match_embed``, ``match_norm``: one
  matcher per layer kind, registered in ``matchers`` by primitive;
* ``taps``: the custom-VJP probe that captures output-gradient statistics;
* ``plan``: evaluation with taps, and each leaf's statistics from its calls;
* ``api``: :func:`value_grad_and_stats`, :func:`describe_stats`,
  :func:`stats_layouts`.

The design is learned from kfac-jax (tags, graph matcher, tracer); the API
here is one function and no registration.
"""

from optax_soaa._src.layer_stats.api import describe_stats
from optax_soaa._src.layer_stats.api import stats_layouts
from optax_soaa._src.layer_stats.api import value_grad_and_stats
from optax_soaa._src.layer_stats.types import default_layout
from optax_soaa._src.layer_stats.types import is_stats_leaf
from optax_soaa._src.layer_stats.types import LAYER_KINDS
from optax_soaa._src.layer_stats.types import LayerLayout
from optax_soaa._src.layer_stats.types import LayerStats
from optax_soaa._src.layer_stats.types import NORM_KINDS
from optax_soaa._src.layer_stats.types import StatsFallbackWarning
