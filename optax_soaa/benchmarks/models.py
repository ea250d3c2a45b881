"""Flax Linen models of the benchmark tasks.

Plain Flax layers (``nn.Dense``, ``nn.Conv``, ``nn.Embed``, ``nn.LayerNorm``,
a learned position table): AdaFisher's statistics collector covers every
parameter of each model.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """ReLU multilayer perceptron on flattened inputs (digits-mlp)."""

  hidden: Sequence[int] = (128, 128)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No dropout: kept for a uniform model signature.
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class FashionCNN(nn.Module):
  """The CNN of the arTuRO paper's Fashion-MNIST experiments.

  Three 3x3 VALID convolutions (32, 64, 128) with ReLU, 2x2 max-pooling after
  the first two, dropout 0.2 after each convolution block, then Dense 256 with
  ReLU and dropout 0.5, and Dense 10. Input (N, 28, 28, 1).
  """

  num_classes: int = 10
  conv_dropout: float = 0.2
  dense_dropout: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, features in enumerate((32, 64, 128)):
      x = nn.relu(nn.Conv(features, (3, 3), padding="VALID")(x))
      if i < 2:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = nn.Dropout(self.conv_dropout, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(256)(x))
    x = nn.Dropout(self.dense_dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention built from `nn.Dense` projections."""

  num_heads: int

  @nn.compact
  def __call__(self, x):
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, use_bias=False, name="qkv")(x)
    qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim)
    mask = jnp.tril(jnp.ones((length, length), bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length,
                                                           width)
    return nn.Dense(width, name="out")(out)


class DecoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(LN x), then x + mlp(LN x)."""

  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = x + CausalSelfAttention(self.num_heads)(nn.LayerNorm()(x))
    h = nn.Dense(self.mlp_ratio * width, name="mlp_in")(nn.LayerNorm()(x))
    return x + nn.Dense(width, name="mlp_out")(nn.gelu(h))


class TransformerLM(nn.Module):
  """Small decoder-only transformer language model (pre-LayerNorm, causal).

  Tokens (batch, length) int -> logits (batch, length, vocab_size). Learned
  position embeddings up to `max_len`; untied output head.
  """

  vocab_size: int = 256
  width: int = 128
  num_layers: int = 2
  num_heads: int = 4
  max_len: int = 128
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train  # No dropout: kept for a uniform model signature.
    length = tokens.shape[-1]
    x = nn.Embed(self.vocab_size, self.width, name="embed")(tokens)
    pos = self.param(
        "pos_embed", nn.initializers.normal(0.02), (self.max_len, self.width)
    )
    x = x + pos[:length]
    for i in range(self.num_layers):
      x = DecoderBlock(self.num_heads, self.mlp_ratio, name=f"block_{i}")(x)
    x = nn.LayerNorm(name="final_norm")(x)
    return nn.Dense(self.vocab_size, name="head")(x)
