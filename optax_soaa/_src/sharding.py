"""Shardings of an optimizer's state, derived from the shardings of the params.

Under sharded ``jit`` (FSDP-style), each state leaf that mirrors a parameter
(moments, curvature, per-coordinate filters) should be laid out like that
parameter, and the global scalars (``count``, ``dt``, ``eta``) and the
per-layer statistics replicated. XLA does not infer this from
``opt.init(params)`` (a ``zeros_like`` does not depend on its input's layout),
so the layout is stated once, as ``out_shardings`` of the jitted ``init`` and of
the train step.
"""

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

PartitionSpec = jax.sharding.PartitionSpec
Sharding = jax.sharding.Sharding

_Initable = Union[Callable[[optax.Params], optax.OptState],
                  optax.GradientTransformation]


def _init_fn(optimizer: _Initable) -> Callable[[optax.Params], optax.OptState]:
  init = getattr(optimizer, "init", optimizer)
  if not callable(init):
    raise TypeError(
        "`optimizer` must be an optax GradientTransformation or an init "
        f"function, got {optimizer!r}."
    )
  return init


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
  raise TypeError(
      "every leaf of `params` must be an array or a jax.ShapeDtypeStruct, got "
      f"{type(leaf).__name__}."
  )


def _map_state_like_params(
    optimizer: _Initable,
    params: optax.Params,
    annotations: Any,
    default: Callable[[jax.ShapeDtypeStruct], Any],
) -> Any:
  """Gives each leaf of the state the annotation of the param it mirrors.

  A state leaf mirrors a param when its key path ends with the param's key
  path (``[0].mu['dense']['kernel']`` ends with ``['dense']['kernel']``) and
  the two have the same shape (or, for a complex param, its shape and a
  trailing axis of 2: arTuRO's (Re, Im) pairs); the longest such path wins.
  This finds the copies of the params inside ``chain``,
  ``inject_hyperparams``, ``masked`` (whose state trees lack the masked-out
  leaves) and ``MultiSteps`` alike.
  Every other leaf gets ``default(leaf)``.
  """
  abstract_params = jax.tree.map(_abstract, params)
  abstract_state = jax.eval_shape(_init_fn(optimizer), abstract_params)
  param_paths = jax.tree.leaves_with_path(abstract_params)
  annotation_leaves = jax.tree.leaves(
      annotations, is_leaf=lambda x: x is None or isinstance(x, PartitionSpec)
  )
  if len(annotation_leaves) != len(param_paths):
    raise ValueError(
        "the shardings must have one entry per leaf of `params`; got "
        f"{len(annotation_leaves)} for {len(param_paths)} leaves."
    )
  by_path = {
      tuple(path): (leaf.shape, annotation, jnp.iscomplexobj(leaf))
      for (path, leaf), annotation in zip(param_paths, annotation_leaves)
  }

  def mirrors(param_shape, is_complex, shape):
    # arTuRO keeps a complex param's (Re, Im) pairs in a trailing axis of 2,
    # which a spec of the param's axes leaves unsharded.
    return shape == param_shape or (
        is_complex and shape == tuple(param_shape) + (2,))

  def lookup(path, leaf):
    path = tuple(path)
    for start in range(len(path) + 1):  # Longest suffix first.
      match = by_path.get(path[start:])
      if match is not None and mirrors(match[0], match[2], leaf.shape):
        return match[1]
    return default(leaf)

  return jax.tree.map_with_path(lookup, abstract_state)


def _mesh_of(shardings: Any) -> Optional[jax.sharding.Mesh]:
  for sharding in jax.tree.leaves(shardings):
    if isinstance(sharding, jax.sharding.NamedSharding):
      return sharding.mesh
  return None


