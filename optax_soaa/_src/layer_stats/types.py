"""The public types of the collector: what the optimizers import."""

import dataclasses
from typing import Any, NamedTuple, Optional

import jax

# The layer kinds the collector recognises (``layers=`` selects among them).
LAYER_KINDS = ("dense", "conv", "embedding", "layer_norm", "group_norm",
               "rms_norm", "batch_norm")
NORM_KINDS = ("layer_norm", "group_norm", "rms_norm", "batch_norm")


class StatsFallbackWarning(UserWarning):
  """AdaFisher is stepping parameter leaves that have no layer statistics.

  Raised at trace time by :func:`optax_soaa.adafisher` (and ``adafisherw``,
  ``scale_by_adafisher``) when leaves get no :class:`LayerStats` while the
  fallback was left at its default: with ``F̃ = 1`` such a leaf steps about
  ``1 / damping`` (1000) times less than the leaves with statistics, so it
  practically does not train. Pass ``fallback="adam"`` (Adam's step for those
  leaves) or ``fallback="identity"`` (the reference's ``F̃ = 1``, on purpose)
  to choose, which also silences it; :func:`optax_soaa.describe_stats` says
  why each leaf has no statistics. Filter it like any warning::

    warnings.filterwarnings("ignore", category=optax_soaa.StatsFallbackWarning)

  Examples:
    >>> import warnings, jax.numpy as jnp, optax_soaa
    >>> def loss_fn(params, x):  # "gain" scales a value that is not normalised.
    ...   return jnp.sum((x * params["gain"]) @ params["w"])
    >>> params = {"gain": jnp.ones(3), "w": jnp.ones((3, 2))}
    >>> _, grads, extras = optax_soaa.value_grad_and_stats(loss_fn)(
    ...     params, jnp.ones((4, 3)))
    >>> opt = optax_soaa.adafisher(1e-3)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   _ = opt.update(grads, opt.init(params), params, **extras)
    >>> [w.category.__name__ for w in caught]
    ['StatsFallbackWarning']
  """


class LayerLayout(NamedTuple):
  """Which axes of a parameter leaf are inputs, outputs and stacked layers.

  Axes are positions in the leaf's shape, each tuple increasing; together
  they list every axis once. ``h`` is laid out over ``in_axes`` (flattened
  row-major), ``s`` over ``out_axes``, and both carry the ``stack_axes`` as
  leading dimensions (one layer per index: a ``lax.scan`` over stacked
  layers).

  Attributes:
    stack_axes: axes indexing stacked layers (a ``lax.scan`` over them), in
      increasing order; usually ``()``.
    in_axes: axes of the layer's inputs (contracted with the input), in
      increasing order; ``h`` runs over them.
    out_axes: axes of the layer's outputs (features), in increasing order;
      ``s`` runs over them.

  Examples:
    >>> import optax_soaa
    >>> optax_soaa.LayerLayout((), (1,), (0,))  # An (out, in) kernel.
    LayerLayout(stack_axes=(), in_axes=(1,), out_axes=(0,))
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
    ``"embedding"``, ``"layer_norm"``, ``"group_norm"``, ``"rms_norm"``,
    ``"batch_norm"``), or ``""`` when built by hand.

  Attributes:
    h: the input statistic, shape ``stack + (fan_in,)`` or ``stack +
      (fan_in + 1,)`` (the last entry for the bias); two numbers (scale,
      bias) for a normalisation layer.
    s: the output-gradient statistic, shape ``stack + (fan_out,)``.
    part: ``"kernel"`` (or a normalisation's scale) or ``"bias"`` (static).
    stack_axes: the leaf's stacked-layer axes, or None for the default
      layout (static).
    in_axes: the leaf's input axes, or None for the default layout (static).
    out_axes: the leaf's output axes, or None for the default layout
      (static).
    kind: the layer kind it came from, or ``""`` when built by hand
      (static).

  Examples:
    >>> import jax.numpy as jnp, optax_soaa
    >>> st = optax_soaa.LayerStats(h=jnp.ones(4), s=jnp.ones(3))  # By hand:
    >>> st.layout(2)  # a (3 in + bias, 3 out) dense kernel, default layout.
    LayerLayout(stack_axes=(), in_axes=(0,), out_axes=(1,))
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
