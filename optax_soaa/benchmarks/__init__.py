"""Benchmarks of optax_soaa's optimizers (the optimizers never import this).

``python -m optax_soaa.bench`` trains the optimizers on small tasks and
reports them; its package is a pipeline, one module per stage:

* ``tasks`` (data: ``data``, models: ``models``) and ``optimizers``: what is
  trained, and with what;
* ``plans``: how one optimizer trains (optax transformations and kfac-jax's
  K-FAC, ``kfac_baseline``, behind one interface);
* ``train``: the training loop, evaluation and step timing;
* ``pipeline``: one run as plan -> train -> record -> report;
* ``schema``: the typed results (``results.json``), with versions and
  migrations; ``summarize``: what the curves say; ``record``: the
  environment a run records;
* ``report``: tables, the summary across tasks, plots and BENCHMARKS.md.

``micro`` holds the step measurements apart from training
(``python -m optax_soaa.benchmarks.micro.update_step``, ``adafisher_step``,
``baseline_costs``).
"""
