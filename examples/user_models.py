"""Three models written the way a user writes them: plain ``flax.nnx`` layers, nothing of FracTrain.

FracTrain attaches to them from outside (``fractrain_jax.attach``, or
``--config.model.name=examples.user_models:vit`` with main.py); nothing here
imports the project. Each factory takes ``num_classes`` (the vocabulary for
the GPT) and ``rngs``, and keyword options.

- ``resnet``: a CIFAR ResNet-20 (``depth=6n+2``) as one ports PyTorch's:
  3x3 convs without bias, BatchNorm with PyTorch's momentum and epsilon,
  1x1 projection shortcuts, global pooling, a linear classifier.
- ``vit``: a small Vision Transformer: patch embedding ``nnx.Conv``, a class
  token, learned positions, pre-LayerNorm blocks of ``nnx.Linear`` attention
  and MLP.
- ``gpt``: a small causal language model whose attention projections are
  ``nnx.Einsum`` layers and whose MLP is ``nnx.Linear``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# He init, fan out, as PyTorch's ResNets: N(0, sqrt(2 / (k * k * out))).
_he = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    conv = lambda i, o, k, s: nnx.Conv(i, o, (k, k), strides=s, padding=k // 2, use_bias=False,
                                       kernel_init=_he, rngs=rngs)
    bn = lambda c: nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                                 rngs=rngs)
    self.conv1, self.bn1 = conv(cin, cout, 3, stride), bn(cout)
    self.conv2, self.bn2 = conv(cout, cout, 3, 1), bn(cout)
    projected = stride != 1 or cin != cout
    self.shortcut = conv(cin, cout, 1, stride) if projected else None
    self.shortcut_bn = bn(cout) if projected else None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.shortcut is not None:
      x = self.shortcut_bn(self.shortcut(x))
    return nnx.relu(y + x)


class ResNet(nnx.Module):
  def __init__(self, num_classes: int, depth: int, *, rngs: nnx.Rngs):
    n = (depth - 2) // 6
    self.conv1 = nnx.Conv(3, 16, (3, 3), padding=1, use_bias=False, kernel_init=_he, rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, momentum=0.9, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
    blocks, cin = [], 16
    for stage, width in enumerate((16, 32, 64)):
      for i in range(n):
        blocks.append(BasicBlock(cin, width, 2 if stage and not i else 1, rngs=rngs))
        cin = width
    self.blocks = nnx.List(blocks)
    self.fc = nnx.Linear(64, num_classes, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn1(self.conv1(x)))
    for block in self.blocks:
      h = block(h)
    return self.fc(h.mean(axis=(1, 2)))


def resnet(num_classes: int, *, rngs: nnx.Rngs, depth: int = 20) -> ResNet:
  if (depth - 2) % 6:
    raise ValueError(f"depth={depth}; expected 6n + 2 (8, 20, 32, ...)")
  return ResNet(num_classes, depth, rngs=rngs)


class MLP(nnx.Module):
  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(width, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, width, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.gelu(self.fc1(x)))


class Attention(nnx.Module):
  """Multi-head self-attention with ``nnx.Linear`` projections (no mask: every patch sees all)."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.proj = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads), 3, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q[:, :, 0], k[:, :, 0]) / math.sqrt(d // self.heads)
    h = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v[:, :, 0])
    return self.proj(h.reshape(b, t, d))


class ViTBlock(nnx.Module):
  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = Attention(width, heads, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.mlp = MLP(width, 4 * width, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class ViT(nnx.Module):
  def __init__(self, num_classes: int, *, image_size: int, patch: int, width: int, depth: int,
               heads: int, rngs: nnx.Rngs):
    self.patch_embed = nnx.Conv(3, width, (patch, patch), strides=patch, padding="VALID",
                                rngs=rngs)
    tokens = (image_size // patch) ** 2 + 1
    self.cls = nnx.Param(jnp.zeros((1, 1, width)))
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, width)))
    self.blocks = nnx.List([ViTBlock(width, heads, rngs=rngs) for _ in range(depth)])
    self.ln = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, x):
    h = self.patch_embed(x)
    h = h.reshape(h.shape[0], -1, h.shape[-1])
    cls = jnp.broadcast_to(self.cls[...], (h.shape[0], 1, h.shape[-1]))
    h = jnp.concatenate([cls, h], axis=1) + self.pos[...]
    for block in self.blocks:
      h = block(h)
    return self.head(self.ln(h)[:, 0])


def vit(num_classes: int, *, rngs: nnx.Rngs, image_size: int = 32, patch: int = 4,
        width: int = 96, depth: int = 4, heads: int = 4) -> ViT:
  return ViT(num_classes, image_size=image_size, patch=patch, width=width, depth=depth,
             heads=heads, rngs=rngs)


class CausalAttention(nnx.Module):
  """Causal self-attention whose projections are ``nnx.Einsum`` layers over (heads, head width)."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    shape = (width, heads, width // heads)
    self.q = nnx.Einsum("btd,dhk->bthk", shape, rngs=rngs)
    self.k = nnx.Einsum("btd,dhk->bthk", shape, rngs=rngs)
    self.v = nnx.Einsum("btd,dhk->bthk", shape, rngs=rngs)
    self.out = nnx.Einsum("bthk,hkd->btd", (heads, width // heads, width), (width,), rngs=rngs)

  def __call__(self, x):
    q, k, v = self.q(x), self.k(x), self.v(x)
    t = x.shape[1]
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, jnp.finfo(scores.dtype).min)
    return self.out(jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(scores, axis=-1), v))


class GPTBlock(nnx.Module):
  def __init__(self, width: int, heads: int, dropout: float, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = CausalAttention(width, heads, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.mlp = MLP(width, 4 * width, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x):
    x = x + self.drop(self.attn(self.ln1(x)))
    return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nnx.Module):
  def __init__(self, vocab: int, *, context: int, width: int, depth: int, heads: int,
               dropout: float, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.pos = nnx.Embed(context, width, rngs=rngs)
    self.blocks = nnx.List([GPTBlock(width, heads, dropout, rngs=rngs) for _ in range(depth)])
    self.ln_f = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, tokens):
    if tokens.shape[1] > self.pos.num_embeddings:
      raise ValueError(f"{tokens.shape[1]} tokens exceed the context of {self.pos.num_embeddings}")
    h = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      h = block(h)
    return self.head(self.ln_f(h))


def gpt(num_classes: int, *, rngs: nnx.Rngs, context: int = 64, width: int = 128,
        depth: int = 2, heads: int = 4, dropout: float = 0.0) -> GPT:
  return GPT(num_classes, context=context, width=width, depth=depth, heads=heads,
             dropout=dropout, rngs=rngs)
