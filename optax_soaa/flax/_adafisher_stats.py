"""AdaFisher layer statistics for Flax models: thin wrappers of the core collector.

Both go through :func:`optax_soaa.value_grad_and_stats`, which finds the
layers in the loss function's jaxpr (Dense, DenseGeneral, Einsum, Conv, Embed,
added position tables, LayerNorm, GroupNorm, RMSNorm, BatchNorm, in any module
nesting, ``nn.scan``/``nn.remat`` included);
nothing is intercepted or patched. They keep the ``(value, grads, stats)``
return of the earlier Flax helpers.
"""

from typing import Any, Callable, Optional, Sequence

from flax import nnx
import jax

from optax_soaa._src import layer_stats


def value_grad_and_stats(
    fun: Callable[..., Any],
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    *,
    layers: Sequence[str] = layer_stats.LAYER_KINDS,
) -> Callable[..., tuple[Any, Any, Any]]:
  """:func:`optax_soaa.value_grad_and_stats`, returning ``(value, grads, stats)``.

  ``fun(params, *args, **kwargs)`` computes a scalar loss, typically calling
  a Linen module's ``.apply({"params": params}, ...)``. Statistics,
  ``axis_name``, ``layers`` and the ``stats_due=`` keyword of the returned
  function are those of :func:`optax_soaa.value_grad_and_stats`.

  Args:
    fun: the loss function, ``fun(params, *args, **kwargs)``.
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    axis_name: a mapped axis over which the statistics are those of the
      whole batch (``pmap`` / ``shard_map``); None otherwise.
    layers: the layer kinds to collect (all by default).

  Returns:
    ``f(params, *args, stats_due=True, **kwargs) -> (value, grads, stats)``;
    pass ``stats`` as ``tx.update(grads, state, params, stats=stats)``.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax_soaa
    >>> import optax_soaa.flax
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(1)])
    >>> x = jnp.ones((8, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> loss_fn = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
    >>> loss, grads, stats = optax_soaa.flax.value_grad_and_stats(loss_fn)(params, x)
    >>> stats["layers_0"]["kernel"].kind
    'dense'
  """
  collect = layer_stats.value_grad_and_stats(fun, has_aux, axis_name, layers=layers)

  def wrapped(params, *args, **kwargs):
    value, grads, extras = collect(params, *args, **kwargs)
    return value, grads, extras["stats"]

  return wrapped


def nnx_value_grad_and_stats(
    fun: Callable[..., Any],
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    *,
    layers: Sequence[str] = layer_stats.LAYER_KINDS,
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like ``nnx.value_and_grad(fun, has_aux)``, plus AdaFisher's statistics.

  ``fun(model, *args, **kwargs)`` computes a scalar loss from an NNX model.
  The model is split into its ``nnx.Param`` s and the rest
  (``nnx.split``), and the loss of the merged model goes through
  :func:`optax_soaa.value_grad_and_stats` w.r.t. the params; the model's
  other state (BatchNorm statistics, RNG counters) is updated in place, as
  ``nnx.value_and_grad`` does. Statistics, ``axis_name`` and ``layers`` are
  those of :func:`optax_soaa.value_grad_and_stats`.

  Returns:
    ``f(model, *args, stats_due=True, **kwargs) -> (value, grads, stats)``;
    ``grads`` as ``nnx.value_and_grad`` returns them (an ``nnx.State`` of the
    ``nnx.Param`` s), and ``stats`` an ``nnx.State`` with the structure of
    ``nnx.as_pure(grads)`` holding :class:`optax_soaa.LayerStats` or
    ``None``, ready for ``optimizer.update(model, grads, stats=stats)``.

  Args:
    fun: the loss function, ``fun(model, *args, **kwargs)``.
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    axis_name: a mapped axis over which the statistics are those of the
      whole batch (``pmap`` / ``shard_map``); None otherwise.
    layers: the layer kinds to collect (all by default).

  Examples:
    >>> from flax import nnx
    >>> import jax.numpy as jnp, optax_soaa
    >>> import optax_soaa.flax
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    >>> f = optax_soaa.flax.nnx_value_grad_and_stats(loss_fn)
    >>> loss, grads, stats = f(model, jnp.ones((4, 3)))
    >>> stats["kernel"].s.shape
    (2,)
  """

  def wrapped(model, *args, stats_due=True, **kwargs):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, *args, **kwargs):
      merged = nnx.merge(graphdef, params, rest)
      out = fun(merged, *args, **kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, nnx.as_pure(nnx.state(merged, nnx.Not(nnx.Param))))

    collect = layer_stats.value_grad_and_stats(
        loss, has_aux=True, axis_name=axis_name, layers=layers)
    (loss_value, (aux, new_rest)), pure_grads, extras = collect(
        nnx.as_pure(params), nnx.as_pure(rest), *args, stats_due=stats_due, **kwargs)
    nnx.update(model, new_rest)
    grads = jax.tree.map(lambda v, g: v.replace(g), params, pure_grads,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    value = (loss_value, aux) if has_aux else loss_value
    return value, grads, extras["stats"]

  return wrapped
