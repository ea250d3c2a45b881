"""Measures two costs of the baselines that XLA:CPU inflates, behind notes.

    python -m optax_soaa.benchmarks.baseline_costs --json results/baseline_costs_cpu.json
    python -m optax_soaa.benchmarks.baseline_costs --quick   # small shapes

Two measurements on the ``fmnist-cnn`` task's model (the arTuRO authors'
Fashion-MNIST CNN) at its batch of 255, on random inputs:

* **K-FAC's convolution input factor**: the second moment of the patches of
  the CNN's second convolution's input (255 x 13 x 13 x 32, 3x3 VALID),
  computed by ``kfac_jax.patches_moments`` (kfac-jax's own routine, a
  convolution whose kernel is the batch of images) and by the benchmark's
  explicit patches and one matrix product
  (``kfac_baseline``'s conv block). Skipped without kfac-jax.
* **Sophia's Hessian-vector product inside ``lax.cond``**: optax's Sophia
  estimates the Hessian every ``update_interval`` steps under a
  ``lax.cond``; the same forward-over-reverse product of the CNN's batch loss
  is timed on its own and as the taken branch of a ``lax.cond``, next to a
  plain gradient.

Each is jitted, warmed up, then timed as the median of ``--rounds`` calls.
"""

import argparse

import jax
import jax.numpy as jnp

from optax_soaa.benchmarks import kfac_baseline
from optax_soaa.benchmarks import models
from optax_soaa.benchmarks.micro import common


def conv_factor_seconds(batch, rounds):
  """{routine: seconds} of the conv input factor; None without kfac-jax."""
  if kfac_baseline.unavailable_reason():
    return None
  kfac_jax = kfac_baseline.import_kfac_jax()
  x = jax.random.normal(jax.random.key(0), (batch, 13, 13, 32))

  def explicit(x):
    p = jax.lax.conv_general_dilated_patches(
        x, (3, 3), (1, 1), "VALID",
        dimension_numbers=("NHWC", "OIHW", "NHWC"))
    p = p.reshape(-1, p.shape[-1])
    return p.T @ p

  def kfac_own(x):
    return kfac_jax.patches_moments(x, (3, 3), data_format="NHWC")[0]

  return {"kfac_jax.patches_moments": common.median_seconds(jax.jit(kfac_own), (x,),
                                                      rounds),
          "explicit patches": common.median_seconds(jax.jit(explicit), (x,), rounds)}


def hvp_seconds(batch, rounds):
  """{computation: seconds}: gradient, HVP, and the HVP under lax.cond."""
  model = models.FashionCNN()
  x = jax.random.uniform(jax.random.key(0), (batch, 28, 28, 1))
  y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
  params = model.init(jax.random.key(2), x[:1])

  def loss(p):
    logits = model.apply(p, x)
    return -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(logits), y[:, None], 1))

  signs = jax.tree.map(
      lambda a: jnp.sign(jax.random.normal(jax.random.key(3), a.shape)),
      params)

  def hvp(p, v):
    return jax.jvp(jax.grad(loss), (p,), (v,))[1]

  def hvp_in_cond(p, v, pred):
    return jax.lax.cond(pred, hvp, lambda p, v: v, p, v)

  return {
      "gradient": common.median_seconds(jax.jit(jax.grad(loss)), (params,), rounds),
      "hvp": common.median_seconds(jax.jit(hvp), (params, signs), rounds),
      "hvp in lax.cond": common.median_seconds(
          jax.jit(hvp_in_cond), (params, signs, jnp.bool_(True)), rounds),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="batch 8, 2 rounds (a smoke run)")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--json", default=None, help="also write the result here")
  args = parser.parse_args(argv)
  batch = 8 if args.quick else 255
  rounds = args.rounds or (2 if args.quick else 5)
  result = {"batch": batch, "rounds": rounds,
            "conv_input_factor_s": conv_factor_seconds(batch, rounds),
            "sophia_hvp_s": hvp_seconds(batch, rounds)}
  for name, res in (("K-FAC conv input factor", result["conv_input_factor_s"]),
                    ("Sophia's HVP", result["sophia_hvp_s"])):
    print(f"{name}: " + ("kfac-jax not available" if res is None else "; ".join(
        f"{k} {v * 1e3:.1f} ms" for k, v in res.items())))
  return common.recorded(result, "optax_soaa.benchmarks.baseline_costs", argv,
                         args.json)


if __name__ == "__main__":
  main()
