"""Times AdaFisher's full train step against the same step with `optax.adam`.

    python -m optax_soaa.benchmarks.adafisher_step            # 21 rounds of 10 steps
    python -m optax_soaa.benchmarks.adafisher_step --quick    # 15 rounds of 3 steps

The step is forward, backward, (for AdaFisher) the layer statistics from
:func:`optax_soaa.value_grad_and_stats`, ``update`` and ``apply_updates``,
jitted with params and state donated, on two benchmark models:

* ``fmnist-cnn``: :class:`optax_soaa.benchmarks.models.FashionCNN` (the
  arTuRO authors' Fashion-MNIST CNN) at the task's batch 255 on random
  28x28x1 inputs;
* ``lm``: :class:`optax_soaa.benchmarks.models.TransformerLM` (width 128,
  2 blocks, 4 heads, context 128; the full ``lm`` task's) at batch 32.

Three steps per model: ``adam``; ``adafisher`` (``stats_every=100``, the
default, statistics computed only on refresh steps through
``stats_due=optax_soaa.stats_due(state)``); ``adafisher-every-step`` (the
same optimizer with statistics computed on every step, what the Flax helper
did before ``stats_due`` existed: the cost of a refresh step). The steps are
timed interleaved in one process (rounds in rotating order); each ratio is
the median over rounds of the AdaFisher time over Adam's. The ``adafisher``
runner refreshes at its natural rate (on its 1st, 101st, 201st... step); the
median over rounds is that of rounds without a refresh.
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_soaa
from optax_soaa.benchmarks import models
from optax_soaa.benchmarks.micro import common

STATS_EVERY = 100


def _cnn_task(rng):
  batch = 255
  model = models.FashionCNN()
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]

  def loss_fn(params, x, y, key):
    logits = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def batch_fn():
    return (jnp.asarray(rng.normal(size=(batch, 28, 28, 1)), jnp.float32),
            jnp.asarray(rng.integers(0, 10, size=(batch,)), jnp.int32))

  return dict(params=params, loss_fn=loss_fn, batch_fn=batch_fn,
              describe="FashionCNN, batch 255")


def _lm_task(rng):
  batch, seq_len, vocab = 32, 128, 256
  model = models.TransformerLM(vocab_size=vocab, width=128, num_layers=2,
                               num_heads=4, max_len=seq_len)
  params = model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"]

  def loss_fn(params, tokens, targets, key):
    del key
    logits = model.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def batch_fn():
    stream = rng.integers(0, vocab, size=(batch, seq_len + 1))
    return (jnp.asarray(stream[:, :-1], jnp.int32), jnp.asarray(stream[:, 1:], jnp.int32))

  return dict(params=params, loss_fn=loss_fn, batch_fn=batch_fn,
              describe="TransformerLM width 128, 2 blocks, context 128, batch 32")


TASKS = {"fmnist-cnn": _cnn_task, "lm": _lm_task}


def build_steps(task):
  params, loss_fn = task["params"], task["loss_fn"]
  adam = optax.adam(1e-3)
  adafisher = optax_soaa.adafisher(1e-3, stats_every=STATS_EVERY)
  collect = optax_soaa.value_grad_and_stats(loss_fn)

  def adam_step(params, state, x, y, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key)
    updates, state = adam.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  def adafisher_step(every_step):
    def step(params, state, x, y, key):
      due = True if every_step else optax_soaa.stats_due(state)
      loss, grads, extras = collect(params, x, y, key, stats_due=due)
      updates, state = adafisher.update(grads, state, params, **extras)
      return optax.apply_updates(params, updates), state, loss
    return step

  runners = {}
  for name, opt, step in (("adam", adam, adam_step),
                          ("adafisher", adafisher, adafisher_step(False)),
                          ("adafisher-every-step", adafisher, adafisher_step(True))):
    state = opt.init(params)
    runners[name] = dict(step=jax.jit(step, donate_argnums=(0, 1)),
                         carry=(jax.tree.map(jnp.copy, params), state))
  return runners


def _time(runner, batches, key):
  params, state = runner["carry"]
  start = time.perf_counter()
  for i, (x, y) in enumerate(batches):
    params, state, loss = runner["step"](params, state, x, y, jax.random.fold_in(key, i))
  jax.block_until_ready((params, state, loss))
  runner["carry"] = (params, state)
  return time.perf_counter() - start


def run_task(name: str, rounds: int, steps: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  task = TASKS[name](rng)
  batches = [task["batch_fn"]() for _ in range(steps)]
  key = jax.random.key(seed)
  runners = build_steps(task)
  for runner in runners.values():  # compile and warm up
    _time(runner, batches[:2], key)
  names = list(runners)
  times = {n: [] for n in names}
  ratios = {n: [] for n in names if n != "adam"}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    t = {n: _time(runners[n], batches, key) / steps for n in order}
    for n in names:
      times[n].append(t[n])
      if n != "adam":
        ratios[n].append(t[n] / t["adam"])
  return {
      "model": task["describe"],
      "ms": {n: 1e3 * statistics.median(v) for n, v in times.items()},
      "ratio_to_adam": {n: statistics.median(v) for n, v in ratios.items()},
      "ratio_range": {n: [min(v), max(v)] for n, v in ratios.items()},
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="15 rounds of 3 steps")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--tasks", default="fmnist-cnn,lm")
  parser.add_argument("--json", default=None, help="also write the result here")
  args = parser.parse_args(argv)
  rounds = args.rounds or (15 if args.quick else 21)
  steps = args.steps or (3 if args.quick else 10)
  result = {"stats_every": STATS_EVERY, "rounds": rounds, "steps_per_timing": steps,
            "tasks": {}}
  for name in args.tasks.split(","):
    res = run_task(name, rounds, steps)
    result["tasks"][name] = res
    print(f"{name} ({res['model']}): adam {res['ms']['adam']:.1f} ms; "
          + "; ".join(f"{n} {res['ms'][n]:.1f} ms = {r:.3f}x adam"
                      for n, r in res["ratio_to_adam"].items())
          + f" (median of {rounds} interleaved rounds)")
  return common.recorded(result, "optax_soaa.benchmarks.adafisher_step", argv,
                         args.json)


if __name__ == "__main__":
  main()
