"""MobileNetV2 for CIFAR (32x32 inputs), the variant with 2,296,922 parameters at 10 classes.

That count pins the variant down (the widely used CIFAR adaptation of the
paper's network): every inverted-residual block has its 1x1 expand conv, even
at expansion 1; a stride-1 block whose width changes adds its input through a
1x1 conv + BN shortcut; stride-2 blocks have no residual; activations are
ReLU; the stem is a stride-1 3x3 conv to 32 and the second stage has stride 1
(SPEC section 6), so the last feature map is 4x4. Then a 1x1 conv to 1280 +
BN + ReLU, global average pool and the classifier. The depthwise convs are
held at 8 bits forward / 16 bits backward (SPEC section 1).
"""

from __future__ import annotations

import jax
from flax import nnx

from fractrain_jax.layers import BRANCH, DEPTHWISE, SHORTCUT
from fractrain_jax.models.backbone import Backbone
from fractrain_jax.models.parts import BlockBits, ConvBN, Head, Stem, layer_key

IMAGE_SIZE = 32
STEM_FEATURES = 32
HEAD_FEATURES = 1280
# (expansion t, output channels c, blocks n, stride of the first block s).
CONFIG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nnx.Module):
  """1x1 expand-BN-ReLU, 3x3 depthwise(stride)-BN-ReLU, 1x1 project-BN (+ shortcut at stride 1)."""

  def __init__(self, in_features: int, out_features: int, *, expansion: int, strides: int,
               rngs: nnx.Rngs):
    hidden = expansion * in_features
    self.expand = ConvBN(in_features, hidden, 1, role=BRANCH, rngs=rngs)
    self.depthwise = ConvBN(hidden, hidden, 3, role=DEPTHWISE, strides=strides,
                            feature_group_count=hidden, rngs=rngs)
    self.project = ConvBN(hidden, out_features, 1, role=BRANCH, rngs=rngs)
    self.residual = strides == 1
    # Only a stride-1 block whose width changes projects its shortcut.
    needs_projection = self.residual and in_features != out_features
    self.shortcut = (ConvBN(in_features, out_features, 1, role=SHORTCUT, rngs=rngs)
                     if needs_projection else None)
    self.out_features = out_features

  def __call__(self, x: jax.Array, bits: BlockBits, *, key: jax.Array | None) -> jax.Array:
    y = self.expand(x, bits.branch, key=layer_key(key, 0), relu=True)
    y = self.depthwise(y, bits.depthwise, key=layer_key(key, 1), relu=True)
    y = self.project(y, bits.branch, key=layer_key(key, 2))
    if not self.residual:
      return y
    if self.shortcut is not None:
      x = self.shortcut(x, bits.shortcut, key=layer_key(key, 3))
    return y + x


def mobilenet_v2(*, num_classes: int, rngs: nnx.Rngs) -> Backbone:
  stem = Stem(3, STEM_FEATURES, 3, rngs=rngs)
  blocks, in_features = [], STEM_FEATURES
  for expansion, out_features, n, first_stride in CONFIG:
    for i in range(n):
      blocks.append(InvertedResidual(in_features, out_features, expansion=expansion,
                                     strides=first_stride if i == 0 else 1, rngs=rngs))
      in_features = out_features
  head = Head(in_features, num_classes, conv_features=HEAD_FEATURES, rngs=rngs)
  return Backbone(stem, blocks, head, image_size=IMAGE_SIZE)
