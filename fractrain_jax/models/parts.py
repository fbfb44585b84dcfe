"""The pieces every backbone is built from, and how a precision reaches each conv.

A forward pass hands every conv one precision (``None``, ``StaticBits`` or
``GatedBits``, see ``layers.py``) picked by the conv's role (the constants
live in ``layers.py``; each layer is built with its role):

- ``OUTER``: convs outside the residual blocks (the stem, MobileNetV2's last
  1x1 conv). Quantized in the plain models, full precision in the gated ones.
- ``BRANCH``: the convs of a block's residual branch. This is what DFQ gates,
  one choice per block and sample.
- ``SHORTCUT``: 1x1 projection shortcuts. Quantized in the plain models, full
  precision in the gated ones (SPEC section 1).
- ``DEPTHWISE``: MobileNetV2's depthwise convs, held at (8, 16, 8) whenever
  the model is quantized.
- ``CLASSIFIER``: the final dense layer, always full precision.

Because each layer knows its role, a model's cost table (SPEC section 2) is
captured from a forward pass (``capture.py``); no piece lists its layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fractrain_jax.layers import (CLASSIFIER, OUTER, Dense, LayerBits, QConv, StaticBits,
                                  dense_init)
from fractrain_jax.norm import BatchNorm

# SPEC section 1: MobileNetV2's depthwise convs whatever the schedule says.
DEPTHWISE_BITS = StaticBits(a=8, g=16, w=8)

# PyTorch BatchNorm2d defaults: its momentum 0.1 is flax's 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class BlockBits:
  """The precision of each conv role inside one block."""
  branch: LayerBits
  shortcut: LayerBits
  depthwise: LayerBits


def layer_key(key: jax.Array | None, index: int) -> jax.Array | None:
  """A conv's own rounding key: ``key`` folded with the conv's fixed position."""
  return None if key is None else jax.random.fold_in(key, index)


def global_avg_pool(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(1, 2))


class ConvBN(nnx.Module):
  """QConv followed by BatchNorm (PyTorch momentum and epsilon, scale 1, bias 0).

  role: the conv's role (``layers.ROLES``).
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, role: str,
               strides: int = 1, feature_group_count: int = 1, rngs: nnx.Rngs):
    self.conv = QConv(in_features, out_features, kernel_size, strides=strides,
                      feature_group_count=feature_group_count, role=role, rngs=rngs)
    # Two-pass variance, as PyTorch computes it; the one-pass form loses digits in deep nets.
    self.bn = BatchNorm(out_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        use_fast_variance=False, rngs=rngs)
    self.out_features = out_features

  def __call__(self, x: jax.Array, bits: LayerBits, *, key: jax.Array | None,
               relu: bool = False) -> jax.Array:
    """relu: ReLU after the BatchNorm, fused into it on the oneDNN kernels (``norm.py``)."""
    return self.bn(self.conv(x, bits, key=key), relu=relu)


class Stem(nnx.Module):
  """The first conv + BN + ReLU, then (ImageNet) a 3x3 stride-2 max pool with pad 1."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
               strides: int = 1, max_pool: bool = False, rngs: nnx.Rngs):
    self.conv_bn = ConvBN(in_features, out_features, kernel_size, role=OUTER, strides=strides,
                          rngs=rngs)
    self.max_pool = max_pool
    self.out_features = out_features

  def __call__(self, x: jax.Array, bits: LayerBits, *, key: jax.Array | None) -> jax.Array:
    h = self.conv_bn(x, bits, key=key, relu=True)
    if self.max_pool:
      # Pads with -inf, like PyTorch's MaxPool2d(3, 2, padding=1).
      h = nnx.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return h


class Head(nnx.Module):
  """Optional 1x1 conv + BN + ReLU (MobileNetV2), global average pool, dense classifier."""

  def __init__(self, in_features: int, num_classes: int, *, conv_features: int | None = None,
               rngs: nnx.Rngs):
    self.conv_bn = (None if conv_features is None
                    else ConvBN(in_features, conv_features, 1, role=OUTER, rngs=rngs))
    if conv_features is not None:
      in_features = conv_features
    self.classifier = Dense(in_features, num_classes, role=CLASSIFIER,
                            kernel_init=dense_init(in_features, num_classes),
                            bias_init=nnx.initializers.zeros_init(), rngs=rngs)

  def __call__(self, h: jax.Array, bits: LayerBits, *, key: jax.Array | None) -> jax.Array:
    if self.conv_bn is not None:
      h = self.conv_bn(h, bits, key=key, relu=True)
    return self.classifier(global_avg_pool(h))

