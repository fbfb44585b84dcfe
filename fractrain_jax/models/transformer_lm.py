"""A causal pre-LayerNorm Transformer language model with FracTrain's quantized matmuls.

``TransformerLM(vocab_size, ...)(tokens, bits=None, *, key=None) -> logits``:
tokens are int32 ``(batch, context)``, logits ``(batch, context, vocab)``,
position t predicting token t + 1. The call mirrors ``Backbone``'s, so the
trainer, the PFQ schedule and the cost tables treat it like the CNNs.

What is quantized (``layers.QDense``, role ``BRANCH``, so it is "static" in
the cost tables and moves with the static or PFQ precision): the Q, K, V and
output projections of every attention layer and the two MLP matmuls.
Inputs per tensor (running range for evaluation), weights per output
channel, output gradients stochastically rounded, forward and backward
widths apart, exactly as in the CNNs' convs.

What stays full precision, like the CNNs' classifier: the token and position
embeddings, the LayerNorms, the softmax, the attention score (``Q K^T``) and
value (``P V``) products (role ``ATTENTION``, counted at 32 bits), and the
output layer (the tied embedding, or an untied ``Dense``, role
``CLASSIFIER``).

The model runs as ``2 * depth`` sublayers (``sublayer``): each block's
attention, then its MLP, each with its own residual add, as a CNN's residual
block has. ``forward(tokens, precisions)`` gives each sublayer its own
precision; the gated LM (``gated_lm.py``) runs the same pieces with a gate's
per-token choice between them.

Cost convention: one sample is one window of ``context`` tokens; the cost
table (``layer_macs``) is captured from one abstract pass over a
``(1, context)`` window, so it holds MACs per sequence (divide by
``context`` for per token). The attention products count all ``T x T``
entries, as the dense computation does; the causal mask halves nothing.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fractrain_jax import cost
from fractrain_jax.layers import (ATTENTION, BRANCH, CLASSIFIER, Dense, LayerBits, QDense,
                                  StaticBits, record_cost)
from fractrain_jax.models.capture import capture_layer_macs, path_name
from fractrain_jax.models.parts import layer_key

POSITIONS = ("learned", "sinusoidal")
# GPT-2's initialization of every matmul and embedding.
INIT_STD = 0.02
LN_EPSILON = 1e-5


def sinusoidal_positions(context: int, width: int) -> jax.Array:
  """Vaswani et al.'s fixed encodings: sin on even features, cos on odd, ``(context, width)``."""
  pos = jnp.arange(context, dtype=jnp.float32)[:, None]
  freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, width, 2, dtype=jnp.float32) / width)
  enc = jnp.zeros((context, width), jnp.float32)
  enc = enc.at[:, 0::2].set(jnp.sin(pos * freq))
  return enc.at[:, 1::2].set(jnp.cos(pos * freq[: width // 2]))


def _dense(in_features: int, out_features: int, rngs: nnx.Rngs) -> QDense:
  return QDense(in_features, out_features, role=BRANCH,
                kernel_init=nnx.initializers.normal(INIT_STD), rngs=rngs)


class _Dropout(nnx.Module):
  """Dropout keyed by the step's key (so a resumed run drops the same units); off in evaluation."""

  def __init__(self, rate: float):
    self.rate = rate
    self.deterministic = False

  def set_view(self, deterministic: bool | None = None):
    if deterministic is not None:
      self.deterministic = deterministic

  def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
    if self.rate == 0.0 or self.deterministic or key is None:
      return x
    keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.rate), 0.0)


class CausalSelfAttention(nnx.Module):
  """Multi-head attention of each position over itself and the positions before it."""

  def __init__(self, width: int, heads: int, dropout: float, *, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"width={width} is not divisible by heads={heads}")
    self.heads = heads
    self.q = _dense(width, width, rngs)
    self.k = _dense(width, width, rngs)
    self.v = _dense(width, width, rngs)
    self.out = _dense(width, width, rngs)
    self.dropout = _Dropout(dropout)

  def __call__(self, x: jax.Array, bits: LayerBits, *, key: jax.Array | None) -> jax.Array:
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q = split(self.q(x, bits, key=layer_key(key, 0)))
    k = split(self.k(x, bits, key=layer_key(key, 1)))
    v = split(self.v(x, bits, key=layer_key(key, 2)))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    probs = self.dropout(jax.nn.softmax(scores, axis=-1), layer_key(key, 4))
    h = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    # The two activation products, full precision: t * t * d MACs each.
    record_cost(self, 2 * t * t * d, ATTENTION)
    return self.out(h, bits, key=layer_key(key, 3))


class Block(nnx.Module):
  """Pre-LayerNorm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (GELU).

  Its two sublayers (``attention``, ``mlp``) take their own precision; both
  draw their keys from the block's ``key``.
  """

  def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float, *,
               rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(width, epsilon=LN_EPSILON, rngs=rngs)
    self.attn = CausalSelfAttention(width, heads, dropout, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, epsilon=LN_EPSILON, rngs=rngs)
    self.fc1 = _dense(width, mlp_ratio * width, rngs)
    self.fc2 = _dense(mlp_ratio * width, width, rngs)
    self.dropout = _Dropout(dropout)

  def attention(self, x: jax.Array, bits: LayerBits, *, key: jax.Array | None) -> jax.Array:
    return x + self.dropout(self.attn(self.ln1(x), bits, key=layer_key(key, 0)),
                            layer_key(key, 1))

  def mlp(self, x: jax.Array, bits: LayerBits, *, key: jax.Array | None) -> jax.Array:
    h = jax.nn.gelu(self.fc1(self.ln2(x), bits, key=layer_key(key, 2)))
    return x + self.dropout(self.fc2(h, bits, key=layer_key(key, 3)), layer_key(key, 4))

  def __call__(self, x: jax.Array, bits: LayerBits, *, key: jax.Array | None) -> jax.Array:
    return self.mlp(self.attention(x, bits, key=key), bits, key=key)


# A block's sublayers in order, and the layers (paths under ``blocks.<l>``) of each.
SUBLAYERS = ("attention", "mlp")
_SUBLAYER_OF = {"ln1": 0, "attn": 0, "ln2": 1, "fc1": 1, "fc2": 1}


def sublayer_index(path) -> int:
  """The sublayer ``2 l + s`` a layer at ``blocks.<l>.<name>...`` belongs to; -1 outside."""
  for i in range(len(path) - 2):
    if path[i] == "blocks" and isinstance(path[i + 1], int) and path[i + 2] in _SUBLAYER_OF:
      return len(SUBLAYERS) * path[i + 1] + _SUBLAYER_OF[path[i + 2]]
  return -1


class TransformerLM(nnx.Module):
  """Embedding (+ positions) -> ``depth`` blocks -> LayerNorm -> output layer."""

  task = "lm"  # The trainer reads it: token windows in, next-token loss and perplexity out.

  def __init__(self, vocab_size: int, *, depth: int = 2, width: int = 128, heads: int = 4,
               mlp_ratio: int = 4, context: int = 64, dropout: float = 0.0,
               positions: str = "learned", tied: bool = True, rngs: nnx.Rngs):
    if positions not in POSITIONS:
      raise ValueError(f"positions={positions!r}; expected one of {POSITIONS}")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout={dropout!r}; expected a rate in [0, 1)")
    self.vocab_size = vocab_size
    self.width = width
    self.context = context
    self.embed = nnx.Embed(vocab_size, width, embedding_init=nnx.initializers.normal(INIT_STD),
                           rngs=rngs)
    self.positions = (nnx.Embed(context, width, embedding_init=nnx.initializers.normal(INIT_STD),
                                rngs=rngs) if positions == "learned" else None)
    self.dropout = _Dropout(dropout)
    self.blocks = nnx.List([Block(width, heads, mlp_ratio, dropout, rngs=rngs)
                            for _ in range(depth)])
    self.ln_f = nnx.LayerNorm(width, epsilon=LN_EPSILON, rngs=rngs)
    self.lm_head = None if tied else Dense(
        width, vocab_size, role=CLASSIFIER, kernel_init=nnx.initializers.normal(INIT_STD),
        bias_init=nnx.initializers.zeros_init(), rngs=rngs)

  @property
  def num_blocks(self) -> int:
    return len(self.blocks)

  @property
  def num_sublayers(self) -> int:
    """Attention and MLP of every block: what a gate chooses a precision for."""
    return len(SUBLAYERS) * len(self.blocks)

  def embed_tokens(self, tokens: jax.Array, *, key: jax.Array | None) -> jax.Array:
    """Token embeddings plus positions (then dropout): the residual stream's start."""
    t = tokens.shape[1]
    if t > self.context:
      raise ValueError(f"{t} tokens exceed the model's context of {self.context}")
    h = self.embed(tokens)
    if self.positions is None:
      h = h + sinusoidal_positions(t, self.width)
    else:
      h = h + self.positions(jnp.arange(t))
    return self.dropout(h, layer_key(key, 0))

  def sublayer(self, index: int, h: jax.Array, bits: LayerBits, *,
               key: jax.Array | None) -> jax.Array:
    """Sublayer ``index`` (block ``index // 2``'s attention, then its MLP) on the stream ``h``.

    key: the model's key; block l's layers round with ``key`` folded with l + 1.
    """
    block = self.blocks[index // len(SUBLAYERS)]
    run = getattr(block, SUBLAYERS[index % len(SUBLAYERS)])
    return run(h, bits, key=layer_key(key, index // len(SUBLAYERS) + 1))

  def output(self, h: jax.Array) -> jax.Array:
    """Final LayerNorm and the output layer: next-token logits."""
    h = self.ln_f(h)
    if self.lm_head is not None:
      return self.lm_head(h)
    record_cost(self, h.shape[1] * self.width * self.vocab_size, CLASSIFIER)
    return self.embed.attend(h)

  def forward(self, tokens: jax.Array, precisions: Sequence[LayerBits], *,
              key: jax.Array | None = None) -> jax.Array:
    """Next-token logits with one precision per sublayer (``num_sublayers`` of them)."""
    if len(precisions) != self.num_sublayers:
      raise ValueError(f"{len(precisions)} precisions for {self.num_sublayers} sublayers")
    h = self.embed_tokens(tokens, key=key)
    for index, bits in enumerate(precisions):
      h = self.sublayer(index, h, bits, key=key)
    return self.output(h)

  def __call__(self, tokens: jax.Array, bits: tuple[int, int] | None = None, *,
               key: jax.Array | None = None) -> jax.Array:
    """Next-token logits; ``bits = (b_a, b_g)`` quantizes every QDense (weights at b_a)."""
    precision = None if bits is None else StaticBits(a=bits[0], g=bits[1], w=bits[0])
    return self.forward(tokens, [precision] * self.num_sublayers, key=key)

  def layer_macs(self, *, gated: Sequence[str] = ()) -> list[cost.LayerMACs]:
    """Every matmul with its forward MACs per window of ``context`` tokens.

    gated: the roles a per-token gate sets (the gated LM's ``(BRANCH,)``); such
    layers are charged to their sublayer (``sublayer_index``).
    """
    return capture_layer_macs(self, lambda model, x: model(x), (1, self.context),
                              input_dtype=jnp.int32, name=_layer_name, gated=gated,
                              block=sublayer_index)


def _layer_name(path) -> str:
  """Cost-table names: the tied output layer records at the root, the attention products at
  ``blocks.<l>.attn`` beside its projections."""
  if not path:
    return "lm_head"
  return path_name(path) + (".products" if path[-1] == "attn" else "")
