"""How one optimizer trains one task: the training plans, one per optimizer kind.

A plan trains the "members" of one optimizer (the values of its swept
hyperparameter) from the same initial params on the same batches, and times
its step for the runner. Every plan has the same interface, so the trainer
never asks which optimizer it drives:

* ``recorded_hp(task, spec)`` (static): the settings a result records (a
  resumed run compares them to decide whether to train again);
* ``start_seed(data, idx)``: called with a seed's batch indices before its
  members train;
* ``init(params, values)`` / ``run(carry, values, data, idx, steps, key)`` /
  ``params(carry)``: train the members `values` over some steps;
* ``stepper(data, params, idx)``: ``run(n)`` timing n un-vmapped steps, and
  the state's bytes.

`OptaxPlan` drives every optax transformation: the optimizer is wrapped in
``optax.inject_hyperparams`` so that the member's value, times the task's
step schedule, is set in its state every step; members train vmapped
together (a GPU) or one after another (the CPU, where a vmapped convolution
runs several times slower per member). `KfacPlan` drives kfac-jax's own
optimizer, which compiles its own step and takes the learning rate as an
argument of every step. `PLANS` maps an `OptimizerSpec.kind` to its plan.
"""

import time
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax_soaa

from optax_soaa.benchmarks import kfac_baseline
from optax_soaa.benchmarks import optimizers as opt_lib
from optax_soaa.benchmarks import schema
from optax_soaa.benchmarks.tasks import Task


def tree_bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def make_grad_fn(spec: opt_lib.OptimizerSpec, loss_fn: Callable[..., Any]):
  """(params, opt_state, batch, rng) -> (loss, grads, extra args of `update`).

  AdaFisher's layer statistics come from `optax_soaa.value_grad_and_stats`,
  computed only on the steps where the optimizer state says they are due
  (its refresh steps), as a user's train step would.
  """
  if opt_lib.STATS in spec.extra_args:
    value_grad_stats = optax_soaa.value_grad_and_stats(loss_fn)

    def with_stats(params, opt_state, batch, rng):
      return value_grad_stats(params, batch, rng,
                              stats_due=optax_soaa.stats_due(opt_state))

    return with_stats

  value_and_grad = jax.value_and_grad(loss_fn)

  def plain(params, opt_state, batch, rng):
    del opt_state
    loss, grads = value_and_grad(params, batch, rng)
    extra = {}
    if opt_lib.VALUE in spec.extra_args:
      extra["value"] = loss
    if opt_lib.OBJ_FN in spec.extra_args:
      extra["obj_fn"] = lambda p: loss_fn(p, batch, rng)
    return loss, grads, extra

  return plain


def _set_hyperparam(state, name, value):
  old = state.hyperparams[name]
  return state._replace(
      hyperparams={**state.hyperparams, name: jnp.asarray(value, old.dtype)})


def _timer(step: Callable[[], Any]) -> Callable[[int], float]:
  """run(n): seconds per call of `step` (which returns arrays to wait for)."""

  def run(n):
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
      out = step()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n

  return run


def _stack_steps(losses, diags):
  """Per-step device scalars as (steps, 1) arrays, as a vmapped run's."""
  stack = lambda *xs: jnp.stack(xs)[:, None]
  return stack(*losses), (jax.tree.map(stack, *diags) if diags[0] else {})


