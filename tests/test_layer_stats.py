"""The core statistics collector, optax_soaa.value_grad_and_stats, on models of
several libraries: plain jax.numpy, Equinox, scanned stacks, DenseGeneral,
remat, vmap, stats_due.

References are computed independently of the collector: each model is written
again with explicit additive zero perturbations at its layer outputs, whose
gradients are the δ, and with its layer inputs returned; h and s then follow
in NumPy (patch loops for the convolutions).
"""


import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_soaa
from optax_soaa import LayerLayout
from tests.test_adafisher_stats import np_conv_h
from tests.test_adafisher_stats import np_dense_h
from tests.test_adafisher_stats import np_layernorm_reference
from tests.test_adafisher_stats import np_s

RTOL = 2e-5


def _rng_tree(rng, shapes):
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


# ------------------------------------------------------------- plain JAX MLP


def _mlp(params, x, eps=None):
  """Dense with bias, Dense without bias on a (B, T, D) input, x @ w.T."""
  eps = eps or {}
  inputs = {}
  y = x @ params["w1"] + params["b1"]
  inputs["w1"] = x
  y = jnp.tanh(y + eps.get("w1", 0.0))
  inputs["w2"] = y
  y = jnp.tanh(y @ params["w2"] + eps.get("w2", 0.0))
  inputs["w3"] = y = y.mean(axis=1)
  y = y @ params["w3"].T  # an (out, in) kernel, PyTorch's layout
  return y + eps.get("w3", 0.0), inputs


MLP_SHAPES = {"w1": (3, 5), "b1": (5,), "w2": (5, 4), "w3": (2, 4)}


def _mlp_loss(params, x, t):
  out, _ = _mlp(params, x)
  return jnp.mean((out - t) ** 2) + 0.1 * jnp.mean(out**4)