def state_shardings(
    optimizer: _Initable,
    params: optax.Params,
    shardings: Optional[Any] = None,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> optax.OptState:
  """Shardings for ``optimizer.init(params)``, derived from the params'.

  Each state leaf that mirrors a parameter (same key path suffix and shape:
  moments, curvature, arTuRO's per-coordinate filter, ...) gets that
  parameter's sharding; every other leaf (step counts, trust-region scalars,
  per-layer statistics) is replicated over ``mesh``. The result has the
  state's tree structure and can be given to ``jax.jit`` as
  ``out_shardings`` / ``in_shardings`` or to ``jax.device_put``.

  Examples:
    FSDP: each parameter's last axis split over the ``"fsdp"`` axis of a
    mesh of every device (one device here; the same code runs on many).

    >>> import jax, jax.numpy as jnp, numpy as np, optax_soaa
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    >>> param_shardings = {"w": NamedSharding(mesh, P(None, "fsdp"))}
    >>> params = jax.device_put({"w": jnp.ones((4, 8))}, param_shardings)
    >>> opt = optax_soaa.soaa(1e-3, total_steps=1000)
    >>> opt_shardings = optax_soaa.state_shardings(opt, params)
    >>> opt_shardings[0].mu["w"].spec == P(None, "fsdp")  # Laid out like w.
    True
    >>> opt_shardings[0].dt.spec == P()  # Trust-region scalars: replicated.
    True
    >>> opt_state = jax.jit(opt.init, out_shardings=opt_shardings)(params)

  Args:
    optimizer: an optax ``GradientTransformation`` (or its ``init``
      function). Its ``init`` is only traced (``jax.eval_shape``), never run.
    params: the parameters: arrays (whose ``.sharding`` is used when
      ``shardings`` is not given) or ``jax.ShapeDtypeStruct`` s.
    shardings: optional pytree like ``params`` of ``jax.sharding.Sharding``
      or ``PartitionSpec`` (the latter need ``mesh``). Defaults to each
      param's ``.sharding``.
    mesh: the mesh for replicated leaves and for ``PartitionSpec`` s. Defaults
      to the mesh of the first ``NamedSharding`` among the shardings.

  Returns:
    A pytree with the structure of the optimizer state (as
    ``optimizer.init(params)`` returns it), of ``jax.sharding.Sharding``.
  """
  if shardings is None:
    def sharding_of(leaf):
      sharding = getattr(leaf, "sharding", None)
      if sharding is None:
        raise ValueError(
            "`params` leaves carry no sharding (give `shardings=`, or params "
            "placed with jax.device_put)."
        )
      return sharding

    shardings = jax.tree.map(sharding_of, params)
  if mesh is None:
    mesh = _mesh_of(shardings)

  def to_sharding(spec):
    if isinstance(spec, Sharding):
      return spec
    if spec is None or isinstance(spec, PartitionSpec):
      if mesh is None:
        raise ValueError(
            "`mesh` is required when shardings are PartitionSpecs."
        )
      return jax.sharding.NamedSharding(
          mesh, PartitionSpec() if spec is None else spec
      )
    raise TypeError(
        "a sharding must be a jax.sharding.Sharding or PartitionSpec, got "
        f"{spec!r}."
    )

  shardings = jax.tree.map(
      to_sharding, shardings,
      is_leaf=lambda x: x is None or isinstance(x, PartitionSpec),
  )
  if mesh is not None:
    replicated = jax.sharding.NamedSharding(mesh, PartitionSpec())
  else:
    # No mesh: params on single devices (or all alike); replicate like the
    # first param is placed when that placement is fully replicated.
    first = jax.tree.leaves(shardings)
    if not first or not first[0].is_fully_replicated:
      raise ValueError(
          "cannot tell how to replicate the state's scalars: give `mesh=`."
      )
    replicated = first[0]
  return _map_state_like_params(
      optimizer, params, shardings, lambda _: replicated
  )


def state_partition_specs(
    optimizer: _Initable,
    params: optax.Params,
    specs: Any,
) -> optax.OptState:
  """``PartitionSpec`` s of ``optimizer.init(params)``'s state, from params'.

  The ``shard_map`` counterpart of :func:`state_shardings`:
  a state leaf that mirrors a parameter gets its spec, every other leaf
  ``PartitionSpec()`` (replicated). Use it for ``in_specs`` / ``out_specs``
  of a ``jax.shard_map`` train step in which the params are split and the
  optimizer is built with ``axis_name=`` naming the split axes.

  Examples:
    Each parameter's last axis split over the ``"model"`` axis of a mesh of
    every device (one device here; the same code runs on many):

    >>> import jax, jax.numpy as jnp, optax_soaa
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}
    >>> param_specs = {"w": P(None, "model"), "b": None}
    >>> opt = optax_soaa.soaa(1e-3, total_steps=1000, axis_name="model")
    >>> specs = optax_soaa.state_partition_specs(opt, params, param_specs)
    >>> specs[0].mu["w"] == P(None, "model")  # Split like w.
    True
    >>> specs[0].mu["b"] == P() and specs[0].dt == P()  # Replicated.
    True

  Args:
    optimizer: an optax ``GradientTransformation`` (or its ``init``).
    params: the *global* params (arrays or ``jax.ShapeDtypeStruct`` s).
    specs: pytree like ``params`` of ``PartitionSpec`` (``None`` means
      replicated).

  Returns:
    A pytree with the structure of the optimizer state (as
    ``optimizer.init(params)`` returns it), of ``PartitionSpec``.
  """
  specs = jax.tree.map(
      lambda s: PartitionSpec() if s is None else s, specs,
      is_leaf=lambda x: x is None or isinstance(x, PartitionSpec),
  )
  return _map_state_like_params(
      optimizer, params, specs, lambda _: PartitionSpec()
  )
