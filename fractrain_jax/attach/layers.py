"""FracTrain's quantizers inside a user's ``nnx.Conv``, ``nnx.Linear`` and ``nnx.Einsum``.

An attached layer is the user's own layer object, its class swapped for a
subclass of that class (``quantized_class``): its kernel and bias Variables,
its settings (padding, strides, groups, dtype, masks) and its paths stay
what they were. Flax's layers compute through an injectable operation
(``dot_general``, ``conv_general_dilated``, ``einsum_op``); the attached
layer sets it to ``QuantizedOp``, which quantizes the kernel per output
channel before the operation and puts the gradient quantizer on its output,
before the bias is added, exactly where the project's own ``QConv`` and
``QDense`` have them. The input is quantized in the layer's ``__call__``,
before Flax's padding, so padded zeros stay exact as in ``QConv``. The
numerics are ``layers.Quantizers``', shared with the project's own layers.

A layer learns its precision from the forward pass's ``route`` (what the
attached model's call sets up) and its own ``LayerPlan``; outside such a
call it runs at full precision, as the user's model did.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import opt_einsum
from flax import nnx

from fractrain_jax import conv, quant
from fractrain_jax.attach import route as routing
from fractrain_jax.attach.rules import FULL, LayerPlan
from fractrain_jax.errors import ConfigError
from fractrain_jax.layers import BRANCH, LayerBits, Quantizers, record_cost

DOT_GENERAL, CONV, EINSUM = "dot_general", "conv_general_dilated", "einsum_op"
# The Flax layers FracTrain attaches to, and the attribute holding each one's operation.
OPERATIONS: dict[type, str] = {nnx.Linear: DOT_GENERAL, nnx.Conv: CONV, nnx.Einsum: EINSUM}


@dataclasses.dataclass
class Request:
  """One attached layer call, as its operation sees it: the precision, and the MACs found."""
  layer: "AttachedLayer"
  bits: LayerBits
  key: jax.Array | None
  macs: int | None = None


_REQUEST: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "fractrain_layer_call", default=None)


def _dot_general(args, kwargs):
  lhs, rhs = args[0], args[1]
  (lhs_contract, rhs_contract), (_, rhs_batch) = (
      args[2] if len(args) > 2 else kwargs["dimension_numbers"])
  channels = tuple(a for a in range(rhs.ndim) if a not in (*rhs_contract, *rhs_batch))
  return lhs, rhs, channels, math.prod(lhs.shape[a] for a in lhs_contract)


def _conv(args, kwargs):
  lhs, rhs = args[0], args[1]
  numbers = kwargs.get("dimension_numbers", args[6] if len(args) > 6 else None)
  spec = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, numbers)
  out = spec.rhs_spec[0]
  # Each output element takes (input features / groups) x kernel window MACs.
  return lhs, rhs, (out,), math.prod(rhs.shape) // rhs.shape[out]


def _einsum(args, kwargs):
  equation, lhs, rhs = args[0], args[1], args[2]
  operands, result, _ = opt_einsum.parser.parse_einsum_input((equation, lhs, rhs))
  lhs_letters, rhs_letters = operands.split(",")
  sizes = dict(zip(lhs_letters, lhs.shape)) | dict(zip(rhs_letters, rhs.shape))
  contracted = set(lhs_letters + rhs_letters) - set(result)
  channels = tuple(i for i, c in enumerate(rhs_letters) if c in result)
  return lhs, rhs, channels, math.prod(sizes[c] for c in contracted)


# Operation -> (lhs, rhs, the kernel's output-channel axes, MACs per output element).
_ANATOMY = {DOT_GENERAL: _dot_general, CONV: _conv, EINSUM: _einsum}
_RHS_POSITION = {DOT_GENERAL: 1, CONV: 1, EINSUM: 2}


@dataclasses.dataclass(frozen=True)
class QuantizedOp:
  """A Flax layer's operation with the weight and gradient quantizers around it.

  Frozen and holding no module, so it is a hashable static attribute of the
  graph; what a call quantizes comes from the calling layer's ``Request``.
  """
  kind: str
  float_op: Callable[..., Any]

  def __call__(self, *args, **kwargs):
    request = _REQUEST.get()
    if request is None:  # Called other than through its layer: as the user wrote it.
      return self.float_op(*args, **kwargs)
    _, rhs, channels, per_output = _ANATOMY[self.kind](args, kwargs)
    bits = request.bits
    if bits is not None:
      i = _RHS_POSITION[self.kind]
      rhs = quant.quantize_weight(rhs, bits.w, None if channels == (rhs.ndim - 1,) else channels)
      args = args[:i] + (rhs,) + args[i + 1:]
    op = self.float_op
    if self.kind == CONV and op is jax.lax.conv_general_dilated:
      # Flax's own conv: its weight gradient split over the batch where a step asks (conv.py).
      op = conv.conv_general_dilated
    y = op(*args, **kwargs)
    request.macs = math.prod(y.shape) * per_output
    return request.layer._quantize_output(y, bits, request.key)


class AttachedLayer(Quantizers):
  """What an attached layer adds to its Flax class: the quantizers and its ``LayerPlan``.

  Mixed in before the user's layer class (``quantized_class``); ``fractrain``
  (a ``LayerPlan``) says which rule decided the layer and which gated block
  holds it.
  """

  fractrain: LayerPlan

  def __call__(self, inputs, *args, **kwargs):
    route = routing.current()
    bits, key = (None, None) if route is None else route.precision(self.fractrain)
    if bits is not None:
      inputs = self._quantize_input(inputs, bits)
    request = Request(self, bits, key)
    token = _REQUEST.set(request)
    try:
      y = super().__call__(inputs, *args, **kwargs)
    finally:
      _REQUEST.reset(token)
    if request.macs is None:
      raise TypeError(f"layer {self.fractrain.path} ({type(self)._fractrain_base.__name__}) never "
                      f"called its {OPERATIONS[base_class(self)]}: FracTrain quantizes through "
                      "that operation, so this layer cannot be attached")
    batch = inputs.shape[0] if inputs.ndim else 1
    record_cost(self, request.macs // max(batch, 1), self.role)
    if route is not None:
      route.called(self.fractrain, inputs)
    return y


def base_class(layer: nnx.Module) -> type:
  """The Flax class (``nnx.Conv``, ``nnx.Linear``, ``nnx.Einsum``) a layer derives from."""
  return next(c for c in OPERATIONS if isinstance(layer, c))


def is_attachable(node: Any) -> bool:
  return isinstance(node, tuple(OPERATIONS)) and not isinstance(node, AttachedLayer)


@functools.cache
def quantized_class(cls: type) -> type:
  """``cls`` with ``AttachedLayer`` mixed in; one class per user class, so graphs compare equal."""
  return type(f"Quantized{cls.__name__}", (AttachedLayer, cls),
              {"__module__": __name__, "_fractrain_base": cls})


def swap_class(node: Any, cls: type) -> None:
  # Past NNX's __setattr__, which would record `__class__` as one of the node's attributes.
  object.__setattr__(node, "__class__", cls)


def _kernel_ndim(node: nnx.Module) -> int:
  """The kernel's rank as the layer's own settings give it."""
  if isinstance(node, nnx.Conv):
    return len(node.kernel_size) + 2
  if isinstance(node, nnx.Einsum):
    return len(node.kernel_shape)
  return 2


def attach_layer(node: nnx.Module, path: str, act_momentum: float) -> nnx.Module:
  """Turns a Flax layer into its attached form in place (a clone's node, never the user's)."""
  ndim = getattr(getattr(node, "kernel", None), "ndim", None)
  if ndim is not None and ndim != _kernel_ndim(node):
    raise ConfigError(
        f"layer {path} holds a stack of kernels {tuple(node.kernel.shape)} (layers made with "
        "nnx.vmap and run under nnx.scan); FracTrain attaches to layers the forward pass "
        "calls one by one, each with its own input range and cost: unroll the stack")
  name = OPERATIONS[base_class(node)]
  swap_class(node, quantized_class(type(node)))
  setattr(node, name, QuantizedOp(name, getattr(node, name)))
  node._init_quantizers(act_momentum, BRANCH)
  node.fractrain = LayerPlan(path, FULL)
  return node


# What attach_layer adds, which detach_layer takes away again.
_ADDED = ("act_momentum", "role", "act_lo", "act_range", "use_running_average", "fractrain")


def detach_layer(node: AttachedLayer) -> nnx.Module:
  name = OPERATIONS[base_class(node)]
  setattr(node, name, getattr(node, name).float_op)
  for attribute in _ADDED:
    delattr(node, attribute)
  swap_class(node, type(node)._fractrain_base)
  return node