def test_plain_jax_mlp_matches_hand_computed():
  rng = np.random.default_rng(0)
  params = _rng_tree(rng, MLP_SHAPES)
  x = jnp.asarray(rng.normal(size=(6, 7, 3)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
  (loss, grads, extras) = jax.jit(optax_soaa.value_grad_and_stats(_mlp_loss))(params, x, t)
  ref_loss, ref_grads = jax.value_and_grad(_mlp_loss)(params, x, t)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_array_equal(extras["value"], loss)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6)

  def perturbed(eps):
    out, inputs = _mlp(params, x, eps)
    return jnp.mean((out - t) ** 2) + 0.1 * jnp.mean(out**4), inputs

  _, inputs = _mlp(params, x)
  eps0 = {"w1": jnp.zeros((6, 7, 5)), "w2": jnp.zeros((6, 7, 4)), "w3": jnp.zeros((6, 2))}
  deltas, _ = jax.grad(perturbed, has_aux=True)(eps0)
  stats = extras["stats"]
  for name, bias in (("w1", True), ("w2", False), ("w3", False)):
    np.testing.assert_allclose(stats[name].h, np_dense_h(inputs[name], bias), rtol=RTOL)
    np.testing.assert_allclose(stats[name].s, np_s(deltas[name]), rtol=RTOL)
    assert stats[name].kind == "dense"
  np.testing.assert_allclose(stats["b1"].s, stats["w1"].s)
  assert stats["b1"].part == "bias"
  assert stats["w3"].layout(2) == LayerLayout((), (1,), (0,))
  assert stats["w1"].layout(2) == LayerLayout((), (0,), (1,))


# ------------------------------------------------------------------ Equinox


def _eqx_cnn(key):
  k = jax.random.split(key, 4)

  class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    linear: eqx.nn.Linear
    norm: eqx.nn.LayerNorm

    def __init__(self):
      self.conv1 = eqx.nn.Conv2d(2, 3, 3, padding=1, key=k[0])
      self.conv2 = eqx.nn.Conv2d(3, 4, (2, 3), stride=2, use_bias=False, key=k[1])
      self.linear = eqx.nn.Linear(4 * 3 * 2, 5, key=k[2])
      self.norm = eqx.nn.LayerNorm(5)

    def __call__(self, x, eps=None):
      eps = eps or {}
      inputs = {"conv1": x}
      y = jnp.tanh(self.conv1(x) + eps.get("conv1", 0.0))
      inputs["conv2"] = y
      y = jnp.tanh(self.conv2(y) + eps.get("conv2", 0.0)).reshape(-1)
      inputs["linear"] = y
      y = jnp.tanh(self.linear(y) + eps.get("linear", 0.0))
      inputs["norm"] = y
      return self.norm(y) + eps.get("norm", 0.0), inputs

  return CNN()


def _nchw_conv_h(x_nchw, kernel_hw, stride, padding, use_bias):
  """h of an NCHW convolution, ordered like an OIHW kernel's (in, kh, kw)."""
  x = np.transpose(np.asarray(x_nchw), (0, 2, 3, 1))
  h = np_conv_h(x, kernel_hw, stride, padding, use_bias)
  c = x.shape[-1]
  body = h[: c * kernel_hw[0] * kernel_hw[1]].reshape(kernel_hw + (c,))
  body = np.transpose(body, (2, 0, 1)).reshape(-1)
  return np.concatenate([body, h[len(body):]])


def test_equinox_cnn_and_mlp_match_hand_computed_and_train():
  model = _eqx_cnn(jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_array)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 2, 6, 5)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)

  def loss_fn(params, x, t):
    out, _ = jax.vmap(eqx.combine(params, static))(x)
    return jnp.mean((out - t) ** 2)

  collect = jax.jit(optax_soaa.value_grad_and_stats(loss_fn))
  loss, grads, extras = collect(params, x, t)
  _, ref_grads = jax.value_and_grad(loss_fn)(params, x, t)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6)

  def perturbed(eps):
    out, inputs = jax.vmap(eqx.combine(params, static))(x, eps)
    return jnp.mean((out - t) ** 2), inputs

  eps0 = {"conv1": jnp.zeros((4, 3, 6, 5)), "conv2": jnp.zeros((4, 4, 3, 2)),
          "linear": jnp.zeros((4, 5)), "norm": jnp.zeros((4, 5))}
  deltas, inputs = jax.grad(perturbed, has_aux=True)(eps0)
  stats = extras["stats"]
  np.testing.assert_allclose(
      stats.conv1.weight.h, _nchw_conv_h(inputs["conv1"], (3, 3), 1, "SAME", True), rtol=RTOL)
  np.testing.assert_allclose(
      stats.conv1.weight.s, np_s(np.moveaxis(np.asarray(deltas["conv1"]), 1, -1)), rtol=RTOL)
  np.testing.assert_allclose(
      stats.conv2.weight.h, _nchw_conv_h(inputs["conv2"], (2, 3), 2, "VALID", False), rtol=RTOL)
  np.testing.assert_allclose(stats.linear.weight.h, np_dense_h(inputs["linear"], True), rtol=RTOL)
  np.testing.assert_allclose(stats.linear.weight.s, np_s(deltas["linear"]), rtol=RTOL)
  h_ln, s_ln = np_layernorm_reference(inputs["norm"], deltas["norm"])
  np.testing.assert_allclose(stats.norm.weight.h, h_ln, rtol=RTOL)
  np.testing.assert_allclose(stats.norm.weight.s, s_ln, rtol=RTOL)
  assert stats.norm.bias.part == "bias" and stats.norm.weight.kind == "layer_norm"
  # Equinox layouts: Linear (out, in), Conv2d (out, in, kh, kw), bias (out, 1, 1)
  # (size-1 axes take the default layout's roles).
  assert stats.linear.weight.layout(2) == LayerLayout((), (1,), (0,))
  assert stats.conv1.weight.layout(4) == LayerLayout((), (1, 2, 3), (0,))
  assert stats.conv1.bias.layout(3) == LayerLayout((), (1,), (0, 2))
  assert stats.conv2.bias is None if hasattr(stats.conv2, "bias") else True

  # The optimizer takes Equinox's layouts from stats_layouts and trains.
  layouts = optax_soaa.stats_layouts(collect, params, x, t)
  with pytest.raises(ValueError, match="layouts="):
    tx = optax_soaa.adafisher(1e-4)
    tx.update(grads, tx.init(params), params, **extras)
  tx = optax_soaa.adafisher(1e-4, stats_every=1, layouts=layouts)
  state = tx.init(params)
  assert state[1].h.conv1.weight.shape == (2 * 3 * 3,)
  assert state[1].s.conv1.bias.shape == (3,)

  @jax.jit
  def step(params, state):
    loss, grads, extras = collect(params, x, t)
    updates, state = tx.update(grads, state, params, **extras)
    return eqx.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(8):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]

  # An Equinox MLP (eqx.nn.MLP: Linear layers, (out, in)) under vmap.
  mlp = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(3))
  mparams, mstatic = eqx.partition(mlp, eqx.is_array)
  xm = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  mloss = lambda p, x: jnp.mean(jax.vmap(eqx.combine(p, mstatic))(x) ** 2)
  _, _, mextras = jax.jit(optax_soaa.value_grad_and_stats(mloss))(mparams, xm)
  first = mextras["stats"].layers[0]
  np.testing.assert_allclose(first.weight.h, np_dense_h(xm, True), rtol=RTOL)
  assert first.weight.s.shape == (4,)
  assert all(mextras["stats"].layers[i].weight is not None for i in range(3))


