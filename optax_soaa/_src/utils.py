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

  A shorter last slice of states runs in the loop as an overlapping,
  masked slice, whose selects cost every slice: avoid it when such a
  divisor exists (else `chunk`, with its last slice).
  """
  lo = -(-2 * size // (3 * chunk))
  for count in range(max(1, lo), 2 * size // chunk + 1):
    if size % count == 0:
      return size // count
  return chunk


def chunked_pass(update, terms, inputs, states, chunk, *, carried=(),
                 divide_evenly=True):
  """One pass over memory: new states and the sum of `terms`, slice by slice.

  `update(*inputs, *states)` returns the new states (elementwise; `None` when
  there are no states) and `terms(*inputs, *new_states)` the terms to sum,
  the elements along its last axis (any fixed leading shape). Returns the
  new states and the terms summed over that last axis.

  Over a leaf larger than `chunk` the pass runs slice by slice in a loop: the
  new states are written over `states` in place and the slices' terms are
  added up element by element in a slice-long accumulator, summed once at
  the end. On the CPU backend XLA materialises every subexpression shared by
  several outputs, and the operand of a reduction, as a parameter-sized
  temporary, each costing more than a pass over memory; slices of `chunk`
  elements keep them cache-sized. A reduction inside the loop would be a
  separate kernel call per slice, whose fixed cost, not the arithmetic,
  dominated SOAA's predicted-reduction sum (at 10M parameters about 7.6 ms
  per step summed per slice, about half that accumulated).

  In-place writes need care: when a fusion that is not an input of a
  state's write reads that state's old slice, XLA copies the whole state
  array on every slice to keep the old values. So `terms` reads the new
  states' slices back from the arrays they were just written into (formed
  from the old slices, arTuRO's filter pass ran seven times slower), and
  the states listed in `carried` (indices into `states`) reach `update`
  through the loop carry instead: each slice is read from the array after
  the write before it, so the update may read it in any number of fusions
  (arTuRO's λ and h both read the old h). A carried state costs one more
  slice copy per iteration. With `divide_evenly` the slice length is
  adjusted to divide the leaf where possible.
  """
  def new_states(*xs):
    return () if update is None else tuple(update(*xs))

  def total(*xs):
    return jnp.sum(terms(*xs), axis=-1)

  size = (states or inputs)[0].size
  if chunk is None or size <= chunk:
    new = new_states(*inputs, *states)
    return new, total(*inputs, *new)
  shape = states[0].shape if states else None
  if divide_evenly:
    chunk = _even_chunk(size, chunk)
  flat_in = [x.reshape(-1) for x in inputs]
  flat_st = tuple(x.reshape(-1) for x in states)
  num_chunks = size // chunk
  # A shorter last slice of states runs in the loop, as a full slice that
  # ends at the leaf's end and keeps the elements it shares with the slice
  # before (outside the loop, XLA would copy whole state arrays to order its
  # reads and writes); a shorter last slice of a plain sum runs after it.
  ragged = bool(states) and size % chunk != 0
  num_chunks += ragged

  def start_of(i):
    return jnp.minimum(i * chunk, size - chunk) if ragged else i * chunk

  def part(x, start):
    return jax.lax.dynamic_slice_in_dim(x, start, chunk)

  carried = tuple(carried)

  def body(i, carry):
    flat_st, current, acc = carry
    start = start_of(i)
    ins = [part(x, start) for x in flat_in]
    olds = [part(x, start) for x in flat_st]
    for k, c in zip(carried, current):
      olds[k] = c
    new = tuple(n.astype(x.dtype)
                for n, x in zip(new_states(*ins, *olds), flat_st))
    if ragged:
      fresh = start + jax.lax.iota(jnp.int32, chunk) >= i * chunk
      new = tuple(jnp.where(fresh, n, c) for n, c in zip(new, olds))
    flat_st = tuple(
        jax.lax.dynamic_update_slice_in_dim(x, n, start, 0)
        for x, n in zip(flat_st, new)
    )
    # The next slices, read after this one's write (see the docstring).
    current = tuple(part(flat_st[k], start_of(i + 1)) for k in carried)
    slice_terms = terms(*ins, *[part(x, start) for x in flat_st])
    if ragged:
      slice_terms = jnp.where(fresh, slice_terms, 0)
    return flat_st, current, acc + slice_terms

  # A zero-valued accumulator derived from the terms, not jnp.zeros: under
  # shard_map it must vary over the same mesh axes as the terms added to it
  # (and `where` keeps it zero whatever the terms: inf, nan).
  lead = [part(x, 0) for x in flat_in] + [part(x, 0) for x in flat_st]
  lead_terms = terms(*lead)
  zero = jnp.where(jnp.zeros(lead_terms.shape, bool), lead_terms, 0)
  current = tuple(part(flat_st[k], 0) for k in carried)
  flat_st, _, acc = jax.lax.fori_loop(
      0, num_chunks, body, (flat_st, current, zero))
  result = jnp.sum(acc, axis=-1)
  if not states and size % chunk:
    result = result + total(*[x[num_chunks * chunk:] for x in flat_in])
  return tuple(x.reshape(shape) for x in flat_st), result


def _leaf_sum(fn, leaves, dtype, chunk_size):
  return chunked_pass(
      None, lambda *xs: jnp.ravel(fn(*xs).astype(dtype)), leaves, (),
      chunk_size, divide_evenly=False,
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
