"""DFQ's precision gate (SPEC section 4): per-decision heads, one shared LSTM cell, K logits.

Decision l reads the features entering block l (the stem's output for l = 0)
through its own head, in one of the authors' layouts (``HEADS``):

- ``"cifar"`` (fractrain_cifar/models.py:416, 494-501): global average pool, 1x1
  conv (with bias) to 32, ReLU, 1x1 conv (with bias) to a 16-wide embedding;
  LSTM hidden size 16.
- ``"imagenet"`` (fractrain_imagenet/models.py:289, 304-305, 356-362): global
  average pool, one 1x1 conv (with bias) to a 40-wide embedding; LSTM hidden
  size 20.
- ``"mobilenet"`` (their CIFAR MobileNetV2, fractrain_cifar/models.py:730,
  750-754, 767-773): the CIFAR layout at widths 64 and 32; LSTM hidden size 32.
- ``"lm"`` (ours, for the Transformer LM, whose gate decides per token): the
  CIFAR widths, 32 and 16, LSTM hidden size 16. The head runs on every token,
  not on one pooled vector per image, so it is kept as small as the smallest
  of the authors' heads (docs/DESIGN.md gives its cost against a sublayer's).

A per-token gate (``per_token=True``, the LM's) reads each position's
features as they are, without pooling, after a parameter-free
standardization over the features: a pre-LayerNorm Transformer's residual
stream grows in scale from sublayer to sublayer, where a CNN head reads
BatchNorm-scaled features. Its LSTM state is one per token, carried from
decision to decision, so a token's choices depend on its own features only.

On a pooled 1x1 map a 1x1 conv is a dense layer, so the heads are written as
``nnx.Linear`` (same parameters, same init rule for the weights). ``INITS``:
``"default"`` starts the heads' and projection's biases at zero and the LSTM
at nnx's defaults; ``"authors"`` draws them as PyTorch does in the authors'
code (fractrain_cifar/models.py:454-463 touch only the weights): biases
uniform in +-1/sqrt(fan_in), the LSTM's weights uniform in +-1/sqrt(hidden),
and its one bias as the sum of PyTorch's two (b_ih + b_hh, each uniform in
+-1/sqrt(hidden)). The embedding steps one LSTM
cell shared by all decisions, whose state starts at zero in every forward
pass; a dense layer maps its hidden state to the K candidates' logits.

The mask of a decision is exactly one-hot in the forward pass:
- training, ``sampler="gumbel"``: straight-through Gumbel-softmax;
- training, ``sampler="hard"``: the authors' one-hot of ``argmax softmax(logits)``
  with a straight-through gradient through the softmax;
- evaluation (``deterministic``, set by ``model.eval()``): the plain argmax.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fractrain_jax.layers import conv_init, dense_init

SAMPLERS = ("gumbel", "hard")
INITS = ("default", "authors")


@dataclasses.dataclass(frozen=True)
class HeadLayout:
  """A gate layout: the head's hidden 1x1 conv width (None: no hidden conv), its
  embedding width, and the LSTM's hidden size."""
  hidden: int | None
  embed: int
  lstm_hidden: int


HEADS = {"cifar": HeadLayout(hidden=32, embed=16, lstm_hidden=16),
         "imagenet": HeadLayout(hidden=None, embed=40, lstm_hidden=20),
         "mobilenet": HeadLayout(hidden=64, embed=32, lstm_hidden=32),
         "lm": HeadLayout(hidden=32, embed=16, lstm_hidden=16)}
# Epsilon of a per-token head's standardization, the LM's LayerNorm epsilon.
TOKEN_EPSILON = 1e-5

LSTMState = tuple[jax.Array, jax.Array]  # (cell, hidden), as nnx.LSTMCell carries it.


def one_hot_argmax(logits: jax.Array) -> jax.Array:
  return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=logits.dtype)


def _straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
  # soft - stop_gradient(soft) is exactly 0.0 in the forward pass, so the
  # value is exactly the one-hot; the gradient is that of soft.
  return hard + (soft - jax.lax.stop_gradient(soft))


def gumbel_softmax_st(key: jax.Array, logits: jax.Array, tau: float | jax.Array) -> jax.Array:
  """Straight-through Gumbel-softmax over the last axis.

  With ``g = jax.random.gumbel(key, logits.shape, logits.dtype)``: the forward
  value is exactly ``one_hot(argmax(logits + g))`` (a sample of
  ``softmax(logits)``); the gradient is that of ``softmax((logits + g) / tau)``.
  """
  if isinstance(tau, numbers.Real) and not isinstance(tau, bool) and tau <= 0:
    raise ValueError(f"tau={tau!r}; expected a number > 0")
  noisy = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
  soft = jax.nn.softmax(noisy / tau, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(noisy, axis=-1), logits.shape[-1],
                        dtype=soft.dtype)
  return _straight_through(hard, soft)


def hard_argmax_st(logits: jax.Array) -> jax.Array:
  """The authors' gate: forward ``one_hot(argmax softmax(logits))``, gradient of the softmax."""
  soft = jax.nn.softmax(logits, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1],
                        dtype=soft.dtype)
  return _straight_through(hard, soft)


