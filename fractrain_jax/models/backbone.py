"""A plain (static-precision) model: stem, residual blocks, head, and its precision plan.

Every backbone in this package is a ``Backbone``; the builders in
``resnet_cifar.py``, ``resnet_imagenet.py`` and ``mobilenet_v2.py`` only choose
its parts. The plain call ``model(x, bits)`` runs the static or PFQ precision
of SPEC section 1. ``model.forward(x, plan)`` runs any ``Plan``, e.g. a
different static precision per block with full-precision stem and shortcuts,
which is what a gated model computes once its gate has chosen.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
from flax import nnx

from fractrain_jax import cost
from fractrain_jax.layers import Precision, StaticBits
from fractrain_jax.models.parts import (BRANCH, CLASSIFIER, DEPTHWISE, DEPTHWISE_BITS, OUTER,
                                        SHORTCUT, BlockBits, Head, Stem, layer_key)

# Cost kind of each role (cost.LayerMACs.kind), in the plain and in the gated models.
PLAIN_KINDS = {OUTER: "static", BRANCH: "static", SHORTCUT: "static", DEPTHWISE: "fixed",
               CLASSIFIER: "fp"}
GATED_KINDS = {OUTER: "fp", BRANCH: "gated", SHORTCUT: "fp", DEPTHWISE: "fixed",
               CLASSIFIER: "fp"}


@dataclasses.dataclass(frozen=True)
class Plan:
  """The precision of every conv in one forward pass.

  outer: the stem (and MobileNetV2's last 1x1 conv); blocks: block l's branch
  convs; shortcut: 1x1 projection shortcuts; depthwise: depthwise convs.
  """
  outer: Precision
  blocks: tuple[Precision, ...]
  shortcut: Precision
  depthwise: Precision

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
  def blockwise(cls, blocks: Sequence[Precision]) -> "Plan":
    """Block l's branch at ``blocks[l]``; stem, shortcuts (and head conv) full precision and
    depthwise convs at (8, 16, 8): the layout of the gated models."""
    return cls(None, tuple(blocks), None, DEPTHWISE_BITS)

  def block_bits(self, index: int) -> BlockBits:
    return BlockBits(branch=self.blocks[index], shortcut=self.shortcut,
                     depthwise=self.depthwise)


class Backbone(nnx.Module):
  """stem -> blocks -> head; ``model(x, bits=None, *, key=None) -> logits``."""

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

  def layer_macs(self, *, gated: bool = False) -> list[cost.LayerMACs]:
    """Every conv and the classifier with its forward MACs per sample at ``image_size``.

    gated: label the layers as a gated model runs them (branch convs "gated"
    with their block index; stem, shortcuts and head "fp").
    """
    kinds = GATED_KINDS if gated else PLAIN_KINDS
    sites, hw = self.stem.sites((self.image_size, self.image_size))
    owner = [-1] * len(sites)
    for index, block in enumerate(self.blocks):
      block_sites, hw = block.sites(f"blocks.{index}", hw)
      sites += block_sites
      owner += [index] * len(block_sites)
    head_sites = self.head.sites(hw)
    sites += head_sites
    owner += [-1] * len(head_sites)
    layers = []
    for site, block in zip(sites, owner):
      kind = kinds[site.role]
      layers.append(cost.LayerMACs(
          site.name, site.macs, kind,
          block=block if kind == "gated" else -1,
          fixed=(DEPTHWISE_BITS.a, DEPTHWISE_BITS.g, DEPTHWISE_BITS.w) if kind == "fixed" else None))
    return layers