# ------------------------------------------------- stacks, shared, DenseGeneral


def test_scanned_stack_gets_per_layer_statistics_and_reuse_the_mean():
  """A lax.scan over stacked (L, in, out) kernels gives per-layer stats equal
  to the unrolled loop's; a scan reusing one kernel gives the mean over its
  calls."""
  rng = np.random.default_rng(2)
  params = _rng_tree(rng, {"w": (3, 4, 4), "b": (3, 4), "shared": (4, 4)})
  x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)

  def loss_fn(params, x):
    def layer(c, wb):
      w, b = wb
      return jnp.tanh(c @ w + b), None
    c, _ = jax.lax.scan(layer, x, (params["w"], params["b"]))
    c, _ = jax.lax.scan(lambda c, _: (jnp.sin(c @ params["shared"]), None), c, None, length=2)
    return jnp.sum(c**2)

  def unrolled(eps):
    c, inputs = x, []
    for i in range(3):
      inputs.append(c)
      c = jnp.tanh(c @ params["w"][i] + params["b"][i] + eps[i])
    for i in range(2):
      inputs.append(c)
      c = jnp.sin(c @ params["shared"] + eps[3 + i])
    return jnp.sum(c**2), inputs

  deltas, inputs = jax.grad(unrolled, has_aux=True)([jnp.zeros((5, 4))] * 5)
  collect = jax.jit(optax_soaa.value_grad_and_stats(loss_fn))
  _, grads, extras = collect(params, x)
  chex.assert_trees_all_close(grads, jax.grad(loss_fn)(params, x), rtol=1e-5, atol=1e-6)
  stats = extras["stats"]
  assert stats["w"].layout(3) == LayerLayout((0,), (1,), (2,))
  assert stats["w"].h.shape == (3, 5) and stats["b"].s.shape == (3, 4)
  for i in range(3):
    np.testing.assert_allclose(stats["w"].h[i], np_dense_h(inputs[i], True), rtol=RTOL)
    np.testing.assert_allclose(stats["w"].s[i], np_s(deltas[i]), rtol=RTOL)
    np.testing.assert_allclose(stats["b"].s[i], np_s(deltas[i]), rtol=RTOL)
  np.testing.assert_allclose(
      stats["shared"].h, (np_dense_h(inputs[3], False) + np_dense_h(inputs[4], False)) / 2,
      rtol=RTOL)
  np.testing.assert_allclose(
      stats["shared"].s, (np_s(deltas[3]) + np_s(deltas[4])) / 2, rtol=RTOL)
  assert "stack (0,)" in optax_soaa.describe_stats(loss_fn, params, x)

  # The optimizer runs on the stacked layout.
  tx = optax_soaa.adafisher(1e-3, layouts=optax_soaa.stats_layouts(collect, params, x))
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params, **extras)
  assert state[1].h["w"].shape == (3, 4) and state[1].s["b"].shape == (3, 4)
  chex.assert_tree_all_finite(updates)


