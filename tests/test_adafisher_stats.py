"""AdaFisher layer statistics of Flax models (optax_soaa.flax wrappers of the
core collector).

The references here are computed independently: the layers' inputs via
``Module.sow`` and the gradients w.r.t. their outputs via ``Module.perturb``
(Linen) or additive zero perturbations (NNX), then ``h`` and ``s`` in NumPy
from those, with explicit padding and patch loops for the convolutions, and
the authors' LayerNorm / BatchNorm formulas restated in NumPy.
"""

import os
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_soaa
from optax_soaa.flax import nnx_value_grad_and_stats
from optax_soaa.flax import value_grad_and_stats

RTOL = 2e-5


def np_layernorm_reference(x, delta):
  """The authors' Compute_H_D.layernorm / Compute_S_D.layernorm in NumPy."""
  x, delta = np.asarray(x, np.float64), np.asarray(delta, np.float64)
  dims = tuple(d for d in range(x.ndim) if d != 1)
  batch = x.shape[0]
  dim_norm = int(np.prod([x.shape[d] for d in dims if d != 0]))
  sum_h = x.sum(axis=dims)[:, None] / dim_norm**2
  h_bar = np.concatenate([sum_h, np.ones_like(sum_h)], axis=1)
  h = np.einsum("ij,ij->j", h_bar, h_bar) / batch**2
  sum_s = delta.sum(axis=tuple(range(delta.ndim - 1)))
  return h, sum_s * sum_s / batch


def np_batchnorm2d_reference(x_nhwc, delta_nhwc):
  """The authors' Compute_H_D.batchnorm2d / Compute_S_D.batchnorm2d in
  NumPy, on the NCHW transposes of channel-last arrays."""
  x = np.transpose(np.asarray(x_nhwc, np.float64), (0, 3, 1, 2))
  s = np.transpose(np.asarray(delta_nhwc, np.float64), (0, 3, 1, 2))
  batch, spatial = x.shape[0], x.shape[2] * x.shape[3]
  sum_h = x.sum(axis=(0, 2, 3))[:, None] / spatial**2
  h_bar = np.concatenate([sum_h, np.ones_like(sum_h)], axis=1)
  h = np.einsum("ij,ij->j", h_bar, h_bar) / batch**2
  sum_s = s.sum(axis=(0, 2, 3))
  return h, sum_s * sum_s / batch


def _pads(size, k, stride, padding):
  if padding == "VALID":
    return 0, 0
  out = -(-size // stride)
  total = max((out - 1) * stride + k - size, 0)
  return total // 2, total - total // 2


def np_conv_h(x, kernel_hw, stride, padding, use_bias):
  """Mean over examples and output positions of the squared (kh, kw, c) patches."""
  x = np.asarray(x, np.float64)
  kh, kw = kernel_hw
  ph, pw = _pads(x.shape[1], kh, stride, padding), _pads(x.shape[2], kw, stride, padding)
  xp = np.pad(x, ((0, 0), ph, pw, (0, 0)))
  oh = (xp.shape[1] - kh) // stride + 1
  ow = (xp.shape[2] - kw) // stride + 1
  rows = []
  for i in range(oh):
    for j in range(ow):
      patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      rows.append(patch.reshape(x.shape[0], -1))
  patches = np.concatenate(rows, axis=0)  # (N * P, kh * kw * c), (kh, kw, c) order
  if use_bias:
    patches = np.concatenate([patches, np.ones((patches.shape[0], 1))], axis=1)
  return np.mean(patches**2, axis=0)


def np_dense_h(x, use_bias):
  x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
  if use_bias:
    x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
  return np.mean(x**2, axis=0)


def np_s(delta):
  delta = np.asarray(delta, np.float64)
  return np.mean(delta.reshape(-1, delta.shape[-1]) ** 2, axis=0)


# name -> (kind, kwargs); the Linen and NNX test models share these layers.
LAYERS = {
    "conv_same": ("conv", dict(features=3, kernel_size=(3, 3), strides=1, padding="SAME", use_bias=True)),
    "conv_valid_s2": ("conv", dict(features=4, kernel_size=(3, 3), strides=2, padding="VALID", use_bias=False)),
    "conv_same_s2": ("conv", dict(features=3, kernel_size=(2, 3), strides=2, padding="SAME", use_bias=True)),
    "dense": ("dense", dict(features=5, use_bias=True)),
    "seq": ("dense", dict(features=5, use_bias=False)),
    "head": ("dense", dict(features=2, use_bias=True)),
}


class LinenNet(nn.Module):
  """Convs (SAME/VALID, stride 1/2), Dense with and without bias, (B, T, D)
  inputs, a BatchNorm (training mode) and LayerNorms on (B, D) and (B, T, D)."""

  @nn.compact
  def __call__(self, image, seq):
    def layer(name, inputs, module=None):
      self.sow("inputs", name + "_in", inputs)
      if module is None:
        kind, kw = LAYERS[name]
        module = (nn.Conv if kind == "conv" else nn.Dense)(name=name, **kw)
      return self.perturb(name + "_out", module(inputs))

    h = jnp.tanh(layer("conv_same", image))
    h = layer("bn", h, nn.BatchNorm(use_running_average=False, name="bn"))
    h = jnp.tanh(layer("conv_valid_s2", h))
    h = jnp.tanh(layer("conv_same_s2", h))
    h = jnp.tanh(layer("dense", h.reshape(h.shape[0], -1)))
    s = layer("ln_seq", jnp.tanh(layer("seq", seq)), nn.LayerNorm(name="ln_seq"))
    h = h + s.mean(axis=1)
    h = layer("ln", h, nn.LayerNorm(name="ln"))
    return layer("head", h)


def _batch(seed=0, batch=4):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, 9, 9, 2)).astype(np.float32)
  seq = rng.normal(size=(batch, 6, 3)).astype(np.float32)
  target = rng.normal(size=(batch, 2)).astype(np.float32)
  return image, seq, target


