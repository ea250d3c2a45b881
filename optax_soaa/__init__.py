"""optax_soaa: curvature-aware, trust-region optimizers for optax.

Each optimizer is an :class:`optax.GradientTransformationExtraArgs` with a
NamedTuple state. The core imports no Flax; Flax helpers live in
:mod:`optax_soaa.flax`.
"""

from optax_soaa._src.adafisher import adafisher
from optax_soaa._src.adafisher import AdaFisherState
from optax_soaa._src.adafisher import adafisherw
from optax_soaa._src.adafisher import LayerStats
from optax_soaa._src.adafisher import scale_by_adafisher
from optax_soaa._src.arturo import arturo
from optax_soaa._src.arturo import ArturoState
from optax_soaa._src.arturo import scale_by_arturo
from optax_soaa._src.soaa import MissingValueWarning
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
    "LayerStats",
    "scale_by_adafisher",
    "arturo",
    "ArturoState",
    "scale_by_arturo",
    "MissingValueWarning",
    "scale_by_soaa",
    "soaa",
    "SOAAState",
    "state_partition_specs",
    "state_shardings",
)
