"""Saving and restoring ``(params, opt_state)`` with orbax-checkpoint.

A thin layer over :class:`orbax.checkpoint.StandardCheckpointer` that fixes the
one thing that is easy to get wrong: orbax stores arrays, not Python types, so a
restore *without a target* returns the optimizer state as nested dicts and
lists (``SOAAState`` becomes a dict, ``optax.EmptyState`` and ``None`` fields
vanish), which ``tx.update`` cannot use. :func:`restore` always restores into
the exact structure, dtypes and shapes of a target built from the optimizer::

  import jax, optax_soaa
  from optax_soaa import checkpoint

  checkpoint.save("run/step_1000", params, opt_state, step=1000)

  # In a fresh process: build the same optimizer and model, then
  params_like = jax.eval_shape(model.init, key, x)["params"]
  opt_state_like = jax.eval_shape(tx.init, params_like)
  params, opt_state, step = checkpoint.restore(
      "run/step_1000", params_like, opt_state_like)

With the same data order (derive each batch from ``(seed, step)``) the
continued run is bit-identical to an uninterrupted one.

Sharded and multi-process runs: every process calls :func:`save` and
:func:`restore` with the same arguments. The saved arrays must be global
arrays (what a ``jax.jit`` with ``out_shardings`` returns; ``opt.init`` run
outside ``jit`` gives per-process scalars that orbax refuses). A restore
places each array with the sharding its target carries, so a checkpoint can
be read on another mesh or another number of processes (resharded; the values
are bit-identical). Give targets with shardings whenever the topology
differs from the one that saved (orbax raises "Topology mismatch" otherwise)::

  param_sh = ...  # the new layout: a pytree of NamedShardings like params
  params_like = jax.tree.map(
      lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
      jax.eval_shape(model.init, key, x)["params"], param_sh)
  state_sh = optax_soaa.state_shardings(tx, params_like)
  opt_state_like = jax.eval_shape(
      jax.jit(tx.init, out_shardings=state_sh), params_like)

orbax-checkpoint is
imported only when these functions are called (``pip install
optax-soaa[checkpoint]``); the optimizers never import it.

A crash while saving loses nothing: a checkpoint becomes visible at its
directory only once it is complete (orbax writes into a temporary sibling and
renames it), and ``save(..., force=True)`` over an existing checkpoint writes
the new one beside it and swaps them only when it is complete, so the old one
stays restorable until then. :func:`restore` of a directory whose save was
interrupted raises :class:`IncompleteCheckpointError` instead of reading
part of it.
"""

import glob
import os
import shutil
from typing import Any, Optional
import warnings

import jax
import numpy as np

__all__ = ("IncompleteCheckpointError", "restore", "save")

# Siblings of a checkpoint directory while `save(force=True)` replaces it:
# the new checkpoint is complete at `<dir>.replacing` before the old one is
# moved to `<dir>.replaced` and the new one into `<dir>`.
_REPLACING = ".replacing"
_REPLACED = ".replaced"


class IncompleteCheckpointError(ValueError):
  """A checkpoint directory was never completed (its save was interrupted)."""


def _orbax():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "optax_soaa.checkpoint needs orbax-checkpoint: "
        "`pip install optax-soaa[checkpoint]` or `pip install orbax-checkpoint`."
    ) from e
  return ocp


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs for the leaves of `tree`, with the jax.Arrays' shardings."""

  def to_struct(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)

  return jax.tree.map(to_struct, tree)


