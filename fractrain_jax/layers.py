"""The quantized layers every FracTrain model is built from (SPEC sections 1, 4).

A quantized layer (``QConv`` for the CNNs, ``QDense`` for the Transformer
LM; both a ``QuantizedLayer``) is ``y = op(Q_a(x), Q_w(W))`` followed by an
identity whose backward pass quantizes ``dL/dy`` to ``b_g`` bits before it
reaches the layer's two gradient products. Its precision comes as one of:

- ``None``: full precision.
- ``StaticBits(a, g, w)``: compile-time constants (static baselines, PFQ).
- ``GatedBits(mask, a, g, w)``: DFQ's choice among K candidates, per sample
  (a CNN's mask is ``(batch, K)``) or per token (the Transformer LM's is
  ``(batch, positions, K)``). The K candidate quantizations of the input
  share one range and are blended by the mask, so one conv or matmul runs
  and the gate gets a gradient through the blend; the output gradient is
  quantized per sample (or token) at the chosen ``g``.

Every quantized layer (and the classifier, a ``Dense``) is built with a
*role*, the name of what sets its precision (see ``models/parts.py``). While
``recording_costs()`` is active, each call sows one ``CostRecord``: its
forward MACs per sample, computed from the shapes it actually sees, and its
role. ``models/capture.py`` collects these into a model's cost table (SPEC
section 2), so no model restates its layer layout for the accounting.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import math
from typing import Iterator, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from fractrain_jax import conv, quant


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
  """A choice among K candidate (a, g) pairs per sample or token; weights at a fixed ``w``."""
  mask: jax.Array  # (batch, K) or (batch, positions, K), one-hot in the forward pass.
  a: tuple[int, ...] = struct.field(pytree_node=False)
  g: tuple[int, ...] = struct.field(pytree_node=False)
  w: int = struct.field(pytree_node=False)

  def choice(self) -> jax.Array:
    return jnp.argmax(self.mask, axis=-1)

  def chosen_g(self) -> jax.Array:
    """The chosen gradient width of every sample (or token): the mask's leading shape."""
    return jnp.asarray(self.g, jnp.int32)[self.choice()]


LayerBits = Union[None, StaticBits, GatedBits]

# Layer roles: what sets a layer's precision (models/parts.py routes precisions by them).
OUTER = "outer"            # Outside the residual blocks: stem, MobileNetV2's last 1x1 conv.
BRANCH = "branch"          # A block's residual branch: what DFQ gates.
SHORTCUT = "shortcut"      # 1x1 projection shortcuts.
DEPTHWISE = "depthwise"    # MobileNetV2's depthwise convs, held at (8, 16, 8).
CLASSIFIER = "classifier"  # The final dense layer, always full precision.
# The Transformer LM's attention score and value products (activation by
# activation, no weights): full precision, counted at 32 bits.
ATTENTION = "attention"
ROLES = (OUTER, BRANCH, SHORTCUT, DEPTHWISE, CLASSIFIER, ATTENTION)


def check_role(role: str) -> str:
  if role not in ROLES:
    raise ValueError(f"role={role!r}; expected one of {ROLES}")
  return role


class CostRecord(nnx.Intermediate):
  """What a layer call sows for the cost tables: ``(call index, MACs per sample, role)``."""


# The call counter of the active ``recording_costs()``, None outside one. Recording
# hangs on this flag, not on ``sow`` alone: outside ``nnx.capture`` a sow would store a
# Variable in the module, and from there in every state split and checkpoint.
_COST_CALLS: contextvars.ContextVar[Iterator[int] | None] = contextvars.ContextVar(
    "fractrain_cost_calls", default=None)


@contextlib.contextmanager
def recording_costs():
  """Makes every layer call inside sow a ``CostRecord``; run it under ``nnx.capture``."""
  token = _COST_CALLS.set(itertools.count())
  try:
    yield
  finally:
    _COST_CALLS.reset(token)


def record_cost(module: nnx.Module, macs: int, role: str) -> None:
  """Sows ``module``'s MACs and role while costs are recorded; does nothing otherwise."""
  calls = _COST_CALLS.get()
  if calls is not None:
    # The call index keeps the order of the forward pass (captured state is sorted by path).
    module.sow(CostRecord, "cost", (next(calls), int(macs), role))


def conv_init(kernel_size: int, out_features: int):
  """SPEC section 6: N(0, sqrt(2 / (k * k * out_channels)))."""
  return nnx.initializers.normal(math.sqrt(2.0 / (kernel_size * kernel_size * out_features)))


def dense_init(in_features: int, out_features: int):
  """SPEC section 6: N(0, sqrt(2 / (in * out)))."""
  return nnx.initializers.normal(math.sqrt(2.0 / (in_features * out_features)))


class Dense(nnx.Linear):
  """``nnx.Linear`` (same parameters and state paths) that reports itself to the cost tables."""

  def __init__(self, in_features: int, out_features: int, *, role: str = CLASSIFIER,
               **kwargs):
    super().__init__(in_features, out_features, **kwargs)
    self.role = check_role(role)

  def __call__(self, inputs: jax.Array, *args, **kwargs) -> jax.Array:
    y = super().__call__(inputs, *args, **kwargs)
    # Per sample: every position along the axes between batch and features counts.
    record_cost(self, math.prod(inputs.shape[1:]) * self.out_features, self.role)
    return y


