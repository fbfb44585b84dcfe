"""ResNet's residual blocks: BasicBlock (CIFAR ResNets, ResNet-18/34) and Bottleneck (ResNet-50).

The branch convs run at ``bits.branch`` (the block's gated choice in DFQ), the
projection shortcut at ``bits.shortcut``. Each conv rounds its gradient with
its own key, folded from the block's key by the conv's position.
"""

from __future__ import annotations

import jax
from flax import nnx

from fractrain_jax.layers import BRANCH, SHORTCUT
from fractrain_jax.models.parts import BlockBits, ConvBN, layer_key


def _shortcut(in_features: int, out_features: int, strides: int, rngs: nnx.Rngs
              ) -> ConvBN | None:
  """1x1 conv + BN where the shape changes (PyTorch's "option B"), identity otherwise."""
  if strides == 1 and in_features == out_features:
    return None
  return ConvBN(in_features, out_features, 1, role=SHORTCUT, strides=strides, rngs=rngs)


class BasicBlock(nnx.Module):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

  def __init__(self, in_features: int, out_features: int, *, strides: int = 1,
               rngs: nnx.Rngs):
    self.conv1 = ConvBN(in_features, out_features, 3, role=BRANCH, strides=strides,
                        rngs=rngs)
    self.conv2 = ConvBN(out_features, out_features, 3, role=BRANCH, rngs=rngs)
    self.shortcut = _shortcut(in_features, out_features, strides, rngs)
    self.out_features = out_features

  def __call__(self, x: jax.Array, bits: BlockBits, *, key: jax.Array | None) -> jax.Array:
    y = self.conv1(x, bits.branch, key=layer_key(key, 0), relu=True)
    y = self.conv2(y, bits.branch, key=layer_key(key, 1))
    if self.shortcut is not None:
      x = self.shortcut(x, bits.shortcut, key=layer_key(key, 2))
    return jax.nn.relu(y + x)


class Bottleneck(nnx.Module):
  """1x1-BN-ReLU, 3x3(stride)-BN-ReLU, 1x1 to 4x width-BN, plus the shortcut, then ReLU."""

  expansion = 4

  def __init__(self, in_features: int, width: int, *, strides: int = 1, rngs: nnx.Rngs):
    out_features = width * self.expansion
    self.conv1 = ConvBN(in_features, width, 1, role=BRANCH, rngs=rngs)
    # The stride sits on the 3x3 conv (torchvision's "ResNet v1.5").
    self.conv2 = ConvBN(width, width, 3, role=BRANCH, strides=strides, rngs=rngs)
    self.conv3 = ConvBN(width, out_features, 1, role=BRANCH, rngs=rngs)
    self.shortcut = _shortcut(in_features, out_features, strides, rngs)
    self.out_features = out_features

  def __call__(self, x: jax.Array, bits: BlockBits, *, key: jax.Array | None) -> jax.Array:
    y = self.conv1(x, bits.branch, key=layer_key(key, 0), relu=True)
    y = self.conv2(y, bits.branch, key=layer_key(key, 1), relu=True)
    y = self.conv3(y, bits.branch, key=layer_key(key, 2))
    if self.shortcut is not None:
      x = self.shortcut(x, bits.shortcut, key=layer_key(key, 3))
    return jax.nn.relu(y + x)
