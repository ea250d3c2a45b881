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
# # AdaFisher on a small CNN, with statistics from an unmodified model
#
# [AdaFisher](https://arxiv.org/abs/2405.16397) (ICLR 2025) preconditions each layer with
# a diagonal approximation of its Fisher information: `F[i, o] ~ H[i] * S[o]`,
# where `H` is the mean squared *input* of the layer and `S` the mean squared
# gradient of the loss with respect to its *output* (LayerNorm and BatchNorm
# get the authors' own two-number formula). Those are per-layer statistics
# that a plain `jax.grad` does not give you.
# `optax_soaa.value_grad_and_stats` computes them in the same forward and
# backward pass as the loss and the gradients: it finds the layers in the
# jaxpr of your loss function, so any JAX model works unchanged (Flax here;
# the README shows Equinox). It returns the extra arguments of the update:
# `tx.update(grads, state, params, **extras)`.
#
# This notebook trains a small CNN on the 8x8 digits with AdaFisher and with
# Adam, then looks at the curvature AdaFisher learned.
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
# the default takes a minute or two on a 2-core CPU.

# %%
NUM_STEPS = int(os.environ.get("OPTAX_SOAA_NOTEBOOK_STEPS", 400))

# %%
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import optax_soaa

# %% [markdown]
# ## Data and model
#
# The digits as 8x8x1 images; two 3x3 convolutions (the second with stride
# 2), a Dense layer, a LayerNorm and the output Dense layer.

# %%
digits = load_digits()
x_train, x_test, y_train, y_test = train_test_split(
    digits.images.astype(np.float32)[..., None] / 16.0,
    digits.target.astype(np.int32), test_size=0.25, random_state=0,
    stratify=digits.target)
x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    x = nn.LayerNorm()(x)
    return nn.Dense(10)(x)


model = CNN()
params = model.init(jax.random.key(0), x_train[:1])["params"]
print(jax.tree.map(jnp.shape, params))

# %% [markdown]
# ## Loss, gradients and statistics in one call
#
# `value_grad_and_stats(fun)` is used like `jax.value_and_grad(fun)`. `fun`
# takes the params first and calls `model.apply` inside. The function it
# returns gives a third value, `extras = {"value": loss, "stats": stats}`,
# where `stats` is a tree shaped like `params` with a `LayerStats(h, s)` at
# each leaf that has statistics. `describe_stats` says which leaves those are
# (and, for any other, why not).

# %%
def loss_fn(params, x, y):
  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


loss_grads_and_stats = optax_soaa.value_grad_and_stats(loss_fn)
print(optax_soaa.describe_stats(loss_fn, params, x_train[:64], y_train[:64]))

loss, grads, extras = jax.jit(loss_grads_and_stats)(params, x_train[:64],
                                                    y_train[:64])
print("loss", loss)
for layer, leaves in extras["stats"].items():
  for name, st in leaves.items():
    print(f"{layer:11s} {name:6s} {str(params[layer][name].shape):10s} "
          f"h: {str(st.h.shape):6s} s: {st.s.shape}  ({st.kind}, {st.part})")

# %% [markdown]
# ## Training AdaFisher and Adam side by side
#
# One jitted step serves every optimizer: it passes `**extras`, which
# optimizers that do not use them (Adam) ignore. `stats_due` reads from the
# optimizer state whether the next update refreshes AdaFisher's running
# averages (every `stats_every` steps; 10 here, 100 by default), and the
# statistics are computed only then; on the other steps the call is a plain
# `jax.value_and_grad`.
#
# With the authors' coefficients (the defaults) each layer's Fisher settles
# at `F̃ = λ (1 + a few per cent)`: AdaFisher steps like momentum SGD with
# step `learning_rate / λ`, the layer curvature modulating it slightly. A
# third run gives AdaFisher no statistics at all: every layer then uses the
# fallback, by default `fallback="identity"` (`F̃ = 1`), i.e. steps `1/λ =
# 1000` times smaller. It shows why every layer kind a model uses gets
# statistics (dense, convolution, embeddings, every normalisation), why a leaf
# still without them raises `optax_soaa.StatsFallbackWarning`, and why such a
# leaf deserves `fallback="adam"`.

