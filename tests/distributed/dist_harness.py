"""One problem, four ways to run it: one device, pmap, sharded jit, shard_map.

Every runner trains the same Flax MLP on the same global batch for the same
number of steps and returns host copies of (params, opt_state, losses), so a
test compares any of them against the single-device run.

The runners work in one process and in several (``jax.distributed``): data
enters as global arrays built from the host copy (each process materialises
only its own shards) and comes back with `to_host`, which gathers across
processes.

Layouts (8 devices):
  * pmap: params and state replicated, batch split 8 ways; the user pmeans
    the gradients and the loss over the mapped axis before ``update``.
  * sharded jit: mesh ('data'=4, 'fsdp'=2); every param split along its dim 0
    over 'fsdp' (FSDP), the batch over ('data', 'fsdp'); the state laid out
    by ``optax_soaa.state_shardings``.
  * shard_map: the same mesh and layout written by hand: the body gathers the
    params over 'fsdp', and the optimizer, built with ``axis_name='fsdp'``,
    psums its global sums over the split axis. Or data parallel ("dp"):
    params and state replicated on a 1-D 'batch' mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.experimental import multihost_utils

import optax_soaa
import optax_soaa.flax

P = jax.sharding.PartitionSpec

BATCH = 32
IN, HIDDEN, OUT = 8, 16, 4
STEPS = 20
AUTO = (jax.sharding.AxisType.Auto,) * 2
DATA, FSDP = 4, 2


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(HIDDEN)(x))
    return nn.Dense(OUT)(x)


MODEL = MLP()


def per_example_loss(params, x, y):
  logits = MODEL.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def mean_loss(params, x, y):
  return jnp.mean(per_example_loss(params, x, y))


@functools.lru_cache(maxsize=None)
def problem(seed: int = 0):
  """Host (NumPy) params and one global batch per step."""
  rng = np.random.default_rng(seed)
  params = MODEL.init(jax.random.key(seed), jnp.zeros((1, IN)))["params"]
  params = jax.tree.map(np.asarray, params)
  xs = rng.normal(size=(STEPS, BATCH, IN)).astype(np.float32)
  w = rng.normal(size=(IN, OUT))
  ys = np.argmax(xs @ w + 0.5 * rng.normal(size=(STEPS, BATCH, OUT)), -1)
  return params, xs, ys.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Case:
  """An optimizer under test.

  make(axis_name) builds it; `stats` says whether it takes AdaFisher's
  layer statistics (then the step uses the Flax helper); shard_map_layout is
  "fsdp" (params split, for optimizers with global sums over params) or "dp"
  (params replicated, for AdaFisher, whose axis_name averages statistics).
  """

  name: str
  make: Callable[[Optional[str]], optax.GradientTransformationExtraArgs]
  stats: bool = False
  shard_map_layout: str = "fsdp"


def _value_grad(case: Case, loss_fn, stats_axis=None):
  """(value, grads, extra update kwargs) for `loss_fn(params, x, y)`."""
  if case.stats:
    fn = optax_soaa.flax.value_grad_and_stats(loss_fn, axis_name=stats_axis)

    def f(params, x, y):
      value, grads, stats = fn(params, x, y)
      return value, grads, {"stats": stats}
    return f

  def g(params, x, y):
    value, grads = jax.value_and_grad(loss_fn)(params, x, y)
    return value, grads, {}
  return g


def global_array(host: np.ndarray, sharding: jax.sharding.Sharding):
  """`host` (the same on every process) as a global array with `sharding`.

  Each process builds only the shards of its own devices, as a data loader
  of a multi-process run would.
  """
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])


def to_host(tree):
  """NumPy copies of the whole (global) arrays, on every process.

  A sharded array that spans several processes is gathered first (a
  collective: every process calls this with the same tree).
  """

  def fetch(leaf):
    if (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
        and not leaf.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))

  return jax.tree.map(fetch, tree)


def run_single(case: Case):
  """The reference: one device, the full batch."""
  params, xs, ys = problem()
  opt = case.make(None)
  value_grad = _value_grad(case, mean_loss)
  device = jax.devices()[0]

  @jax.jit
  def step(params, state, x, y):
    value, grads, extra = value_grad(params, x, y)
    updates, state = opt.update(grads, state, params, value=value, **extra)
    return optax.apply_updates(params, updates), state, value

  params = jax.device_put(params, device)
  state = jax.jit(opt.init)(params)
  losses = []
  for t in range(STEPS):
    params, state, value = step(params, state, xs[t], ys[t])
    losses.append(value)
  return to_host(params), to_host(state), np.asarray(losses)


def run_pmap(case: Case):
  """Data parallel: replicated params and state, the user pmeans."""
  params, xs, ys = problem()
  n = jax.device_count()
  opt = case.make(None)
  value_grad = _value_grad(case, mean_loss, stats_axis="batch")

  @functools.partial(jax.pmap, axis_name="batch")
  def step(params, state, x, y):
    value, grads, extra = value_grad(params, x, y)
    # The optimizer sees the full-batch mean gradient and loss, exactly as on
    # one device; its state then stays identical on every device.
    grads = jax.lax.pmean(grads, "batch")
    value = jax.lax.pmean(value, "batch")
    updates, state = opt.update(grads, state, params, value=value, **extra)
    return optax.apply_updates(params, updates), state, value

  # Replicated: one copy per device along a new leading axis.
  replicate = lambda tree: jax.tree.map(
      lambda a: np.broadcast_to(a, (n,) + np.shape(a)), tree
  )
  state = replicate(to_host(opt.init(params)))
  params = replicate(params)
  losses = []
  split = lambda a: a.reshape((n, a.shape[0] // n) + a.shape[1:])
  for t in range(STEPS):
    params, state, value = step(params, state, split(xs[t]), split(ys[t]))
    losses.append(value)
  return to_host(params), to_host(state), np.asarray(losses)


def fsdp_specs(params):
  """Every param split along its dim 0 over 'fsdp'."""
  return jax.tree.map(lambda _: P("fsdp"), params)


def fsdp_shardings(params, data: int = DATA, fsdp: int = FSDP):
  """The ('data', 'fsdp') mesh over all devices and the params' shardings."""
  mesh = jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=AUTO)
  return mesh, jax.tree.map(
      lambda spec: jax.sharding.NamedSharding(mesh, spec), fsdp_specs(params)
  )


