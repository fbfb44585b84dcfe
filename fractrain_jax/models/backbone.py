"""A plain (static-precision) model: stem, residual blocks, head, and its precision plan.

Every backbone in this package is a ``Backbone``; the builders in
``resnet_cifar.py``, ``resnet_imagenet.py`` and ``mobilenet_v2.py`` only choose
its parts. The plain call ``model(x, bits)`` runs the static or PFQ precision
of SPEC section 1. ``model.forward(x, plan)`` runs any ``Plan``, e.g. a
different static precision per block with full-precision stem and shortcuts,
which is what a gated model computes once its gate has chosen.
``model.layer_macs()`` is captured from one abstract forward pass
(``capture.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
from flax import nnx

from fractrain_jax import cost
from fractrain_jax.layers import LayerBits, StaticBits
from fractrain_jax.models.capture import Path, capture_layer_macs, path_name
from fractrain_jax.models.parts import DEPTHWISE_BITS, BlockBits, Head, Stem, layer_key

# Short cost-table names for the layers outside the blocks.
SHORT_NAMES = {"head": "head_conv", "head.classifier": "classifier"}


def layer_name(path: Path) -> str:
  """A layer's cost-table name from its path: ``blocks.3.conv1.conv`` -> ``blocks.3.conv1``.

  A ConvBN's conv goes by the ConvBN's name, the stem's and head's single
  ConvBN by its part's (``stem.conv_bn.conv`` -> ``stem``, then ``SHORT_NAMES``).
  """
  path = tuple(p for p in path if p != "conv_bn")
  if path and path[-1] == "conv":
    path = path[:-1]
  name = path_name(path)
  return SHORT_NAMES.get(name, name)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The precision of every conv in one forward pass.

  outer: the stem (and MobileNetV2's last 1x1 conv); blocks: block l's branch
  convs; shortcut: 1x1 projection shortcuts; depthwise: depthwise convs.
  """
  outer: LayerBits
  blocks: tuple[LayerBits, ...]
  shortcut: LayerBits
  depthwise: LayerBits

  @classmethod
  def static(cls, bits: tuple[int, int] | None, num_blocks: int) -> "Plan":
    """``None``: FP32 everywhere. ``(b_a, b_g)``: every conv at ``StaticBits(b_a, b_g, b_a)``
    (weights at the activation width, SPEC section 1), depthwise convs at (8, 16, 8)."""
    if bits is None:
      return cls(None, (None,) * num_blocks, None, None)
    if not (isinstance(bits, (tuple, list)) and len(bits) == 2):
      raise ValueError(f"bits={bits!r}: expected None or a pair (b_a, b_g) of ints")
    a, g = bits
    sb = StaticBits(a=a, g=g, w=a)
    return cls(sb, (sb,) * num_blocks, sb, DEPTHWISE_BITS)

  @classmethod
  def blockwise(cls, blocks: Sequence[LayerBits]) -> "Plan":
    """Block l's branch at ``blocks[l]``; stem, shortcuts (and head conv) full precision and
    depthwise convs at (8, 16, 8): the layout of the gated models."""
    return cls(None, tuple(blocks), None, DEPTHWISE_BITS)

  def block_bits(self, index: int) -> BlockBits:
    return BlockBits(branch=self.blocks[index], shortcut=self.shortcut,
                     depthwise=self.depthwise)


class Backbone(nnx.Module):
  """stem -> blocks -> head; ``model(x, bits=None, *, key=None) -> logits``."""

  task = "classify"  # The trainer reads it: images in, a label each (the LM's is "lm").

  def __init__(self, stem: Stem, blocks: Sequence[nnx.Module], head: Head, *,
               image_size: int):
    self.stem = stem
    self.blocks = nnx.List(blocks)
    self.head = head
    self.image_size = image_size

  @property
  def num_blocks(self) -> int:
    return len(self.blocks)

  def part_keys(self, key: jax.Array | None
                ) -> tuple[jax.Array | None, list[jax.Array | None], jax.Array | None]:
    """Rounding keys of the stem, each block and the head: ``key`` folded with 0, 1..L, L+1."""
    n = self.num_blocks
    return layer_key(key, 0), [layer_key(key, l + 1) for l in range(n)], layer_key(key, n + 1)

  def forward(self, x: jax.Array, plan: Plan, *, key: jax.Array | None = None) -> jax.Array:
    """Logits of ``x`` (NHWC) with each conv at the precision ``plan`` gives it.

    key: PRNG key for stochastic gradient rounding; each conv folds in its own
    position, so two calls with one key round the same way.
    """
    if len(plan.blocks) != self.num_blocks:
      raise ValueError(f"plan has {len(plan.blocks)} block precisions; the model has "
                       f"{self.num_blocks} blocks")
    stem_key, block_keys, head_key = self.part_keys(key)
    h = self.stem(x, plan.outer, key=stem_key)
    for index, block in enumerate(self.blocks):
      h = block(h, plan.block_bits(index), key=block_keys[index])
    return self.head(h, plan.outer, key=head_key)

  def __call__(self, x: jax.Array, bits: tuple[int, int] | None = None, *,
               key: jax.Array | None = None) -> jax.Array:
    """Logits at ``bits = (b_a, b_g)`` (``None``: FP32); ``Plan.static`` says where they go."""
    return self.forward(x, Plan.static(bits, self.num_blocks), key=key)

  def layer_macs(self, *, gated: Sequence[str] = ()) -> list[cost.LayerMACs]:
    """Every conv and the classifier with its forward MACs per sample at ``image_size``.

    gated: the layer roles a gate sets (``layers.BRANCH``, and ``SHORTCUT`` in
    the per-candidate forward); their convs are labelled "gated" with their
    block index, the stem, other shortcuts and the head "fp". Empty: a plain model.
    """
    # MACs do not depend on precision: one full-precision pass finds every layer.
    return capture_layer_macs(self, lambda model, x: model(x),
                              (1, self.image_size, self.image_size, 3), gated=gated,
                              name=layer_name)