def torch_uniform(fan_in: int, terms: int = 1):
  """PyTorch's default bias (and LSTM) init: uniform in +-1/sqrt(fan_in), summed ``terms`` times."""
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    draws = jax.random.uniform(key, (terms, *shape), dtype, -bound, bound)
    return jnp.sum(draws, axis=0)

  return init


def _bias_init(fan_in: int, init: str):
  return torch_uniform(fan_in) if init == "authors" else nnx.initializers.zeros_init()


def _conv1x1(in_features: int, out_features: int, init: str, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, kernel_init=conv_init(1, out_features),
                    bias_init=_bias_init(in_features, init), rngs=rngs)


class GateHead(nnx.Module):
  """Pooled features -> [1x1 conv to ``hidden`` -> ReLU ->] 1x1 conv to the embedding.

  per_token: read every position of ``(batch, positions, features)``,
  standardized over the features, instead of pooling an NHWC map.
  """

  def __init__(self, in_features: int, layout: HeadLayout, *, init: str = "default",
               per_token: bool = False, rngs: nnx.Rngs):
    self.per_token = per_token
    self.hidden = (None if layout.hidden is None
                   else _conv1x1(in_features, layout.hidden, init, rngs))
    self.embed = _conv1x1(in_features if layout.hidden is None else layout.hidden,
                          layout.embed, init, rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    if self.per_token:
      h = jax.nn.standardize(features, axis=-1, epsilon=TOKEN_EPSILON)
    elif features.ndim > 2:
      # Every axis between batch and features: an NHWC map's H and W.
      h = jnp.mean(features, axis=tuple(range(1, features.ndim - 1)))
    else:
      h = features  # Already one vector per sample.
    if self.hidden is not None:
      h = jax.nn.relu(self.hidden(h))
    return self.embed(h)


class Gate(nnx.Module):
  """One head per decision, the shared LSTM cell and the projection to K logits.

  in_features: channels of the features each decision reads, in order.
  head: the layout, a key of ``HEADS``. init: a key of ``INITS``.
  per_token: one decision per position of ``(batch, positions, features)``
    (the Transformer LM), with one LSTM state per token; otherwise one per
    image of an NHWC batch.
  """

  def __init__(self, in_features: Sequence[int], num_candidates: int, *,
               sampler: str = "gumbel", head: str = "cifar", init: str = "default",
               per_token: bool = False, rngs: nnx.Rngs):
    if sampler not in SAMPLERS:
      raise ValueError(f"gate={sampler!r}; expected one of {SAMPLERS}")
    if head not in HEADS:
      raise ValueError(f"gate_head={head!r}; expected one of {tuple(HEADS)}")
    if init not in INITS:
      raise ValueError(f"gate_init={init!r}; expected one of {INITS}")
    layout = HEADS[head]
    hidden = layout.lstm_hidden
    self.heads = nnx.List([GateHead(c, layout, init=init, per_token=per_token, rngs=rngs)
                           for c in in_features])
    lstm_init = {}
    if init == "authors":
      lstm_init = dict(kernel_init=torch_uniform(hidden), recurrent_kernel_init=torch_uniform(hidden),
                       bias_init=torch_uniform(hidden, terms=2))
    self.lstm = nnx.LSTMCell(layout.embed, hidden, rngs=rngs, **lstm_init)
    self.project = nnx.Linear(hidden, num_candidates,
                              kernel_init=dense_init(hidden, num_candidates),
                              bias_init=_bias_init(hidden, init), rngs=rngs)
    self.hidden_size = hidden
    self.sampler = sampler
    self.num_candidates = num_candidates
    # Flipped by model.eval() / model.train(): evaluation takes the plain argmax.
    self.deterministic = False

  def set_view(self, deterministic: bool | None = None):
    """``nnx.view(model, deterministic=True)``: evaluation takes the plain argmax."""
    if deterministic is not None:
      self.deterministic = deterministic

  def initial_state(self, batch: int | tuple[int, ...]) -> LSTMState:
    """Zero state for ``batch`` decisions: a batch size, or ``(batch, positions)`` per token."""
    shape = (batch,) if isinstance(batch, int) else tuple(batch)
    zeros = jnp.zeros(shape + (self.hidden_size,), jnp.float32)
    return zeros, zeros

  def logits(self, index: int, features: jax.Array, state: LSTMState
             ) -> tuple[jax.Array, LSTMState]:
    state, hidden = self.lstm(state, self.heads[index](features))
    return self.project(hidden), state

  def __call__(self, index: int, features: jax.Array, state: LSTMState, *,
               key: jax.Array | None = None, tau=1.0) -> tuple[jax.Array, LSTMState]:
    """Decision ``index`` from ``features``: a one-hot mask and the new state.

    features: NHWC, or any ``(batch, ..., features)`` pooled over the axes
    between (mask ``(batch, K)``); ``(batch, positions, features)`` for a
    per-token gate (mask ``(batch, positions, K)``).
    key: Gumbel noise (training with the "gumbel" sampler only). tau: the
    softmax temperature; may be traced, so annealing it does not recompile.
    """
    logits, state = self.logits(index, features, state)
    if self.deterministic:
      return one_hot_argmax(logits), state
    if self.sampler == "hard":
      return hard_argmax_st(logits), state
    if key is None:
      raise ValueError("the Gumbel gate needs a PRNG key in training mode")
    return gumbel_softmax_st(key, logits, tau), state
