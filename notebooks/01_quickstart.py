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
# # SOAA quickstart: a Flax Linen MLP on the digits data set
#
# [SOAA](https://arxiv.org/abs/2410.02293) is Adam with a *trust region*: a
# global multiplier `dt` grows when the loss falls as much as the optimizer
# predicted and shrinks when it does not. To do that it needs the loss, which
# you pass to `update` as `value=loss`. Everything else is ordinary optax.
#
# This notebook trains a small MLP on scikit-learn's 8x8 digits with SOAA and
# with Adam (same learning rate, same batches), then shows how to read the
# trust-region diagnostics that SOAA keeps in its state.
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
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import optax_soaa
import optax_soaa.flax

print("devices:", jax.devices())

# %% [markdown]
# ## Data and model
#
# 1797 grey-scale 8x8 digits, pixel values 0..16 scaled to [0, 1]; a quarter
# is held out for testing. The model is a two-layer MLP.

# %%
digits = load_digits()
x_train, x_test, y_train, y_test = train_test_split(
    digits.data.astype(np.float32) / 16.0, digits.target.astype(np.int32),
    test_size=0.25, random_state=0, stratify=digits.target)
x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
print("train", x_train.shape, "test", x_test.shape)


class MLP(nn.Module):
  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


model = MLP()
params = model.init(jax.random.key(0), x_train[:1])["params"]
print("parameters:", sum(p.size for p in jax.tree.leaves(params)))

# %% [markdown]
# ## The training step
#
# `optax_soaa.flax.TrainState` is Flax's `TrainState` with one difference:
# keyword arguments of `apply_gradients` that are not fields of the state
# (here `value=loss`) are forwarded to `tx.update`. Flax's own class would
# try to store them as fields instead.
#
# SOAA also wants `total_steps`: the bounds on `dt` narrow towards 1 over
# that many steps. The same step function serves Adam, which ignores `value`.
#
# Each step draws its mini-batch from a key folded with the step number, so
# both optimizers see exactly the same batches. The step returns the
# diagnostics we want to plot; `optax.tree.get` finds a field by name
# anywhere in the (chained) optimizer state.

# %%
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
DIAGNOSTICS = ("dt", "predicted_reduction", "trust_ratio", "fisher_ratio",
               "skipped_values")