# %%
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
EVAL_EVERY = max(1, NUM_STEPS // 20)


def make_step(tx, use_stats=True):

  @jax.jit
  def step(params, opt_state, key, count):
    idx = jax.random.choice(jax.random.fold_in(key, count), x_train.shape[0],
                            (BATCH_SIZE,), replace=False)
    due = optax_soaa.stats_due(opt_state) if use_stats else False
    loss, grads, extras = loss_grads_and_stats(
        params, x_train[idx], y_train[idx], stats_due=due)
    if not use_stats:
      extras = {"value": loss}
    updates, opt_state = tx.update(grads, opt_state, params, **extras)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


@jax.jit
def test_accuracy(params):
  return jnp.mean(jnp.argmax(model.apply({"params": params}, x_test), -1)
                  == y_test)


def train(tx, use_stats=True, num_steps=NUM_STEPS, seed=0):
  step = make_step(tx, use_stats)
  p, opt_state, key = params, tx.init(params), jax.random.key(seed)
  losses, evals = [], []
  for i in range(num_steps):
    p, opt_state, loss = step(p, opt_state, key, i)
    losses.append(loss)
    if (i + 1) % EVAL_EVERY == 0 or i + 1 == num_steps:
      evals.append((i + 1, float(test_accuracy(p))))
  return dict(params=p, opt_state=opt_state, loss=np.asarray(jnp.stack(losses)),
              evals=np.array(evals))


runs = {
    "Adam": train(optax.adam(LEARNING_RATE)),
    "AdaFisher": train(optax_soaa.adafisher(LEARNING_RATE, stats_every=10)),
}
# Without statistics on purpose: the optimizer's StatsFallbackWarning (which
# names the leaves that fall back) is expected here, so it is silenced.
with warnings.catch_warnings():
  warnings.simplefilter("ignore", optax_soaa.StatsFallbackWarning)
  runs["AdaFisher without stats"] = train(
      optax_soaa.adafisher(LEARNING_RATE, stats_every=10), use_stats=False)
for name, run in runs.items():
  print(f"{name:24s} mean loss of the last 20 steps "
        f"{run['loss'][-20:].mean():.4f}   final test accuracy "
        f"{run['evals'][-1, 1]:.3f}")

# %%
def smooth(values, window=20):
  window = max(1, min(window, len(values)))
  return np.convolve(values, np.ones(window) / window, mode="valid")


colors = {"Adam": "tab:gray", "AdaFisher": "tab:red",
          "AdaFisher without stats": "tab:pink"}
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4))
for name, run in runs.items():
  steps = np.arange(1, len(run["loss"]) + 1)
  sm = smooth(run["loss"])
  ax_loss.plot(steps[len(steps) - len(sm):], sm, color=colors[name],
               label=name)
  ax_acc.plot(run["evals"][:, 0], run["evals"][:, 1], "o-", ms=3,
              color=colors[name], label=name)
ax_loss.set(yscale="log", xlabel="step", title="training loss (running mean)")
ax_acc.set(xlabel="step", title="test accuracy", ylim=(0, 1))
for ax in (ax_loss, ax_acc):
  ax.grid(alpha=0.3)
  ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The curvature AdaFisher learned
#
# AdaFisher's state keeps, for every layer, the running averages `H` and `S`
# of the min-max-normalised statistics (`optax.tree.get(state, "h")`). The
# preconditioner of a kernel entry `W[i, o]` is `H[i] S[o] + damping`, and
# the step on it is divided by that. With the default coefficients
# `H S <= 7.6e-5`, below the damping (`1e-3`): the damping sets the scale of
# the step (`learning_rate / damping`) and the measured curvature can shorten
# it by at most 7.6 %. The printout at the end shows how far below that bound
# a run may stay: the output-gradient statistic of a batch-mean loss is
# small (δ carries the 1/batch of the mean), and where the range of `s` is
# not large against the `1e-6` that min-max normalisation adds to it,
# `minmax(s)` and so `S` stay far below their bound (`max S` below).
#
# Left: `H S` for the last Dense layer (64 normalised hidden units to 10
# classes): which output classes and which hidden units carry the curvature.
# Right: for each layer, the spread of `H S / damping` over its kernel
# entries (boxes: the middle half; whiskers: the rest, outliers left out);
# the dashed line is where curvature and damping would weigh the same. The
# printout below gives the numbers for this run.

# %%
DAMPING = 1e-3  # adafisher's default, used above
state = runs["AdaFisher"]["opt_state"]
H_all, S_all = optax.tree.get(state, "h"), optax.tree.get(state, "s")


def kernel_fisher(layer):
  """H S (without damping), laid out (fan_in, out)."""
  return np.outer(np.asarray(H_all[layer]["kernel"]),
                  np.asarray(S_all[layer]["kernel"]))


fisher = kernel_fisher("Dense_1")
order = np.argsort(-fisher.sum(axis=1))  # hidden units, most curved first
floor = 1e-6 * max(fisher.max(), 1e-30)
fig, (ax_map, ax_box) = plt.subplots(
    1, 2, figsize=(13, 4.2), gridspec_kw=dict(width_ratios=[3, 1.6]))
im = ax_map.imshow(np.maximum(fisher[order].T, floor), aspect="auto",
                   cmap="magma", norm="log")
ax_map.set(xlabel="hidden unit (sorted by total curvature)", ylabel="class",
           yticks=range(10), title="last layer: H S")
fig.colorbar(im, ax=ax_map)

layers = [l for l in params if "kernel" in params[l]]
log_ratios = [np.log10(np.maximum(kernel_fisher(l).ravel() / DAMPING, 1e-12))
              for l in layers]
ax_box.boxplot(log_ratios, showfliers=False)
ax_box.set_xticks(range(1, len(layers) + 1), layers)
ax_box.axhline(0.0, color="k", ls="--", lw=1)
ax_box.set(ylabel="log10(H S / damping)", title="per layer, all kernel entries")
ax_box.grid(alpha=0.3, axis="y")
fig.tight_layout()
plt.show()
for layer in layers:
  ratio = kernel_fisher(layer) / DAMPING
  print(f"{layer:8s} H S / damping: median {np.median(ratio):.3g}, "
        f"max {ratio.max():.3g}; above 1 for {np.mean(ratio > 1):.1%} "
        f"of the entries; max H {np.max(H_all[layer]['kernel']):.3g}, "
        f"max S {np.max(S_all[layer]['kernel']):.3g} (bound 0.0087)")
