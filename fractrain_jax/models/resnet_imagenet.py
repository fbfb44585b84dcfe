"""ImageNet ResNet-18/34 (BasicBlock) and ResNet-50 (Bottleneck), for 224x224 inputs.

Stem 7x7 stride-2 conv to 64 + BN + ReLU + 3x3 stride-2 max pool, four stages
of widths 64/128/256/512 (the first block of stages 2-4 has stride 2; a 1x1
conv + BN shortcut wherever the shape changes), global average pool, dense
classifier: the torchvision layout and parameter counts.
"""

from __future__ import annotations

from flax import nnx

from fractrain_jax.models.backbone import Backbone
from fractrain_jax.models.parts import Head, Stem
from fractrain_jax.models.residual import BasicBlock, Bottleneck

IMAGE_SIZE = 224
WIDTHS = (64, 128, 256, 512)
# Depth -> (block type, blocks per stage).
LAYOUTS = {18: (BasicBlock, (2, 2, 2, 2)),
           34: (BasicBlock, (3, 4, 6, 3)),
           50: (Bottleneck, (3, 4, 6, 3))}


def imagenet_resnet(depth: int, *, num_classes: int, rngs: nnx.Rngs) -> Backbone:
  if depth not in LAYOUTS:
    raise ValueError(f"ImageNet ResNet depth {depth}; expected one of {sorted(LAYOUTS)}")
  block_type, counts = LAYOUTS[depth]
  stem = Stem(3, WIDTHS[0], 7, strides=2, max_pool=True, rngs=rngs)
  blocks, in_features = [], WIDTHS[0]
  for stage, (width, n) in enumerate(zip(WIDTHS, counts)):
    for i in range(n):
      strides = 2 if stage > 0 and i == 0 else 1
      block = block_type(in_features, width, strides=strides, rngs=rngs)
      blocks.append(block)
      in_features = block.out_features
  head = Head(in_features, num_classes, rngs=rngs)
  return Backbone(stem, blocks, head, image_size=IMAGE_SIZE)
