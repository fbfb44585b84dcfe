"""The quantized convolution every FracTrain model is built from (SPEC sections 1, 4).

A quantized conv is ``y = conv(Q_a(x), Q_w(W))`` followed by an identity whose
backward pass quantizes ``dL/dy`` to ``b_g`` bits before it reaches the conv's
two gradient products. Its precision comes as one of:

- ``None``: full precision.
- ``StaticBits(a, g, w)``: compile-time constants (static baselines, PFQ).
- ``GatedBits(mask, a, g, w)``: DFQ's per-sample choice among K candidates.
  The K candidate quantizations of the input share one range and are blended
  by the mask, so one conv runs and the gate gets a gradient through the
  blend; the output gradient is quantized per sample at the chosen ``g``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from fractrain_jax import quant


@dataclasses.dataclass(frozen=True)
class StaticBits:
  """Activation, gradient and weight widths of a conv; hashable, so static under jit."""
  a: int
  g: int
  w: int

  def __post_init__(self):
    for name in ("a", "g", "w"):
      quant.check_bits(getattr(self, name), f"StaticBits.{name}")


@struct.dataclass
class GatedBits:
  """Per-sample choice among K candidate (a, g) pairs; weights at a fixed ``w``."""
  mask: jax.Array  # (batch, K), one-hot in the forward pass.
  a: tuple[int, ...] = struct.field(pytree_node=False)
  g: tuple[int, ...] = struct.field(pytree_node=False)
  w: int = struct.field(pytree_node=False)

  def choice(self) -> jax.Array:
    return jnp.argmax(self.mask, axis=-1)

  def per_sample_g(self) -> jax.Array:
    return jnp.asarray(self.g, jnp.int32)[self.choice()]


Precision = Union[None, StaticBits, GatedBits]


def conv_init(kernel_size: int, out_features: int):
  """SPEC section 6: N(0, sqrt(2 / (k * k * out_channels)))."""
  return nnx.initializers.normal(math.sqrt(2.0 / (kernel_size * kernel_size * out_features)))


def dense_init(in_features: int, out_features: int):
  """SPEC section 6: N(0, sqrt(2 / (in * out)))."""
  return nnx.initializers.normal(math.sqrt(2.0 / (in_features * out_features)))


class QConv(nnx.Module):
  """A 2-D convolution (NHWC, HWIO, no bias) with FracTrain's three quantizers."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
               strides: int = 1, padding: int | None = None, feature_group_count: int = 1,
               act_momentum: float = 0.9, rngs: nnx.Rngs):
    if in_features % feature_group_count or out_features % feature_group_count:
      raise ValueError(
          f"feature_group_count={feature_group_count} must divide in_features={in_features} "
          f"and out_features={out_features}")
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = kernel_size
    self.strides = strides
    # PyTorch-style symmetric padding: "SAME" pads (0, 1) at stride 2, not (1, 1).
    self.padding = kernel_size // 2 if padding is None else padding
    self.feature_group_count = feature_group_count
    self.act_momentum = act_momentum
    shape = (kernel_size, kernel_size, in_features // feature_group_count, out_features)
    self.kernel = nnx.Param(conv_init(kernel_size, out_features)(rngs.params(), shape))
    # Eval-time input range: running averages of lo and (hi - lo) (SPEC section 1).
    self.act_lo = nnx.BatchStat(jnp.zeros((), jnp.float32))
    self.act_range = nnx.BatchStat(jnp.zeros((), jnp.float32))
    self.use_running_average = False

  def out_hw(self, in_hw: Sequence[int]) -> tuple[int, int]:
    k, s, p = self.kernel_size, self.strides, self.padding
    return tuple((n + 2 * p - k) // s + 1 for n in in_hw)

  def macs(self, in_hw: Sequence[int]) -> int:
    """Forward multiply-accumulates per sample for an input of spatial size ``in_hw``."""
    oh, ow = self.out_hw(in_hw)
    per_output = self.kernel_size**2 * (self.in_features // self.feature_group_count)
    return oh * ow * per_output * self.out_features

  def _input_range(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if self.use_running_average:
      return self.act_lo[...], self.act_lo[...] + self.act_range[...]
    xs = jax.lax.stop_gradient(x)
    lo, hi = jnp.min(xs), jnp.max(xs)
    m = self.act_momentum
    # set_value, not `[...] =`: flax 0.12 builds a costly error message on every
    # traced item assignment (tracing grew with the square of the model size).
    self.act_lo.set_value(m * self.act_lo[...] + (1 - m) * lo)
    self.act_range.set_value(m * self.act_range[...] + (1 - m) * (hi - lo))
    return lo, hi

  def _quantize_input(self, x: jax.Array, bits: StaticBits | GatedBits) -> jax.Array:
    if isinstance(bits, StaticBits):
      if bits.a == 0:
        return x
      lo, hi = self._input_range(x)
      return quant.fake_quant(x, bits.a, lo=lo, hi=hi)
    lo, hi = self._input_range(x)
    return quant.fake_quant_blend(x, bits.mask, bits.a, lo=lo, hi=hi, one_hot=True)

  def __call__(self, x: jax.Array, bits: Precision = None, *,
               key: jax.Array | None = None) -> jax.Array:
    kernel = self.kernel[...]
    if bits is not None:
      x = self._quantize_input(x, bits)
      kernel = quant.quantize_weight(kernel, bits.w)
    p = self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(self.strides, self.strides), padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.feature_group_count)
    if bits is None or self.use_running_average:
      return y  # Evaluation has no backward pass to quantize.
    g = bits.g if isinstance(bits, StaticBits) else bits.per_sample_g()
    return quant.quantize_grad(y, g, key)
