"""Measurements of one step, apart from training (``python -m ...micro.NAME``).

* `update_step`: the optimizer update alone, on a 10M-parameter pytree, timed
  against Adam's, with XLA's bytes accessed;
* `adafisher_step`: AdaFisher's whole train step (statistics included) on the
  benchmark's CNN and language model, against Adam's;
* `baseline_costs`: what the baselines' costly parts cost on this backend
  (K-FAC's convolution input factor, Sophia's Hessian-vector product).

`common` holds what they share: the timing of a jitted call and the record of
the machine a measurement ran on. The old module paths
(``optax_soaa.benchmarks.update_step`` ...) still run them.
"""
