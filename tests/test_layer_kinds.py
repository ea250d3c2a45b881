"""Embeddings and every normalisation get AdaFisher statistics, equal to a hand
computation from the layer's captured input and output gradient, in Flax
Linen, NNX, Equinox and plain jax.numpy; leaves left without statistics warn."""

import warnings

import chex
import equinox as eqx
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_soaa
import optax_soaa.flax

V, D, B, T = 7, 4, 3, 5
RNG = np.random.default_rng(0)
IDS = jnp.asarray(RNG.integers(0, V, size=(B, T)), jnp.int32).at[0, :3].set(2)
WEIGHTS = jnp.asarray(RNG.normal(size=(B, T, D)), jnp.float32)


def _head(y):
  """A fixed, parameter-free loss of a lookup's output (so δ is known)."""
  return jnp.sum(jnp.sin(y) * WEIGHTS)


def _delta(y):
  return np.asarray(jax.grad(_head)(y), np.float64)


def _lookup_stats(ids, delta, rows):
  """Dense statistics of one-hot inputs: h = lookups per row / N, s = Σ δ² / N."""
  ids = np.asarray(ids).ravel()
  n = ids.size
  h = np.bincount(ids, minlength=rows) / n
  s = np.sum(delta.reshape(n, -1) ** 2, axis=0) / n
  return h, s


def _check(stats, h, s, kind, part="kernel"):
  assert stats is not None, "no statistics"
  assert stats.kind == kind and stats.part == part
  np.testing.assert_allclose(np.asarray(stats.h), h, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(stats.s), s, rtol=2e-5, atol=1e-9)


# ----------------------------------------------------------------- embeddings


def _table():
  return jnp.asarray(RNG.normal(size=(V, D)), jnp.float32)


@pytest.mark.parametrize("form", ["getitem", "take", "one_hot", "linen", "nnx", "equinox",
                                  "scan", "remat"])
def test_embedding_lookup_gets_dense_statistics_of_one_hot_inputs(form):
  table = _table()
  lookups = {
      "getitem": lambda p, ids: p["table"][ids],
      "take": lambda p, ids: jnp.take(p["table"], ids, axis=0),
      "one_hot": lambda p, ids: jax.nn.one_hot(ids, V) @ p["table"],
      "linen": lambda p, ids: nn.Embed(V, D).apply({"params": {"embedding": p["table"]}}, ids),
      "equinox": lambda p, ids: jax.vmap(jax.vmap(
          eqx.nn.Embedding(weight=p["table"])))(ids),
      # One lookup per time step: the mean over the calls is the same.
      "scan": lambda p, ids: jnp.swapaxes(jax.lax.scan(
          lambda c, i: (c, p["table"][i]), 0, ids.T)[1], 0, 1),
      "remat": lambda p, ids: jax.checkpoint(lambda t, i: t[i])(p["table"], ids),
  }
  if form == "nnx":
    model = nnx.Embed(V, D, rngs=nnx.Rngs(0))
    model.embedding[...] = table
    fn = optax_soaa.flax.nnx_value_grad_and_stats(lambda m, ids: _head(m(ids)))
    _, grads, stats = fn(model, IDS)
    st = stats["embedding"]
    np.testing.assert_allclose(grads["embedding"][...],
                               jax.grad(lambda t: _head(t[IDS]))(table), rtol=1e-6)
  else:
    fn = optax_soaa.value_grad_and_stats(lambda p, ids: _head(lookups[form](p, ids)))
    _, grads, extras = jax.jit(fn)({"table": table}, IDS)
    st = extras["stats"]["table"]
    np.testing.assert_allclose(grads["table"], jax.grad(
        lambda t: _head(t[IDS]))(table), rtol=1e-5, atol=1e-6)
  h, s = _lookup_stats(IDS, _delta(table[IDS]), V)
  _check(st, h, s, "dense" if form == "one_hot" else "embedding")
  assert st.layout(2) == optax_soaa.LayerLayout((), (0,), (1,))


def test_position_table_added_to_activations():
  """``x + pos[:T]`` is a dense layer on one-hot positions: h = 1/T on the
  first T rows (0 beyond), s = Σ δ² / (B T) at the sum."""
  params = {"table": _table(), "pos": jnp.asarray(RNG.normal(size=(T + 3, D)), jnp.float32)}

  def loss_fn(p, ids):
    return _head(p["table"][ids] + p["pos"][:ids.shape[1]])

  # Under jit: the table's row map is a constant of the trace.
  _, _, extras = jax.jit(optax_soaa.value_grad_and_stats(loss_fn))(params, IDS)
  y = params["table"][IDS] + params["pos"][:T]
  delta = _delta(y)
  h = np.r_[np.full(T, 1 / T), np.zeros(3)]
  s = np.sum(delta.reshape(-1, D) ** 2, axis=0) / (B * T)
  _check(extras["stats"]["pos"], h, s, "embedding")
  # The lookup below it keeps its own statistics.
  _check(extras["stats"]["table"], *_lookup_stats(IDS, delta, V), "embedding")