def loss_fn(params, apply_fn, x, y):
  logits = apply_fn({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@jax.jit
def train_step(state, key):
  idx = jax.random.choice(jax.random.fold_in(key, state.step),
                          x_train.shape[0], (BATCH_SIZE,), replace=False)
  loss, grads = jax.value_and_grad(loss_fn)(
      state.params, state.apply_fn, x_train[idx], y_train[idx])
  state = state.apply_gradients(grads=grads, value=loss)
  diagnostics = {name: optax.tree.get(state.opt_state, name, default=jnp.nan)
                 for name in DIAGNOSTICS}
  return state, loss, diagnostics


@jax.jit
def test_accuracy(params):
  logits = model.apply({"params": params}, x_test)
  return jnp.mean(jnp.argmax(logits, -1) == y_test)


def train(tx, num_steps=NUM_STEPS, seed=0):
  state = optax_soaa.flax.TrainState.create(
      apply_fn=model.apply, params=params, tx=tx)
  key = jax.random.key(seed)
  losses, diags = [], []
  for _ in range(num_steps):
    state, loss, diag = train_step(state, key)
    losses.append(loss)
    diags.append(diag)
  # One transfer at the end, instead of a device-to-host sync every step.
  history = jax.device_get({"loss": jnp.stack(losses),
                            **jax.tree.map(lambda *v: jnp.stack(v), *diags)})
  return state, history


optimizers = {
    "Adam": optax.adam(LEARNING_RATE),
    "SOAA": optax_soaa.soaa(LEARNING_RATE, total_steps=NUM_STEPS),
}
states, histories = {}, {}
for name, tx in optimizers.items():
  states[name], histories[name] = train(tx)
  print(f"{name:5s} final train loss {histories[name]['loss'][-20:].mean():.4f}"
        f"   test accuracy {float(test_accuracy(states[name].params)):.3f}")

# %% [markdown]
# ## Loss curves
#
# Mini-batch losses are noisy, so the plot shows a running mean over 20
# steps (the raw values faintly behind it).

# %%
def smooth(values, window=20):
  window = max(1, min(window, len(values)))
  return np.convolve(values, np.ones(window) / window, mode="valid")


colors = {"Adam": "tab:gray", "SOAA": "tab:blue"}
fig, ax = plt.subplots(figsize=(7, 4))
for name, hist in histories.items():
  steps = np.arange(1, len(hist["loss"]) + 1)
  ax.plot(steps, hist["loss"], color=colors[name], alpha=0.2, lw=0.8)
  sm = smooth(hist["loss"])
  ax.plot(steps[len(steps) - len(sm):], sm, color=colors[name], lw=2,
          label=f"{name} (test acc. {float(test_accuracy(states[name].params)):.3f})")
ax.set(yscale="log", xlabel="step", ylabel="training loss (cross-entropy)",
       title=f"Digits MLP, learning rate {LEARNING_RATE:g}, batch {BATCH_SIZE}")
ax.grid(alpha=0.3, which="both")
ax.legend()
plt.show()

# %% [markdown]
# ## Reading SOAA's diagnostics
#
# SOAA keeps its trust-region bookkeeping in the first element of the chain
# state (an `optax_soaa.SOAAState`); you never need to index it by hand:
# `optax.tree.get(opt_state, "dt")` finds the field by name through `chain`,
# `inject_hyperparams`, `MultiSteps` and friends.

# %%
soaa_state = states["SOAA"].opt_state
print(type(soaa_state[0]).__name__, "fields:", soaa_state[0]._fields)
for name in DIAGNOSTICS:
  print(f"{name:20s} {optax.tree.get(soaa_state, name)}")

# %% [markdown]
# What each one means (all are scalars for the whole model):
#
# * **`dt`**, the trust-region multiplier. It starts at 1 and is multiplied
#   each step by the trust ratio, then clipped to
#   `[(1-gamma)**((t-1)/T), 1 + gamma**((t-1)/T)]` with `T = total_steps`:
#   `[1, 2]` at the first step, narrowing to `[0.9, 1.1]` at step `T`
#   (`gamma = 0.1`). Above 1 the quadratic model has been predicting the loss
#   well and steps get longer than Adam's; below 1, shorter.
# * **`predicted_reduction`**: how much the quadratic model predicted the step
#   before the last would lower the loss (in loss units, so comparable with
#   the loss). It is formed one update late, in the next update's first pass:
#   it is the reduction the last `trust_ratio` divided by.
# * **`trust_ratio`**: observed over predicted reduction, where "observed" is
#   the running-average loss minus the current loss. Near 1: the model is
#   trustworthy; much below 1 (or negative): it over-promised.
# * **`fisher_ratio`**: `r = sum(m_hat**2) / sum(v_hat + eps)`, a global
#   signal-to-noise ratio of the gradients. SOAA's curvature is `(1 + r) v_hat`,
#   so a large `r` makes steps more cautious.
# * **`skipped_values`**: how many non-finite losses were ignored. A NaN
#   `value` leaves `dt` and the loss average untouched instead of poisoning
#   them.

# %% [markdown]
# With mini-batch losses the observed reduction is noisy, so `dt` behaves
# like a bang-bang controller: most steps push it against one of its bounds.
# The dots are the per-step values; the line is a running mean over 20 steps
# for `dt` (the average factor by which SOAA's step differs from Adam's,
# where `sqrt(s_hat) > dt F`) and a running median for the others, whose
# outliers would swamp a mean.

# %%
h = histories["SOAA"]
steps = np.arange(1, len(h["dt"]) + 1)


def running_median(values, window=20):
  window = max(1, min(window, len(values)))
  return np.median(np.lib.stride_tricks.sliding_window_view(values, window),
                   axis=-1)


def dots_and_mean(ax, values, label=None, median=True):
  ax.plot(steps, values, ".", ms=2.5, alpha=0.35, color="tab:blue")
  sm = running_median(values) if median else smooth(values)
  ax.plot(steps[len(steps) - len(sm):], sm, color="tab:blue", lw=2,
          label=label)


fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
ax = axes[0, 0]
gamma, t = 0.1, steps - 1
ax.fill_between(steps, (1 - gamma) ** (t / NUM_STEPS),
                1 + gamma ** (t / NUM_STEPS), color="tab:orange", alpha=0.12,
                label="allowed range")
dots_and_mean(ax, h["dt"], label="running mean", median=False)
ax.axhline(1.0, color="k", lw=0.8, ls="--")
ax.set_title("dt (trust-region multiplier)")
ax.legend(loc="upper right")

ax = axes[0, 1]
dots_and_mean(ax, h["trust_ratio"])
ax.axhline(1.0, color="k", lw=0.8, ls="--")
ax.set_yscale("symlog", linthresh=1.0)
ax.set_title("trust ratio: observed / predicted reduction")

ax = axes[1, 0]
dots_and_mean(ax, h["predicted_reduction"])
ax.set_yscale("log")
ax.set_title("predicted reduction of the last step")

ax = axes[1, 1]
dots_and_mean(ax, h["fisher_ratio"])
ax.set_yscale("log")
ax.set_title("fisher ratio r")

for ax in axes.flat:
  ax.grid(alpha=0.3)
for ax in axes[1]:
  ax.set_xlabel("step")
fig.suptitle("SOAA diagnostics, one value per step")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## A bad loss is skipped, not absorbed
#
# Feed one NaN loss by hand: the moments still update from the gradients,
# but `dt` keeps its value and `skipped_values` counts the event.

# %%
@jax.jit
def step_with_nan_loss(state):
  grads = jax.grad(loss_fn)(state.params, state.apply_fn,
                            x_train[:BATCH_SIZE], y_train[:BATCH_SIZE])
  return state.apply_gradients(grads=grads, value=jnp.nan)


state = step_with_nan_loss(states["SOAA"])
for name in ("dt", "skipped_values"):
  print(f"{name:15s} before {optax.tree.get(states['SOAA'].opt_state, name)}"
        f"   after {optax.tree.get(state.opt_state, name)}")
