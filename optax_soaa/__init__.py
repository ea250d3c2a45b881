"""optax_soaa: curvature-aware, trust-region optimizers for optax.

Each optimizer is an :class:`optax.GradientTransformationExtraArgs` with a
NamedTuple state. The core imports no Flax; Flax helpers live in
:mod:`optax_soaa.flax`.
"""

from optax_soaa._src.adafisher import adafisher
from optax_soaa._src.adafisher import AdaFisherState
from optax_soaa._src.adafisher import adafisherw
from optax_soaa._src.adafisher import scale_by_adafisher
from optax_soaa._src.adafisher import stats_due
from optax_soaa._src.arturo import arturo
from optax_soaa._src.arturo import ArturoState
from optax_soaa._src.arturo import scale_by_arturo
from optax_soaa._src.soaa import MissingValueWarning
from optax_soaa._src.layer_stats import describe_stats
from optax_soaa._src.layer_stats import LayerLayout
from optax_soaa._src.layer_stats import LayerStats
from optax_soaa._src.layer_stats import stats_layouts
from optax_soaa._src.layer_stats import StatsFallbackWarning
from optax_soaa._src.layer_stats import value_grad_and_stats
from optax_soaa._src.soaa import scale_by_soaa
from optax_soaa._src.soaa import soaa
from optax_soaa._src.soaa import SOAAState
from optax_soaa._src.sharding import state_partition_specs
from optax_soaa._src.sharding import state_shardings

__version__ = "0.1.0"

__all__ = (
    "adafisher",
    "AdaFisherState",
    "adafisherw",
    "scale_by_adafisher",
    "stats_due",
    "arturo",
    "ArturoState",
    "scale_by_arturo",
    "MissingValueWarning",
    "describe_stats",
    "LayerLayout",
    "LayerStats",
    "stats_layouts",
    "StatsFallbackWarning",
    "value_grad_and_stats",
    "scale_by_soaa",
    "soaa",
    "SOAAState",
    "state_partition_specs",
    "state_shardings",
)