def test_tied_embedding_averages_its_two_uses_in_the_table_layout():
  params = {"table": _table()}

  def loss_fn(p, ids):
    x = p["table"][ids]
    logits = jnp.tanh(x) @ p["table"].T  # The tied output layer.
    return jnp.sum(jnp.sin(logits))

  _, _, extras = optax_soaa.value_grad_and_stats(loss_fn)(params, IDS)
  table = params["table"]
  x = table[IDS]
  d_x = np.asarray(jax.grad(lambda x: jnp.sum(jnp.sin(jnp.tanh(x) @ table.T)))(x))
  logits = jnp.tanh(x) @ table.T
  d_logits = np.cos(np.asarray(logits, np.float64))
  n = B * T
  h_emb, s_emb = _lookup_stats(IDS, d_x, V)
  head_in = np.asarray(jnp.tanh(x), np.float64).reshape(n, D)
  h_head, s_head = np.sum(head_in ** 2, 0) / n, np.sum(d_logits.reshape(n, V) ** 2, 0) / n
  mm = lambda v: (v - v.min()) / (v.max() - v.min() + 1e-6)
  _check(extras["stats"]["table"], (mm(h_emb) + mm(s_head)) / 2,
         (mm(s_emb) + mm(h_head)) / 2, "embedding")
  report = optax_soaa.describe_stats(loss_fn, params, IDS)
  assert "tied" in report and "2 calls" in report
  # An output bias keeps its dense statistics and the table stays tied.
  params["b"] = jnp.zeros(V)
  with_bias = lambda p, ids: jnp.sum(jnp.sin(jnp.tanh(p["table"][ids]) @ p["table"].T + p["b"]))
  stats = optax_soaa.value_grad_and_stats(with_bias)(params, IDS)[2]["stats"]
  _check(stats["table"], (mm(h_emb) + mm(s_head)) / 2, (mm(s_emb) + mm(h_head)) / 2,
         "embedding")
  assert stats["b"].part == "bias" and stats["b"].kind == "dense"
  np.testing.assert_allclose(stats["b"].s, s_head, rtol=2e-5)


# ------------------------------------------------------------ normalisations


def _norm_stats(x, normalised, delta, feature_dims):
  """The documented generalisation of the reference's LayerNorm / BatchNorm
  formulas, from the input as the mean sees it and the output gradient."""
  x = np.asarray(x, np.float64)
  batch = x.shape[0]
  keep = next((d for d in range(1, x.ndim) if d not in normalised), 1)
  summed = tuple(d for d in range(x.ndim) if d != keep)
  m = np.prod([x.shape[d] for d in summed if d != 0])
  u = x.sum(axis=summed) / m ** 2
  h = np.array([np.sum(u ** 2), u.size]) / batch ** 2
  rows = tuple(d for d in range(delta.ndim) if d not in feature_dims)
  s = delta.sum(axis=rows) ** 2 / batch
  return h, s.ravel()


def _x(shape):
  return jnp.asarray(RNG.normal(size=shape) + 0.3, jnp.float32)


def _linen(module, x):
  variables = module.init(jax.random.key(0), x)
  params = jax.tree.map(lambda v: v + 0.1 * jnp.asarray(RNG.normal(size=v.shape), v.dtype),
                        variables["params"])
  rest = {k: v for k, v in variables.items() if k != "params"}

  def apply(p, x):
    out = module.apply({"params": p, **rest}, x, mutable=list(rest) or False)
    return out[0] if rest else out

  return params, apply


def _eqx(module, depth=1):
  params, static = eqx.partition(module, eqx.is_inexact_array)

  def apply(p, x):
    f = eqx.combine(p, static)
    for _ in range(depth):
      f = jax.vmap(f)
    return f(x)

  return params, apply


def _nnx(module):
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  rest = nnx.as_pure(rest)
  return nnx.as_pure(params), lambda p, x: nnx.merge(graphdef, p, rest)(x)


