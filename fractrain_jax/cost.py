"""Bit-scaled cost accounting (SPEC section 2).

For a layer with ``M`` forward multiply-accumulates per sample, one training
step on one sample costs, in FP32-MAC units scaled by ``bits * bits / 32**2``:

    forward (FW): M * a * w / 1024    error backprop (EB): M * g * w / 1024
    weight gradient (GC): M * a * g / 1024

A full-precision layer counts 32 for every width, so its step costs ``3 * M``
and ``cp = (FW + EB + GC) / (3 * sum M) * 100``. Models describe their layers
as ``LayerMACs``; the functions here turn a precision into a ``Cost``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax.numpy as jnp

FULL = 32
KINDS = ("fp", "static", "fixed", "gated")


@dataclasses.dataclass(frozen=True)
class LayerMACs:
  """One conv/dense layer's forward MACs per sample and what sets its precision.

  kind: "fp" (always 32 bits), "static" (the step's (a, g), weights at a),
  "fixed" (held at ``fixed = (a, g, w)``) or "gated" (block ``block``'s choice).
  """
  name: str
  macs: float
  kind: str = "static"
  block: int = -1
  fixed: tuple[int, int, int] | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"LayerMACs.kind={self.kind!r}; expected one of {KINDS}")
    if self.kind == "fixed" and self.fixed is None:
      raise ValueError(f"layer {self.name!r} is 'fixed' but has no fixed=(a, g, w)")
    if self.kind == "gated" and self.block < 0:
      raise ValueError(f"layer {self.name!r} is 'gated' but has no block index")


class Cost(NamedTuple):
  """Per-sample bit-scaled MACs of one training step, split by product."""
  fw: float
  eb: float
  gc: float

  @property
  def total(self):
    return self.fw + self.eb + self.gc

  def scale(self, n) -> "Cost":
    return Cost(self.fw * n, self.eb * n, self.gc * n)


def _width(b: int) -> int:
  return FULL if b == 0 else b  # Width 0 means "not quantized".


def layer_cost(macs, a, g, w) -> Cost:
  return Cost(macs * a * w / FULL**2, macs * g * w / FULL**2, macs * a * g / FULL**2)


def _sum(costs) -> Cost:
  fw = eb = gc = 0.0
  for c in costs:
    fw, eb, gc = fw + c.fw, eb + c.eb, gc + c.gc
  return Cost(fw, eb, gc)


def _fixed_or_fp(layer: LayerMACs) -> Cost:
  if layer.kind == "fixed":
    return layer_cost(layer.macs, *(_width(b) for b in layer.fixed))
  return layer_cost(layer.macs, FULL, FULL, FULL)


def fp32_cost(layers: Sequence[LayerMACs]) -> Cost:
  return _sum(layer_cost(l.macs, FULL, FULL, FULL) for l in layers)


def static_cost(layers: Sequence[LayerMACs], bits: tuple[int, int] | None) -> Cost:
  """A plain model's step at ``bits = (a, g)`` (weights at ``a``); ``None`` is FP32."""
  if bits is None:
    return fp32_cost(layers)
  a, g = (_width(b) for b in bits)

  def one(l: LayerMACs) -> Cost:
    if l.kind == "static":
      return layer_cost(l.macs, a, g, a)
    if l.kind == "gated":
      raise ValueError(f"layer {l.name!r} is gated; use gated_cost")
    return _fixed_or_fp(l)

  return _sum(one(l) for l in layers)


def gated_cost(layers: Sequence[LayerMACs], masks, a: Sequence[int], g: Sequence[int],
               w: int) -> Cost:
  """Per-sample cost of a gated model's step, differentiable in ``masks``.

  masks: (num_blocks, batch, K) choices; returns a Cost of (batch,) arrays.
  """
  a = jnp.asarray([_width(b) for b in a], jnp.float32)
  g = jnp.asarray([_width(b) for b in g], jnp.float32)
  w = _width(w)
  # Per candidate, per unit MAC: (FW, EB, GC) of shape (K,).
  unit = (a * w / FULL**2, g * w / FULL**2, a * g / FULL**2)
  const = _sum(_fixed_or_fp(l) for l in layers if l.kind != "gated")
  gated_macs = [0.0] * masks.shape[0]
  for l in layers:
    if l.kind == "gated":
      gated_macs[l.block] += l.macs
    elif l.kind == "static":
      raise ValueError(f"layer {l.name!r} is static; a gated model has fp, fixed or gated layers")
  block_macs = jnp.asarray(gated_macs, jnp.float32)
  per_sample = [jnp.einsum("l,lbk,k->b", block_macs, masks, u) for u in unit]
  return Cost(*(p + c for p, c in zip(per_sample, const)))


def total_macs(layers: Sequence[LayerMACs]) -> float:
  return float(sum(l.macs for l in layers))


def cp(cost: Cost, layers: Sequence[LayerMACs]):
  """A step's cost as a percentage of the same step in FP32."""
  return cost.total / (3 * total_macs(layers)) * 100


def blocks_weighted_equally(layers: Sequence[LayerMACs]) -> list[LayerMACs]:
  """The authors' DFQ accounting: gated blocks only, each block counting M = 1."""
  per_block: dict[int, int] = {}
  for l in layers:
    if l.kind == "gated":
      per_block[l.block] = per_block.get(l.block, 0) + 1
  if not per_block:
    raise ValueError("no gated layers: equal block weighting needs a gated model")
  return [dataclasses.replace(l, macs=1 / per_block[l.block])
          for l in layers if l.kind == "gated"]
