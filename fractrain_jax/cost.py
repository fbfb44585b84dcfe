"""Bit-scaled cost accounting (SPEC section 2).

For a layer with ``M`` forward multiply-accumulates per sample, one training
step on one sample costs, in FP32-MAC units scaled by ``bits * bits / 32**2``:

    forward (FW): M * a * w / 1024    error backprop (EB): M * g * w / 1024
    weight gradient (GC): M * a * g / 1024

A full-precision layer counts 32 for every width, so its step costs ``3 * M``.
Models describe their layers as ``LayerMACs``; the functions here turn a
precision into a ``Cost``.

Two different percentages come out of this, and they must not be confused:

* the **whole-model cp** (``cp``): a step's real cost, every layer included
  (the gated models' full-precision stem, shortcuts and classifier at 32
  bits), as a percentage of the same step in FP32. Reports and summaries
  count whole-training cost this way.
* the **steering cp** (``steer_cp``): the figure DFQ's targets are written in,
  as the authors' code computes it. Only the gated blocks count, each weighted
  by ``w_l`` (1 per block by default, or the block's real MACs), so it ranges
  over the candidates' unit costs whatever the model:
  ``sum_l w_l (FW_l + EB_l + GC_l) / (3 sum_l w_l) * 100`` with
  ``FW_l = b_a b_w / 32**2`` at block l's choice.

Masks are ``(num_blocks, batch, K)`` when the gate chooses per sample (the
CNNs), or ``(num_blocks, batch, positions, K)`` when it chooses per token
(the Transformer LM, whose gated blocks are its sublayers). A sample is then
one sequence, and each of its T tokens runs ``1/T`` of the block's MACs
per sequence, so every function here first takes the mean of the masks
over the positions (``per_sample_shares``): a sequence's cost is the mean
over its tokens, and the batch's is the sum over its sequences, the same
meaning per sample as for an image.
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


def per_sample_shares(masks):
  """``(num_blocks, batch, K)``: each sample's share of each candidate per block.

  Per-sample masks pass unchanged; per-token masks ``(L, batch, positions..., K)``
  are averaged over the positions.
  """
  masks = jnp.asarray(masks)
  if masks.ndim < 3:
    raise ValueError(f"masks have shape {masks.shape}; expected (num_blocks, batch, ..., K)")
  return masks if masks.ndim == 3 else masks.mean(axis=tuple(range(2, masks.ndim - 1)))


def gated_cost(layers: Sequence[LayerMACs], masks, a: Sequence[int], g: Sequence[int],
               w: int) -> Cost:
  """Per-sample cost of a gated model's step, differentiable in ``masks``.

  masks: (num_blocks, batch, K) choices, or (num_blocks, batch, positions, K)
  per token; returns a Cost of (batch,) arrays.
  """
  masks = per_sample_shares(masks)
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


def quantized_layers(layers: Sequence[LayerMACs]) -> list[LayerMACs]:
  """The layers whose precision the method sets (kinds "static" and "gated").

  Their cost is the "quantized-layer cost": what a method can save at all. On
  the Transformer LM it matters beside the whole-model cost, which a
  full-precision output layer over a large vocabulary dominates.
  """
  return [l for l in layers if l.kind in ("static", "gated")]


def sbm8_quantized_cost(layers: Sequence[LayerMACs]) -> Cost:
  """The quantized layers of ``layers`` at SBM 8/8 (weights at 8): their reference cost."""
  return static_cost([dataclasses.replace(l, kind="static", block=-1)
                      for l in quantized_layers(layers)], (8, 8))


def total_macs(layers: Sequence[LayerMACs]) -> float:
  return float(sum(l.macs for l in layers))


def cp(cost: Cost, layers: Sequence[LayerMACs]):
  """The whole-model cp: a step's cost as a percentage of the same step in FP32."""
  return cost.total / (3 * total_macs(layers)) * 100


WEIGHTINGS = ("blocks", "macs")


def block_weights(layers: Sequence[LayerMACs], weighting: str) -> list[float]:
  """``w_l`` of each gated block for the steering cp.

  weighting: "blocks" (every block 1: the authors' default, ``conv_info = 1``)
  or "macs" (the block's real gated MACs: their ``--conv_info`` FLOPs table).
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting={weighting!r}; expected one of {WEIGHTINGS}")
  per_block: dict[int, float] = {}
  for l in layers:
    if l.kind == "gated":
      per_block[l.block] = per_block.get(l.block, 0.0) + l.macs
  if not per_block:
    raise ValueError("no gated layers: the steering cp needs a gated model")
  if sorted(per_block) != list(range(len(per_block))):
    raise ValueError(f"gated blocks {sorted(per_block)} are not numbered 0..L-1")
  return [1.0 if weighting == "blocks" else per_block[b] for b in range(len(per_block))]


def _unit(a: int, g: int, w: int) -> float:
  """FW + EB + GC of one MAC at widths (a, g, w): ``(a w + g w + a g) / 32**2``."""
  return layer_cost(1, _width(a), _width(g), _width(w)).total


def candidate_units(a: Sequence[int], g: Sequence[int], w: int) -> jnp.ndarray:
  """Each candidate's FW + EB + GC per MAC, shape (K,)."""
  return jnp.asarray([_unit(ak, gk, w) for ak, gk in zip(a, g)], jnp.float32)


def steer_cp_range(a: Sequence[int], g: Sequence[int], w: int) -> tuple[float, float]:
  """The lowest and highest steering cp (%): every block at the cheapest / dearest candidate.

  The same for every model and weighting: cp is a weighted mean of unit costs.
  """
  units = [_unit(ak, gk, w) for ak, gk in zip(a, g)]
  return min(units) / 3 * 100, max(units) / 3 * 100


def steer_cp(masks, weights: Sequence[float], a: Sequence[int], g: Sequence[int], w: int):
  """The batch's mean steering cp (%), differentiable in ``masks``.

  masks: (num_blocks, batch, K), or per token (num_blocks, batch, positions, K):
  then the mean over every token of the batch.
  """
  masks = per_sample_shares(masks)
  weights = jnp.asarray(weights, jnp.float32)
  per_block = jnp.einsum("lbk,k->lb", masks, candidate_units(a, g, w)).mean(axis=1)
  return jnp.sum(weights * per_block) / (3 * jnp.sum(weights)) * 100


def steer_cost_sum(masks, weights: Sequence[float], a: Sequence[int], g: Sequence[int], w: int):
  """What the authors' DFQ loss multiplies by ``sign * beta``: the batch's total cost.

  ``sum_batch sum_blocks w_l (FW + EB + GC)_l / mean_l(w_l)`` (train_frac.py:432
  with ``conv_info``): summed over the samples, not averaged. With ``w_l = 1``
  it is simply the sum of the chosen candidates' unit costs. With per-token
  masks a sample is a sequence, and its block cost the mean over its tokens.
  """
  masks = per_sample_shares(masks)
  weights = jnp.asarray(weights, jnp.float32)
  per_block = jnp.einsum("lbk,k->l", masks, candidate_units(a, g, w))
  return jnp.sum(weights * per_block) / jnp.mean(weights)