def test_dense_general_attention_kernels_and_remat():
  """Flax DenseGeneral kernels with several input or output axes, a kernel
  applied through an einsum, and a layer under nn.remat (kept as remat)."""
  import flax.linen as nn

  class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
      qkv = nn.DenseGeneral((3, 2, 3), name="qkv")(x)  # (B, T, 3, heads, hd)
      q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
      w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
      o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
      o = nn.DenseGeneral(4, axis=(-2, -1), name="out")(o)
      return nn.remat(nn.Dense)(4, name="mlp")(o)

  model = Attention()
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
  collect = optax_soaa.value_grad_and_stats(loss_fn)
  _, grads, extras = jax.jit(collect)(params, x)
  chex.assert_trees_all_close(grads, jax.grad(loss_fn)(params, x), rtol=1e-5, atol=1e-6)
  stats = extras["stats"]
  assert stats["qkv"]["kernel"].layout(4) == LayerLayout((), (0,), (1, 2, 3))
  assert stats["qkv"]["kernel"].s.shape == (18,)
  assert stats["qkv"]["bias"].layout(3) == LayerLayout((), (), (0, 1, 2))
  assert stats["out"]["kernel"].layout(3) == LayerLayout((), (0, 1), (2,))
  np.testing.assert_allclose(stats["qkv"]["kernel"].h, np_dense_h(x, True), rtol=RTOL)
  np.testing.assert_allclose(stats["qkv"]["bias"].s, stats["qkv"]["kernel"].s, rtol=RTOL)
  assert stats["mlp"]["kernel"] is not None
  # The remat boundary survives in the collector's jaxpr.
  jaxpr = str(jax.make_jaxpr(collect)(params, x))
  assert "remat" in jaxpr or "checkpoint" in jaxpr


# ------------------------------------------------------ transforms, stats_due


def test_vmap_over_an_ensemble_equals_each_member():
  rng = np.random.default_rng(4)
  members = [_rng_tree(rng, MLP_SHAPES) for _ in range(2)]
  x = jnp.asarray(rng.normal(size=(6, 7, 3)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
  collect = optax_soaa.value_grad_and_stats(_mlp_loss)
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
  _, _, batched = jax.jit(jax.vmap(collect, in_axes=(0, None, None)))(stacked, x, t)
  for i, p in enumerate(members):
    _, _, single = collect(p, x, t)
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a[i], batched["stats"]), single["stats"], rtol=1e-5)