def _loss(out, target):
  return jnp.mean(jnp.sum((out - target) ** 2, axis=-1) + 0.3 * jnp.sum(out**4, -1))


@pytest.fixture(scope="module")
def linen_setup():
  model = LinenNet()
  image, seq, target = _batch()
  variables = jax.jit(model.init)(jax.random.key(1), image, seq)
  return (model, variables["params"], variables["perturbations"],
          variables["batch_stats"], (image, seq, target))


def _apply(model, variables, image, seq, mutable=()):
  out, state = model.apply(variables, image, seq, mutable=["batch_stats", *mutable])
  return out, state


def _reference(model, params, perturbations, batch_stats, batch):
  image, seq, target = batch

  def loss_with_perturbations(perturbations):
    out, state = _apply(
        model, {"params": params, "perturbations": perturbations,
                "batch_stats": batch_stats}, image, seq, mutable=["inputs"])
    return _loss(out, target), state["inputs"]

  deltas, inputs = jax.jit(jax.grad(loss_with_perturbations, has_aux=True))(
      perturbations)
  ref = {}
  for name, (kind, kw) in LAYERS.items():
    x = inputs[name + "_in"][0]
    if kind == "conv":
      h = np_conv_h(x, kw["kernel_size"], kw["strides"], kw["padding"], kw["use_bias"])
    else:
      h = np_dense_h(x, kw["use_bias"])
    ref[name] = (h, np_s(deltas[name + "_out"]))
  ref["bn"] = np_batchnorm2d_reference(inputs["bn_in"][0], deltas["bn_out"])
  for name in ("ln", "ln_seq"):
    ref[name] = np_layernorm_reference(inputs[name + "_in"][0], deltas[name + "_out"])
  return ref


def test_linen_stats_match_numpy(linen_setup):
  model, params, perturbations, batch_stats, batch = linen_setup
  image, seq, target = batch
  ref = _reference(model, params, perturbations, batch_stats, batch)

  def loss_fn(params, image, seq, target):
    out, _ = _apply(model, {"params": params, "batch_stats": batch_stats}, image, seq)
    return _loss(out, target)

  fn = jax.jit(value_grad_and_stats(loss_fn))
  loss, grads, stats = fn(params, image, seq, target)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn))(
      params, image, seq, target)
  chex.assert_trees_all_close(loss, ref_loss, rtol=1e-6)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-5)

  for name, (kind, kw) in LAYERS.items():
    h, s = ref[name]
    kernel_stats = stats[name]["kernel"]
    assert kernel_stats.part == "kernel"
    np.testing.assert_allclose(kernel_stats.h, h, rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(kernel_stats.s, s, rtol=RTOL, err_msg=name)
    fan_in = int(np.prod(params[name]["kernel"].shape[:-1]))
    assert kernel_stats.h.shape == (fan_in + int(kw["use_bias"]),)
    if kw["use_bias"]:
      assert stats[name]["bias"].part == "bias"
      np.testing.assert_allclose(stats[name]["bias"].h, h, rtol=RTOL)
      np.testing.assert_allclose(kernel_stats.h[-1], 1.0)
  # Normalisation layers: the reference's formulas, from the raw input.
  for name, kind in (("bn", "batch_norm"), ("ln", "layer_norm"), ("ln_seq", "layer_norm")):
    h, s = ref[name]
    for part, leaf in (("kernel", "scale"), ("bias", "bias")):
      st = stats[name][leaf]
      assert (st.part, st.kind) == (part, kind), name
      np.testing.assert_allclose(st.h, h, rtol=RTOL, err_msg=name)
      # (Σ δ)²: a float32 sum of signed terms, compared to float64.
      np.testing.assert_allclose(st.s, s, rtol=2e-4, err_msg=name)
  # layers= leaves them to the fallback.
  _, _, dense_conv = jax.jit(value_grad_and_stats(loss_fn, layers=("dense", "conv")))(
      params, image, seq, target)
  assert dense_conv["ln"]["scale"] is None and dense_conv["bn"]["bias"] is None
  assert dense_conv["dense"]["kernel"] is not None


def test_linen_has_aux_and_shared_module():
  """has_aux passes through; a module applied twice gets the mean over calls."""

  class Shared(nn.Module):
    @nn.compact
    def __call__(self, a, b):
      dense = nn.Dense(3, name="shared")
      return dense(a).sum() + jnp.sum(dense(b) ** 2)

  model = Shared()
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4, 2)).astype(np.float32)
  b = rng.normal(size=(6, 2)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(2), a, b)["params"]
  fn = value_grad_and_stats(
      lambda p: (model.apply({"params": p}, a, b), {"tag": jnp.ones(())}),
      has_aux=True
  )
  (loss, aux), _, stats = jax.jit(fn)(params)
  assert float(aux["tag"]) == 1.0
  y_b = b @ np.asarray(params["shared"]["kernel"]) + np.asarray(params["shared"]["bias"])
  h_ref = (np_dense_h(a, True) + np_dense_h(b, True)) / 2
  s_ref = (np_s(np.ones((4, 3))) + np_s(2 * y_b)) / 2
  np.testing.assert_allclose(stats["shared"]["kernel"].h, h_ref, rtol=RTOL)
  np.testing.assert_allclose(stats["shared"]["kernel"].s, s_ref, rtol=RTOL)
  assert np.isfinite(loss)


