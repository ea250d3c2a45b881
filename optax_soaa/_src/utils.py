"""Helpers shared by the optimizers: hyperparameter and pytree checks."""

import numbers
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def concrete_float(value: Any) -> Optional[float]:
  """Returns `value` as a Python float when it is concrete, else None.

  `optax.inject_hyperparams` calls the optimizer factory again with arrays that
  may be tracers; those cannot (and need not) be validated again.
  """
  if isinstance(value, bool):
    return float(value)
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
    return float(value)
  if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
    if value.ndim == 0:
      return float(value)
  return None


def real_hyperparams(**hyperparams: Any) -> tuple[Any, ...]:
  """The hyperparameters, in order, with complex arrays made real.

  `optax.inject_hyperparams` casts float hyperparameters to the params'
  dtype, complex for complex params; the optimizers' hyperparameters are
  real. A concrete complex value with a nonzero imaginary part raises
  `ValueError` naming it; anything else (floats, schedules) passes as is.
  """
  out = []
  for name, value in hyperparams.items():
    if hasattr(value, "dtype") and jnp.issubdtype(value.dtype,
                                                  jnp.complexfloating):
      if not isinstance(value, jax.core.Tracer) and np.any(np.imag(value)):
        raise ValueError(f"`{name}` must be real, got {value!r}.")
      value = jnp.real(value)
    out.append(value)
  return tuple(out)


def check_range(
    name: str,
    value: Any,
    *,
    lower: Optional[float] = None,
    upper: Optional[float] = None,
    lower_inclusive: bool = True,
    upper_inclusive: bool = True,
) -> None:
  """Raises `ValueError` naming `name` if a concrete `value` is out of range."""
  x = concrete_float(value)
  if x is None:
    if callable(value) or isinstance(value, (str, bytes)):
      raise ValueError(f"`{name}` must be a number, got {value!r}.")
    return
  ok = not np.isnan(x)
  if lower is not None:
    ok = ok and (x >= lower if lower_inclusive else x > lower)
  if upper is not None:
    ok = ok and (x <= upper if upper_inclusive else x < upper)
  if not ok:
    lo = "(-inf" if lower is None else ("[" if lower_inclusive else "(") + f"{lower:g}"
    hi = "inf)" if upper is None else f"{upper:g}" + ("]" if upper_inclusive else ")")
    raise ValueError(f"`{name}` must be in {lo}, {hi}; got {value!r}.")


def check_positive_int(name: str, value: Any, *, static: bool = False) -> None:
  """Raises `ValueError` unless `value` is an integer > 0.

  A hyperparameter that only enters the arithmetic may also be a 0-d integer
  array, as `optax.inject_hyperparams` passes it; a traced one is not
  checked (it was, as a Python number, when the optimizer was built). A
  `static` one chooses the structure of the computation and must be a
  Python integer: an array there gets a message saying so.
  """
  if isinstance(value, (jax.Array, np.ndarray, np.generic)) and not isinstance(
      value, bool) and not isinstance(value, numbers.Integral):
    if static:
      raise ValueError(
          f"`{name}` is static (it shapes the computation) and must be a "
          f"Python int, got {value!r}; with optax.inject_hyperparams, list "
          f"it in static_args=({name!r},).")
    if not jnp.issubdtype(value.dtype, jnp.integer) or np.ndim(value) != 0:
      raise ValueError(
          f"`{name}` must be a positive int (or a 0-d integer array), got "
          f"{value!r}.")
    if isinstance(value, jax.core.Tracer):
      return
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, (numbers.Integral,)):
    raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
  if value <= 0:
    raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def check_schedule_or_nonneg(
    name: str, value: optax.ScalarOrSchedule, *, positive: bool = False
) -> None:
  """Validates a constant step size; a schedule (callable) is accepted as is."""
  if callable(value):
    return
  check_range(name, value, lower=0.0, lower_inclusive=not positive)


def canonicalize_dtype(dtype: Optional[Any]) -> Optional[jnp.dtype]:
  """`jax.dtypes.canonicalize_dtype` of a dtype option; None stays None."""
  return None if dtype is None else jax.dtypes.canonicalize_dtype(dtype)


def as_schedule(value: optax.ScalarOrSchedule) -> Callable[[jax.Array], Any]:
  """Turns a constant or a schedule into a function of the step count."""
  if callable(value):
    return value
  return lambda count: value


