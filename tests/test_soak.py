"""Long runs stay finite: 20,000 steps per optimizer in one compiled scan.

A noisy, ill-conditioned least-squares problem (one Dense layer, input
scales 1..10, so a Hessian condition number of 100), with gradient spikes
(x1000 on every 997th step) and non-finite losses (NaN, +inf, -inf on every
1999th step, passed as `value=`) injected. In float32, and in bfloat16 with
float32 optimizer state. After 20,000 steps the params and the state are
finite, SOAA counts exactly the injected losses in `skipped_values`, and the
loss on a fixed evaluation batch ends below three quarters of its start.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_soaa
from optax_soaa import LayerStats

STEPS = 20_000
SPIKE_EVERY, SPIKE = 997, 1e3
BAD_LOSS_EVERY = 1999
IN, OUT, BATCH = 6, 3, 32
SCALES = jnp.linspace(1.0, 10.0, IN)
TRUE_W = jnp.linspace(-1.0, 1.0, IN * OUT).reshape(IN, OUT)


def _batch(step):
  kx, kn = jax.random.split(jax.random.fold_in(jax.random.key(0), step))
  x = jax.random.normal(kx, (BATCH, IN)) * SCALES
  y = x @ TRUE_W + 0.5 + 0.3 * jax.random.normal(kn, (BATCH, OUT))
  return x, y


def _loss(params, x, y):
  p = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  return 0.5 * jnp.mean(jnp.sum(jnp.square(x @ p["w"] + p["b"] - y), -1))


def _stats(params, x, y):
  """AdaFisher's statistics of the Dense layer, by hand."""
  p = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  delta = (x @ p["w"] + p["b"] - y) / BATCH  # ∂loss/∂y per row.
  h = jnp.mean(jnp.square(jnp.concatenate([x, jnp.ones((BATCH, 1))], 1)), 0)
  s = jnp.mean(jnp.square(delta), 0)
  return {"w": LayerStats(h, s, "kernel"), "b": LayerStats(h, s, "bias")}


def _bad_value(step, loss):
  kind = (step // BAD_LOSS_EVERY) % 3
  bad = jnp.array([jnp.nan, jnp.inf, -jnp.inf])[kind]
  return jnp.where((step % BAD_LOSS_EVERY == 0) & (step > 0), bad, loss)


OPTIMIZERS = {
    # Gradients here are O(10-100): where |g| > 1 SOAA's default Fisher term
    # (1 + r) ŝ outweighs sqrt(ŝ) and its step is about α / |g|, so it needs
    # a larger α than Adam on this problem.
    "soaa": lambda state_dtype: optax_soaa.soaa(
        5e-2, total_steps=STEPS, mu_dtype=state_dtype, nu_dtype=state_dtype),
    "soaa_variance": lambda state_dtype: optax_soaa.soaa(
        5e-2, total_steps=STEPS, curvature="variance", mu_dtype=state_dtype,
        nu_dtype=state_dtype),
    "arturo": lambda state_dtype: optax_soaa.arturo(
        0.0857, reg_weight=0.0587, prior_prec=0.0015,
        dynamic_model_noise=0.0174, measurement_noise=2.82,
        start_filter_cov=5e-5, nu=1.3),
    # F̃ ≈ λ = 1e-3, so AdaFisher steps like momentum SGD with step α/λ:
    # α = 1e-5 keeps α/λ below 2 / (largest curvature) of this problem.
    "adafisher": lambda state_dtype: optax_soaa.adafisher(
        1e-5, stats_every=10, mu_dtype=state_dtype),
}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_twenty_thousand_steps_stay_finite(name, dtype):
  dtype = jnp.dtype(dtype)
  tx = OPTIMIZERS[name](jnp.float32)
  params = {"w": jnp.zeros((IN, OUT), dtype), "b": jnp.zeros((OUT,), dtype)}
  eval_x, eval_y = _batch(STEPS)  # A batch no step trains on.

  @jax.jit
  def run(params):
    def body(carry, step):
      params, state = carry
      x, y = _batch(step)
      loss, grads = jax.value_and_grad(_loss)(params, x, y)
      spike = jnp.where((step % SPIKE_EVERY == 0) & (step > 0), SPIKE, 1.0)
      grads = jax.tree.map(lambda g: (g * spike).astype(g.dtype), grads)
      updates, state = tx.update(grads, state, params,
                                 value=_bad_value(step, loss),
                                 stats=_stats(params, x, y))
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(
        body, (params, tx.init(params)), jnp.arange(STEPS))
    return params, state

  final, state = run(params)
  chex.assert_tree_all_finite((final, state))
  chex.assert_trees_all_equal_dtypes(final, params)
  start, end = _loss(params, eval_x, eval_y), _loss(final, eval_x, eval_y)
  assert float(end) < 0.75 * float(start), (float(start), float(end))
  skipped = optax.tree.get(state, "skipped_values", default=None)
  if name.startswith("soaa"):
    assert int(skipped) == (STEPS - 1) // BAD_LOSS_EVERY
  else:
    assert skipped is None  # Only SOAA reads `value`.