def fsdp_targets(case: Case, data: int, fsdp: int):
  """Abstract (params, state) laid out FSDP on a (data, fsdp) mesh.

  The targets a checkpoint is restored into: every leaf a
  ``jax.ShapeDtypeStruct`` with the sharding it is to get.
  """
  params, _, _ = problem()
  _, param_sh = fsdp_shardings(params, data, fsdp)
  params_like = jax.tree.map(
      lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
      params, param_sh,
  )
  opt = case.make(None)
  state_sh = optax_soaa.state_shardings(opt, params_like)
  state_like = jax.eval_shape(
      jax.jit(opt.init, out_shardings=state_sh), params_like
  )
  return params_like, state_like


def run_sharded_jit(case: Case,
                    after_step: Optional[Callable[[int, Any], None]] = None):
  """FSDP under jit: sharded params, state and batch; no axis_name.

  `after_step(t, loss)`, if given, is called after step t (from 0).
  """
  params, xs, ys = problem()
  mesh, param_sh = fsdp_shardings(params)
  opt = case.make(None)
  value_grad = _value_grad(case, mean_loss)
  batch_sh = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
  replicated = jax.sharding.NamedSharding(mesh, P())
  params = jax.tree.map(global_array, params, param_sh)
  state_sh = optax_soaa.state_shardings(opt, params)
  state = jax.jit(opt.init, out_shardings=state_sh)(params)

  @functools.partial(
      jax.jit,
      in_shardings=(param_sh, state_sh, batch_sh, batch_sh),
      out_shardings=(param_sh, state_sh, replicated),
  )
  def step(params, state, x, y):
    value, grads, extra = value_grad(params, x, y)
    updates, state = opt.update(grads, state, params, value=value, **extra)
    return optax.apply_updates(params, updates), state, value

  init_state = state
  losses = []
  for t in range(STEPS):
    params, state, value = step(params, state, global_array(xs[t], batch_sh),
                                global_array(ys[t], batch_sh))
    losses.append(value)
    if after_step is not None:
      after_step(t, value)
  return (to_host(params), to_host(state), np.asarray(losses),
          dict(params=params, state=state, init_state=init_state,
               state_shardings=state_sh, mesh=mesh))


