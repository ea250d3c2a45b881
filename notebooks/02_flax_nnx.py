# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # SOAA with Flax NNX: clipping and a warm-up/cosine schedule
#
# The same digits MLP as in `01_quickstart`, written with Flax NNX. SOAA
# needs the loss (`value=loss`); `nnx.Optimizer.update(model, grads, **kw)`
# forwards every keyword argument to the optax transformation, so that is the
# only change to an ordinary NNX training step.
#
# The second half composes SOAA with `optax.chain`: gradient clipping in
# front, and a warm-up + cosine-decay learning-rate schedule.
#
# **Install.** The next cell installs `optax_soaa` when it is not importable
# yet: from the repository checkout around this notebook if there is one
# (`pip install -e`), else by its name, `optax-soaa`. If pip upgrades jax or
# flax (on Colab), restart the runtime once and run on.

# %%
import importlib.util
import os
import pathlib

if importlib.util.find_spec("optax_soaa") is None:
  _root = next((p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents)
                if (p / "pyproject.toml").is_file()
                and (p / "optax_soaa").is_dir()), None)
  _package = f'-e "{_root}[examples]"' if _root else "optax-soaa[examples]"
  # %pip install -q {_package}

# %% [markdown]
# One variable sets the length of every training run below. CI sets
# `OPTAX_SOAA_NOTEBOOK_STEPS` to a few steps to check that the notebook runs;
# the default takes about a minute on a 2-core CPU.

# %%
NUM_STEPS = int(os.environ.get("OPTAX_SOAA_NOTEBOOK_STEPS", 600))

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import optax_soaa

# %% [markdown]
# ## Data and model
#
# Digits scaled to [0, 1], a quarter held out; an MLP as an `nnx.Module`.

# %%
digits = load_digits()
x_train, x_test, y_train, y_test = train_test_split(
    digits.data.astype(np.float32) / 16.0, digits.target.astype(np.int32),
    test_size=0.25, random_state=0, stratify=digits.target)
x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)


class MLP(nnx.Module):

  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))

# %% [markdown]
# ## The training step
#
# `optimizer.update(model, grads, value=loss)` is the whole SOAA-specific
# part. The step also returns, for the plots, the global gradient norm
# (before clipping) and SOAA's `dt`. In NNX the optimizer state is held in
# `nnx.OptState` variables; `optax.tree.get` still finds `dt` by name, and
# `[...]` reads the variable's value.

# %%
BATCH_SIZE = 64


@nnx.jit
def train_step(model, optimizer, key):
  idx = jax.random.choice(jax.random.fold_in(key, optimizer.step[...]),
                          x_train.shape[0], (BATCH_SIZE,), replace=False)
  x, y = x_train[idx], y_train[idx]

  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads, value=loss)
  dt = optax.tree.get(optimizer.opt_state, "dt", default=None)
  dt = jnp.nan if dt is None else dt[...]
  return loss, optax.global_norm(grads), dt


@nnx.jit
def test_accuracy(model):
  return jnp.mean(jnp.argmax(model(x_test), -1) == y_test)


def train(tx, num_steps=NUM_STEPS, seed=0):
  model = MLP(128, rngs=nnx.Rngs(0))  # the same initial weights every run
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  key = jax.random.key(seed)
  records = [train_step(model, optimizer, key) for _ in range(num_steps)]
  loss, grad_norm, dt = (np.asarray(jnp.stack(r)) for r in zip(*records))
  return model, optimizer, dict(loss=loss, grad_norm=grad_norm, dt=dt)

# %% [markdown]
# ## Plain SOAA
#
# A constant learning rate; `total_steps` tells SOAA how fast the bounds on
# `dt` narrow.

# %%
LEARNING_RATE = 1e-3
runs = {}
runs["SOAA"] = train(optax_soaa.soaa(LEARNING_RATE, total_steps=NUM_STEPS))

# %% [markdown]
# ## SOAA in a chain: clipping and a warm-up/cosine schedule
#
# * `optax.clip_by_global_norm` goes **in front of** SOAA, so SOAA's moments
#   and its predicted reduction see the clipped gradients.
# * The schedule goes **into** SOAA, as its `learning_rate`, and not into a
#   separate `optax.scale_by_schedule` after it: SOAA predicts the loss
#   reduction of the step it actually takes, so it must know the step size.
# * The loss passed as `value=` is the true (unclipped) loss; `chain` hands
#   the keyword to every member, and those that do not use it ignore it.
#
# Adam runs with the same clipping and schedule, for comparison.

