"""CIFAR ResNets (ResNet-20/38/74/110/152 of SPEC section 6, and a tiny ResNet-8), 32x32 inputs.

Stem 3x3 conv to 16 channels + BN + ReLU, three stages of BasicBlocks with
16/32/64 channels (the first block of stages 2 and 3 halves the resolution
and projects its shortcut with a 1x1 conv + BN), global average pool, dense
classifier. Depth = 6n + 2 with n blocks per stage.
"""

from __future__ import annotations

from flax import nnx

from fractrain_jax.models.backbone import Backbone
from fractrain_jax.models.parts import Head, Stem
from fractrain_jax.models.residual import BasicBlock

IMAGE_SIZE = 32
WIDTHS = (16, 32, 64)
# Depth -> BasicBlocks per stage. ResNet-8 is not in the paper: a fast model for smoke runs.
BLOCKS_PER_STAGE = {8: 1, 20: 3, 38: 6, 74: 12, 110: 18, 152: 25}


def cifar_resnet(depth: int, *, num_classes: int, rngs: nnx.Rngs) -> Backbone:
  if depth not in BLOCKS_PER_STAGE:
    raise ValueError(f"CIFAR ResNet depth {depth}; expected one of {sorted(BLOCKS_PER_STAGE)}")
  n = BLOCKS_PER_STAGE[depth]
  stem = Stem(3, WIDTHS[0], 3, rngs=rngs)
  blocks, in_features = [], WIDTHS[0]
  for stage, width in enumerate(WIDTHS):
    for i in range(n):
      strides = 2 if stage > 0 and i == 0 else 1
      blocks.append(BasicBlock(in_features, width, strides=strides, rngs=rngs))
      in_features = width
  head = Head(in_features, num_classes, rngs=rngs)
  return Backbone(stem, blocks, head, image_size=IMAGE_SIZE)