def real_dtype(dtype: Any) -> jnp.dtype:
  """The dtype of the real and imaginary parts of a complex dtype; other
  dtypes unchanged (complex64 -> float32, complex128 -> float64)."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.dtype(jnp.finfo(dtype).dtype)
  return dtype


def abs_sq(x: jax.Array) -> jax.Array:
  """``|x|²``, real: ``x²`` for real ``x``, ``Re(x)² + Im(x)²`` for complex."""
  if jnp.iscomplexobj(x):
    return jnp.square(x.real) + jnp.square(x.imag)
  return jnp.square(x)


def real_dot(x: jax.Array, y: jax.Array) -> jax.Array:
  """``Re(conj(x) y)`` elementwise: the real inner product of complex numbers
  as pairs (Re, Im); ``x y`` for real arrays."""
  if jnp.iscomplexobj(x) or jnp.iscomplexobj(y):
    x, y = jnp.asarray(x), jnp.asarray(y)
    return x.real * y.real + x.imag * y.imag
  return x * y


def real_zeros_like(tree: Any, dtype: Optional[Any] = None) -> Any:
  """Zeros like each leaf, in `dtype` (or the leaf's) made real: the state of
  squared magnitudes, real for complex leaves too."""
  return jax.tree.map(
      lambda x: jnp.zeros_like(x, real_dtype(
          _dtype_of(x) if dtype is None else dtype)), tree)


def _dtype_of(x: Any) -> jnp.dtype:
  return x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype


def check_moment_dtype(name: str, dtype: Optional[Any], tree: Any) -> None:
  """Raises `TypeError` when a real `dtype` option would hold a first moment
  of complex leaves (it would drop their imaginary parts)."""
  if dtype is None or jnp.issubdtype(dtype, jnp.complexfloating):
    return
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if jnp.issubdtype(_dtype_of(x), jnp.complexfloating):
      raise TypeError(
          f"`{name}`={jnp.dtype(dtype).name} is real and cannot hold the "
          f"first moment of the complex parameter "
          f"{jax.tree_util.keystr(path)} ({_dtype_of(x)}); pass a complex "
          "dtype or None.")


def check_real_dtype(name: str, dtype: Optional[Any]) -> None:
  """Raises `TypeError` for a complex `dtype` option of a state of squared
  magnitudes (|g|², real for complex parameters too)."""
  if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(
        f"`{name}`={jnp.dtype(dtype).name} is complex, but the state it sets "
        f"holds squared magnitudes |g|², which are real: pass "
        f"{real_dtype(dtype).name} (or None, the parameters' real dtype).")


def scalar_dtype(tree: Any) -> jnp.dtype:
  """float32, or the widest floating dtype among the leaves where wider.

  The optimizers' global statistics (dt, eta, sums) use this dtype so that a
  bfloat16 model still accumulates its trust region in float32, and an x64
  run stays exact against a float64 reference. A complex leaf counts as its
  real dtype (the statistics are real).
  """
  dtype = jnp.dtype(jnp.float32)
  for leaf in jax.tree.leaves(tree):
    leaf_dtype = real_dtype(_dtype_of(leaf))
    if jnp.issubdtype(leaf_dtype, jnp.floating) and (
        jnp.finfo(leaf_dtype).bits > jnp.finfo(dtype).bits
    ):
      dtype = jnp.dtype(leaf_dtype)
  return dtype


def check_tree_structures_match(
    name_a: str, tree_a: Any, name_b: str, tree_b: Any
) -> None:
  """Raises `ValueError` (at trace time) when two pytrees differ in structure."""
  struct_a = jax.tree.structure(tree_a)
  struct_b = jax.tree.structure(tree_b)
  if struct_a != struct_b:
    raise ValueError(
        f"`{name_a}` and `{name_b}` must have the same pytree structure; got\n"
        f"  {name_a}: {struct_a}\n  {name_b}: {struct_b}"
    )


def check_trees_match(name_a: str, tree_a: Any, name_b: str, tree_b: Any) -> None:
  """Raises `ValueError` (at trace time) unless two pytrees have the same
  structure and leaf shapes; the message names the first differing leaf."""
  check_tree_structures_match(name_a, tree_a, name_b, tree_b)
  paths_a = jax.tree_util.tree_leaves_with_path(tree_a)
  for (path, a), b in zip(paths_a, jax.tree.leaves(tree_b)):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(
          f"`{name_a}` and `{name_b}` must have the same leaf shapes; at "
          f"{jax.tree_util.keystr(path)} got {name_a}: {jnp.shape(a)}, "
          f"{name_b}: {jnp.shape(b)}."
      )


def min_max(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """AdaFisher's normalisation along the last axis (the reference's
  ``MinMaxNormalization``): +inf → 1, -inf → 0, then ``(x - min) / (max -
  min + eps)``."""
  x = jnp.where(x == jnp.inf, jnp.ones_like(x), x)
  x = jnp.where(x == -jnp.inf, jnp.zeros_like(x), x)
  lo = jnp.min(x, axis=-1, keepdims=True, initial=jnp.inf)  # initial: 0-size layers
  return (x - lo) / (jnp.max(x, axis=-1, keepdims=True, initial=-jnp.inf) - lo + eps)