# %%
CLIP_NORM = 0.5
schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=3 * LEARNING_RATE,
    warmup_steps=max(1, NUM_STEPS // 10), decay_steps=NUM_STEPS,
    end_value=0.1 * LEARNING_RATE)

runs["SOAA + clip + schedule"] = train(optax.chain(
    optax.clip_by_global_norm(CLIP_NORM),
    optax_soaa.soaa(schedule, total_steps=NUM_STEPS)))
runs["Adam + clip + schedule"] = train(optax.chain(
    optax.clip_by_global_norm(CLIP_NORM),
    optax.adam(schedule)))

for name, (model, _, hist) in runs.items():
  clipped = np.mean(hist["grad_norm"] > CLIP_NORM)
  print(f"{name:24s} mean loss of the last 20 steps "
        f"{hist['loss'][-20:].mean():.4f}   test accuracy "
        f"{float(test_accuracy(model)):.3f}   steps with gradient norm > "
        f"{CLIP_NORM}: {clipped:.0%}")

# %% [markdown]
# ## What happened
#
# Top left, the schedule; top right, the training loss (running mean over 20
# steps); bottom left, the gradient norm each step with the clipping
# threshold (steps above the line were scaled down to it); bottom right, the
# running mean of SOAA's `dt` for both SOAA runs.

# %%
def smooth(values, window=20):
  window = max(1, min(window, len(values)))
  return np.convolve(values, np.ones(window) / window, mode="valid")


colors = {"SOAA": "tab:blue", "SOAA + clip + schedule": "tab:green",
          "Adam + clip + schedule": "tab:gray"}
steps = np.arange(1, NUM_STEPS + 1)
fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)

ax = axes[0, 0]
ax.plot(steps, [schedule(s - 1) for s in steps], color="tab:green",
        label="warm-up + cosine")
ax.axhline(LEARNING_RATE, color="tab:blue", label="constant")
ax.set_title("learning rate")
ax.legend()

ax = axes[0, 1]
for name, (_, _, hist) in runs.items():
  sm = smooth(hist["loss"])
  ax.plot(steps[len(steps) - len(sm):], sm, color=colors[name], label=name)
ax.set_yscale("log")
ax.set_title("training loss (running mean)")
ax.legend()

ax = axes[1, 0]
for name, (_, _, hist) in runs.items():
  ax.plot(steps, hist["grad_norm"], ".", ms=2.5, alpha=0.5,
          color=colors[name], label=name)
ax.axhline(CLIP_NORM, color="k", ls="--", lw=1, label="clip threshold")
ax.set_yscale("log")
ax.set_title("global gradient norm (before clipping)")
ax.legend(markerscale=4, loc="lower left")

ax = axes[1, 1]
for name, (_, _, hist) in runs.items():
  if name.startswith("SOAA"):
    sm = smooth(hist["dt"])
    ax.plot(steps[len(steps) - len(sm):], sm, color=colors[name], label=name)
ax.axhline(1.0, color="k", lw=0.8, ls="--")
ax.set_title("SOAA dt (running mean)")
ax.legend()

for ax in axes.flat:
  ax.grid(alpha=0.3)
for ax in axes[1]:
  ax.set_xlabel("step")
fig.tight_layout()
plt.show()

# %% [markdown]
# The bounds on `dt` depend only on the step count and `total_steps`, so both
# SOAA runs move inside the same narrowing band: the schedule sets the size
# of the step, `dt` multiplies it. (For the plain SOAA run the clipping
# threshold is only a reference line: nothing clips its gradients.)
#
# The diagnostics are in the NNX optimizer's state exactly as with Linen:

# %%
_, optimizer, _ = runs["SOAA + clip + schedule"]
for name in ("dt", "predicted_reduction", "trust_ratio", "fisher_ratio",
             "skipped_values"):
  print(f"{name:20s} {optax.tree.get(optimizer.opt_state, name)[...]}")
