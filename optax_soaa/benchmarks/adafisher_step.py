"""Times AdaFisher's full train step against the same step with `optax.adam`.

    python -m optax_soaa.benchmarks.adafisher_step            # 21 pairs
    python -m optax_soaa.benchmarks.adafisher_step --quick    # 15 pairs, fewer steps

The step is forward, backward, (for AdaFisher) the layer statistics from
:func:`optax_soaa.flax.value_grad_and_stats`, `update` and `apply_updates`,
jitted with params and state donated, on the Fashion-MNIST CNN of the arTuRO
authors' protocol (three 3x3 convolutions 32/64/128 with ReLU, max-pooling
after the first two, dropout 0.2, Dense 256 with dropout 0.5, Dense 10) at
batch 255 on random 28x28x1 inputs. The two steps are timed interleaved in one
process (pairs of timings, alternating order); the ratio printed is the median
over pairs. Statistics are computed on every step (the helper does not know the
optimizer's refresh period), so this is the worst case of ``stats_every``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_soaa
from optax_soaa.flax import value_grad_and_stats

BATCH = 255


class FashionCNN(nn.Module):
  """The CNN of the arTuRO authors' Fashion-MNIST experiments."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(128, (3, 3))(x))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(256)(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(10)(x)


def build_steps():
  model = FashionCNN()
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)["params"]

  def loss_fn(params, x, y, key):
    logits = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  adam = optax.adam(1e-3)
  adafisher = optax_soaa.adafisher(1e-3)
  with_stats = value_grad_and_stats(loss_fn)

  def adam_step(params, state, x, y, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key)
    updates, state = adam.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  def adafisher_step(params, state, x, y, key):
    loss, grads, stats = with_stats(params, x, y, key)
    updates, state = adafisher.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss

  runners = {}
  for name, opt, step in (("adam", adam, adam_step), ("adafisher", adafisher, adafisher_step)):
    runners[name] = dict(
        step=jax.jit(step, donate_argnums=(0, 1)),
        carry=(jax.tree.map(jnp.copy, params), opt.init(params)),
    )
  return runners


def _time(runner, batches, key):
  params, state = runner["carry"]
  start = time.perf_counter()
  for i, (x, y) in enumerate(batches):
    params, state, loss = runner["step"](params, state, x, y, jax.random.fold_in(key, i))
  jax.block_until_ready((params, state, loss))
  runner["carry"] = (params, state)
  return time.perf_counter() - start


def run(pairs: int, steps: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  batches = [
      (jnp.asarray(rng.normal(size=(BATCH, 28, 28, 1)), jnp.float32),
       jnp.asarray(rng.integers(0, 10, size=(BATCH,)), jnp.int32))
      for _ in range(steps)
  ]
  key = jax.random.key(seed)
  runners = build_steps()
  for runner in runners.values():  # compile and warm up
    _time(runner, batches[:2], key)
  times = {name: [] for name in runners}
  ratios = []
  for p in range(pairs):
    order = ["adam", "adafisher"] if p % 2 == 0 else ["adafisher", "adam"]
    pair = {name: _time(runners[name], batches, key) / steps for name in order}
    for name, t in pair.items():
      times[name].append(t)
    ratios.append(pair["adafisher"] / pair["adam"])
  return {
      "adam_ms": 1e3 * statistics.median(times["adam"]),
      "adafisher_ms": 1e3 * statistics.median(times["adafisher"]),
      "ratio_median": statistics.median(ratios),
      "ratio_min": min(ratios),
      "ratio_max": max(ratios),
      "pairs": pairs,
      "steps_per_timing": steps,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="15 pairs of 3 steps")
  parser.add_argument("--pairs", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--json", default=None, help="also write the result here")
  args = parser.parse_args(argv)
  pairs = args.pairs or (15 if args.quick else 21)
  steps = args.steps or (3 if args.quick else 10)
  result = run(pairs, steps)
  result["device"] = str(jax.devices()[0].device_kind)
  result["machine"] = platform.processor() or platform.machine()
  print(
      f"Fashion-MNIST CNN train step, batch {BATCH}, {result['device']}: "
      f"adam {result['adam_ms']:.1f} ms, adafisher {result['adafisher_ms']:.1f} ms; "
      f"ratio adafisher/adam = {result['ratio_median']:.3f} "
      f"(median of {pairs} interleaved pairs; range "
      f"{result['ratio_min']:.3f}-{result['ratio_max']:.3f})"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