class OptaxPlan:
  """Trains members of one optax optimizer: vmapped, or one at a time."""

  def __init__(self, task: Task, spec: opt_lib.OptimizerSpec, execution: str):
    self.task, self.spec = task, spec
    self.vmapped = execution == "vmap"
    self.execution = execution
    injected, self._factory = opt_lib.make_injected(spec, task.hp,
                                                    task.num_steps)
    multiplier = task.schedule_multiplier(spec.scale)
    self._grad_fn = grad_fn = make_grad_fn(spec, task.loss_fn)
    swept, names = spec.swept, spec.step_diagnostics

    def init_member(params, value):
      return params, _set_hyperparam(injected.init(params), swept,
                                     value * multiplier(0))

    def member_step(params, opt_state, value, data, idx, step, key):
      batch = task.get_batch(data, idx)
      opt_state = _set_hyperparam(opt_state, swept, value * multiplier(step))
      loss, grads, extra = grad_fn(params, opt_state, batch,
                                   jax.random.fold_in(key, step))
      updates, opt_state = injected.update(grads, opt_state, params, **extra)
      diag = {n: optax.tree.get(opt_state, n) for n in names}
      return optax.apply_updates(params, updates), opt_state, loss, diag

    if self.vmapped:
      self._init = jax.jit(jax.vmap(init_member))
      step_all = jax.vmap(member_step, in_axes=(0, 0, 0, None, None, None,
                                                None))

      def interval(carry, values, data, idx, steps, key):
        def body(carry, xs):
          params, opt_state, loss, diag = step_all(*carry, values, data, *xs,
                                                   key)
          return (params, opt_state), (loss, diag)

        return jax.lax.scan(body, carry, (idx, steps))

      self._interval = jax.jit(interval, donate_argnums=(0,))
    else:
      self._init = jax.jit(init_member)
      self._step = jax.jit(member_step, donate_argnums=(0, 1))

  @staticmethod
  def recorded_hp(task: Task, spec: opt_lib.OptimizerSpec) -> Dict[str, Any]:
    return schema.clean(task.hp.get(spec.hp_key, {}))

  def start_seed(self, data, idx: np.ndarray) -> None:
    del data, idx  # every step gets its batch

  def init(self, params, values: np.ndarray):
    if self.vmapped:
      params = jax.tree.map(
          lambda x: jnp.broadcast_to(x, (len(values),) + x.shape).copy(),
          params)
      return self._init(params, jnp.asarray(values))
    (value,) = values
    # A copy: the donated step must not consume the seed's initial params.
    params = jax.tree.map(jnp.copy, params)
    return self._init(params, jnp.asarray(value, jnp.float32))

  def run(self, carry, values, data, idx: np.ndarray, steps: np.ndarray, key):
    """Trains `len(steps)` steps; (carry, losses (k, m), {name: (k, m)})."""
    if self.vmapped:
      carry, (loss, diag) = self._interval(
          carry, jnp.asarray(values), data, jnp.asarray(idx),
          jnp.asarray(steps), key)
      return carry, loss, diag
    (value,) = values
    value = jnp.asarray(value, jnp.float32)
    params, opt_state = carry
    losses, diags = [], []
    for i, step in zip(idx, steps):
      params, opt_state, loss, diag = self._step(
          params, opt_state, value, data, i, np.int32(step), key)
      losses.append(loss)
      diags.append(diag)
    return ((params, opt_state), *_stack_steps(losses, diags))

  @staticmethod
  def params(carry):
    return carry[0]

  def stepper(self, data, params, idx) -> Tuple[Callable[[int], float],
                                                Callable[[], int]]:
    """The plain (un-injected) step at the centre value, params donated."""
    tx = self._factory(self.task.centers[self.spec.scale])
    grad_fn, task = self._grad_fn, self.task

    def step(params, opt_state, batch, rng):
      loss, grads, extra = grad_fn(params, opt_state, batch, rng)
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    holder = [params, tx.init(params)]
    batch = task.get_batch(data, jnp.asarray(idx))
    rng = jax.random.key(7)

    def one():
      holder[0], holder[1], loss = step(holder[0], holder[1], batch, rng)
      return holder[0], loss

    return _timer(one), lambda: tree_bytes(holder[1])


class KfacPlan:
  """Trains K-FAC members one at a time through kfac-jax's own step."""

  vmapped = False
  execution = "sequential"  # kfac-jax compiles its own, un-vmapped step

  def __init__(self, task: Task, spec: opt_lib.OptimizerSpec, execution: str):
    del execution
    self.task, self.spec = task, spec
    # Host-side factors of the learning rate, one per step.
    self._multiplier = np.asarray(jax.vmap(task.schedule_multiplier(
        spec.scale))(jnp.arange(task.num_steps)), np.float64)
    self._opt, self._settings = kfac_baseline.make_optimizer(
        task.train_logits, task.tokens_per_example,
        **task.hp.get(spec.hp_key, {}))
    self.batch = jax.jit(task.get_batch)
    self._first = None  # this seed's first batches, for the burn-in.

  @staticmethod
  def recorded_hp(task: Task, spec: opt_lib.OptimizerSpec) -> Dict[str, Any]:
    """Every setting of kfac-jax's optimizer the benchmark passes."""
    return schema.clean(kfac_baseline.effective_settings(
        task.hp.get(spec.hp_key, {})))

  def start_seed(self, data, idx: np.ndarray) -> None:
    n = self._settings["num_burnin_steps"]
    self._first = [self.batch(data, i) for i in idx[: max(1, n)]]

  def init(self, params, values: np.ndarray):
    del values  # given to every step (`run`)
    params = jax.tree.map(jnp.copy, params)
    return kfac_baseline.Member(self._opt, self._settings, params,
                                jax.random.key(0), self._first)

  def run(self, member, values, data, idx, steps, key):
    (value,) = values
    losses, diags = [], []
    for i, step in zip(idx, steps):
      lr = value * self._multiplier[step]
      loss, diag = member.step(self.batch(data, i), lr,
                               jax.random.fold_in(key, step))
      losses.append(loss)
      diags.append(diag)
    return (member, *_stack_steps(losses, diags))

  @staticmethod
  def params(member):
    return member.params

  def stepper(self, data, params, idx):
    """kfac-jax's step at the centre value, after its burn-in."""
    del idx  # the burn-in's first batch is timed, as in training
    burnin = self.task.sampler(10_000).take(
        self._settings["num_burnin_steps"])
    self.start_seed(data, burnin)
    member = self.init(params, [])
    batch = self.batch(data, burnin[0])
    lr = self.task.centers[self.spec.scale]
    key = jax.random.key(7)

    def one():
      loss, _ = member.step(batch, lr, key)
      return member.params, loss

    return _timer(one), lambda: tree_bytes(member.state)


# OptimizerSpec.kind -> its plan.
PLANS = {"optax": OptaxPlan, "kfac": KfacPlan}


def make_plan(task: Task, spec: opt_lib.OptimizerSpec, execution: str):
  return PLANS[spec.kind](task, spec, execution)


def recorded_hp(task: Task, spec: opt_lib.OptimizerSpec) -> Dict[str, Any]:
  """The settings `spec`'s result records on `task` (as results.json has them)."""
  return PLANS[spec.kind].recorded_hp(task, spec)
