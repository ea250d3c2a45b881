"""The seam between the optimizers' passes over memory and the backend.

SOAA and arTuRO are each a few passes over their per-parameter arrays (SOAA:
the moments, then the step; arTuRO: the filter, the bisection's KL sums, the
step). Each pass is written once, in the optimizer's module, as pure-JAX
elementwise functions of one leaf's arrays and of named scalars. `run`
applies a pass to every leaf of a pytree, adds up its global sums, and decides
how the pass is laid over memory: whole arrays (GPU, TPU, several devices), or
loops over cache-sized slices on a single CPU device. That choice is made here
and nowhere else; docs/internals.md explains it.
"""

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from optax_soaa._src import utils

# The slice length "auto" resolves to on a single CPU device. XLA:CPU
# materialises the operand of a reduction, and every subexpression shared by
# several outputs, as a parameter-sized temporary: a fresh allocation and a
# round trip to memory per step. Slices of this many elements keep them in
# cache. (On the update-step benchmark at 10M parameters on an idle 2-core
# CPU, SOAA's step ran about 1.1x and arTuRO's about 2x slower over whole
# arrays than in slices; more on a loaded machine.)
CPU_CHUNK_SIZE = 4096


def check_chunk_size(name: str, chunk_size: Any) -> None:
  """Validates a slicing option: "auto", None or a positive int."""
  if (isinstance(chunk_size, str) and chunk_size == "auto") or (
      chunk_size is None):
    return
  if hasattr(chunk_size, "dtype"):  # An array: say that it must be static.
    utils.check_positive_int(name, chunk_size, static=True)
  try:
    utils.check_positive_int(name, chunk_size, static=True)
  except ValueError:
    raise ValueError(
        f'`{name}` must be "auto", None or a positive int, got '
        f"{chunk_size!r}.") from None


def resolve_chunk_size(chunk_size: Any) -> Optional[int]:
  """The slice length to trace with, for a `check_chunk_size`-valid option.

  Called inside `update`, at trace time, so that "auto" sees the devices
  (after `jax.distributed.initialize`). "auto" slices on a single CPU device
  only: on GPU and TPU a pass fuses into one kernel over whole arrays, and
  with several devices the leaves may be sharded, where slicing would make
  XLA gather them.
  """
  if isinstance(chunk_size, str):
    if jax.default_backend() == "cpu" and jax.device_count() == 1:
      return CPU_CHUNK_SIZE
    return None
  return None if chunk_size is None else int(chunk_size)


class Result(NamedTuple):
  """What `run` returns."""

  states: tuple  # The new states, trees like the `states` given.
  sums: Optional[jax.Array]  # shape=(K,): `terms` summed over every element.
  outputs: Any  # `output`'s arrays, a tree like `inputs[0]`; or None.


def run(
    name: str,
    inputs: Sequence[Any],
    states: Sequence[Any] = (),
    scalars: Optional[Mapping[str, Any]] = None,
    *,
    update: Optional[Callable[..., Sequence[jax.Array]]] = None,
    terms: Optional[Callable[..., Any]] = None,
    output: Optional[Callable[..., jax.Array]] = None,
    sum_dtype: Any = jnp.float32,
    chunk_size: Optional[int] = None,
    carried: Sequence[int] = (),
    old_terms: Optional[Callable[..., Any]] = None,
    axis_name: Optional[str] = None,
) -> Result:
  """One pass over memory: every leaf of `inputs` and `states`, once.

  Per leaf, with ``xs = (*inputs, *states)`` and ``s = scalars``:

  * ``update(*xs, **s)`` returns the new states (elementwise), cast back to
    the states' dtypes;
  * ``terms(*inputs, *new_states, **s)`` returns K arrays of terms (a tuple,
    or one array with a leading axis of size K), each summed over every
    element of every leaf in `sum_dtype` and, with `axis_name`, over that
    mapped axis;
  * ``old_terms(*inputs, *states, **s)`` returns J arrays of terms of the
    old states, summed likewise after the K sums of `terms` (a sum that
    belongs to the step before, formed in this pass instead of a pass of
    its own over that step's states);
  * ``output(*inputs, *new_states, **s)`` returns an array, computed over
    whole arrays (never sliced) so that XLA fuses it into its consumer (the
    returned updates, into `optax.apply_updates`).

  Args:
    name: the pass's name, a `jax.named_scope` in profiles and HLO.
    inputs: pytrees of the same structure, read only.
    states: pytrees of that structure, written (in place, when donated).
    scalars: the pass's named scalars (arrays or Python values), passed to
      each function as keyword arguments.
    update: optional, see above.
    terms: optional, see above.
    output: optional, see above.
    sum_dtype: dtype of the sums.
    chunk_size: None (whole arrays) or a slice length, from
      `resolve_chunk_size`.
    carried: indices into `states` whose old values `update` reads in
      several places (see `_sliced`); none with `old_terms`.
    old_terms: optional, see above.
    axis_name: mapped axis over which the parameters are split.

  Returns:
    A `Result`.
  """
  scalars = dict(scalars or {})
  treedef = jax.tree.structure((inputs or states)[0])
  in_leaves = [treedef.flatten_up_to(x) for x in inputs]
  st_leaves = [treedef.flatten_up_to(x) for x in states]
  new_leaves, sums, out_leaves = [], None, []
  with jax.named_scope(name):
    for k in range(treedef.num_leaves):
      ins = tuple(x[k] for x in in_leaves)
      olds = tuple(x[k] for x in st_leaves)
      if update is None and terms is None and old_terms is None:
        new, total = olds, None
      else:
        new, total = _sliced(
            *[(lambda *xs, fn=fn: fn(*xs, **scalars)) if fn else None
              for fn in (update, terms, old_terms)],
            ins, olds, chunk_size, carried, sum_dtype,
        )
      new_leaves.append(new)
      if total is not None:
        sums = total if sums is None else sums + total
      if output is not None:
        out_leaves.append(output(*ins, *new, **scalars))
    if sums is None and (terms or old_terms):  # No leaves: sums of nothing.
      empty = [jnp.zeros((0,), sum_dtype)] * (len(inputs) + len(states))
      sums = jnp.concatenate(
          [_sums(fn(*empty, **scalars), sum_dtype)
           for fn in (terms, old_terms) if fn is not None])
    if sums is not None and axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
  new_states = tuple(
      treedef.unflatten([leaf[i] for leaf in new_leaves])
      for i in range(len(states))
  )
  outputs = treedef.unflatten(out_leaves) if output is not None else None
  return Result(new_states, sums, outputs)


