"""Helpers shared by the optimizers: hyperparameter checks and global sums."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _concrete_float(value: Any) -> Optional[float]:
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
  x = _concrete_float(value)
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


def check_positive_int(name: str, value: Any) -> None:
  """Raises `ValueError` unless `value` is a Python/NumPy integer > 0."""
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


def as_schedule(value: optax.ScalarOrSchedule) -> Callable[[jax.Array], Any]:
  """Turns a constant or a schedule into a function of the step count."""
  if callable(value):
    return value
  return lambda count: value


def scalar_dtype(tree: Any) -> jnp.dtype:
  """float32, or the widest floating dtype among the leaves where wider.

  The optimizers' global statistics (dt, eta, sums) use this dtype so that a
  bfloat16 model still accumulates its trust region in float32, and an x64
  run stays exact against a float64 reference.
  """
  dtype = jnp.dtype(jnp.float32)
  for leaf in jax.tree.leaves(tree):
    leaf_dtype = jnp.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype
    if jnp.issubdtype(leaf_dtype, jnp.floating) and (
        jnp.finfo(leaf_dtype).bits > jnp.finfo(dtype).bits
    ):
      dtype = jnp.dtype(leaf_dtype)
  return dtype


# On the CPU backend XLA materialises the operand of a full reduction whenever
# it is more than a plain array; each such temporary is a fresh allocation the
# size of the parameters (tens of milliseconds of page faults per step at 10M
# parameters). Summing slice by slice inside a loop keeps the temporaries
# small and cache-resident. Elsewhere (GPU/TPU) reductions fuse into their
# producers, and slicing sharded arrays would force gathers.
CPU_CHUNK_SIZE = 16384


def check_chunk_size(name: str, chunk_size: Any) -> None:
  """Validates a chunk-size option: "auto", None or a positive int."""
  if chunk_size == "auto" or chunk_size is None:
    return
  check_positive_int(name, chunk_size)


def resolve_chunk_size(chunk_size: Any) -> Optional[int]:
  """The chunk size to trace with, for a `check_chunk_size`-valid option.

  Called inside `update`, at trace time: "auto" asks the backend only then,
  after `jax.distributed.initialize` and once the devices are known. It
  chunks on a single CPU device only: with several devices the leaves may be
  sharded, and slicing them would make XLA gather them whole.
  """
  if chunk_size == "auto":
    if jax.default_backend() == "cpu" and jax.device_count() == 1:
      return CPU_CHUNK_SIZE
    return None
  return None if chunk_size is None else int(chunk_size)


def _even_chunk(size, chunk):
  """A slice length within [chunk/2, 3 chunk/2] that divides `size`.

  A shorter last slice is handled outside the loop, where XLA resolves the
  filter's cross-reads by copying whole state arrays: avoid it when such a
  divisor exists (else `chunk`, with its last slice).
  """
  lo = -(-2 * size // (3 * chunk))
  for count in range(max(1, lo), 2 * size // chunk + 1):
    if size % count == 0:
      return size // count
  return chunk


def chunked_pass(fn, inputs, states, chunk, *, divide_evenly=True,
                 total_axis=None, read_back=None):
  """One pass over memory: `fn(*inputs, *states) -> (new_states, total)`.

  `fn` is elementwise in its array arguments and `total` is a sum over them
  (any fixed shape). Over a leaf larger than `chunk` the pass runs slice by
  slice in a loop: `new_states` are written over `states` in place and the
  slices' totals are added up. On the CPU backend XLA materialises every
  subexpression shared by several outputs, and the operand of a reduction,
  as a parameter-sized temporary, each costing more than a pass over memory;
  slices of `chunk` elements keep them cache-sized. With `divide_evenly`
  the slice length is adjusted to divide the leaf where possible.

  With `total_axis` (an int), `fn` returns its terms *unsummed* along that
  axis, which runs over the slice's elements: the loop adds them up
  elementwise in a slice-long accumulator and sums it once at the end. On
  the CPU a reduction inside the loop is a separate kernel call per slice,
  whose fixed cost, not the arithmetic, dominated SOAA's predicted-reduction
  sum (at 10M parameters about 7.6 ms per step summed per slice, about half
  that accumulated).

  With `read_back`, a function of the same arguments as `fn`, the terms come
  from `read_back(*input_slices, *new_state_slices)`, the new states' slices
  read back from the arrays they were just written into (`fn`'s own total is
  ignored). Terms of the new states must be formed so: computed inside `fn`,
  the accumulating fusion re-reads the old slices of arrays written in place
  and XLA copies whole state arrays on every slice (arTuRO's filter pass ran
  seven times slower that way).
  """
  size = (states or inputs)[0].size
  finish = lambda t: t if total_axis is None else jnp.sum(t, axis=total_axis)
  if chunk is None or size <= chunk:
    new, total = fn(*inputs, *states)
    if read_back is not None:
      total = read_back(*inputs, *new)
    return tuple(new), finish(total)
  shape = states[0].shape if states else None
  if divide_evenly:
    chunk = _even_chunk(size, chunk)
  flat_in = [x.reshape(-1) for x in inputs]
  flat_st = tuple(x.reshape(-1) for x in states)

  def apply(start, length, carry, add=lambda total, part: total + part):
    flat_st, total = carry
    part = lambda x: jax.lax.dynamic_slice_in_dim(x, start, length)
    new, part_total = fn(*[part(x) for x in flat_in],
                         *[part(x) for x in flat_st])
    flat_st = tuple(
        jax.lax.dynamic_update_slice_in_dim(x, n.astype(x.dtype), start, 0)
        for x, n in zip(flat_st, new)
    )
    if read_back is not None:
      part_total = read_back(*[part(x) for x in flat_in],
                             *[part(x) for x in flat_st])
    return flat_st, add(total, part_total)

  # The totals of empty (or, per element, zero-valued) slices rather than
  # jnp.zeros: under shard_map the zero must vary over the same mesh axes as
  # the sums the loop adds to it.
  num_chunks = size // chunk
  lead = lambda x: x[:chunk if total_axis is not None else 0]
  _, zero = fn(*[lead(x) for x in flat_in], *[lead(x) for x in flat_st])
  if read_back is not None:
    zero = read_back(*[lead(x) for x in flat_in], *[lead(x) for x in flat_st])
  if total_axis is not None:  # Zero-valued whatever the terms (inf, nan).
    zero = jnp.where(jnp.zeros(zero.shape, bool), zero, 0)
  carry = jax.lax.fori_loop(
      0, num_chunks, lambda i, c: apply(i * chunk, chunk, c), (flat_st, zero)
  )
  flat_st, total = carry
  total = finish(total)
  if num_chunks * chunk < size:
    flat_st, total = apply(
        num_chunks * chunk, size - num_chunks * chunk, (flat_st, total),
        add=lambda total, part: total + finish(part),
    )
  return tuple(x.reshape(shape) for x in flat_st), total


def _leaf_sum(fn, leaves, dtype, chunk_size):
  def terms(*xs):
    return (), jnp.ravel(fn(*xs).astype(dtype))
  return chunked_pass(
      terms, leaves, (), chunk_size, divide_evenly=False, total_axis=0
  )[1]


def tree_sum(
    fn: Callable[..., jax.Array],
    *trees: Any,
    dtype: jnp.dtype,
    axis_name: Optional[str] = None,
    chunk_size: Optional[int] = None,
) -> jax.Array:
  """Global sum over every element of every leaf of `fn(*leaves)`.

  `fn` is elementwise. Each leaf is summed in `dtype`; with `axis_name` the
  total is also summed over that mapped axis (for parameters split across
  devices under `pmap` or `shard_map`). Under sharded `jit` no `axis_name` is
  needed: `jnp.sum` of a sharded array is already global. With `chunk_size`,
  leaves larger than it are summed slice by slice (see `CPU_CHUNK_SIZE`).
  """
  leaves = [jax.tree.leaves(t) for t in trees]
  total = jnp.zeros([], dtype)
  for group in zip(*leaves):
    total = total + _leaf_sum(fn, group, dtype, chunk_size)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  return total


def tree_size(tree: Any) -> int:
  """Number of elements over all leaves (a Python int, known at trace time)."""
  return sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(tree))


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