class NNXNet(nnx.Module):

  def __init__(self, rngs):
    def make(name, in_features):
      kind, kw = LAYERS[name]
      kw = dict(kw)
      features = kw.pop("features")
      if kind == "conv":
        return nnx.Conv(in_features, features, rngs=rngs, **kw)
      return nnx.Linear(in_features, features, rngs=rngs, **kw)

    self.conv_same = make("conv_same", 2)
    self.conv_valid_s2 = make("conv_valid_s2", 3)
    self.conv_same_s2 = make("conv_same_s2", 4)
    self.dense = make("dense", 12)
    self.seq = make("seq", 3)
    self.head = make("head", 5)
    self.norm = nnx.LayerNorm(5, rngs=rngs)
    self.bn = nnx.BatchNorm(3, rngs=rngs)

  def __call__(self, image, seq, eps=None):
    inputs = {}

    def layer(name, x):
      inputs[name] = x
      y = getattr(self, name)(x)
      return y if eps is None else y + eps[name]

    h = jnp.tanh(layer("conv_same", image))
    h = layer("bn", h)
    h = jnp.tanh(layer("conv_valid_s2", h))
    h = jnp.tanh(layer("conv_same_s2", h))
    h = jnp.tanh(layer("dense", h.reshape(h.shape[0], -1)))
    h = h + jnp.tanh(layer("seq", seq)).mean(axis=1)
    out = layer("head", layer("norm", h))
    return out, inputs