# (name, (params, apply), input, normalised axes of the input as the mean
# sees it (after this reshape), that reshape, feature dims of the output,
# kind, param paths (scale, bias)).
NORM_CASES = {
    "linen-group": lambda: (*_linen(nn.GroupNorm(num_groups=2), _x((B, 3, 3, 4))),
                            _x((B, 3, 3, 4)), (1, 2, 4), (B, 3, 3, 2, 2), (3,), "group_norm",
                            ("scale", "bias")),
    "nnx-group": lambda: (*_nnx(nnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0))),
                          _x((B, 3, 3, 4)), (1, 2, 4), (B, 3, 3, 2, 2), (3,), "group_norm",
                          ("scale", "bias")),
    "eqx-group": lambda: (*_eqx(eqx.nn.GroupNorm(2, 4)), _x((B, 4, 3, 3)), (2, 3, 4),
                          (B, 2, 2, 3, 3), (1,), "group_norm", ("weight", "bias")),
    "linen-rms": lambda: (*_linen(nn.RMSNorm(), _x((B, T, D))), _x((B, T, D)), (2,),
                          None, (2,), "rms_norm", ("scale", None)),
    "nnx-rms": lambda: (*_nnx(nnx.RMSNorm(D, rngs=nnx.Rngs(0))), _x((B, T, D)), (2,),
                        None, (2,), "rms_norm", ("scale", None)),
    "eqx-rms": lambda: (*_eqx(eqx.nn.RMSNorm(D), depth=2), _x((B, T, D)), (2,), None, (2,),
                        "rms_norm", ("weight", "bias")),
    "jnp-rms": lambda: ({"g": jnp.linspace(0.5, 1.5, D)},
                        lambda p, x: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True)
                                                       + 1e-6) * p["g"],
                        _x((B, T, D)), (2,), None, (2,), "rms_norm", ("g", None)),
    "linen-ln-2axes": lambda: (*_linen(nn.LayerNorm(reduction_axes=(-2, -1),
                                                    feature_axes=(-2, -1)), _x((B, T, D))),
                               _x((B, T, D)), (1, 2), None, (1, 2), "layer_norm",
                               ("scale", "bias")),
    "eqx-ln-chw": lambda: (*_eqx(eqx.nn.LayerNorm((2, 3, 3))), _x((B, 2, 3, 3)), (1, 2, 3),
                           None, (1, 2, 3), "layer_norm", ("weight", "bias")),
    "linen-bn-axis1": lambda: (*_linen(nn.BatchNorm(use_running_average=False, axis=1),
                                       _x((B, 4, 3, 3))), _x((B, 4, 3, 3)), (0, 2, 3), None,
                               (1,), "batch_norm", ("scale", "bias")),
    "nnx-bn-axis1": lambda: (*_nnx(nnx.BatchNorm(4, axis=1, rngs=nnx.Rngs(0))),
                             _x((B, 4, 3, 3)), (0, 2, 3), None, (1,), "batch_norm",
                             ("scale", "bias")),
}


@pytest.mark.parametrize("case", sorted(NORM_CASES))
def test_normalisation_statistics_match_hand_computation(case):
  params, apply, x, normalised, reshape, feature_dims, kind, names = NORM_CASES[case]()
  loss_fn = lambda p, x: jnp.sum(jnp.sin(apply(p, x)) * 0.5)
  _, grads, extras = jax.jit(optax_soaa.value_grad_and_stats(loss_fn))(params, x)
  chex.assert_trees_all_close(grads, jax.grad(loss_fn)(params, x), rtol=1e-5, atol=1e-6)
  delta = 0.5 * np.cos(np.asarray(apply(params, x), np.float64))
  x_seen = np.asarray(x).reshape(reshape) if reshape else np.asarray(x)
  h, s = _norm_stats(x_seen, normalised, delta, feature_dims)
  checked = 0
  for part, name in zip(("kernel", "bias"), names):
    leaf = _get(params, name)
    if leaf is None:
      continue
    st = _get(extras["stats"], name)
    _check(st, h, s, kind, part)
    assert st.layout(np.ndim(leaf)).out_axes == tuple(range(np.ndim(leaf)))
    checked += 1
  assert checked


def _get(tree, name):
  if name is None:
    return None
  try:
    return tree[name]
  except (KeyError, TypeError):
    return getattr(tree, name, None)


# ------------------------------------------------------- warnings, Equinox


def _partly_covered():
  params = {"w": jnp.ones((D, 2)), "gain": jnp.ones(D)}

  def loss_fn(p, x):
    return jnp.sum((x * p["gain"]) @ p["w"])  # gain: no normalisation behind it

  return params, loss_fn, jnp.ones((B, D))