def save(
    directory: str | os.PathLike,
    params: Any,
    opt_state: Any,
    *,
    step: Optional[int] = None,
    force: bool = False,
) -> None:
  """Writes `params`, `opt_state` and `step` to `directory` and waits for it.

  Args:
    directory: a new directory (made absolute); an existing one is an error
      unless `force` is True, in which case it is replaced once the new
      checkpoint is complete.
    params: the parameter pytree.
    opt_state: the optimizer state returned by ``tx.init``/``tx.update``.
    step: optional training step (e.g. the index of the next batch).
    force: overwrite an existing checkpoint.

  Examples:
    >>> import os, tempfile, jax, jax.numpy as jnp, optax_soaa
    >>> from optax_soaa import checkpoint
    >>> tx = optax_soaa.soaa(1e-3, total_steps=100)
    >>> params = {"w": jnp.arange(6.0).reshape(2, 3)}
    >>> opt_state = tx.init(params)
    >>> path = os.path.join(tempfile.mkdtemp(), "step_10")
    >>> checkpoint.save(path, params, opt_state, step=10)
    >>> # Later, in a fresh process: targets from the same model and optimizer.
    >>> params_like = jax.eval_shape(lambda: {"w": jnp.zeros((2, 3))})
    >>> state_like = jax.eval_shape(tx.init, params_like)
    >>> params, opt_state, step = checkpoint.restore(path, params_like, state_like)
    >>> step, type(opt_state[0]).__name__
    (10, 'SOAAState')
  """
  ocp = _orbax()
  path = os.path.abspath(directory)
  tree = {
      "params": params,
      "opt_state": opt_state,
      "step": np.asarray(-1 if step is None else step, np.int32),
  }
  replace = os.path.exists(path)
  if replace and not force:
    raise ValueError(
        f"A checkpoint already exists at {path}; pass force=True to replace "
        "it (the old one stays restorable until the new one is complete).")
  # A new directory appears only when complete (orbax renames its temporary
  # directory at the end); a replacement is written beside the old one.
  # `force=True` there only clears what an interrupted earlier save left.
  target = path + _REPLACING if replace else path
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, tree, force=True)
    ckptr.wait_until_finished()
  if replace:
    if jax.process_index() == 0:
      if os.path.exists(path + _REPLACED):
        shutil.rmtree(path + _REPLACED)
      os.rename(path, path + _REPLACED)
      os.rename(target, path)
      shutil.rmtree(path + _REPLACED)
    ocp.multihost.sync_global_processes(f"optax_soaa_checkpoint_replace:{path}")


def _readable(path: str) -> str:
  """The complete checkpoint directory for `path`, or a clear error."""
  if os.path.isdir(path):
    return path
  if os.path.isdir(path + _REPLACING):
    # Interrupted between the two renames of a replacement: the new
    # checkpoint was complete (the swap starts only then).
    warnings.warn(
        f"{path} was being replaced when a save was interrupted; reading the "
        f"complete new checkpoint at {path + _REPLACING}.", RuntimeWarning)
    return path + _REPLACING
  leftovers = sorted(glob.glob(glob.escape(path) + ".orbax-checkpoint-tmp*"))
  if leftovers:
    raise IncompleteCheckpointError(
        f"The checkpoint at {path} is incomplete: its save was interrupted "
        f"before it finished (it left {leftovers[0]}). Restore an earlier "
        "checkpoint; the next save to this path clears the leftover.")
  raise FileNotFoundError(f"No checkpoint at {path}.")


def restore(
    directory: str | os.PathLike, params_like: Any, opt_state_like: Any
) -> tuple[Any, Any, Optional[int]]:
  """Reads a checkpoint written by :func:`save` into the given structure.

  Args:
    directory: the checkpoint directory.
    params_like: a pytree with the structure, shapes and dtypes of the params:
      the params themselves or ``jax.eval_shape`` of the model's init. A leaf
      that carries a sharding (a ``jax.Array``, or a ``jax.ShapeDtypeStruct``
      with ``sharding=``) is restored with that sharding; the others as orbax
      saved them (which needs the topology that saved).
    opt_state_like: the same for the optimizer state, e.g.
      ``jax.eval_shape(tx.init, params_like)``, or, to place it like the
      params, ``jax.eval_shape(jax.jit(tx.init, out_shardings=state_sh),
      params_like)`` with ``state_sh = optax_soaa.state_shardings(tx,
      params_like)``. Its structure (NamedTuples, ``None`` fields,
      ``EmptyState``) is what comes back.

  Returns:
    ``(params, opt_state, step)``; `step` is None when none was saved.

  Raises:
    IncompleteCheckpointError: the save that was writing `directory` was
      interrupted (e.g. the process was killed) before it completed.
    FileNotFoundError: there is no checkpoint at `directory`.
    ValueError: (from orbax) when the checkpoint's arrays do not match the
      target, e.g. an optimizer built with other options.
  """
  ocp = _orbax()
  path = _readable(os.path.abspath(directory))
  target = {
      "params": _abstract(params_like),
      "opt_state": _abstract(opt_state_like),
      "step": jax.ShapeDtypeStruct((), np.int32),
  }
  with ocp.StandardCheckpointer() as ckptr:
    out = ckptr.restore(path, target)
  step = int(out["step"])
  return out["params"], out["opt_state"], (None if step < 0 else step)
