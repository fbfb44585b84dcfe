"""Gated blocks of a user's model: the hook that lets the gate decide before a block runs.

A gated block is one of the user's own modules (a residual block, a
Transformer layer's attention or MLP), found by its path. Its class is
swapped for a subclass (``gated_class``) whose ``__call__`` announces the
block to the forward pass's route with the block's input, then runs the
user's ``__call__`` unchanged. The gate reads that input (``read_mode``):

- ``(batch, H, W, C)`` images, or any ``(batch, ..., features)`` but a
  sequence: pooled over the axes between batch and features, one decision
  per sample (the authors' CIFAR and ImageNet gate);
- ``(batch, tokens, features)`` sequences: one decision per token, without
  pooling, so a token's precision never depends on a later token (the
  project's Transformer LM gate);
- ``(batch, features)`` vectors: one decision per sample, as they are.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from flax import nnx

from fractrain_jax.attach import route as routing
from fractrain_jax.errors import ConfigError

POOLED, PER_TOKEN = "pooled", "per_token"


class GatedBlock(nnx.Module):
  """Mixed in before a user's block class: the gate decides before the block runs.

  An ``nnx.Module`` itself, so that the mixed class keeps the user's class's
  object layout and an instance's ``__class__`` can be swapped.
  """

  fractrain_block: str  # The block's path.

  def __call__(self, *args, **kwargs):
    route = routing.current()
    if route is None:
      return super().__call__(*args, **kwargs)
    x = args[0] if args else next(iter(kwargs.values()), None)
    if not hasattr(x, "shape"):
      raise TypeError(f"gated block {self.fractrain_block} was called with "
                      f"{type(x).__name__} first; the gate reads the block's input array")
    with route.block(self.fractrain_block, x):
      return super().__call__(*args, **kwargs)


@functools.cache
def gated_class(cls: type) -> type:
  """``cls`` with ``GatedBlock`` mixed in; one class per user class, so graphs compare equal."""
  return type(f"Gated{cls.__name__}", (GatedBlock, cls),
              {"__module__": __name__, "_fractrain_base": cls})


def read_mode(path: str, shape: tuple[int, ...], dtype: Any) -> str:
  """How the gate reads a block's input of ``shape``; ConfigError for one it cannot read."""
  if len(shape) < 2 or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ConfigError(
        f"gated block {path} takes {dtype} {shape}; the gate reads float (batch, H, W, C) "
        "images, (batch, tokens, features) sequences or (batch, features) vectors: "
        "name blocks whose input is such an array")
  return PER_TOKEN if len(shape) == 3 else POOLED
