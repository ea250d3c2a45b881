"""Optimizers, a small model and a train step shared by the reliability tests.

Also imported by `_checkpoint_resume.py`, which runs in a fresh process: the
code that continues a restored run must be the code that ran the
uninterrupted one, so it lives here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import optax_soaa

@dataclasses.dataclass(frozen=True)
class Spec:
  """How to build an optimizer and what its `update` needs.

  Attributes:
    make: factory; keyword overrides (dtypes, weight decay) go to the alias.
    extra: "value" (pass the loss), "stats" (AdaFisher statistics) or None.
    needs_params: `update` cannot run without `params`.
    zero_grad_zero_update: from the initial state a zero gradient gives a
      zero update (checked by the property tests when True).
    trust_fields: names of the global trust-region scalars in the state.
  """

  make: Callable[..., optax.GradientTransformationExtraArgs]
  extra: Optional[str] = None
  needs_params: bool = False
  zero_grad_zero_update: bool = False
  trust_fields: tuple[str, ...] = ()


def _soaa(curvature):
  def make(**kw):
    return optax_soaa.soaa(1e-2, total_steps=100, curvature=curvature, **kw)
  return make


def _arturo(**kw):
  # The reference's Fashion-MNIST values (see arturo's docstring).
  return optax_soaa.arturo(
      0.0857, reg_weight=0.0587, prior_prec=0.0015,
      dynamic_model_noise=0.0174, measurement_noise=2.82,
      start_filter_cov=5e-5, nu=1.3, **kw)


def _adafisher(fallback):
  def make(**kw):
    return optax_soaa.adafisher(1e-2, stats_every=2, fallback=fallback, **kw)
  return make


_SOAA_TRUST_FIELDS = ("dt", "loss_avg", "predicted_reduction", "trust_ratio",
                      "fisher_ratio")

SPECS: dict[str, Spec] = {
    "soaa": Spec(
        _soaa("second_moment"), extra="value", zero_grad_zero_update=True,
        trust_fields=_SOAA_TRUST_FIELDS,
    ),
    "soaa_variance": Spec(
        _soaa("variance"), extra="value", zero_grad_zero_update=True,
        trust_fields=_SOAA_TRUST_FIELDS,
    ),
    "arturo": Spec(_arturo, needs_params=True, trust_fields=("eta", "kl")),
    "adafisher": Spec(
        _adafisher("identity"), extra="stats", zero_grad_zero_update=True),
    "adafisher_adam": Spec(
        _adafisher("adam"), extra="stats", zero_grad_zero_update=True),
}

NAMES = tuple(SPECS)
# One configuration per algorithm, for the tests whose subject does not
# depend on the variant (each optimizer costs a compilation per test).
CORE = ("soaa", "arturo", "adafisher")


def update(spec: Spec, tx, grads, state, params, *, value=None, stats=None):
  """Calls `tx.update` with the extra arguments `spec` says it takes."""
  kwargs = {}
  if spec.extra == "value" and value is not None:
    kwargs["value"] = value
  if spec.extra == "stats" and stats is not None:
    kwargs["stats"] = stats
  return tx.update(grads, state, params, **kwargs)


# --- A small regression problem: two Dense layers, data drawn per step. ---

class MLP(nn.Module):
  hidden: int = 8

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(self.hidden)(x))
    return nn.Dense(1)(x)[..., 0]


MODEL = MLP()
IN_DIM = 4
BATCH = 16


def init_params(seed: int = 0):
  return MODEL.init(jax.random.PRNGKey(seed), jnp.zeros((1, IN_DIM)))["params"]


def batch_at(seed: int, step) -> tuple[jax.Array, jax.Array]:
  """The batch of `step`: a function of (seed, step) only, so a resumed run
  sees exactly the data of an uninterrupted one."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed + 1000), step)
  kx, kn = jax.random.split(key)
  x = jax.random.normal(kx, (BATCH, IN_DIM))
  y = jnp.sin(x @ jnp.arange(1.0, IN_DIM + 1.0)) + 0.1 * jax.random.normal(kn, (BATCH,))
  return x, y


def loss_fn(params, x, y):
  pred = MODEL.apply({"params": params}, x)
  return jnp.mean(jnp.square(pred - y))


def make_train_step(name: str, tx):
  """A jitted `(params, opt_state, step, seed) -> (params, opt_state, loss)`.

  `step` and `seed` are traced: one compilation serves every step and seed.
  """
  spec = SPECS[name]
  if spec.extra == "stats":
    import optax_soaa.flax  # pylint: disable=g-import-not-at-top
    value_grad = optax_soaa.flax.value_grad_and_stats(loss_fn)
  else:
    plain = jax.value_and_grad(loss_fn)
    value_grad = lambda *a: (*plain(*a), None)

  @jax.jit
  def train_step(params, opt_state, step, seed):
    x, y = batch_at(seed, step)
    loss, grads, stats = value_grad(params, x, y)
    updates, opt_state = update(
        spec, tx, grads, opt_state, params, value=loss, stats=stats
    )
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


@functools.lru_cache(maxsize=None)
def default_train_step(name: str):
  """The train step of `SPECS[name].make()`, compiled once per process."""
  return make_train_step(name, SPECS[name].make())


def run(name: str, params, opt_state, start: int, stop: int, seed: int = 0,
        tx=None):
  """Steps `start..stop-1`; returns params, state and the losses.

  With `tx=None` the optimizer is `SPECS[name].make()` and its compiled step is
  reused across calls; pass `tx` for other options (compiles again).
  """
  if tx is None:
    train_step = default_train_step(name)
  else:
    train_step = make_train_step(name, tx)
  losses = []
  for step in range(start, stop):
    params, opt_state, loss = train_step(
        params, opt_state, jnp.int32(step), jnp.int32(seed))
    losses.append(loss)
  return params, opt_state, jnp.stack(losses) if losses else jnp.zeros([0])


def state_bytes(tree: Any) -> int:
  """Bytes held by the arrays of a pytree (arrays or ShapeDtypeStructs)."""
  return sum(
      int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
  )