def test_leaf_without_statistics_warns_by_name_unless_fallback_is_chosen():
  params, loss_fn, x = _partly_covered()
  _, grads, extras = optax_soaa.value_grad_and_stats(loss_fn)(params, x)
  assert extras["stats"]["gain"] is None
  opt = optax_soaa.adafisher(1e-3)
  with pytest.warns(optax_soaa.StatsFallbackWarning, match=r"1000 times.*\['gain'\]"):
    opt.update(grads, opt.init(params), params, **extras)
  for fallback in ("identity", "adam"):
    opt = optax_soaa.adafisherw(1e-3, fallback=fallback)
    with warnings.catch_warnings():
      warnings.simplefilter("error", optax_soaa.StatsFallbackWarning)
      opt.update(grads, opt.init(params), params, **extras)
  assert "1/damping times less" in optax_soaa.describe_stats(loss_fn, params, x)
  with pytest.raises(ValueError, match="fallback"):
    optax_soaa.adafisher(fallback="sgd")


def test_added_parameter_that_is_no_table_gets_no_statistics():
  """A bias vector added to an unrecognised layer's output, or W + A @ B,
  is not a table of rows."""
  params = {"w": jnp.ones((3, 2)), "a": jnp.ones((3, 1)), "b": jnp.ones((1, 2)),
            "v": jnp.ones(2)}

  def loss_fn(p, x):
    merged = p["w"] + p["a"] @ p["b"]  # a LoRA merge
    return jnp.sum(jnp.sin(jnp.einsum("bi,bi->b", x, x)[:, None] + p["v"])) + jnp.sum(
        x @ merged)

  report = optax_soaa.describe_stats(loss_fn, params, jnp.ones((4, 3)))
  lines = {line.split()[0]: line for line in report.splitlines()}
  assert "fallback" in lines["['w']"] and "fallback" in lines["['v']"], report


def test_equinox_transformer_pieces_without_a_key():
  """Equinox's attention holds a dropout rate as a Python float: it is a
  setting, passed through, not differentiated (as eqx.filter_value_and_grad)."""
  attn = eqx.nn.MultiheadAttention(2, D, key=jax.random.key(1))
  norm = eqx.nn.LayerNorm(D)
  model = (attn, norm, eqx.nn.Embedding(V, D, key=jax.random.key(2)))

  def loss_fn(model, ids):
    attn, norm, embed = model
    x = jax.vmap(jax.vmap(embed))(ids)
    y = jax.vmap(lambda x: attn(x, x, x))(x)  # no key: dropout off
    return jnp.sum(jax.vmap(jax.vmap(norm))(x + y) ** 2)

  _, grads, extras = optax_soaa.value_grad_and_stats(loss_fn)(model, IDS)
  chex.assert_trees_all_close(grads, eqx.filter_grad(loss_fn)(model, IDS), rtol=1e-4,
                              atol=1e-6)
  assert grads[0].dropout.p is None and extras["stats"][0].dropout.p is None
  assert extras["stats"][2].weight.kind == "embedding"
  assert extras["stats"][1].weight.kind == "layer_norm"
  assert extras["stats"][0].query_proj.weight.kind == "dense"


def test_equinox_model_with_non_array_leaves_trains_with_adafisher():
  model = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0))  # holds activation functions
  x = jax.random.normal(jax.random.key(3), (6, 3))

  def loss_fn(model, x):
    return jnp.mean(jax.vmap(model)(x) ** 2)

  collect = optax_soaa.value_grad_and_stats(loss_fn)
  _, grads, extras = collect(model, x)
  chex.assert_trees_all_close(grads, eqx.filter_grad(loss_fn)(model, x), rtol=1e-5)
  assert extras["stats"].activation is None and grads.activation is None
  assert all(extras["stats"].layers[i].weight is not None for i in range(2))
  assert "not differentiated" in optax_soaa.describe_stats(loss_fn, model, x)
  params = eqx.filter(model, eqx.is_inexact_array)
  # Steps about learning_rate / damping = 0.1 times the momentum.
  opt = optax_soaa.adafisher(1e-4, layouts=optax_soaa.stats_layouts(collect, model, x))
  state = opt.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error", optax_soaa.StatsFallbackWarning)
    updates, state = opt.update(grads, state, params, **extras)
  model = eqx.apply_updates(model, updates)
  assert float(loss_fn(model, x)) < float(loss_fn(eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0)), x))