def test_stats_due_skips_the_statistics_and_keeps_the_trajectory():
  """With stats_due from the optimizer state, only refresh steps compute
  statistics (a lax.cond); the steps equal those of always computing them."""
  rng = np.random.default_rng(5)
  params0 = _rng_tree(rng, MLP_SHAPES)
  x = jnp.asarray(rng.normal(size=(6, 7, 3)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
  collect = optax_soaa.value_grad_and_stats(_mlp_loss)
  _, grads, off = collect(params0, x, t, stats_due=False)
  assert all(float(jnp.abs(st.h).sum() + jnp.abs(st.s).sum()) == 0.0
             for st in jax.tree.leaves(off["stats"], is_leaf=lambda s: isinstance(s, optax_soaa.LayerStats)))
  chex.assert_trees_all_close(grads, jax.grad(_mlp_loss)(params0, x, t), rtol=1e-6)
  layouts = optax_soaa.stats_layouts(collect, params0, x, t)
  tx = optax.inject_hyperparams(optax_soaa.adafisher, static_args=("layouts",))(
      learning_rate=1e-4, stats_every=3, layouts=layouts)

  def run(use_due):
    @jax.jit
    def step(params, state):
      due = optax_soaa.stats_due(state) if use_due else True
      _, grads, extras = collect(params, x, t, stats_due=due)
      updates, state = tx.update(grads, state, params, **extras)
      return optax.apply_updates(params, updates), state

    params, state = params0, tx.init(params0)
    dues = []
    for _ in range(7):
      dues.append(bool(optax_soaa.stats_due(state)))
      params, state = step(params, state)
    return params, dues, step

  p_due, dues, step = run(True)
  p_all, _, _ = run(False)
  assert dues == [True, False, False, True, False, False, True]
  chex.assert_trees_all_close(p_due, p_all, rtol=1e-6)
  assert "cond" in str(jax.make_jaxpr(step)(p_due, tx.init(p_due)))
  assert optax_soaa.stats_due(optax.adam(1e-3).init(params0)) is False


def test_describe_stats_says_why_not():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(11, 4)(tokens)
      x = x * self.param("gain", nn.initializers.ones, (4,))
      x = nn.Conv(4, (3,), feature_group_count=2)(x)
      return nn.Dense(2)(nn.RMSNorm()(x))

  model = Net()
  tokens = jnp.zeros((2, 5), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  report = optax_soaa.describe_stats(
      lambda p, t: model.apply({"params": p}, t).sum(), params, tokens)
  lines = {line.split()[0]: line for line in report.splitlines()}
  assert "embedding kernel: in (0,) out (1,)" in lines["['Embed_0']['embedding']"]
  assert "conv kernel" in lines["['Conv_0']['kernel']"]  # Grouped: pooled.
  assert "rms_norm scale" in lines["['RMSNorm_0']['scale']"]
  # A scale of a value that is not normalised: no layer of a known kind.
  assert "not normalised" in lines["['gain']"]
  assert "1/damping times less" in lines["['gain']"]
  assert "dense kernel" in lines["['Dense_0']['kernel']"]
  assert "conv bias" in lines["['Conv_0']['bias']"]
  assert report.splitlines()[-1] == "6 of 7 differentiated leaves have statistics.", report
  # layers= restricts the kinds; a function without layers warns.
  with pytest.warns(UserWarning, match="no layer"):
    optax_soaa.value_grad_and_stats(lambda p: jnp.sum(p["w"] ** 2))({"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="layers"):
    optax_soaa.value_grad_and_stats(jnp.sum, layers=("attention",))


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_convolution_pools_its_groups_like_the_reference(groups):
  """The reference's patch extraction splits the channels into groups and
  pools the groups' patches: h is over the (C / groups) kernel inputs."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).normal(size=(2, 6, 5, 4)) + 0.5
  conv = nn.Conv(8, (3, 3), strides=2, padding="SAME",
                 feature_group_count=groups)
  params = conv.init(jax.random.key(0), jnp.asarray(x, jnp.float32))["params"]
  loss_fn = lambda p, x: jnp.mean(conv.apply({"params": p}, x) ** 2)
  _, _, extras = optax_soaa.value_grad_and_stats(loss_fn)(
      params, jnp.asarray(x, jnp.float32))
  width = 4 // groups
  pooled = np.concatenate(
      [x[..., g * width:(g + 1) * width] for g in range(groups)], axis=0)
  np.testing.assert_allclose(extras["stats"]["kernel"].h,
                             np_conv_h(pooled, (3, 3), 2, "SAME", True),
                             rtol=RTOL)
  assert extras["stats"]["kernel"].s.shape == (8,)
  tx = optax_soaa.adafisher(1e-3)
  updates, _ = tx.update(params, tx.init(params), params,
                         stats=extras["stats"])
  chex.assert_tree_all_finite(updates)