def test_nnx_stats_match_numpy_and_optimizer_update():
  image, seq, target = _batch(seed=3)
  model = NNXNet(nnx.Rngs(0))

  # Independent reference: output shapes from a first call, then δ as the
  # gradient w.r.t. additive zero perturbations of each layer's output.
  @nnx.jit
  def reference(model):
    _, inputs = model(image, seq)
    eps0 = {name: jnp.zeros(jnp.shape(getattr(model, name)(x)))
            for name, x in inputs.items()}
    deltas = nnx.grad(lambda m, e: _loss(m(image, seq, e)[0], target),
                      argnums=1)(model, eps0)
    return inputs, deltas

  inputs, deltas = reference(model)

  fn = nnx_value_grad_and_stats(lambda m: _loss(m(image, seq)[0], target))
  loss, grads, stats = nnx.jit(fn)(model)
  ref_loss, ref_grads = nnx.jit(
      nnx.value_and_grad(lambda m: _loss(m(image, seq)[0], target)))(model)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  chex.assert_trees_all_close(nnx.as_pure(grads), nnx.as_pure(ref_grads), rtol=1e-5, atol=1e-5)
  for name, (kind, kw) in LAYERS.items():
    x = inputs[name]
    if kind == "conv":
      h = np_conv_h(x, kw["kernel_size"], kw["strides"], kw["padding"], kw["use_bias"])
    else:
      h = np_dense_h(x, kw["use_bias"])
    np.testing.assert_allclose(stats[name]["kernel"].h, h, rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(stats[name]["kernel"].s, np_s(deltas[name]), rtol=RTOL, err_msg=name)
    if kw["use_bias"]:
      assert stats[name]["bias"].part == "bias"
    else:
      assert "bias" not in stats[name]
  h, s = np_layernorm_reference(inputs["norm"], deltas["norm"])
  np.testing.assert_allclose(stats["norm"]["scale"].h, h, rtol=RTOL)
  np.testing.assert_allclose(stats["norm"]["bias"].s, s, rtol=2e-4)
  h, s = np_batchnorm2d_reference(inputs["bn"], deltas["bn"])
  np.testing.assert_allclose(stats["bn"]["scale"].h, h, rtol=RTOL)
  np.testing.assert_allclose(stats["bn"]["scale"].s, s, rtol=2e-4)
  # Nothing is patched: the class is untouched.
  assert not hasattr(nnx.Linear.__call__, "__wrapped__")

  # The statistics fit nnx.Optimizer.update's extra-argument path.
  optimizer = nnx.Optimizer(model, optax_soaa.adafisher(1e-2), wrt=nnx.Param)
  before = nnx.as_pure(nnx.state(model, nnx.Param))
  nnx.jit(lambda m, o, g, st: o.update(m, g, stats=st))(
      model, optimizer, grads, stats)
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
  assert all(jax.tree.leaves(moved))


def test_stats_drive_the_optimizer_in_a_jitted_linen_step(linen_setup):
  model, params, _, batch_stats, (image, seq, target) = linen_setup
  # α / λ = 0.01: with statistics every kernel steps about α / λ · m̂.
  tx = optax_soaa.adafisher(1e-5, stats_every=1)
  fn = value_grad_and_stats(
      lambda p: _loss(_apply(model, {"params": p, "batch_stats": batch_stats},
                             image, seq)[0], target)
  )

  @jax.jit
  def step(params, state):
    loss, grads, stats = fn(params)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  losses = []
  for _ in range(5):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  fisher_state = state[1]
  # Every leaf has statistics: all running averages left their ones.
  for s in jax.tree.leaves(fisher_state.s):
    assert not np.allclose(s, 1.0)
  assert losses[-1] < losses[0]


_DISTRIBUTED = textwrap.dedent("""
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from optax_soaa.flax import value_grad_and_stats

    assert jax.device_count() == 8, jax.devices()

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = jnp.tanh(nn.Conv(3, (3, 3), strides=2)(x))
        x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
        return nn.Dense(2)(x)

    model = Net()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6, 6, 2)).astype(np.float32)
    y = rng.normal(size=(16, 2)).astype(np.float32)
    params = model.init(jax.random.key(2), x)["params"]
    loss_fn = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 4)

    _, _, full = jax.jit(value_grad_and_stats(loss_fn))(params, x, y)
    _, _, mapped = jax.pmap(value_grad_and_stats(loss_fn, axis_name="d"),
                            axis_name="d", in_axes=(None, 0, 0))(
        params, x.reshape(8, 2, 6, 6, 2), y.reshape(8, 2, 2))
    # Sharded jit: the batch split over the 8 devices, no axis name needed.
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    P = jax.sharding.PartitionSpec
    shard = jax.sharding.NamedSharding(mesh, P("batch"))
    _, _, sharded = jax.jit(value_grad_and_stats(loss_fn))(
        params, jax.device_put(x, shard), jax.device_put(y, shard))
    # shard_map (check_vma: pvary casts in the jaxpr), params replicated.
    mapped_sm = jax.jit(jax.shard_map(
        lambda p, x, y: value_grad_and_stats(loss_fn, axis_name="batch")(p, x, y)[2],
        mesh=mesh, in_specs=(P(), P("batch"), P("batch")), out_specs=P(),
        check_vma=True))(params, x, y)
    n = 0
    for name, parts in (("Conv_0", ("kernel", "bias")), ("Dense_0", ("kernel", "bias")),
                        ("LayerNorm_0", ("scale", "bias"))):
      for part in parts:
        for field in ("h", "s"):
          got = np.asarray(getattr(mapped[name][part], field))
          want = np.asarray(getattr(full[name][part], field))
          for d in range(8):
            np.testing.assert_allclose(got[d], want, rtol=1e-5, atol=0)
          for other in (sharded, mapped_sm):
            np.testing.assert_allclose(
                np.asarray(getattr(other[name][part], field)), want, rtol=1e-5)
          n += 1
    print("checked", n)
""")


def test_stats_over_8_devices_equal_full_batch():
  """pmap and shard_map with axis_name (pmean, s rescaled; the norm layers'
  sums psum-ed) and sharded jit all equal one device."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  result = subprocess.run(
      [sys.executable, "-c", _DISTRIBUTED], env=env, cwd=root,
      capture_output=True, text=True, timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checked 12" in result.stdout