def run_shard_map(case: Case, axis_name: Optional[str] = "default",
                  check_vma: bool = True, layout: Optional[str] = None):
  """Manual partitioning with shard_map, `layout` (`case.shard_map_layout`).

  "fsdp": each device holds 1/FSDP of every param and of its state; the body
  gathers the params over 'fsdp' for the forward pass, and the optimizer,
  built with ``axis_name='fsdp'`` (the split axis), psums its global sums.
  "dp": data parallel, params and state replicated on a ('batch',) mesh of
  all devices. Every device holds the whole model, so SOAA's and arTuRO's sums
  are already global (no axis_name); AdaFisher, built with
  ``axis_name='batch'``, averages its layer statistics over the batch.

  The loss is written as a global mean (local sum / global batch size), so
  the gradient of a param is the psum of the local contributions: over
  'fsdp' it comes from transposing the all_gather (a psum_scatter); over the
  axes the param is replicated on, autodiff adds the psum itself when
  check_vma=True (the transpose of the implicit pvary), and the user must
  when check_vma=False.
  """
  params, xs, ys = problem()
  layout = layout or case.shard_map_layout
  if layout == "fsdp":
    mesh = jax.make_mesh((DATA, FSDP), ("data", "fsdp"), axis_types=AUTO)
    specs = fsdp_specs(params)
    split_axis, replica_axes = "fsdp", ("data",)
  else:
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=AUTO[:1])
    specs = jax.tree.map(lambda _: P(), params)
    split_axis, replica_axes = None, ("batch",)
  all_axes = mesh.axis_names
  if axis_name == "default":
    if layout == "fsdp":
      axis_name = split_axis
    else:
      axis_name = "batch" if case.stats else None
  opt = case.make(axis_name)
  state_specs = optax_soaa.state_partition_specs(opt, params, specs)
  batch_spec = P(all_axes)

  def global_mean_loss(local_params, x, y):
    full = local_params
    if split_axis is not None:
      full = jax.tree.map(
          lambda p: jax.lax.all_gather(p, split_axis, axis=0, tiled=True),
          local_params,
      )
    return jnp.sum(per_example_loss(full, x, y)) / BATCH

  value_grad = _value_grad(case, global_mean_loss)

  def body(params, state, x, y):
    value, grads, extra = value_grad(params, x, y)
    if not check_vma:
      grads = jax.lax.psum(grads, replica_axes)
    value = jax.lax.psum(value, all_axes)
    updates, state = opt.update(grads, state, params, value=value, **extra)
    return optax.apply_updates(params, updates), state, value

  step = jax.jit(jax.shard_map(
      body, mesh=mesh,
      in_specs=(specs, state_specs, batch_spec, batch_spec),
      out_specs=(specs, state_specs, P()), check_vma=check_vma,
  ))
  init = jax.jit(jax.shard_map(
      opt.init, mesh=mesh, in_specs=(specs,), out_specs=state_specs,
      check_vma=check_vma,
  ))
  param_sh = jax.tree.map(
      lambda spec: jax.sharding.NamedSharding(mesh, spec), specs
  )
  batch_sh = jax.sharding.NamedSharding(mesh, batch_spec)
  params = jax.tree.map(global_array, params, param_sh)
  state = init(params)
  losses = []
  for t in range(STEPS):
    params, state, value = step(params, state, global_array(xs[t], batch_sh),
                                global_array(ys[t], batch_sh))
    losses.append(value)
  return to_host(params), to_host(state), np.asarray(losses)


# The optimizers under test, shared by the tests of this directory and by the
# multi-process worker.
TOL = 1e-5  # Relative; what it covers: test_dist_equivalence's docstring.
# On one CPU device the optimizers run their passes slice by slice (4096
# elements by default, `passes.CPU_CHUNK_SIZE`); a small chunk_size runs that
# code path on these small leaves and on their shards, whole and partial
# slices alike.
CHUNK = 24


def _soaa(axis_name):
  return optax_soaa.soaa(
      3e-2, weight_decay=1e-3, total_steps=STEPS, axis_name=axis_name,
      chunk_size=CHUNK,
  )


def _arturo(axis_name):
  # The reference's tuned Fashion-MNIST values, KL bound 0.05.
  return optax_soaa.arturo(
      0.05, reg_weight=0.0587, prior_prec=0.0015, dynamic_model_noise=0.0174,
      measurement_noise=2.82, start_filter_cov=5e-5, nu=1.3,
      axis_name=axis_name, chunk_size=CHUNK,
  )


def _adafisher(axis_name):
  return optax_soaa.adafisherw(
      1e-3, stats_every=2, weight_decay=1e-3, axis_name=axis_name
  )


CASES = {
    "soaa": Case("soaa", _soaa),
    "arturo": Case("arturo", _arturo),
    "adafisher": Case(
        "adafisher", _adafisher, stats=True, shard_map_layout="dp"
    ),
}


def assert_trees_close(actual, expected, tol=TOL):
  """Leafwise: max|a - e| <= tol * max|e|; integer leaves exactly equal."""
  paths = jax.tree.leaves_with_path(expected)
  leaves = jax.tree.leaves(actual)
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, e), a in zip(paths, leaves):
    a, e = np.asarray(a), np.asarray(e)
    assert a.shape == e.shape and a.dtype == e.dtype, jax.tree_util.keystr(path)
    if not np.issubdtype(e.dtype, np.floating):
      np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))
      continue
    if e.size == 0:
      continue
    scale = max(float(np.max(np.abs(e))), np.finfo(np.float32).tiny)
    err = float(np.max(np.abs(a.astype(np.float64) - e)))
    assert np.all(np.isfinite(a)), jax.tree_util.keystr(path)
    assert err <= tol * scale, (
        f"{jax.tree_util.keystr(path)}: max |diff| {err:.3g} > "
        f"{tol:g} * max |ref| {scale:.3g}"
    )


def worst_deviation(actual, expected):
  """max over float leaves of max|a - e| / max|e| (the quantity TOL bounds)."""
  worst = 0.0
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    if e.size and np.issubdtype(np.asarray(e).dtype, np.floating):
      worst = max(worst, float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)),
                                                          1e-38)))
  return worst


_RUNNERS = {
    "single": run_single,
    "sharded_jit": run_sharded_jit,
    "shard_map_dp": functools.partial(run_shard_map, layout="dp"),
}


@functools.lru_cache(maxsize=None)
def cached_run(mode: str, name: str):
  """`_RUNNERS[mode](CASES[name])`, computed once per process."""
  return _RUNNERS[mode](CASES[name])
