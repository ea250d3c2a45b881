"""One problem, four ways to run it: one device, pmap, sharded jit, shard_map.

Every runner trains the same Flax MLP on the same global batch for the same
number of steps and returns host copies of (params, opt_state, losses), so a
test compares any of them against the single-device run.

Layouts (8 devices):
  * pmap: params and state replicated, batch split 8 ways; the user pmeans
    the gradients and the loss over the mapped axis before ``update``.
  * sharded jit: mesh ('data'=4, 'fsdp'=2); every param split along its dim 0
    over 'fsdp' (FSDP), the batch over ('data', 'fsdp'); the state laid out
    by ``optax_soaa.state_shardings``.
  * shard_map: the same mesh and layout written by hand: the body gathers the
    params over 'fsdp', and the optimizer, built with ``axis_name='fsdp'``,
    psums its global sums over the split axis.
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


def to_host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


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


def run_sharded_jit(case: Case):
  """FSDP under jit: sharded params, state and batch; no axis_name."""
  params, xs, ys = problem()
  mesh = jax.make_mesh((DATA, FSDP), ("data", "fsdp"), axis_types=AUTO)
  opt = case.make(None)
  value_grad = _value_grad(case, mean_loss)
  param_sh = jax.tree.map(
      lambda spec: jax.sharding.NamedSharding(mesh, spec), fsdp_specs(params)
  )
  batch_sh = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
  replicated = jax.sharding.NamedSharding(mesh, P())
  params = jax.device_put(params, param_sh)
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
    params, state, value = step(params, state, xs[t], ys[t])
    losses.append(value)
  return (to_host(params), to_host(state), np.asarray(losses),
          dict(params=params, state=state, init_state=init_state,
               state_shardings=state_sh, mesh=mesh))


def run_shard_map(case: Case, axis_name: Optional[str] = "default",
                  check_vma: bool = True):
  """Manual partitioning with shard_map, layout `case.shard_map_layout`.

  "fsdp": each device holds 1/FSDP of every param and of its state; the body
  gathers the params over 'fsdp' for the forward pass, and the optimizer,
  built with ``axis_name='fsdp'`` (the split axis), psums its global sums.
  "dp": params and state replicated on a ('batch',) mesh of all devices; the
  optimizer, built with ``axis_name='batch'``, averages what it averages
  (AdaFisher: the layer statistics).

  The loss is written as a global mean (local sum / global batch size), so
  the gradient of a param is the psum of the local contributions: over
  'fsdp' it comes from transposing the all_gather (a psum_scatter); over the
  axes the param is replicated on, autodiff adds the psum itself when
  check_vma=True (the transpose of the implicit pvary), and the user must
  when check_vma=False.
  """
  params, xs, ys = problem()
  if case.shard_map_layout == "fsdp":
    mesh = jax.make_mesh((DATA, FSDP), ("data", "fsdp"), axis_types=AUTO)
    specs = fsdp_specs(params)
    split_axis, replica_axes = "fsdp", ("data",)
  else:
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=AUTO[:1])
    specs = jax.tree.map(lambda _: P(), params)
    split_axis, replica_axes = None, ("batch",)
  all_axes = mesh.axis_names
  if axis_name == "default":
    axis_name = split_axis if case.shard_map_layout == "fsdp" else "batch"
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
  params = jax.device_put(params, param_sh)
  state = init(params)
  losses = []
  for t in range(STEPS):
    params, state, value = step(params, state, xs[t], ys[t])
    losses.append(value)
  return to_host(params), to_host(state), np.asarray(losses)