class Quantizers(nnx.Module):
  """FracTrain's three quantizers around a contraction, for any layer that has one.

  ``_quantize_input`` (``Q_a``: a per-tensor range, the batch's in training and
  a running average in evaluation), the weight quantizer (``quant.quantize_weight``,
  per output channel) and ``_quantize_output`` (the identity whose backward
  pass quantizes ``dL/dy`` to ``b_g`` bits). The project's own layers
  (``QuantizedLayer``) and the layers ``fractrain_jax.attach`` puts in a
  user's model (subclasses of ``nnx.Conv``, ``nnx.Linear``, ``nnx.Einsum``)
  share them, so both compute the same numbers.
  """

  def _init_quantizers(self, act_momentum: float, role: str) -> None:
    self.act_momentum = act_momentum
    self.role = check_role(role)
    # Eval-time input range: running averages of lo and (hi - lo) (SPEC section 1).
    self.act_lo = nnx.BatchStat(jnp.zeros((), jnp.float32))
    self.act_range = nnx.BatchStat(jnp.zeros((), jnp.float32))
    self.use_running_average = False

  def set_view(self, use_running_average: bool | None = None):
    """``nnx.view(model, use_running_average=True)``: the running input range, as BatchNorm."""
    if use_running_average is not None:
      self.use_running_average = use_running_average

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

  def _quantize_output(self, y: jax.Array, bits: LayerBits,
                       key: jax.Array | None) -> jax.Array:
    """``y`` whose cotangent is quantized to the chosen ``g`` (per sample or token)."""
    if bits is None or self.use_running_average:
      return y  # Evaluation has no backward pass to quantize.
    if isinstance(bits, StaticBits):
      return quant.quantize_grad(y, bits.g, key)
    return quant.quantize_grad(y, bits.chosen_g(), key, widths=bits.g)


class QuantizedLayer(Quantizers):
  """A contraction with FracTrain's three quantizers: ``y = op(Q_a(x), Q_w(W))``.

  Subclasses (``QConv``, ``QDense``) set ``kernel`` (output channels last, so
  ``quant.quantize_weight`` is per output channel) and give the contraction
  (``_contract``) and its forward MACs per sample (``_macs``). Everything
  else is shared (``Quantizers``): the input's per-tensor range (running
  average for evaluation), the weight quantizer, the cost record, and the
  identity whose backward pass quantizes ``dL/dy`` stochastically to ``b_g``
  bits before it reaches the two gradient products.
  """

  def _contract(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    raise NotImplementedError

  def _macs(self, x: jax.Array, y: jax.Array) -> int:
    """Forward MACs per sample (axis 0 of ``x``) of ``y = _contract(x, kernel)``."""
    raise NotImplementedError

  def __call__(self, x: jax.Array, bits: LayerBits = None, *,
               key: jax.Array | None = None) -> jax.Array:
    kernel = self.kernel[...]
    if bits is not None:
      x = self._quantize_input(x, bits)
      kernel = quant.quantize_weight(kernel, bits.w)
    y = self._contract(x, kernel)
    record_cost(self, self._macs(x, y), self.role)
    return self._quantize_output(y, bits, key)


class QConv(QuantizedLayer):
  """A 2-D convolution (NHWC, HWIO, no bias) with FracTrain's three quantizers.

  role: what sets this conv's precision (``ROLES``), reported to the cost tables.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
               strides: int = 1, padding: int | None = None, feature_group_count: int = 1,
               act_momentum: float = 0.9, role: str = BRANCH, rngs: nnx.Rngs):
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
    shape = (kernel_size, kernel_size, in_features // feature_group_count, out_features)
    self.kernel = nnx.Param(conv_init(kernel_size, out_features)(rngs.params(), shape))
    self._init_quantizers(act_momentum, role)

  def _contract(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    p = self.padding
    return conv.conv_general_dilated(
        x, kernel, window_strides=(self.strides, self.strides), padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.feature_group_count)

  def _macs(self, x: jax.Array, y: jax.Array) -> int:
    _, oh, ow, _ = y.shape
    per_output = self.kernel_size**2 * (self.in_features // self.feature_group_count)
    return oh * ow * per_output * self.out_features


class QDense(QuantizedLayer):
  """``y = Q_a(x) @ Q_w(W) + b`` over the last axis, with FracTrain's three quantizers.

  The Transformer LM's projections and MLP matmuls. The input may have any
  axes between batch and features (a sequence's positions): its range is
  per tensor, the weights' per output channel. The bias is added after the
  gradient quantizer, in full precision: its gradient is a sum of ``dL/dy``,
  not a product the bit widths scale.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               kernel_init=None, act_momentum: float = 0.9, role: str = BRANCH,
               rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    init = kernel_init or dense_init(in_features, out_features)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
    self._init_quantizers(act_momentum, role)

  def _contract(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.dot(x, kernel)

  def _macs(self, x: jax.Array, y: jax.Array) -> int:
    # Every position along the axes between batch and features counts.
    return math.prod(x.shape[1:]) * self.out_features

  def __call__(self, x: jax.Array, bits: LayerBits = None, *,
               key: jax.Array | None = None) -> jax.Array:
    y = super().__call__(x, bits, key=key)
    return y if self.bias is None else y + self.bias[...]
