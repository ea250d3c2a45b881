"""Benchmarks of optax_soaa's optimizers (the optimizers never import this).

* `optax_soaa.bench` (``python -m optax_soaa.bench``): training benchmarks
  with learning-rate sweeps, tables and plots (modules ``data``, ``models``,
  ``tasks``, ``optimizers``, ``runner``, ``report``).
* ``python -m optax_soaa.benchmarks.update_step``: the optimizer-step speed
  benchmark on a 10M-parameter pytree.
"""