def _rows(terms: Any, dtype: Any) -> jax.Array:
  """K arrays of terms (a tuple, or a leading axis) as a (K, n) array."""
  if isinstance(terms, (tuple, list)):
    terms = jnp.stack([jnp.ravel(t).astype(dtype) for t in terms])
  return terms.astype(dtype).reshape(terms.shape[0], -1)


def _sums(terms: Any, dtype: Any) -> jax.Array:
  """K arrays of terms summed, shape (K,): a reduction per array (stacked
  first, they would be written out as one (K, n) array)."""
  if isinstance(terms, (tuple, list)):
    return jnp.stack([jnp.sum(jnp.asarray(t).astype(dtype)) for t in terms])
  return jnp.sum(_rows(terms, dtype), axis=1)


def _even_chunk(size: int, chunk: int) -> int:
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


def _after(index, limit, value):
  """`index` (<= `limit`), as a value XLA cannot compute before `value`.

  A write into a donated state must come after every read of the old
  values it overwrites, or XLA keeps them with a copy of the whole state.
  This data dependency orders it: min(index, limit + 0 or 1) is `index`.
  """
  return jnp.minimum(index, limit + jnp.isnan(value).astype(index.dtype))


def _one_value(x):
  """A scalar XLA can only have once `x` is computed: its first element,
  or, for an array sharded over explicit mesh axes (where a slice of one
  element is not defined), its sum."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None) or ()
  if any(axes is not None for axes in spec):
    return jnp.sum(x)
  return jnp.ravel(x)[0]


def _sliced(update, terms, old_terms, inputs, states, chunk, carried, dtype):
  """One leaf's new states and summed terms, slice by slice.

  Over a leaf larger than `chunk` the pass runs in a loop: the new states
  are written over `states` in place and the slices' terms are added up
  element by element in slice-long accumulators, summed once at the end (a
  reduction inside the loop would be a kernel call per slice, whose fixed
  cost dominated SOAA's predicted-reduction sum).

  In-place writes need care: when a fusion that is not an input of a
  state's write reads that state's old slice, XLA copies the whole state
  array on every slice to keep the old values. So `terms` reads the new
  states' slices back from the arrays they were just written into, and the
  states listed in `carried` reach `update` through the loop carry: each
  slice is read from the array after the write before it, so the update
  may read it in any number of fusions (arTuRO's λ and h both read the old
  h). A carried state costs a slice copy and a slice read per iteration.

  With `old_terms` the writes are ordered instead (`_after`): the old
  terms' reads of a slice first, then the states' writes from the last to
  the first (a state's update may read the old slices of the states before
  it: SOAA's v reads m's), then `terms`, reading the new slices back. No
  state is carried, which keeps the loop body short: XLA:CPU runs a body of
  up to 8 operations inline, and dispatches a longer one operation by
  operation, at a cost per slice.
  """
  if old_terms is not None and carried:
    raise ValueError("`carried` states and `old_terms` do not mix.")

  def new_states(*xs):
    if update is None:
      return ()
    return tuple(n.astype(x.dtype) for n, x in zip(update(*xs), states))

  def sums_of(ins, news, olds, reduce):
    return [reduce(fn(*ins, *xs)) for fn, xs in
            ((terms, news), (old_terms, olds)) if fn is not None]

  size = (states or inputs)[0].size
  if chunk is None or size <= chunk:
    if old_terms is None:
      new = new_states(*inputs, *states)
      sums = sums_of(inputs, new, states, lambda t: _sums(t, dtype))
      return new, (jnp.concatenate(sums) if sums else None)
    # The old terms' reads before the in-place updates: the updates read
    # the inputs through a select on a flag XLA cannot know before the old
    # sums (always true), else it copies the states to keep their old
    # values for the sums.
    old = _sums(old_terms(*inputs, *states), dtype)
    ready = _after(jnp.int32(0), 0, old[0]) == 0
    guard = lambda xs: [jnp.where(ready, x, jnp.zeros_like(x)) for x in xs]
    if inputs:
      new = new_states(*guard(inputs), *states)
    else:
      new = new_states(*guard(states))
    sums = [_sums(terms(*inputs, *new), dtype)] if terms is not None else []
    return new, jnp.concatenate(sums + [old])
  shape = (states or inputs)[0].shape
  chunk = _even_chunk(size, chunk)
  flat_in = [x.reshape(-1) for x in inputs]
  flat_st = tuple(x.reshape(-1) for x in states)
  num_chunks = size // chunk
  # A shorter last slice runs in the loop, as a full slice that ends at the
  # leaf's end and keeps the elements it shares with the slice before
  # (outside the loop, XLA would copy whole state arrays to order its reads
  # and writes).
  ragged = size % chunk != 0
  num_chunks += ragged

  def start_of(i):
    return jnp.minimum(i * chunk, size - chunk) if ragged else i * chunk

  # Indices are never negative: no wrap-around (one operation less).
  def part(x, start, length=chunk):
    return jax.lax.dynamic_slice(x, (start,), (length,),
                                 allow_negative_indices=False)

  def write(x, new, start):
    return jax.lax.dynamic_update_slice(x, new, (start,),
                                        allow_negative_indices=False)

  carried = tuple(carried)
  ordered = old_terms is not None

  def body(carry):
    i, flat_st, current, accs = carry
    start = start_of(i)
    fresh = start + jax.lax.iota(jnp.int32, chunk) >= i * chunk
    mask = lambda rows: jnp.where(fresh, rows, 0) if ragged else rows
    ins = [part(x, start) for x in flat_in]
    olds = [part(x, start) for x in flat_st]
    for k, c in zip(carried, current):
      olds[k] = c
    accs = list(accs)
    if ordered:
      accs[-1] = accs[-1] + mask(_rows(old_terms(*ins, *olds), dtype))
      last_read = _one_value(accs[-1])
      written = list(flat_st)
      for k in reversed(range(len(flat_st))):
        # The update reads the slice where it writes, at the same (ordered)
        # index, so that XLA fuses it into the in-place write.
        at = _after(start, size - chunk, last_read)
        olds_at = [part(x, at) for x in flat_st]
        new_k = new_states(*ins, *olds_at)[k]
        if ragged:
          new_k = jnp.where(fresh, new_k, olds_at[k])
        written[k] = write(written[k], new_k, at)
        last_read = _one_value(part(written[k], start))
      flat_st = written
    else:
      new = new_states(*ins, *olds)
      if ragged:
        new = tuple(jnp.where(fresh, n, c) for n, c in zip(new, olds))
      flat_st = [write(x, n, start) for x, n in zip(flat_st, new)]
    # The next slices, read after this one's write (see the docstring).
    current = tuple(part(flat_st[k], start_of(i + 1)) for k in carried)
    if terms is not None:
      news = [part(x, start) for x in flat_st]
      accs[0] = accs[0] + mask(_rows(terms(*ins, *news), dtype))
      last_read = _one_value(accs[0])
    # Ordered: the next index after every use of this one (i + 1, as
    # `_after` makes it), so that it takes i's place without a copy of i.
    i = _after(i + 1, num_chunks, last_read) if ordered else i + 1
    return i, tuple(flat_st), current, tuple(accs)

  # Zeros derived from the terms, not jnp.zeros: under shard_map they must
  # vary over the same mesh axes as the terms added to them (and `where`
  # keeps them zero whatever the terms: inf, nan).
  lead = [part(x, 0) for x in flat_in], [part(x, 0) for x in flat_st]
  zeros = tuple(sums_of(*lead, lead[1], lambda t: (
      lambda r: jnp.where(jnp.zeros(r.shape, bool), r, 0))(_rows(t, dtype))))
  current = tuple(part(flat_st[k], 0) for k in carried)
  # The index of an ordered loop depends on the terms (`_after`): under
  # shard_map it varies over their mesh axes from the start, as they do.
  first = _after(jnp.int32(0), 0, _one_value(zeros[-1])) if ordered else 0
  _, flat_st, _, accs = jax.lax.while_loop(
      lambda carry: carry[0] < num_chunks, body,
      (jnp.asarray(first, jnp.int32), flat_st, current, zeros))
  sums = [jnp.sum(a, axis=-1) for a in accs]
  return (tuple(x.reshape(shape) for x in flat_st),
          jnp.concatenate(sums) if sums else None)
